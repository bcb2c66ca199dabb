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
from .base import Stage


def run(cfg: SiteConfig, store) -> dict:
    """Write the whole site into a temp folder beside `store.paths.site_dir`, then swap it into place."""
    with paths_mod.atomic_dir(store.paths.site_dir) as tmp_dir:
        summary = build(cfg, store, tmp_dir)
    return summary


def reset(store) -> None:
    shutil.rmtree(store.paths.site_dir, ignore_errors=True)


SPEC = Stage("site", SiteConfig, run, inputs=("layout", "probe", "toy"), folders=("site_dir",), reset=reset)
