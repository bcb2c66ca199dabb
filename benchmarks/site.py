"""Benchmark of the site stage on a synthetic store (made by atlasgen.testing) at the real scale.

    python benchmarks/site.py            # 12,288 features, 4 seeds each, 20,000 images, 2,500 on the map
    python benchmarks/site.py --quick    # 2,048 features, 400 on the map (under a minute)

Prints the site build time, pages/s and the site size per feature, against a baseline measured in the same
run: writing the same number of files of the same total size with plain Python (the floor any site
generator pays). The map is the layout stage's real tile pyramid (`write_map`, the default 120×120 grid of
64 px cells) over the strongest features, placed by the stage's own grid assignment on random positions.
Then the whole site (every file, the Query page's DuckDB-WASM engine included when it is installed) is
checked against what static hosts serve (`HOST_LIMITS`: file count, size of the largest file, files in the
fullest folder, total size); each limit prints pass/FAIL, and the exit status is 1 when any fails.
The pictures are fake (a few distinct small WebP files written many times): fine for timing, not for looking.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from atlasgen.site.hosting import MiB, check_host_limits, site_figures  # noqa: E402
from atlasgen.testing import make_synthetic_store  # noqa: E402


def _baseline_write(n_files: int, total_bytes: int, folder: Path) -> float:
    """Seconds to write n_files files of total_bytes in plain Python: the floor for any generator."""
    payload = b"x" * max(1, total_bytes // max(1, n_files))
    t0 = time.perf_counter()
    for i in range(n_files):
        sub = folder / f"{i % 64:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"{i}.html").write_bytes(payload)
    return time.perf_counter() - t0


def _dir_size(folder: Path) -> tuple[int, int]:
    n, size = 0, 0
    for root, _, files in os.walk(folder):
        for name in files:
            n += 1
            size += os.path.getsize(os.path.join(root, name))
    return n, size


def place_on_map(store, n_map: int) -> dict:
    """The layout stage's map for a synthetic store: the `n_map` strongest live features on the default grid
    (positions drawn at random, cells by the stage's assignment), its feature_map rows and its tile pyramid."""
    import numpy as np
    import pyarrow as pa
    from atlasgen.config import LayoutConfig
    from atlasgen.stages.layout import assign_grid, write_map
    cfg = LayoutConfig(n_map_features=n_map)
    feats = store.feature_ranking()
    live = feats["n_active"] > 0
    live_ids = feats["feature_id"][live]
    xy_n2 = np.random.default_rng(0).normal(size=(len(live_ids), 2))
    order = np.lexsort((live_ids, -feats["strength"][live]))[:min(n_map, len(live_ids))]
    cells_m2 = assign_grid(xy_n2[order], cfg.grid_side)
    grid_x = np.full(len(live_ids), -1, np.int64)
    grid_y = np.full(len(live_ids), -1, np.int64)
    grid_x[order], grid_y[order] = cells_m2[:, 0], cells_m2[:, 1]
    store.replace_feature_map({
        "feature_id": pa.array(live_ids.astype(np.int32)), "umap_x": pa.array(xy_n2[:, 0]),
        "umap_y": pa.array(xy_n2[:, 1]), "grid_x": pa.array(grid_x, mask=grid_x < 0).cast(pa.int32()),
        "grid_y": pa.array(grid_y, mask=grid_y < 0).cast(pa.int32())})
    labels = dict(zip(feats["feature_id"].tolist(), feats["label"]))
    placed = live_ids[order]
    tiles = write_map(store, cfg, placed, cells_m2, [labels.get(int(f)) for f in placed])
    return {"n_placed": len(placed), "grid_side": cfg.grid_side, **tiles}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,048 features instead of 12,288 (under a minute)")
    parser.add_argument("--no-search", action="store_true", help="skip the Pagefind index")
    parser.add_argument("--keep", type=Path, default=None, help="build into this folder and keep it")
    parser.add_argument("--no-sql", action="store_true", help="leave the Query page (and its DuckDB-WASM engine) out")
    parser.add_argument("--n-map", type=int, default=None,
                        help="features on the map (default 2,500; 400 with --quick; 0: no map)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from atlasgen.stages import site
    from atlasgen.config import SiteConfig
    from atlasgen.progress import set_quiet
    from atlasgen.store import Store

    n_features = 2048 if args.quick else 12_288
    n_images = 4000 if args.quick else 20_000
    work = args.keep or Path(tempfile.mkdtemp(prefix="atlasgen-site-bench-"))
    set_quiet(True)
    t0 = time.perf_counter()
    make_synthetic_store(work, n_features=n_features, n_images=n_images, n_labels=100, n_seeds=4, n_pairs=6,
                         slerp_steps=11, hostile=False)
    print(f"synthetic store: {n_features:,} features, {n_images:,} images in {time.perf_counter() - t0:.1f}s")
    n_map = args.n_map if args.n_map is not None else (400 if args.quick else 2500)
    with Store.open(work) as store:
        if n_map:
            t0 = time.perf_counter()
            placed = place_on_map(store, n_map)
            print(f"map: {placed['n_placed']:,} features on a {placed['grid_side']}×{placed['grid_side']} grid, "
                  f"{placed['n_tiles']:,} tiles in {placed['n_levels']} levels ({time.perf_counter() - t0:.1f}s, "
                  "the layout stage's tiling; not part of the site time)")
        t0 = time.perf_counter()
        summary = site.run(SiteConfig(search_index=not args.no_search, sql=not args.no_sql), store)
        seconds = time.perf_counter() - t0
        n_files, size = _dir_size(store.paths.site_dir)
        html = list(store.paths.site_dir.rglob("*.html"))
        html_bytes = sum(p.stat().st_size for p in html)
    baseline_dir = Path(tempfile.mkdtemp(prefix="atlasgen-site-baseline-"))
    baseline = _baseline_write(len(html), html_bytes, baseline_dir)
    shutil.rmtree(baseline_dir)
    print(f"site stage: {seconds:.1f}s for {len(html):,} pages -> {len(html) / seconds:,.0f} pages/s "
          f"(page-phase {summary.get('seconds_pages', 0):.1f}s, search index {summary.get('seconds_search', 0):.1f}s)")
    print(f"baseline (plain writes of the same {len(html):,} files): {baseline:.2f}s -> site stage is "
          f"{seconds / baseline:.0f}x the floor")
    print(f"site: {n_files:,} files, {size / 1e6:.1f} MB, {size / n_features / 1e3:.1f} kB per feature "
          f"(HTML {html_bytes / n_features / 1e3:.1f} kB per feature)")
    biggest = max(html, key=lambda p: p.stat().st_size)
    print(f"largest page: {biggest.relative_to(store.paths.site_dir)} {biggest.stat().st_size / 1e3:.0f} kB")
    figures = site_figures(store.paths.site_dir)
    print(f"whole site: {figures['n_files']:,} files, {figures['total_bytes'] / MiB:.1f} MiB; largest file "
          f"{figures['largest_path']} ({figures['largest_bytes'] / MiB:.1f} MiB); fullest folder "
          f"{figures['fullest_dir']}/ ({figures['fullest_dir_files']:,} files)")
    print("largest files: " + ", ".join(f"{p} {b / MiB:.1f} MiB" for b, p in figures["largest_files"]))
    print("files by top folder: " + ", ".join(f"{k} {v:,}" for k, v in figures["files_by_folder"].items()))
    print(f"query page (DuckDB-WASM engine in the site): {'yes' if summary.get('query_page') else 'no'}")
    print("static host limits checked:")
    failed = 0
    for host, what, limit, measured, ok in check_host_limits(figures):
        failed += not ok
        print(f"  {'pass' if ok else 'FAIL'}  {host}: {what} <= {limit:,} (site: {measured:,})")
    if args.keep is None:
        shutil.rmtree(work)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
