"""Ingest: bad inputs are skipped with reasons, odd image modes become sane RGB, EXIF rotation is applied,
labels come from class folders or an ImageNet-val labels file, an offline hub dataset fails fast in one line."""
from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from atlasgen import resample, tinyset
from atlasgen.stages import ingest
from atlasgen.cli import app
from atlasgen.config import load_config
from atlasgen.errors import AtlasError, DataLoadError
from atlasgen.pipeline import run_stages
from atlasgen.progress import set_quiet
from atlasgen.store import Store


def _jpeg_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def make_bad_corpus(root: Path) -> Path:
    """Two class folders with good, odd and broken files, plus OS clutter."""
    cats, dogs = root / "cats", root / "dogs"
    cats.mkdir(parents=True)
    dogs.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (400, 600, 3), dtype=np.uint8)).save(cats / "big.jpg", quality=90)
    Image.new("RGB", (100, 80), (10, 200, 30)).save(cats / "small.png")
    # Pure cyan in CMYK.
    Image.new("CMYK", (64, 64), (255, 0, 0, 0)).save(cats / "cmyk.jpg", quality=95)
    # 16-bit greyscale ramp, dark on the left, bright on the right.
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(dogs / "grey16.png")
    # Palette with a transparent index covering the left half.
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    pal.paste(0, (0, 0, 20, 40))
    pal.save(dogs / "palette.png", transparency=0)
    # RGBA: left half fully transparent (black underneath), right half opaque blue.
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[:, 20:] = (0, 0, 255, 255)
    Image.fromarray(rgba, "RGBA").save(dogs / "rgba.png")
    # 60 wide × 40 high as stored, left half red; EXIF orientation 6 = display rotated 90° clockwise.
    rot = np.zeros((40, 60, 3), np.uint8)
    rot[:, :30] = (255, 0, 0)
    rot[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    (dogs / "rotated.jpg").write_bytes(_jpeg_bytes(Image.fromarray(rot), exif=exif.tobytes()))
    # Broken inputs.
    (cats / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.integers(0, 255, 2000, dtype=np.uint8).tobytes())
    good = _jpeg_bytes(Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)))
    (cats / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (cats / "empty.jpg").write_bytes(b"")
    (dogs / "notes.jpg").write_text("this is not a picture\n")
    (dogs / "readme.txt").write_text("notes")
    # Over max_pixels in the test config (700 × 700 > 500 × 500) but a tiny file.
    Image.new("L", (700, 700), 128).save(dogs / "bomb.png")
    # Clutter that must be ignored silently.
    (cats / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (cats / ".hidden.jpg").write_bytes(b"junk")
    return root


def _ingest(out_dir: Path, source: str, **ingest_overrides):
    set_quiet(True)
    cfg = load_config("tiny", overrides={"ingest": {"source": source, **ingest_overrides}})
    store = Store.open(out_dir)
    summary = run_stages(cfg, store, ["ingest"])["ingest"]
    return store, summary


def _corpus(store: Store, name: str) -> tuple[dict, np.ndarray]:
    row = store.con.execute("SELECT image_id, label, width, height, corpus_path FROM images WHERE source LIKE ?",
                            [f"%/{name}"]).fetchone()
    assert row is not None, f"{name} was not ingested"
    info = dict(zip(("image_id", "label", "width", "height", "corpus_path"), row))
    with Image.open(store.paths.out_dir / info["corpus_path"]) as im:
        assert im.format == "JPEG" and im.mode == "RGB"
        return info, np.asarray(im).astype(int)


def test_bad_and_odd_inputs(tmp_path):
    corpus = make_bad_corpus(tmp_path / "in")
    store, summary = _ingest(tmp_path / "out", f"folder:{corpus}", max_pixels=500 * 500, corpus_side=256)
    with store:
        reasons = dict(store.query("SELECT regexp_extract(source, '[^/]+$'), reason FROM skipped_inputs "
                                   "WHERE stage = 'ingest'"))
        assert set(reasons) == {"corrupt.jpg", "truncated.jpg", "empty.jpg", "notes.jpg", "readme.txt", "bomb.png"}
        assert "empty" in reasons["empty.jpg"]
        assert "not an image" in reasons["notes.jpg"] and "not an image" in reasons["readme.txt"]
        assert "decompression bomb" in reasons["bomb.png"] and "700×700" in reasons["bomb.png"]
        assert "truncated" in reasons["truncated.jpg"] or "corrupt" in reasons["truncated.jpg"]
        assert any(word in reasons["corrupt.jpg"] for word in ("corrupt", "truncated", "not an image"))
        assert summary["n_skipped"] == 6 and summary["n_images"] == 7

        labels = dict(store.query("SELECT regexp_extract(source, '[^/]+$'), label FROM images"))
        assert labels == {"big.jpg": "cats", "small.png": "cats", "cmyk.jpg": "cats", "grey16.png": "dogs",
                          "palette.png": "dogs", "rgba.png": "dogs", "rotated.jpg": "dogs"}
        # Ids follow sorted source order and every corpus file exists.
        rows = store.query("SELECT image_id, source, corpus_path FROM images ORDER BY image_id")
        assert [r[0] for r in rows] == list(range(7)) and [r[1] for r in rows] == sorted(r[1] for r in rows)
        assert all((store.paths.out_dir / r[2]).is_file() for r in rows)

        info, big = _corpus(store, "big.jpg")
        assert (info["width"], info["height"]) == (600, 400) and big.shape == (256, 384, 3)
        info, small = _corpus(store, "small.png")
        assert small.shape == (80, 100, 3), "small images are not upscaled"
        _, cmyk = _corpus(store, "cmyk.jpg")
        r, g, b = cmyk.reshape(-1, 3).mean(0)
        assert r < 60 and g > 200 and b > 200, f"CMYK cyan came out as {(r, g, b)}"
        _, grey = _corpus(store, "grey16.png")
        assert grey[:, :4].mean() < 20 and grey[:, -4:].mean() > 235, "16-bit grey must be scaled, not clipped"
        _, pal = _corpus(store, "palette.png")
        assert pal[:, :16].min() > 230, "transparent palette pixels composite on white"
        assert pal[:, 24:, 0].mean() > 170 and pal[:, 24:, 1].mean() < 40
        _, rgba = _corpus(store, "rgba.png")
        assert rgba[:, :16].min() > 230 and rgba[:, 24:, 2].mean() > 200 and rgba[:, 24:, 0].mean() < 40
        info, rot = _corpus(store, "rotated.jpg")
        assert (info["width"], info["height"]) == (40, 60), "EXIF rotation swaps the recorded size"
        assert rot.shape == (60, 40, 3)
        # Rotated 90° clockwise: the stored left (red) half is now on top.
        assert rot[:25, :, 0].mean() > 200 and rot[:25, :, 2].mean() < 60
        assert rot[35:, :, 2].mean() > 200 and rot[35:, :, 0].mean() < 60


def test_decode_modes_directly():
    """Float and 1-bit images and 'I' greyscale also become sensible 8-bit RGB."""
    f = Image.fromarray(np.tile(np.linspace(0, 1, 32, dtype=np.float32), (8, 1)), "F")
    arr = np.asarray(ingest.to_rgb(f))
    assert arr[:, 0].max() < 5 and arr[:, -1].min() > 250
    one = Image.new("1", (8, 8), 1)
    assert np.asarray(ingest.to_rgb(one)).min() == 255
    i32 = Image.fromarray(np.full((8, 8), 40000, np.int32), "I")
    assert abs(int(np.asarray(ingest.to_rgb(i32)).mean()) - 156) <= 1
    la = Image.new("LA", (8, 8), (0, 0))
    assert np.asarray(ingest.to_rgb(la)).min() == 255


def test_imagenet_val_layout(tmp_path):
    folder = tmp_path / "val"
    folder.mkdir()
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 0, 0)]
    for i, c in enumerate(colours, start=1):
        Image.new("RGB", (50, 40), c).save(folder / f"ILSVRC2012_val_{i:08d}.JPEG")
    (folder / "ILSVRC2012_val_00000005.JPEG").write_bytes(b"")  # a bad file still takes its line
    labels = tmp_path / "labels.txt"
    labels.write_text("n01\nn02\nn03\nn01\nn02\n")
    names = tmp_path / "names.txt"
    names.write_text("n01 red thing, crimson thing\nn02 green thing\nn03 blue thing\n")
    store, summary = _ingest(tmp_path / "out", f"folder:{folder}", labels_file=str(labels),
                             label_names_file=str(names))
    with store:
        rows = store.query("SELECT regexp_extract(source, '[^/]+$'), label, label_id FROM images ORDER BY image_id")
        assert [(r[0][-10:], r[1]) for r in rows] == [("00001.JPEG", "red thing"), ("00002.JPEG", "green thing"),
                                                      ("00003.JPEG", "blue thing"), ("00004.JPEG", "red thing")]
        assert rows[0][2] == rows[3][2] != rows[1][2], "one label id per class"
        assert summary["n_skipped"] == 1

    # The CSV form (filename without extension, ImageNet LOC_val_solution style prediction string).
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("ImageId,PredictionString\nILSVRC2012_val_00000002,n03 1 2 3 4\n"
                        "ILSVRC2012_val_00000001,n02 5 6 7 8\n")
    store, summary = _ingest(tmp_path / "out_csv", f"folder:{folder}", labels_file=str(csv_path))
    with store:
        rows = dict(store.query("SELECT regexp_extract(source, '[^/]+$'), label FROM images"))
        assert rows["ILSVRC2012_val_00000001.JPEG"] == "n02" and rows["ILSVRC2012_val_00000002.JPEG"] == "n03"
        assert rows["ILSVRC2012_val_00000003.JPEG"] is None

    bad = tmp_path / "short.txt"
    bad.write_text("n01\n")
    with pytest.raises(DataLoadError, match="1 labels but the folder has 5 images"):
        _ingest(tmp_path / "out_bad", f"folder:{folder}", labels_file=str(bad))


