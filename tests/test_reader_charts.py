"""The probes and toy pages as a reader sees them, on a desktop (1280×800) and a phone (390×844) screen, and
the weight of every page of the tiny site. Screenshots go to test-artifacts/.

- Probes: a feature has one colour in every chart and legend of the page (read from the computed styles),
  each line chart has a y-axis title, step labels never overlap (their boxes on screen), and on both screens
  every text is at least 11 px and nothing overflows the page sideways.
- Toy: every code of every frame is drawn inside the plot area (the canvas less its margin).
- Page weight: no page is over 300 KB before pictures; the toy's data is at most a third of what it was.
Every page is loaded with no console error and no failed request.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from conftest import PageWatch, save_screenshot

pytestmark = pytest.mark.browser

VIEWPORTS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
MIN_FONT_PX = 11
PAGE_BUDGET_BYTES = 300 * 1000
# The toy page's data before issue 13: toy/frames.json of the tiny build on main (commit a3687e3), measured
# 743,339 bytes (31 frames × 600 codes as JSON, 3 decimals). The page's data must now be at most a third.
TOY_DATA_BEFORE_BYTES = 743_339
# What a page's weight leaves out: pictures (however they are encoded) and the Query page's DuckDB-WASM
# engine, shared and fetched once by that page only (assets/duckdb/: ~33 MB of WebAssembly).
PICTURE_SUFFIXES = (".webp", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".ico", ".avif")
ENGINE_PREFIX = "assets/duckdb/"


@pytest.fixture(params=list(VIEWPORTS))
def screen(request, browser):
    """(viewport name, a fresh page at that viewport with a PageWatch at `.watch`)."""
    context = browser.new_context(viewport=VIEWPORTS[request.param])
    pg = context.new_page()
    pg.watch = PageWatch(pg)
    yield request.param, pg
    context.close()


def _open(page, url: str):
    page.goto(url, wait_until="load")
    page.wait_for_load_state("networkidle")
    return page


# --- probes -------------------------------------------------------------------------------------------
FEATURE_COLOURS_JS = """() => {
  const out = {};
  for (const el of document.querySelectorAll('[data-feature]')) {
    const cs = getComputedStyle(el);
    const colour = el.tagName.toLowerCase() === 'polyline' ? cs.stroke : cs.fill;
    const chart = el.closest('svg.probe-chart, svg.probe-bars, .probe-legend');
    const sweep = el.closest('.probe-sweep').id;
    (out[el.dataset.feature] ||= []).push({colour, sweep, where: chart ? chart.getAttribute('class') : '?'});
  }
  return out;
}"""


def test_probe_colours_match_across_charts(screen, site_url):
    name, page = screen
    _open(page, site_url + "probes.html")
    seen = page.evaluate(FEATURE_COLOURS_JS)
    assert len(seen) >= 2, "the tiny build's probes chart several features"
    colour_of = {}
    for feature, marks in seen.items():
        colours = {m["colour"] for m in marks}
        assert len(colours) == 1, f"feature {feature} has colours {colours} in {[m['where'] for m in marks]}"
        colour_of[feature] = colours.pop()
    # The test can fail: some feature is charted in more than one sweep, where a per-chart palette differs.
    sweeps_of = {f: {m["sweep"] for m in marks} for f, marks in seen.items()}
    assert max(len(s) for s in sweeps_of.values()) >= 2, sweeps_of
    if len(colour_of) <= 10:
        assert len(set(colour_of.values())) == len(colour_of), "different features, different colours"
    page.locator(".probe-chart-wrap").first.scroll_into_view_if_needed()
    save_screenshot(page, f"charts-probes-{name}")
    page.watch.assert_clean()


def _visible_boxes(page, selector: str) -> list[dict]:
    return page.evaluate("""sel => Array.from(document.querySelectorAll(sel))
        .filter(el => el.getClientRects().length > 0)
        .map(el => { const r = el.getBoundingClientRect(), svg = el.ownerSVGElement.getBoundingClientRect();
                     return {x0: r.left, x1: r.right, y0: r.top, y1: r.bottom, text: el.textContent,
                             chart: [svg.left, svg.right, svg.top, svg.bottom],
                             sweep: el.closest('.probe-sweep').id}; })""", selector)


def _overlap(a: dict, b: dict) -> bool:
    return a["x0"] < b["x1"] and b["x0"] < a["x1"] and a["y0"] < b["y1"] and b["y0"] < a["y1"]


def test_probe_axes_titled_and_labels_apart(screen, site_url):
    name, page = screen
    _open(page, site_url + "probes.html")
    charts = page.locator("svg.probe-chart:visible")
    n_charts = charts.count()
    assert n_charts >= 2
    titles = _visible_boxes(page, "svg.probe-chart .y-title")
    assert len(titles) == n_charts and all(t["text"] == "activation" for t in titles)
    ticks = _visible_boxes(page, "svg.probe-chart .y-tick")
    assert ticks and not any(_overlap(t, y) for t in titles for y in ticks if t["sweep"] == y["sweep"])
    labels = _visible_boxes(page, "svg.probe-chart .x-label") + _visible_boxes(page, "svg.probe-bars .item-label")
    assert len(labels) >= 2 * n_charts
    for sweep in {l["sweep"] for l in labels}:
        mine = [l for l in labels if l["sweep"] == sweep]
        for i, a in enumerate(mine):
            assert a["chart"][0] - 0.5 <= a["x0"] and a["x1"] <= a["chart"][1] + 0.5, f"{a['text']!r} leaves its chart"
            for b in mine[i + 1:]:
                assert not _overlap(a, b), f"{sweep}: labels {a['text']!r} and {b['text']!r} collide on the {name}"
    page.watch.assert_clean()


READABLE_JS = """() => {
  const small = [];
  for (const t of document.querySelectorAll('main svg text')) {
    if (!t.getClientRects().length) continue;
    const svg = t.ownerSVGElement, vb = svg.viewBox.baseVal;
    const scale = vb && vb.width ? svg.getBoundingClientRect().width / vb.width : 1;
    const px = parseFloat(getComputedStyle(t).fontSize) * scale;
    if (px < MIN) small.push(`svg text ${JSON.stringify(t.textContent)} at ${px.toFixed(1)}px`);
  }
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const el = n.parentElement;
    if (!n.textContent.trim() || !el || el.closest('svg') || !el.getClientRects().length) continue;
    const px = parseFloat(getComputedStyle(el).fontSize);
    if (px < MIN) small.push(`${el.tagName} ${JSON.stringify(n.textContent.trim().slice(0, 30))} at ${px}px`);
  }
  return small;
}"""


@pytest.mark.parametrize("rel", ["probes.html", "toy.html"])
def test_text_readable_and_page_fits_the_screen(screen, site_url, rel):
    name, page = screen
    _open(page, site_url + rel)
    small = page.evaluate(READABLE_JS.replace("MIN", str(MIN_FONT_PX)))
    assert not small, f"text under {MIN_FONT_PX}px on the {name}: {small[:8]}"
    width = page.evaluate("() => window.innerWidth")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= width, "the page scrolls sideways"
    wide = page.evaluate("""w => Array.from(document.querySelectorAll('main svg, main canvas, main img'))
        .filter(el => el.getClientRects().length && el.getBoundingClientRect().right > w + 0.5)
        .map(el => el.getAttribute('class') || el.tagName)""", width)
    assert not wide, f"wider than the {name} screen: {wide}"
    page.watch.assert_clean()


# --- toy ------------------------------------------------------------------------------------------------
def test_toy_points_inside_the_axes_on_every_frame(screen, site_url):
    name, page = screen
    _open(page, site_url + "toy.html")
    page.wait_for_function("() => document.querySelector('.toy').toyView !== undefined")
    page.locator(".toy-slider").fill("0")  # stops the animation
    view = page.evaluate("""() => { const v = document.querySelector('.toy').toyView, frames = [];
        for (let i = 0; i < v.n_frames; i++) frames.push(v.points(i));
        return {side: v.side, margin: v.margin, frames}; }""")
    lo, hi = view["margin"], view["side"] - view["margin"]
    assert len(view["frames"]) >= 10 and lo > 0
    for i, pts in enumerate(view["frames"]):
        outside = [p for p in pts if not (lo <= p[0] <= hi and lo <= p[1] <= hi)]
        assert not outside, f"frame {i}: {len(outside)} of {len(pts)} codes outside the axes, e.g. {outside[:3]}"
    xs = [p[0] for p in view["frames"][-1]]
    ys = [p[1] for p in view["frames"][-1]]
    # The view is fitted, not merely large: the last frame spreads over most of the plot area.
    assert max(max(xs) - min(xs), max(ys) - min(ys)) >= 0.6 * (hi - lo)
    page.locator(".toy-slider").fill(str(len(view["frames"]) - 1))
    page.locator(".toy-canvas").scroll_into_view_if_needed()
    save_screenshot(page, f"charts-toy-{name}")
    page.watch.assert_clean()


# --- page weight ----------------------------------------------------------------------------------------
def _counted(site_dir: Path, url: str) -> Path | None:
    """The site file behind a request, if it counts towards a page's weight (not a picture, not the engine)."""
    rel = unquote(urlparse(url).path).lstrip("/")
    if rel.lower().endswith(PICTURE_SUFFIXES) or rel.startswith(ENGINE_PREFIX):
        return None
    path = site_dir / (rel or "index.html")
    return path if path.is_file() else None


