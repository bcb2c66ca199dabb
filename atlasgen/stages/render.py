"""The render stage: pictures by inversion (see `inversion.py`) for features, image embeddings, pairs
(sums, slerps, orthogonalised) and the seed's ablation, each a row in `renders` plus a WebP file.

A run is plan → todo (what is not in the store yet) → units (consecutive targets of one variant, the commit
granularity) → `render_unit` (pure compute: no store, no files; the seam for running units elsewhere) →
`save_unit` (WebP files + one transaction), on a writer thread so a unit's saving overlaps the next unit.
An executor runs the units (`atlasgen.executor`): here, or on Ray workers that get the model and SAE through
Ray's object store (`RenderPayload`) and build their own `RenderContext`; results arrive in any order and
this process alone saves them.

Renders are immutable artifacts keyed by `render_id` = hash(kind, target, seed, variant, settings), where
the settings are everything that changes a picture (steps, views, lr, tv, size, precision, the model, the
SAE run, the stopping rule). A run plans its targets, skips those whose render already exists, and commits
per unit, so an interrupted run resumes where it stopped and `atlasgen render --features 1,2,3` adds just
those. Renders made with other settings (an older SAE, other steps, ...) are superseded: a run deletes them
before it starts. A run of [render]'s own plan also deletes what the config no longer asks for (fewer seeds,
pairs, images, features under top:N), keeping the feature renders a `--features` list asked for.

Target spaces: a feature target compares the SAE-normalised embedding (embedding − corpus mean, scaled) with
the feature's unit decoder row; an image target compares the raw embedding with the image's stored embedding.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .. import inversion
from ..config import RenderConfig
from ..errors import AtlasError, StageInputError
from ..executor import LocalExecutor, PackedModel, PackedSAE, resolve_precision
from ..inversion import InversionSettings
from ..model import load_embedding_model, resolve_device
from ..paths import atomic_path, parse_temp_name
from ..progress import bar, say
from ..sae import SparseAutoencoder, load_stage_sae
from ..store import Store, now
from ..threads import ThreadTuner, restore_torch_threads
from .base import Stage

# Bump when the engine changes what a render looks like, so old renders are superseded.
# 4: per-target stopping, the better of the best and the last picture, optional small local views.
ENGINE_VERSION = 4
# "auto" on a CPU renders this many of the most frequent features.
CPU_AUTO_FEATURES = 64
ABLATION_VARIANTS = (("pixels", False), ("pixels", True), ("transformer", True))
WEBP_QUALITY = 90


def variant_name(param: str, augment: bool) -> str:
    return f"{param}+{'aug' if augment else 'noaug'}"


@dataclass
class Target:
    kind: str                      # feature | image | sum | slerp | orth | ablation
    seed: int
    variant: str                   # e.g. transformer+aug
    space: str                     # "sae": vs the SAE-normalised embedding; "embedding": vs the raw one
    direction_d: np.ndarray = field(repr=False)
    feature_a: int | None = None
    feature_b: int | None = None
    image_id: int | None = None
    t: float | None = None
    render_id: str = ""
    rng_seed: int = 0
    listed: bool = False           # asked for by a list of feature ids (`--features 1,2,3`), not by [render]'s plan

    @property
    def key(self) -> dict:
        return {"kind": self.kind, "a": self.feature_a, "b": self.feature_b, "image": self.image_id,
                "t": None if self.t is None else round(self.t, 6), "seed": self.seed, "variant": self.variant}

    @property
    def param(self) -> str:
        return self.variant.split("+")[0]

    @property
    def augment(self) -> bool:
        return self.variant.endswith("+aug")


def _hash(obj, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def rng_seed(group: tuple, seed: int) -> int:
    """A target's random seed: from its group (a feature, an image, or a pair, so all renders of one pair
    start alike and a slerp sequence changes smoothly) and its seed number; never from a batch position."""
    return int(_hash([list(group), seed], 15), 16)


def settings_for(cfg: RenderConfig, model_ref: str, dtype: torch.dtype, sae_run: str) -> dict:
    return {"engine": ENGINE_VERSION, "n_views": cfg.n_views, "n_steps": cfg.n_steps, "lr": cfg.lr,
            "tv_weight": cfg.tv_weight, "size": cfg.size, "precision": str(dtype).replace("torch.", ""),
            "min_steps": cfg.min_steps, "stop_window": cfg.stop_window, "stop_delta": cfg.stop_delta,
            "local_size": cfg.local_size, "prefer_own_first": cfg.prefer_own_first,
            "stop_own_first": cfg.stop_own_first, "model": model_ref,
            "sae_run": sae_run}


# --- planning -------------------------------------------------------------------------------------------
def parse_features(spec: str, store: Store, n_features: int, device: torch.device) -> tuple[list[int], bool]:
    """Feature ids to render, and whether they were listed explicitly ("1,2,3")."""
    spec = str(spec).strip()
    if spec == "auto":
        spec = "all" if device.type == "cuda" else f"top:{CPU_AUTO_FEATURES}"
    if spec == "all":
        return list(range(n_features)), False
    if spec.startswith("top:"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise AtlasError(f"render.features {spec!r}: N in top:N must be a number",
                             "e.g. features = \"top:64\"") from None
        return store.most_frequent_features(n), False
    try:
        ids = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise AtlasError(f"render.features {spec!r} is not all, auto, top:N or a list of feature ids",
                         "e.g. --features 1,2,3 or features = \"top:64\"") from None
    bad = [i for i in ids if not 0 <= i < n_features]
    if bad or not ids:
        raise AtlasError(f"feature id(s) {bad or spec} out of range: the SAE has features 0..{n_features - 1}",
                         f"pass ids between 0 and {n_features - 1}")
    return list(dict.fromkeys(ids)), True


def parse_pair(text: str, n_features: int) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in str(text).split(","))
    except ValueError:
        raise AtlasError(f"render.pairs entry {text!r} is not \"a,b\"", "e.g. pairs = [\"12,40\"]") from None
    if not (0 <= a < n_features and 0 <= b < n_features) or a == b:
        raise AtlasError(f"render.pairs entry {text!r}: need two different feature ids in 0..{n_features - 1}",
                         "fix the pair in [render] pairs")
    return a, b


def auto_pairs(store: Store, n: int) -> list[tuple[int, int]]:
    """The n strongest co-activating pairs and the n most similar (decoder cosine) pairs."""
    if n <= 0:
        return []
    co, sim = store.strongest_pairs(n)
    pairs = list(co)
    for a, b in sim:
        if (a, b) not in pairs and len(pairs) < len(co) + n:
            pairs.append((a, b))
    return pairs


def auto_images(store: Store, n: int) -> list[int]:
    """One image per label (in label order), topped up with the first images, n in all."""
    ids = store.one_embedded_image_per_label(n)
    if len(ids) < n:
        more = store.first_embedded_images(n + len(ids))
        ids += [i for i in more if i not in ids][:n - len(ids)]
    return ids


def plan(cfg: RenderConfig, store: Store, sae: SparseAutoencoder, device: torch.device) -> list[Target]:
    """Every render the config asks for, in rendering order (without ids yet)."""
    dirs_fd = sae.feature_directions().float().cpu().numpy()
    n_features = dirs_fd.shape[0]
    variant = variant_name(cfg.param, cfg.augment)
    features, explicit = parse_features(cfg.features, store, n_features, device)
    targets = [Target("feature", s, variant, "sae", dirs_fd[f], feature_a=f, listed=explicit)
               for f in features for s in range(cfg.n_seeds)]
    for tg in targets:
        tg.rng_seed = rng_seed(("feature", tg.feature_a), tg.seed)
    if explicit:
        return targets

    emb_ids, emb_nd = store.embeddings()
    row_of = {int(i): k for k, i in enumerate(emb_ids)}

    def embedding(image_id: int, what: str) -> np.ndarray:
        if image_id not in row_of:
            raise AtlasError(f"render: {what} image id {image_id} has no embedding in the store",
                             "pick an id from `atlasgen query \"SELECT image_id FROM embeddings\" "
                             f"--out {store.paths.out_dir}`")
        return emb_nd[row_of[image_id]]

    image_ids = list(cfg.image_ids) or auto_images(store, cfg.n_auto_images)
    for image_id in image_ids:
        for s in range(cfg.n_seeds):
            tg = Target("image", s, variant, "embedding", embedding(int(image_id), "render.image_ids"),
                        image_id=int(image_id))
            tg.rng_seed = rng_seed(("image", tg.image_id), s)
            targets.append(tg)

    pairs = [parse_pair(p, n_features) for p in cfg.pairs]
    pairs += [p for p in auto_pairs(store, cfg.n_auto_pairs) if p not in pairs and p[::-1] not in pairs]
    ts = [k / (cfg.slerp_steps - 1) for k in range(cfg.slerp_steps)] if cfg.slerp_steps >= 2 else []
    for a, b in pairs:
        da, db = torch.from_numpy(dirs_fd[a]), torch.from_numpy(dirs_fd[b])
        group = ("pair", min(a, b), max(a, b))
        for s in range(cfg.n_pair_seeds):
            made = [Target("sum", s, variant, "sae", inversion.pair_sum(da, db).numpy(), feature_a=a, feature_b=b)]
            made += [Target("slerp", s, variant, "sae", inversion.slerp(da, db, t).numpy(), feature_a=a, feature_b=b,
                            t=t) for t in ts]
            if abs(float(da @ db)) < 1 - 1e-6:
                made += [Target("orth", s, variant, "sae", inversion.orthogonalize(da, db).numpy(), feature_a=a,
                                feature_b=b),
                         Target("orth", s, variant, "sae", inversion.orthogonalize(db, da).numpy(), feature_a=b,
                                feature_b=a)]
            for tg in made:
                tg.rng_seed = rng_seed(group, s)
            targets += made

    if cfg.ablation and len(emb_ids):
        image_id = int(emb_ids[0]) if cfg.ablation_image_id < 0 else int(cfg.ablation_image_id)
        emb = embedding(image_id, "render.ablation_image_id")
        for param, augment in ABLATION_VARIANTS:
            tg = Target("ablation", 0, variant_name(param, augment), "embedding", emb, image_id=image_id)
            tg.rng_seed = rng_seed(("image", image_id), 0)
            targets.append(tg)
    return targets


# --- the stage --------------------------------------------------------------------------------------------
def load_render_model(cfg: RenderConfig, store: Store):
    embed_cfg = store.stage_config("embed")
    if embed_cfg is None:
        raise StageInputError("render needs the embed stage, which has not run in this output folder",
                              "run `atlasgen build` (or embed, train, encode) with the same --out first")
    model_ref = embed_cfg["model"]
    model = load_embedding_model(model_ref, cfg.device, cfg.precision, models_dir=store.paths.models_dir)
    return model, model_ref


def render_path(store: Store, kind: str, render_id: str) -> Path:
    return store.paths.renders_dir / kind / f"{render_id}.webp"


def write_webp(path: Path, array_hw3: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array_hw3).save(tmp, format="WEBP", quality=WEBP_QUALITY, method=4)


# --- the engine's sizing and one unit of work ---------------------------------------------------------------
@dataclass(frozen=True)
class Sizing:
    """How the engine runs (none of it changes results): slots, views per pass, targets per unit, compile."""

    n_slots: int
    views_per_pass: int
    unit_targets: int
    compile: bool


def resolve_sizing(cfg: RenderConfig, model, device: torch.device, free_bytes: int | None = None) -> Sizing:
    """The config's sizes, with 0 = auto: on a GPU from its free memory (`free_bytes`, as a Ray worker reported
    it, else asked here) and the model's shape (`inversion.auto_batch`), on a CPU today's 16 targets and 64
    views per pass. Explicit values win."""
    n_views = cfg.n_views if cfg.augment else 1
    if device.type == "cuda":
        if free_bytes is None:
            free_bytes, _ = torch.cuda.mem_get_info(device)
        auto_slots, auto_vpp = inversion.auto_batch(free_bytes, inversion.ModelShape.of(model), n_views,
                                                    cfg.size or model.image_size, cfg.n_steps, cfg.local_size)
    else:
        auto_slots, auto_vpp = inversion.CPU_SLOTS, inversion.CPU_VIEWS_PER_PASS
    n_slots = cfg.batch_targets or auto_slots
    views_per_pass = cfg.max_views_per_pass or auto_vpp
    unit = cfg.unit_targets or (8 * n_slots if device.type == "cuda" else n_slots)
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    return Sizing(n_slots, views_per_pass, unit, use_compile)


@dataclass
class RenderContext:
    """What `render_unit` needs, built once per run (or once per worker): the model, the SAE, the config
    and the sizing; engines are made per variant on first use (only the config's own variant is compiled:
    the ablation's other variants are three targets)."""

    cfg: RenderConfig
    model: object
    sae: SparseAutoencoder
    device: torch.device
    sizing: Sizing
    engines: dict = field(default_factory=dict)

    @classmethod
    def create(cls, cfg: RenderConfig, model, sae: SparseAutoencoder, device: torch.device) -> "RenderContext":
        sizing = resolve_sizing(cfg, model, device)
        if sizing.compile:
            # Compiled kernels are reused across runs and processes from here.
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                                  str(Path.home() / ".cache" / "atlasgen" / "torchinductor"))
        return cls(cfg, model, sae.to(device), device, sizing)

    def settings(self, param: str, augment: bool) -> InversionSettings:
        cfg = self.cfg
        return InversionSettings(param=param, augment=augment, n_views=cfg.n_views, n_steps=cfg.n_steps, lr=cfg.lr,
                                 tv_weight=cfg.tv_weight, size=cfg.size, min_steps=cfg.min_steps,
                                 stop_window=cfg.stop_window, stop_delta=cfg.stop_delta, local_size=cfg.local_size,
                                 stop_own_first=cfg.stop_own_first,
                                 max_views_per_pass=self.sizing.views_per_pass)

    def engine(self, variant: str) -> inversion.Inverter:
        if variant not in self.engines:
            param, augment = variant.split("+")[0], variant.endswith("+aug")
            main = variant == variant_name(self.cfg.param, self.cfg.augment)
            self.engines[variant] = inversion.Inverter(self.model, self.settings(param, augment), self.sizing.n_slots,
                                                       compile=self.sizing.compile and main)
        return self.engines[variant]

    @property
    def compiled(self) -> bool:
        return any(e.compiled for e in self.engines.values())


