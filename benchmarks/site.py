"""Benchmark of the site stage on a synthetic store (made by atlasgen.testing).

    python benchmarks/site.py            # 12,288 features, 4 seeds each, 20,000 images
    python benchmarks/site.py --quick    # 2,048 features (under a minute)

Prints pages/s and the site size per feature, against a baseline measured in the same run: writing the
same number of files of the same total size with plain Python (the floor any site generator pays).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,048 features instead of 12,288 (under a minute)")
    parser.add_argument("--no-search", action="store_true", help="skip the Pagefind index")
    parser.add_argument("--keep", type=Path, default=None, help="build into this folder and keep it")
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
    with Store.open(work) as store:
        t0 = time.perf_counter()
        summary = site.run(SiteConfig(search_index=not args.no_search), store)
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
    if args.keep is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
