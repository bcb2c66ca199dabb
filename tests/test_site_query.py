"""The site's Query page without a browser: what it publishes (Parquet tables that DuckDB reads back equal to
the store's published columns, schema.json, site_pictures, the DuckDB-WASM files), its nav link, its ready
queries (run here in DuckDB on the store, a hostile label included), `[site] sql = false`, and a build
without the npm files (one line, no page, no failure). The browser side is tests/test_browser_query.py."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import duckdb
import pytest

from atlasgen import paths as paths_mod
from atlasgen.site import query as site_query
from atlasgen.config import SiteConfig
from atlasgen.progress import set_quiet
from atlasgen.stages import site
from atlasgen.store import Store

REPO = Path(__file__).resolve().parent.parent
HAS_ENGINE = site_query.find_engine()[0] is not None
needs_engine = pytest.mark.skipif(not HAS_ENGINE and not os.environ.get("ATLASGEN_REQUIRE_DUCKDB_WASM"),
                                  reason="DuckDB-WASM is not installed (npm ci --prefix vendor/duckdb-wasm)")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_site", REPO / "benchmarks" / "site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    set_quiet(True)
    return _bench().make_synthetic_store(tmp_path_factory.mktemp("sq") / "build", n_features=48, n_images=120,
                                         n_pairs=1, slerp_steps=3)


def build_site(src: Path, dst: Path, cfg: SiteConfig) -> tuple[Path, dict]:
    shutil.copytree(src, dst)
    with Store.open(dst) as store:
        summary = site.run(cfg, store)
    return dst, summary


@pytest.fixture(scope="module")
def with_query(synthetic, tmp_path_factory) -> tuple[Path, dict]:
    return build_site(synthetic, tmp_path_factory.mktemp("sq-on") / "build", SiteConfig(features_per_page=24))


def nav_links(page: Path) -> list[str]:
    nav = re.search(r'<nav aria-label="Sections">(.*?)</nav>', page.read_text(), flags=re.S).group(1)
    return re.findall(r'href="([^"]+)"', nav)


@needs_engine
def test_query_page_publishes_tables_engine_and_nav(with_query):
    out, summary = with_query
    site_dir = out / "site"
    assert summary["query_page"] is True
    engine_dir = site_dir / "assets" / "duckdb"
    for name in set(site_query.ENGINE_FILES) - {site_query.ENGINE_IN_PARTS}:
        assert (engine_dir / name).is_file(), name
    # DuckDB's WebAssembly in parts under every host's per-file limit; joined, they are the file itself.
    parts = sorted(engine_dir.glob("duckdb-eh.*.wasm"), key=lambda p: int(p.name.split(".")[1]))
    whole = site_query.find_engine()[0].modules_dir / site_query.ENGINE_FILES[site_query.ENGINE_IN_PARTS]
    assert len(parts) >= 4 and not (engine_dir / site_query.ENGINE_IN_PARTS).exists()
    assert all(p.stat().st_size <= site_query.ENGINE_PART_BYTES for p in parts)
    import mimetypes
    import atlasgen.serve  # noqa: F401  (registers .wasm)
    # Served as WebAssembly, which hosts compress (34 MB is ~8 MB gzipped), not as octet-stream, which they do not.
    assert {mimetypes.guess_type(p.name)[0] for p in parts} == {"application/wasm"}
    assert b"".join(p.read_bytes() for p in parts) == whole.read_bytes()
    assert f'data-engine-parts="{len(parts)}"' in (site_dir / "query.html").read_text()
    from atlasgen.site.hosting import hosting_notes
    assert not [n for n in hosting_notes(site_dir)[1] if "per file" in n], "no file over a host's per-file limit"
    module = (site_dir / "assets" / "duckdb" / "duckdb-browser.js").read_text()
    assert 'from"apache-arrow"' not in module and "globalThis.Arrow" in module
    assert summary["query_engine_bytes"] > 30e6  # the wasm files are the bulk
    for page in (site_dir / "index.html", site_dir / "features" / "0.html", site_dir / "query.html"):
        assert nav_links(page)[-1].endswith("query.html"), page
    schema = json.loads((site_dir / "data" / "schema.json").read_text())
    assert set(schema["tables"]) == set(site_query.SITE_TABLES) | {"site_pictures"}
    con = duckdb.connect(str(out / "atlas.duckdb"), read_only=True)
    try:
        for table, dropped in site_query.SITE_TABLES.items():
            entry = schema["tables"][table]
            columns = [c["name"] for c in entry["columns"]]
            assert not set(columns) & dropped and columns
            path = str(site_dir / "data" / entry["file"])
            select = ", ".join(columns)
            for a, b in ((f"SELECT {select} FROM {table}", f"SELECT * FROM read_parquet('{path}')"),
                         (f"SELECT * FROM read_parquet('{path}')", f"SELECT {select} FROM {table}")):
                assert con.execute(f"SELECT count(*) FROM ({a} EXCEPT ALL {b})").fetchone()[0] == 0, table
            assert con.execute(f"SELECT count(*) FROM read_parquet('{path}')").fetchone()[0] == entry["n_rows"]
        for table, dropped in (("images", {"source", "corpus_path"}), ("sae_runs", {"weights_path"})):
            described = [r[0] for r in con.execute(
                f"DESCRIBE SELECT * FROM read_parquet('{site_dir / 'data' / (table + '.parquet')}')").fetchall()]
            assert described and not dropped & set(described), (table, described)
        pictures = con.execute(f"SELECT kind, id, src FROM read_parquet('{site_dir / 'data' / 'site_pictures.parquet'}')"
                               ).fetchall()
    finally:
        con.close()
    assert {k for k, _, _ in pictures} == {"feature", "image"}
    for _, _, src in pictures:
        assert (site_dir / src).is_file(), src
    assert not (site_dir / "data" / "embeddings.parquet").exists()


@needs_engine
def test_ready_queries_run_on_the_store(with_query):
    """The first label in turn is the hostile one: it is escaped in the page and quoted right in the SQL."""
    import html
    out, _ = with_query
    page = (out / "site" / "query.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert" in page
    keys = re.findall(r'class="sql-example" data-key="([a-z]+)"', page)
    assert keys == ["label", "together", "image"]
    sqls = [html.unescape(s) for s in re.findall(r'data-sql="([^"]*)"', page)]
    assert "alert(" in sqls[0]
    con = duckdb.connect(str(out / "atlas.duckdb"), read_only=True)
    try:
        for key, sql in zip(keys, sqls):
            assert con.execute(sql).fetchall(), f"the {key} example returns no rows"
    finally:
        con.close()


def test_sql_false_leaves_the_page_out(synthetic, tmp_path):
    out, summary = build_site(synthetic, tmp_path / "build", SiteConfig(features_per_page=24, sql=False))
    site_dir = out / "site"
    assert summary["query_page"] is False
    assert not (site_dir / "query.html").exists() and not (site_dir / "data").exists()
    assert not (site_dir / "assets" / "duckdb").exists()
    assert not any("query.html" in link for link in nav_links(site_dir / "index.html"))


def test_without_the_npm_files_the_page_is_left_out_with_one_line(synthetic, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(paths_mod, "duckdb_wasm_modules", lambda: None)
    set_quiet(False)
    try:
        out, summary = build_site(synthetic, tmp_path / "build", SiteConfig(features_per_page=24, search_index=False))
    finally:
        set_quiet(True)
    lines = [line for line in capsys.readouterr().err.splitlines() if "Query page" in line]
    assert lines == ["site: the Query page is left out: DuckDB-WASM is not installed (run `npm ci --prefix "
                     "vendor/duckdb-wasm`, or set ATLASGEN_DUCKDB_WASM to its node_modules)"]
    assert summary["query_page"] is False and (out / "site" / "index.html").is_file()
    assert not (out / "site" / "query.html").exists()
    assert not any("query.html" in link for link in nav_links(out / "site" / "index.html"))