@dataclass
class UnitResult:
    """What `render_unit` computes for its targets (in their order)."""

    pixels_bhw3: np.ndarray            # uint8 pictures
    cosine_b: np.ndarray               # un-augmented final cosine to the target
    embeddings_bd: np.ndarray          # the model's embedding of each picture
    self_activation_b: list            # feature targets: the SAE activation of their feature (else None)
    self_rank_b: list                  # feature targets: its rank among all features, 0 = top (else None)
    steps_b: np.ndarray                # Adam steps each target took
    final_loss_b: np.ndarray           # its training loss at its last step (NaN with 0 steps)
    seconds: float                     # wall time of the unit

    @property
    def n_target_steps(self) -> int:
        return int(self.steps_b.sum())


def own_first_test(sae: SparseAutoencoder, own_features: list[int | None], device: torch.device):
    """The engine's `ready` test for these targets: a feature target's picture passes when its own feature
    is the strongest (and active) SAE feature on it; other targets (None) always pass. None when no target
    is a feature."""
    if all(f is None for f in own_features):
        return None
    own_n = torch.tensor([-1 if f is None else f for f in own_features], dtype=torch.long, device=device)

    @torch.no_grad()
    def ready(emb_kd: torch.Tensor, targets: list[int]) -> torch.Tensor:
        own_k = own_n[torch.tensor(targets, dtype=torch.long, device=device)]
        acts_kf = sae.encode_embeddings(emb_kd.to(device))
        own_act_k = acts_kf.gather(1, own_k.clamp(min=0)[:, None])[:, 0]
        first_k = (acts_kf.argmax(dim=1) == own_k) & (own_act_k > 0)
        return first_k | (own_k < 0)

    return ready