def test_flat_folder_limit_and_missing_folder(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (30, 30), (i * 50, 0, 0)).save(folder / f"img{i}.png")
    store, summary = _ingest(tmp_path / "out", f"folder:{folder}", limit=3)
    with store:
        assert summary["n_images"] == 3
        assert store.query("SELECT DISTINCT label FROM images") == [(None,)]
        assert [r[0] for r in store.query("SELECT source FROM images ORDER BY image_id")] == \
            [str(folder / f"img{i}.png") for i in range(3)]
    with pytest.raises(DataLoadError, match="does not exist"):
        _ingest(tmp_path / "out2", f"folder:{tmp_path / 'nowhere'}")
    with pytest.raises(AtlasError, match="must be tiny, folder:PATH or hf:"):
        _ingest(tmp_path / "out3", "s3://bucket")


def test_hf_offline_fails_fast_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    t0 = time.perf_counter()
    with pytest.raises(DataLoadError) as info:
        _ingest(tmp_path / "out", "hf:frgfm/imagenette:validation")
    assert time.perf_counter() - t0 < 5
    assert "frgfm/imagenette" in info.value.message and "\n" not in info.value.message
    assert "--images" in info.value.hint and "--preset tiny" in info.value.hint

    # Online mode with an unreachable hub (a closed local port): the quick probe fails, no long retries.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    with pytest.raises(DataLoadError, match="cannot reach http://127.0.0.1:9") as info:
        _ingest(tmp_path / "out2", "hf:frgfm/imagenette:validation")
    assert time.perf_counter() - t0 < 10
    assert "--preset tiny" in info.value.hint


