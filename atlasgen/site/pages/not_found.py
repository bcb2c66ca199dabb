"""The 404 page (`404.html`): what a static host sends, with status 404, for a path the site does not have
(Netlify and Cloudflare Pages use /404.html by themselves; `atlasgen serve` does the same)."""
from __future__ import annotations

from ..core import SiteWriter
from ..data import SiteData


def write_not_found(writer: SiteWriter, data: SiteData) -> None:
    # The host sends this page for any missing path, at any depth, so its links start at the host's root
    # ("/"): relative ones would break one folder down. The site must then be served at the host's root.
    writer.render("404.html", "404.html", {"root": "/", "page_title": "Page not found"})
