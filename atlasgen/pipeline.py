"""Runs stages in order: skips a stage whose config and inputs are unchanged (config hash in `stage_runs`),
resumes one that was interrupted or failed under the same hash, and resets one whose hash changed.

The stages and everything about them (order, inputs, outputs, reset) come from `atlasgen.stages.REGISTRY`.
A stage that raises is recorded `failed` with its error (`interrupted` for Ctrl-C, and for SIGTERM, which the
CLI turns into the same exception: `errors.sigterm_as_interrupt`), so `atlasgen info` shows what happened; the
error itself goes on to the CLI, which prints it as one line.
Stages declared with `executor=True` (embed, render) get `run(cfg, store, executor=...)`: the executor
`[run]` asks for (`atlasgen.executor`), which runs their units here or on Ray.
"""
from __future__ import annotations

import time
from datetime import datetime
from typing import Iterable

from .artefacts import missing_artefacts
from .config import AtlasConfig, config_hash, config_json
from .errors import (AtlasError, ModelLoadError, Terminated, interrupt_reason, interrupts_kept, is_interrupt,
                     sigterm_received)
from .executor import make_executor
from .paths import missing_model_folder, sweep_stale_temps
from .progress import say
from .stages import REGISTRY
from .status import enter_stage, keeps_build_status
from .store import Store, done_under


def stage_hash(cfg: AtlasConfig, store: Store, name: str) -> str:
    """A stage's hash covers its config and the identity of each input as it is in the store now (that
    stage's config hash and when it finished), so any rerun of an input, even a forced one with the same
    config, makes the stages that read it run again; except a rerun that only restored deleted files and left
    the input's tables as they were, which keeps its finish time (see `_run_stages`)."""
    return config_hash(cfg.stage(name), _input_identities(store, name))


@keeps_build_status
def run_stages(cfg: AtlasConfig, store: Store, stages: Iterable[str], force: bool = False,
               executor=None) -> dict[str, dict]:
    """Run `stages` (in pipeline order); returns each stage's summary (`{"skipped": True}` if skipped, `{"repaired":
    True}` if its `repair` restored lost files).
    `executor`: one to use instead of the one cfg.run asks for (then the caller closes it)."""
    own_executor = executor is None
    executor = make_executor(cfg.run) if own_executor else executor  # Ray connects when a stage needs it
    try:
        return _run_stages(cfg, store, stages, force, executor)
    finally:
        if own_executor:
            executor.close()


def _run_stages(cfg: AtlasConfig, store: Store, stages: Iterable[str], force: bool, executor) -> dict[str, dict]:
    summaries: dict[str, dict] = {}
    sweep_stale_temps(store.paths.out_dir)  # leftovers of killed runs (temp names of dead processes)
    for stage in REGISTRY.ordered(stages):
        name = stage.name
        enter_stage(name)
        this_hash = stage_hash(cfg, store, name)
        # A rerun that only restores deleted files: its tables' digest and finish time before it (kept in the
        # stage's row while it runs, so a repair that is interrupted and resumed still compares with them).
        repair_of: dict | None = None
        row = store.stage_row(name)
        if not force and done_under(row, this_hash):
            # Done only while its artefacts exist: a deleted file makes the stage run again.
            missing = missing_artefacts(store, name)
            if missing is None:
                say(f"{name}: up to date (config {this_hash}), skipped")
                summaries[name] = {"skipped": True, **row["summary"]}
                continue
            if stage.repair is not None:
                summaries[name] = _repair(cfg, store, stage, missing, row)
                continue
            say(f"{name}: {missing}, so it runs again")
            if stage.tables:  # a stage of files alone cannot show that it made the same again
                repair_of = {"digest": store.tables_digest(stage.tables), "finished_at": row["finished_at"]}
        _preflight(cfg, stage)
        if force or row is None or row["config_hash"] != this_hash:
            stage.reset_outputs(store)
        elif row["status"] in ("running", "failed", "interrupted"):
            say(f"{name}: resuming an unfinished run ({row['status']})")
            repair_of = _unfinished_repair(row)
        store.mark_stage_started(name, this_hash, config_json(cfg.stage(name)), _running_summary(repair_of))
        t0 = time.perf_counter()
        say(f"{name}: running")
        try:
            extra = {"executor": executor} if stage.executor else {}
            summary = _keeping_interrupts(lambda: stage.run(cfg.stage(name), store, **extra))
        except BaseException as e:
            # Ctrl-C, also when DuckDB turned it into its own error; SIGTERM (`Terminated`), also when something
            # failed on its way (a worker a scheduler's SIGTERM killed too): the stage resumes, it did not fail.
            if is_interrupt(e) or sigterm_received():
                _record_end(store, name, "interrupted", interrupt_reason())
                if isinstance(e, KeyboardInterrupt):
                    raise
                raise (Terminated() if sigterm_received() else KeyboardInterrupt()) from e
            _record_end(store, name, "failed", e.message if isinstance(e, AtlasError) else f"{type(e).__name__}: {e}")
            raise
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        # A repair that left the tables as they were keeps the stage's finish time, which the hashes of the
        # stages reading it cover: one lost corpus copy no longer re-embeds the corpus and retrains the SAE.
        # Not where the stage says it wrote files with other content (an edited input's corpus copy).
        unchanged = (repair_of is not None and store.tables_digest(stage.tables) == repair_of["digest"]
                     and not summary.get("n_files_changed"))
        store.mark_stage_done(name, summary, finished_at=repair_of["finished_at"] if unchanged else None)
        say(f"{name}: done in {summary['seconds']:.1f}s " + _brief(summary))
        summaries[name] = summary
    return summaries


