"""The `atlasgen` command line. It only wires stages together; the work lives in the stage modules."""
from __future__ import annotations

import functools
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import DEVICES, PRESETS, AtlasConfig, load_config, load_toml
from .errors import (AtlasError, StageInputError, StoreLockedError, is_interrupt, sigterm_as_interrupt,
                     sigterm_received)
from .paths import BuildPaths, check_file_target, check_folder_target
from .progress import close_bars, say, set_quiet

app = typer.Typer(
    name="atlasgen", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    help="Build a static feature atlas of DINOv3: embeddings, a sparse autoencoder, feature pictures, a map "
         "and a web site, all backed by one DuckDB store.\n\nExample: atlasgen build --preset tiny --out build/")

def _version(value: bool) -> None:
    if value:
        from . import __version__
        typer.echo(f"atlasgen {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False):
    pass


# --- shared options (each documented here, where it is declared) -----------------------------------
def _fail(message: str, hint: str = "", code: int = 2) -> None:
    close_bars()  # an error (or Ctrl-C) inside a loop leaves its bar drawn: the line starts on its own
    typer.echo(f"error: {message}", err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    raise typer.Exit(code)


def _option(option: str, what: str, convert=Path, check=None):
    """A Typer parser for a path or name option (`what` it wants, for the hint). An empty value is refused (for
    a path, "" would be the working folder; for a name, an unnamed thing), then `check(value, option)` runs as
    soon as the value is read (the default included): a refusal (AtlasError) is the usual one line plus a hint
    and exit 2, before the command starts."""
    def parse(value):
        if isinstance(value, str) and not value.strip():
            _fail(f"{option} is empty", f"pass {what}")
        value = convert(value)
        if check is not None:
            try:
                check(value, option)
            except AtlasError as e:
                _fail(e.message, e.hint)
        return value
    return parse


OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder: holds atlas.duckdb, pictures and site/.",
                                      parser=_option("--out", "a folder", check=check_folder_target),
                                      metavar="<path>")]
ImagesOpt = Annotated[Optional[Path], typer.Option(
    "--images", help="Image folder to ingest: flat, one sub-folder per class, or ImageNet val (set "
                     "ingest.labels_file in --config).",
    parser=_option("--images", "a folder of images"), metavar="<path>")]
DatasetOpt = Annotated[Optional[str], typer.Option(
    "--dataset", help="Hugging Face dataset to ingest, NAME[:SPLIT], e.g. frgfm/imagenette:validation.",
    parser=_option("--dataset", "a dataset name", str), metavar="<str>")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", help="DINOv3 checkpoint: hub id or local folder (default facebook/dinov3-vits16-pretrain-lvd1689m; "
                    "'tiny' for a random 2-layer model).",
    parser=_option("--model", "a hub id or a local folder", str), metavar="<str>")]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", help="TOML file with [ingest], [embed], [train], ... sections overriding the preset.",
    parser=_option("--config", "a TOML file"), metavar="<path>")]
