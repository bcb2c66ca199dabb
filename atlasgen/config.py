"""Every stage's frozen config, presets (TOML files in `atlasgen/presets/`), and config hashing.

A build's config is layered: preset TOML → user `--config atlas.toml` → command-line options.
Each TOML section ([ingest], [embed], ...) fills the dataclass of the same name; every field is
documented where it is declared. A field with `metadata={"hash": False}` does not change results
(batch sizes, worker counts), so changing it does not make a stage rerun.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import typing
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from .errors import AtlasError

NO_HASH = {"hash": False}


@dataclass(frozen=True)
class IngestConfig:
    # Where images come from: "tiny" (generated), "folder:PATH" (flat, one sub-folder per class, or
    # ImageNet val with labels_file), or "hf:DATASET[:SPLIT]" (Hugging Face datasets).
    source: str = "tiny"
    # Hugging Face dataset config name (e.g. "320px" for frgfm/imagenette); "" for none.
    hf_config: str = ""
    # For ImageNet-val style folders: a text file with one label per image (sorted file order), or a
    # CSV "filename,label". Empty: labels come from sub-folder names, or none for a flat folder.
    labels_file: str = ""
    # Optional file mapping label ids/wnids to readable names ("n01440764 tench" per line).
    label_names_file: str = ""
    # Use at most this many images (0 = all), taken in sorted order.
    limit: int = 0
    # Images with more pixels than this are skipped as decompression bombs.
    max_pixels: int = 89_478_485
    # Shorter side of the normalised corpus copy written to corpus/ (≥ the model's input size). Larger
    # images are reduced to it; smaller ones are kept at their size (never enlarged).
    corpus_side: int = 256
    # Tiny preset: how many generated images.
    n_tiny_images: int = 320
    # Worker processes decoding images and writing the corpus copies; 0 = one per core (does not change
    # results).
    n_workers: int = field(default=0, metadata=NO_HASH)


@dataclass(frozen=True)
class EmbedConfig:
    # Hugging Face id or local folder of a DINOv3 ViT checkpoint, or "tiny" (random 2-layer model).
    model: str = "facebook/dinov3-vits16-pretrain-lvd1689m"
    # auto (bf16 where the hardware is fast at it) | fp32 | bf16.
    precision: str = "auto"
    # Images per loader batch and forward pass; 0 = auto: 32 on a CPU, 512 on a GPU (run in pieces that fit
    # its free memory; embed.MAX_GPU_BATCH_SIZE) (does not change results beyond float noise).
    batch_size: int = field(default=0, metadata=NO_HASH)
    # Worker processes decoding and resizing corpus images ahead of the model; 0 = one per core (does not
    # change results).
    n_workers: int = field(default=0, metadata=NO_HASH)
    # auto | cpu | cuda (set by --device; does not change results beyond float noise).
    device: str = field(default="auto", metadata=NO_HASH)
    # Images per committed chunk (whole batches: at least one): an interrupted embed resumes from the last
    # committed chunk.
    chunk_size: int = field(default=256, metadata=NO_HASH)
    # torch threads for the model; 0 = auto: time a batch with all cores and with fewer and keep the
    # fastest (on a busy machine one thread can beat all cores several times over).
    n_threads: int = field(default=0, metadata=NO_HASH)


@dataclass(frozen=True)
class TrainConfig:
    # Dictionary size = expansion × embedding dim (32 × 384 = 12,288 in the seed study).
    expansion: int = 32
    # L1 penalty weight on activations (scaled by decoder norms, which are kept at 1).
    l1_coeff: float = 3e-3
    # Adam learning rate (after warm-up).
    lr: float = 4e-4
    # Linear learning-rate warm-up steps.
    warmup_steps: int = 200
    # Optimiser steps in total.
    n_steps: int = 20_000
    # Embeddings per optimiser step, drawn in shuffled epochs over the corpus.
    batch_size: int = 1024
    # A feature that has not fired for this many steps counts as dead.
    dead_window: int = 2_500
    # Resample dead features every this many steps (Bricken et al. 2023); 0 = never.
    resample_every: int = 5_000
    # Stop resampling after this fraction of training, so features can settle.
    resample_until: float = 0.7
    # Log metrics every this many steps.
    log_every: int = 100
    # Seeds the initialisation, the batch order and the resampling draws.
    seed: int = 0
    # auto (bf16 matrix products with fp32 master weights where the hardware is fast at bf16 and the
    # SAE is big enough to gain from it) | fp32 | bf16. bf16 is ~4x faster at 384→12,288 on AMX CPUs.
    precision: str = "auto"
    device: str = field(default="auto", metadata=NO_HASH)


@dataclass(frozen=True)
class EncodeConfig:
    # At most this many active features per image (top-k at inference, as in the seed).
    top_k: int = 32
    # Top images stored per feature.
    n_top_images: int = 16
    # Most similar features (decoder cosine) stored per feature.
    n_similar: int = 10
    # Thumbnail side in px (WebP).
    thumb_side: int = 128
    # Embeddings encoded per batch (does not change results).
    batch_size: int = field(default=4096, metadata=NO_HASH)


@dataclass(frozen=True)
class RenderConfig:
    # Which features to render: "all", "top:N" (N most frequent live features), "auto" (all on a GPU,
    # the 64 most frequent on a CPU) or a list "1,2,3" (then ONLY those features are rendered: no
    # images, pairs or ablation; other renders already in the store are kept).
    features: str = "auto"
    # Seeds per feature and per inverted image (each seed is an independent generation).
    n_seeds: int = 4
    # Seeds per pair render (sum, slerp, orthogonalised); one seed keeps a slerp sequence comparable.
    n_pair_seeds: int = 1
    # Parameterisation: "transformer" (untrained generator, Deep-Image-Prior style), "pixels", "fourier".
    param: str = "transformer"
    # Score DINO-like augmented views (crops, flips, colour jitter, blur) instead of the bare picture.
    augment: bool = True
    # Augmented views scored per target per optimisation step.
    n_views: int = 8
    # The most Adam steps a target takes (it may stop earlier: min_steps, stop_window, stop_delta).
    n_steps: int = 150
    # Per-target stopping: from min_steps on, checked every 10 of its own steps, a target stops when its best
    # whole-picture cosine rose by less than stop_delta over its last stop_window steps; its slot is then
    # refilled with the next target. stop_delta = 0: every target takes n_steps steps.
    # (Chosen on an H100 from the stopping replay of benchmarks/render.py: docs/BENCHMARKS.md.)
    min_steps: int = 80
    stop_window: int = 30
    stop_delta: float = 0.004
    # A feature's picture should make that feature fire most: at every check (10 steps) its best picture so
    # far is tested, and the result is the best picture on which its own feature is the strongest SAE feature,
    # when there is one (else the best picture). Costs one model pass per target per check (~1 %).
    prefer_own_first: bool = True
    # With prefer_own_first: a feature's render also stops early only once it has such a picture (else it
    # goes on to n_steps). Raises the own-feature-first share further, but most targets then run n_steps.
    stop_own_first: bool = False
    # Adam learning rate for the transformer generator's weights (×5 for pixels / fourier).
    lr: float = 0.01
    # Weight of the total-variation penalty (mean |neighbour difference|) against −cosine.
    tv_weight: float = 0.05
    # Targets optimised together (slots; a finished target's slot is refilled from the queue). 0 = auto: on
    # a GPU sized from its free memory and the model's shape, on a CPU 16. Does not change results.
    batch_targets: int = field(default=0, metadata=NO_HASH)
    # Targets per unit of work, committed together (the resume granularity). 0 = auto: 8 × batch_targets on
    # a GPU (fewer half-empty tails), batch_targets on a CPU. Does not change results.
    unit_targets: int = field(default=0, metadata=NO_HASH)
    # Output side in px (0 = the model's input size).
    size: int = 0
    # Side in px of the local views (the second half of the n_views, 5–40 % crops), when smaller than the
    # model's input size; 0 = the input size. DINO trains on 96 px local crops, so the model reads them as it
    # was trained to, and at 224 px input they cost a fifth of a global view (issue 10's H100 run: 1.45× per
    # target-step, cosine not lower).
    local_size: int = 96
    # Render pairs: sums, slerps and orthogonalised pairs; explicit "a,b" strings, plus the strongest
    # co-activating and the most similar pairs (n_auto_pairs of each).
    pairs: tuple[str, ...] = ()
    n_auto_pairs: int = 2
    # Slerp positions from t=0 (feature a) to t=1 (feature b), both ends included.
    slerp_steps: int = 11
    # Images (image ids) whose embeddings are inverted, n_seeds each; empty = a few corpus images.
    image_ids: tuple[int, ...] = ()
    # Corpus images inverted when image_ids is empty (one per label, in label order).
    n_auto_images: int = 2
    # The seed's ablation (pixels/no aug, pixels/aug, transformer/aug) on this image id (-1 = first).
    ablation_image_id: int = -1
    ablation: bool = True
    # auto (bf16 where the hardware is fast at it) | fp32 | bf16.
    precision: str = "auto"
    device: str = field(default="auto", metadata=NO_HASH)
    # At most this many views per forward/backward pass (bounds memory; does not change results). 0 = auto:
    # on a GPU from its free memory and the model's shape, on a CPU 64.
    max_views_per_pass: int = field(default=0, metadata=NO_HASH)
    # torch.compile the per-step model pass: auto (on a GPU) | on | off. A failed compile falls back to eager
    # with one line. Compiled kernels are cached in $TORCHINDUCTOR_CACHE_DIR (default
    # ~/.cache/atlasgen/torchinductor). Does not change results beyond float rounding.
    compile: str = field(default="auto", metadata=NO_HASH)
    # torch threads while rendering; 0 = auto: time optimisation steps with all cores and with fewer and
    # keep the fastest (on a busy machine one thread can be several times faster).
    n_threads: int = field(default=0, metadata=NO_HASH)


@dataclass(frozen=True)
class LayoutConfig:
    # Features placed on the map, strongest first (strength = frequency × mean activation), on a
    # grid_side × grid_side grid, at most one feature per cell.
    n_map_features: int = 2500
    grid_side: int = 120
    # UMAP on co-activation profiles (each live feature's row, diagonal included, normalised to sum 1).
    # Hellinger suits such distributions: it compares companions, not how often a feature fires.
    # Any umap-learn metric for sparse rows works ("cosine", "euclidean", ...: UMAP_SPARSE_METRICS below).
    # min_dist: 0 to 1 (UMAP's spread).
    n_neighbors: int = 15
    min_dist: float = 0.1
    metric: str = "hellinger"
    # Hellinger only: project the square-rooted profiles (where Hellinger is Euclidean distance) onto
    # this many SVD components and run UMAP with the Euclidean metric: 12k features in ~1 min instead
    # of ~6 min on sparse rows. 0 = UMAP with `metric` directly on the sparse profiles.
    svd_dims: int = 64
    # Seeds UMAP (and the SVD): the same seed gives the same map.
    seed: int = 0
    # Pixel side of one cell in the full-resolution mosaic, and of a tile (even).
    cell_px: int = 64
    tile_px: int = 256


@dataclass(frozen=True)
class ProbeConfig:
    # Sweeps as TOML tables under [[probe.sweeps]]; see docs/PIPELINE.md "Probes". Each has name, kind
    # ("size" | "count" | "readout"), object ("shape:KIND:COLOUR" or an image file, RGBA or with `key`
    # colour), background ("#rrggbb", a colour name or an image file), features (ids to chart; empty =
    # the strongest over the sweep), and per kind: sizes / size + counts / items.
    sweeps: tuple[dict, ...] = ()
    # Side in px of every probe picture (the model then resizes it to its own input size).
    canvas: int = 224
    # Features charted per sweep that names none: the strongest by max activation over the sweep.
    n_auto_features: int = 4
    # auto | cpu | cuda (does not change results beyond float noise).
    device: str = field(default="auto", metadata=NO_HASH)


@dataclass(frozen=True)
class ToyConfig:
    # Optimiser steps (full-batch Adam) of the 64 → hidden → 2 → 10 digits network (scikit-learn's
    # bundled 8×8 digits); one animation frame every frame_every steps, plus step 0.
    n_steps: int = 600
    frame_every: int = 10
    seed: int = 0
    # Width of the hidden layer before the 2-D bottleneck (0 = straight 64 → 2).
    hidden: int = 32
    lr: float = 0.01
    # Digits held out for the test accuracy.
    test_fraction: float = 0.25
    # Digits whose 2-D codes are recorded in every frame (the animation's dots).
    n_codes: int = 600


@dataclass(frozen=True)
class SiteConfig:
    # Shown in the header and in every page title.
    title: str = "DINOv3 feature atlas"
    # Image ids shown on the decompositions page (empty = n_decompose_auto images, one per label in turn).
    decompose_image_ids: tuple[int, ...] = ()
    n_decompose_auto: int = 8
    # Features shown in the overview gallery (the strongest that have a picture).
    n_gallery: int = 32
    # Run Pagefind over the built site (feature ids and labels become searchable on search.html).
    search_index: bool = True
    # Feature tiles per static page of the all-features listing (features/index.html, page-002.html, ...);
    # the same number is shown per step by its sort/filter script.
    features_per_page: int = 240
    # Features per JSON data file (features/data-000.json, ...) loaded by the listing's script.
    chunk_size: int = 2048
    # Most co-activating features listed on each feature page.
    n_coactive: int = 10
    # The Query page (query.html): the store's tables as Parquet in site/data/ and DuckDB-WASM (~35 MB, from
    # vendor/duckdb-wasm via npm) so readers run SQL in their browser. false leaves the page and its files out.
    sql: bool = True


@dataclass(frozen=True)
class RunConfig:
    """[run]: where embed and render do their work. Not a stage: none of these options changes a result, so
    none is part of any stage hash (a build started on one machine can be resumed on a cluster and back)."""

    # "local": in this process, as always. "ray": units of work (a chunk of images, a batch of render targets)
    # run as calls on Ray actors, on a local Ray started with this machine's resources or on the cluster at
    # ray_address; this process stays the only writer of the store and of the pictures. Needs Ray
    # (pip install 'atlasgen[ray]') here and on every node.
    executor: str = "local"
    # Address of a running Ray cluster to join ("auto", "10.0.0.5:6379", "ray://head:10001"); "" starts a
    # local Ray with this machine's resources (executor = "ray" only).
    ray_address: str = ""
    # CPUs each Ray worker asks for (its torch threads and, for embed, its JPEG decoding).
    ray_cpus_per_worker: float = 1.0
    # GPUs each Ray worker asks for when units run on GPUs (the stage's device is "cuda", or "auto" and the
    # cluster has GPUs): 1 = one worker per GPU, 0.5 = two per GPU.
    ray_gpus_per_worker: float = 1.0
    # Ray workers (actors, each keeps the model loaded between units); 0 = as many as the cluster's resources
    # allow (its GPUs / ray_gpus_per_worker on GPU units, else its CPUs / ray_cpus_per_worker).
    ray_n_workers: int = 0
    # Times Ray restarts a worker that died (a killed process, a lost node) and retries its units; each unit
    # is still recorded once.
    ray_max_retries: int = 3
    # The output folder's corpus/ is visible at the same absolute path on every node (a shared filesystem):
    # embed workers read the JPEGs themselves. False: this process reads them and sends their bytes.
    shared_corpus: bool = False


EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class AtlasConfig:
    preset: str
    ingest: IngestConfig = IngestConfig()
    embed: EmbedConfig = EmbedConfig()
    train: TrainConfig = TrainConfig()
    encode: EncodeConfig = EncodeConfig()
    render: RenderConfig = RenderConfig()
    layout: LayoutConfig = LayoutConfig()
    probe: ProbeConfig = ProbeConfig()
    toy: ToyConfig = ToyConfig()
    site: SiteConfig = SiteConfig()
    run: RunConfig = RunConfig()

    def stage(self, name: str):
        return getattr(self, name)


def section_classes() -> dict[str, type]:
    """Every config section ([ingest], [embed], ...) and its dataclass, from AtlasConfig's fields (the stage
    registry checks that each stage's declared config class is the one here)."""
    hints = typing.get_type_hints(AtlasConfig)
    return {f.name: hints[f.name] for f in fields(AtlasConfig) if f.name != "preset"}


