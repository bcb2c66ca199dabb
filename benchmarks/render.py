"""Render (inversion) speed on the real DINOv3 ViT-S/16 shape with random weights.

Prints, measured in the same run: seconds per optimisation step per target and targets per hour at the
default step count, for one target in fp32 (the baseline), a batch of targets in fp32, and the same in bf16;
the speed-ups of batching and of bf16 over one-target fp32; and the mean final cosine reached at the default
step count (a few steps with --quick).

    python benchmarks/render.py            # ~10+ minutes on 2 CPU cores
    python benchmarks/render.py --quick    # under a minute: few steps, small batch
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlasgen.config import RenderConfig  # noqa: E402
from atlasgen.inversion import InversionSettings, invert  # noqa: E402
from atlasgen.model import bf16_is_fast, ensure_random_model, load_embedding_model, vits16_config  # noqa: E402


def seconds_per_step(model, n_targets: int, settings: InversionSettings, n_timed: int) -> float:
    """Mean wall seconds per optimisation step for n_targets together (the first step is a warm-up)."""
    stamps: list[float] = []
    dirs = torch.randn(n_targets, model.dim, generator=torch.Generator().manual_seed(0))
    run = InversionSettings(**{**settings.__dict__, "n_steps": n_timed + 1})
    invert(model, dirs, list(range(n_targets)), run, on_step=lambda _s: stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[0]) / n_timed


def main() -> None:
    defaults = RenderConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few steps and a small batch (under a minute)")
    ap.add_argument("--batch", type=int, default=None,
                    help="targets per batch (default: render.batch_targets; 2 with --quick)")
    ap.add_argument("--views", type=int, default=defaults.n_views, help="augmented views per target per step")
    ap.add_argument("--steps", type=int, default=None, help="steps for the final-cosine run (default render.n_steps)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0 = time one step with all cores and with one, keep the faster: on a "
                         "busy machine one thread can be several times faster)")
    ap.add_argument("--cos-targets", type=int, default=4, help="targets in the final-cosine run")
    ap.add_argument("--no-timing", action="store_true", help="only the final-cosine run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (2 if args.quick else defaults.batch_targets)
    views = 2 if args.quick and args.views == defaults.n_views else args.views
    n_timed = 1 if args.quick else 3
    cos_steps = args.steps or (4 if args.quick else defaults.n_steps)
    settings = InversionSettings(param=defaults.param, augment=True, n_views=views, lr=defaults.lr,
                                 tv_weight=defaults.tv_weight)

    with tempfile.TemporaryDirectory() as tmp:
        path = ensure_random_model(Path(tmp) / "vits16-random", vits16_config())
        models = {"fp32": load_embedding_model(str(path), "cpu", "fp32")}
        if bf16_is_fast(torch.device("cpu")):
            models["bf16"] = load_embedding_model(str(path), "cpu", "bf16")
        else:
            print("bf16 is not fast on this CPU (no AVX-512 bf16 / AMX): fp32 only")
        if not args.threads and torch.get_num_threads() > 1:
            timings = {}
            for n_threads in (torch.get_num_threads(), 1):
                torch.set_num_threads(n_threads)
                timings[n_threads] = seconds_per_step(models["fp32"], 1, settings, 1)
            torch.set_num_threads(min(timings, key=timings.get))
            print("threads: " + ", ".join(f"{n}: {t:.2f} s/step" for n, t in timings.items()))
        print(f"ViT-S/16 random weights, 224 px, {views} views/target/step, transformer+aug, "
              f"{torch.get_num_threads()} threads")
        rows = [] if not args.no_timing else [(p, 1, 1.0) for p in reversed(list(models))]
        for precision, model in (models.items() if not args.no_timing else ()):
            for n in (1, batch):
                sec = seconds_per_step(model, n, settings, n_timed)
                rows.append((precision, n, sec / n))
                print(f"  {precision} {n:3d} target(s): {sec:.2f} s/step  {sec / n:.3f} s/step/target", flush=True)
        base = rows[0][2]
        if not args.no_timing:
            print(f"\nper target, at n_steps={defaults.n_steps} (default):")
            print(f"{'precision':>9} {'batch':>5} {'s/step/target':>14} {'targets/hour':>13} {'speed-up':>9}")
            for precision, n, per in rows:
                print(f"{precision:>9} {n:>5} {per:>14.3f} {3600 / (per * defaults.n_steps):>13.1f} "
                      f"{base / per:>8.2f}x")

        best = min(rows, key=lambda r: r[2])
        model = models[best[0]]
        n_cos = min(args.cos_targets, best[1]) if args.quick else args.cos_targets
        # Targets the model can reach: embeddings of random blocky pictures (like inverting corpus images);
        # random directions are mostly outside a random network's narrow embedding cone.
        blocks = torch.rand(n_cos, 3, 4, 4, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            dirs = model(F.interpolate(blocks, size=model.image_size, mode="nearest"))
        t0 = time.perf_counter()
        result = invert(model, dirs, list(range(n_cos)),
                        InversionSettings(**{**settings.__dict__, "n_steps": cos_steps}))
        start = invert(model, dirs, list(range(n_cos)), InversionSettings(**{**settings.__dict__, "n_steps": 0}))
        print(f"\nfinal cosine to picture embeddings after {cos_steps} steps ({best[0]}, {n_cos} targets, "
              f"{time.perf_counter() - t0:.0f} s): mean {result.cosine_b.mean():.3f} "
              f"(at init {start.cosine_b.mean():.3f})")


if __name__ == "__main__":
    main()
