"""The pipeline's stages, declared once, in order.

Each stage module ends with `SPEC = Stage(...)` (see `base.Stage`); this registry imports them statically.
Everything that needs the list of stages — the pipeline's order and hashes, the CLI's commands and input
checks, the config sections, the site's navigation and page providers — reads it from here.
"""
from __future__ import annotations

from . import embed, encode, ingest, layout, probe, render, site, toy, train
from .base import Registry, Stage

REGISTRY = Registry((ingest.SPEC, embed.SPEC, train.SPEC, encode.SPEC, render.SPEC, layout.SPEC, probe.SPEC,
                     toy.SPEC, site.SPEC))

__all__ = ["REGISTRY", "Registry", "Stage"]
