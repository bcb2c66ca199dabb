"""What static hosts serve, and how a built site measures against it: used by the site stage (one line per
limit a site is over, in its summary too) and by `benchmarks/site.py`."""
from __future__ import annotations

import heapq
import os
from pathlib import Path

MiB = 1 << 20
# What static hosts serve (checked 2026-11): (host, what, limit, measure). `measure` names a figure of
# `site_figures`. Sources: Cloudflare Pages limits (developers.cloudflare.com/pages/platform/limits: Free plan
# 20,000 files per site, 100,000 on paid plans since 2026-01; 25 MiB per file); Netlify (docs.netlify.com/site-deploys/overview:
# no limit on files per deploy, 54,000 files per directory; "files over 10 MB are not well supported by our
# CDN" in its build notes); GitHub Pages (published site at most 1 GB; git refuses files over 100 MiB).
HOST_LIMITS = (
    ("Cloudflare Pages (Free)", "files per site", 20_000, "n_files"),
    ("Cloudflare Pages (paid)", "files per site", 100_000, "n_files"),
    ("Cloudflare Pages", "bytes per file", 25 * MiB, "largest_bytes"),
    ("Netlify", "files per directory", 54_000, "fullest_dir_files"),
    ("Netlify", "bytes per file (CDN upload)", 10 * 1000 * 1000, "largest_bytes"),
    ("GitHub Pages", "bytes in the site", 1000 * 1000 * 1000, "total_bytes"),
    ("GitHub Pages", "bytes per file", 100 * MiB, "largest_bytes"),
)


def site_figures(folder: Path) -> dict:
    """Every file under `folder`: count, total bytes, the largest file and the fullest directory."""
    fullest, fullest_dir = 0, ""
    by_top: dict[str, int] = {}
    sizes: list[tuple[int, str]] = []
    for root, _, files in os.walk(folder):
        rel_root = os.path.relpath(root, folder)
        if len(files) > fullest:
            fullest, fullest_dir = len(files), rel_root
        top = Path(rel_root).parts[:1]
        key = f"{top[0]}/" if top and top[0] != "." else "(top level)"
        by_top[key] = by_top.get(key, 0) + len(files)
        sizes += [(os.path.getsize(os.path.join(root, name)), os.path.normpath(os.path.join(rel_root, name)))
                  for name in files]
    largest = heapq.nlargest(5, sizes)
    return {"n_files": len(sizes), "total_bytes": sum(size for size, _ in sizes),
            "largest_bytes": largest[0][0] if largest else 0, "largest_path": largest[0][1] if largest else "",
            "fullest_dir_files": fullest, "fullest_dir": fullest_dir,
            "files_by_folder": dict(sorted(by_top.items(), key=lambda kv: -kv[1])),
            "largest_files": largest}


def check_host_limits(figures: dict) -> list[tuple[str, str, int, int, bool]]:
    """(host, what, limit, measured, ok) for every limit in HOST_LIMITS."""
    return [(host, what, limit, figures[key], figures[key] <= limit) for host, what, limit, key in HOST_LIMITS]


def hosting_notes(site_dir: Path) -> tuple[dict, list[str]]:
    """(figures, one line per host limit the site is over, naming the file or folder and what to do)."""
    figures = site_figures(site_dir)
    where = {"largest_bytes": f" ({figures['largest_path']})", "fullest_dir_files": f" ({figures['fullest_dir']}/)"}
    notes = []
    for host, what, limit, key in HOST_LIMITS:
        if figures[key] <= limit:
            continue
        hint = ("the Query page's engine: `[site] sql = false` leaves it out"
                if key == "largest_bytes" and "duckdb" in figures["largest_path"] else
                "fewer seeds or features (`[render] n_seeds`, `features`), or another host")
        notes.append(f"site: over {host}'s {what}: {figures[key]:,} > {limit:,}{where.get(key, '')}; {hint}")
    return figures, notes
