"""The map as a reader uses it (issue 13, item 2; the feature page's map inset from item 3), on a desktop
(1280×800) and a phone (390×844): the zoom stops at the finest tiles' native size, labels change with the zoom,
"find feature" flies to a feature by id and by label, the view cannot be panned off the map, the map fills a
phone, the overview inset moves the view, a click shows a cell's co-activating neighbours, the tooltip is never
stale after a zoom, and the feature page's inset shows the map. Screenshots go to test-artifacts/."""
from __future__ import annotations

import json
import re
from urllib.parse import unquote

import pytest

from conftest import PageWatch, save_screenshot

pytestmark = pytest.mark.browser

VIEWPORTS = {"desktop": {"viewport": {"width": 1280, "height": 800}},
             "phone": {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}}


@pytest.fixture(scope="module")
def index(tiny_build):
    (path,) = (tiny_build / "site" / "map").glob("*/index.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def labels(tiny_build):
    (path,) = (tiny_build / "site" / "map").glob("*/labels-*.json")
    data = json.loads(path.read_text())
    names = data["names"]
    out = []
    for r in data["features"]:
        name = names[r[3]] if r[3] >= 0 else ""
        label = f"{name} {r[4]}" if name and r[4].startswith("(") else r[4]   # "(11/16)" stands for "name (11/16)"
        out.append({"id": r[0], "x": r[1], "y": r[2], "name": name, "label": label, "neighbours": r[5]})
    return out


def test_the_map_page_is_light(tiny_build, labels):
    """Under 300 KB before pictures: the page, its styles and script, and the one data file it fetches."""
    site = tiny_build / "site"
    (labels_path,) = (site / "map").glob("*/labels-*.json")
    parts = [site / "map.html", site / "assets" / "site.css", site / "assets" / "map.css", site / "assets" / "map.js",
             labels_path]
    assert sum(p.stat().st_size for p in parts) < 300_000
    # Each placed feature is one short row (about 70 bytes at the real scale's label lengths).
    assert labels_path.stat().st_size < 120 * len(labels) + 2_000


@pytest.fixture(params=sorted(VIEWPORTS))
def reader(request, browser):
    """A fresh page at one of the two sizes, with a PageWatch at `.watch` and its size name at `.kind`."""
    context = browser.new_context(**VIEWPORTS[request.param])
    pg = context.new_page()
    pg.watch = PageWatch(pg)
    pg.kind = request.param
    yield pg
    context.close()


def open_map(page, site_url: str, hash_: str = "") -> None:
    page.goto(site_url + "map.html" + hash_)
    page.wait_for_selector(".map-viewport.ready .map-layer img")
    page.wait_for_function("() => [...document.querySelectorAll('.map-layer img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    page.wait_for_load_state("networkidle")


def view_of(page) -> dict:
    page.wait_for_function("() => /x=.*&y=.*&z=/.test(location.hash)")
    parts = dict(p.split("=", 1) for p in unquote(page.evaluate("location.hash"))[1:].split("&"))
    return {k: float(v) for k, v in parts.items()}


def settle(page) -> dict:
    """The view once the hash stops changing (map.js writes it 120 ms after the last move)."""
    page.wait_for_timeout(250)
    return view_of(page)


def top_z(index) -> int:
    return len(index["levels"]) - 1


def box(page) -> dict:
    return page.locator(".map-viewport").bounding_box()


def map_rect(page, index, view: dict) -> dict:
    """The whole map's rectangle on screen for a view (map.js's geometry)."""
    b, cell = box(page), index["cell_px"]
    s = 2 ** (view["z"] - top_z(index))
    left = b["x"] + b["width"] / 2 - view["x"] * cell * s
    top = b["y"] + b["height"] / 2 - view["y"] * cell * s
    return {"left": left, "top": top, "right": left + index["full_px"] * s, "bottom": top + index["full_px"] * s}


def label_texts(page) -> tuple[str, list[str]]:
    mode = page.locator(".map-labels").get_attribute("class")
    texts = page.evaluate("() => [...document.querySelectorAll('.map-label')].filter(e => !e.hidden)"
                          ".map(e => e.innerText.replace(/\\s+/g, ' ').trim())")
    return mode, texts


def find(page, query: str, fid: int) -> None:
    page.fill(".map-find input", query)
    page.press(".map-find input", "Enter")
    page.wait_for_function(f"() => document.querySelector('.map-viewport').dataset.flown === '{fid}'")


def drag(page, dx: float, dy: float) -> None:
    b = box(page)
    cx, cy = b["x"] + b["width"] * 0.4, b["y"] + b["height"] * 0.4
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + dx, cy + dy, steps=5)
    page.mouse.up()


def test_zoom_stops_at_the_finest_tiles_native_size(reader, site_url, index):
    top = top_z(index)
    open_map(reader, site_url, f"#x=8&y=8&z={top + 2}")
    # A link asking for more than native size opens at native size (and says so in the URL).
    assert settle(reader)["z"] == pytest.approx(top, abs=0.01)
    for _ in range(4):
        reader.click("[data-map-zoom='0.5']")
    b = box(reader)
    reader.mouse.move(b["x"] + b["width"] / 2, b["y"] + b["height"] / 2)
    reader.mouse.wheel(0, -1200)
    assert settle(reader)["z"] <= top + 1e-6
    reader.keyboard.press("+")
    assert settle(reader)["z"] <= top + 1e-6
    # The tiles on screen are the finest level, drawn at (not above) their own size: no blurred blocks.
    assert reader.locator(".map-viewport").get_attribute("data-level") == str(top)
    widths = reader.evaluate("() => [...document.querySelectorAll('.map-layer img')].map(i => "
                             "[parseFloat(i.style.width), i.naturalWidth])")
    assert widths and all(w <= nat + 1 for w, nat in widths), widths
    # Zooming out stops at the whole map.
    reader.click("[data-map-zoom='fit']")
    whole = settle(reader)
    reader.click("[data-map-zoom='-0.5']")
    assert settle(reader)["z"] == pytest.approx(whole["z"], abs=0.01)
    r = map_rect(reader, index, whole)
    assert r["right"] - r["left"] >= 0.85 * min(b["width"], b["height"]), "the whole map fills the view"
    save_screenshot(reader, f"reader-map-native-{reader.kind}")
    reader.watch.assert_clean()


def test_labels_change_with_the_zoom(reader, site_url, index, labels):
    names = {f["name"] for f in labels if f["name"]}
    assert len(names) >= 2, "the tiny corpus has labelled classes"
    open_map(reader, site_url)
    reader.wait_for_function("() => +document.querySelector('.map-viewport').dataset.labelsShown > 0")
    mode, out = label_texts(reader)
    assert "regions" in mode and out, "zoomed out, regions are named"
    assert set(out) <= names, f"region names are feature labels: {out}"
    save_screenshot(reader, f"reader-map-regions-{reader.kind}")
    # Each region's name is the most common label of its features: the commonest label overall is one of them.
    commonest = max(names, key=lambda n: sum(f["name"] == n for f in labels))
    assert commonest in out or len(out) >= 3
    f = labels[0]
    open_map(reader, site_url, f"#f={f['id']}")
    reader.wait_for_function("() => document.querySelector('.map-labels').classList.contains('cells')")
    mode, cells = label_texts(reader)
    assert cells and all(t.startswith("#") for t in cells), cells
    by_id = {g["id"]: g for g in labels}
    for t in cells:
        fid, _, name = t[1:].partition(" ")
        assert int(fid) in by_id and name == by_id[int(fid)]["name"]
    assert any(t.split(" ")[0] == f"#{f['id']}" for t in cells), "the centred feature is labelled"
    assert set(cells).isdisjoint(out), "zoomed in and zoomed out show different labels"
    save_screenshot(reader, f"reader-map-cells-{reader.kind}")
    reader.watch.assert_clean()


def test_find_a_feature_by_id_and_by_label(reader, site_url, index, labels):
    open_map(reader, site_url)
    start = {"x": index["grid_side"] / 2, "y": index["grid_side"] / 2}   # the whole map, centred
    # By id: the strongest feature far from the centre.
    f = max(labels[:20], key=lambda g: abs(g["x"] + 0.5 - start["x"]) + abs(g["y"] + 0.5 - start["y"]))
    find(reader, str(f["id"]), f["id"])
    v = settle(reader)
    assert v["f"] == f["id"] and v["z"] == pytest.approx(top_z(index), abs=0.01), "it zooms in on the feature"
    assert abs(v["x"] - (f["x"] + 0.5)) < abs(start["x"] - (f["x"] + 0.5)) or abs(v["x"] - start["x"]) < 1e-6
    marker, b = reader.locator(".map-marker").bounding_box(), box(reader)
    assert b["x"] <= marker["x"] and marker["x"] + marker["width"] <= b["x"] + b["width"] + 1
    assert b["y"] <= marker["y"] and marker["y"] + marker["height"] <= b["y"] + b["height"] + 1
    assert f"#{f['id']}" in reader.locator(".map-card").inner_text()
    card = reader.locator(".map-card").bounding_box()
    overlap_x = min(card["x"] + card["width"], marker["x"] + marker["width"]) - max(card["x"], marker["x"])
    overlap_y = min(card["y"] + card["height"], marker["y"] + marker["height"]) - max(card["y"], marker["y"])
    assert overlap_x <= 0 or overlap_y <= 0, "the card does not hide the feature it describes"
    # By label (part of it, any case): the strongest feature with that label first, the next one on Enter.
    name = next(g["name"] for g in labels if g["name"] and g["id"] != f["id"])
    query = name.split()[0].upper() if len(name.split()[0]) > 2 else name
    hits = [g for g in labels if query.lower() in g["name"].lower() or query.lower() in g["label"].lower()]
    find(reader, query, hits[0]["id"])
    assert settle(reader)["f"] == hits[0]["id"]
    assert f"1 of {len(hits)} matching" in reader.locator(".map-card").inner_text()
    if len(hits) > 1:
        find(reader, query, hits[1]["id"])
        assert settle(reader)["f"] == hits[1]["id"]
    save_screenshot(reader, f"reader-map-find-{reader.kind}")
    # No match, and an id that is not on the map, say so, and close the last find's card ("2 of 6 matching …").
    assert reader.locator(".map-card").is_visible()
    reader.fill(".map-find input", "no such label at all")
    reader.press(".map-find input", "Enter")
    reader.wait_for_function("() => /No feature/.test(document.querySelector('.map-status').textContent)")
    assert reader.locator(".map-card").is_hidden()
    find(reader, query, hits[0]["id"])
    assert "1 of" in reader.locator(".map-card").inner_text(), "a find after a failed one starts from the first match"
    reader.fill(".map-find input", "999999")
    reader.press(".map-find input", "Enter")
    reader.wait_for_function("() => /not on the map/.test(document.querySelector('.map-status').textContent)")
    assert reader.locator(".map-card").is_hidden()
    reader.watch.assert_clean()


def test_the_view_stays_on_the_map(reader, site_url, index):
    open_map(reader, site_url, f"#x=8&y=8&z={top_z(index)}")
    b = box(reader)
    for dx, dy in [(-4000, -4000), (4000, 4000), (-4000, 3000), (3000, -4000)]:
        drag(reader, dx / 10, dy / 10)
        for _ in range(3):
            drag(reader, dx / 10, dy / 10)
        r = map_rect(reader, index, settle(reader))
        for lo, hi, size, start in (("left", "right", "width", "x"), ("top", "bottom", "height", "y")):
            if r[hi] - r[lo] >= b[size]:   # a map bigger than the view covers it
                assert r[lo] <= b[start] + 1 and r[hi] >= b[start] + b[size] - 1, (dx, dy, r, b)
            else:                          # a smaller one is centred
                assert r[lo] - b[start] == pytest.approx(b[start] + b[size] - r[hi], abs=2), (dx, dy, r, b)
    # Zoomed out to the whole map, a drag cannot push it off either.
    reader.click("[data-map-zoom='fit']")
    drag(reader, -3000, -3000)
    r = map_rect(reader, index, settle(reader))
    assert r["left"] >= b["x"] - 1 and r["top"] >= b["y"] - 1
    assert r["right"] <= b["x"] + b["width"] + 1 and r["bottom"] <= b["y"] + b["height"] + 1
    assert r["left"] - b["x"] == pytest.approx(b["x"] + b["width"] - r["right"], abs=2)
    # So does a link with a view off the map.
    open_map(reader, site_url, f"#x=-50&y=90&z={top_z(index)}")
    v = settle(reader)
    assert 0 <= v["x"] <= index["grid_side"] and 0 <= v["y"] <= index["grid_side"]
    save_screenshot(reader, f"reader-map-bounded-{reader.kind}")
    reader.watch.assert_clean()


def test_the_map_fills_the_screen(reader, site_url):
    open_map(reader, site_url)
    vw, vh = reader.viewport_size["width"], reader.viewport_size["height"]
    b = box(reader)
    assert b["y"] < 0.35 * vh, f"the map starts at {b['y']:.0f} px of {vh}"
    assert b["y"] + b["height"] <= vh + 1, "the map's bottom is on the first screen"
    assert b["height"] >= 0.6 * vh
    assert b["width"] >= (vw - 1 if reader.kind == "phone" else 0.85 * vw)
    assert reader.evaluate("document.scrollingElement.scrollWidth") <= vw + 1, "the page scrolls sideways"
    save_screenshot(reader, f"reader-map-{reader.kind}")
    reader.watch.assert_clean()


def test_the_overview_inset_shows_and_moves_the_view(reader, site_url, index):
    open_map(reader, site_url, f"#x=8&y=8&z={top_z(index)}")
    nav = reader.locator(".map-nav")
    assert reader.evaluate("document.querySelector('.map-nav img').naturalWidth") > 0
    nb, rect = nav.bounding_box(), reader.locator(".map-nav-view").bounding_box()
    assert rect["width"] * rect["height"] < 0.9 * nb["width"] * nb["height"], "zoomed in, the view is a part"
    before = settle(reader)
    # Click near the inset's top-left corner: the view goes to the map's top-left.
    reader.mouse.click(nb["x"] + 3, nb["y"] + 3)
    after = settle(reader)
    # (along an axis where the whole map fits the view it stays centred)
    assert after["x"] <= before["x"] and after["y"] <= before["y"] and after != before
    rect2 = reader.locator(".map-nav-view").bounding_box()
    assert rect2["x"] <= rect["x"] and rect2["y"] <= rect["y"]
    reader.watch.assert_clean()


def test_a_click_shows_co_activating_neighbours_then_opens_the_page(reader, site_url, index, labels):
    f = next(g for g in labels if any(n in {h["id"] for h in labels} for n in g["neighbours"]))
    open_map(reader, site_url, f"#f={f['id']}")
    marker = reader.locator(".map-marker")
    marker.wait_for(state="visible")
    m = marker.bounding_box()
    centre = (m["x"] + m["width"] / 2, m["y"] + m["height"] / 2)
    tap = reader.touchscreen.tap if reader.kind == "phone" else reader.mouse.click
    # The card is open from the hash's selection? No: a first click opens it.
    if reader.locator(".map-card").is_visible():
        reader.click(".map-card-close")
    tap(*centre)
    card = reader.locator(".map-card")
    card.wait_for(state="visible")
    assert f"#{f['id']}" in card.inner_text()
    buttons = card.locator("li button")
    assert buttons.count() >= 1 and reader.locator(".map-neighbour").count() == buttons.count()
    save_screenshot(reader, f"reader-map-card-{reader.kind}")
    # A neighbour's button flies to it.
    target = int(buttons.first.inner_text().split()[0][1:])
    buttons.first.click()
    reader.wait_for_function(f"() => document.querySelector('.map-viewport').dataset.flown === '{target}'")
    assert settle(reader)["f"] == target
    # Its card's link opens its page.
    reader.locator(".map-card-open").click()
    reader.wait_for_url(re.compile(rf"features/{target}\.html$"))
    reader.watch.failed[:] = [u for u in reader.watch.failed if not u.endswith("/favicon.svg")]
    reader.watch.assert_clean()


def test_no_stale_tooltip_after_a_wheel_zoom(browser, site_url, index, labels):
    context = browser.new_context(**VIEWPORTS["desktop"])
    pg = context.new_page()
    watch = PageWatch(pg)
    open_map(pg, site_url, f"#x=8&y=8&z={top_z(index)}")
    b = box(pg)
    by_cell = {(g["x"], g["y"]): g["id"] for g in labels}
    # A feature's cell a few cells off the centre (so zooming out moves other cells under the pointer).
    gx, gy = min(by_cell, key=lambda c: abs(c[0] - 10) + abs(c[1] - 10))
    cell = index["cell_px"]
    point = (b["x"] + b["width"] / 2 + (gx + 0.5 - 8) * cell - 1, b["y"] + b["height"] / 2 + (gy + 0.5 - 8) * cell - 1)
    pg.mouse.move(*point)
    pg.mouse.move(point[0] + 1, point[1] + 1)
    pg.wait_for_function(f"() => document.querySelector('.map-tip').dataset.feature === '{by_cell[(gx, gy)]}'")

    def under_pointer() -> int | None:
        v = settle(pg)
        s, cell = 2 ** (v["z"] - top_z(index)), index["cell_px"]
        mx = v["x"] * cell + (point[0] + 1 - b["x"] - b["width"] / 2) / s
        my = v["y"] * cell + (point[1] + 1 - b["y"] - b["height"] / 2) / s
        return by_cell.get((int(mx // cell), int(my // cell)))
    seen = [by_cell[(gx, gy)]]
    for _ in range(4):
        pg.mouse.wheel(0, 45)
        want = under_pointer()
        tip = pg.locator(".map-tip")
        if want is None:
            tip.wait_for(state="hidden")
        else:
            pg.wait_for_function(f"() => document.querySelector('.map-tip').dataset.feature === '{want}'")
        seen.append(want)
    assert len(set(seen)) >= 2, "the zoom moved another cell under the pointer"
    watch.assert_clean()
    context.close()


def test_the_feature_page_inset_shows_the_map(reader, site_url, index, labels):
    f = labels[len(labels) // 2]
    images = []
    reader.on("response", lambda r: images.append((r.url, r.status, r.headers.get("content-type", "")))
              if "/map/" in r.url else None)
    reader.goto(site_url + f"features/{f['id']}.html")
    inset = reader.locator("a.minimap-link svg.minimap")
    inset.wait_for()
    href = inset.locator("image").get_attribute("href")
    assert re.fullmatch(r"\.\./map/[0-9a-f]{16}/0/0_0\.webp", href), href
    reader.wait_for_load_state("networkidle")
    assert any(u.endswith(href[2:]) and s == 200 and "webp" in t for u, s, t in images), images
    # The map is drawn: the inset's pixels vary (not an empty square with a dot).
    shot = inset.screenshot()
    from io import BytesIO
    from PIL import Image
    import numpy as np
    px = np.asarray(Image.open(BytesIO(shot)).convert("RGB")).astype(float)
    assert px.std() > 12, "the inset shows a picture"
    # The dot sits at the feature's cell.
    c = inset.locator("circle")
    assert float(c.get_attribute("cx")) == pytest.approx((f["x"] + 0.5) * 128 / index["grid_side"], abs=0.2)
    save_screenshot(reader, f"reader-feature-inset-{reader.kind}")
    reader.watch.assert_clean()
