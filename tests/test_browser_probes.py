"""Probes and toy pages in headless Chromium: load clean, the slider drives picture and chart marker,
the toy animation advances."""
from __future__ import annotations

import pytest

from conftest import save_screenshot

pytestmark = pytest.mark.browser


def test_probes_page_slider_moves_picture_and_marker(page, site_url):
    page.goto(site_url + "probes.html")
    page.wait_for_load_state("networkidle")
    sweep = page.locator("#probe-circle-size")
    assert page.locator(".probe-chart").count() >= 2
    slider = sweep.locator(".probe-slider")
    assert slider.is_visible(), "probes.js unhides the slider"
    img = sweep.locator(".probe-image")
    marker = sweep.locator(".probe-layout-wide .probe-marker")  # the layout a desktop shows
    narrow_marker = sweep.locator(".probe-layout-narrow .probe-marker")
    nx0 = narrow_marker.get_attribute("x1")
    src0, x0 = img.get_attribute("src"), marker.get_attribute("x1")
    caption0 = sweep.locator(".probe-step-label").inner_text()
    values0 = [v.inner_text() for v in sweep.locator(".probe-value").all()]
    slider.focus()
    for _ in range(5):
        page.keyboard.press("ArrowRight")
    assert sweep.get_attribute("data-step") == "5"
    assert img.get_attribute("src") != src0 and img.get_attribute("src").endswith("005.webp")
    assert float(marker.get_attribute("x1")) > float(x0)
    assert float(narrow_marker.get_attribute("x1")) > float(nx0), "the phone layout's marker follows too"
    assert sweep.locator(".probe-step-label").inner_text() != caption0 == "112px"
    assert sweep.locator(".probe-step-label").inner_text() == "40px"
    # the legend's values follow the step: they are the step-5 column of the chart's data
    values5 = [v.inner_text() for v in sweep.locator(".probe-value").all()]
    expected5 = page.evaluate("el => JSON.parse(el.dataset.values)[5].map(v => v.toFixed(3))",
                              sweep.element_handle())
    assert values5 == expected5 and values5 != values0
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
    save_screenshot(page, "probes")
    page.watch.assert_clean()


def test_probes_readout_has_bars(page, site_url):
    page.goto(site_url + "probes.html")
    readout = page.locator("#probe-circle-readout")
    assert readout.locator(".probe-bars rect").count() >= 3 * 1
    assert readout.locator(".probe-readout img").count() == 3
    page.watch.assert_clean()


def test_toy_page_animates(page, site_url):
    page.goto(site_url + "toy.html")
    page.wait_for_load_state("networkidle")
    canvas = page.locator(".toy-canvas")
    canvas.wait_for(state="visible")
    assert not page.locator(".toy-final").is_visible(), "the static SVG gives way to the animation"
    play = page.locator(".toy-play")
    slider = page.locator(".toy-slider")
    page.wait_for_function("() => +document.querySelector('.toy-slider').value > 2", timeout=10_000)
    first = int(slider.input_value())
    page.wait_for_timeout(600)
    assert int(slider.input_value()) > first, "autoplay advances the frames"
    play.click()  # pause
    paused_at = slider.input_value()
    page.wait_for_timeout(400)
    assert slider.input_value() == paused_at
    assert play.inner_text() == "Play"
    play.click()  # play on
    page.wait_for_timeout(500)
    assert int(slider.input_value()) > int(paused_at)
    assert page.locator(".toy-step").inner_text().startswith("step ")
    # drag to the last frame: the arrows are drawn there (coloured pixels near the centre stay non-white)
    last = slider.get_attribute("max")
    slider.fill(last)
    assert page.locator(".toy").get_attribute("data-frame") == last
    save_screenshot(page, "toy")
    page.watch.assert_clean()


def test_toy_without_javascript_shows_final_svg(browser, site_url):
    context = browser.new_context(java_script_enabled=False)
    pg = context.new_page()
    pg.goto(site_url + "toy.html")
    assert pg.locator(".toy-final svg").is_visible()
    assert pg.locator(".toy-final svg line[marker-end]").count() == 10
    context.close()
