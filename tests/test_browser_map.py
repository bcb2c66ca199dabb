"""The map page in headless Chromium: pan, zoom, hover, click, lazy tiles, URL views, #f=, phone size."""
from __future__ import annotations

import json
import math
import re
from urllib.parse import unquote

import pytest

from conftest import PageWatch, save_screenshot

pytestmark = pytest.mark.browser

# Tiles live under the map's content hash: map/<hash>/<z>/<x>_<y>.webp (layout.map_content_hash).
TILE_RE = re.compile(r"/map/[0-9a-f]{16}/(\d+)/(\d+)_(\d+)\.webp$")


@pytest.fixture
def page(browser):
    """A page narrower and lower than the tiny map at its native size (768 px), so it pans both ways (the view
    is bounded: a map smaller than the viewport along an axis is centred along it) and a view at native size
    needs only some of the finest tiles."""
    context = browser.new_context(viewport={"width": 480, "height": 640})
    pg = context.new_page()
    pg.watch = PageWatch(pg)
    yield pg
    context.close()


@pytest.fixture(scope="module")
def index(tiny_build):
    (path,) = (tiny_build / "site" / "map").glob("*/index.json")
    return json.loads(path.read_text())


def open_map(page, site_url: str, hash_: str = ""):
    page.goto(site_url + "map.html" + hash_)
    page.wait_for_selector(".map-layer img")
    wait_tiles(page)
    # Let the favicon and the like finish, so leaving the page later aborts no request.
    page.wait_for_load_state("networkidle")


def wait_tiles(page):
    page.wait_for_function("() => { const imgs = [...document.querySelectorAll('.map-layer img')];"
                           " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }")


def view_of(page) -> dict:
    page.wait_for_function("() => /x=.*&y=.*&z=/.test(location.hash)")
    parts = dict(p.split("=", 1) for p in unquote(page.evaluate("location.hash"))[1:].split("&"))
    return {k: float(v) for k, v in parts.items()}


def forget_aborted_favicon(watch) -> None:
    """Chromium fetches the favicon again at odd times; leaving the page can abort that fetch, which is not a
    fault of the page (a missing favicon would be a 404, reported as a console error, not a failed request)."""
    watch.failed[:] = [url for url in watch.failed if not url.endswith("/favicon.svg")]


def box(page) -> dict:
    return page.locator(".map-viewport").bounding_box()


def cell_centre(page, index, view: dict, x: int, y: int) -> tuple[float, float]:
    """Client coordinates of a cell's centre for a view (same geometry as map.js)."""
    b, cell = box(page), index["cell_px"]
    scale = 2 ** (view["z"] - (len(index["levels"]) - 1))
    return (b["x"] + b["width"] / 2 + ((x + 0.5) * cell - view["x"] * cell) * scale,
            b["y"] + b["height"] / 2 + ((y + 0.5) * cell - view["y"] * cell) * scale)


def top_z(index) -> int:
    return len(index["levels"]) - 1


def centred_view(index, zoom_over_top: float = 0.0) -> str:
    side = index["grid_side"]
    return f"#x={side / 2:.2f}&y={side / 2:.2f}&z={top_z(index) + zoom_over_top:.2f}"


def test_map_page_loads_clean(page, site_url, index):
    open_map(page, site_url)
    assert page.locator(".map-layer img").count() >= 1
    assert index["grid_side"] == 16 and len(index["features"]) > 10
    # The map script is an external file (the CSP allows no inline scripts).
    assert page.locator("script[src$='assets/map.js']").count() == 1
    assert page.locator("script:not([src])").count() == 0
    page.wait_for_timeout(200)
    save_screenshot(page, "map")
    page.watch.assert_clean()


