"""The site stage: the store → a static web site in OUT/site (the `atlasgen.site` package writes it).

Jinja2 templates (`templates/`, autoescaped, compiled once), plain CSS/JS (`site_assets/` → `site/assets/`),
pictures hard-linked from the output folder, SVG plots made at build time, and a Pagefind search index.
Everything is fetched with a few bulk reads, so 12,288 feature pages take seconds.
"""
from __future__ import annotations

import shutil

from .. import paths as paths_mod
from ..config import SiteConfig
from ..site.pages import build


def run(cfg: SiteConfig, store) -> dict:
    """Write the whole site into a temp folder beside `store.paths.site_dir`, then swap it into place."""
    from ..errors import AtlasError
    for name in ("features_per_page", "chunk_size", "n_gallery", "n_decompose_auto", "n_coactive"):
        if getattr(cfg, name) < (1 if name in ("features_per_page", "chunk_size") else 0):
            raise AtlasError(f"[site] {name} = {getattr(cfg, name)} is out of range",
                             f"set [site] {name} to a positive number (default {getattr(SiteConfig(), name)})")
    with paths_mod.atomic_dir(store.paths.site_dir) as tmp_dir:
        summary = build(cfg, store, tmp_dir)
    return summary


def reset(store) -> None:
    shutil.rmtree(store.paths.site_dir, ignore_errors=True)
