"""decompose: any image → the store's model → SAE features, as the encode stage would give them."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from atlasgen.cli import app
from atlasgen.decompose import Decomposer, format_table
from atlasgen.store import Store


@pytest.fixture(scope="module")
def corpus_image(tiny_encoded):
    """The corpus image with the most stored activations, its path and its stored activations."""
    with Store.open(tiny_encoded, read_only=True) as store:
        image_id = store.scalar("SELECT image_id FROM activations GROUP BY image_id ORDER BY count(*) DESC, "
                                "image_id LIMIT 1")
        rel = store.scalar("SELECT corpus_path FROM images WHERE image_id = ?", [image_id])
        stored = dict(store.query("SELECT feature_id, value FROM activations WHERE image_id = ?", [image_id]))
    return tiny_encoded / rel, stored


def test_decompose_matches_stored_activations(tiny_encoded, corpus_image):
    path, stored = corpus_image
    with Store.open(tiny_encoded, read_only=True) as store:
        dec = Decomposer(store, "cpu")(path)
    got = {f["feature_id"]: f["value"] for f in dec.features}
    values = [f["value"] for f in dec.features]
    assert values == sorted(values, reverse=True)
    assert len(stored) > 0
    # Same features, same values: decompose reads the corpus file the way ingest + embed did.
    assert set(got) == set(stored)
    for fid, value in stored.items():
        assert got[fid] == pytest.approx(value, rel=1e-3, abs=1e-4), fid


def test_decompose_differs_between_images(tiny_encoded):
    """Guard against a decomposer that ignores its input: two different classes give different features."""
    with Store.open(tiny_encoded, read_only=True) as store:
        rows = store.query("SELECT corpus_path FROM images WHERE label IN ('red circle', 'stripes') "
                           "QUALIFY row_number() OVER (PARTITION BY label ORDER BY image_id) = 1")
        decomposer = Decomposer(store, "cpu")
        a, b = (decomposer(tiny_encoded / r[0]) for r in rows)
    top_a = [f["feature_id"] for f in a.features[:5]]
    top_b = [f["feature_id"] for f in b.features[:5]]
    assert top_a != top_b


def test_cli_prints_the_table(tiny_encoded, corpus_image):
    path, stored = corpus_image
    result = CliRunner().invoke(app, ["decompose", str(path), "--out", str(tiny_encoded), "--top", "5", "-q"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "showing the top 5" in lines[0]
    assert lines[1].split()[:3] == ["feature", "label", "value"]
    rows = lines[2:7]
    assert all("█" in r for r in rows)
    top = max(stored, key=stored.get)
    assert rows[0].split()[0] == str(top)


def test_cli_html_writes_a_self_contained_page(tiny_encoded, corpus_image, tmp_path):
    path, stored = corpus_image
    html_path = tmp_path / "dec.html"
    result = CliRunner().invoke(app, ["decompose", str(path), "--out", str(tiny_encoded), "--top", "8",
                                      "--html", str(html_path), "-q"])
    assert result.exit_code == 0, result.output
    html = html_path.read_text()
    assert html.startswith("<!doctype html>")
    assert 'src="data:image/webp;base64,' in html  # the image itself, inline
    top = max(stored, key=stored.get)
    assert f"features/{top}.html" in html
    assert "<link" not in html and "<script" not in html  # nothing to fetch


def test_non_image_is_a_clean_error(tiny_encoded, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a picture")
    result = CliRunner().invoke(app, ["decompose", str(bad), "--out", str(tiny_encoded)])
    assert result.exit_code != 0
    assert "error:" in result.output and "notes.jpg" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    result = CliRunner().invoke(app, ["decompose", str(tmp_path / "missing.png"), "--out", str(tiny_encoded)])
    assert result.exit_code != 0 and "does not exist" in result.output


def test_store_without_build_is_a_clean_error(tmp_path):
    from PIL import Image
    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    result = CliRunner().invoke(app, ["decompose", str(tmp_path / "red.png"), "--out", str(tmp_path / "nothing")])
    assert result.exit_code != 0 and "error:" in result.output and "Traceback" not in result.output


def test_format_table_bars_scale_with_value(tmp_path):
    from atlasgen.decompose import Decomposition
    dec = Decomposition(tmp_path / "x.png", [{"feature_id": 3, "label": "a", "value": 2.0, "picture": None},
                                              {"feature_id": 9, "label": "b", "value": 1.0, "picture": None}])
    lines = format_table(dec).splitlines()
    assert lines[2].count("█") == 2 * lines[3].count("█")
