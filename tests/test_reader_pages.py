"""The tiny build's reader pages in headless Chromium, on a desktop (1280×800) and a phone (390×844) screen
(issue 13, items 1, 3, 4 and 7): the Inversions page shows every image render and the ablation with their
cosines; a feature page shows examples from several activation ranges, its frequency rank and a lightbox; the
listing starts with features that fire, sorts most first by frequency and strength, says when a filter matches
nothing and counts "1 feature"; the overview gives "dead" one meaning; search results have thumbnails and do
not repeat the label; a missing path gets the 404 page with status 404. No console errors or failed requests;
screenshots go to test-artifacts/. Then what a QA pass of the tiny build found: render ranks read from 1, a
dead feature shows no quantiles, small activations keep their digits, the facts line keeps its spaces, the
overview's Explore list names every page, a search or a filter for "#N" shows feature N first, the search keeps
its query in the URL, the listing keeps its filter on Back, and a link to a pair that is not there says so."""
from __future__ import annotations

import re
import threading
import urllib.error
import urllib.request

import pytest

from atlasgen.store import Store

from conftest import PageWatch, save_screenshot

pytestmark = pytest.mark.browser

VIEWPORTS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}


@pytest.fixture(params=list(VIEWPORTS))
def reader(request, browser):
    """(page, viewport name): a fresh page at the viewport's size, watched like conftest's `page`."""
    context = browser.new_context(viewport=VIEWPORTS[request.param])
    pg = context.new_page()
    pg.watch = PageWatch(pg)
    yield pg, request.param
    context.close()


@pytest.fixture(scope="module")
def facts(tiny_build) -> dict:
    """What the store says the pages must show."""
    with Store.open(tiny_build, read_only=True) as store:
        renders = store.image_inversion_renders()
        features = store.feature_rows()
    return {"image_renders": [r for r in renders if r["kind"] == "image"],
            "ablation_renders": [r for r in renders if r["kind"] == "ablation"], "features": features}


def _open(page, url: str):
    page.goto(url, wait_until="load")
    page.wait_for_load_state("networkidle")
    return page


def _load_all_pictures(page) -> None:
    """Load every picture now (lazy ones too) and wait until each has loaded, so none is still in flight when
    the test clicks away."""
    page.evaluate("() => document.querySelectorAll('img[loading=lazy]').forEach(i => { i.loading = 'eager'; })")
    page.wait_for_function("() => Array.from(document.images).every(i => i.complete)", timeout=15_000)
    page.wait_for_load_state("networkidle")


def _broken_images(page) -> list[str]:
    return page.evaluate("() => Array.from(document.images).filter(i => i.naturalWidth === 0).map(i => i.src)")


def _check_lightbox(page, picture) -> None:
    """Clicking the picture opens the lightbox with it, larger; Esc closes it."""
    picture.scroll_into_view_if_needed()
    small_width = picture.bounding_box()["width"]
    picture.click()
    dialog = page.locator("dialog.lightbox")
    assert dialog.evaluate("d => d.open")
    big = dialog.locator("img.lightbox-picture")
    page.wait_for_function("() => document.querySelector('dialog.lightbox img').naturalWidth > 0")
    assert big.get_attribute("src") == picture.evaluate("i => i.currentSrc || i.src")
    assert big.bounding_box()["width"] > small_width
    page.keyboard.press("Escape")
    assert not dialog.evaluate("d => d.open")


# --- 1. the Inversions page ---------------------------------------------------------------------------------
def test_inversions_page_shows_every_image_render_and_the_ablation(reader, site_url, facts):
    page, view = reader
    n_image, n_ablation = len(facts["image_renders"]), len(facts["ablation_renders"])
    assert n_image >= 2 and n_ablation == 3, "the tiny build inverts images and runs the ablation"
    _open(page, site_url + "index.html")
    _load_all_pictures(page)
    page.click("main a[href='inversions.html']")
    page.wait_for_load_state("networkidle")
    assert page.url.endswith("inversions.html")
    _load_all_pictures(page)
    generations = page.locator("section.inversions li.generation")
    assert generations.count() == n_image
    n_images = len({r["image_id"] for r in facts["image_renders"]})
    assert page.locator("section.inversions li.original img").count() == n_images
    ablation = page.locator("section.ablation li.generation")
    assert ablation.count() == n_ablation
    assert page.locator("section.ablation li.original img").count() == 1
    cosines = [float(t.removeprefix("cos ")) for t in
               page.locator("section.inversions .cosine, section.ablation .cosine").all_inner_texts()]
    expected = sorted(round(r["cosine"], 2) for r in facts["image_renders"] + facts["ablation_renders"])
    assert sorted(cosines) == pytest.approx(expected, abs=0.006)
    text = page.locator("section.ablation").inner_text()
    for caption in ("Raw pixels, no augmentations", "Raw pixels with augmentations", "Transformer with augmentations"):
        assert caption in text
    assert not _broken_images(page)
    save_screenshot(page, f"reader-inversions-{view}")
    _check_lightbox(page, generations.first.locator("img"))
    page.watch.assert_clean()