def render_unit(ctx: RenderContext, targets: list[Target], on_step: Callable[[int], None] | None = None,
                on_done: Callable[[int], None] | None = None) -> UnitResult:
    """Render one unit (targets of one variant): pure compute, no store and no files."""
    t0 = time.perf_counter()
    variant = targets[0].variant
    assert all(tg.variant == variant for tg in targets), "a unit holds one variant"
    centre_d = ctx.sae.input_mean.detach().float().cpu()
    dirs_nd = torch.from_numpy(np.stack([tg.direction_d for tg in targets])).float()
    centres_nd = torch.stack([centre_d if tg.space == "sae" else torch.zeros_like(centre_d) for tg in targets])
    ready = own_first_test(ctx.sae, [tg.feature_a if tg.kind == "feature" else None for tg in targets],
                           ctx.device) if ctx.cfg.prefer_own_first else None
    result = ctx.engine(variant).run(dirs_nd, [tg.rng_seed for tg in targets], centres_nd, on_step=on_step,
                                     on_done=on_done, pixels=True, ready=ready)
    with torch.no_grad():
        acts_nf = ctx.sae.encode_embeddings(result.embeddings_bd.to(ctx.device)).cpu()
    self_act, self_rank = [], []
    for k, tg in enumerate(targets):
        if tg.kind == "feature":
            acts_f = acts_nf[k]
            self_act.append(float(acts_f[tg.feature_a]))
            self_rank.append(int((acts_f > acts_f[tg.feature_a]).sum()))
        else:
            self_act.append(None)
            self_rank.append(None)
    steps_n = result.steps_b.numpy()
    final_loss = np.array([float(result.loss_sb[n - 1, k]) if n > 0 else float("nan") for k, n in enumerate(steps_n)])
    return UnitResult(result.pixels_bhw3, result.cosine_b.numpy(), result.embeddings_bd.numpy(), self_act, self_rank,
                      steps_n, final_loss, time.perf_counter() - t0)


