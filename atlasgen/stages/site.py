"""The site stage: the store → a static web site in OUT/site (the `atlasgen.site` package writes it).

Jinja2 templates (`templates/`, autoescaped, compiled once), plain CSS/JS (`site_assets/` → `site/assets/`),
pictures hard-linked from the output folder, SVG plots made at build time, and a Pagefind search index.
Everything is fetched with a few bulk reads, so 12,288 feature pages take seconds.
"""
from __future__ import annotations


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
    """Nothing to clear: `run` builds the new site beside the old one and swaps it in, so readers keep the
    old site until the new one is complete (and keep it if the run fails or is killed)."""


SPEC = Stage("site", SiteConfig, run, inputs=("layout", "probe", "toy"), folders=("site_dir",), reset=reset)