def _keeping_interrupts(call) -> dict:
    """`call()`'s summary (a dict, {} for None), with a Ctrl-C that a C callback swallowed meanwhile raised here
    (`errors.interrupts_kept`)."""
    with interrupts_kept() as interrupt_caught:
        summary = dict(call() or {})
        if interrupt_caught():  # sent again, but no Python code ran in this thread after it: stop here
            raise KeyboardInterrupt
    return summary


REPAIR_OF = "repair_of"  # the key of a running repair's digest and earlier finish time in its row's summary


def _running_summary(repair_of: dict | None) -> dict | None:
    """What a running stage's row keeps: a repair's digest and earlier finish time (`_unfinished_repair` reads
    them back), else nothing."""
    if repair_of is None:
        return None
    return {REPAIR_OF: {"digest": repair_of["digest"], "finished_at": repair_of["finished_at"].isoformat()}}


def _unfinished_repair(row: dict) -> dict | None:
    """The digest and earlier finish time an interrupted or failed repair started from, if it was one."""
    repair_of = (row.get("summary") or {}).get(REPAIR_OF)
    if not isinstance(repair_of, dict):
        return None
    try:
        return {"digest": repair_of["digest"], "finished_at": datetime.fromisoformat(repair_of["finished_at"])}
    except (KeyError, TypeError, ValueError):
        return None


def _repair(cfg: AtlasConfig, store: Store, stage, missing: str, row: dict) -> dict:
    """A finished stage's lost files written again by its `repair`, from its tables: its row stays done, with
    its finish time (the hashes of the stages reading it cover that) and the summary keys the repair updates.
    Interrupted or failed, the row is as it was: the next run finds the same files missing and tries again."""
    say(f"{stage.name}: {missing}, so it writes them again")
    t0 = time.perf_counter()
    changed = _keeping_interrupts(lambda: stage.repair(cfg.stage(stage.name), store))
    summary = {**row["summary"], **changed}
    store.mark_stage_done(stage.name, summary, finished_at=row["finished_at"])
    say(f"{stage.name}: restored in {time.perf_counter() - t0:.1f}s " + _brief(changed))
    return {"repaired": True, **summary}


def _preflight(cfg: AtlasConfig, stage) -> None:
    """What would stop the stage at once, checked before its outputs are reset: `--device cuda` on a machine
    without a GPU (a forced rerun deleted the SAE or the embeddings, then said so). Not where the stage's
    units run on Ray: its workers may have the GPU the driver lacks. And a model path that is not there."""
    stage_cfg = cfg.stage(stage.name)
    device = getattr(stage_cfg, "device", None)
    if device == "cuda" and not (stage.executor and cfg.run.executor == "ray"):
        from .model import resolve_device
        resolve_device(device)
    model_ref = getattr(stage_cfg, "model", None)
    if isinstance(model_ref, str):
        why = missing_model_folder(model_ref)
        if why:
            raise ModelLoadError(f"[{stage.name}] model: {why}", "pass --model PATH to a checkpoint folder that "
                                 "exists (written by save_pretrained), or a Hugging Face id")


def _record_end(store: Store, name: str, status: str, error: str) -> None:
    # The store may itself be what failed (a dead connection, a full disk): never mask the real error.
    try:
        store.mark_stage_failed(name, error, status)
    except Exception:
        pass


def _input_identities(store: Store, name: str) -> tuple[str, ...]:
    identities = []
    for upstream in REGISTRY[name].inputs:
        row = store.stage_row(upstream)
        identities.append(f"{row['config_hash']}@{row['finished_at']}" if row else f"{upstream}:absent")
    return tuple(identities)


def _brief(summary: dict) -> str:
    items = [f"{k}={v}" for k, v in summary.items() if k != "seconds" and isinstance(v, (int, float, str))]
    return "(" + ", ".join(items[:6]) + ")" if items else ""