@dataclass
class RenderPayload:
    """What a Ray worker gets (once, through the object store) to build its RenderContext."""

    cfg: RenderConfig
    model: PackedModel
    sae: PackedSAE


def setup_render_context(payload: "RenderContext | RenderPayload") -> RenderContext:
    """The executor's setup: here the payload is the run's context; a Ray worker builds its own, on its device."""
    if isinstance(payload, RenderContext):
        return payload
    device = resolve_device(payload.cfg.device)
    return RenderContext.create(payload.cfg, payload.model.build(device), payload.sae.build(device), device)


# --- the stage --------------------------------------------------------------------------------------------
def run(cfg: RenderConfig, store: Store, executor=None) -> dict:
    sae, sae_run_id = load_stage_sae(store)
    executor = executor if executor is not None else LocalExecutor()
    hardware = None
    if executor.remote:
        # Workers render in the precision resolved for their hardware (asked of a worker), which is also what
        # the settings (and so the render ids) record; this process loads the model only to send it.
        hardware = executor.unit_hardware(cfg.device)
        device = torch.device(hardware.device_type)
        model, model_ref = load_render_model(
            replace(cfg, device="cpu", precision=resolve_precision(cfg.precision, hardware.bf16_fast)), store)
    else:
        device = resolve_device(cfg.device)
        model, model_ref = load_render_model(cfg, store)
    if cfg.local_size and cfg.local_size % int(model.backbone.config.patch_size):
        patch = int(model.backbone.config.patch_size)
        raise AtlasError(f"render.local_size {cfg.local_size} is not a multiple of the model's patch size {patch}",
                         f"use e.g. local_size = {6 * patch} (or 0 for the model's input size)")
    if not executor.remote:
        sae = sae.to(device)
    settings = settings_for(cfg, model_ref, model.dtype, sae_run_id)
    settings_hash = _hash(settings)
    targets = plan(cfg, store, sae, device)
    for tg in targets:
        tg.render_id = _hash([settings_hash, tg.key])
    assert len({tg.render_id for tg in targets}) == len(targets), "two planned renders share a render_id"

    n_superseded = _drop_superseded(store, settings_hash)
    n_not_asked = _drop_not_asked(store, targets, cfg, settings_hash)
    done = _existing(store)
    todo = [tg for tg in targets if tg.render_id not in done]
    if len(todo) < len(targets):
        say(f"render: {len(targets) - len(todo)} of {len(targets)} renders already exist, {len(todo)} to do")

    if executor.remote:
        ctx = None
        payload = RenderPayload(cfg, PackedModel.pack(model), PackedSAE.pack(sae))
        sz = resolve_sizing(cfg, model, device, hardware.free_bytes)  # each worker sizes its own engine
    else:
        ctx = payload = RenderContext.create(cfg, model, sae, device)
        sz = ctx.sizing
    units = list(_units(todo, sz.unit_targets))
    if todo:
        say(f"render: {len(todo)} targets in {len(units)} unit(s) on {device.type}: {sz.n_slots} slots, "
            f"{sz.views_per_pass} views per pass, at most {cfg.n_steps} steps"
            + (", compiled (the first steps compile)" if sz.compile else ""))
    # Thread count is tuned on whole optimisation steps (it changes speed, not results).
    tuner = ThreadTuner(cfg.n_threads, len(todo) * cfg.n_steps // max(1, sz.n_slots)) \
        if device.type == "cpu" and not executor.remote else None
    meter = SpeedMeter(len(todo))
    clock = [time.perf_counter()]
    credit: dict[str, list] = {}  # per unit: fractional targets credited, whole targets shown

    def on_step(unit: list[Target], n_active: int) -> None:  # local units only: a worker cannot call back
        if tuner is not None:
            t = time.perf_counter()
            tuner.after_batch(t - clock[0], n_active)
            tuner.before_batch()
            clock[0] = t
        # Whole targets only, so the bar shows counts; a step moves n_active/n_steps targets along.
        c = credit.setdefault(unit[0].render_id, [0.0, 0])
        c[0] = min(len(unit) - 1, c[0] + n_active / max(1, cfg.n_steps))
        if int(c[0]) > c[1]:
            progress.update(int(c[0]) - c[1])
            c[1] = int(c[0])

    with restore_torch_threads(), bar(total=len(todo), desc="render", unit="target") as progress, \
            UnitWriter(store) as writer:
        if tuner is not None:
            tuner.before_batch()
        last = time.perf_counter()
        # Units finish in any order on Ray; each is saved here as it arrives, exactly once.
        for unit, result in executor.map_units(setup_render_context, payload, render_unit, units,
                                               unit_id=lambda u: u[0].render_id, device=cfg.device, on_step=on_step):
            progress.update(len(unit) - credit.pop(unit[0].render_id, [0.0, 0])[1])
            # Remote units run side by side: the meter counts wall time between results (the cluster's rate).
            now_s = time.perf_counter()
            meter.add(len(unit), result.n_target_steps, now_s - last if executor.remote else result.seconds)
            last = now_s
            progress.set_postfix_str(meter.postfix())
            writer.submit(save_unit, store, unit, result, settings, settings_hash)
            clock[0] = time.perf_counter()
            if tuner is not None:
                tuner.before_batch()

    summary = {"sae_run_id": sae_run_id, **_summary(store, targets, len(todo), n_superseded, settings_hash),
               "n_not_asked": n_not_asked}
    if todo:
        summary.update(meter.summary())
        summary.update({"n_slots": sz.n_slots, "views_per_pass": sz.views_per_pass, "unit_targets": sz.unit_targets,
                        "compiled": ctx.compiled if ctx is not None else sz.compile})
        say(f"render: {meter.line()}")
    if tuner is not None and todo:
        summary["n_threads"] = tuner.mostly_used
    if executor.remote:
        summary.update(executor=executor.name, n_workers=executor.n_workers)
    return summary


def _units(todo: list[Target], size: int):
    """Consecutive units of one variant (a unit shares its parameterisation and augmentation)."""
    unit: list[Target] = []
    for tg in todo:
        if unit and (len(unit) == size or tg.variant != unit[0].variant):
            yield unit
            unit = []
        unit.append(tg)
    if unit:
        yield unit


class SpeedMeter:
    """Targets per hour, ms per target-step and the ETA of the whole plan, from the units done so far."""

    def __init__(self, n_planned: int):
        self.n_planned, self.n_targets, self.n_target_steps, self.seconds = n_planned, 0, 0, 0.0

    def add(self, n_targets: int, n_target_steps: int, seconds: float) -> None:
        self.n_targets += n_targets
        self.n_target_steps += n_target_steps
        self.seconds += seconds

    @property
    def targets_per_hour(self) -> float:
        return 3600 * self.n_targets / max(self.seconds, 1e-9)

    @property
    def ms_per_target_step(self) -> float:
        return 1000 * self.seconds / max(self.n_target_steps, 1)

    @property
    def eta_s(self) -> float:
        return (self.n_planned - self.n_targets) * self.seconds / max(self.n_targets, 1)

    def postfix(self) -> str:
        return f"{self.targets_per_hour:,.0f} targets/h, {self.ms_per_target_step:.2f} ms/target-step"

    def line(self) -> str:
        return (f"{self.n_targets} targets in {self.seconds:.1f}s: {self.targets_per_hour:,.0f} targets/hour, "
                f"{self.ms_per_target_step:.2f} ms per target-step, "
                f"{self.n_target_steps / max(self.n_targets, 1):.1f} steps per target")

    def summary(self) -> dict:
        return {"targets_per_hour": round(self.targets_per_hour, 1),
                "ms_per_target_step": round(self.ms_per_target_step, 3),
                "mean_steps": round(self.n_target_steps / max(self.n_targets, 1), 1),
                "render_seconds": round(self.seconds, 2)}


class UnitWriter:
    """Saves finished units on one background thread, so WebP encoding and the store write of a unit overlap
    the next unit's compute. The store is used only by this thread while it runs (the stage does not touch
    it meanwhile); at most `max_pending` saves wait, and leaving the block waits for all of them (also when
    the render was interrupted, so every finished unit is committed) and re-raises a save's error."""

    def __init__(self, store: Store, max_pending: int = 2):
        self.store, self.max_pending = store, max_pending
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render-save")
        self.pending: list[Future] = []

    def submit(self, fn, *args) -> None:
        while len(self.pending) >= self.max_pending:
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(fn, *args))

    def __enter__(self) -> "UnitWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.pool.shutdown(wait=True)
        if exc_type is None:
            for future in self.pending:
                future.result()


