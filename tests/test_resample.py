"""atlasgen.resample: the numba kernels give Pillow's BICUBIC resize byte for byte, and its BILINEAR one into
embed's batches; ingest loads them while its workers start with Pillow and swaps them in, with the same corpus
bytes, and falls back to Pillow when they are unavailable or disagree; embed's loader gets them from a standby
supervisor, with the same batches."""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atlasgen import resample, workers
from atlasgen.config import load_config
from atlasgen.loader import CorpusBatches, load_corpus_array, load_corpus_into
from atlasgen.model import resize_plan
from atlasgen.pipeline import run_stages
from atlasgen.progress import set_quiet
from atlasgen.store import Store


def _black_kernels(src_px, out_w, out_h, vertical_first, scratch, bilinear):
    """Kernels that disagree with Pillow: every picture black."""
    return np.zeros((out_h, out_w), np.uint32)


def _pack_rgb(src, out):
    """The kernels' 4-byte → 3-byte copy, in numpy (for stand-in kernels)."""
    out[...] = src.view(np.uint8).reshape(*src.shape, 4)[..., :3] if src.flags.c_contiguous else \
        np.ascontiguousarray(src).view(np.uint8).reshape(*src.shape, 4)[..., :3]
    return out


@pytest.fixture(scope="module")
def kernels_ready():
    assert resample.prepare() is None, "numba is a dependency: the kernels must compile and match this Pillow"


