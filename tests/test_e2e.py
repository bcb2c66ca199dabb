"""End to end: `atlasgen build --preset tiny` builds a whole site; a rerun skips every stage."""
from __future__ import annotations

from typer.testing import CliRunner

from atlasgen.cli import app
from atlasgen.stages import REGISTRY
from atlasgen.store import Store

runner = CliRunner()


def test_tiny_build_fills_every_stage_and_the_site(tiny_build):
    with Store.open(tiny_build, read_only=True) as store:
        for stage in REGISTRY.names:
            row = store.stage_row(stage)
            assert row is not None and row["status"] == "done", f"stage {stage} did not finish"
        assert store.count("images") >= 100
        assert store.count("embeddings") == store.count("images")
        assert store.count("activations") > 0
        assert store.scalar("SELECT count(*) FROM renders WHERE kind = 'feature'") > 0
        assert store.scalar("SELECT count(*) FROM features WHERE grid_x IS NOT NULL") > 0
    site = tiny_build / "site"
    assert (site / "index.html").exists()
    assert len(list((site / "features").glob("*.html"))) > 10


def test_rerun_skips_every_stage_and_query_answers(tiny_build, tmp_path):
    import shutil
    out = tmp_path / "build"
    shutil.copytree(tiny_build, out)
    with Store.open(out, read_only=True) as store:
        before = {s: store.stage_row(s)["finished_at"] for s in REGISTRY.names}
    result = runner.invoke(app, ["build", "--out", str(out)])  # remembers --preset tiny
    assert result.exit_code == 0, result.output
    assert "site:" in result.output
    with Store.open(out, read_only=True) as store:
        after = {s: store.stage_row(s)["finished_at"] for s in REGISTRY.names}
    assert after == before, "a stage reran although nothing changed"
    result = runner.invoke(app, ["query", "SELECT count(*) AS n FROM images", "--out", str(out)])
    assert result.exit_code == 0 and "n" in result.output
    result = runner.invoke(app, ["info", "--out", str(out)])
    assert result.exit_code == 0 and "encode" in result.output and "done" in result.output


def test_map_tiles_site_and_decompose_show_one_picture_per_feature(tiny_build):
    """The one picture rule on a real build: for the features `decompose` finds in a corpus image, its
    picture is the one the site's feature tiles link and the one drawn in the feature's map cell."""
    import json

    import numpy as np
    from PIL import Image

    from atlasgen.decompose import Decomposer
    from atlasgen.stages.layout import _cell_image
    index = json.loads((tiny_build / "map" / "index.json").read_text())
    cell_px, tile_px, z = index["cell_px"], index["tile_px"], len(index["levels"]) - 1
    n_tiles = index["levels"][z]["n_tiles"]
    mosaic = np.zeros((n_tiles * tile_px, n_tiles * tile_px, 3))
    for ty in range(n_tiles):
        for tx in range(n_tiles):
            tile = np.asarray(Image.open(tiny_build / "map" / str(z) / f"{tx}_{ty}.webp").convert("RGB"))
            mosaic[ty * tile_px:ty * tile_px + tile.shape[0], tx * tile_px:tx * tile_px + tile.shape[1]] = tile
    cells = {f["id"]: (f["x"], f["y"]) for f in index["features"]}
    site_src = {row[0]: row[5] for chunk in (tiny_build / "site" / "features").glob("data-*.json")
                for row in json.loads(chunk.read_text())}
    with Store.open(tiny_build, read_only=True) as store:
        image_ids = [r[0] for r in store.query("SELECT image_id FROM images ORDER BY image_id LIMIT 4")]
        decomposer = Decomposer(store, "cpu")
        features = [f for i in image_ids for f in decomposer(store.paths.corpus_image(i)).features]
        renders = {}
        for fid, rel in store.query("SELECT feature_a, path FROM renders WHERE kind = 'feature'"):
            renders.setdefault(fid, []).append(tiny_build / rel)
    n_on_map = 0
    for f in features:
        fid, picture = f["feature_id"], f["picture"]
        assert picture is not None, fid
        assert site_src[fid] == picture.relative_to(tiny_build).as_posix(), fid
        if fid in cells and len(renders.get(fid, ())) > 1:
            x, y = cells[fid]
            cell = mosaic[y * cell_px:(y + 1) * cell_px, x * cell_px:(x + 1) * cell_px]
            errors = {p: np.abs(cell - _cell_image(p, cell_px)).mean() for p in renders[fid]}
            assert min(errors, key=errors.get) == picture, (fid, errors)
            n_on_map += 1
    assert n_on_map >= 5