def test_drag_pans_and_updates_the_url(page, site_url, index):
    open_map(page, site_url, centred_view(index))
    before = view_of(page)
    b = box(page)
    cx, cy = b["x"] + b["width"] / 2, b["y"] + b["height"] / 2
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx - 40, cy - 20, steps=6)   # within the bounds: the map covers the view
    page.mouse.up()
    page.wait_for_function(f"() => !location.hash.startsWith('#x={before['x']:.2f}&y={before['y']:.2f}')")
    after = view_of(page)
    scale = 2 ** (before["z"] - top_z(index))
    # Dragging the picture left/up moves the view right/down by the dragged distance.
    assert after["x"] - before["x"] == pytest.approx(40 / scale / index["cell_px"], abs=0.05)
    assert after["y"] - before["y"] == pytest.approx(20 / scale / index["cell_px"], abs=0.05)
    assert after["z"] == before["z"]
    page.watch.assert_clean()


def test_wheel_zooms_about_the_pointer(page, site_url, index):
    open_map(page, site_url, centred_view(index, zoom_over_top=-1))
    before = view_of(page)
    b = box(page)
    page.mouse.move(b["x"] + b["width"] / 2, b["y"] + b["height"] / 2)
    page.mouse.wheel(0, -120)
    page.wait_for_function(f"() => !location.hash.endsWith('z={before['z']:.2f}')")
    zoomed = view_of(page)
    assert zoomed["z"] > before["z"] + 0.3
    # Zooming at the centre keeps the centre.
    assert zoomed["x"] == pytest.approx(before["x"], abs=0.02) and zoomed["y"] == pytest.approx(before["y"], abs=0.02)
    page.mouse.wheel(0, 600)
    page.wait_for_function(f"() => !location.hash.endsWith('z={zoomed['z']:.2f}')")
    assert view_of(page)["z"] < zoomed["z"]
    page.watch.assert_clean()


def test_keyboard_pans_and_zooms(page, site_url, index):
    open_map(page, site_url, centred_view(index))
    before = view_of(page)
    page.locator(".map-viewport").focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_function(f"() => !location.hash.startsWith('#x={before['x']:.2f}')")
    moved = view_of(page)
    assert moved["x"] > before["x"] and moved["y"] == before["y"]
    page.keyboard.press("-")
    page.wait_for_function(f"() => !location.hash.endsWith('z={moved['z']:.2f}')")
    out = view_of(page)
    assert moved["z"] - 0.5 - 0.01 <= out["z"] < moved["z"]   # (the whole map is as far out as it goes)
    page.keyboard.press("+")
    page.wait_for_function(f"() => !location.hash.endsWith('z={out['z']:.2f}')")
    assert view_of(page)["z"] == pytest.approx(moved["z"], abs=0.01)
    page.watch.assert_clean()


def test_pinch_zooms(page, site_url, index):
    open_map(page, site_url, centred_view(index, zoom_over_top=-2))
    before = view_of(page)
    # Two touch pointers moving apart (synthetic pointer events: Playwright has no multi-touch gesture).
    page.evaluate("""() => {
        const el = document.querySelector('.map-viewport'), r = el.getBoundingClientRect();
        const cx = r.left + r.width / 2, cy = r.top + r.height / 2;
        const ev = (type, id, x) => el.dispatchEvent(new PointerEvent(type, {pointerId: id, pointerType: 'touch',
            clientX: x, clientY: cy, bubbles: true, isPrimary: id === 1, button: 0}));
        ev('pointerdown', 1, cx - 40); ev('pointerdown', 2, cx + 40);
        for (let d = 40; d <= 160; d += 20) { ev('pointermove', 1, cx - d); ev('pointermove', 2, cx + d); }
        ev('pointerup', 1, cx - 160); ev('pointerup', 2, cx + 160);
    }""")
    page.wait_for_function(f"() => !location.hash.endsWith('z={before['z']:.2f}')")
    after = view_of(page)
    # Fingers 4× apart: two levels, up to the pictures' own size (the top level).
    assert after["z"] == pytest.approx(min(top_z(index), before["z"] + 2), abs=0.1) and after["z"] > before["z"]
    assert page.url.endswith("map.html" + page.evaluate("location.hash")), "a pinch must not open a feature"
    page.watch.assert_clean()


