"""Render (inversion) speed and quality: today's defaults against the new defaults, in one run.

On a random-weight DINOv3 of the real ViT-S/16 shape (224 px; `--quick`: the tiny 2-layer model), on a
fixed, seeded set of benchmark targets: the directions of the most frequent features of a small SAE trained
(here, in seconds) on the model's embeddings of generated pictures, each measured from the SAE's input mean,
exactly as the render stage renders features. Prints, per setting:

- ms per target-step, targets/hour and hours for the full atlas (12,288 features × 4 seeds),
- achieved model TFLOP/s (forward ≈ 9.4 GFLOP per 224 px view for ViT-S/16, backward counted as 2×),
- peak GPU memory,
- the quality pair on the same targets: mean final cosine and the share of renders whose own feature is the
  strongest SAE feature on the picture (own-feature-first),

and the verdict (the new defaults' quality must be at least the baseline's). Settings:

- baseline = today's defaults, kept here: 16 targets per batch, 64 views per pass, every target 200 steps,
  eager, today's loop (`legacy_invert`, with its per-step host synchronisation);
- new = the current `RenderConfig` defaults: auto-sized slots and views per pass, per-target stopping,
  continuous batching, torch.compile on CUDA;
- (GPU, `--variants`) the new defaults with other engine settings (e.g. local views at 96 px), run eager on
  the quality targets next to the new defaults eager, so their speed ratio is measured like for like.

It also replays the stopping rule on the baseline's per-step cosines (a "what if" table for other
min_steps / stop_window / stop_delta), since the rule uses only a target's own history.

    python benchmarks/render.py --device cuda            # ~3 min on an H100 (see benchmarks/gpu_check.sh)
    python benchmarks/render.py --device cpu --quick     # ~35 s on 2 CPU cores: tiny model
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlasgen import inversion  # noqa: E402
from atlasgen.config import RenderConfig, TrainConfig  # noqa: E402
from atlasgen.inversion import (InversionSettings, Inverter, ModelShape, augment_views, cosine_to_targets,  # noqa: E402
                                draw_augmentations, forward_flops, make_param, target_generators, total_variation)
from atlasgen.model import (ensure_random_model, load_embedding_model, resolve_device, tiny_config,  # noqa: E402
                            vits16_config)
from atlasgen.stages.render import own_first_test, rng_seed  # noqa: E402
from atlasgen.stages.train import train_sae  # noqa: E402

ATLAS_TARGETS = 12_288 * 4
# Today's defaults (before issue 10): the baseline setting, kept here.
BASELINE_SLOTS, BASELINE_VIEWS_PER_PASS, BASELINE_STEPS = 16, 64, 200


# --- today's loop, kept as the baseline ------------------------------------------------------------------
def legacy_invert(model, directions_bd, seeds, settings: InversionSettings, centres_bd=None, on_step=None,
                  record_at: tuple[int, ...] = ()):
    """Today's `inversion.invert` (a fixed batch, torch.optim.Adam, every target n_steps steps, one host
    synchronisation per step for the loss), plus a record of the whole-picture cosine per step (kept on the
    device) and the pictures at the steps in `record_at`, for the stopping replay and the 200-step quality.
    Returns (final pictures, cos0 (n_steps, B), {step: pictures})."""
    device = next(model.backbone.parameters()).device
    b = directions_bd.shape[0]
    size = settings.size or model.image_size
    directions_bd = F.normalize(directions_bd.float().to(device), dim=-1)
    centres_bd = torch.zeros_like(directions_bd) if centres_bd is None else centres_bd.float().to(device)
    gens = target_generators(seeds)
    param = make_param(settings.param, gens, size).to(device)
    opt = torch.optim.Adam(param.parameters(), lr=settings.lr * inversion.LR_SCALE[settings.param])
    n_views = settings.n_views if settings.augment else 1
    chunk = max(1, settings.max_views_per_pass // n_views)
    loss_sb = torch.zeros(settings.n_steps, b)
    cos0_sb = torch.zeros(settings.n_steps, b, device=device)
    recorded = {}
    for step in range(settings.n_steps):
        u_bvk = draw_augmentations(gens, settings.n_views) if settings.augment else None
        opt.zero_grad(set_to_none=True)
        images = param()
        if step in record_at:
            recorded[step] = images.detach().float().clone()
        leaf = images.detach().requires_grad_(True)
        for lo in range(0, b, chunk):
            hi = min(b, lo + chunk)
            img = leaf if hi - lo == b else leaf[lo:hi]
            views = augment_views(img, u_bvk[lo:hi], model.image_size) if settings.augment else img
            emb = model(views).view(hi - lo, n_views, -1)
            cos_bv = cosine_to_targets(emb, directions_bd[lo:hi, None], centres_bd[lo:hi, None])
            loss_b = -cos_bv.mean(dim=1) + settings.tv_weight * total_variation(img)
            loss_b.sum().backward()
            loss_sb[step, lo:hi] = loss_b.detach().cpu()
            cos0_sb[step, lo:hi] = cos_bv[:, 0].detach()
        images.backward(leaf.grad)
        opt.step()
        if on_step is not None:
            on_step(step)
    with torch.no_grad():
        final = param().float()
    if settings.n_steps in record_at:
        recorded[settings.n_steps] = final
    return final, cos0_sb.cpu(), recorded


# --- the benchmark targets ----------------------------------------------------------------------------------
def generated_pictures(n: int, side: int, seed: int = 0) -> torch.Tensor:
    """Blocky colour pictures (n, 3, side, side) in [0, 1]: random 2×2 … 8×8 colour grids with a smooth
    brightness ramp, different enough that a random network's embeddings spread out."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, side, side), np.float32)
    ramp = np.linspace(0.6, 1.0, side, dtype=np.float32)
    for i in range(n):
        cells = int(rng.choice([2, 4, 8]))
        grid = rng.random((3, cells, cells), dtype=np.float32)
        img = grid.repeat(math.ceil(side / cells), axis=1).repeat(math.ceil(side / cells), axis=2)[:, :side, :side]
        out[i] = img * (ramp[None, :, None] if rng.random() < 0.5 else ramp[None, None, :])
    return torch.from_numpy(out)


