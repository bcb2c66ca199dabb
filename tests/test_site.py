"""The site stage on a synthetic store (every table filled, small WebP pictures, a hostile label), the serve
command, netlify.toml, and a crawl of the tiny build's site."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from typer.testing import CliRunner

from atlasgen import site, testing
from atlasgen.cli import app
from atlasgen.headers import SECURITY_HEADERS
from atlasgen.config import SiteConfig
from atlasgen.progress import set_quiet
from atlasgen.site import pages
from atlasgen.site.data import safe_tag
from atlasgen.stages import site as site_stage
from atlasgen.store import Store

REPO = Path(__file__).resolve().parent.parent


make_synthetic_store = testing.make_synthetic_store
HOSTILE = testing.HOSTILE_LABEL
N_FEATURES = 64
SMALL_PAGES = SiteConfig(features_per_page=16, chunk_size=20)


@pytest.fixture(scope="module")
def synthetic_out(tmp_path_factory) -> Path:
    """A synthetic store with no site yet (copy before changing)."""
    set_quiet(True)
    return make_synthetic_store(tmp_path_factory.mktemp("synthetic") / "build", n_features=N_FEATURES, n_images=160,
                                n_seeds=2, n_pairs=2, slerp_steps=5)


@pytest.fixture(scope="module")
def built(synthetic_out, tmp_path_factory) -> tuple[Path, dict]:
    """(site folder, summary) of the site stage on a private copy of the synthetic store."""
    out = tmp_path_factory.mktemp("built") / "build"
    shutil.copytree(synthetic_out, out)
    with Store.open(out) as store:
        summary = site_stage.run(SMALL_PAGES, store)
    return out / "site", summary


# --- a crawler ---------------------------------------------------------------------------------------
class _Links(HTMLParser):
    URL_ATTRS = {"href", "src", "data-src", "action"}

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self.scripts: list[dict] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "script":
            self.scripts.append(attrs)
        for name, value in attrs.items():
            if name in self.URL_ATTRS and value is not None:
                self.urls.append(value)
        if "srcset" in attrs:
            self.urls += [part.strip().split()[0] for part in attrs["srcset"].split(",") if part.strip()]


def parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def crawl(site_dir: Path) -> dict[str, list[str]]:
    """Check every link/src on every page resolves to a file in the site; returns problems by kind."""
    problems: dict[str, list[str]] = {"broken": [], "external": [], "absolute": []}
    for page in sorted(site_dir.rglob("*.html")):
        if "pagefind" in page.relative_to(site_dir).parts:
            continue
        for url in parse(page).urls:
            parsed = urlparse(url)
            if parsed.scheme == "data":
                continue
            if parsed.scheme or parsed.netloc:
                problems["external"].append(f"{page.name}: {url}")
                continue
            if parsed.path.startswith("/") and page.relative_to(site_dir).as_posix() == "404.html":
                # The host sends 404.html for a missing path at any depth: only links from its root work there.
                if not (site_dir / unquote(parsed.path).lstrip("/")).is_file():
                    problems["broken"].append(f"404.html: {url}")
                continue
            if parsed.path.startswith("/"):
                problems["absolute"].append(f"{page.name}: {url}")
                continue
            if not parsed.path:  # "#anchor" or "?q=" on the page itself
                continue
            target = (page.parent / unquote(parsed.path)).resolve()
            if not target.is_file() or site_dir.resolve() not in target.parents:
                problems["broken"].append(f"{page.relative_to(site_dir)}: {url}")
    return problems


# --- the synthetic site ------------------------------------------------------------------------------
def test_every_page_type_exists(built):
    site_dir, summary = built
    for rel in ("index.html", "features/index.html", "features/page-002.html", "decompositions.html",
                "combinations.html", "search.html", "map.html", "probes.html", "toy.html", "assets/site.css",
                "assets/decomposition.css", "assets/features.js", "assets/combinations.js",
                "pagefind/pagefind-ui.js", "features/data-000.json"):
        assert (site_dir / rel).is_file(), rel
    for fid in range(N_FEATURES):
        assert (site_dir / "features" / f"{fid}.html").is_file(), fid
    assert summary["n_feature_pages"] == N_FEATURES
    assert summary["n_missing_pictures"] == 0
    assert not list(site_dir.parent.glob(".site.tmp*")), "the temp build folder was left behind"


def test_crawler_finds_no_broken_or_external_links(built):
    site_dir, _ = built
    problems = crawl(site_dir)
    assert problems == {"broken": [], "external": [], "absolute": []}


def test_crawler_catches_a_broken_link(built, tmp_path):
    """The crawler itself can fail: a page with a dangling link and an external one is reported."""
    site_dir = tmp_path / "site"
    shutil.copytree(built[0], site_dir, ignore=shutil.ignore_patterns("pagefind", "renders", "thumbs"))
    (site_dir / "bad.html").write_text('<a href="nope.html">x</a><img src="https://cdn.example.com/x.png">')
    problems = crawl(site_dir)
    assert any("nope.html" in p for p in problems["broken"])
    assert any("cdn.example.com" in p for p in problems["external"])
    assert any("renders/" in p for p in problems["broken"]), "missing pictures must be reported"


def test_hostile_label_is_escaped(built):
    site_dir, _ = built
    pages = [site_dir / "features" / "0.html", site_dir / "features" / "index.html", site_dir / "index.html",
             site_dir / "decompositions.html", site_dir / "combinations.html"]
    seen_escaped = 0
    for page in pages:
        text = page.read_text()
        assert "<script>alert" not in text, page
        seen_escaped += text.count("&lt;script&gt;alert")
        for script in parse(page).scripts:
            assert script.get("src"), f"inline script in {page.name}: {script}"
    assert seen_escaped >= 3, "the hostile label should appear (escaped) on the feature page, listing and overview"
    # The data files carry it as JSON text; features.js puts it in the page with textContent only.
    rows = json.loads((site_dir / "features" / "data-000.json").read_text())
    assert rows[0][0] == 0 and rows[0][1].startswith(HOSTILE)
    assert "innerHTML" not in (site_dir / "assets" / "features.js").read_text()


def test_no_inline_scripts_or_styles_anywhere(built):
    site_dir, _ = built
    for page in site_dir.rglob("*.html"):
        if "pagefind" in page.parts:
            continue
        text = page.read_text()
        assert " style=" not in text, f"{page}: inline style attribute (blocked by the CSP)"
        assert "<style" not in text, page
        for script in parse(page).scripts:
            assert script.get("src"), f"inline script in {page}"
        assert f'content="{site.csp_meta()}"' in text.replace("&#39;", "'"), f"{page}: CSP meta tag missing"


def test_listing_is_paged_and_chunked(built):
    site_dir, _ = built
    first = parse(site_dir / "features" / "index.html")
    tiles = re.findall(r'class="tile"', (site_dir / "features" / "index.html").read_text())
    assert len(tiles) == SMALL_PAGES.features_per_page
    pages = sorted((site_dir / "features").glob("page-*.html"))
    assert len(pages) == N_FEATURES // SMALL_PAGES.features_per_page - 1
    assert "page-004.html" in first.urls and "4.html" not in [u for u in first.urls if u == "63.html"]
    chunks = sorted((site_dir / "features").glob("data-*.json"))
    assert len(chunks) == -(-N_FEATURES // SMALL_PAGES.chunk_size)
    ids = [row[0] for c in chunks for row in json.loads(c.read_text())]
    assert ids == list(range(N_FEATURES))
    grid = re.search(r'id="feature-grid"[^>]*data-chunks="(\d+)"', (site_dir / "features" / "index.html").read_text())
    assert grid and int(grid.group(1)) == len(chunks)


def test_feature_page_content(built, synthetic_out):
    site_dir, _ = built
    with Store.open(synthetic_out, read_only=True) as store:
        fid, grid_x = store.con.execute("SELECT feature_id, grid_x FROM features WHERE n_active > 0 AND grid_x IS "
                                        "NOT NULL ORDER BY feature_id LIMIT 1").fetchone()
        off_map = store.scalar("SELECT min(feature_id) FROM features WHERE grid_x IS NULL")
        n_renders = store.scalar("SELECT count(*) FROM renders WHERE kind = 'feature' AND feature_a = ?", [fid])
        n_top = store.scalar("SELECT count(*) FROM top_images WHERE feature_id = ?", [fid])
        n_reactivating = store.scalar("SELECT count(*) FROM renders WHERE kind = 'feature' AND feature_a = ? "
                                      "AND self_activation > 0", [fid])
        in_pair = store.scalar("SELECT feature_a FROM renders WHERE kind = 'sum' LIMIT 1")
        in_probe = store.scalar("SELECT min(feature_id) FROM probes")
    text = (site_dir / "features" / f"{fid}.html").read_text()
    renders = re.search(r'<section class="renders".*?</section>', text, re.S).group(0)
    assert renders.count("<img") == n_renders >= 1
    assert renders.count("re-activates") == n_reactivating
    top = re.search(r'<section class="top-images".*?</section>', text, re.S).group(0)
    assert top.count("<img") == n_top >= 1 and "act 0." in top
    assert '<svg class="plot histogram"' in text and text.count("<rect") >= 20
    assert f'href="../map.html#f={fid}"' in text and '<svg class="minimap"' in text
    assert "Most similar features" in text and "Most co-activating features" in text
    assert 'rel="next"' in text and "data-pagefind-body" in text
    assert "map.html#f=" not in (site_dir / "features" / f"{off_map}.html").read_text()
    assert "combinations.html#pair-" in (site_dir / "features" / f"{in_pair}.html").read_text()
    assert "probes.html#probe-shrink" in (site_dir / "features" / f"{in_probe}.html").read_text()
    # A dead feature says so rather than showing an empty histogram.
    dead = (site_dir / "features" / f"{N_FEATURES - 1}.html").read_text()
    assert "never fires" in dead and "no activations" in dead


def test_pictures_have_sizes_and_are_hard_linked(built):
    site_dir, summary = built
    img = re.search(r'<img src="\.\./(renders/[^"]+)" width="(\d+)" height="(\d+)"',
                    (site_dir / "features" / "1.html").read_text())
    assert img and (int(img.group(2)), int(img.group(3))) == (48, 48)
    assert (site_dir / img.group(1)).stat().st_nlink >= 2 or summary["n_copied_pictures"] > 0
    thumbs = list((site_dir / "thumbs").rglob("*.webp"))
    assert thumbs and all(p.parent.name == safe_tag("synthetic-encode") for p in thumbs), "thumbs sit under the encode hash"


def test_overview_and_svg_plots(built):
    site_dir, _ = built
    text = (site_dir / "index.html").read_text()
    assert text.count('<svg class="plot line"') == 4  # fvu, mse, L0, idle features during training
    assert "synthetic-vits16" in text and "0.210" in text  # model name and the run's FVU
    assert "1 input skipped" in text
    assert text.count('class="tile"') == SiteConfig().n_gallery
    for href in ("features/index.html", "map.html", "inversions.html", "combinations.html", "decompositions.html",
                 "probes.html", "toy.html", "search.html"):
        assert f'href="{href}"' in text


def test_decompositions_one_image_per_label(built, synthetic_out):
    site_dir, _ = built
    text = (site_dir / "decompositions.html").read_text()
    figures = re.findall(r'<figure class="decomposition">.*?</figure>', text, re.S)
    assert len(figures) == SiteConfig().n_decompose_auto
    assert len({re.search(r"<figcaption>(.*?)</figcaption>", f).group(1).split(" · ")[-1] for f in figures}) == 8
    with Store.open(synthetic_out, read_only=True) as store:
        n_active_0 = store.scalar("SELECT count(*) FROM activations WHERE image_id = 0")
    assert figures[0].count('class="decomposition-feature"') == n_active_0
    assert figures[0].count('<svg class="decomposition-bar"') == n_active_0
    widths = [float(w) for w in re.findall(r'<rect width="([\d.]+)" height="6"/></svg>', figures[0])]
    assert widths[0] == 100.0 and widths == sorted(widths, reverse=True), "bars sorted, strongest full width"


def test_decomposition_partial_standalone():
    """`atlasgen decompose --html` renders the partial on its own, with data: URIs and inlined CSS."""
    env = site.make_env()
    html = env.get_template("_decomposition.html").render(
        image={"src": "data:image/webp;base64,AAAA", "name": "photo <1>.jpg"},
        features=[{"feature_id": 5, "label": "<b>x</b>", "value": 0.4, "picture": "data:image/webp;base64,BBBB"},
                  {"feature_id": 9, "label": "y", "value": 0.1, "picture": None}])
    assert 'src="data:image/webp;base64,AAAA"' in html and "photo &lt;1&gt;.jpg" in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html and html.count("decomposition-bar") == 2
    assert '<rect width="25.0"' in html
    assert ".decomposition-features" in site.decomposition_css()


def test_combinations_page(built, synthetic_out):
    site_dir, _ = built
    text = (site_dir / "combinations.html").read_text()
    with Store.open(synthetic_out, read_only=True) as store:
        pairs = store.query("SELECT DISTINCT feature_a, feature_b FROM renders WHERE kind = 'sum' ORDER BY ALL")
        n_steps = store.scalar("SELECT count(*) FROM renders WHERE kind = 'slerp' AND feature_a = ? AND "
                               "feature_b = ?", list(pairs[0]))
    assert len(pairs) == 2
    for a, b in pairs:
        assert f'id="pair-{a}-{b}"' in text and f'<option value="{a}-{b}">' in text
    first = re.search(r'<section class="pair".*?</section>', text, re.S).group(0)
    assert first.count("data-src=") == n_steps == 5
    assert f"50% #{pairs[0][0]} + 50% #{pairs[0][1]}" in first and 'type="range"' in first
    assert first.count("⊥") == 2


def test_page_table_gives_the_nav_and_every_stage_page_has_a_writer():
    assert pages.NAV == (("Overview", "index.html"), ("Features", "features/index.html"), ("Map", "map.html"),
                         ("Inversions", "inversions.html"), ("Combinations", "combinations.html"), ("Decompositions", "decompositions.html"),
                         ("Probes", "probes.html"), ("Toy", "toy.html"), ("Search", "search.html"))
    written_by = {p.path: p.write for p in pages.PAGES}
    assert {path for provided in pages.stage_pages().values() for path in provided} <= set(written_by)
    with pytest.raises(LookupError, match="query.html"):
        pages.check_stage_pages(pages.PAGES, {**pages.stage_pages(), "query": ("query.html",)})


def test_a_stage_page_without_a_writer_fails_at_import():
    """The registry checks, when it is built (at import), that every page a stage declares has a writer."""
    import dataclasses
    from atlasgen.stages import REGISTRY, Registry
    toy = dataclasses.replace(REGISTRY["toy"], pages=("toy.html", "query.html"))
    with pytest.raises(LookupError, match="query.html"):
        Registry(tuple(toy if s.name == "toy" else s for s in REGISTRY))


def test_stage_pages_are_written_once_their_stage_has_run(built):
    """In the synthetic store every stage has run: the probe sweep gets its chart; the toy left no frames and
    the layout no map, so those pages say so."""
    site_dir, _ = built
    probes = (site_dir / "probes.html").read_text()
    assert 'id="probe-shrink"' in probes and 'class="probe-chart"' in probes
    assert "was not built" in (site_dir / "toy.html").read_text()
    assert "has not written a map yet" in (site_dir / "map.html").read_text()


def test_stage_pages_are_placeholders_until_their_stage_has_run(synthetic_out, tmp_path):
    out = shutil.copytree(synthetic_out, tmp_path / "build")
    with Store.open(out) as store:
        store.con.execute("DELETE FROM stage_runs WHERE stage IN ('layout', 'probe', 'toy', 'render')")
        site_stage.run(SiteConfig(search_index=False), store)
    site_dir = out / "site"
    for page, stage in (("map.html", "layout"), ("probes.html", "probe"), ("toy.html", "toy"),
                        ("inversions.html", "render")):
        text = (site_dir / page).read_text()
        assert "was not built" in text and f"atlasgen {stage} --out" in text, page
    assert not (site_dir / "probes").exists()
    assert not (site_dir / "pagefind").exists() and 'id="search"' not in (site_dir / "search.html").read_text()
    assert crawl(site_dir)["broken"] == []


def test_one_picture_per_feature_on_the_map_and_the_site(synthetic_out, tmp_path):
    """The store's one picture rule (a render that re-activates the feature first, then the highest cosine,
    then the lowest seed; missing files skipped; else the top image's thumbnail) is what the map's tiles and
    the site's feature tiles show."""
    import numpy as np
    from PIL import Image
    from atlasgen.config import LayoutConfig
    from atlasgen.stages import layout
    out = shutil.copytree(synthetic_out, tmp_path / "build")
    with Store.open(out) as store:
        def render(fid: int, seed: int, self_activation: float, cosine: float, rgb: tuple) -> Path:
            rel = store.scalar("SELECT path FROM renders WHERE kind = 'feature' AND feature_a = ? AND seed = ?",
                               [fid, seed])
            store.con.execute("UPDATE renders SET self_activation = ?, cosine = ? WHERE path = ?",
                              [self_activation, cosine, rel])
            Image.new("RGB", (48, 48), rgb).save(out / rel, "WEBP", quality=90)
            return out / rel
        r = {(1, 0): render(1, 0, 0.0, 0.9, (200, 30, 30)),    # the lowest seed, but it does not re-activate
             (1, 1): render(1, 1, 0.2, 0.3, (30, 200, 30)),
             (2, 0): render(2, 0, 0.1, 0.3, (30, 30, 200)),
             (2, 1): render(2, 1, 0.1, 0.7, (200, 200, 30)),   # both re-activate: the better cosine
             (3, 0): render(3, 0, 0.1, 0.5, (30, 200, 200)),   # a tie: the lowest seed
             (3, 1): render(3, 1, 0.1, 0.5, (200, 30, 200)),
             (5, 0): render(5, 0, 0.1, 0.4, (120, 120, 250)),
             (5, 1): render(5, 1, 0.3, 0.8, (250, 250, 250))}
        r[5, 1].unlink()  # the best one is missing: the next
        store.con.execute("DELETE FROM renders WHERE kind = 'feature' AND feature_a = 4")  # none: its top image
        top_image = store.scalar("SELECT image_id FROM top_images WHERE feature_id = 4 AND rank = 0")
        assert top_image is not None
        expected = {1: r[1, 1], 2: r[2, 1], 3: r[3, 0], 4: store.paths.thumb(top_image), 5: r[5, 0]}
        assert store.feature_pictures([*expected, N_FEATURES + 5]) == expected

        placed = np.array(list(expected))
        cells = np.array([[0, 0], [1, 0], [2, 0], [3, 0], [0, 1]])
        cell_px = 16
        layout.write_map(store, LayoutConfig(grid_side=4, cell_px=cell_px, tile_px=64), placed, cells, [""] * 5)
        site_stage.run(SiteConfig(search_index=False), store)

    site_dir = out / "site"
    (map_dir,) = (site_dir / "map").iterdir()  # map/<content hash>/
    mosaic = np.asarray(Image.open(map_dir / "0" / "0_0.webp").convert("RGB"), np.float64)
    for fid, (x, y) in zip(placed, cells):
        cell = mosaic[y * cell_px:(y + 1) * cell_px, x * cell_px:(x + 1) * cell_px]
        errors = {path: np.abs(cell - layout._cell_image(path, cell_px)).mean()
                  for path in [expected[fid]] + [p for (f, _), p in r.items() if f == fid and p.exists()]}
        assert min(errors, key=errors.get) == expected[fid] and errors[expected[fid]] < 20, (fid, errors)
    rows = {row[0]: row[5] for chunk in sorted((site_dir / "features").glob("data-*.json"))
            for row in json.loads(chunk.read_text())}
    for fid, path in expected.items():
        src = (f"thumbs/{safe_tag('synthetic-encode')}/{path.name}" if path.parent.name == "thumbs"
               else path.relative_to(out).as_posix())
        assert rows[fid] == src, fid
        assert (site_dir / src).is_file()