def _pages_to_weigh(site_dir: Path) -> list[str]:
    """Every page but the per-feature ones and the listing's numbered pages, which share a template: of
    those, the largest of each kind."""
    pages = sorted(p.relative_to(site_dir).as_posix() for p in site_dir.rglob("*.html"))
    shared = {"feature": re.compile(r"features/\d+\.html$"), "listing page": re.compile(r"features/page-\d+\.html$")}
    chosen = [p for p in pages if not any(rx.match(p) for rx in shared.values())]
    for rx in shared.values():
        same = [p for p in pages if rx.match(p)]
        if same:
            chosen.append(max(same, key=lambda p: (site_dir / p).stat().st_size))
    return chosen


def test_no_page_over_300_kb_before_pictures(browser, tiny_build, site_url):
    """A page's weight: its HTML plus every other file it fetches when opened and scrolled to its end (CSS,
    JavaScript, JSON and binary data, fonts), read from the requests the browser makes; pictures (.webp,
    .png, .jpg, .svg, ...) and the Query page's DuckDB-WASM engine (assets/duckdb/) are not counted.
    Every feature page and every numbered listing page shares its template: the largest of each is weighed."""
    site_dir = tiny_build / "site"
    pages = _pages_to_weigh(site_dir)
    assert {"probes.html", "toy.html", "index.html", "map.html"} <= set(pages)
    weights, fetched_by_page = {}, {}
    context = browser.new_context(viewport=VIEWPORTS["desktop"])
    try:
        for rel in pages:
            pg = context.new_page()
            pg.watch = PageWatch(pg)
            requested: list[str] = []
            pg.on("request", lambda r: requested.append(r.url))
            _open(pg, site_url + rel)
            pg.evaluate("window.scrollTo(0, document.body.scrollHeight)")
            pg.wait_for_load_state("networkidle")
            files = {p for p in (_counted(site_dir, u) for u in requested) if p is not None}
            assert site_dir / rel in files
            fetched_by_page[rel] = files
            weights[rel] = sum(p.stat().st_size for p in files)
            pg.watch.assert_clean()
            pg.close()
    finally:
        context.close()
    heavy = {rel: w for rel, w in weights.items() if w > PAGE_BUDGET_BYTES}
    assert not heavy, f"pages over {PAGE_BUDGET_BYTES:,} bytes before pictures: {heavy}"
    toy_data = [p for p in fetched_by_page["toy.html"] if p.parent.name == "toy"]
    assert toy_data, "the toy page fetches its frames"
    toy_bytes = sum(p.stat().st_size for p in toy_data)
    assert toy_bytes * 3 <= TOY_DATA_BEFORE_BYTES, f"toy data {toy_bytes:,} bytes: over a third of before"
