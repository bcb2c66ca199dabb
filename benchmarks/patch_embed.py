"""The model's patch embedding on a CPU: the convolution (today's, oneDNN) against the same sums as one GEMM
(`model.PatchConv2d`, what every stage's model uses on a CPU now), in one run, alternating rounds.

Prints, per shape and dtype, milliseconds for the patch embedding alone (forward, and forward + backward to
the pixels as the render stage needs), then the whole render loop (`inversion.invert`, the tiny preset's
settings: 64 targets × 2 views of 112 px, the transformer generator) in ms per target-step with each, and the
ratio; the final cosines must agree (the two differ only in float rounding).

    python benchmarks/patch_embed.py            # ~3 minutes on our 2-core box
    python benchmarks/patch_embed.py --quick    # ~1 minute

On a GPU the module is the convolution (cuDNN) where gradients are needed (render), so there is nothing to
compare there; without them (embed) it is the GEMM, for start-up: `benchmarks/cuda_first_calls.py`.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlasgen.inversion import InversionSettings, invert  # noqa: E402
from atlasgen.model import PatchConv2d, load_embedding_model  # noqa: E402

# (what, views per pass, side in px, hidden size): the tiny preset's render pass and ViT-S/16's.
SHAPES = (("tiny render pass", 128, 112, 96), ("ViT-S/16, 64 views", 64, 224, 384))


def best_ms(fn, n: int) -> float:
    fn()  # warm-up (oneDNN picks its kernels on the first call)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def patch_embedding(n_rounds: int) -> None:
    print("patch embedding alone (best of rounds, ms):")
    for what, n_views, side, hidden in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(0)
            conv = torch.nn.Conv2d(3, hidden, kernel_size=16, stride=16).to(dtype).requires_grad_(False)
            gemm = PatchConv2d(3, hidden, kernel_size=16, stride=16).to(dtype).requires_grad_(False)
            gemm.load_state_dict(conv.state_dict())
            x = torch.rand(n_views, 3, side, side, generator=gen).to(dtype).requires_grad_(True)

            def forward(module):
                with torch.no_grad():
                    module(x)

            def backward(module):
                module(x).sum().backward()
                x.grad = None

            row = []
            for name, fn in (("forward", forward), ("forward+backward", backward)):
                ms_conv = best_ms(lambda: fn(conv), n_rounds)
                ms_gemm = best_ms(lambda: fn(gemm), n_rounds)
                row.append(f"{name} {ms_conv:.1f} → {ms_gemm:.1f} ({ms_conv / ms_gemm:.2f}×)")
            print(f"  {what}, {str(dtype).replace('torch.', '')}: " + "; ".join(row))


def render_loop(n_rounds: int, n_steps: int) -> None:
    model = load_embedding_model("tiny", "cpu", "fp32", models_dir=Path(tempfile.mkdtemp(prefix="patch-bench-")))
    settings = InversionSettings(param="transformer", n_views=2, n_steps=n_steps, size=64, max_views_per_pass=256,
                                 local_size=0)
    directions_bd = torch.randn(64, model.dim, generator=torch.Generator().manual_seed(0))
    patch = model.backbone.embeddings.patch_embeddings
    ms: dict[str, list[float]] = {"convolution": [], "GEMM": []}
    cos: dict[str, float] = {}
    for _ in range(n_rounds):
        for name, cls in (("convolution", torch.nn.Conv2d), ("GEMM", PatchConv2d)):
            patch.__class__ = cls
            t0 = time.perf_counter()
            result = invert(model, directions_bd, list(range(64)), settings)
            ms[name].append(1000 * (time.perf_counter() - t0) / result.n_target_steps)
            cos[name] = float(result.cosine_b.mean())
            print(f"    {name}: {ms[name][-1]:.2f} ms per target-step", flush=True)
    conv, gemm = statistics.median(ms["convolution"]), statistics.median(ms["GEMM"])
    print(f"render loop, tiny preset settings, {torch.get_num_threads()} torch thread(s), median of {n_rounds}: "
          f"convolution {conv:.2f} ms per target-step, GEMM {gemm:.2f} ({conv / gemm:.2f}×); mean final cosine "
          f"{cos['convolution']:.4f} vs {cos['GEMM']:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and render steps")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    patch_embedding(3 if args.quick else 5)
    render_loop(2 if args.quick else 3, 12 if args.quick else 24)


if __name__ == "__main__":
    main()