PRESETS = ("tiny", "imagenette", "imagenet")


def preset_path(name: str) -> Path:
    return Path(str(resources.files("atlasgen.presets"))) / f"{name}.toml"


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))  # TOML is UTF-8, whatever the locale
    except FileNotFoundError:
        raise AtlasError(f"config file {path} does not exist", "check the --config path") from None
    except IsADirectoryError:
        raise AtlasError(f"config file {path} is a folder", "pass a TOML file to --config") from None
    except UnicodeDecodeError as e:
        raise AtlasError(f"config file {path} is not UTF-8 text (byte {e.start} is not UTF-8)",
                         "save it as UTF-8, as TOML requires (not UTF-16 or another encoding)") from None
    except OSError as e:
        raise AtlasError(f"cannot read the config file {path}: {e.strerror or e}",
                         "check the --config path and its permissions") from None
    except tomllib.TOMLDecodeError as e:
        raise AtlasError(f"{path} is not valid TOML: {e}", "fix the file (see docs/CONFIGURATION.md)") from None


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _build_stage(cls, values: dict, where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise AtlasError(f"unknown option(s) {', '.join(unknown)} in [{where}]",
                         f"known options: {', '.join(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _typed(value, hints[name], f"{where}.{name}") for name, value in values.items()}
    section = cls(**kwargs)
    for name, rule in RULES.get(cls, {}).items():
        problem = rule(getattr(section, name))
        if problem:
            raise AtlasError(f"[{where}] {name} = {getattr(section, name)!r}: {problem}",
                             f"fix {name} in the [{where}] section (default {getattr(cls(), name)!r})")
    return section


_TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", dict: "a table"}


def _typed(value: Any, hint: Any, where: str) -> Any:
    """`value` as the declared type `hint` (TOML lists become tuples, ints pass as floats), or an AtlasError
    that names the option, the bad value and what is allowed."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise AtlasError(f"{where} = {value!r} is not a list", f"write {where.split('.')[-1]} = [...]")
        args = typing.get_args(hint)
        item_hint = args[0] if args else Any
        return tuple(_typed(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if not ok:
        raise AtlasError(f"{where} = {value!r} is {type(value).__name__}, not {_TYPE_WORDS.get(hint, hint.__name__)}",
                         f"set {where} to {_TYPE_WORDS.get(hint, hint.__name__)}")
    return value


# --- value rules: each returns None when the value is fine, else what is wrong ---------------------------
Rule = Callable[[Any], "str | None"]


def at_least(low: float) -> Rule:
    return lambda v: None if v >= low else f"must be ≥ {low}"


def between(low: float, high: float) -> Rule:
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}"


def one_of(*choices: str) -> Rule:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _source_rule(v: str) -> str | None:
    kind, sep, rest = v.partition(":")
    ok = v == "tiny" or (sep and kind in ("folder", "hf") and rest)
    return None if ok else "must be tiny, folder:PATH or hf:DATASET[:SPLIT] (or use --images / --dataset)"


def _render_features_rule(v: str) -> str | None:
    v = v.strip()
    if v in ("all", "auto"):
        return None
    if v.startswith("top:"):
        return None if v[4:].strip().isdigit() else "N in top:N must be a whole number, e.g. top:64"
    parts = [x.strip() for x in v.split(",") if x.strip()]
    if parts and all(x.isdigit() for x in parts):
        return None
    return "must be all, auto, top:N or a list of feature ids such as 1,2,3"


def _pairs_rule(pairs: tuple) -> str | None:
    for text in pairs:
        parts = str(text).split(",")
        if len(parts) != 2 or not all(x.strip().isdigit() for x in parts) or parts[0].strip() == parts[1].strip():
            return f"entry {text!r} is not two different feature ids \"a,b\""
    return None


def _even_at_least(low: int) -> Rule:
    return lambda v: None if v >= low and v % 2 == 0 else f"must be an even number ≥ {low}"


# umap-learn's metrics for sparse rows (`umap.sparse.sparse_named_distances`, 0.5.x): the profiles are sparse
# (unless Hellinger goes through the SVD). Listed here because importing umap compiles numba code (seconds),
# and a bad name should fail when the config loads, not after hours of render.
UMAP_SPARSE_METRICS = ("euclidean", "manhattan", "l1", "taxicab", "chebyshev", "linf", "linfty", "linfinity",
                       "minkowski", "canberra", "ll_dirichlet", "braycurtis", "hamming", "jaccard", "dice", "matching",
                       "kulsinski", "rogerstanimoto", "russellrao", "sokalmichener", "sokalsneath", "cosine",
                       "correlation", "hellinger")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
RENDER_PARAMS = ("transformer", "pixels", "fourier")

RULES: dict[type, dict[str, Rule]] = {
    IngestConfig: {"source": _source_rule, "limit": at_least(0), "max_pixels": at_least(1),
                   "corpus_side": at_least(16), "n_tiny_images": at_least(1), "n_workers": at_least(0)},
    EmbedConfig: {"precision": one_of(*PRECISIONS), "device": one_of(*DEVICES), "batch_size": at_least(0),
                  "n_workers": at_least(0), "chunk_size": at_least(1), "n_threads": at_least(0)},
    TrainConfig: {"expansion": at_least(1), "l1_coeff": at_least(0), "lr": lambda v: None if v > 0 else "must be > 0",
                  "warmup_steps": at_least(0), "n_steps": at_least(1), "batch_size": at_least(1),
                  "dead_window": at_least(1), "resample_every": at_least(0), "resample_until": between(0, 1),
                  "log_every": at_least(1), "precision": one_of(*PRECISIONS), "device": one_of(*DEVICES)},
    EncodeConfig: {"top_k": at_least(1), "n_top_images": at_least(1), "n_similar": at_least(0),
                   "thumb_side": at_least(8), "batch_size": at_least(1)},
    RenderConfig: {"features": _render_features_rule, "n_seeds": at_least(0), "n_pair_seeds": at_least(0),
                   "param": one_of(*RENDER_PARAMS), "n_views": at_least(1), "n_steps": at_least(0),
                   "lr": lambda v: None if v > 0 else "must be > 0", "tv_weight": at_least(0),
                   "batch_targets": at_least(0), "size": at_least(0), "pairs": _pairs_rule, "n_auto_pairs": at_least(0),
                   "slerp_steps": at_least(0), "n_auto_images": at_least(0), "precision": one_of(*PRECISIONS),
                   "device": one_of(*DEVICES), "max_views_per_pass": at_least(0), "n_threads": at_least(0),
                   "min_steps": at_least(0), "stop_window": at_least(1), "stop_delta": at_least(0),
                   "unit_targets": at_least(0), "local_size": at_least(0), "compile": one_of("auto", "on", "off")},
    LayoutConfig: {"n_map_features": at_least(1), "grid_side": at_least(1), "n_neighbors": at_least(2),
                   "min_dist": between(0, 1),  # UMAP needs min_dist ≤ spread (1)
                   "metric": one_of(*UMAP_SPARSE_METRICS), "svd_dims": at_least(0), "cell_px": at_least(4),
                   "tile_px": _even_at_least(16)},
    ProbeConfig: {"canvas": at_least(16), "n_auto_features": at_least(0), "device": one_of(*DEVICES)},
    ToyConfig: {"n_steps": at_least(1), "frame_every": at_least(1), "hidden": at_least(0),
                "lr": lambda v: None if v > 0 else "must be > 0", "test_fraction": between(0.05, 0.95),
                "n_codes": at_least(1)},
    SiteConfig: {"n_decompose_auto": at_least(0), "n_gallery": at_least(0), "features_per_page": at_least(1),
                 "chunk_size": at_least(1), "n_coactive": at_least(0)},
    RunConfig: {"executor": one_of(*EXECUTORS), "ray_cpus_per_worker": lambda v: None if v > 0 else "must be > 0",
                "ray_gpus_per_worker": at_least(0), "ray_n_workers": at_least(0), "ray_max_retries": at_least(0)},
}


def load_config(preset: str = "imagenette", config_path: Path | None = None,
                overrides: dict[str, dict[str, Any]] | None = None) -> AtlasConfig:
    """Preset TOML, then the user's TOML, then command-line overrides ({section: {field: value}})."""
    if preset not in PRESETS:
        raise AtlasError(f"unknown preset {preset!r}", f"choose one of: {', '.join(PRESETS)}")
    data = _read_toml(preset_path(preset))
    if config_path is not None:
        user = _read_toml(Path(config_path))
        data = _merge(data, user)
    data = _merge(data, overrides or {})
    sections = section_classes()
    unknown = sorted(set(data) - set(sections) - {"preset"})
    if unknown:
        raise AtlasError(f"unknown section(s) {', '.join(unknown)} in the config",
                         f"sections: {', '.join(sections)}")
    for name in sections:
        if not isinstance(data.get(name, {}), dict):
            raise AtlasError(f"[{name}] in the config is not a table", f"write it as a section: [{name}]")
    built = {name: _build_stage(cls, data.get(name, {}), name) for name, cls in sections.items()}
    _check_across(built)
    return AtlasConfig(preset=preset, **built)


def load_toml(path: Path) -> dict:
    """A config file's contents (every problem with it an AtlasError)."""
    return _read_toml(Path(path))


def _check_across(sections: dict) -> None:
    """Rules that tie options of one section together, or need a stage's own parser."""
    # Probe sweeps are small TOML tables with their own grammar: parsed (not run) here, so a typo fails at
    # load. Imported here because the probe stage imports this module.
    from .stages.probe import parse_sweeps
    parse_sweeps(sections["probe"])


def config_json(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)


def config_hash(cfg, upstream_hashes: tuple[str, ...] = ()) -> str:
    """Hash of the fields that change results, plus the hashes of the stage's inputs."""
    payload = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.metadata.get("hash", True)}
    text = json.dumps([payload, list(upstream_hashes)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def with_overrides(cfg, **changes):
    """A copy of a frozen stage config with some fields changed (None values ignored)."""
    return replace(cfg, **{k: v for k, v in changes.items() if v is not None})
