"""Skip, rerun and reset rules of the pipeline, on the two cheapest real stages."""
from __future__ import annotations

import pytest

from atlasgen.config import load_config
from atlasgen.pipeline import run_stages
from atlasgen.progress import set_quiet
from atlasgen.store import Store


def _cfg(n_images=24):
    return load_config("tiny", overrides={"ingest": {"n_tiny_images": n_images}})


def test_unchanged_stages_are_skipped_and_changes_propagate(tmp_path):
    set_quiet(True)
    with Store.open(tmp_path) as store:
        first = run_stages(_cfg(), store, ["ingest", "embed"])
        assert not first["ingest"].get("skipped") and not first["embed"].get("skipped")
        again = run_stages(_cfg(), store, ["ingest", "embed"])
        assert again["ingest"]["skipped"] and again["embed"]["skipped"]

        # A forced rerun of an input, even with the same config, makes its readers run again.
        forced = run_stages(_cfg(), store, ["ingest"], force=True)
        assert not forced["ingest"].get("skipped")
        after = run_stages(_cfg(), store, ["embed"])
        assert not after["embed"].get("skipped")

        # A config change resets the stage's output and everything downstream reruns.
        changed = run_stages(_cfg(16), store, ["ingest", "embed"])
        assert not changed["ingest"].get("skipped") and not changed["embed"].get("skipped")
        assert store.count("images") == 16
        assert store.count("embeddings") == 16