def save_unit(store: Store, targets: list[Target], result: UnitResult, settings: dict, settings_hash: str) -> None:
    """Write a unit's WebP files, then its rows in one transaction (a row is written after its file)."""
    rows: dict[str, list] = {k: [] for k in ("render_id", "kind", "feature_a", "feature_b", "image_id", "t", "seed",
                                               "variant", "path", "cosine", "self_activation", "self_rank",
                                               "params_json", "settings_hash", "created_at")}
    for k, tg in enumerate(targets):
        path = render_path(store, tg.kind, tg.render_id)
        write_webp(path, result.pixels_bhw3[k])
        final_loss = float(result.final_loss_b[k])
        params = {**settings, "param": tg.param, "augment": tg.augment, "space": tg.space, "rng_seed": tg.rng_seed,
                  "listed": tg.listed, "steps": int(result.steps_b[k]),
                  "final_loss": None if math.isnan(final_loss) else round(final_loss, 5)}
        for name, value in (("render_id", tg.render_id), ("kind", tg.kind), ("feature_a", tg.feature_a),
                            ("feature_b", tg.feature_b), ("image_id", tg.image_id), ("t", tg.t), ("seed", tg.seed),
                            ("variant", tg.variant),
                            ("path", path.relative_to(store.paths.out_dir).as_posix()),
                            ("cosine", float(result.cosine_b[k])), ("self_activation", result.self_activation_b[k]),
                            ("self_rank", result.self_rank_b[k]), ("params_json", json.dumps(params)),
                            ("settings_hash", settings_hash), ("created_at", now())):
            rows[name].append(value)
    store.replace_renders(rows)