PresetOpt = Annotated[Optional[str], typer.Option(
    "--preset", help=f"Preset: {', '.join(PRESETS)} (default imagenette, or the one the output folder was "
                     "built with).",
    parser=_option("--preset", f"one of {', '.join(PRESETS)}", str), metavar="<str>")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Rerun the stage(s) even if nothing changed.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or status lines.")]


def _check_device(device: str, option: str) -> None:
    if device not in DEVICES:
        raise AtlasError(f"{option} {device} is not one of {', '.join(DEVICES)}", f"use {option} auto")


DeviceOpt = Annotated[Optional[str], typer.Option(
    "--device", help="auto | cpu | cuda (auto picks CUDA when a GPU is visible).",
    parser=_option("--device", "auto, cpu or cuda", str, _check_device), metavar="<str>")]
ExecutorOpt = Annotated[Optional[str], typer.Option(
    "--executor", help="Where embed and render run: local (this process; the default) | ray (Ray workers; "
                       "needs pip install 'atlasgen[ray]'). Default: [run] executor. Does not change results.",
    parser=_option("--executor", "local or ray", str), metavar="<str>")]
RayAddressOpt = Annotated[Optional[str], typer.Option(
    "--ray-address", help="Join the Ray cluster at this address (e.g. 10.0.0.5:6379, or auto); implies "
                          "--executor ray. Without it, --executor ray starts a local Ray with this machine's "
                          "resources.",
    parser=_option("--ray-address", "an address (HOST:PORT, or auto)", str), metavar="<str>")]


SIGTERM_EXIT = 128 + signal.SIGTERM  # 143, what shells and schedulers report for a process ended by SIGTERM


def handles_errors(fn):
    """User errors become one line plus a hint and exit 2; never a traceback for bad input. Ctrl-C exits 130 and
    SIGTERM (`kill PID`, a scheduler's time limit) 143, each with one line, after the same cleanup: while the
    command runs, SIGTERM raises in this process as Ctrl-C does (`errors.sigterm_as_interrupt`)."""
    # Ctrl-C in a command that only reads (or serves) leaves nothing to resume.
    resumes = fn.__name__ not in ("query", "export", "decompose", "info", "serve")
    resume_hint = "run the same command again to resume where it stopped" if resumes else ""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with sigterm_as_interrupt():
            try:
                return fn(*args, **kwargs)
            except (KeyboardInterrupt, Exception) as e:
                # SIGTERM first: whatever failed once it came (a statement DuckDB stopped, a worker a scheduler
                # killed too) is part of being stopped.
                if sigterm_received():
                    _fail("stopped by SIGTERM", resume_hint, code=SIGTERM_EXIT)
                if isinstance(e, AtlasError):
                    if isinstance(e, StoreLockedError) and kwargs.get("out") is not None:
                        e = _lock_error(kwargs["out"], e)  # every command: how far the build holding it is
                    _fail(e.message, e.hint)
                if is_interrupt(e):  # Ctrl-C, also while DuckDB ran a statement (a long query, a stage's insert)
                    _fail("interrupted", resume_hint, code=130)
                error = environment_error(e, kwargs.get("out"))
                if error is None:
                    raise
                _fail(error.message, error.hint)
    return wrapper


def environment_error(exc: BaseException, out: Path | None) -> AtlasError | None:
    """A failure of the machine rather than of atlasgen, wherever it shows: a full disk (any writer: open,
    Pillow, safetensors, DuckDB) or a damaged or locked store. None for anything else (a bug keeps its
    traceback)."""
    import duckdb

    from .errors import disk_full_error, is_no_space
    if isinstance(exc, duckdb.Error) and out is not None:
        from .store import classify_store_error
        return classify_store_error(exc, BuildPaths(Path(out)).store_path)
    if is_no_space(exc):
        return disk_full_error(getattr(exc, "filename", None) or (out if out is not None else Path.cwd()))
    return None


def _open_store(out: Path, read_only: bool = False):
    """Store.open; when a running build holds the store, the error says how far that build is."""
    from .store import Store
    try:
        return Store.open(out, read_only=read_only)
    except StoreLockedError as e:
        raise _lock_error(out, e) from None


def _lock_error(out: Path, e):
    """A locked store's error; when the lock is a running build's, one that says how far that build is."""
    from .status import brief, running_build
    doc = running_build(BuildPaths(Path(out)), e.pid)
    if doc is None:
        return e
    return StoreLockedError(f"a build is running in {out} (pid {doc['pid']}), so the store is locked: {brief(doc)}",
                            f"wait for it to finish; `atlasgen info --out {out}` shows its progress", pid=e.pid)


DEVICE_STAGES = ("embed", "train", "render", "probe")  # the config sections --device sets


def make_config(store, preset: str | None, config: Path | None, images: Path | None, dataset: str | None,
                model: str | None, device: str | None, extra: dict | None = None) -> AtlasConfig:
    """Preset → --config file → options. Without --preset, what is not given is what the output folder was last
    built with (its preset, its --config file, its options), so `atlasgen train --out DIR` continues a
    `--preset tiny` build and `--config FILE` layers a file on it."""
    overrides: dict[str, dict] = {}
    if images is not None and dataset is not None:
        raise AtlasError("--images and --dataset both given", "choose one corpus")
    if images is not None:
        if not images.is_dir():
            raise AtlasError(f"--images {images} is not a folder", "pass a folder of images")
        overrides.setdefault("ingest", {})["source"] = f"folder:{images.resolve()}"
    if dataset is not None:
        overrides.setdefault("ingest", {})["source"] = f"hf:{dataset}"
    if model is not None:
        from .paths import missing_model_folder  # before any stage runs, not after ingest
        why = missing_model_folder(model)
        if why:
            raise AtlasError(f"--model {model}: {why}", "pass a checkpoint folder written by save_pretrained, "
                             "or a Hugging Face id such as facebook/dinov3-vits16-pretrain-lvd1689m")
        overrides.setdefault("embed", {})["model"] = model
    # --device, like --executor, is for this command only: a folder built with --device cuda on a GPU machine
    # must not refuse every later command on a machine without one (auto picks the GPU wherever there is one).
    extra = _merge_overrides({stage: {"device": device} for stage in DEVICE_STAGES} if device is not None else {},
                             extra or {})
    # --preset starts over from that preset. Without it, what is not given now is what the folder was built
    # with: `--config title.toml` on a tiny build layers the file on the tiny preset and keeps its corpus,
    # rather than starting over from the default preset (which reset the tiny build's tables). A
    # `preset = "..."` in the --config file counts as given.
    config_data = load_toml(config) if config is not None else {}
    if preset is None and config is not None:
        preset = _preset_in(config, config_data)
    remembered = (store.remembered_build() or {}) if preset is None else {}
    preset = preset or remembered.get("preset")
    # Folders built before --device was one-off may remember it.
    kept = _without(remembered.get("overrides", {}), {stage: {"device": None} for stage in DEVICE_STAGES})
    if config is None and remembered.get("config"):
        config = Path(remembered["config"])
        if not config.is_file():
            raise AtlasError(f"the config file this output folder was built with, {config}, is gone",
                             "pass --config FILE (or put the file back), or --preset NAME to start from a preset")
    elif config is not None:
        # The new file's options win over options remembered from earlier command lines.
        kept = _without(kept, config_data)
    given = _merge_overrides(overrides, extra or {})  # this command line's
    overrides = _merge_overrides(kept, overrides)
    _load_naming_flags(preset or "imagenette", config, overrides, given)  # validate before remembering
    if not store.read_only:
        store.remember_build({"preset": preset or "imagenette", "config": str(config.resolve()) if config else None,
                              "overrides": overrides})
    # One-off options (e.g. `render --features`) apply to this run only and are not remembered.
    return _load_naming_flags(preset or "imagenette", config, _merge_overrides(overrides, extra or {}), given)


# The command-line flags behind config options, so an error in a value given there names the flag, not a
# config section the user never wrote.
_FLAGS = {("render", "features"): "--features", ("run", "executor"): "--executor",
          ("run", "ray_address"): "--ray-address", ("ingest", "source"): "--images / --dataset",
          ("embed", "model"): "--model"}


def _load_naming_flags(preset: str, config: Path | None, overrides: dict, given: dict) -> AtlasConfig:
    try:
        return load_config(preset, config, overrides)
    except AtlasError as e:
        import re
        m = re.match(r"\[(\w+)\] (\w+) = ", e.message)
        key = (m.group(1), m.group(2)) if m else None
        if key in _FLAGS and key[1] in given.get(key[0], {}):
            raise AtlasError(e.message, f"check {_FLAGS[key]} on the command line (see --help)") from None
        raise


def run_options(executor: str | None, ray_address: str | None) -> dict:
    """--executor / --ray-address as one-off [run] overrides (where work runs is not remembered: the next
    command runs locally unless it asks again or the --config file says otherwise)."""
    run: dict[str, str] = {}
    if ray_address is not None:
        if executor not in (None, "ray"):
            raise AtlasError(f"--ray-address needs --executor ray, not --executor {executor}",
                             "drop --executor, or use --executor ray")
        run.update(executor="ray", ray_address=ray_address)
    elif executor is not None:
        run["executor"] = executor
    return {"run": run} if run else {}


def _preset_in(config: Path, config_data: dict) -> str | None:
    """The `preset = "..."` at the top of a --config file (`config_data`, its contents), if any."""
    preset = config_data.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise AtlasError(f"preset in {config} is not a name", 'write it as preset = "tiny" (or imagenette, imagenet)')
    return preset


def _without(overrides: dict, file_data: dict) -> dict:
    """`overrides` less the options `file_data` (a --config file's sections) sets."""
    return {section: {k: v for k, v in values.items() if k not in (file_data.get(section) or {})}
            for section, values in overrides.items()}


def _merge_overrides(old: dict, new: dict) -> dict:
    out = {k: dict(v) for k, v in old.items()}
    for k, v in new.items():
        out.setdefault(k, {}).update(v)
    return out


def _check_inputs(store, stages: list[str]) -> None:
    """A stage run on its own needs its inputs built first (build runs them all in order)."""
    from .stages import REGISTRY
    for name in stages:
        for upstream in REGISTRY[name].inputs:
            if upstream in stages:
                continue
            row = store.stage_row(upstream)
            if row is None:
                raise StageInputError(f"{name} needs the {upstream} stage, which has not run in this output folder",
                                      f"run `atlasgen {upstream}` (or `atlasgen build`) with the same --out first")
            if row["status"] != "done":
                what = "was interrupted" if row["status"] in ("running", "interrupted") else "failed"
                raise StageInputError(f"{name} needs the {upstream} stage, which {what} in this output folder",
                                      f"run `atlasgen {upstream}` (or `atlasgen build`) with the same --out again "
                                      "to finish it first")


def _run(stages: list[str], out: Path, preset, config, images, dataset, model, device, force, quiet,
         extra: dict | None = None) -> dict:
    from .pipeline import run_stages
    set_quiet(quiet)
    _quiet_libraries()
    if images is not None:  # before a store is made in the image folder
        from .stages.ingest import check_not_output_folder
        check_not_output_folder(images, out)
    if not BuildPaths(out).store_path.exists():
        # A new output folder: check the config before creating it, so a typo leaves nothing behind.
        make_config(_NothingRemembered(), preset, config, images, dataset, model, device, extra)
    with _open_store(out) as store:
        cfg = make_config(store, preset, config, images, dataset, model, device, extra)
        _check_inputs(store, stages)
        summaries = run_stages(cfg, store, stages, force=force)
        # Ingest's count: after a command that ran ingest (build included), not after every later stage.
        n_skipped = store.count("skipped_inputs") if "ingest" in stages else 0
    if n_skipped:
        # Even with --quiet: a result to know about, not progress.
        typer.echo(f"{n_skipped} input(s) were skipped; see: atlasgen query \"SELECT * FROM skipped_inputs\" "
                   f"--out {out}", err=True)
    return summaries


class _NothingRemembered:
    """make_config's view of an output folder that has no store yet: nothing built, nothing to remember."""
    read_only = True

    @staticmethod
    def remembered_build() -> None:
        return None


def _quiet_libraries() -> None:
    import os
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # transformers missing or changed: its chatter is harmless
        pass


# --- commands --------------------------------------------------------------------------------------
@app.command()
@handles_errors
def build(out: OutOpt = Path("build"), images: ImagesOpt = None, dataset: DatasetOpt = None,
          model: ModelOpt = None, config: ConfigOpt = None, preset: PresetOpt = None, force: ForceOpt = False,
          quiet: QuietOpt = False, device: DeviceOpt = None, executor: ExecutorOpt = None,
          ray_address: RayAddressOpt = None):
    """Run every stage in order (ingest → embed → train → encode → render → layout → probe → toy → site),
    skipping those already done for the same config.

    Example: atlasgen build --preset tiny --out build/  (on a Ray cluster: add --executor ray --ray-address auto)
    """
    from .stages import REGISTRY
    _run(list(REGISTRY.names), out, preset, config, images, dataset, model, device, force, quiet,
         run_options(executor, ray_address))
    site_index = out / "site" / "index.html"
    typer.echo(f"site: {site_index.resolve()}  (serve it with: atlasgen serve --out {out})")


def _stage_command(name: str, summary: str, example: str, executor_options: bool = False):
    def command(out: OutOpt = Path("build"), images: ImagesOpt = None, dataset: DatasetOpt = None,
                model: ModelOpt = None, config: ConfigOpt = None, preset: PresetOpt = None,
                force: ForceOpt = False, quiet: QuietOpt = False, device: DeviceOpt = None):
        _run([name], out, preset, config, images, dataset, model, device, force, quiet)

    def command_with_executor(out: OutOpt = Path("build"), images: ImagesOpt = None, dataset: DatasetOpt = None,
                              model: ModelOpt = None, config: ConfigOpt = None, preset: PresetOpt = None,
                              force: ForceOpt = False, quiet: QuietOpt = False, device: DeviceOpt = None,
                              executor: ExecutorOpt = None, ray_address: RayAddressOpt = None):
        _run([name], out, preset, config, images, dataset, model, device, force, quiet,
             run_options(executor, ray_address))
    command = command_with_executor if executor_options else command
    command.__doc__ = f"{summary}\n\nExample: {example}"
    command.__name__ = name
    app.command(name=name)(handles_errors(command))


_stage_command("ingest", "Read images (folder, Hugging Face dataset or the tiny set) into the store; "
               "bad files are skipped and recorded.", "atlasgen ingest --images ~/photos --out build/")
_stage_command("embed", "Embed every ingested image with DINOv3 (CLS pooler_output); resumable; on Ray "
               "workers with --executor ray.", "atlasgen embed --out build/", executor_options=True)
_stage_command("train", "Train the sparse autoencoder on the embeddings.", "atlasgen train --out build/")
_stage_command("encode", "Encode embeddings with the SAE: activations, feature stats, top images, labels, "
               "co-activation.", "atlasgen encode --out build/")


@app.command()
@handles_errors
def render(out: OutOpt = Path("build"), features: Annotated[Optional[str], typer.Option(
               "--features", help="Feature ids to render, e.g. 1,2,3: just those (n_seeds each), no images, "
                                  "pairs or ablation; other renders are kept. Also all | top:N | auto. Default: "
                                  "the config's render.features.",
               parser=_option("--features", "feature ids (1,2,3), all, top:N or auto", str), metavar="<str>")] = None,
           config: ConfigOpt = None, preset: PresetOpt = None, force: ForceOpt = False, quiet: QuietOpt = False,
           device: DeviceOpt = None, executor: ExecutorOpt = None, ray_address: RayAddressOpt = None):
    """Generate pictures by inversion: features, image embeddings, sums, slerps, orthogonalised pairs, ablation.

    Resumable and incremental: renders already in the store (same settings) are skipped; --force does not
    redo them (delete their files to redo them).

    Example: atlasgen render --features 1,2,3 --out build/  (on Ray workers: add --executor ray)
    """
    extra = {"render": {"features": features}} if features else {}
    extra.update(run_options(executor, ray_address))
    _run(["render"], out, preset, config, None, None, None, device, force, quiet, extra)


_stage_command("layout", "Lay features out with UMAP on co-activation, assign the map grid, cut map tiles.",
               "atlasgen layout --out build/")
_stage_command("probe", "Run the probe sweeps from the config (sizes, counts, readouts) and record activations.",
               "atlasgen probe --config probes.toml --out build/")
_stage_command("toy", "Train the 2-D bottleneck digits toy (superposition demo) and write its frames.",
               "atlasgen toy --out build/")
_stage_command("site", "Write the static site into OUT/site from the store.", "atlasgen site --out build/")


@app.command()
@handles_errors
def decompose(images: Annotated[list[Path], typer.Argument(
                  help="Image file(s) to decompose.", metavar="IMAGE",
                  parser=_option("an IMAGE argument", "the path of an image file"))],
              out: OutOpt = Path("build"),
              top: Annotated[int, typer.Option("--top", help="Show at most this many features per image "
                                                              "(0 = every active one).")] = 0,
              html: Annotated[Optional[Path], typer.Option(
                  "--html", help="Also write a self-contained HTML page (pictures and CSS inline) to this file.",
                  parser=_option("--html", "a file name", check=check_file_target), metavar="<path>")] = None,
              quiet: QuietOpt = False, device: DeviceOpt = None):
    """Split any image into the atlas's SAE features: embed it with the store's model, encode it with the
    store's SAE (top-k as in encode) and print the active features, strongest first, with bars.

    Example: atlasgen decompose photo.jpg --out build/ --top 10 --html photo.html
    """
    from .decompose import decompose_files
    set_quiet(quiet)
    _quiet_libraries()
    _, text = decompose_files(out, list(images), top=top or None, html=html, device=device or "auto")
    typer.echo(text)
    if html is not None:
        typer.echo(f"html: {html}")


@app.command()
@handles_errors
def query(sql: Annotated[str, typer.Argument(help="Read-only SQL over the store (several statements: the last "
                                                   "one's rows are printed).")],
          out: OutOpt = Path("build"),
          fmt: Annotated[str, typer.Option("--format", help="table | csv | json | markdown")] = "table",
          limit: Annotated[int, typer.Option("--limit", help="Print at most this many rows (0 = all).")] = 100):
    """Run read-only SQL against the store and print the result.

    Only reads run: COPY, ATTACH/DETACH, INSTALL/LOAD, EXPORT/IMPORT DATABASE, SET/RESET, setting PRAGMAs
    and anything that writes are refused (exit 2), and no file, URL or extension outside the store is opened.

    Example: atlasgen query "SELECT feature_id, label, frequency FROM features ORDER BY frequency DESC LIMIT 10"
    """
    from .query import check_format, format_rows, run_query
    check_format(fmt)
    if limit < 0:
        raise AtlasError(f"--limit {limit} is negative", "--limit N prints at most N rows; --limit 0 prints all")
    result = run_query(out, sql, limit)
    if result is None:
        return
    typer.echo(format_rows(result, fmt))
    if result.truncated:
        typer.echo(f"(the first {limit} rows; --limit 0 prints all)", err=True)


@app.command()
@handles_errors
def export(to: Annotated[Path, typer.Option("--to", help="Folder to write (new, empty, or an earlier export, "
                                                         "which is replaced).",
                                          parser=_option("--to", "a folder", check=check_folder_target),
                                          metavar="<path>")],
           out: OutOpt = Path("build")):
    """Export the store as open files: every table as Parquet, schema.json (columns, types, descriptions) and
    the SAE in the SAELens format (sae/cfg.json, sae/sae_weights.safetensors; input normalisation folded in).

    Example: atlasgen export --out build/ --to atlas-export/
    """
    from .export import export_store
    schema = export_store(out, to)
    n_rows = sum(t["n_rows"] for t in schema["tables"].values())
    sae = schema["sae"]
    typer.echo(f"exported {len(schema['tables'])} tables ({n_rows:,} rows) to {to}/*.parquet, {to}/schema.json")
    if sae:
        typer.echo(f"SAE ({sae['architecture']}, {sae['d_in']} -> {sae['d_sae']}"
                   + (f", k={sae['k']}" if sae.get("k") else "") + f") in the SAELens format: {to}/{sae['folder']}/")
    else:
        typer.echo("no trained SAE in the store: sae/ left out (run `atlasgen train`)")


@app.command()
@handles_errors
def info(out: OutOpt = Path("build")):
    """Show what the store holds, per stage: status, config hash, counts. While a build runs (and holds the
    store's lock) it shows that build's progress instead: stage, done/total, rate and ETA.

    Example: atlasgen info --out build/
    """
    from .stages import REGISTRY
    from .status import describe, read_status, running_build
    from .store import OUTPUT_TABLES_ALL
    paths = BuildPaths(Path(out))
    try:
        store = _open_store(out, read_only=True)
    except StoreLockedError as e:
        doc = running_build(paths, e.pid)
        if doc is None:
            raise
        typer.echo(f"store: {paths.store_path} (locked by the running build)")
        for line in describe(doc):
            typer.echo(line)
        return
    last_build = read_status(paths)
    with store:
        typer.echo(f"store: {store.paths.store_path}")
        for name in REGISTRY.names:
            row = store.stage_row(name)
            if row is None:
                typer.echo(f"  {name:8s} not run")
                continue
            brief = ", ".join(f"{k}={v}" for k, v in row["summary"].items() if isinstance(v, (int, float, str)))
            # The store opened, so no build holds it: a stage still marked running was killed mid-way.
            status, error = row["status"], row["error"]
            if status == "running":
                status, error = "stopped", "its process ended without finishing (killed?); the same command resumes it"
            typer.echo(f"  {name:8s} {status:11s} config {row['config_hash']}  {brief}")
            if error:
                typer.echo(f"  {'':8s} error: {error}")
        typer.echo("tables:")
        for table in OUTPUT_TABLES_ALL:
            typer.echo(f"  {table:18s} {store.count(table):>10,d} rows")
    if last_build is not None:
        for line in describe(last_build, running=False):
            typer.echo(line)


@app.command()
@handles_errors
def serve(out: OutOpt = Path("build"),
          port: Annotated[int, typer.Option("--port", help="TCP port (0 picks a free one).")] = 8000,
          host: Annotated[str, typer.Option("--host", help="Address to listen on; 0.0.0.0 for other machines.",
                                            parser=_option("--host", "an address, e.g. 127.0.0.1", str),
                                            metavar="<str>")]
          = "127.0.0.1",
          verbose: Annotated[bool, typer.Option("--verbose", help="Log every request.")] = False):
    """Serve OUT/site over http (search and the feature listing need http, not file://); Ctrl-C stops.

    Example: atlasgen serve --out build --port 8000
    """
    from .serve import serve as serve_site
    serve_site(out / "site", host=host, port=port, verbose=verbose)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