@dataclass
class Bench:
    model: object
    sae: object
    feature_ids: list[int]
    seeds: list[int]
    dirs_nd: torch.Tensor
    centres_nd: torch.Tensor
    device: torch.device


def make_targets(model, device: torch.device, n_targets: int, n_pictures: int, sae_steps: int, expansion: int,
                 seed: int = 0) -> Bench:
    """A small SAE on the model's embeddings of generated pictures; targets are its most frequent features
    (one seed each, then a second seed per feature, ... if more targets than live features are asked)."""
    pics = generated_pictures(n_pictures, model.image_size, seed)
    with torch.no_grad():
        emb_nd = torch.cat([model(pics[lo:lo + 256].to(device)).cpu() for lo in range(0, n_pictures, 256)]).numpy()
    cfg = TrainConfig(expansion=expansion, n_steps=sae_steps, batch_size=min(1024, n_pictures), warmup_steps=50,
                      l1_coeff=5e-3, lr=1e-3, resample_every=max(1, sae_steps // 3), dead_window=max(1, sae_steps // 4),
                      log_every=max(1, sae_steps // 4), seed=seed)
    from atlasgen.progress import set_quiet
    set_quiet(True)
    sae, _, _ = train_sae(cfg, emb_nd, device)
    sae = sae.to(device).eval()
    with torch.no_grad():
        acts = sae.encode_embeddings(torch.from_numpy(emb_nd).to(device))
    n_active = (acts > 0).sum(0).cpu()
    order = [int(f) for f in torch.argsort(n_active, descending=True, stable=True) if n_active[f] > 0]
    feature_ids, seeds = [], []
    for k in range(n_targets):
        f, s = order[k % len(order)], k // len(order)
        feature_ids.append(f)
        seeds.append(rng_seed(("feature", f), s))
    dirs = sae.feature_directions().float().cpu()[feature_ids]
    centres = sae.input_mean.detach().float().cpu().expand(n_targets, -1).clone()
    return Bench(model, sae, feature_ids, seeds, dirs, centres, device)


@torch.no_grad()
def own_first_and_cosine(bench: Bench, images_n3hw: torch.Tensor, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per target of `idx`: (whole-picture cosine to its target, whether its own feature is the strongest SAE
    feature on the picture), both on the CPU."""
    model, dev = bench.model, bench.device
    emb = torch.cat([model(images_n3hw[lo:lo + 256].to(dev)) for lo in range(0, len(idx), 256)])
    cos = cosine_to_targets(emb, bench.dirs_nd[idx].to(dev), bench.centres_nd[idx].to(dev))
    # The render stage's own test (`RenderConfig.prefer_own_first`), so the benchmark scores what it keeps.
    first = own_first_test(bench.sae, [bench.feature_ids[i] for i in idx], dev)(emb, list(range(len(idx))))
    return cos.float().cpu(), first.cpu()


def quality(bench: Bench, images_n3hw: torch.Tensor, idx: list[int]) -> tuple[float, float]:
    """(mean final cosine, own-feature-first share) of pictures of the targets `idx`."""
    cos, first = own_first_and_cosine(bench, images_n3hw, idx)
    return float(cos.mean()), float(first.float().mean())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


@dataclass
class Row:
    name: str
    ms_per_target_step: float
    mean_steps: float
    targets_per_hour: float          # steady state: 3.6e6 / (ms per target-step × mean steps)
    measured_targets_per_hour: float | None  # this run's targets / wall (includes the unit's tail)
    tflops: float
    peak_gib: float | None
    mean_cosine: float | None
    own_first: float | None
    note: str = ""

    @property
    def atlas_hours(self) -> float:
        return ATLAS_TARGETS / self.targets_per_hour


HEADER = (f"{'setting':<92} {'ms/tgt-step':>11} {'steps':>6} {'targets/h':>10} {'atlas h':>8} {'TFLOP/s':>8} "
          f"{'peak GiB':>8} {'cosine':>7} {'own-1st':>7}")


def format_row(r: Row) -> str:
    peak_s = f"{r.peak_gib:.1f}" if r.peak_gib is not None else "-"
    line = (f"{r.name:<92} {r.ms_per_target_step:>11.3f} {r.mean_steps:>6.1f} {r.targets_per_hour:>10,.0f} "
            f"{r.atlas_hours:>8.2f} {r.tflops:>8.2f} {peak_s:>8} {r.mean_cosine:>7.4f} {r.own_first:>7.3f}")
    return line + (f"\n{'':<4}{r.note}" if r.note else "")


def view_flops(shape: ModelShape, settings: InversionSettings) -> float:
    """Model FLOPs per view of one step (forward + backward ≈ 3 forwards), averaged over the views."""
    v = settings.n_views if settings.augment else 1
    n_global = math.ceil(v / 2) if settings.augment else 1
    local = inversion.local_side(settings.local_size, shape.image_size)
    fwd = (n_global * forward_flops(shape, shape.image_size) + (v - n_global) * forward_flops(shape, local)) / v
    return 3 * fwd


def baseline_speed(bench: Bench, settings: InversionSettings, n_timed: int) -> tuple[float, float | None]:
    """ms per step of today's loop at today's defaults (16 targets, 64 views per pass); the first step warms up."""
    stamps: list[float] = []
    n = BASELINE_SLOTS
    run = replace(settings, n_steps=n_timed + 1, max_views_per_pass=BASELINE_VIEWS_PER_PASS)
    reset_peak(bench.device)

    def on_step(_step):
        sync(bench.device)
        stamps.append(time.perf_counter())

    legacy_invert(bench.model, bench.dirs_nd[:n], bench.seeds[:n], run, bench.centres_nd[:n], on_step=on_step)
    return 1000 * (stamps[-1] - stamps[0]) / n_timed, peak_gib(bench.device)


def run_engine(bench: Bench, settings: InversionSettings, n_slots: int, idx: list[int], compile: bool,
               own_first: bool = True):
    """The new engine on targets `idx`: (result, wall seconds, peak GiB, compile/warm-up seconds).
    `own_first`: with the render stage's own-feature-first test (`RenderConfig.prefer_own_first`; the
    settings' stop_own_first says whether it also gates stopping)."""
    inv = Inverter(bench.model, settings, n_slots, compile=compile)
    ready = own_first_test(bench.sae, [bench.feature_ids[i] for i in idx], bench.device) if own_first else None
    warm = 0.0
    if compile:
        # Compile (or load from the cache) on a short run first, so the timed run is steady state.
        # Two steps of one pass: the model pass has the same (padded) shape as in the timed run.
        t0 = time.perf_counter()
        k = min(len(idx), inv.chunk_targets)
        inv.settings = replace(settings, n_steps=2, stop_delta=0)
        inv.run(bench.dirs_nd[idx[:k]], [bench.seeds[i] for i in idx[:k]], bench.centres_nd[idx[:k]])
        inv.settings = settings
        sync(bench.device)
        warm = time.perf_counter() - t0
    reset_peak(bench.device)
    sync(bench.device)
    t0 = time.perf_counter()
    result = inv.run(bench.dirs_nd[idx], [bench.seeds[i] for i in idx], bench.centres_nd[idx], ready=ready)
    sync(bench.device)
    return result, time.perf_counter() - t0, peak_gib(bench.device), warm, inv


REPLAY_MODES = ("cosine", "prefer", "stop")
VARIANTS = ("local0", "local96", "views6", "views4", "noprefer", "stopfirst")


def replay_stopping(cos0_sn: np.ndarray, rules: list[tuple[int, int, float, int]],
                    first_rn: np.ndarray, record_every: int, mode: str = "cosine") -> list[tuple]:
    """For each (min_steps, stop_window, stop_delta, n_steps): the rule with (mean steps, mean cosine of the
    kept picture, own-feature-first share) when every target follows it on its own recorded history (checked
    every STOP_CHECK_EVERY steps, as the engine does). The pictures are those recorded every `record_every`
    steps (`first_rn`: own feature first, record × target). `mode`: "cosine": keep the best picture by cosine
    up to the stop; "prefer" (`RenderConfig.prefer_own_first`): keep the best one with its own feature first
    when there is one; "stop" (`stop_own_first` too): and stop early only once there is one."""
    assert mode in REPLAY_MODES
    out = []
    every = inversion.STOP_CHECK_EVERY
    for min_steps, window, delta, n_max in rules:
        steps, best, first = [], [], []
        for k in range(cos0_sn.shape[1]):
            h = cos0_sn[:n_max, k]

            def passing(stop: int) -> list[int]:
                return [r for r in range(0, stop, record_every) if first_rn[r // record_every, k]]

            stop = n_max
            for s in range(every, n_max, every):
                if s >= min_steps and inversion.converged(h[:s], window, delta) and (
                        mode != "stop" or passing(s)):
                    stop = s
                    break
            recorded = list(range(0, stop, record_every))
            pool = (passing(stop) or recorded) if mode != "cosine" else recorded
            pick = max(pool, key=lambda r: h[r])
            steps.append(stop)
            best.append(float(h[pick]))
            first.append(float(first_rn[pick // record_every, k]))
        out.append((min_steps, window, delta, n_max, float(np.mean(steps)), float(np.mean(best)),
                    float(np.mean(first))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cuda | cpu | auto")
    ap.add_argument("--quick", action="store_true",
                    help="tiny 2-layer model, 2 views, 64 px, a few dozen steps (a few minutes on 2 CPU cores)")
    ap.add_argument("--model", default=None, help="a DINOv3 checkpoint folder (default: random ViT-S/16 weights)")
    ap.add_argument("--quality-targets", type=int, default=None,
                    help="targets scored for quality by both settings (default 128; 16 with --quick): the own-feature-first "
                         "share is a proportion, so fewer targets make it noisy (±8 points at 40)")
    ap.add_argument("--speed-targets", type=int, default=None,
                    help="targets in the timed run of the new defaults, quality targets first (default 2 × slots; "
                         "24 with --quick)")
    ap.add_argument("--timed-steps", type=int, default=8, help="timed steps of the baseline's speed measurement")
    ap.add_argument("--replay-steps", type=int, default=None,
                    help="run the baseline's quality targets this far for the stopping replay (default: the larger step "
                         "count of the two settings)")
    ap.add_argument("--variants", default="local0,views6",
                    help="comma-separated extra rows, run eager on the quality targets (GPU or --quick): local0 "
                         "(local views at the model's input size, as before), local96 (at 96 px), views6 / views4 "
                         "(6 / 4 views), noprefer (prefer_own_first off), stopfirst (stop_own_first on), none")
    ap.add_argument("--compile", default="auto", help="auto | on | off for the new defaults (auto: on CUDA)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on a CPU (0: torch's default)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--replay-json", type=Path, default=None,
                    help="also write the baseline's per-step cosines and per-record own-first flags here (to "
                         "replay other stopping rules later)")
    ap.add_argument("--baseline-json", type=Path, default=None,
                    help="skip the baseline and the replay: take the baseline row from an earlier run's --json "
                         "on the same machine and targets (a short confirmation run of the new defaults)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    cfg = RenderConfig()
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_path = args.model
        else:
            model_path = str(ensure_random_model(Path(tmp) / "model", tiny_config() if args.quick else vits16_config()))
        model = load_embedding_model(model_path, device, "auto")
        shape = ModelShape.of(model)
        # Today's defaults and the new ones (the engine settings of RenderConfig); --quick scales both down.
        if args.quick:
            base = InversionSettings(n_views=2, n_steps=24, size=64, stop_delta=0, local_size=0)
            new = InversionSettings(n_views=2, n_steps=40, size=64, min_steps=20, stop_window=10,
                                    stop_delta=cfg.stop_delta, local_size=cfg.local_size)
        else:
            base = InversionSettings(n_views=8, n_steps=BASELINE_STEPS, stop_delta=0, local_size=0)
            new = InversionSettings(param=cfg.param, augment=cfg.augment, n_views=cfg.n_views, n_steps=cfg.n_steps,
                                    lr=cfg.lr, tv_weight=cfg.tv_weight, size=cfg.size, min_steps=cfg.min_steps,
                                    stop_window=cfg.stop_window, stop_delta=cfg.stop_delta, local_size=cfg.local_size,
                                    stop_own_first=cfg.stop_own_first)
        picture_side = new.size or model.image_size
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            n_slots, vpp = inversion.auto_batch(free, shape, new.n_views, picture_side, new.n_steps, new.local_size)
        else:
            n_slots, vpp = inversion.CPU_SLOTS, inversion.CPU_VIEWS_PER_PASS
        new = replace(new, max_views_per_pass=vpp)
        compile_new = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
        n_quality = args.quality_targets or (16 if args.quick else 128)
        n_speed = args.speed_targets or (24 if args.quick else 2 * n_slots)
        n_speed = max(n_speed, n_quality)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"== render benchmark on {gpu} ({device.type}), torch {torch.__version__}, "
              f"{'tiny 2-layer' if args.quick else 'ViT-S/16'} random weights, {model.image_size} px, "
              f"{str(model.dtype).replace('torch.', '')}")

        t0 = time.perf_counter()
        bench = make_targets(model, device, n_speed, 512 if args.quick else 2048, 300 if args.quick else 1500,
                             4 if args.quick else 8)
        q_idx = list(range(n_quality))
        print(f"targets: {n_speed} feature directions of a {bench.sae.n_features}-feature SAE on generated pictures "
              f"({len(set(bench.feature_ids))} features), quality on the first {n_quality} "
              f"(setup {time.perf_counter() - t0:.0f} s)", flush=True)

        class Rows(list):
            """Rows are printed as they are measured, so a run cut short still shows what it measured."""

            def append(self, row: Row) -> None:
                super().append(row)
                print(format_row(row), flush=True)

        rows: list[Row] = Rows()
        print(HEADER)
        # 1. The baseline: today's loop and defaults.
        if args.baseline_json:
            earlier = json.loads(args.baseline_json.read_text())[0]
            rows.append(Row(**{k: v for k, v in earlier.items() if k != "atlas_hours"}
                            | {"name": earlier["name"] + f" [from {args.baseline_json.name}]"}))
        else:
            ms_step, peak = baseline_speed(bench, base, args.timed_steps)
            ms_ts = ms_step / BASELINE_SLOTS
            t0 = time.perf_counter()
            # The baseline's quality run goes on to replay_steps, so the replay table can try a larger n_steps too.
            n_max = max(base.n_steps, new.n_steps, args.replay_steps or 0)
            # The pictures every STOP_CHECK_EVERY steps too: the replay scores the picture each rule would keep.
            every = inversion.STOP_CHECK_EVERY
            final, cos0_sn, recorded = legacy_invert(
                model, bench.dirs_nd[q_idx], [bench.seeds[i] for i in q_idx],
                replace(base, n_steps=n_max, max_views_per_pass=vpp), bench.centres_nd[q_idx],
                record_at=tuple(sorted(set(range(0, n_max, every)) | {base.n_steps, n_max})))
            q_base = quality(bench, recorded[base.n_steps], q_idx)
            scored = {step: own_first_and_cosine(bench, pictures, q_idx) for step, pictures in sorted(recorded.items())}
            recorded.clear()
            first_rn = np.stack([scored[step][1].numpy() for step in range(0, n_max, every)]).astype(np.float64)
            print(f"baseline quality run: {len(q_idx)} targets × {n_max} steps in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            rows.append(Row(f"baseline: today's defaults ({BASELINE_SLOTS} targets, {BASELINE_VIEWS_PER_PASS} views/pass, "
                            f"{base.n_steps} steps, eager)", ms_ts, base.n_steps, 3.6e6 / (ms_ts * base.n_steps), None,
                            view_flops(shape, base) * base.n_views / (ms_ts * 1e-3) / 1e12, peak, *q_base))

            # The stopping rule replayed on the baseline's per-step whole-picture cosines.
            maxima = sorted({new.n_steps, n_max} | ({150} if n_max > 150 else set()))
            rules = sorted({(new.min_steps, new.stop_window, new.stop_delta, new.n_steps)} | {
                (m, w, d, x) for m in ((10, 20) if args.quick else (40, 60, 80, 100)) for w in ((10,) if args.quick else (30, 50))
                for d in (0.004, 0.008) for x in maxima})
            print(f"== stopping rule replayed on the baseline's whole-picture cosines ({n_quality} targets, "
                  f"≤{n_max} steps; 'best' = best cosine up to the stop; at {base.n_steps} fixed steps the last "
                  f"picture's is {float(cos0_sn[base.n_steps - 1].mean()) if base.n_steps else float('nan'):.4f}, "
                  f"the best {float(cos0_sn[:base.n_steps].max(0).values.mean()) if base.n_steps else float('nan'):.4f})")
            print(f"{'':>31} {'cosine rule alone':^26}   {'+ prefer_own_first':^26}   {'+ stop_own_first':^26}")
            print(f"{'min_steps':>9} {'window':>6} {'delta':>6} {'n_steps':>7}" +
                  f"   {'steps':>8} {'cosine':>8} {'own-1st':>7}" * 3)
            replays = [replay_stopping(cos0_sn.numpy(), rules, first_rn, every, mode) for mode in REPLAY_MODES]
            mode_now = "stop" if new.stop_own_first else "prefer" if cfg.prefer_own_first else "cosine"
            for i, (m, w, d, x) in enumerate(rules):
                mark = (f"  ← defaults ({mode_now})" if (m, w, d, x) == (new.min_steps, new.stop_window, new.stop_delta,
                                                                           new.n_steps) else "")
                print(f"{m:>9} {w:>6} {d:>6} {x:>7}" + "".join(
                    f"   {r[i][4]:>8.1f} {r[i][5]:>8.4f} {r[i][6]:>7.3f}" for r in replays) + mark)
            if args.replay_json:
                args.replay_json.write_text(json.dumps({"cos0_sn": cos0_sn.numpy().round(5).tolist(),
                                                        "first_rn": first_rn.astype(int).tolist(), "every": every}))
            print("the baseline's last picture after a fixed number of steps (same targets):")
            print(f"{'steps':>9} {'cosine':>7} {'own-1st':>7}")
            for step, (cos, first) in scored.items():
                if step and (step % (2 * every) == 0 or step == n_max):
                    print(f"{step:>9} {float(cos.mean()):>7.4f} {float(first.float().mean()):>7.3f}")
            print(f"\n{HEADER}")
            print(format_row(rows[0]))

        # 2. The new defaults: continuous batching, stopping, auto sizing, compile.
        idx = list(range(n_speed))
        result, wall, peak, warm, inv = run_engine(bench, new, n_slots, idx, compile_new, cfg.prefer_own_first)
        n_ts = result.n_target_steps
        # Steady state: the engine's time per target-step while every slot was busy (not the start-up or the
        # tail of this one short run, which a whole atlas of many units mostly does not have).
        ms_ts = result.steady_ms_per_target_step or 1000 * wall / max(n_ts, 1)
        mean_steps = n_ts / len(idx)
        q_new = quality(bench, result.images_b3hw[q_idx], q_idx)
        compiled = "compiled" if inv.compiled else "eager"
        rows.append(Row(f"new defaults ({n_slots} slots, {vpp} views/pass, ≤{new.n_steps} steps, stop "
                        f"{new.min_steps}/{new.stop_window}/{new.stop_delta}{' +prefer-own' if cfg.prefer_own_first else ''}"
                        f"{' +stop-own' if new.stop_own_first else ''}, "
                        f"local {new.local_size or 'full'}, {compiled})", ms_ts, mean_steps,
                        3.6e6 / (ms_ts * mean_steps), 3600 * len(idx) / wall,
                        view_flops(shape, new) * new.n_views / (ms_ts * 1e-3) / 1e12, peak, *q_new,
                        note=f"{len(idx)} targets in {wall:.1f} s; warm-up/compile {warm:.1f} s; steps "
                             f"min/median/max {int(result.steps_b.min())}/{int(result.steps_b.median())}/"
                             f"{int(result.steps_b.max())}"))

        # 3. Variants, eager on the quality targets, next to the new defaults eager.
        variants = [v for v in args.variants.split(",") if v and v != "none"] if device.type == "cuda" or args.quick else []
        if variants:
            res, wall_ref, peak, _, _ = run_engine(bench, new, n_slots, q_idx, False, cfg.prefer_own_first)
            ref_ms = res.steady_ms_per_target_step or 1000 * wall_ref / max(res.n_target_steps, 1)
            rows.append(Row("  new defaults, eager (quality targets)", ref_ms, res.n_target_steps / len(q_idx),
                            3.6e6 / (ref_ms * res.n_target_steps / len(q_idx)), None,
                            view_flops(shape, new) * new.n_views / (ref_ms * 1e-3) / 1e12, peak,
                            *quality(bench, res.images_b3hw, q_idx)))
            for name in variants:
                change = {"local0": {"local_size": 0}, "local96": {"local_size": 96 if not args.quick else 48},
                          "views6": {"n_views": 6}, "noprefer": {}, "stopfirst": {"stop_own_first": True},
                          "views4": {"n_views": 4}}.get(name)
                if change is None:
                    print(f"unknown variant {name!r} (known: {', '.join(VARIANTS)}): skipped")
                    continue
                settings = replace(new, **change)
                own_first = cfg.prefer_own_first and name != "noprefer"
                res, wall_v, peak, _, _ = run_engine(bench, settings, n_slots, q_idx, False, own_first)
                v_ms = res.steady_ms_per_target_step or 1000 * wall_v / max(res.n_target_steps, 1)
                v_steps = res.n_target_steps / len(q_idx)
                # Compiled speed estimated from the eager ratio against the new defaults' eager run.
                est_ms = rows[1].ms_per_target_step * v_ms / ref_ms
                what = ', '.join(f'{k}={v}' for k, v in change.items()) or f"prefer_own_first={own_first}"
                rows.append(Row(f"  + {name} ({what}), eager", v_ms,
                                v_steps, 3.6e6 / (v_ms * v_steps), None,
                                view_flops(shape, settings) * settings.n_views / (v_ms * 1e-3) / 1e12, peak,
                                *quality(bench, res.images_b3hw, q_idx),
                                note=f"as compiled (eager ratio × new defaults): ~{est_ms:.2f} ms/target-step, "
                                     f"~{3.6e6 / (est_ms * v_steps):,.0f} targets/h, "
                                     f"~{ATLAS_TARGETS / (3.6e6 / (est_ms * v_steps)):.2f} h for the atlas"))

        # 4. Report.
        print(f"\n== results ({gpu}; quality on the same {n_quality} feature targets)")
        print(HEADER)
        for r in rows:
            print(format_row(r))
        b, n = rows[0], rows[1]
        print(f"\nspeed-up of the new defaults: {b.ms_per_target_step / n.ms_per_target_step:.2f}× per target-step, "
              f"{n.targets_per_hour / b.targets_per_hour:.2f}× targets/hour (steady state); measured in this run "
              f"{n.measured_targets_per_hour:,.0f} targets/h including the tail of one {len(idx)}-target unit")
        ok = n.mean_cosine >= b.mean_cosine and n.own_first >= b.own_first
        print(f"quality: baseline cosine {b.mean_cosine:.4f}, own-first {b.own_first:.3f}; new cosine "
              f"{n.mean_cosine:.4f}, own-first {n.own_first:.3f} → {'OK (not lower)' if ok else 'LOWER than the baseline'}")
        goal = n.targets_per_hour >= 33_000
        print(f"goal ≥ 33,000 targets/h at the default settings: {'met' if goal else 'not met'} "
              f"({n.targets_per_hour:,.0f}/h, {n.atlas_hours:.2f} h for 12,288 × 4)")

        print(f"\ntotal benchmark time {time.perf_counter() - t_start:.0f} s")
        if args.json:
            args.json.write_text(json.dumps([{**r.__dict__, "atlas_hours": r.atlas_hours} for r in rows], indent=1))


if __name__ == "__main__":
    main()