def test_cli_ingest_reports_skipped(tmp_path, monkeypatch):
    corpus = make_bad_corpus(tmp_path / "in")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["ingest", "--images", str(corpus), "--out", str(out), "--preset", "tiny",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    # Said even with --quiet (which silences progress, not results); the bomb is fine under the default max_pixels.
    assert "5 input(s) were skipped" in result.output
    assert "skipped_inputs" in result.output
    with Store.open(out, read_only=True) as store:
        assert store.count("images") == 8 and store.scalar("SELECT count(DISTINCT label) FROM images") == 2
    # The build goes on past the bad inputs (embed reuses the tiny preset remembered by the output folder).
    result = CliRunner().invoke(app, ["embed", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "were skipped" not in result.output  # ingest's count, not embed's
    with Store.open(out, read_only=True) as store:
        assert store.count("embeddings") == 8

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["ingest", "--dataset", "frgfm/imagenette:validation", "--out",
                                      str(tmp_path / "out_hf"), "--preset", "tiny", "--quiet"])
    assert result.exit_code == 2
    assert "error: could not fetch the Hugging Face dataset frgfm/imagenette" in result.output
    assert "Traceback" not in result.output


def test_tiny_source_is_deterministic_and_labelled(tmp_path):
    store, summary = _ingest(tmp_path / "out", "tiny", n_tiny_images=40)
    with store:
        assert summary == {**summary, "n_images": 40, "n_skipped": 0, "n_labels": len(tinyset.LABELS)}
        counts = store.query("SELECT label, count(*) FROM images GROUP BY label")
        assert sorted(c for _, c in counts) == [4] * len(tinyset.LABELS)
    # Same index, same picture; different index, different picture.
    a, b = tinyset.example(3)[1], tinyset.example(3)[1]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(tinyset.example(13)[1]))


def test_draw_object():
    for kind in tinyset.OBJECT_KINDS:
        obj = tinyset.draw_object(kind, "red", 40)
        arr = np.asarray(obj)
        assert obj.mode == "RGBA" and obj.size == (40, 40)
        assert arr[0, 0, 3] == 0, f"{kind}: corners are transparent"
        assert arr[20, 20, 3] == 255 or kind == "ring", f"{kind}: the centre is covered"
        assert 0.08 < (arr[..., 3] > 128).mean() < 0.95
    ring = np.asarray(tinyset.draw_object("ring", (0, 0, 255), 40))
    assert ring[20, 20, 3] == 0 and ring[20, 4, 3] == 255


def test_hf_dataset_from_a_local_folder(tmp_path, monkeypatch):
    """The hf: path end to end without network: a parquet dataset folder with Image and ClassLabel columns."""
    import datasets

    monkeypatch.setattr(resample, "_kernels", None)  # as in a fresh process, whatever ran before here

    def png(colour) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), colour).save(buf, "PNG")
        return buf.getvalue()

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["tench", "church"])})
    rows = {"image": [{"bytes": png((255, 0, 0)), "path": None}, {"bytes": b"garbage", "path": None},
                      {"bytes": png((0, 0, 255)), "path": None}], "label": [1, 0, 0]}
    folder = tmp_path / "ds"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(folder / "data" / "validation-00000-of-00001.parquet"))
    store, summary = _ingest(tmp_path / "out", f"hf:{folder}:validation")
    with store:
        assert summary["n_images"] == 2 and summary["n_skipped"] == 1
        assert "kernels_ready" in summary["timeline_s"], "a streamed dataset (size unknown) loads the resize kernels"
        assert store.query("SELECT source, label, width, height FROM images ORDER BY image_id") == [
            (f"hf://{folder}/validation/0", "church", 40, 30), (f"hf://{folder}/validation/2", "tench", 40, 30)]
        assert store.scalar("SELECT source FROM skipped_inputs") == f"hf://{folder}/validation/1"


