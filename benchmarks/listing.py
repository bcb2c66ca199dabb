"""Ingest's folder listing: today's (each folder's entries sorted by name, a subfolder listed where its name
falls) against the one it replaced (os.walk, every path split into its parts, one global sort), on a folder laid
out like ImageNet train (class folders of files; empty files, as the listing reads names only).

    python benchmarks/listing.py --n-classes 200 --per-class 1000

Prints seconds (best of --rounds, alternating) and Python's peak allocation while listing (tracemalloc, a
separate pass), both at N/4 and N files, and checks that both give the same list.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

from atlasgen.stages.ingest import _is_ignored, _walk_files


def walk_before(folder: Path, skip: Path | None = None) -> list[str]:
    """The listing as it was before (kept here as the baseline)."""
    out: list[list[str]] = []
    top = os.fspath(folder)
    skip_name = skip.name if skip is not None else None
    for root, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not _is_ignored(d) and not (d == skip_name and Path(root, d) == skip))
        prefix = "" if root == top else os.path.relpath(root, top).replace(os.sep, "/") + "/"
        out.extend((prefix + f).split("/") for f in files if not _is_ignored(f))
    out.sort()
    return ["/".join(parts) for parts in out]


def make_tree(root: Path, n_classes: int, per_class: int) -> None:
    for c in range(n_classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"n{c:08d}_{i}.JPEG").touch()


def measure(folder: Path, rounds: int) -> dict[str, tuple[float, float]]:
    """name → (best seconds, peak MiB)."""
    seconds = {"before": [], "today": []}
    for _ in range(rounds):
        for name, fn in (("before", walk_before), ("today", _walk_files)):
            t0 = time.perf_counter()
            fn(folder)
            seconds[name].append(time.perf_counter() - t0)
    peaks = {}
    for name, fn in (("before", walk_before), ("today", _walk_files)):
        tracemalloc.start()
        fn(folder)
        peaks[name] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return {name: (min(seconds[name]), peaks[name]) for name in seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-classes", type=int, default=200, help="class folders at the full size")
    parser.add_argument("--per-class", type=int, default=1000, help="files per class folder")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="atlasgen-bench-listing-") as tmp:
        results = {}
        for n_classes in (max(1, args.n_classes // 4), args.n_classes):
            folder = Path(tmp, f"c{n_classes}")
            make_tree(folder, n_classes, args.per_class)
            assert walk_before(folder) == _walk_files(folder), "the two listings differ"
            results[n_classes * args.per_class] = measure(folder, args.rounds)
    for n_files, by_name in results.items():
        (t_before, m_before), (t_today, m_today) = by_name["before"], by_name["today"]
        print(f"{n_files:>9,} files: before {t_before:.2f} s, peak {m_before:.0f} MiB; today {t_today:.2f} s, "
              f"peak {m_today:.0f} MiB; today is {t_before / t_today:.1f}× as fast, {m_before / m_today:.1f}× "
              "less memory")
    print("same list: yes")


if __name__ == "__main__":
    main()
