"""SAE training speed: our train step (hand-written forward/backward, bf16 matrix products with fp32
master weights, fused Adam) against a plain PyTorch autograd loop, measured in the same run at the real
size (384 → 12,288) on synthetic sparse data; plus a check that bf16 does not hurt the loss.

    python benchmarks/sae.py --quick        # under a minute
    python benchmarks/sae.py                # more timed steps and a longer loss comparison

Prints examples/s per variant and the ratio to the naive fp32 autograd baseline.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from atlasgen.stages import train
from atlasgen.sae import SparseAutoencoder
from atlasgen.model import bf16_is_fast


def synthetic(n: int, d: int, n_true: int, k: int, seed: int) -> torch.Tensor:
    """Sparse non-negative mixes of random unit directions + noise, normalised so E‖x‖² = d."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_true, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.randint(0, n_true, (n, k), generator=g)
    coef = torch.rand(n, k, generator=g) + 0.5
    x = torch.zeros(n, d)
    for j in range(k):
        x += coef[:, j:j + 1] * dirs[idx[:, j]]
    x += 0.05 * torch.randn(n, d, generator=g)
    x -= x.mean(dim=0)
    return x * (d / x.pow(2).sum(dim=1).mean()).sqrt()


def naive_step(sae: SparseAutoencoder, x: torch.Tensor, l1_coeff: float, autocast: bool) -> float:
    """What a straightforward implementation does: autograd through the module, L1 × decoder norms."""
    sae.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        recon, acts = sae(x)
    mse = (recon.float() - x).pow(2).mean()
    loss = mse + l1_coeff * (acts.float() * sae.W_dec.norm(dim=1)).sum(dim=1).mean()
    loss.backward()
    return float(mse.detach())


VARIANTS = {
    # name: (step kind, dtype / autocast)
    "naive autograd fp32 (baseline)": ("naive", False),
    "naive autograd + bf16 autocast": ("naive", True),
    "ours fp32": ("ours", torch.float32),
    "ours bf16 (train default on AMX)": ("ours", torch.bfloat16),
}


def make(d: int, n_features: int, lr: float, kind: str):
    sae = train.init_sae(d, n_features, torch.Generator().manual_seed(0))
    opt = train.make_optimizer(sae, lr) if kind == "ours" else torch.optim.Adam(sae.parameters(), lr=lr)
    return sae, opt


def one_step(kind, option, sae, opt, x, l1_coeff) -> float:
    if kind == "naive":
        mse = naive_step(sae, x, l1_coeff, option)
    else:
        mse = train.sae_step(sae, x, l1_coeff, option)["mse"]
    train.project_decoder_grad(sae)
    opt.step()
    sae.normalize_decoder()
    return mse


def time_variant(name, data, d, n_features, batch, n_steps, l1_coeff) -> tuple[float, float]:
    """(examples per wall second, examples per CPU second of this process). On a shared machine the
    wall figure swings with other load; the CPU figure is steadier."""
    kind, option = VARIANTS[name]
    sae, opt = make(d, n_features, 4e-4, kind)
    g = torch.Generator().manual_seed(1)
    n_warm = 1 if n_steps <= 2 else 2
    batches = [data[torch.randint(0, len(data), (batch,), generator=g)] for _ in range(n_warm + n_steps)]
    for x in batches[:n_warm]:  # warm-up: allocator, oneDNN kernels
        one_step(kind, option, sae, opt, x, l1_coeff)
    t0, c0 = time.perf_counter(), time.process_time()
    for x in batches[n_warm:]:
        one_step(kind, option, sae, opt, x, l1_coeff)
    n = n_steps * batch
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


@torch.no_grad()
def evaluate(sae, x, l1_coeff) -> dict:
    recon, acts = sae(x)
    mse = float((recon - x).pow(2).mean())
    l1 = float(acts.sum(dim=1).mean())
    return {"mse": mse, "l0": float((acts > 0).float().sum(dim=1).mean()), "loss": mse + l1_coeff * l1}


def compare_loss(data, held_out, d, n_features, batch, n_steps, l1_coeff) -> None:
    """Same init, same batches, same schedule: naive fp32 vs ours bf16; held-out loss after n_steps."""
    results = {}
    for name in ("naive autograd fp32 (baseline)", "ours bf16 (train default on AMX)"):
        kind, option = VARIANTS[name]
        sae, opt = make(d, n_features, 1e-3, kind)
        g = torch.Generator().manual_seed(2)
        for step in range(1, n_steps + 1):
            for group in opt.param_groups:
                group["lr"] = 1e-3 * min(1.0, step / 20)
            one_step(kind, option, sae, opt, data[torch.randint(0, len(data), (batch,), generator=g)], l1_coeff)
        results[name] = evaluate(sae, held_out, l1_coeff)
        print(f"  {name:36s} held-out mse {results[name]['mse']:.4f}  L0 {results[name]['l0']:.1f}  "
              f"loss {results[name]['loss']:.4f}")
    a, b = (results[k]["loss"] for k in results)
    print(f"  loss ratio ours-bf16 / naive-fp32: {b / a:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few steps; under a minute on an idle 2-core machine")
    ap.add_argument("--d-in", type=int, default=384)
    ap.add_argument("--expansion", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d, n_features = args.d_in, args.expansion * args.d_in
    n_timed = 2 if args.quick else 10
    l1_coeff = 3e-3
    all_data = synthetic((16_384 if args.quick else 65_536) + 2048, d, n_features // 2, 16, seed=0)
    data, held_out = all_data[:-2048], all_data[-2048:]
    print(f"SAE {d} → {n_features}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"AMX/bf16 fast: {bf16_is_fast(torch.device('cpu'))}")
    speeds = {}
    for name in VARIANTS:
        speeds[name] = wall, cpu = time_variant(name, data, d, n_features, args.batch, n_timed, l1_coeff)
        base_wall, base_cpu = speeds["naive autograd fp32 (baseline)"]
        print(f"  {name:36s} {wall:7.0f} examples/s (×{wall / base_wall:.2f})   "
              f"{cpu:7.0f} examples/CPU-s (×{cpu / base_cpu:.2f})")
    n_cmp = 20 if args.quick else 200
    cmp_batch = 512 if args.quick else 1024
    print(f"loss after {n_cmp} steps at batch {cmp_batch} (same init and batches):")
    compare_loss(data, held_out, d, n_features, cmp_batch, n_cmp, l1_coeff)


if __name__ == "__main__":
    np.random.seed(0)
    main()
