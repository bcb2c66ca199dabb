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