# --- 3. the feature page ------------------------------------------------------------------------------------
def test_feature_page_has_activation_ranges_rank_and_lightbox(reader, site_url, facts):
    page, view = reader
    features = facts["features"]
    f = max(features, key=lambda r: (r["n_active"] or 0, -r["feature_id"]))
    _open(page, f"{site_url}features/{f['feature_id']}.html")
    _load_all_pictures(page)
    # Examples from more than one activation range: the top images and at least two lower ranges, each weaker.
    top_values = [float(t.split()[1]) for t in page.locator("section.top-images li > span:first-of-type").all_inner_texts()]
    bands = page.locator("section.activation-ranges ol.band")
    assert top_values and bands.count() >= 2
    previous_low = min(top_values)
    for k in range(bands.count()):
        values = [float(t.split()[1]) for t in bands.nth(k).locator("li > span:first-of-type").all_inner_texts()]
        assert values and max(values) <= previous_low + 1e-3, "each range lies below the one before"
        previous_low = min(values)
    assert previous_low < min(top_values)
    # Where it stands among all features: the store's rank by frequency.
    rank = 1 + sum(1 for r in features if (r["frequency"] or 0) > (f["frequency"] or 0))
    assert page.locator(".feature-facts .rank").inner_text() == f"#{rank} of {len(features)}"
    assert rank == 1  # it is the most frequent one
    # Labels that may be cut carry their full text on hover.
    for el in page.locator("section.top-images .cut, .tile-label").all()[:20]:
        assert el.get_attribute("title") == el.inner_text()
    assert not _broken_images(page)
    save_screenshot(page, f"reader-feature-{view}")
    _check_lightbox(page, page.locator("section.top-images img").first)
    _check_lightbox(page, bands.last.locator("img").first)
    page.watch.assert_clean()


# --- 4. the listing -----------------------------------------------------------------------------------------
def _listed(page) -> list[tuple[str, float, float]]:
    """(href, frequency %, strength) of the tiles shown."""
    out = []
    for t in page.locator("#feature-grid a.tile").all():
        freq, strength = re.match(r"([\d.]+)% · strength ([\d.e+-]+)", t.locator(".tile-extra").inner_text()).groups()
        out.append((t.get_attribute("href"), float(freq), float(strength)))
    return out


def test_listing_starts_with_firing_features_and_says_when_nothing_matches(reader, site_url, facts):
    page, view = reader
    features = facts["features"]
    n_live = sum(1 for r in features if (r["n_active"] or 0) > 0)
    _open(page, site_url + "features/index.html")
    count = page.locator("#feature-count")
    page.wait_for_function("() => { const t = document.getElementById('feature-count').textContent;"
                           " return t.length > 0 && !t.includes('loading'); }")
    assert count.inner_text() == f"{n_live:,} features"
    assert all(freq > 0 for _, freq, _ in _listed(page)[:24]), "the default sort starts with features that fire"
    for key, col in (("frequency", 1), ("strength", 2)):
        page.select_option("#feature-sort", key)
        assert page.is_checked("#feature-desc"), f"{key} sorts most first"
        values = [row[col] for row in _listed(page)]
        assert values[0] > 0 and values == sorted(values, reverse=True) and values[0] > values[-1]
    save_screenshot(page, f"reader-listing-{view}")
    page.select_option("#feature-sort", "id")
    assert not page.is_checked("#feature-desc")
    # Full labels on hover (tiles cut long ones).
    first = page.locator("#feature-grid a.tile .tile-label").first
    assert first.get_attribute("title") == first.inner_text()
    # A filter with no match says so; one match says "1 feature".
    page.fill("#feature-filter", "no-such-label-xyz")
    assert page.locator("#feature-grid a.tile").count() == 0
    empty = page.locator("#feature-empty")
    assert empty.is_visible() and "No feature matches “no-such-label-xyz”" in empty.inner_text()
    live = [r for r in features if (r["n_active"] or 0) > 0]
    # An id no label contains (the filter matches ids exactly and labels by substring).
    live_id = next(r["feature_id"] for r in reversed(live)
                   if not any(str(r["feature_id"]) in (o["label"] or "") for o in live))
    page.fill("#feature-filter", f"#{live_id}")
    assert count.inner_text() == "1 feature" and empty.is_hidden()
    # Dead features only on request.
    page.fill("#feature-filter", "")
    page.check("#feature-dead")
    assert count.inner_text() == f"{len(features):,} features"
    page.watch.assert_clean()


