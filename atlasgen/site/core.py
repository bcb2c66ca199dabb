"""The site's rendering core: the one Jinja2 environment (autoescape on, every filter registered), the
page writer that gives every page its `root`, and the one Content-Security-Policy (the pages' <meta> tag,
`atlasgen serve` and netlify.toml all use it)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader

from .. import paths as paths_mod
from ..config import SiteConfig
from .charts import bar_svg, histogram_svg, line_svg, minimap_svg

# One Content-Security-Policy for the whole site: only the site itself; Pagefind compiles WebAssembly.
CSP_DIRECTIVES = (
    ("default-src", "'self'"), ("script-src", "'self' 'wasm-unsafe-eval'"), ("style-src", "'self'"),
    ("img-src", "'self' data:"), ("connect-src", "'self'"), ("object-src", "'none'"), ("base-uri", "'self'"),
    ("form-action", "'self'"), ("frame-ancestors", "'none'"),
)
# Browsers ignore these in a <meta> tag (and complain in the console), so only the HTTP header has them.
_HEADER_ONLY = {"frame-ancestors"}


def csp_header() -> str:
    """The Content-Security-Policy sent as an HTTP header (netlify.toml, `atlasgen serve`)."""
    return "; ".join(f"{k} {v}" for k, v in CSP_DIRECTIVES)


def csp_meta() -> str:
    """The same policy for the pages' <meta http-equiv> tag, so it holds on any static host."""
    return "; ".join(f"{k} {v}" for k, v in CSP_DIRECTIVES if k not in _HEADER_ONLY)


# The HTTP headers (this CSP among them) are one table in atlasgen/headers.py, for serve and netlify.toml.


# --- Jinja environment and filters (all registered here) ------------------------------------------
def make_env(nav: tuple[tuple[str, str], ...] = ()) -> Environment:
    """The one Jinja2 environment: autoescape on, templates from `templates/`, every filter registered;
    `nav` is the header's (label, page path) list (`pages.NAV` for the site)."""
    env = Environment(loader=FileSystemLoader(str(paths_mod.templates_dir())), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True, auto_reload=False)
    env.filters.update({
        "num": fmt_int, "fixed": fmt_fixed, "pct": fmt_pct, "act": fmt_act, "act_range": fmt_act_range,
        "url": url_path,
        "histogram_svg": histogram_svg, "line_svg": line_svg, "bar_svg": bar_svg, "minimap_svg": minimap_svg,
    })
    env.globals.update({"csp_meta": csp_meta(), "nav": nav})
    return env


def fmt_int(value: Any) -> str:
    return "–" if value is None else f"{int(value):,}"


def fmt_fixed(value: Any, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def fmt_act(value: Any) -> str:
    """An activation value: three decimals, but three significant digits under 0.1 (and scientific notation
    under 0.0001), so a feature that fires never reads "0.000" (ReLU/top-k activations can be tiny)."""
    if value is None or math.isnan(float(value)):
        return "–"
    return f"{value:#.3g}" if 0 < abs(value) < 0.1 else f"{value:.3f}"


def fmt_act_range(low: Any, high: Any) -> str:
    """"low–high" of activation values, or one value when both ends print the same."""
    a, b = fmt_act(low), fmt_act(high)
    return a if a == b else f"{a}–{b}"


def fmt_pct(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def url_path(path: Any) -> str:
    """Percent-encode a relative file path for an href/src (keeps '/' and '../'; '#', '?' and quotes are encoded,
    so they stay part of the file name); data: URIs pass as they are."""
    text = str(path)
    if text.startswith("data:"):
        return text
    return quote(text, safe="/.-_~")


# --- writing pages ---------------------------------------------------------------------------------
class SiteWriter:
    """Renders templates into the site folder; every page gets `root` (up to the site root), `page_path`
    and `site_title`, and is counted."""

    def __init__(self, env: Environment, site_dir: Path, cfg: SiteConfig):
        self.env, self.site_dir, self.cfg = env, site_dir, cfg
        self.n_pages = 0
        self.written: set[str] = set()

    def render(self, template: str, out_rel: str, context: dict | None = None) -> None:
        out_rel = Path(out_rel).as_posix()
        assert not out_rel.startswith(("/", "..")), f"page path {out_rel} must stay inside the site"
        depth = out_rel.count("/")
        ctx = {"root": "../" * depth, "page_path": out_rel, "site_title": self.cfg.title}
        ctx.update(context or {})
        self.write_html(out_rel, self.env.get_template(template).render(ctx))

    def write_html(self, out_rel: str, html: str) -> None:
        out = self.site_dir / out_rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(html, encoding="utf-8")
        self.n_pages += 1
        self.written.add(out_rel)
