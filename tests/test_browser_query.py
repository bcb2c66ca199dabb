"""The Query page of the tiny build in headless Chromium, served over http with the site's security headers
(`atlasgen serve`'s server, so the CSP header also governs DuckDB's worker): DuckDB-WASM starts, two example
queries and one typed query show the same rows as DuckDB in Python over the store, feature ids show their
pictures and link their pages, a query that names a URL is refused inside the browser, and no console error,
failed request or request leaving 127.0.0.1 happens. Needs the npm files (`npm ci --prefix vendor/duckdb-wasm`);
without them the tiny build has no Query page and these tests skip, unless ATLASGEN_REQUIRE_DUCKDB_WASM=1
(set by .ci/run) makes that a failure."""
from __future__ import annotations

import math
import os
import threading

import duckdb
import pytest

from conftest import save_screenshot

pytestmark = pytest.mark.browser
READY_TIMEOUT_MS = 120_000  # compiling 34 MB of WebAssembly on a busy 2-core machine


@pytest.fixture(scope="module")
def query_url(tiny_build) -> str:
    from atlasgen.serve import make_server
    site_dir = tiny_build / "site"
    if not (site_dir / "query.html").is_file():
        if os.environ.get("ATLASGEN_REQUIRE_DUCKDB_WASM"):
            pytest.fail("the tiny build has no Query page although ATLASGEN_REQUIRE_DUCKDB_WASM is set")
        pytest.skip("DuckDB-WASM is not installed (npm ci --prefix vendor/duckdb-wasm): no Query page")
    server = make_server(site_dir, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/query.html"
    server.shutdown()
    server.server_close()


def python_rows(tiny_build, sql: str) -> tuple[list[str], list[tuple]]:
    con = duckdb.connect(str(tiny_build / "atlas.duckdb"), read_only=True)
    try:
        cursor = con.execute(sql)
        return [d[0] for d in cursor.description], cursor.fetchall()
    finally:
        con.close()


def page_rows(page) -> tuple[list[str], list[list[str]]]:
    columns = page.eval_on_selector_all("table.sql-table-result thead th", "ths => ths.map(th => th.textContent)")
    rows = page.eval_on_selector_all("table.sql-table-result tbody tr",
                                      "trs => trs.map(tr => [...tr.cells].map(td => td.innerText.trim()))")
    return columns, rows


def assert_same_rows(page, tiny_build, sql: str) -> list[tuple]:
    want_columns, want = python_rows(tiny_build, sql)
    columns, got = page_rows(page)
    assert columns == want_columns
    assert len(got) == len(want) and want, f"{len(got)} rows in the page, {len(want)} from DuckDB in Python"
    for got_row, want_row in zip(got, want):
        for cell, value, column in zip(got_row, want_row, columns):
            if value is None:
                assert cell == "–", (column, cell)
            elif isinstance(value, float):
                assert math.isclose(float(cell), value, rel_tol=1e-3, abs_tol=1e-6), (column, cell, value)
            elif column in ("feature_id", "feature_a", "feature_b", "other_id"):
                assert cell == f"#{value}", (column, cell, value)
            else:
                assert cell == str(value), (column, cell, value)
    return want


def run_and_wait(page, action) -> None:
    action()
    page.wait_for_function("() => ['done', 'error'].includes(document.getElementById('sql-form').dataset.state)",
                           timeout=60_000)
    assert page.locator("#sql-form").get_attribute("data-state") == "done", page.locator("#sql-error").inner_text()


def test_query_page_runs_examples_and_typed_sql(page, query_url, tiny_build):
    page.goto(query_url, wait_until="load")
    page.wait_for_function("() => document.getElementById('sql-form').dataset.state === 'ready'",
                           timeout=READY_TIMEOUT_MS)
    examples = page.locator("button.sql-example")
    assert [examples.nth(i).get_attribute("data-key") for i in range(examples.count())] == ["label", "together", "image"]

    for key in ("label", "together"):
        button = page.locator(f"button.sql-example[data-key={key}]")
        run_and_wait(page, button.click)
        assert_same_rows(page, tiny_build, button.get_attribute("data-sql"))
        assert page.locator("#sql-input").input_value() == button.get_attribute("data-sql")
    # Feature ids link their pages and show their pictures (every tiny feature has one).
    links = page.locator("td.sql-feature a")
    assert links.count() >= 2
    href = links.first.get_attribute("href")
    assert href.endswith(f"features/{links.first.inner_text().strip().lstrip('#')}.html")
    page.wait_for_function("() => [...document.querySelectorAll('td.sql-feature img')].every("
                           "i => i.complete && i.naturalWidth > 0)", timeout=20_000)
    assert page.locator("td.sql-feature img").count() == links.count()
    save_screenshot(page, "site-tiny-query")

    typed = "SELECT image_id, label, width FROM images WHERE label IS NOT NULL ORDER BY image_id DESC LIMIT 7"
    page.fill("#sql-input", typed)

    def press_ctrl_enter():
        page.focus("#sql-input")
        page.keyboard.press("Control+Enter")
    run_and_wait(page, press_ctrl_enter)
    rows = assert_same_rows(page, tiny_build, typed)
    assert len(rows) == 7 and "7 rows" in page.locator(".sql-summary").inner_text()

    # DECIMAL and HUGEINT (sum of integers) print as numbers; structs keep their keys, maps their keys and values.
    typed = ("SELECT 1.5 AS a, 0.1 + 0.2 AS b, sum(n_active) AS total, {'k': 1, 'name': 'x'} AS s, "
             "MAP {'m': 2} AS m, [1, 2] AS xs FROM features")
    page.fill("#sql-input", typed)
    run_and_wait(page, press_ctrl_enter)
    (total,), = python_rows(tiny_build, "SELECT sum(n_active) FROM features")[1]
    assert page_rows(page)[1] == [["1.5", "0.3", str(total), "{k: 1, name: x}", "{m: 2}", "[1, 2]"]]
    page.watch.assert_clean()


def test_query_page_refuses_urls_and_reports_errors_in_the_page(page, query_url):
    page.goto(query_url, wait_until="load")
    page.wait_for_function("() => document.getElementById('sql-form').dataset.state === 'ready'",
                           timeout=READY_TIMEOUT_MS)
    for sql in ("SELECT * FROM read_parquet('http://example.com/x.parquet')", "SELECT * FROM nope",
                "SELEC 1", "SET enable_external_access = true"):
        page.fill("#sql-input", sql)
        page.click("#sql-run")
        page.wait_for_function("() => ['done', 'error'].includes(document.getElementById('sql-form').dataset.state)",
                               timeout=60_000)
        assert page.locator("#sql-form").get_attribute("data-state") == "error", sql
        assert page.locator("#sql-error").is_visible() and page.locator("#sql-error").inner_text(), sql
    page.fill("#sql-input", "-- nothing here")
    page.click("#sql-run")
    assert "empty" in page.locator("#sql-error").inner_text()
    page.watch.assert_clean()