# --- 7. overview, search, 404 -------------------------------------------------------------------------------
def test_overview_gives_dead_one_meaning(reader, site_url, facts):
    page, view = reader
    features = facts["features"]
    n_dead = sum(1 for r in features if not (r["n_active"] or 0))
    _open(page, site_url + "index.html")
    text = page.locator("main").inner_text()
    assert "dead fraction" not in text.lower()
    assert text.count("A feature is dead when it fires on no image of the corpus.") == 1
    shown = page.locator("dd.dead-features").inner_text()
    assert shown.startswith(f"{n_dead:,} (") and f"{100 * n_dead / len(features):.1f}%" in shown
    # The training curve of features idle for a window of steps is not called "dead".
    titles = page.locator("svg.plot title").all_text_contents()
    assert titles and not any("dead" in t.lower() for t in titles) and any("idle" in t for t in titles)
    save_screenshot(page, f"reader-overview-{view}")
    page.watch.assert_clean()


def test_search_results_have_thumbnails_and_the_label_once(reader, site_url, facts):
    page, view = reader
    f = next(r for r in facts["features"] if r["label_name"])
    _open(page, site_url + "search.html")
    page.fill(".pagefind-ui__search-input", f["label_name"])
    result = page.locator(".pagefind-ui__result").first
    result.wait_for(timeout=15_000)
    thumb = result.locator(".pagefind-ui__result-image")
    thumb.wait_for(timeout=10_000)
    page.wait_for_function("() => { const i = document.querySelector('.pagefind-ui__result-image');"
                           " return i && i.complete && i.naturalWidth > 0; }", timeout=10_000)
    for k in range(min(3, page.locator(".pagefind-ui__result").count())):
        item = page.locator(".pagefind-ui__result").nth(k)
        title = item.locator(".pagefind-ui__result-title").inner_text()
        label = title.split(" ", 2)[-1]
        assert item.inner_text().count(label) == 1, f"the label is repeated in {item.inner_text()!r}"
    save_screenshot(page, f"reader-search-{view}")
    page.watch.assert_clean()