def test_atomic_dir_swaps_in_on_success_and_keeps_the_old_folder_on_failure(tmp_path):
    import pytest
    from atlasgen.paths import atomic_dir
    final = tmp_path / "site"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (final / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("half-built")
    assert (final / "a.txt").read_text() == "one", "a failed build must leave the old folder as it was"
    with atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("three")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"], "no temp or old folders left behind"


def test_device_cuda_without_a_gpu_fails_before_a_forced_rerun_resets_anything(tmp_path):
    import pytest
    import torch
    from atlasgen.errors import AtlasError
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    set_quiet(True)
    with Store.open(tmp_path) as store:
        run_stages(_cfg(), store, ["ingest", "embed"])
        cuda = load_config("tiny", overrides={"ingest": {"n_tiny_images": 24}, "embed": {"device": "cuda"}})
        with pytest.raises(AtlasError, match="no CUDA GPU"):
            run_stages(cuda, store, ["embed"], force=True)
        assert store.count("embeddings") == 24 and store.stage_row("embed")["status"] == "done"


def test_a_model_path_that_is_not_there_fails_before_any_stage_or_reset(tmp_path):
    """On the command line it fails before ingest; from a config file, before embed resets its rows (it used to
    be taken for a hub id, after ingest, with an error about reaching the hub)."""
    import pytest
    from typer.testing import CliRunner
    from atlasgen.cli import app
    from atlasgen.errors import AtlasError
    missing = tmp_path / "no-such-model"
    result = CliRunner().invoke(app, ["build", "--preset", "tiny", "--model", str(missing), "--out",
                                      str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2 and f"there is no model folder at {missing}" in result.output, result.output
    assert not (tmp_path / "out").exists()  # refused before the output folder or its store was made
    set_quiet(True)
    with Store.open(tmp_path / "kept") as store:
        run_stages(_cfg(), store, ["ingest", "embed"])
        bad = load_config("tiny", overrides={"ingest": {"n_tiny_images": 24}, "embed": {"model": str(missing)}})
        with pytest.raises(AtlasError, match="no model folder"):
            run_stages(bad, store, ["embed"], force=True)
        assert store.count("embeddings") == 24


def _ctrl_c_in_a_c_callback() -> None:
    """What Ctrl-C while numba compiles does: a KeyboardInterrupt raised inside a C callback, which Python
    prints as "Exception ignored ..." and drops."""
    import ctypes

    def callback() -> None:
        raise KeyboardInterrupt

    ctypes.CFUNCTYPE(None)(callback)()


def test_ctrl_c_lost_in_a_c_callback_still_stops_the_stage(tmp_path, monkeypatch, capsys):
    """Layout's UMAP went on to the end (exit 0) when Ctrl-C landed while numba compiled: the stage now stops as
    interrupted, and the lost interrupt is not printed."""
    import time

    import pytest

    from atlasgen.stages import ingest
    set_quiet(True)
    real_run = ingest.run
    went_on = []

    def run_with_a_lost_interrupt(cfg, store):
        summary = real_run(cfg, store)
        _ctrl_c_in_a_c_callback()
        for _ in range(100):  # Python code: where the interrupt, sent again, is raised
            time.sleep(0.01)
        went_on.append(True)
        return summary

    from dataclasses import replace

    from atlasgen.stages import REGISTRY
    monkeypatch.setattr(REGISTRY, "stages", tuple(replace(s, run=run_with_a_lost_interrupt) if s.name == "ingest"
                                                  else s for s in REGISTRY.stages))
    with Store.open(tmp_path) as store:
        with pytest.raises(KeyboardInterrupt):
            run_stages(_cfg(8), store, ["ingest"])
        assert store.stage_row("ingest")["status"] == "interrupted"
    assert not went_on, "the interrupt is raised where the stage's Python code goes on, not only at its end"
    assert "Exception ignored" not in capsys.readouterr().err


def test_a_repair_that_leaves_the_tables_as_they_were_does_not_rerun_the_stages_after_it(tmp_path):
    """A deleted corpus copy makes ingest run again; when its rows come out the same, embed (and what reads it)
    stays up to date instead of re-embedding the corpus. When they differ (a new file in the folder), embed
    runs again."""
    from PIL import Image
    set_quiet(True)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.new("RGB", (40, 30), (40 * i, 90, 200 - 30 * i)).save(images / f"{i}.png")
    cfg = load_config("tiny", overrides={"ingest": {"source": f"folder:{images}"}})
    with Store.open(tmp_path / "out") as store:
        run_stages(cfg, store, ["ingest", "embed"])
        embedded_at = store.stage_row("embed")["finished_at"]
        lost = store.paths.out_dir / store.scalar("SELECT corpus_path FROM images WHERE image_id = 2")
        lost.unlink()
        again = run_stages(cfg, store, ["ingest", "embed"])
        assert not again["ingest"].get("skipped") and lost.is_file()
        assert again["embed"].get("skipped") and store.stage_row("embed")["finished_at"] == embedded_at
        lost.unlink()
        Image.new("RGB", (40, 30), "white").save(images / "6.png")
        changed = run_stages(cfg, store, ["ingest", "embed"])
        assert not changed["ingest"].get("skipped") and not changed["embed"].get("skipped")
        assert store.count("embeddings") == 7


def test_lost_thumbnails_are_written_again_without_encoding_again(tmp_path, monkeypatch):
    """A finished encode that lost thumbnails writes them again from its `top_images` (the stage's `repair`):
    nothing is encoded again, its tables and finish time stay, so the stages reading it stay up to date. A
    thumbnail that cannot be made is recorded, and made by the next repair once its corpus copy is back."""
    from atlasgen.stages import encode
    set_quiet(True)
    with Store.open(tmp_path) as store:
        run_stages(_cfg(), store, ["ingest", "embed", "train", "encode"])
        before, digest = store.stage_row("encode"), store.tables_digest(encode.TABLES)
        top_ids = store.top_image_ids()
        assert before["summary"]["n_thumbs"] == len(top_ids) > 2
        lost, unmakeable = store.paths.thumb(top_ids[0]), store.paths.thumb(top_ids[1])
        lost.unlink()
        unmakeable.unlink()
        store.paths.corpus_image(top_ids[1]).unlink()

        def encoded_again(*args, **kwargs):
            raise AssertionError("encode ran again")

        monkeypatch.setattr(encode, "encode_sparse", encoded_again)
        repaired = run_stages(_cfg(), store, ["encode"])["encode"]
        assert repaired["repaired"] and repaired["n_thumb_failures"] == 1
        assert repaired["n_thumbs"] == len(top_ids) - 1 and lost.is_file() and not unmakeable.exists()
        assert store.query("SELECT stage FROM skipped_inputs") == [("encode",)]
        row = store.stage_row("encode")
        assert (row["status"], row["finished_at"]) == ("done", before["finished_at"])
        assert store.tables_digest(encode.TABLES) == digest

        # Ingest writes the corpus copy again; the next encode repair makes the thumbnail.
        again = run_stages(_cfg(), store, ["ingest", "encode"])
        assert again["ingest"]["n_restored"] == 1 and again["encode"]["repaired"]
        assert unmakeable.is_file() and again["encode"]["n_thumb_failures"] == 0
        assert store.count("skipped_inputs") == 0
        assert run_stages(_cfg(), store, ["encode"])["encode"]["skipped"]


def _folder_build(tmp_path, n_images=6):
    from PIL import Image
    set_quiet(True)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(n_images):
        Image.new("RGB", (40, 30), (40 * i, 90, 200 - 30 * i)).save(images / f"{i}.png")
    return images, load_config("tiny", overrides={"ingest": {"source": f"folder:{images}", "n_workers": 1}})


def test_an_edited_input_found_by_a_repair_reruns_the_stages_after_it(tmp_path):
    """A lost copy makes ingest run again; an input edited since (same size, so the same rows) gets a new copy,
    and the stages reading ingest run again instead of keeping the old picture's embedding."""
    from PIL import Image
    images, cfg = _folder_build(tmp_path)
    with Store.open(tmp_path / "out") as store:
        run_stages(cfg, store, ["ingest", "embed"])
        (store.paths.out_dir / "corpus" / "00000001.jpg").unlink()
        Image.new("RGB", (40, 30), "red").save(images / "4.png")
        again = run_stages(cfg, store, ["ingest", "embed"])
        assert again["ingest"]["n_restored"] == 1 and again["ingest"]["n_files_changed"] == 1
        assert not again["embed"].get("skipped"), "embed kept the edited image's old embedding"
        with Image.open(store.paths.corpus_image(4)) as im:
            assert im.getpixel((20, 15))[0] > 200


def test_an_interrupted_repair_resumes_as_a_repair(tmp_path, monkeypatch):
    """A repair stopped half-way and resumed still keeps the stage's finish time when its tables come out the
    same (the digest it started from is kept in the stage's row), and still reports an edited input's new copy
    that the interrupted run put in place."""
    from PIL import Image
    from atlasgen.stages import ingest
    images, cfg = _folder_build(tmp_path)
    with Store.open(tmp_path / "out") as store:
        run_stages(cfg, store, ["ingest", "embed"])
        embedded_at = store.stage_row("embed")["finished_at"]
        ingested_at = store.stage_row("ingest")["finished_at"]

        (store.paths.out_dir / "corpus" / "00000001.jpg").unlink()
        monkeypatch.setattr(ingest, "_restore_copy", _interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_stages(cfg, store, ["ingest", "embed"])
        assert store.stage_row("ingest")["status"] == "interrupted"
        monkeypatch.undo()
        resumed = run_stages(cfg, store, ["ingest", "embed"])
        assert resumed["ingest"]["n_restored"] == 1 and resumed["embed"].get("skipped")
        assert store.stage_row("ingest")["finished_at"] == ingested_at
        assert store.stage_row("embed")["finished_at"] == embedded_at

        # An edited input's new copy put in place just before the interrupt: the resumed repair reports it.
        (store.paths.out_dir / "corpus" / "00000001.jpg").unlink()
        Image.new("RGB", (40, 30), "red").save(images / "4.png")
        monkeypatch.setattr(ingest._Journal, "append", _interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_stages(cfg, store, ["ingest", "embed"])
        monkeypatch.undo()
        assert not (store.paths.out_dir / "corpus" / ingest.INCOMING_NAME).exists(), "the interrupt's leftovers"
        resumed = run_stages(cfg, store, ["ingest", "embed"])
        assert resumed["ingest"]["n_files_changed"] >= 1 and not resumed["embed"].get("skipped")
        assert not (store.paths.out_dir / "corpus" / ingest.CHANGED_NAME).exists()
        assert not (store.paths.out_dir / "corpus" / ingest.INCOMING_NAME).exists()


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt
