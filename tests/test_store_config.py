"""The store's schema/version handling, config layering and hashing, and the CLI's error handling."""
from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest
from typer.testing import CliRunner

from atlasgen.cli import app
from atlasgen.config import EmbedConfig, config_hash, load_config
from atlasgen.errors import AtlasError, StoreVersionError
from atlasgen.store import SCHEMA_VERSION, Store

runner = CliRunner()


def test_store_creates_schema_and_round_trips_embeddings(tmp_path):
    with Store.open(tmp_path) as store:
        emb_nd = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
        with store.transaction():
            store.insert_embeddings(np.arange(10, 15), emb_nd)
        ids, back = store.embeddings()
    assert ids.tolist() == [10, 11, 12, 13, 14]
    np.testing.assert_allclose(back, emb_nd)
    con = duckdb.connect(str(tmp_path / "atlas.duckdb"), read_only=True)
    assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)


def test_transaction_rolls_back_on_error(tmp_path):
    with Store.open(tmp_path) as store:
        with pytest.raises(RuntimeError):
            with store.transaction() as con:
                con.execute("INSERT INTO skipped_inputs VALUES ('a', 'ingest', 'x', NULL)")
                raise RuntimeError("boom")
        assert store.count("skipped_inputs") == 0


@pytest.mark.parametrize("version,word", [(SCHEMA_VERSION + 1, "newer"), (SCHEMA_VERSION - 1, "older")])
def test_mismatched_store_version_is_a_clear_error(tmp_path, version, word):
    Store.open(tmp_path).close()
    con = duckdb.connect(str(tmp_path / "atlas.duckdb"))
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(version)])
    con.close()
    with pytest.raises(StoreVersionError, match=word):
        Store.open(tmp_path)
    result = runner.invoke(app, ["info", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "schema version" in result.output and "Traceback" not in result.output


def test_foreign_duckdb_file_is_refused(tmp_path):
    con = duckdb.connect(str(tmp_path / "atlas.duckdb"))
    con.execute("CREATE TABLE something (x INT)")
    con.close()
    with pytest.raises(StoreVersionError, match="not an atlas store"):
        Store.open(tmp_path)


def test_config_layers_preset_file_and_overrides(tmp_path):
    user = tmp_path / "atlas.toml"
    user.write_text('[train]\nl1_coeff = 0.5\n[render]\npairs = ["1,2"]\n')
    cfg = load_config("tiny", user, {"train": {"n_steps": 7}})
    assert cfg.ingest.source == "tiny"            # from the preset
    assert cfg.train.l1_coeff == 0.5              # from the user's file
    assert cfg.train.n_steps == 7                 # from the command line
    assert cfg.render.pairs == ("1,2",)           # lists become tuples (frozen, hashable)


def test_without_preset_a_command_layers_on_what_the_folder_was_built_with(tmp_path):
    """`--config FILE` alone keeps the folder's preset and options (it used to start over from the default
    preset, and the stage then reset a tiny build's tables); a file's options beat remembered ones; `--preset`,
    or `preset = ...` in the file, starts over."""
    from atlasgen.cli import make_config
    images = tmp_path / "images"
    images.mkdir()
    title = tmp_path / "title.toml"
    title.write_text('[site]\ntitle = "Mine"\n')
    source = tmp_path / "source.toml"
    source.write_text('[ingest]\nsource = "tiny"\n')
    with Store.open(tmp_path / "out") as store:
        assert make_config(store, "tiny", None, images, None, None, "cpu").render.device == "cpu"
        cfg = make_config(store, None, title, None, None, None, None)
        assert (cfg.preset, cfg.ingest.source, cfg.site.title) == ("tiny", f"folder:{images.resolve()}", "Mine")
        # --device is for its command only: a folder built on a GPU machine is not stuck on cuda without one.
        assert (cfg.embed.device, cfg.render.device) == ("auto", "auto")
        assert store.remembered_build()["config"] == str(title.resolve())
        cfg = make_config(store, None, None, None, None, None, None)  # the file is remembered too
        assert (cfg.preset, cfg.site.title) == ("tiny", "Mine")
        cfg = make_config(store, None, source, None, None, None, None)  # the file's source beats --images
        assert (cfg.preset, cfg.ingest.source) == ("tiny", "tiny")
        source.unlink()
        with pytest.raises(AtlasError, match="built with.*is gone"):
            make_config(store, None, None, None, None, None, None)
        cfg = make_config(store, "tiny", None, None, None, None, None)  # --preset starts over
        assert (cfg.preset, cfg.site.title, cfg.embed.device) == ("tiny", load_config("tiny").site.title, "auto")
        make_config(store, None, title, images, None, None, None)
        other = tmp_path / "other.toml"
        other.write_text('preset = "imagenette"\n[site]\ntitle = "Other"\n')
        cfg = make_config(store, None, other, None, None, None, None)
        assert (cfg.preset, cfg.ingest.source) == ("imagenette", load_config("imagenette").ingest.source)


def test_a_refused_device_is_not_remembered_and_an_old_remembered_one_is_dropped(tmp_path):
    """`train --device cuda` refused on a machine without a GPU; the next plain command still runs, also in a
    folder whose older atlasgen remembered the device."""
    from atlasgen.cli import make_config
    out = tmp_path / "out"
    result = runner.invoke(app, ["ingest", "--preset", "tiny", "--out", str(out), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    with Store.open(out) as store:
        assert "device" not in json.dumps(store.remembered_build())
        store.remember_build({"preset": "tiny", "config": None,
                              "overrides": {"embed": {"device": "cuda"}, "train": {"device": "cuda", "n_steps": 9}}})
        cfg = make_config(store, None, None, None, None, None, None)
        assert (cfg.embed.device, cfg.train.device, cfg.train.n_steps) == ("auto", "auto", 9)


def test_a_bad_value_names_the_flag_it_came_from_or_the_section(tmp_path):
    result = runner.invoke(app, ["render", "--preset", "tiny", "--features", "abc", "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "hint: check --features on the command line" in result.output, result.output
    bad = tmp_path / "bad.toml"
    bad.write_text('[render]\nfeatures = "abc"\n')
    result = runner.invoke(app, ["render", "--preset", "tiny", "--config", str(bad), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "in the [render] section" in result.output, result.output
    # A new output folder is not created for a command whose config is refused.
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_config_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nl1_cof = 1\n")
    with pytest.raises(AtlasError, match="l1_cof"):
        load_config("tiny", bad)
    with pytest.raises(AtlasError, match="unknown preset"):
        load_config("nope")
    (tmp_path / "broken.toml").write_text("[train\n")
    with pytest.raises(AtlasError, match="not valid TOML"):
        load_config("tiny", tmp_path / "broken.toml")



@pytest.mark.parametrize("what,needle", [("folder", "is a folder"), ("utf-16", "not UTF-8"),
                                         ("latin-1", "not UTF-8")])
def test_config_that_is_a_folder_or_not_utf8_is_one_line(tmp_path, what, needle):
    config = tmp_path / "atlas.toml"
    if what == "folder":
        config.mkdir()
    else:
        config.write_bytes('# café\n[train]\nn_steps = 7\n'.encode(what))  # UTF-16 starts with \xff\xfe
    result = runner.invoke(app, ["ingest", "--preset", "tiny", "--config", str(config), "--out",
                                 str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.splitlines()
    assert len([line for line in lines if line.startswith("error: ")]) == 1, result.output
    assert any(line.startswith("hint: ") for line in lines), result.output
    assert f"config file {config} " in result.output and needle in result.output
    assert "Traceback" not in result.output

def test_config_hash_ignores_fields_that_do_not_change_results():
    base = EmbedConfig(model="tiny")
    assert config_hash(base) == config_hash(EmbedConfig(model="tiny", batch_size=3, n_workers=9))
    assert config_hash(base) != config_hash(EmbedConfig(model="other"))
    assert config_hash(base, ("a",)) != config_hash(base, ("b",))


def test_cli_query_and_errors(tmp_path):
    with Store.open(tmp_path) as store:
        store.con.execute("INSERT INTO images VALUES (1, 'a.jpg', 'cat', 0, 10, 20, 'corpus/1.jpg')")
    result = runner.invoke(app, ["query", "SELECT image_id, label FROM images", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "cat" in result.output
    result = runner.invoke(app, ["query", "SELECT label FROM images", "--out", str(tmp_path), "--format", "json"])
    assert '"label": "cat"' in result.output
    result = runner.invoke(app, ["query", "DELETE FROM images", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "read-only" in result.output
    result = runner.invoke(app, ["query", "SELEC nonsense", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "syntax error" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["info", "--out", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "no atlas store" in result.output


def test_stage_run_alone_needs_its_inputs(tmp_path):
    result = runner.invoke(app, ["train", "--out", str(tmp_path), "--preset", "tiny", "--quiet"])
    assert result.exit_code == 2
    assert "needs the embed stage" in result.output


def test_every_command_has_help_with_an_example():
    import typer.main
    click_app = typer.main.get_command(app)
    for name, command in click_app.commands.items():
        assert command.help and "Example:" in command.help, f"`atlasgen {name}` help lacks an example"


def test_arrow_columns_match_pyarrow_and_the_first_stages_never_import_pandas(tmp_path):
    """`arrow_column` builds what `pa.array` builds; the writes of ingest and embed go through it, so a fresh
    `atlasgen embed` does not pay pyarrow's import of pandas (0.34–0.61 s on our CPU box, holding the GIL) in its writer.
    Ingest's resize kernels borrow Pillow's pixels through Arrow without it too (it would cost their start-up that
    time and every worker 36 MB)."""
    import subprocess
    import sys
    from datetime import datetime

    import pyarrow as pa

    from atlasgen.store import arrow_column
    cases = [(np.arange(5, dtype=np.int32), None), (np.arange(5), pa.int32()), (np.array([1.5, 2.5], np.float32), None),
             (np.array([True, False, True] * 5), None), (["a", "bé", None, ""], pa.string()), (["a", "b"], None),
             ([None, None], pa.string()), ([1, None, 3], pa.int32()), ([1, 2, 3], None), ([1.0, None], pa.float64()),
             ([True, None, False], None), ([datetime(2026, 11, 26, 1, 2, 3, 456789), None], pa.timestamp("us")),
             ([], pa.string()), ([], pa.int32()), (np.array([1, 2], np.int64), pa.float32()), ([[1, 2], [3]], None)]
    for values, arrow_type in cases:
        assert arrow_column(values, arrow_type).equals(pa.array(values, arrow_type)), (values, arrow_type)
    with pytest.raises(OverflowError):
        arrow_column(np.array([300]), pa.int8())

    script = f"""
import sys
import numpy as np
from PIL import Image
from atlasgen import resample
from atlasgen.store import Store
from atlasgen.stages.ingest import commit_images
assert resample.prepare() is None
picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8))
assert resample.bicubic(picture, (341, 256)).tobytes() == picture.resize((341, 256), Image.BICUBIC).tobytes()
with Store.open({str(tmp_path / 'fresh')!r}) as store:
    commit_images(store, {{"image_id": [0, 1], "source": ["a.jpg", "b.jpg"], "label": ["x", None],
                           "width": [5, 6], "height": [7, 8], "corpus_path": ["corpus/0.jpg", "corpus/1.jpg"]}},
                  [("c.txt", "not an image")])
    store.add_embeddings(np.array([0, 1]), np.ones((2, 3), np.float32))
    store.replace_skips("embed", [("image 1", "damaged")])
    assert store.count("embeddings") == 2 and store.count("skipped_inputs") == 2
print("pandas" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False", "pandas was imported"
