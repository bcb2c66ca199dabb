"""The site stage: the store → a static web site in OUT/site.

Jinja2 templates (`templates/`, autoescaped, compiled once), plain CSS/JS (`site_assets/` → `site/assets/`),
pictures hard-linked from the output folder, SVG plots made here at build time, and a Pagefind search index.
Everything is fetched with a few bulk queries, so 12,288 feature pages take seconds.

Other stages add pages through `site_pages(store, site_dir) -> [(template, output path, context)]`
(layout → map.html, probe → probes.html, toy → toy.html); their templates extend `_base.html`.
"""
from __future__ import annotations

import importlib
import json
import math
import re
import shutil
import struct
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, TemplateNotFound
from markupsafe import Markup, escape

from .. import paths as paths_mod
from ..config import SiteConfig
from ..progress import bar, say

# (nav label, page path relative to the site root); every one of these pages always exists.
NAV = (("Overview", "index.html"), ("Features", "features/index.html"), ("Map", "map.html"),
       ("Combinations", "combinations.html"), ("Decompositions", "decompositions.html"),
       ("Probes", "probes.html"), ("Toy", "toy.html"), ("Search", "search.html"))
# Stages whose module may contribute pages, and the nav page each one owns (placeholder if not built).
PAGE_PROVIDERS = ("layout", "probe", "toy")
PROVIDER_PAGES = {"layout": ("map.html", "Map"), "probe": ("probes.html", "Probes"), "toy": ("toy.html", "Toy")}

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