def test_hover_shows_id_and_label(page, site_url, index):
    view = {"x": index["grid_side"] / 2, "y": index["grid_side"] / 2, "z": float(top_z(index))}
    open_map(page, site_url, f"#x={view['x']:.2f}&y={view['y']:.2f}&z={view['z']:.2f}")
    labelled = [f for f in index["features"] if f["label"]] or index["features"]
    f = min(labelled, key=lambda f: abs(f["x"] + 0.5 - view["x"]) + abs(f["y"] + 0.5 - view["y"]))
    page.mouse.move(*cell_centre(page, index, view, f["x"], f["y"]))
    tip = page.locator(".map-tip")
    tip.wait_for(state="visible")
    assert f"#{f['id']}" in tip.inner_text()
    if f["label"]:
        assert f["label"] in tip.inner_text()
    # An empty cell (if any) shows no tip.
    taken = {(g["x"], g["y"]) for g in index["features"]}
    empty = [(x, y) for x in range(index["grid_side"]) for y in range(index["grid_side"]) if (x, y) not in taken]
    if empty:
        ex, ey = min(empty, key=lambda c: abs(c[0] + 0.5 - view["x"]) + abs(c[1] + 0.5 - view["y"]))
        page.mouse.move(*cell_centre(page, index, view, ex, ey))
        tip.wait_for(state="hidden")
    page.watch.assert_clean()


def test_click_on_a_cell_opens_its_feature_page(page, site_url, index):
    view = {"x": index["grid_side"] / 2, "y": index["grid_side"] / 2, "z": float(top_z(index))}
    open_map(page, site_url, f"#x={view['x']:.2f}&y={view['y']:.2f}&z={view['z']:.2f}")
    f = min(index["features"], key=lambda f: abs(f["x"] + 0.5 - view["x"]) + abs(f["y"] + 0.5 - view["y"]))
    # A first click shows the cell's card (its co-activating neighbours); a second opens the page.
    page.mouse.click(*cell_centre(page, index, view, f["x"], f["y"]))
    page.locator(f".map-card[data-feature='{f['id']}']").wait_for(state="visible")
    assert page.url.endswith("map.html" + page.evaluate("location.hash"))
    page.mouse.click(*cell_centre(page, index, view, f["x"], f["y"]))
    page.wait_for_url(re.compile(rf"features/{f['id']}\.html$"))
    assert str(f["id"]) in page.locator("h1").inner_text()
    # The feature page links back to its place on the map.
    assert page.locator(f"a[href='../map.html#f={f['id']}']").count() >= 1
    forget_aborted_favicon(page.watch)
    page.watch.assert_clean()


def test_tiles_load_lazily_at_the_level_of_the_zoom(page, site_url, index):
    requested: list[tuple[int, int, int]] = []
    # (level 0, the whole map in one tile, is the overview inset's picture)
    page.on("request", lambda r: requested.append(tuple(map(int, TILE_RE.search(r.url).groups())))
            if TILE_RE.search(r.url) and not TILE_RE.search(r.url).group(1) == "0" else None)
    top = top_z(index)
    open_map(page, site_url, centred_view(index))
    n_top = index["levels"][top]["n_tiles"] ** 2
    shown = int(page.locator(".map-viewport").get_attribute("data-tiles-shown"))
    assert page.locator(".map-viewport").get_attribute("data-level") == str(top)
    assert {z for z, _, _ in requested} == {top}, f"tiles of other levels requested: {requested}"
    assert len(set(requested)) == shown == page.locator(".map-layer img").count()
    # Only the tiles that cover the viewport (at most one partly seen row and column more).
    b, tile = box(page), index["tile_px"]
    cover = (math.ceil(b["width"] / tile) + 1) * (math.ceil(b["height"] / tile) + 1)
    assert shown <= cover < n_top, f"{shown} of {n_top} tiles loaded for a zoomed-in view"
    # Zooming far out switches to a coarser level (tiles of the fine level are dropped).
    requested.clear()
    b = box(page)
    page.mouse.move(b["x"] + b["width"] / 2, b["y"] + b["height"] / 2)
    page.mouse.wheel(0, 900)
    page.wait_for_function(f"() => document.querySelector('.map-viewport').dataset.level !== '{top}'")
    wait_tiles(page)
    level = int(page.locator(".map-viewport").get_attribute("data-level"))
    assert level < top and requested and {z for z, _, _ in requested} == {level}
    assert len(set(requested)) <= index["levels"][level]["n_tiles"] ** 2
    page.watch.assert_clean()