@pytest.fixture(scope="module")
def served_url(tiny_build):
    """The tiny site through `atlasgen serve`'s server (the one with the 404 page)."""
    from atlasgen.serve import make_server
    server = make_server(tiny_build / "site", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_missing_page_gets_the_404_page_with_status_404(reader, served_url):
    page, view = reader
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(served_url + "features/no-such-feature.html", timeout=10)
    assert err.value.code == 404 and b"Page not found" in err.value.read()
    response = page.goto(served_url + "no/such/folder/page.html", wait_until="load")
    page.wait_for_load_state("networkidle")
    assert response.status == 404
    assert page.locator("h1").inner_text() == "Page not found"
    # Its stylesheet and links work from any depth (they start at the host's root).
    assert page.evaluate("() => getComputedStyle(document.querySelector('.site-header')).display") == "flex"
    save_screenshot(page, f"reader-404-{view}")
    page.click("main a[href='/features/index.html']")
    page.wait_for_load_state("networkidle")
    assert page.url == served_url + "features/index.html"
    # The browser logs the 404 document itself as a console error; nothing else may fail.
    errors = [e for e in page.watch.console_errors if "404" not in e]
    assert not errors and not page.watch.failed and not page.watch.external


def test_examples_by_band_follow_the_quantiles_and_skip_top_images(tiny_build):
    """Store.feature_examples_by_band: band 0 at or above q90, 1 from q50 to q90, 2 below q50; never a top
    image; at most n per band; strongest first within a band."""
    with Store.open(tiny_build, read_only=True) as store:
        examples = store.feature_examples_by_band(4)
        features = {f["feature_id"]: f for f in store.feature_rows()}
        tops = store.top_images_by_feature()
    assert len({band for rows in examples.values() for band, *_ in rows}) == 3
    for fid, rows in examples.items():
        f, top_ids = features[fid], {i for i, _ in tops.get(fid, ())}
        for band, image_id, value, _ in rows:
            assert image_id not in top_ids
            assert {0: value >= f["q90"], 1: f["q50"] <= value < f["q90"], 2: value < f["q50"]}[band]
        for band in range(3):
            values = [v for b, _, v, _ in rows if b == band]
            assert len(values) <= 4 and values == sorted(values, reverse=True)


# --- a QA pass over the tiny build: what the pages say --------------------------------------------------------
def _feature_pages(tiny_build) -> dict[int, str]:
    return {int(p.stem): p.read_text() for p in (tiny_build / "site" / "features").glob("[0-9]*.html")}


def test_render_ranks_count_from_one_like_the_frequency_rank(tiny_build):
    """The store's self_rank is 0 for the top feature; the page reads "rank 1" there, as "#1 of N" does."""
    with Store.open(tiny_build, read_only=True) as store:
        ranks = store.query("SELECT feature_a, self_rank FROM renders WHERE kind = 'feature' AND self_rank IS NOT NULL")
    top = sorted({fid for fid, rank in ranks if rank == 0})
    assert top, "some render re-activates its feature most of all"
    pages = _feature_pages(tiny_build)
    assert not any("(rank 0)" in text for text in pages.values())
    for fid in top[:10]:
        renders = re.search(r'<section class="renders".*?</section>', pages[fid], re.S).group(0)
        assert "(rank 1)" in renders


def test_dead_feature_pages_show_no_quantiles(tiny_build, facts):
    dead = [r["feature_id"] for r in facts["features"] if not (r["n_active"] or 0)]
    assert dead, "the tiny build has dead features"
    pages = _feature_pages(tiny_build)
    for fid in dead:
        histogram = re.search(r'<section class="histogram".*?</section>', pages[fid], re.S).group(0)
        assert "no activations" in histogram and "quantiles" not in histogram
    live = next(r["feature_id"] for r in facts["features"] if r["n_active"])
    assert "quantiles: 50%" in pages[live]


def test_small_activations_keep_their_digits(tiny_build):
    """A value above 0 never prints as 0.000 (feature pages, decompositions), and a band whose lowest and
    highest values print the same shows one value."""
    with Store.open(tiny_build, read_only=True) as store:
        smallest = store.scalar("SELECT min(value) FROM activations WHERE value > 0")
    assert smallest < 0.0005, "the tiny build has activations that three decimals would print as 0.000"
    site = tiny_build / "site"
    texts = list(_feature_pages(tiny_build).values()) + [(site / "decompositions.html").read_text()]
    shown = [v for text in texts for v in re.findall(r"act (-?[\d.]+(?:e-?\d+)?)(?![\d.e])", text)]
    assert shown and not any(float(v) == 0 for v in shown), sorted(shown, key=float)[:5]
    ranges = [m for text in texts for m in re.findall(r"\(act ([^)–]+)(?:–([^)]+))?\)", text)]
    assert ranges and all(low != high for low, high in ranges)


def test_feature_facts_keep_a_space_before_each_dot(tiny_build):
    for fid, text in _feature_pages(tiny_build).items():
        facts_line = re.sub(r"<[^>]+>", "", re.search(r'<p class="feature-facts".*?</p>', text, re.S).group(0))
        assert not re.search(r"\S·|·\S", facts_line), f"feature {fid}: {facts_line!r}"


def test_overview_explore_lists_each_page_with_a_colon(tiny_build):
    site = tiny_build / "site"
    explore = re.search(r"<h2>Explore</h2>.*?</ul>", (site / "index.html").read_text(), re.S).group(0)
    items = re.findall(r"<li>(.*?)</li>", explore, re.S)
    assert items and all(re.match(r'<a href="[^"]+">[^<]+</a>: ', item) for item in items), items
    assert ('href="query.html"' in explore) == (site / "query.html").is_file()


# --- a QA pass over the tiny build: what the scripts do -------------------------------------------------------
def _search_box(page, site_url):
    _open(page, site_url + "search.html")
    return ".pagefind-ui__search-input"


def test_search_for_an_id_shows_that_feature_first(page, site_url, facts):
    ids = [r["feature_id"] for r in facts["features"]]
    labels = [r["label"] or "" for r in facts["features"]]
    # Ids whose digits start other ids and appear in labels ("(1/2)", "(12/16)"): Pagefind's text ranking
    # can put those other features first.
    crowded = [i for i in ids if sum(str(j).startswith(str(i)) for j in ids) > 1
               and sum(str(i) in label.replace("/", "") for label in labels) > 1][:3]
    assert crowded
    box = _search_box(page, site_url)
    for fid in crowded:
        for query in (f"#{fid}", str(fid)):
            page.fill(box, query)
            page.wait_for_function(
                "fid => { const a = document.querySelector('.search-feature:not([hidden]) a, "
                ".pagefind-ui__result-link'); return a && a.href.endsWith('/features/' + fid + '.html'); }",
                arg=fid, timeout=10_000)
    # A query that is not an id shows Pagefind's results only.
    page.fill(box, "stripes")
    page.wait_for_function("() => document.querySelector('.search-feature').hidden", timeout=10_000)
    page.watch.assert_clean()


def test_search_keeps_the_query_in_the_url(page, site_url, facts):
    name = next(r["label_name"] for r in facts["features"] if r["label_name"])
    box = _search_box(page, site_url)
    for query in (name, "#1"):
        page.fill(box, query)
        page.wait_for_function("q => new URLSearchParams(location.search).get('q') === q", arg=query)
    # A reload shows the same search; an emptied box leaves the URL without a query.
    page.wait_for_load_state("networkidle")  # nothing in flight when the page reloads
    page.reload(wait_until="load")
    page.locator(".pagefind-ui__result").first.wait_for(timeout=10_000)
    assert page.input_value(box) == "#1"
    page.fill(box, "")
    page.wait_for_function("() => !new URLSearchParams(location.search).has('q')")
    # The reload and the emptied box may cancel pictures (and the favicon) still loading: not a failure.
    assert not page.watch.console_errors and not page.watch.external


def _listing(page, site_url):
    _open(page, site_url + "features/index.html")
    page.wait_for_function("() => { const t = document.getElementById('feature-count').textContent;"
                           " return t.length > 0 && !t.includes('loading'); }")


def _hrefs(page) -> list[str]:
    return [a.get_attribute("href") for a in page.locator("#feature-grid a.tile").all()]


def test_listing_filter_by_hash_id_shows_only_that_feature(page, site_url, facts):
    live = [r for r in facts["features"] if r["n_active"]]
    # A live id whose digits are also in another feature's label ("… (8/12)").
    fid = next(r["feature_id"] for r in live
               if any(str(r["feature_id"]) in (o["label"] or "") for o in live if o is not r))
    _listing(page, site_url)
    page.fill("#feature-filter", f"#{fid}")
    assert _hrefs(page) == [f"{fid}.html"]
    page.watch.assert_clean()


def test_listing_keeps_its_filter_and_sort_on_back(page, site_url, facts):
    name = next(r["label_name"] for r in facts["features"] if r["label_name"] and r["n_active"])
    _listing(page, site_url)
    page.select_option("#feature-sort", "frequency")
    page.fill("#feature-filter", name)
    shown = _hrefs(page)
    assert 0 < len(shown) < sum(1 for r in facts["features"] if r["n_active"])
    _load_all_pictures(page)  # none in flight when the page is left
    page.locator("#feature-grid a.tile").first.click()
    page.wait_for_load_state("load")
    assert page.url.endswith("/features/" + shown[0])
    _load_all_pictures(page)
    page.go_back(wait_until="load")
    page.wait_for_function("() => { const t = document.getElementById('feature-count').textContent;"
                           " return t.length > 0 && !t.includes('loading'); }")
    assert page.input_value("#feature-sort") == "frequency" and page.input_value("#feature-filter") == name
    assert _hrefs(page) == shown
    page.watch.assert_clean()


def test_a_link_to_a_pair_that_is_not_there_says_so(page, site_url):
    _open(page, site_url + "combinations.html#pair-1-2")
    keys = page.eval_on_selector_all("#pair-picker option", "os => os.map(o => o.value)")
    assert keys and "1-2" not in keys
    missing = page.locator("#pair-missing")
    assert missing.is_visible() and "#1" in missing.inner_text() and "#2" in missing.inner_text()
    shown = page.locator("section.pair:visible").get_attribute("id")
    assert shown == f"pair-{keys[0]}" and page.url.endswith("#" + shown), "the URL names the pair shown"
    page.click("#pair-next")
    assert missing.is_hidden()
    page.watch.assert_clean()