SECURITY_HEADERS = {
    "Content-Security-Policy": csp_header(),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


# --- Jinja environment and filters (all registered here) ------------------------------------------
def make_env() -> Environment:
    """The one Jinja2 environment: autoescape on, templates from `templates/`, every filter registered."""
    env = Environment(loader=FileSystemLoader(str(paths_mod.templates_dir())), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True, auto_reload=False)
    env.filters.update({
        "num": fmt_int, "fixed": fmt_fixed, "pct": fmt_pct, "url": url_path,
        "histogram_svg": histogram_svg, "line_svg": line_svg, "bar_svg": bar_svg, "minimap_svg": minimap_svg,
    })
    env.globals.update({"csp_meta": csp_meta(), "nav": NAV})
    return env


def fmt_int(value: Any) -> str:
    return "–" if value is None else f"{int(value):,}"


def fmt_fixed(value: Any, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def fmt_pct(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def url_path(path: Any) -> str:
    """Percent-encode a relative file path for an href/src (keeps '/' and '../'; '#', '?' and quotes are encoded,
    so they stay part of the file name); data: URIs pass as they are."""
    text = str(path)
    if text.startswith("data:"):
        return text
    return quote(text, safe="/.-_~")


def _svg_text(x: float, y: float, text: str, anchor: str = "start", cls: str = "axis") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" class="{cls}">{escape(text)}</text>'


def histogram_svg(counts: Iterable[int] | None, max_value: float | None = None, title: str = "activation histogram",
                  width: int = 320, height: int = 120) -> Markup:
    """Bars of `features.histogram` (20 equal bins over (0, max_value]) as inline SVG."""
    counts = [int(c) for c in (counts or [])]
    if not counts or max(counts) == 0:
        return Markup('<p class="muted">no activations</p>')
    pad_l, pad_b, pad_t = 34, 18, 6
    plot_w, plot_h = width - pad_l - 4, height - pad_b - pad_t
    top = max(counts)
    bw = plot_w / len(counts)
    parts = [f'<svg class="plot histogram" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
             f'role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>']
    for i, c in enumerate(counts):
        h = plot_h * c / top
        parts.append(f'<rect x="{pad_l + i * bw + 0.5:.1f}" y="{pad_t + plot_h - h:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                     f'height="{h:.1f}"><title>{c:,}</title></rect>')
    parts.append(f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{width - 4}" y2="{pad_t + plot_h}" class="axis-line"/>')
    parts.append(_svg_text(pad_l - 4, pad_t + 8, f"{top:,}", "end"))
    parts.append(_svg_text(pad_l - 4, pad_t + plot_h, "0", "end"))
    parts.append(_svg_text(pad_l, height - 4, "0"))
    if max_value is not None:
        parts.append(_svg_text(width - 4, height - 4, f"{max_value:.3g}", "end"))
    parts.append("</svg>")
    return Markup("".join(parts))


def line_svg(points: Iterable[tuple[float, float]], title: str = "", width: int = 320, height: int = 150,
             log_y: bool = False) -> Markup:
    """A line plot (e.g. a training curve: step → metric) as inline SVG."""
    pts = [(float(x), float(y)) for x, y in points if x is not None and y is not None and math.isfinite(float(y))]
    if log_y:
        pts = [(x, math.log10(y)) for x, y in pts if y > 0]
    if len(pts) < 2:
        return Markup('<p class="muted">not enough points to plot</p>')
    pad_l, pad_b, pad_t, pad_r = 44, 18, 20, 6
    plot_w, plot_h = width - pad_l - pad_r, height - pad_b - pad_t
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1
    if x1 == x0:
        x1 = x0 + 1

    def sx(x): return pad_l + plot_w * (x - x0) / (x1 - x0)
    def sy(y): return pad_t + plot_h * (1 - (y - y0) / (y1 - y0))
    def label(y): return f"{10 ** y:.3g}" if log_y else f"{y:.3g}"
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    parts = [f'<svg class="plot line" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
             _svg_text(pad_l, 13, title, cls="plot-title"),
             f'<polyline points="{path}" class="series"/>',
             f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{width - pad_r}" y2="{pad_t + plot_h}" class="axis-line"/>',
             f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + plot_h}" class="axis-line"/>',
             _svg_text(pad_l - 4, pad_t + 8, label(y1), "end"), _svg_text(pad_l - 4, pad_t + plot_h, label(y0), "end"),
             _svg_text(pad_l, height - 4, f"{x0:,.0f}"), _svg_text(width - pad_r, height - 4, f"{x1:,.0f}", "end"),
             "</svg>"]
    return Markup("".join(parts))


def bar_svg(value: float | None, max_value: float | None, cls: str = "bar") -> Markup:
    """A horizontal bar (value / max_value) as inline SVG: no style attribute, so the CSP needs no 'unsafe-inline'."""
    frac = 0.0 if not value or not max_value else max(0.0, min(1.0, float(value) / float(max_value)))
    return Markup(f'<svg class="{escape(cls)}" viewBox="0 0 100 6" preserveAspectRatio="none" aria-hidden="true">'
                  f'<rect class="bar-bg" width="100" height="6"/><rect width="{100 * frac:.1f}" height="6"/></svg>')


def minimap_svg(x: int | None, y: int | None, side: int | None, size: int = 96) -> Markup:
    """Where a feature sits on the map grid: a square with one dot."""
    if x is None or y is None or not side:
        return Markup("")
    cx, cy = (x + 0.5) * size / side, (y + 0.5) * size / side
    return Markup(f'<svg class="minimap" viewBox="0 0 {size} {size}" width="{size}" height="{size}" role="img" '
                  f'aria-label="map cell {x}, {y}"><rect class="minimap-bg" width="{size}" height="{size}"/>'
                  f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{max(2.5, size / side / 2):.1f}"/></svg>')


def decomposition_css() -> str:
    """CSS of the `_decomposition.html` partial, for a standalone page to inline (`atlasgen decompose --html`)."""
    return (paths_mod.site_assets_dir() / "decomposition.css").read_text()


# --- pictures --------------------------------------------------------------------------------------
def webp_size(path: Path) -> tuple[int, int] | None:
    """Width and height from a WebP header (30 bytes read), falling back to Pillow for other formats."""
    try:
        with open(path, "rb") as f:
            head = f.read(30)
    except OSError:
        return None
    if len(head) >= 30 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        chunk = head[12:16]
        if chunk == b"VP8 ":
            w, h = struct.unpack("<HH", head[26:30])
            return w & 0x3FFF, h & 0x3FFF
        if chunk == b"VP8L":
            bits = int.from_bytes(head[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X":
            return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    try:
        from PIL import Image
        with Image.open(path) as im:
            return im.size
    except Exception:  # unreadable picture: the caller shows a placeholder
        return None


@dataclass(frozen=True)
class Picture:
    src: str        # path relative to the site root
    width: int
    height: int


class PictureCopier:
    """Puts pictures from the output folder into the site (hard link, else copy), once each."""

    def __init__(self, out_dir: Path, site_dir: Path):
        self.out_dir = out_dir
        self.site_dir = site_dir
        self._done: dict[str, Picture | None] = {}
        self._made_dirs: set[Path] = set()
        self.n_missing = 0
        self.n_linked = 0
        self.n_copied = 0

    def add(self, rel_src: str | None, rel_dst: str | None = None) -> Picture | None:
        if not rel_src:
            return None
        rel_dst = rel_dst or rel_src
        if rel_dst in self._done:
            return self._done[rel_dst]
        src = self.out_dir / rel_src
        size = webp_size(src)
        if size is None:
            self.n_missing += 1
            self._done[rel_dst] = None
            return None
        dst = self.site_dir / rel_dst
        if dst.parent not in self._made_dirs:
            dst.parent.mkdir(parents=True, exist_ok=True)
            self._made_dirs.add(dst.parent)
        if paths_mod.link_or_copy(src, dst):
            self.n_linked += 1
        else:
            self.n_copied += 1
        pic = Picture(rel_dst, int(size[0]), int(size[1]))
        self._done[rel_dst] = pic
        return pic


# --- data ------------------------------------------------------------------------------------------
def _safe_tag(text: str | None) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "", text or "")[:12] or "build"


class SiteData:
    """Everything the pages need, read with a handful of bulk queries."""

    def __init__(self, store, cfg: SiteConfig, pictures: PictureCopier):
        con = store.con
        self.store, self.cfg, self.pictures = store, cfg, pictures
        self._thumbs: dict[int, Picture | None] = {}
        self._tile_bodies: dict[tuple, Any] = {}
        self.tile_body = None  # the `tile_body` macro, set by the writer
        encode_row = store.stage_row("encode")
        # Thumbnails are named by image id; the encode config hash in the folder name makes the URLs immutable.
        self.thumb_tag = _safe_tag(encode_row["config_hash"] if encode_row else None)

        cols = ("feature_id", "n_active", "frequency", "max_value", "mean_value", "q50", "q90", "q99", "histogram",
                "label", "label_name", "label_purity", "strength", "grid_x", "grid_y")
        self.features: list[dict] = [dict(zip(cols, r)) for r in con.execute(
            f"SELECT {', '.join(cols)} FROM features ORDER BY feature_id").fetchall()]
        self.by_id = {f["feature_id"]: f for f in self.features}
        grid = [max(f["grid_x"], f["grid_y"]) for f in self.features if f["grid_x"] is not None and f["grid_y"] is not None]
        self.map_side = int((store.stage_config("layout") or {}).get("grid_side") or (max(grid) + 1 if grid else 0))

        self.image_labels = dict(con.execute("SELECT image_id, label FROM images").fetchall())

        self.renders: dict[int, list[dict]] = defaultdict(list)
        self.pair_renders: list[dict] = []
        rcols = ("render_id", "kind", "feature_a", "feature_b", "image_id", "t", "seed", "variant", "path", "cosine",
                 "self_activation", "self_rank")
        for r in con.execute(f"SELECT {', '.join(rcols)} FROM renders WHERE kind IN ('feature', 'sum', 'slerp', 'orth') "
                             "ORDER BY kind, feature_a, feature_b, t, seed").fetchall():
            row = dict(zip(rcols, r))
            if row["kind"] == "feature":
                self.renders[row["feature_a"]].append(row)
            else:
                self.pair_renders.append(row)

        self.top_images: dict[int, list[tuple]] = defaultdict(list)
        for f, image_id, value in con.execute(
                "SELECT feature_id, image_id, value FROM top_images ORDER BY feature_id, rank").fetchall():
            self.top_images[f].append((image_id, value))
        self.similar: dict[int, list[tuple]] = defaultdict(list)
        for f, other, cosine in con.execute(
                "SELECT feature_id, other_id, cosine FROM similar_features ORDER BY feature_id, rank").fetchall():
            self.similar[f].append((other, cosine))
        self.coactive: dict[int, list[tuple]] = defaultdict(list)
        for f, other, n in con.execute("""
                SELECT f, other, n FROM (
                    SELECT feature_a AS f, feature_b AS other, n_images AS n FROM coactivation
                    UNION ALL SELECT feature_b, feature_a, n_images FROM coactivation)
                QUALIFY row_number() OVER (PARTITION BY f ORDER BY n DESC, other) <= ?
                ORDER BY f, n DESC, other""", [int(cfg.n_coactive)]).fetchall():
            self.coactive[f].append((other, n))
        self.probes_of: dict[int, list[tuple]] = defaultdict(list)
        for probe, f, vmax in con.execute(
                "SELECT probe, feature_id, max(value) FROM probes GROUP BY probe, feature_id ORDER BY probe").fetchall():
            self.probes_of[f].append((probe, vmax))
        self.n_images = store.count("images")

        # Each feature's picture: its best render (re-activating first, then cosine), else its top image.
        self.best: dict[int, Picture | None] = {}
        for f in self.features:
            fid = f["feature_id"]
            pic = None
            for r in sorted(self.renders.get(fid, ()), key=lambda r: (not (r["self_activation"] or 0) > 0,
                                                                         -(r["cosine"] or -2.0))):
                pic = self.render_picture(r)
                if pic:
                    break
            if pic is None and self.top_images.get(fid):
                pic = self.thumb(self.top_images[fid][0][0])
            self.best[fid] = pic

    def render_picture(self, row: dict) -> Picture | None:
        return self.pictures.add(row["path"])

    def thumb(self, image_id: int) -> Picture | None:
        if image_id not in self._thumbs:
            rel_src = self.store.paths.thumb(image_id).relative_to(self.store.paths.out_dir).as_posix()
            self._thumbs[image_id] = self.pictures.add(rel_src, f"thumbs/{self.thumb_tag}/{image_id:08d}.webp")
        return self._thumbs[image_id]

    def tile(self, fid: int, extra: str = "", root: str | None = None) -> dict:
        """A feature tile's context; with `root`, its inside pre-rendered once (pages show the same tiles a lot)."""
        f = self.by_id.get(fid, {})
        t = {"id": fid, "label": f.get("label"), "pic": self.best.get(fid), "extra": extra}
        if root is not None and self.tile_body is not None:
            key = (fid, root)
            if key not in self._tile_bodies:
                self._tile_bodies[key] = self.tile_body(t, root)
            t["body"] = self._tile_bodies[key]
        return t


# --- building ----------------------------------------------------------------------------------------
class SiteWriter:
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
        html = self.env.get_template(template).render(ctx)
        out = self.site_dir / out_rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(html, encoding="utf-8")
        self.n_pages += 1
        self.written.add(out_rel)


def run(cfg: SiteConfig, store, page_providers: tuple[str, ...] = PAGE_PROVIDERS) -> dict:
    """Write the whole site into a temp folder beside `store.paths.site_dir`, then swap it into place."""
    from ..errors import AtlasError
    for name in ("features_per_page", "chunk_size", "n_gallery", "n_decompose_auto", "n_coactive"):
        if getattr(cfg, name) < (1 if name in ("features_per_page", "chunk_size") else 0):
            raise AtlasError(f"[site] {name} = {getattr(cfg, name)} is out of range",
                             f"set [site] {name} to a positive number (default {getattr(SiteConfig(), name)})")
    with paths_mod.atomic_dir(store.paths.site_dir) as tmp_dir:
        summary = _build(cfg, store, tmp_dir, page_providers)
    return summary


def reset(store) -> None:
    """Nothing to clear: `run` builds the new site beside the old one and swaps it in, so readers keep the
    old site until the new one is complete (and keep it if the run fails or is killed)."""


def _build(cfg: SiteConfig, store, site_dir: Path, page_providers: tuple[str, ...]) -> dict:
    t0 = time.perf_counter()
    env = make_env()
    writer = SiteWriter(env, site_dir, cfg)
    _copy_assets(site_dir / "assets")
    pictures = PictureCopier(store.paths.out_dir, site_dir)
    data = SiteData(store, cfg, pictures)
    data.tile_body = env.get_template("_macros.html").module.tile_body
    t_data = time.perf_counter() - t0

    _write_feature_pages(writer, data)
    _write_listing(writer, data)
    _write_overview(writer, data)
    _write_decompositions(writer, data)
    _write_combinations(writer, data)
    _write_provider_pages(writer, store, site_dir, page_providers)
    writer.render("search.html", "search.html", {"search_index": cfg.search_index})
    t_pages = time.perf_counter() - t0

    if cfg.search_index:
        _index_search(site_dir)
    t_search = time.perf_counter() - t0 - t_pages
    return {"n_pages": writer.n_pages, "n_feature_pages": len(data.features), "n_pictures": len(pictures._done),
            "n_missing_pictures": pictures.n_missing, "n_copied_pictures": pictures.n_copied,
            "seconds_data": round(t_data, 2), "seconds_pages": round(t_pages, 2),
            "seconds_search": round(t_search, 2), "search_index": cfg.search_index}


def _copy_assets(assets_dir: Path) -> None:
    assets_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(paths_mod.site_assets_dir().iterdir()):
        if path.is_file() and not path.name.startswith(("_", ".")) and path.suffix != ".py":
            shutil.copy2(path, assets_dir / path.name)


def _feature_page_context(data: SiteData, index: int, sums: list[dict]) -> dict:
    f = data.features[index]
    fid = f["feature_id"]
    renders = []
    for r in data.renders.get(fid, ()):
        pic = data.render_picture(r)
        renders.append({**r, "pic": pic, "reactivates": (r["self_activation"] or 0) > 0})
    top = [{"image_id": i, "value": v, "label": data.image_labels.get(i), "pic": data.thumb(i)}
           for i, v in data.top_images.get(fid, ())]
    similar = [data.tile(o, f"cos {c:.2f}", "../") for o, c in data.similar.get(fid, ())]
    coactive = [data.tile(o, f"{n:,} images", "../") for o, n in data.coactive.get(fid, ())]
    combos = []
    for r in sums:
        if fid in (r["feature_a"], r["feature_b"]):
            combos.append({"a": r["feature_a"], "b": r["feature_b"], "pic": data.render_picture(r),
                           "a_label": data.by_id.get(r["feature_a"], {}).get("label"),
                           "b_label": data.by_id.get(r["feature_b"], {}).get("label")})
    prev_id = data.features[index - 1]["feature_id"] if index > 0 else None
    next_id = data.features[index + 1]["feature_id"] if index + 1 < len(data.features) else None
    return {"f": f, "renders": renders, "top": top, "similar": similar, "coactive": coactive, "combos": combos,
            "probes": data.probes_of.get(fid, []), "prev_id": prev_id, "next_id": next_id,
            "on_map": f["grid_x"] is not None, "picture": data.best.get(fid), "map_side": data.map_side}


def _write_feature_pages(writer: SiteWriter, data: SiteData) -> None:
    # Pairs are few; index them once so a feature page does not scan them all.
    sums_by_feature: dict[int, list[dict]] = defaultdict(list)
    for r in data.pair_renders:
        if r["kind"] == "sum":
            sums_by_feature[r["feature_a"]].append(r)
            if r["feature_b"] != r["feature_a"]:
                sums_by_feature[r["feature_b"]].append(r)
    template = writer.env.get_template("feature.html")
    for index in bar(range(len(data.features)), desc="feature pages", unit="page"):
        fid = data.features[index]["feature_id"]
        ctx = _feature_page_context(data, index, sums_by_feature.get(fid, []))
        out_rel = f"features/{fid}.html"
        html = template.render({"root": "../", "page_path": out_rel, "site_title": writer.cfg.title, **ctx})
        (writer.site_dir / out_rel).parent.mkdir(parents=True, exist_ok=True)
        (writer.site_dir / out_rel).write_text(html, encoding="utf-8")
        writer.n_pages += 1
        writer.written.add(out_rel)


def _write_listing(writer: SiteWriter, data: SiteData) -> None:
    """features/index.html (first page, sort/filter script), page-NNN.html (static pages), data-NNN.json."""
    cfg = writer.cfg
    per_page = max(1, int(cfg.features_per_page))
    chunk = max(1, int(cfg.chunk_size))
    feats = data.features
    n_pages = max(1, math.ceil(len(feats) / per_page))
    n_chunks = math.ceil(len(feats) / chunk)
    (writer.site_dir / "features").mkdir(parents=True, exist_ok=True)
    for c in range(n_chunks):
        rows = []
        for f in feats[c * chunk:(c + 1) * chunk]:
            pic = data.best.get(f["feature_id"])
            rows.append([f["feature_id"], f["label"] or "", round(f["frequency"] or 0.0, 6),
                         round(f["strength"] or 0.0, 6), f["n_active"] or 0,
                         pic.src if pic else None, pic.width if pic else 0, pic.height if pic else 0])
        (writer.site_dir / "features" / f"data-{c:03d}.json").write_text(
            json.dumps(rows, separators=(",", ":"), ensure_ascii=False), encoding="utf-8")

    def page_name(p: int) -> str:
        return "index.html" if p == 1 else f"page-{p:03d}.html"
    pages = [{"number": p, "href": page_name(p)} for p in range(1, n_pages + 1)]
    n_live = sum(1 for f in feats if (f["n_active"] or 0) > 0)
    for p in range(1, n_pages + 1):
        tiles = [dict(data.tile(f["feature_id"], root="../"), frequency=f["frequency"], strength=f["strength"])
                 for f in feats[(p - 1) * per_page:p * per_page]]
        writer.render("features.html", f"features/{page_name(p)}", {
            "tiles": tiles, "pages": pages, "page_number": p, "n_pages": n_pages, "n_features": len(feats),
            "n_live": n_live, "n_chunks": n_chunks, "per_page": per_page, "is_first": p == 1})


def _write_overview(writer: SiteWriter, data: SiteData) -> None:
    store, cfg = data.store, writer.cfg
    run_row = store.con.execute(
        "SELECT run_id, n_features, n_steps, mse, fvu, l0, dead_fraction, n_resampled, d_in FROM sae_runs "
        "ORDER BY created_at DESC LIMIT 1").fetchone()
    sae = dict(zip(("run_id", "n_features", "n_steps", "mse", "fvu", "l0", "dead_fraction", "n_resampled", "d_in"),
                   run_row)) if run_row else None
    curves = []
    if sae:
        metrics = store.con.execute("SELECT step, fvu, mse, l0, dead_fraction FROM sae_metrics WHERE run_id = ? "
                                    "ORDER BY step", [sae["run_id"]]).fetchall()
        for col, name, log_y in ((1, "fraction of variance unexplained", False), (2, "reconstruction MSE", True),
                                 (3, "L0 (active features per image)", False), (4, "dead fraction", False)):
            curves.append(line_svg([(m[0], m[col]) for m in metrics], name, log_y=log_y))
    labels = store.con.execute("SELECT label, count(*) n FROM images WHERE label IS NOT NULL GROUP BY label "
                               "ORDER BY n DESC, label").fetchall()
    gallery = [data.tile(f["feature_id"]) for f in sorted(
        (f for f in data.features if data.best.get(f["feature_id"]) is not None and (f["n_active"] or 0) > 0),
        key=lambda f: -(f["strength"] or 0))[:cfg.n_gallery]]
    n_live = sum(1 for f in data.features if (f["n_active"] or 0) > 0)
    writer.render("index.html", "index.html", {
        "model": (store.stage_config("embed") or {}).get("model"), "n_images": data.n_images, "labels": labels,
        "n_skipped": store.count("skipped_inputs"), "sae": sae, "curves": curves, "gallery": gallery,
        "n_features": len(data.features), "n_live": n_live, "n_renders": sum(len(v) for v in data.renders.values()),
        "n_pairs": len({(r["feature_a"], r["feature_b"]) for r in data.pair_renders if r["kind"] == "sum"})})


def _decompose_image_ids(store, cfg: SiteConfig) -> list[int]:
    if cfg.decompose_image_ids:
        wanted = [int(i) for i in cfg.decompose_image_ids]
        known = {r[0] for r in store.con.execute(
            f"SELECT image_id FROM images WHERE image_id IN ({','.join(map(str, wanted))})").fetchall()}
        missing = [i for i in wanted if i not in known]
        if missing:
            say(f"site: decompose_image_ids {missing} are not in the store; left out")
        return [i for i in wanted if i in known]
    # One image per label in turn (the lowest id of each), so the examples span the corpus.
    return [r[0] for r in store.con.execute("""
        SELECT image_id FROM (
            SELECT image_id, label, row_number() OVER (PARTITION BY label ORDER BY image_id) AS r
            FROM images WHERE image_id IN (SELECT DISTINCT image_id FROM activations))
        ORDER BY r, label NULLS LAST, image_id LIMIT ?""", [int(cfg.n_decompose_auto)]).fetchall()]


def _write_decompositions(writer: SiteWriter, data: SiteData) -> None:
    store = data.store
    image_ids = _decompose_image_ids(store, writer.cfg)
    acts: dict[int, list[tuple]] = defaultdict(list)
    if image_ids:
        for image_id, fid, value in store.con.execute(
                f"SELECT image_id, feature_id, value FROM activations WHERE image_id IN "
                f"({','.join(map(str, image_ids))}) ORDER BY image_id, value DESC, feature_id").fetchall():
            acts[image_id].append((fid, value))
    rows = dict((r[0], r[1:]) for r in store.con.execute(
        f"SELECT image_id, corpus_path, label, source FROM images WHERE image_id IN "
        f"({','.join(map(str, image_ids or [-1]))})").fetchall())
    examples = []
    for image_id in image_ids:
        corpus_path, label, source = rows[image_id]
        has_corpus = bool(corpus_path) and (store.paths.out_dir / corpus_path).is_file()
        pic = data.pictures.add(corpus_path, f"corpus/{data.thumb_tag}/{Path(corpus_path).name}") \
            if has_corpus else None
        pic = pic or data.thumb(image_id)
        image = {"image_id": image_id, "label": label, "title": f"image {image_id}" + (f" · {label}" if label else ""),
                 "src": pic.src if pic else None, "width": pic.width if pic else None,
                 "height": pic.height if pic else None}
        features = []
        for fid, value in acts.get(image_id, ()):
            fpic = data.best.get(fid)
            features.append({"feature_id": fid, "label": data.by_id.get(fid, {}).get("label"), "value": value,
                             "picture": fpic.src if fpic else None, "width": fpic.width if fpic else None,
                             "height": fpic.height if fpic else None, "href": f"features/{fid}.html"})
        examples.append({"image": image, "features": features})
    writer.render("decompositions.html", "decompositions.html", {"examples": examples})


def _write_combinations(writer: SiteWriter, data: SiteData) -> None:
    pairs: dict[tuple[int, int], dict] = {}

    def pair(a: int, b: int) -> dict:
        if (a, b) not in pairs:
            pairs[(a, b)] = {"a": data.tile(a), "b": data.tile(b), "sum": None, "slerp": {}, "orth_a": None,
                             "orth_b": None}
        return pairs[(a, b)]

    best_cos: dict[tuple, float] = {}

    def better(key: tuple, r: dict) -> bool:
        cos = r["cosine"] if r["cosine"] is not None else -2.0
        if key in best_cos and best_cos[key] >= cos:
            return False
        best_cos[key] = cos
        return True

    for r in data.pair_renders:
        a, b = r["feature_a"], r["feature_b"]
        if a is None or b is None:
            continue
        if r["kind"] == "sum" and better(("sum", a, b), r):
            pair(a, b)["sum"] = data.render_picture(r)
        elif r["kind"] == "slerp" and r["t"] is not None and better(("slerp", a, b, round(r["t"], 4)), r):
            pair(a, b)["slerp"][round(r["t"], 4)] = data.render_picture(r)
    for r in data.pair_renders:  # orth renders attach to a pair made by a sum or a slerp, in either order
        if r["kind"] != "orth" or r["feature_a"] is None or r["feature_b"] is None:
            continue
        a, b = r["feature_a"], r["feature_b"]
        if (a, b) in pairs and better(("orth", a, b), r):
            pairs[(a, b)]["orth_a"] = data.render_picture(r)
        elif (b, a) in pairs and better(("orth", a, b), r):
            pairs[(b, a)]["orth_b"] = data.render_picture(r)
        elif (a, b) not in pairs and (b, a) not in pairs and better(("orth", a, b), r):
            pair(a, b)["orth_a"] = data.render_picture(r)
    out = []
    for (a, b), p in sorted(pairs.items()):
        steps = []
        for t in sorted(p["slerp"]):
            steps.append({"t": t, "pic": p["slerp"][t],
                          "caption": f"{round(100 * (1 - t))}% #{a} + {round(100 * t)}% #{b}"})
        out.append({**p, "key": f"{a}-{b}", "steps": steps,
                    "start": min(range(len(steps)), key=lambda i: abs(steps[i]["t"] - 0.5)) if steps else 0})
    writer.render("combinations.html", "combinations.html", {"pairs": out})


def _write_provider_pages(writer: SiteWriter, store, site_dir: Path, providers: tuple[str, ...]) -> None:
    """Pages from layout/probe/toy (`site_pages`), and a "not built" page wherever one is missing."""
    for name in providers:
        try:
            module = importlib.import_module(f"atlasgen.stages.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"atlasgen.stages.{name}":
                raise
            continue
        site_pages = getattr(module, "site_pages", None)
        if site_pages is None:
            continue
        for template, out_rel, context in site_pages(store, site_dir) or []:
            try:
                writer.render(template, out_rel, context)
            except TemplateNotFound as e:  # a half-installed stage must not take the whole site down
                say(f"site: template {e.name} of the {name} stage is missing; {out_rel} shows a placeholder")
    for name, (page, title) in PROVIDER_PAGES.items():
        if page not in writer.written:
            writer.render("not_built.html", page, {"section": title, "stage": name})


def _index_search(site_dir: Path) -> None:
    """Pagefind over the feature pages (the ones marked data-pagefind-body); bundle in site/pagefind/."""
    import subprocess
    import sys
    from ..errors import AtlasError
    result = subprocess.run([sys.executable, "-m", "pagefind", "--site", str(site_dir), "--output-subdir",
                             "pagefind", "--force-language", "en", "--silent"], capture_output=True, text=True)
    if result.returncode != 0 or not (site_dir / "pagefind" / "pagefind-ui.js").exists():
        message = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise AtlasError(f"the Pagefind search index failed: {message[0]}",
                         "check that `python -m pagefind --help` works, or set [site] search_index = false")