def _photo_folder(folder: Path) -> Path:
    """Ten small JPEGs of different sizes, the 4th empty and the 8th corrupt."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(10):
        path = folder / f"img{i:02d}.jpg"
        if i == 3:
            path.write_bytes(b"")
        elif i == 7:
            path.write_bytes(b"\xff\xd8\xff\xe0" + rng.integers(0, 255, 500, dtype=np.uint8).tobytes())
        else:
            Image.fromarray(rng.integers(0, 255, (40 + i, 60 + i, 3), dtype=np.uint8)).save(path, quality=90)
    return folder


def _interrupted_ingest(out: Path, source: str, monkeypatch, after_tasks: int) -> None:
    """An ingest stopped by Ctrl-C when `after_tasks` tasks (one input each here) have been journaled."""
    real_append = ingest._Journal.append
    calls = {"n": 0}

    def append_then_interrupt(self, lines):
        calls["n"] += 1
        if calls["n"] > after_tasks:
            raise KeyboardInterrupt
        real_append(self, lines)

    monkeypatch.setattr(ingest._Journal, "append", append_then_interrupt)
    cfg = load_config("tiny", overrides={"ingest": {"source": source, "n_workers": 2}})
    with Store.open(out) as store:
        with pytest.raises(KeyboardInterrupt):
            run_stages(cfg, store, ["ingest"])
        assert store.stage_row("ingest")["status"] == "interrupted" and store.count("images") == 0
    monkeypatch.setattr(ingest._Journal, "append", real_append)


def _result(out: Path) -> tuple[list, list, list[bytes]]:
    with Store.open(out, read_only=True) as store:
        rows = store.query("SELECT image_id, source, label, label_id, width, height, corpus_path FROM images "
                           "ORDER BY image_id")
        skipped = store.query("SELECT source, reason FROM skipped_inputs ORDER BY source")
    return rows, skipped, [(out / r[6]).read_bytes() for r in rows]


def test_interrupted_ingest_resumes_without_redoing_finished_copies(tmp_path, monkeypatch):
    folder = _photo_folder(tmp_path / "in")
    source = f"folder:{folder}"
    out = tmp_path / "out"
    _interrupted_ingest(out, source, monkeypatch, after_tasks=4)
    journal = out / "corpus" / ingest.JOURNAL_NAME
    assert len(journal.read_text().splitlines()) == 4
    done = {i: (out / "corpus" / f"{i:08d}.jpg").stat() for i in range(3)}  # inputs 0-2 good, input 3 empty

    summary = _ingest_closed(out, source, n_workers=2)
    assert summary["n_resumed"] == 4 and summary["n_images"] == 8 and summary["n_skipped"] == 2
    for i, before in done.items():
        after = (out / "corpus" / f"{i:08d}.jpg").stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), f"copy {i} was rewritten"
    assert not (out / "corpus" / ingest.INCOMING_NAME).exists()
    assert len(journal.read_text().splitlines()) == 10, "the journal stays, the finished run's record"
    _ingest_closed(tmp_path / "fresh", source)
    assert _result(out) == _result(tmp_path / "fresh"), "the resumed ingest equals an uninterrupted one"

    # An input changed since the interrupt: it and everything after it are decoded again.
    out2 = tmp_path / "out2"
    _interrupted_ingest(out2, source, monkeypatch, after_tasks=4)
    Image.new("RGB", (90, 30), (0, 200, 0)).save(folder / "img01.jpg")
    summary = _ingest_closed(out2, source, n_workers=2)
    assert summary["n_resumed"] == 1
    _ingest_closed(tmp_path / "fresh2", source)
    assert _result(out2) == _result(tmp_path / "fresh2")
    assert _result(out2)[0][1][4:6] == (90, 30)


def test_lost_copies_of_a_finished_ingest_are_restored_from_their_inputs_alone(tmp_path, monkeypatch):
    """A rerun for lost corpus copies decodes those inputs again, not every input (the journal stays as the
    finished run's record); past MAX_RESTORED_HERE lost copies, the rest is redone by the workers."""
    folder = _photo_folder(tmp_path / "in")
    source = f"folder:{folder}"
    out = tmp_path / "out"
    _ingest_closed(out, source, n_workers=2)
    _ingest_closed(tmp_path / "fresh", source)
    fresh = _result(tmp_path / "fresh")
    assert len(fresh[0]) == 8  # inputs 3 and 7 are skipped: ids 0-2 are inputs 0-2, ids 3-5 inputs 4-6

    def copies() -> dict[int, tuple[int, int]]:
        return {i: ((st := (out / "corpus" / f"{i:08d}.jpg").stat()).st_ino, st.st_mtime_ns) for i in range(8)}

    before = copies()
    for image_id in (2, 5):
        (out / "corpus" / f"{image_id:08d}.jpg").unlink()
    summary = _ingest_closed(out, source, n_workers=2)
    assert not summary.get("skipped") and summary["n_resumed"] == 10 and summary["n_restored"] == 2
    assert summary["n_workers"] == 0, "nothing was left for workers to decode"
    after = copies()
    assert [i for i in range(8) if after[i] != before[i]] == [2, 5], "only the lost copies are written again"
    assert _result(out) == fresh

    monkeypatch.setattr(ingest, "MAX_RESTORED_HERE", 1)
    before = copies()
    for image_id in (1, 4):
        (out / "corpus" / f"{image_id:08d}.jpg").unlink()
    summary = _ingest_closed(out, source, n_workers=2)
    # Copy 1 restored here; copy 4 (input 5) is one too many, so inputs 5-9 go to the workers.
    assert summary["n_resumed"] == 5 and summary["n_restored"] == 1 and summary["n_workers"] == 2
    after = copies()
    assert [i for i in range(8) if after[i] != before[i]] == [1, 4, 5, 6, 7]
    assert _result(out) == fresh


def test_workers_and_threads_give_identical_corpus(tmp_path):
    """Image ids, rows and corpus bytes do not depend on the worker count or on processes vs threads."""
    folder = _photo_folder(tmp_path / "in")
    _ingest_closed(tmp_path / "one", f"folder:{folder}", n_workers=1)
    _ingest_closed(tmp_path / "three", f"folder:{folder}", n_workers=3)
    rows, skipped, copies = _result(tmp_path / "one")
    assert len(rows) == 8 and [r[0] for r in rows] == list(range(8)) and len(skipped) == 2
    assert _result(tmp_path / "three") == (rows, skipped, copies)
    # The copies are exactly what decode_image makes of each source (the path threads took before).
    sources = [Path(r[1]) for r in rows]
    assert copies == [ingest.decode_image(p, 10 ** 9, 256).jpeg for p in sources]


def _ingest_closed(out_dir: Path, source: str, **ingest_overrides) -> dict:
    store, summary = _ingest(out_dir, source, **ingest_overrides)
    store.close()
    return summary


def test_listing_keeps_the_sorted_path_order_and_leaves_out_our_label_files(tmp_path):
    """Image ids follow the order of the files' path parts (what sorting Paths gave before the listing worked
    on strings); hidden and OS files are never listed; the label files inside the folder are neither inputs nor
    skips; the first folder level is the label."""
    folder = tmp_path / "data"
    names = ["a/x.jpg", "a-b/y.jpg", "a.b/z.JPG", "A/q.png", "a/B.jpg", "a/b.jpg", "a/b/c.jpg", "a/b c/d.jpeg",
             "a/b/.h.jpg", ".hidden/x.jpg", "a/Thumbs.db", "top.jpg", "Top.jpg", "10.jpg", "9.jpg", "é.jpg",
             "notes.", "README", "labels.txt"]
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    (folder / "b-link").symlink_to(folder / "a", target_is_directory=True)  # a link to a folder is not followed
    reference = sorted(Path(root) / f for root, dirs, files in os.walk(folder)
                       for f in files if not (f.startswith(".") or f == "Thumbs.db" or ".hidden" in root))
    cfg = load_config("tiny", overrides={"ingest": {"label_names_file": str(folder / "labels.txt")}}).ingest
    (folder / "labels.txt").write_text("a apple\n")
    cands, skipped = ingest.folder_candidates(folder, cfg)
    images = [p for p in reference if p.suffix.lower() in ingest.IMAGE_EXTENSIONS]
    assert [c.read for c in cands] == [c.source for c in cands] == [str(p) for p in images]
    # 10.jpg, 9.jpg, A/q.png, Top.jpg, a/B.jpg
    assert [c.label for c in cands][:5] == [None, None, "A", None, "apple"]
    assert skipped == [(str(folder / "README"), "not an image file (extension none)"),
                       (str(folder / "notes."), "not an image file (extension none)")]



@pytest.mark.parametrize("out_rel", ["build", "cat/out/build"])
def test_output_folder_inside_the_image_folder_is_not_an_input(tmp_path, out_rel):
    """`--out IMAGES/build`: the store, its .wal and status file, corpus copies and later stages' pictures are
    neither skipped inputs nor images (a forced re-ingest would take in thumbnails and renders); a folder of the
    same name elsewhere is still read, and the order of the rest is unchanged."""
    images = tmp_path / "images"
    for rel in ("cat/1.png", "cat/build/2.png", "dog/3.png", "dog/out/4.png"):
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 20), (len(rel) * 9, 0, 0)).save(images / rel)
    out = images / out_rel
    expected = [str(images / rel) for rel in ("cat/1.png", "cat/build/2.png", "dog/3.png", "dog/out/4.png")]
    args = ["ingest", "--images", str(images), "--out", str(out), "--preset", "tiny", "--quiet"]
    for run in ("first", "forced"):
        if run == "forced":  # what later stages leave in the output folder, pictures included
            (out / "thumbs").mkdir(exist_ok=True)
            Image.new("RGB", (8, 8)).save(out / "thumbs" / "00000000.webp")
            (out / "site").mkdir(exist_ok=True)
            (out / "site" / "index.html").write_text("<title>x</title>")
        result = CliRunner().invoke(app, args + (["--force"] if run == "forced" else []))
        assert result.exit_code == 0, result.output
        with Store.open(out, read_only=True) as store:
            assert [r[0] for r in store.query("SELECT source FROM images ORDER BY image_id")] == expected, run
            assert store.query("SELECT source FROM skipped_inputs") == [], run

