"""The static web site: presentation only, read from the store (the site stage, `atlasgen/stages/site.py`,
calls `pages.build`).

- `core`: the Jinja environment and filters, the page writer, the Content-Security-Policy;
- `charts`: every SVG chart;
- `assets`: files into the site (one copier) and the WebP size parser;
- `data`: what the pages read, through typed `Store` methods;
- `pages`: the page table (page → writer, navigation title; which stage provides which page) and one
  module per page.
"""
from .assets import decomposition_css
from .core import csp_header, csp_meta, make_env, url_path

__all__ = ["csp_header", "csp_meta", "decomposition_css", "make_env", "url_path"]