def _existing(store: Store) -> set[str]:
    """render_ids whose row and file both exist (a row without its file is redone)."""
    return {render_id for render_id, path in store.render_files() if (store.paths.out_dir / path).exists()}


def _drop_superseded(store: Store, settings_hash: str) -> int:
    """Delete renders made with other settings (rows and files): they no longer match the store."""
    rows = store.renders_made_otherwise(settings_hash)
    _delete_renders(store, rows, "made with other settings")
    return len(rows)


def _drop_not_asked(store: Store, targets: list[Target], cfg: RenderConfig, settings_hash: str) -> int:
    """Delete renders (rows and files) that [render] no longer asks for, so the site shows what the config
    says (fewer seeds, fewer features under top:N, fewer pairs or images, another variant, no ablation). Only
    a run of [render]'s own plan prunes: a run for a list of feature ids (`--features 1,2,3`) keeps all other
    renders, and the feature renders such a list asked for (or that `features = "auto"` may plan on another
    device) stay while their seed and variant are still ones [render] makes."""
    if any(tg.listed for tg in targets):
        return 0
    planned = {tg.render_id for tg in targets}
    variant = variant_name(cfg.param, cfg.augment)
    # `auto` plans by device (every feature on a GPU, the top few on a CPU): a forced run on a laptop must not
    # delete the features a GPU machine rendered, so under `auto` no feature is dropped for being unplanned.
    by_device = str(cfg.features).strip() == "auto"
    rows = [(render_id, path) for render_id, kind, seed, row_variant, listed, path
            in store.renders_with_settings(settings_hash)
            if render_id not in planned
            and not (kind == "feature" and (listed or by_device) and seed < cfg.n_seeds and row_variant == variant)]
    _delete_renders(store, rows, "the config no longer asks for")
    return len(rows)