def test_a_url_with_a_view_reopens_that_view(browser, site_url, index):
    hash_ = f"#x=7.50&y=8.75&z={top_z(index) - 0.25:.2f}"   # within the bounds of a 480×640 page
    layouts = []
    for _ in range(2):
        context = browser.new_context(viewport={"width": 480, "height": 640})
        pg = context.new_page()
        open_map(pg, site_url, hash_)
        pg.wait_for_timeout(300)
        assert pg.evaluate("location.hash") == hash_, "opening a view must not move it"
        layouts.append(pg.evaluate("() => [...document.querySelectorAll('.map-layer img')].map("
                                   "i => [i.getAttribute('src'), i.style.transform, i.style.width])"))
        context.close()
    assert layouts[0] == layouts[1] and layouts[0]
    level = top_z(index)  # z = top - 0.25 draws the full-resolution tiles
    assert all(re.search(rf"map/[0-9a-f]{{16}}/{level}/", src) for src, _, _ in layouts[0])


def test_feature_hash_centres_on_the_feature(page, site_url, index):
    # The feature nearest the middle: one at the map's edge is shown as near the centre as the bounds allow.
    side = index["grid_side"]
    f = min(index["features"], key=lambda f: abs(f["x"] + 0.5 - side / 2) + abs(f["y"] + 0.5 - side / 2))
    open_map(page, site_url, f"#f={f['id']}")
    marker = page.locator(".map-marker")
    marker.wait_for(state="visible")
    mb, b = marker.bounding_box(), box(page)
    assert mb["x"] + mb["width"] / 2 == pytest.approx(b["x"] + b["width"] / 2, abs=3)
    assert mb["y"] + mb["height"] / 2 == pytest.approx(b["y"] + b["height"] / 2, abs=3)
    assert mb["width"] >= index["cell_px"] - 1, "the view zooms in on the feature (to the pictures' own size)"
    page.mouse.move(b["x"] + b["width"] / 2, b["y"] + b["height"] / 2)
    page.locator(".map-tip").wait_for(state="visible")
    assert f"#{f['id']}" in page.locator(".map-tip").inner_text()
    # An unknown feature says so instead of failing.
    page.goto(site_url + "map.html#f=999999")
    page.wait_for_selector(".map-layer img")
    assert "not on the map" in page.locator(".map-status").inner_text()
    page.watch.assert_clean()


def test_phone_sized_viewport(browser, site_url, index):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                                  device_scale_factor=2)
    pg = context.new_page()
    from conftest import PageWatch
    watch = PageWatch(pg)
    open_map(pg, site_url)
    b = pg.locator(".map-viewport").bounding_box()
    assert b["width"] <= 390 and b["height"] >= 300
    assert pg.evaluate("document.scrollingElement.scrollWidth") <= 391, "the page scrolls sideways"
    save_screenshot(pg, "map-phone")
    # The initial view shows the whole map; a tap on a cell opens its feature.
    view = {"x": index["grid_side"] / 2, "y": index["grid_side"] / 2,
            "z": top_z(index) + math.log2(0.94 * min(b["width"], b["height"]) / index["full_px"])}  # map.js FIT_SHARE
    f = min(index["features"], key=lambda f: abs(f["x"] + 0.5 - view["x"]) + abs(f["y"] + 0.5 - view["y"]))
    pg.touchscreen.tap(*cell_centre(pg, index, view, f["x"], f["y"]))
    pg.locator(f".map-card[data-feature='{f['id']}']").wait_for(state="visible")
    pg.touchscreen.tap(*cell_centre(pg, index, view, f["x"], f["y"]))
    pg.wait_for_url(re.compile(rf"features/{f['id']}\.html$"))
    forget_aborted_favicon(watch)
    watch.assert_clean()
    context.close()
