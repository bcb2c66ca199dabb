"""The built site in headless Chromium: pages load clean (no console error, failed request or request leaving
127.0.0.1, under the site's own CSP), the listing sorts and filters, the combinations slider and picker work,
and Pagefind finds a feature by its label. Screenshots go to test-artifacts/."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from atlasgen.site.pages import NAV
from atlasgen.stages import site
from atlasgen.testing import make_synthetic_store
from atlasgen.config import SiteConfig
from atlasgen.progress import set_quiet
from atlasgen.store import Store

from conftest import save_screenshot

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
UNIQUE_LABEL = "strawberry"
UNIQUE_FEATURE = 5
PAGES = ("index.html", "features/index.html", "features/page-002.html", f"features/{UNIQUE_FEATURE}.html",
         "inversions.html", "decompositions.html", "combinations.html", "search.html", "map.html", "probes.html",
         "toy.html")


@pytest.fixture(scope="module")
def synthetic_url(tmp_path_factory, serve_dir) -> str:
    """A synthetic store's site (search included) served on 127.0.0.1; feature 5 is labelled 'strawberry'."""
    set_quiet(True)
    out = make_synthetic_store(tmp_path_factory.mktemp("browser") / "build", n_features=300, n_images=200,
                                     n_pairs=3, slerp_steps=5)
    with Store.open(out) as store:
        store.con.execute("UPDATE feature_stats SET label = ?, label_name = ? WHERE feature_id = ?",
                          [f"{UNIQUE_LABEL} (11/16)", UNIQUE_LABEL, UNIQUE_FEATURE])
        site.run(SiteConfig(features_per_page=60, chunk_size=100, sql=False), store)  # Query page: its own test
    return serve_dir(out / "site")


def _open(page, url: str):
    page.goto(url, wait_until="load")
    page.wait_for_load_state("networkidle")
    return page


def _broken_images(page) -> list[str]:
    return page.evaluate("""() => Array.from(document.images)
        .filter(i => i.complete && i.naturalWidth === 0 && i.getAttribute('loading') !== 'lazy').map(i => i.src)""")


@pytest.mark.parametrize("rel", PAGES)
def test_page_loads_clean(page, synthetic_url, rel):
    _open(page, synthetic_url + rel)
    assert page.locator("header.site-header nav a").count() == len(NAV)
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # pull in lazy pictures too
    page.wait_for_load_state("networkidle")
    assert not _broken_images(page)
    page.watch.assert_clean()
    page.evaluate("window.scrollTo(0, 0)")
    save_screenshot(page, "site-synthetic-" + re.sub(r"[^a-z0-9]+", "-", rel.removesuffix(".html")))


def test_feature_page_shows_pictures_and_top_images(page, synthetic_url):
    _open(page, f"{synthetic_url}features/{UNIQUE_FEATURE}.html")
    renders = page.locator("section.renders img")
    tops = page.locator("section.top-images img")
    assert renders.count() >= 1 and tops.count() >= 1
    tops.last.scroll_into_view_if_needed()
    page.wait_for_load_state("networkidle")
    widths = page.evaluate("() => Array.from(document.querySelectorAll('section.renders img, "
                           "section.top-images img')).map(i => i.naturalWidth)")
    assert widths and all(w > 0 for w in widths)
    assert "act 0." in page.locator("section.top-images").inner_text()
    assert page.locator("svg.histogram rect").count() >= 20
    page.watch.assert_clean()


def test_listing_sorts_filters_and_pages(page, synthetic_url):
    _open(page, synthetic_url + "features/index.html")
    page.wait_for_function("() => !document.getElementById('feature-count').textContent.includes('loading')"
                           " && document.getElementById('feature-count').textContent.length > 0")
    grid = page.locator("#feature-grid a.tile")
    assert grid.count() == 60
    assert page.locator("#feature-pages").is_hidden()
    assert "270 features" in page.locator("#feature-count").inner_text()  # dead ones (a tenth) hidden at first
    page.select_option("#feature-sort", "frequency")
    assert page.is_checked("#feature-desc")  # frequency and strength sort most first by default
    freqs = [float(t.split("%")[0]) for t in grid.locator(".tile-extra").all_inner_texts()]
    assert freqs == sorted(freqs, reverse=True) and freqs[0] > freqs[-1]
    page.fill("#feature-filter", UNIQUE_LABEL)
    assert grid.count() == 1 and grid.first.get_attribute("href") == f"{UNIQUE_FEATURE}.html"
    page.fill("#feature-filter", "")
    page.click("#feature-more")
    assert grid.count() == 120
    page.select_option("#feature-sort", "id")
    assert not page.is_checked("#feature-desc")
    page.check("#feature-dead")
    assert "300 features" in page.locator("#feature-count").inner_text()  # the dead tenth shown on request
    page.watch.assert_clean()


