"""Layout stage timings on synthetic co-activation with planted clusters.

Times, separately: umap-learn's numba compile (a tiny UMAP fit first, paid once per process), the
UMAP of every live feature's co-activation profile, the grid assignment (strongest features onto the
grid) and the tile pyramid. Baselines measured in the same run: the grid assignment against a dense
`linear_sum_assignment` over every cell, and the stage's sparse assignment on its own.

    python benchmarks/layout.py            # 12,288 features, 2,500 on a 120×120 grid, 64 px cells
    python benchmarks/layout.py --quick    # 2,048 features, 400 on a 48×48 grid (under a minute)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlasgen.config import LayoutConfig  # noqa: E402
from atlasgen.testing import insert_synthetic, synthetic_activity  # noqa: E402
from atlasgen.stages.layout import (assign_grid, coactivation_profiles,  # noqa: E402
                             umap_layout, write_map)
from atlasgen.progress import set_quiet  # noqa: E402
from atlasgen.store import Store  # noqa: E402


CPU_SECONDS: dict[str, float] = {}


def timed(fn, *args, label: str = "", **kwargs):
    """(result, wall seconds); with a label, the process CPU seconds go to CPU_SECONDS[label] (the machine is
    shared, so wall time alone overstates the work when others are busy)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    if label:
        CPU_SECONDS[label] = time.process_time() - c0
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, finishes in under a minute")
    parser.add_argument("--exact", action="store_true",
                        help="also time UMAP on the sparse profiles (svd_dims=0) as a baseline (~6 min at full size)")
    parser.add_argument("--threads", type=int, default=1, help="numba threads (UMAP with a seed is serial anyway)")
    args = parser.parse_args()
    set_quiet(True)
    import numba
    numba.set_num_threads(max(1, min(args.threads, numba.config.NUMBA_NUM_THREADS)))
    if args.quick:
        n_features, n_images, n_clusters, n_map, side, cell, tile = 2048, 4000, 16, 400, 48, 32, 256
    else:
        n_features, n_images, n_clusters, n_map, side, cell, tile = 12288, 50000, 64, 2500, 120, 64, 256
    cfg = LayoutConfig(n_map_features=n_map, grid_side=side, cell_px=cell, tile_px=tile)

    data, t_synth = timed(synthetic_activity, n_features, n_images, n_clusters, seed=0)
    print(f"synthetic data: {n_features} features, {n_images} images, {len(data['n_images']):,} co-active pairs "
          f"({t_synth:.1f} s to generate)")

    import umap  # noqa: F401  (import time is not JIT time)
    tiny = synthetic_activity(64, 200, 4, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(tmp)
        insert_synthetic(store, tiny)
        live = tiny["n_active"] > 0
        prof = coactivation_profiles(store, tiny["feature_id"][live], tiny["n_active"][live])
        # Both paths: Euclidean on SVD dims (the default) and Hellinger on sparse rows (the baseline).
        _, t_jit_small = timed(umap_layout, prof, LayoutConfig(svd_dims=8))
        _, t_jit_sparse = timed(umap_layout, prof, LayoutConfig(svd_dims=0))
        store.close()
    t_jit_nnd = 0.0
    if n_features > 4096:  # umap-learn switches to NN-descent above 4,096 points: more kernels to compile
        blobs = np.random.default_rng(0).normal(size=(4200, 8)).astype(np.float32)
        _, t_jit_nnd = timed(umap.UMAP(n_neighbors=15, random_state=0, n_epochs=5, n_jobs=1).fit_transform, blobs)
    print(f"numba JIT (first UMAP fits on {prof.shape[0]} points, dense + sparse; NN-descent on 4,200 points): "
          f"{t_jit_small:5.1f} s + {t_jit_sparse:5.1f} s + {t_jit_nnd:5.1f} s  (paid once per process)")

    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(tmp)
        insert_synthetic(store, data)
        live = data["n_active"] > 0
        ids, n_active = data["feature_id"][live], data["n_active"][live]
        prof, t_prof = timed(coactivation_profiles, store, ids, n_active, label="profiles")
        xy, t_umap = timed(umap_layout, prof, cfg, label="umap")
        if args.quick or args.exact:
            exact_cfg = LayoutConfig(**{**cfg.__dict__, "svd_dims": 0})
            xy_exact, t_exact = timed(umap_layout, prof, exact_cfg, label="umap sparse baseline")
            exact_same, exact_rand = cluster_distances(xy_exact, data["cluster"][live])
        order = np.lexsort((ids, -data["strength"][live]))[:n_map]
        cells, t_grid = timed(assign_grid, xy[order], side, label="grid")
        t_dense = dense_assignment_seconds(xy[order], side)
        placed = ids[order]
        labels = [f"cluster {c}" for c in data["cluster"][placed]]
        tiles, t_tiles = timed(write_map, store, cfg, placed, cells, labels, label="tiles")
        same, rand = cluster_distances(xy, data["cluster"][live])
        store.close()

    print(f"profiles ({prof.shape[0]} live × {prof.nnz:,} non-zeros): {t_prof:6.2f} s")
    print(f"UMAP (hellinger as Euclidean on {cfg.svd_dims} SVD dims of √profile, n_neighbors={cfg.n_neighbors}): "
          f"{t_umap:6.1f} s")
    if args.quick or args.exact:
        print(f"  baseline: UMAP hellinger on the sparse profiles (svd_dims=0): {t_exact:6.1f} s  "
              f"(×{t_exact / t_umap:.1f}); its same-cluster/random distance ratio {exact_same / exact_rand:.2f}")
    print(f"grid assignment ({n_map} → {side}×{side}):           {t_grid:6.2f} s   "
          f"dense linear_sum_assignment baseline {t_dense:6.2f} s  (×{t_dense / max(t_grid, 1e-9):.1f})")
    print(f"tile pyramid ({side * cell}px, {tiles['n_levels']} levels, {tiles['n_tiles']} tiles): {t_tiles:6.2f} s "
          f"({tiles['n_tiles'] / t_tiles:.0f} tiles/s; placeholders, no pictures)")
    print(f"total without JIT: {t_prof + t_umap + t_grid + t_tiles:.1f} s wall")
    print("process CPU seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in CPU_SECONDS.items()))
    print(f"planted clusters: median UMAP distance same-cluster {same:.2f} vs random pairs {rand:.2f} "
          f"(ratio {same / rand:.2f})")


def dense_assignment_seconds(xy_m2: np.ndarray, side: int) -> float:
    """The naive solve: every point × every cell, one dense linear_sum_assignment."""
    from scipy.optimize import linear_sum_assignment
    from atlasgen.stages.layout import _fit_to_grid
    t0 = time.perf_counter()
    pts = _fit_to_grid(xy_m2, side)
    cx, cy = np.meshgrid(np.arange(side), np.arange(side))
    cells = np.stack([cx.ravel(), cy.ravel()], 1) + 0.5
    cost = (pts[:, None, 0] - cells[None, :, 0]) ** 2
    cost += (pts[:, None, 1] - cells[None, :, 1]) ** 2
    linear_sum_assignment(cost)
    return time.perf_counter() - t0


def cluster_distances(xy: np.ndarray, cluster: np.ndarray, n_pairs: int = 20000) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(xy), n_pairs), rng.integers(0, len(xy), n_pairs)
    d = np.linalg.norm(xy[i] - xy[j], axis=1)
    same = cluster[i] == cluster[j]
    return float(np.median(d[same & (i != j)])), float(np.median(d))


if __name__ == "__main__":
    main()