def test_odd_file_names_are_encoded(synthetic_out, tmp_path):
    """A picture path with a space, quotes and markup is percent-encoded in src and still resolves."""
    out = shutil.copytree(synthetic_out, tmp_path / "build")
    with Store.open(out) as store:
        render_id, path = store.con.execute("SELECT render_id, path FROM renders WHERE kind = 'feature' AND "
                                            "feature_a = 3 ORDER BY seed LIMIT 1").fetchone()
        odd = "renders/feature/we ird\"<b>'#1.webp"
        (out / path).rename(out / odd)
        store.con.execute("UPDATE renders SET path = ? WHERE render_id = ?", [odd, render_id])
        site_stage.run(SiteConfig(search_index=False), store)
    text = (out / "site" / "features" / "3.html").read_text()
    assert "we%20ird%22%3Cb%3E%27%231.webp" in text and "<b>" not in text
    assert crawl(out / "site")["broken"] == []


def test_rerun_replaces_the_site_and_reset_keeps_it(synthetic_out, tmp_path):
    out = shutil.copytree(synthetic_out, tmp_path / "build")
    with Store.open(out) as store:
        site_stage.run(SiteConfig(search_index=False), store)
        stale = out / "site" / "features" / "stale.html"
        stale.write_text("old")
        site_stage.run(SiteConfig(search_index=False, title="Second <title>"), store)
        assert not stale.exists()
        assert "Second &lt;title&gt;" in (out / "site" / "index.html").read_text()
        site_stage.reset(store)
        assert (out / "site" / "index.html").exists(), "readers keep the site until a new one is swapped in"


