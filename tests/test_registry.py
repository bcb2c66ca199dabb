"""The stage registry (order, inputs, outputs and pages derived from one declaration), config validation at
load (before any stage runs), and the failed status a stage that raises leaves in the store."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from atlasgen.cli import app
from atlasgen.config import AtlasConfig, IngestConfig, load_config, section_classes
from atlasgen.errors import AtlasError
from atlasgen.pipeline import run_stages
from atlasgen.stages import REGISTRY, Registry, Stage
from atlasgen.store import OUTPUT_TABLES_ALL, Store

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


def _noop(cfg, store) -> dict:
    return {}


# --- the registry -----------------------------------------------------------------------------------
def test_registry_order_inputs_tables_and_pages():
    assert REGISTRY.names == ("ingest", "embed", "train", "encode", "render", "layout", "probe", "toy", "site")
    position = {name: i for i, name in enumerate(REGISTRY.names)}
    for stage in REGISTRY:
        assert all(position[up] < position[stage.name] for up in stage.inputs), stage.name
        assert stage.config is section_classes()[stage.name]
    # Every output table of the store has exactly one writing stage (skipped_inputs is per-stage rows).
    assert set(REGISTRY.table_writers) == set(OUTPUT_TABLES_ALL) - {"skipped_inputs"}
    assert REGISTRY.page_stages == {"map.html": "layout", "probes.html": "probe", "toy.html": "toy",
                                   "inversions.html": "render"}
    assert [s.name for s in REGISTRY.ordered(["site", "ingest", "render"])] == ["ingest", "render", "site"]


def test_every_stage_has_a_cli_command_and_a_config_section():
    for stage in REGISTRY:
        result = runner.invoke(app, [stage.name, "--help"])
        assert result.exit_code == 0 and "Example:" in result.output, stage.name
    assert set(section_classes()) >= set(REGISTRY.names)


@pytest.mark.parametrize("change,message", [
    (dict(config=dict), "frozen dataclass"),
    (dict(run=None), "run must be callable"),
    (dict(reset="clear"), "reset must be callable"),
    (dict(repair=True), "repair must be callable"),
    (dict(folders=("no_such_dir",)), "not a BuildPaths property"),
    (dict(pages=("maps/index.html",)), "top-level .html"),
    (dict(name="Bad-Name"), "lower-case identifier"),
])
def test_a_stage_with_a_missing_or_wrong_piece_fails_when_declared(change, message):
    kwargs = dict(name="ingest", config=IngestConfig, run=_noop) | change
    with pytest.raises(TypeError, match=message):
        Stage(**kwargs)


def test_a_registry_that_does_not_fit_together_fails_when_built():
    ingest = REGISTRY["ingest"]
    embed = REGISTRY["embed"]
    with pytest.raises(TypeError, match="not an earlier stage"):
        Registry((embed, ingest))
    with pytest.raises(TypeError, match="two writers"):
        Registry((ingest, dataclasses.replace(embed, tables=("images",))))
    with pytest.raises(TypeError, match="declared twice"):
        Registry((ingest, ingest))
    with pytest.raises(TypeError, match="section class"):
        Registry((dataclasses.replace(ingest, config=REGISTRY["embed"].config),))


def test_no_importlib_and_no_sql_outside_the_store_in_stage_code():
    """Stages and pages are imported statically; stage code asks the Store, it does not write SQL."""
    sql = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE)\b[^\n]*\b(FROM|INTO|SET|WHERE)\b")
    raw_access = re.compile(r"\bstore\.(con|query|scalar|arrow|insert_frame|transaction)\b")
    for path in sorted((REPO / "atlasgen").rglob("*.py")):
        text = path.read_text()
        assert "import_module" not in text and "__import__" not in text, f"dynamic import in {path}"
        if path.name in ("store.py", "testing.py", "query.py"):
            continue  # the store writes SQL; testing fakes stores; `atlasgen query` runs the user's SQL
        # (A hint that shows the user a query to run is not the stage writing SQL.)
        hits = [line.strip() for line in text.splitlines() if sql.search(line) and "atlasgen query" not in line]
        hits += [line.strip() for line in text.splitlines() if raw_access.search(line)]
        assert not hits, f"SQL in {path.relative_to(REPO)}: {hits[:3]}"


def test_default_reset_empties_declared_tables_and_folders(tmp_path):
    with Store.open(tmp_path) as store:
        store.replace_skips("embed", [("a.jpg", "broken")])
        store.replace_skips("ingest", [("b.jpg", "broken")])
        store.paths.sae_root.mkdir(parents=True)
        (store.paths.sae_root / "x").write_text("x")
        REGISTRY["embed"].reset_outputs(store)
        REGISTRY["train"].reset_outputs(store)
        assert [r[0] for r in store.query("SELECT source FROM skipped_inputs")] == ["b.jpg"]
        assert not store.paths.sae_root.exists()


# --- config validation at load -------------------------------------------------------------------------
BAD_VALUES = {
    # section: (a wrong type, an out-of-range value)
    "ingest": ({"limit": "ten"}, {"corpus_side": 2}),
    "embed": ({"batch_size": 1.5}, {"precision": "fp8"}),
    "train": ({"n_steps": "abc"}, {"resample_until": 2.0}),
    "encode": ({"top_k": True}, {"top_k": 0}),
    "render": ({"n_views": "8"}, {"features": "top:x"}),
    "layout": ({"metric": 3}, {"tile_px": 15}),
    "probe": ({"canvas": "big"}, {"sweeps": [{"name": "has space"}]}),
    "toy": ({"hidden": [1]}, {"test_fraction": 1.5}),
    "site": ({"title": 1}, {"features_per_page": 0}),
    "run": ({"ray_n_workers": "four"}, {"executor": "slurm"}),
}


def test_every_section_has_bad_value_cases():
    assert set(BAD_VALUES) == set(section_classes())


@pytest.mark.parametrize("section", sorted(BAD_VALUES))
@pytest.mark.parametrize("which", [0, 1], ids=["wrong-type", "out-of-range"])
def test_bad_config_values_fail_at_load_with_the_option_named(section, which):
    bad = BAD_VALUES[section][which]
    with pytest.raises(AtlasError) as info:
        load_config("tiny", overrides={section: bad})
    option = next(iter(bad))
    assert option in info.value.message or section in info.value.message
    assert info.value.hint


@pytest.mark.parametrize("bad", [{"metric": "nosuchmetric"}, {"min_dist": 5.0}], ids=["metric", "min_dist"])
def test_umap_options_fail_at_load_not_after_render(bad):
    """UMAP would refuse these only when layout runs, after every stage before it."""
    with pytest.raises(AtlasError) as info:
        load_config("tiny", overrides={"layout": bad})
    assert next(iter(bad)) in info.value.message and "[layout]" in info.value.hint
    load_config("tiny", overrides={"layout": {"metric": "cosine", "min_dist": 1.0}})


@pytest.mark.parametrize("section", sorted(BAD_VALUES))
def test_bad_config_exits_2_before_any_stage_runs(tmp_path, section):
    toml_path = tmp_path / "bad.toml"
    key, value = next(iter(BAD_VALUES[section][0].items()))
    toml_path.write_text(f"[{section}]\n{key} = {_toml(value)}\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["build", "--preset", "tiny", "--config", str(toml_path), "--out", str(out), "-q"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "error:" in result.output and "hint:" in result.output
    assert not out.exists(), "no stage may start on a bad config (nor is a new output folder made)"
    Store.open(out).close()  # an output folder that exists: still no stage starts
    result = runner.invoke(app, ["build", "--preset", "tiny", "--config", str(toml_path), "--out", str(out), "-q"])
    assert result.exit_code == 2, result.output
    with Store.open(out, read_only=True) as store:
        assert store.stage_rows() == {}, "no stage may start on a bad config"


def _toml(value) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value).replace("'", '"')


def test_good_presets_load():
    for preset in ("tiny", "imagenette", "imagenet"):
        assert isinstance(load_config(preset), AtlasConfig)


# --- a failing stage is recorded ----------------------------------------------------------------------
def test_a_stage_that_raises_is_recorded_failed_and_info_shows_it(tmp_path, monkeypatch):
    ingest = REGISTRY["ingest"]

    def boom(cfg, store):
        raise RuntimeError("disk on fire")
    broken = dataclasses.replace(ingest, run=boom)
    monkeypatch.setattr(REGISTRY, "_by_name", {**REGISTRY._by_name, "ingest": broken})
    monkeypatch.setattr(REGISTRY, "stages", (broken,) + REGISTRY.stages[1:])
    with Store.open(tmp_path) as store:
        with pytest.raises(RuntimeError):
            run_stages(load_config("tiny"), store, ["ingest"])
        row = store.stage_row("ingest")
    assert row["status"] == "failed" and "disk on fire" in row["error"]
    result = runner.invoke(app, ["info", "--out", str(tmp_path)])
    assert result.exit_code == 0 and "failed" in result.output and "disk on fire" in result.output


def test_a_user_error_in_a_stage_is_recorded_and_printed_in_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    result = runner.invoke(app, ["ingest", "--images", str(empty), "--out", str(out), "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    with Store.open(out, read_only=True) as store:
        row = store.stage_row("ingest")
    assert row["status"] == "failed" and row["error"]


@pytest.mark.parametrize("module", ["atlasgen.site.pages", "atlasgen.headers", "atlasgen.serve", "atlasgen.stages",
                                    "atlasgen.pipeline", "atlasgen.site.query"])
def test_no_import_cycle_whichever_module_comes_first(module):
    """The stages import the site package (the site stage) and the site package reads stage file names: each
    entry point must import first, in a fresh interpreter, without a cycle."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1:]
