"""Runs stages in order: skips a stage whose config and inputs are unchanged (config hash in
`stage_runs`), resumes one that was interrupted under the same hash, and resets one whose hash changed.

Every stage is a module `atlasgen.<stage>` with
  run(cfg, store) -> dict     the work; returns a small summary (counts, timings) kept in stage_runs
  reset(store) -> None        deletes what the stage wrote (called when its hash changed or --force)
"""
from __future__ import annotations

import importlib
import shutil
import time
from pathlib import Path
from typing import Iterable

from .artefacts import missing_artefacts
from .config import STAGE_INPUTS, STAGE_ORDER, AtlasConfig, config_hash, config_json
from .paths import sweep_stale_temps
from .progress import say
from .status import enter_stage, keeps_build_status
from .store import Store


def stage_module(name: str):
    assert name in STAGE_ORDER, f"unknown stage {name}"
    return importlib.import_module(f"atlasgen.stages.{name}")


@keeps_build_status
def run_stages(cfg: AtlasConfig, store: Store, stages: Iterable[str], force: bool = False) -> dict[str, dict]:
    """Run `stages` (in pipeline order); returns each stage's summary (`{"skipped": True}` if skipped).

    A stage's hash covers its config and the identity of each input as it is in the store now (that
    stage's config hash and when it finished), so any rerun of an input, even a forced one with the same
    config, makes the stages that read it run again."""
    summaries: dict[str, dict] = {}
    wanted = [s for s in STAGE_ORDER if s in set(stages)]
    sweep_stale_temps(store.paths.out_dir)  # leftovers of killed runs (temp names of dead processes)
    for name in wanted:
        enter_stage(name)
        stage_hash = config_hash(cfg.stage(name), _input_identities(store, name))
        if not force and store.stage_is_done(name, stage_hash):
            # Done only while its artefacts exist: a deleted file makes the stage run again.
            missing = missing_artefacts(store, name)
            if missing is None:
                say(f"{name}: up to date (config {stage_hash}), skipped")
                summaries[name] = {"skipped": True, **(store.stage_row(name) or {}).get("summary", {})}
                continue
            say(f"{name}: {missing}, so it runs again")
        module = stage_module(name)
        row = store.stage_row(name)
        if force or row is None or row["config_hash"] != stage_hash:
            module.reset(store)
        elif row["status"] == "running":
            say(f"{name}: resuming an interrupted run")
        store.mark_stage_started(name, stage_hash, config_json(cfg.stage(name)))
        t0 = time.perf_counter()
        say(f"{name}: running")
        summary = dict(module.run(cfg.stage(name), store) or {})
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        store.mark_stage_done(name, summary)
        say(f"{name}: done in {summary['seconds']:.1f}s " + _brief(summary))
        summaries[name] = summary
    return summaries


def _input_identities(store: Store, name: str) -> tuple[str, ...]:
    identities = []
    for upstream in STAGE_INPUTS[name]:
        row = store.stage_row(upstream)
        identities.append(f"{row['config_hash']}@{row['finished_at']}" if row else f"{upstream}:absent")
    return tuple(identities)


def _brief(summary: dict) -> str:
    items = [f"{k}={v}" for k, v in summary.items() if k != "seconds" and isinstance(v, (int, float, str))]
    return "(" + ", ".join(items[:6]) + ")" if items else ""


def clear_tables(store: Store, tables: Iterable[str]) -> None:
    """The usual reset: empty the stage's tables in one transaction."""
    with store.transaction() as con:
        for table in tables:
            con.execute(f"DELETE FROM {table}")


def clear_dirs(*dirs: Path) -> None:
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