def test_cli_site_builds_and_hostile_config_title(synthetic_out, tmp_path):
    out = shutil.copytree(synthetic_out, tmp_path / "build")
    config = tmp_path / "atlas.toml"
    config.write_text('[site]\ntitle = "<img src=x onerror=alert(1)>"\nsearch_index = false\n')
    result = CliRunner().invoke(app, ["site", "--out", str(out), "--config", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    text = (out / "site" / "index.html").read_text()
    assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert (out / "site" / "features" / "index.html").is_file()


def test_cli_site_bad_option_is_a_clear_error(synthetic_out, tmp_path):
    out = shutil.copytree(synthetic_out, tmp_path / "build")
    config = tmp_path / "atlas.toml"
    config.write_text("[site]\nfeatures_per_page = 0\n")
    result = CliRunner().invoke(app, ["site", "--out", str(out), "--config", str(config), "--quiet"])
    assert result.exit_code == 2 and "features_per_page" in result.output and "Traceback" not in result.output
    assert not (out / "site").exists()


def test_cli_site_needs_upstream_stages(tmp_path):
    result = CliRunner().invoke(app, ["site", "--out", str(tmp_path / "empty"), "--quiet"])
    assert result.exit_code == 2 and "needs the layout stage" in result.output
    assert "Traceback" not in result.output


# --- serve and hosting -------------------------------------------------------------------------------
def test_serve_command_serves_the_site(built):
    site_dir, _ = built
    out = site_dir.parent
    proc = subprocess.Popen([sys.executable, "-m", "atlasgen.cli", "serve", "--out", str(out), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert match, f"no URL printed: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        with urllib.request.urlopen(match.group(1) + "index.html", timeout=10) as resp:
            body = resp.read().decode()
            headers = resp.headers
        assert "<title>" in body and SECURITY_HEADERS["Content-Security-Policy"] == headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
        with urllib.request.urlopen(match.group(1) + "pagefind/pagefind-ui.js", timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("text/javascript")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(match.group(1) + "renders/", timeout=10)  # no directory listings
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_serve_without_a_site_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["serve", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no site at" in result.output and "atlasgen site" in result.output


def test_netlify_toml_matches_the_site_policy():
    netlify = tomllib.loads((REPO / "netlify.toml").read_text())
    assert netlify["build"]["publish"] == "build/site"
    by_path = {h["for"]: h["values"] for h in netlify["headers"]}
    everything = by_path["/*"]
    assert everything["Content-Security-Policy"] == site.csp_header()
    assert "default-src 'self'" in everything["Content-Security-Policy"]
    assert "'unsafe-inline'" not in everything["Content-Security-Policy"]
    assert everything["X-Content-Type-Options"] == "nosniff" and everything["Referrer-Policy"]
    assert everything["X-Frame-Options"] == "DENY" and "frame-ancestors 'none'" in everything["Content-Security-Policy"]
    for images in ("/renders/*", "/thumbs/*"):
        assert by_path[images]["Cache-Control"] == "public, max-age=31536000, immutable"


# --- the real tiny build ---------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_build_site_crawls_clean(tiny_build):
    site_dir = tiny_build / "site"
    assert (site_dir / "index.html").is_file() and (site_dir / "pagefind" / "pagefind-ui.js").is_file()
    assert crawl(site_dir) == {"broken": [], "external": [], "absolute": []}
    with Store.open(tiny_build, read_only=True) as store:
        n_features = store.count("features")
        fid = store.scalar("SELECT feature_a FROM renders WHERE kind = 'feature' LIMIT 1")
    assert len(list((site_dir / "features").glob("[0-9]*.html"))) == n_features
    assert "<img" in (site_dir / "features" / f"{fid}.html").read_text()


def test_hosting_notes_name_the_limit_the_file_and_the_fix(tmp_path):
    """The site stage says which static-host limits a site is over (here a 30 MiB engine file, written sparse)."""
    from atlasgen.site.hosting import hosting_notes
    (tmp_path / "index.html").write_text("<p>hi</p>")
    assert hosting_notes(tmp_path)[1] == []
    engine = tmp_path / "assets" / "duckdb" / "duckdb-eh.wasm"
    engine.parent.mkdir(parents=True)
    with open(engine, "wb") as f:
        f.truncate(30 << 20)
    figures, notes = hosting_notes(tmp_path)
    assert figures["largest_path"].endswith("duckdb-eh.wasm") and figures["n_files"] == 2
    assert any("Cloudflare Pages" in n and "duckdb-eh.wasm" in n and "sql = false" in n
               for n in notes), notes
    assert not any("GitHub Pages" in n for n in notes)  # 30 MiB is within its 100 MiB per file