def _delete_renders(store: Store, rows: list[tuple[str, str]], why: str) -> None:
    """Delete these (render_id, path) renders: rows in one transaction, then their files."""
    if not rows:
        return
    store.delete_renders([render_id for render_id, _ in rows])
    for _, path in rows:
        (store.paths.out_dir / path).unlink(missing_ok=True)
    say(f"render: removed {len(rows)} render(s) {why}")


def _summary(store: Store, targets: list[Target], n_rendered: int, n_superseded: int, settings_hash: str) -> dict:
    ids = [tg.render_id for tg in targets]
    rows = store.render_results(ids)
    per_kind = Counter(r[0] for r in rows)
    cosines = [r[1] for r in rows if r[1] is not None]
    ranks = [r[2] for r in rows if r[0] == "feature" and r[2] is not None]
    summary = {"n_planned": len(targets), "n_rendered": n_rendered, "n_superseded": n_superseded,
               "mean_cosine": round(float(np.mean(cosines)), 4) if cosines else None,
               "self_top1_share": round(float(np.mean([r == 0 for r in ranks])), 4) if ranks else None,
               "settings_hash": settings_hash}
    summary.update({f"n_{kind}": n for kind, n in sorted(per_kind.items())})
    return summary


def reset(store: Store) -> None:
    """Renders are immutable artifacts keyed by their own id, so a config change or --force keeps them (run()
    drops the ones made with other settings). Reset only tidies: rows whose file is gone (they are redone) and
    files no row points to (temp files of dead runs go in the pipeline's sweep, render's resume included)."""
    renders_dir = store.paths.renders_dir
    if not renders_dir.exists():
        if store.count("renders"):
            store.delete_renders()
        return
    known = set()
    missing = []
    for render_id, path in store.render_files():
        if (store.paths.out_dir / path).exists():
            known.add((store.paths.out_dir / path).resolve())
        else:
            missing.append(render_id)
    if missing:
        store.delete_renders(missing)
    for path in renders_dir.rglob("*"):
        # Temp files follow paths.temp_path's rule; the pipeline's sweep removes those of dead processes.
        if path.is_file() and parse_temp_name(path.name) is None and path.resolve() not in known:
            path.unlink(missing_ok=True)


# Renders are immutable artefacts keyed by their own id: its reset only tidies (see `reset`).
SPEC = Stage("render", RenderConfig, run, inputs=("encode",), tables=("renders",), folders=("renders_dir",),
             reset=reset, executor=True, pages=("inversions.html",))