def test_output_folder_that_is_the_image_folder_is_refused(tmp_path):
    """`--out` equal to `--images` (spelt differently), or a config's folder source equal to --out: one line, exit
    2, and no store is made among the images."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (24, 20)).save(images / "1.png")
    result = CliRunner().invoke(app, ["ingest", "--images", str(images), "--out", str(tmp_path / "x" / ".." / "images"),
                                      "--preset", "tiny", "--quiet"])
    assert result.exit_code == 2 and "is the image folder" in result.output, result.output
    assert sorted(p.name for p in images.iterdir()) == ["1.png"]
    config = tmp_path / "atlas.toml"
    config.write_text(f'[ingest]\nsource = "folder:{images}"\n')
    result = CliRunner().invoke(app, ["ingest", "--config", str(config), "--out", str(images), "--preset", "tiny",
                                      "--quiet"])
    assert result.exit_code == 2 and "is the image folder" in result.output, result.output


def test_ingest_summary_timeline_is_in_order(tmp_path):
    summary = _ingest_closed(tmp_path / "out", "tiny", n_tiny_images=12)
    timeline = summary["timeline_s"]
    keys = ["listed", "first_result", "read", "done"]
    assert list(timeline) == keys and all(0 <= timeline[a] <= timeline[b] for a, b in zip(keys, keys[1:])), timeline


def test_two_size_reading_separates_start_up_or_says_it_cannot():
    """The benchmarks' reading of wall = fixed + n / steady: exact on runs that follow it; none where the runs
    cannot separate the two (a negative fixed cost is noise, not a fast start)."""
    from atlasgen.testing import two_size_reading
    fixed, steady = two_size_reading(2000, 1.2 + 2000 / 2300, 8000, 1.2 + 8000 / 2300)
    assert abs(fixed - 1.2) < 1e-9 and abs(steady - 2300) < 1e-6
    assert two_size_reading(32, 2.51, 64, 6.50) is None   # smaller run faster per image than the margin
    assert two_size_reading(32, 2.0, 64, 2.0) is None     # the bigger run not slower
    assert two_size_reading(64, 1.0, 32, 2.0) is None     # sizes the wrong way round