def test_combinations_slider_changes_picture(page, synthetic_url):
    _open(page, synthetic_url + "combinations.html")
    section = page.locator("section.pair:visible")
    assert section.count() == 1
    picture = section.locator("img.slerp-picture")
    caption = section.locator(".slerp-caption")
    before_src, before_caption = picture.get_attribute("src"), caption.inner_text()
    assert "50%" in before_caption
    slider = section.locator("input.slerp-slider")
    slider.focus()
    page.keyboard.press("ArrowRight")
    assert picture.get_attribute("src") != before_src
    assert caption.inner_text() != before_caption and re.match(r"\d+% #\d+ \+ \d+% #\d+", caption.inner_text())
    page.keyboard.press("End")
    assert caption.inner_text().startswith("0% ")
    # The new picture loads after the src change; wait for it rather than racing it.
    page.wait_for_function(
        "() => { const img = document.querySelector('section.pair:not([hidden]) img.slerp-picture');"
        " return img.complete && img.naturalWidth > 0; }", timeout=10_000)
    page.watch.assert_clean()


def test_combination_picker_and_arrows_change_the_pair(page, synthetic_url):
    _open(page, synthetic_url + "combinations.html")
    keys = page.eval_on_selector_all("#pair-picker option", "os => os.map(o => o.value)")
    assert len(keys) == 3
    first_id = page.locator("section.pair:visible").get_attribute("id")
    assert first_id == f"pair-{keys[0]}"
    page.select_option("#pair-picker", keys[2])
    assert page.locator("section.pair:visible").get_attribute("id") == f"pair-{keys[2]}"
    assert page.url.endswith(f"#pair-{keys[2]}")
    page.click("#pair-next")  # wraps around
    assert page.locator("section.pair:visible").get_attribute("id") == f"pair-{keys[0]}"
    page.click("#pair-prev")
    assert page.locator("#pair-picker").input_value() == keys[2]
    # A link from a feature page opens its pair.
    page.goto(f"{synthetic_url}combinations.html#pair-{keys[1]}")
    assert page.locator("section.pair:visible").get_attribute("id") == f"pair-{keys[1]}"
    page.watch.assert_clean()


def test_search_finds_a_feature_by_label(page, synthetic_url):
    _open(page, synthetic_url + "search.html")
    page.fill(".pagefind-ui__search-input", UNIQUE_LABEL)
    first = page.locator(".pagefind-ui__result-link").first
    first.wait_for(timeout=15_000)
    assert first.get_attribute("href").endswith(f"features/{UNIQUE_FEATURE}.html")
    assert UNIQUE_LABEL in page.locator(".pagefind-ui__result").first.inner_text()
    save_screenshot(page, "site-synthetic-search-results")
    first.click()
    page.wait_for_load_state("load")
    assert page.url.endswith(f"features/{UNIQUE_FEATURE}.html")
    page.watch.assert_clean()


def test_overview_search_form_prefills(page, synthetic_url):
    _open(page, synthetic_url + "index.html")
    page.fill("form.quick-search input[name=q]", UNIQUE_LABEL)
    page.click("form.quick-search button")
    page.locator(".pagefind-ui__result-link").first.wait_for(timeout=15_000)
    assert page.locator(".pagefind-ui__search-input").input_value() == UNIQUE_LABEL
    page.watch.assert_clean()


@pytest.mark.slow
@pytest.mark.parametrize("rel", ("index.html", "features/index.html", "features/0.html", "inversions.html",
                                 "decompositions.html",
                                 "combinations.html", "search.html", "map.html", "probes.html", "toy.html"))
def test_tiny_build_pages_load_clean(page, site_url, rel):
    """The real tiny build, other stages' pages included."""
    _open(page, site_url + rel)
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    page.wait_for_load_state("networkidle")
    assert not _broken_images(page)
    page.watch.assert_clean()
    page.evaluate("window.scrollTo(0, 0)")
    save_screenshot(page, "site-tiny-" + re.sub(r"[^a-z0-9]+", "-", rel.removesuffix(".html")))