def _random_sizes(rng: np.random.Generator, n: int):
    """(in_hw, out_hw) pairs: shrinks, stretches, one axis only, tall squeezes (Pillow 13's vertical-first
    case), one-pixel sides."""
    for i in range(n):
        in_h, in_w = (int(v) for v in rng.integers(1, 400, 2))
        out_h, out_w = (int(v) for v in rng.integers(1, 450, 2))
        if i % 5 == 0:
            out_w = in_w
        if i % 7 == 0:
            out_h = in_h
        if i % 4 == 1:
            in_h, out_h, out_w = in_h + 200, max(1, in_h // 5), max(1, in_w - 3)
        if (out_h, out_w) != (in_h, in_w):
            yield (in_h, in_w), (out_h, out_w)


def test_bicubic_matches_pillow_byte_for_byte(kernels_ready):
    rng = np.random.default_rng(0)
    n_checked = n_vertical_first = 0
    for (in_h, in_w), (out_h, out_w) in _random_sizes(rng, 160):
        src_hwc = rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
        if n_checked % 2:  # smooth pictures too, not only noise
            src_hwc = np.cumsum(src_hwc, axis=1, dtype=np.uint32).astype(np.uint8)
        picture = Image.fromarray(src_hwc)
        got = resample.bicubic(picture, (out_w, out_h))
        want = picture.resize((out_w, out_h), Image.BICUBIC)
        assert got.size == want.size and got.mode == "RGB"
        assert got.tobytes() == want.tobytes(), f"{in_w}×{in_h} → {out_w}×{out_h}"
        n_checked += 1
        n_vertical_first += in_h - out_h > 2 * max(0, in_w - out_w) and in_h > out_h
    assert n_checked > 120 and n_vertical_first > 20


def test_bilinear_into_matches_pillow_byte_for_byte(kernels_ready):
    """Embed's preprocessing (`pil_to_array`: BILINEAR with reducing_gap=3.0, a centre crop in "center" mode), as the
    kernels write it into a batch's slot: the same bytes for every size where no reduce step comes first."""
    rng = np.random.default_rng(4)
    n_checked = n_cropped = 0
    for (in_h, in_w), (out_h, out_w) in _random_sizes(rng, 120):
        src_hwc = rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
        if n_checked % 2:
            src_hwc = np.cumsum(src_hwc, axis=0, dtype=np.uint32).astype(np.uint8)
        picture = Image.fromarray(src_hwc)
        side = max(1, min(out_h, out_w))
        for mode in ("resize", "center"):
            size, box = resize_plan(in_w, in_h, side, mode)
            if not resample.applies(in_w, in_h, *size):
                continue
            want = np.asarray(picture.resize(size, Image.BILINEAR, reducing_gap=3.0).crop(box))
            slot = np.full((side, side, 3), 7, np.uint8)
            assert resample.bilinear_into(picture, size, box, slot) is slot
            assert np.array_equal(slot, want), f"{in_w}×{in_h} → {size}, {box}"
            n_checked += 1
            n_cropped += box != (0, 0, *size)
    assert n_checked > 120 and n_cropped > 40


def test_the_transpose_tiles_and_their_ragged_edges(kernels_ready):
    """The kernels' transpose runs whole fixed-size tiles, then the leftover columns and rows: every split of a
    shape into tiles and edges (none, either, both; smaller than one tile) gives numpy's transpose."""
    from atlasgen import _resample_kernels
    tile = _resample_kernels.TILE
    rng = np.random.default_rng(3)
    for n_rows in (1, tile - 1, tile, 2 * tile, 2 * tile + 3):
        for n_cols in (1, tile, tile + 5, 3 * tile):
            src = rng.integers(0, 2 ** 32, (n_rows, n_cols), dtype=np.uint64).astype(np.uint32)
            out = np.zeros((n_cols, n_rows), np.uint32)
            assert np.array_equal(_resample_kernels.transpose(src, out), src.T), (n_rows, n_cols)


def test_the_pass_order_matters_so_the_check_can_fail(kernels_ready):
    """A tall squeeze resampled in the other pass order differs from Pillow: prepare()'s check against the
    installed Pillow is what keeps the bytes the same."""
    src_hwc = np.random.default_rng(1).integers(0, 256, (300, 40, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(src_hwc).resize((37, 60), Image.BICUBIC))
    runs = {rule: np.asarray(resample._resize(resample._kernels, Image.fromarray(src_hwc), (37, 60), rule))
            for rule in (True, False)}
    assert np.array_equal(runs[resample._vertical_first_rule], want)
    assert not np.array_equal(runs[not resample._vertical_first_rule], want)


def test_the_kernels_borrow_pillows_pixels_and_copy_them_where_they_cannot(kernels_ready, monkeypatch):
    """Pillow keeps an RGB picture as 4-byte pixels; the kernels read that memory in place (through Arrow), which
    is what makes them faster than converting to 3-byte pixels and back. A picture Pillow keeps in several
    blocks (a big one), or a Pillow without Arrow export, gets a copy, with the same bytes out."""
    rng = np.random.default_rng(2)
    picture = Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
    pixels = resample._pixels(picture)
    assert pixels.shape == (375, 500) and not pixels.flags.writeable
    picture.putpixel((3, 0), (9, 8, 7))
    assert int(pixels[0, 3]) & 0xFFFFFF == 0x070809, "read in place, not copied"
    big = Image.fromarray(rng.integers(0, 256, (2100, 2300, 3), dtype=np.uint8))  # > Pillow's 16 MB blocks
    smaller = big.resize((900, 800), Image.BICUBIC)
    assert resample.bicubic(big, (900, 800)).tobytes() == smaller.tobytes()
    monkeypatch.delattr(Image.Image, "__arrow_c_array__")  # a Pillow before 11.2
    copied = resample._pixels(picture)
    picture.putpixel((3, 0), (1, 2, 3))
    assert int(copied[0, 3]) & 0xFFFFFF == 0x070809
    assert resample.bicubic(picture, (341, 256)).tobytes() == picture.resize((341, 256), Image.BICUBIC).tobytes()


def test_the_kernels_reuse_one_scratch_buffer_per_thread_and_hand_back_copies(kernels_ready):
    """Every array the kernels make is carved out of their thread's scratch buffer, kept between pictures (fresh
    arrays per picture cost ~460 page faults each); so each result must be a copy that a later picture leaves
    alone, and threads (ingest's workers where there is no fork) must not share the buffer."""
    import threading
    rng = np.random.default_rng(3)
    pictures = [Image.fromarray(rng.integers(0, 256, (375 + i, 500 - i, 3), dtype=np.uint8)) for i in range(24)]
    first = resample.bicubic(pictures[0], (341, 256))
    first_bytes, scratch = first.tobytes(), resample._local.scratch
    resample.bicubic(pictures[1], (300, 200))
    assert resample._local.scratch is scratch and first.tobytes() == first_bytes

    mismatches = []

    def shrink_all(offset: int) -> None:
        for i in range(offset, len(pictures), 2):
            for _ in range(3):
                size = (341 - i, 256 - i)
                if resample.bicubic(pictures[i], size).tobytes() != pictures[i].resize(size, Image.BICUBIC).tobytes():
                    mismatches.append(i)
    threads = [threading.Thread(target=shrink_all, args=(offset,)) for offset in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not mismatches


def test_prepare_reports_why_the_kernels_are_off(monkeypatch):
    monkeypatch.setattr(resample, "_kernels", None)

    def no_numba():
        raise ModuleNotFoundError("No module named 'numba'")

    monkeypatch.setattr(resample, "_compile", no_numba)
    assert resample.prepare() == "numba kernels unavailable: No module named 'numba'"
    monkeypatch.setattr(resample, "_compile", lambda: (_black_kernels, _pack_rgb))
    assert resample.prepare() == "numba kernels differ from this Pillow's resize"
    assert resample._kernels is None
    # Right for ingest's bicubic, wrong for embed's bilinear (the bicubic filter for both): off all the same.
    from atlasgen import _resample_kernels
    real_resize = _resample_kernels.resize
    monkeypatch.setattr(resample, "_compile", lambda: (
        lambda src, out_w, out_h, vertical_first, scratch, bilinear:
            real_resize(src, out_w, out_h, vertical_first, scratch, False), _pack_rgb))
    assert resample.prepare() == "numba kernels differ from this Pillow's resize"
    monkeypatch.setattr(resample, "_compile", lambda: (real_resize, _pack_rgb))
    assert resample.prepare() is None, "the stand-in copy is right: the check above failed on the filter"


def _big_photo_folder(folder: Path) -> Path:
    """JPEGs larger than a 64 px corpus side in both orientations, a tall strip (vertical pass first), one
    already small enough, and a PNG over 6× the side (Pillow's reduce step: not the kernels' case)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i, (h, w) in enumerate([(75, 100), (100, 75), (97, 131), (400, 70), (50, 60), (90, 91)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (420, 500, 3), dtype=np.uint8)).save(folder / "big.png")
    return folder


def _ingest_copies(out_dir: Path, folder: Path) -> tuple[dict, list[bytes]]:
    set_quiet(True)
    cfg = load_config("tiny", overrides={"ingest": {"source": f"folder:{folder}", "corpus_side": 64,
                                                    "n_workers": 2}})
    with Store.open(out_dir) as store:
        summary = run_stages(cfg, store, ["ingest"])["ingest"]
        paths = [r[0] for r in store.query("SELECT corpus_path FROM images ORDER BY image_id")]
    return summary, [(out_dir / p).read_bytes() for p in paths]


def _pillow_copies(out_dir: Path, folder: Path, monkeypatch) -> list[bytes]:
    """The copies of an ingest that uses Pillow alone."""
    with monkeypatch.context() as m:
        m.setattr(resample, "_kernels", None)
        m.setattr(resample, "worth_loading", lambda n_images, n_workers: False)
        summary, copies = _ingest_copies(out_dir, folder)
    assert summary["fast_resize"] is False and "kernels_ready" not in summary["timeline_s"]
    return copies


def test_ingest_with_the_kernels_ready_uses_them_with_the_same_bytes(tmp_path, monkeypatch, kernels_ready):
    folder = _big_photo_folder(tmp_path / "in")
    pillow_copies = _pillow_copies(tmp_path / "pillow", folder, monkeypatch)
    summary, kernel_copies = _ingest_copies(tmp_path / "kernels", folder)
    assert summary["fast_resize"] is True, "kernels this process has already cost nothing: used at any size"
    assert len(kernel_copies) == 7 and kernel_copies == pillow_copies
    # The workers did call the kernels: for the five pictures they shrink (not big.png, listed first, which takes
    # Pillow's reduce step, nor the one already small), a stand-in changes the copies.
    monkeypatch.setattr(resample, "bicubic", lambda rgb, size: Image.new("RGB", size))
    _, stand_in_copies = _ingest_copies(tmp_path / "stand-in", folder)
    assert [a != b for a, b in zip(stand_in_copies, pillow_copies)] == [False, True, True, True, True, False, True]


@pytest.mark.parametrize("processes", [True, False])
def test_a_big_ingest_starts_with_pillow_and_swaps_in_the_kernels_once_loaded(tmp_path, monkeypatch, processes):
    """The workers do not wait for the kernels' start-up: the first copies come from Pillow, and workers forked
    once the kernels are ready (or, where there is no fork, the same threads) make the rest. Here stand-in
    kernels that paint black, ready only once a worker has written a copy, so after the first tasks were handed
    out."""
    if not processes:
        monkeypatch.setattr(workers, "can_fork", lambda: False)
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(400):
        Image.fromarray(rng.integers(0, 256, (75, 100, 3), dtype=np.uint8)).save(folder / f"{i:03d}.jpg")
    pillow_copies = _pillow_copies(tmp_path / "pillow", folder, monkeypatch)
    out_dir = tmp_path / "swapped"
    corpus_dir = out_dir / "corpus"

    def slow_prepare():
        t0 = time.monotonic()
        while not any(corpus_dir.rglob("*.jpg")) and time.monotonic() - t0 < 60:
            time.sleep(0.002)
        resample._kernels = _black_kernels
        return None

    monkeypatch.setattr(resample, "_kernels", None)
    monkeypatch.setattr(resample, "prepare", slow_prepare)
    monkeypatch.setattr(resample, "worth_loading", lambda n_images, n_workers: True)
    summary, copies = _ingest_copies(out_dir, folder)
    assert summary["fast_resize"] is True
    timeline = summary["timeline_s"]
    assert timeline["first_result"] <= timeline["kernels_ready"] <= timeline["read"]
    is_black = [np.asarray(Image.open(io.BytesIO(c))).max() < 8 for c in copies]
    n_pillow = is_black.index(True)
    assert 0 < n_pillow < 400 and all(is_black[n_pillow:]), "Pillow's copies first, then only the kernels'"
    assert copies[:n_pillow] == pillow_copies[:n_pillow]


def test_ingest_falls_back_to_pillow_when_the_kernels_disagree(tmp_path, monkeypatch):
    folder = _big_photo_folder(tmp_path / "in")
    pillow_copies = _pillow_copies(tmp_path / "pillow", folder, monkeypatch)
    monkeypatch.setattr(resample, "worth_loading", lambda n_images, n_workers: True)
    monkeypatch.setattr(resample, "_kernels", None)
    monkeypatch.setattr(resample, "_compile", lambda: (_black_kernels, _pack_rgb))
    summary, copies = _ingest_copies(tmp_path / "fallback", folder)
    assert summary["fast_resize"] is False and "kernels_ready" in summary["timeline_s"]
    assert copies == pillow_copies


@pytest.mark.parametrize("mode", ["resize", "center"])
def test_embeds_loader_with_the_kernels_writes_pillows_bytes(tmp_path, kernels_ready, mode):
    """`load_corpus_into` with the kernels: what `load_corpus_array` (Pillow) gives, for corpus copies of both
    orientations, a grey one, and one over 6× the model's size (Pillow's reduce step: Pillow does it)."""
    rng = np.random.default_rng(5)
    pictures = {"wide.jpg": rng.integers(0, 256, (256, 341, 3), dtype=np.uint8),
                "tall.jpg": rng.integers(0, 256, (341, 256, 3), dtype=np.uint8),
                "huge.jpg": rng.integers(0, 256, (700, 720, 3), dtype=np.uint8)}
    for name, pixels in pictures.items():
        Image.fromarray(pixels).save(tmp_path / name, quality=90)
    Image.fromarray(pictures["wide.jpg"][..., 0]).save(tmp_path / "grey.jpg")
    for name in [*pictures, "grey.jpg"]:
        want = load_corpus_array(tmp_path / name, 112, mode)
        slot = np.zeros_like(want)
        load_corpus_into(tmp_path / name, 112, mode, slot, kernels=True)
        assert np.array_equal(slot, want), name


def test_embeds_loader_hands_the_batches_to_a_standby_that_loaded_the_kernels(tmp_path, kernels_ready,
                                                                                monkeypatch):
    """kernels="standby": the workers start with Pillow; a standby supervisor loads the kernels and its workers
    decode the batches submitted after that, with the same bytes; "off" never uses them, and "ready" uses them
    from the first batch where this process has them. Here the kernels are compiled and cached already (the
    fixture), so the standby loads them in about a second; the consumer waits for it."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    rng = np.random.default_rng(6)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (256, 341, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
    items = [(i, f"corpus/{i % 12}.jpg") for i in range(120)]

    def collect(kernels: str) -> tuple[np.ndarray, str]:
        with CorpusBatches(tmp_path, items, 4, 112, "center", n_workers=2, kernels=kernels) as batches:
            arrays = []
            for batch in batches:
                arrays.append(np.array(batch.arrays_bhw3))
                if len(arrays) == 1 and batches._standing_by:  # wait for the standby's answer (one poll of its pipe)
                    assert batches._pool._standby[2].poll(60)
            return np.concatenate(arrays), batches.resized_with

    pillow, resized_with = collect("off")
    assert resized_with == "Pillow"
    monkeypatch.setattr(resample, "_kernels", None)  # as in a fresh process
    standby, resized_with = collect("standby")
    assert resized_with.startswith("kernels from batch "), resized_with
    first_fast = int(resized_with.rsplit(" ", 1)[1])
    assert 0 < first_fast < 8, "adopted as soon as it was ready"
    assert np.array_equal(standby, pillow)
    # The standby's workers did call the kernels, from that batch on and not before: a stand-in that paints
    # black (the workers inherit it from this process) shows where.
    monkeypatch.setattr(resample, "bilinear_into", lambda rgb, size, box, out_hw3: out_hw3.fill(0))
    stand_in, resized_with = collect("standby")
    first_black = int(resized_with.rsplit(" ", 1)[1])
    per_image_max = stand_in.reshape(len(items), -1).max(1)
    assert (per_image_max[:4 * first_black] > 0).all() and (per_image_max[4 * first_black:] == 0).all()
    monkeypatch.setattr(resample, "_kernels", None)
    monkeypatch.setattr(resample, "prepare", lambda: "no kernels here")
    _, resized_with = collect("standby")
    assert resized_with == "Pillow (no kernels here)"
    monkeypatch.undo()
    assert resample.ready()
    ready, resized_with = collect("ready")
    assert resized_with == "kernels" and np.array_equal(ready, pillow)
