"""Embed: shape and ids, bf16 ≈ fp32, resuming after an interrupt without redoing chunks, and our data-loader
preprocessing against a hand computation and against the differentiable path render uses."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from atlasgen import threads
from atlasgen.stages import embed
from atlasgen.config import load_config
from atlasgen.loader import (DEFAULT_SLOTS, HEAD_START_PER_WORKER, RING_MAX_BYTES, STANDBY_AFTER_RINGS, CorpusBatches,
                             kernels_mode, load_corpus_array, ring_slots)
from atlasgen.model import EmbeddingModel, arrays_to_batch, load_embedding_model, pil_to_array, resize_tensor
from atlasgen.pipeline import run_stages
from atlasgen.progress import set_quiet
from atlasgen.store import Store

N_IMAGES = 40


def _cfg(**embed_overrides):
    return load_config("tiny", overrides={"ingest": {"n_tiny_images": N_IMAGES},
                                          "embed": {"batch_size": 4, "chunk_size": 8, **embed_overrides}})


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    """A tiny corpus ingested once (with the tiny model already written), copied by each test."""
    set_quiet(True)
    out = tmp_path_factory.mktemp("embed_src") / "build"
    with Store.open(out) as store:
        run_stages(_cfg(), store, ["ingest"])
    from atlasgen.model import load_embedding_model
    load_embedding_model("tiny", "cpu", "fp32", models_dir=out / "models")
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_embeddings_shape_ids_and_classes(ingested, tmp_path):
    out = _copy(ingested, tmp_path / "b")
    with Store.open(out) as store:
        summary = run_stages(_cfg(precision="fp32"), store, ["embed"])["embed"]
        ids, emb = store.embeddings()
        image_ids = [r[0] for r in store.query("SELECT image_id FROM images ORDER BY image_id")]
        labels = np.array([r[0] for r in store.query("SELECT label FROM images ORDER BY image_id")])
    assert summary["n_embedded"] == N_IMAGES and summary["dim"] == 96 and summary["dtype"] == "float32"
    timeline = summary["timeline_s"]  # where the start-up goes (benchmarks/embed.py prints it)
    keys = ["loader_started", "model_read", "model_loaded", "first_batch_ready", "first_batch_done",
            "last_batch_done", "done"]
    assert list(timeline) == keys and all(0 <= timeline[a] <= timeline[b] for a, b in zip(keys, keys[1:])), timeline
    assert list(ids) == image_ids and emb.shape == (N_IMAGES, 96) and np.isfinite(emb).all()
    # Even a random tiny ViT tells the generated classes apart: same-class pairs are closer.
    centred = emb - emb.mean(0)
    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    sim = unit @ unit.T
    same = labels[:, None] == labels[None, :]
    off_diag = ~np.eye(len(labels), dtype=bool)
    assert sim[same & off_diag].mean() > sim[~same].mean() + 0.2


def test_bf16_matches_fp32(ingested, tmp_path):
    results = {}
    for precision in ("fp32", "bf16"):
        with Store.open(_copy(ingested, tmp_path / precision)) as store:
            summary = run_stages(_cfg(precision=precision), store, ["embed"])["embed"]
            assert summary["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[precision]
            results[precision] = store.embeddings()[1]
    cos = _cosines(results["fp32"], results["bf16"])
    assert cos.min() > 0.999, f"bf16 vs fp32 cosine min {cos.min():.5f}"
    assert not np.array_equal(results["fp32"], results["bf16"]), "the two precisions really ran"


def test_resume_after_interrupt(ingested, tmp_path, monkeypatch):
    out = _copy(ingested, tmp_path / "b")
    calls = {"n": 0}
    real_embed_batch = embed.embed_batch

    def interrupted_after_two_chunks(model, arrays_bhw3):
        calls["n"] += 1
        if calls["n"] == 5:  # chunks are 2 batches of 4: the first two chunks are committed
            raise KeyboardInterrupt
        return real_embed_batch(model, arrays_bhw3)

    monkeypatch.setattr(embed, "embed_batch", interrupted_after_two_chunks)
    with Store.open(out) as store:
        with pytest.raises(KeyboardInterrupt):
            run_stages(_cfg(precision="fp32"), store, ["embed"])
        ids_before, emb_before = store.embeddings()
        assert store.stage_row("embed")["status"] == "interrupted"
    assert list(ids_before) == list(range(16))

    calls["n"] = 0
    monkeypatch.setattr(embed, "embed_batch", lambda m, a: (calls.__setitem__("n", calls["n"] + 1),
                                                          real_embed_batch(m, a))[1])
    with Store.open(out) as store:
        summary = run_stages(_cfg(precision="fp32"), store, ["embed"])["embed"]
        ids_after, emb_after = store.embeddings()
        assert store.stage_row("embed")["status"] == "done"
    assert calls["n"] == (N_IMAGES - 16) // 4, "only the unfinished images are embedded again"
    assert summary["n_resumed"] == 16 and summary["n_embedded"] == N_IMAGES - 16
    assert list(ids_after) == list(range(N_IMAGES))
    assert np.array_equal(emb_after[:16], emb_before), "committed chunks are left untouched"

    # The resumed result equals an uninterrupted run.
    monkeypatch.setattr(embed, "embed_batch", real_embed_batch)
    with Store.open(_copy(ingested, tmp_path / "fresh")) as store:
        run_stages(_cfg(precision="fp32"), store, ["embed"])
        _, emb_fresh = store.embeddings()
    assert _cosines(emb_fresh, emb_after).min() > 0.9999

    # A changed result-relevant option (precision) resets and re-embeds everything.
    with Store.open(out) as store:
        summary = run_stages(_cfg(precision="bf16"), store, ["embed"])["embed"]
    assert summary["n_resumed"] == 0 and summary["n_embedded"] == N_IMAGES


def test_results_read_a_batch_later_still_commit_whole_batches_and_resume(ingested, tmp_path, monkeypatch):
    """With a GPU's lag (a batch's results read after the next one is launched) an interrupt loses only what was
    not committed: the store holds whole batches in order, and the next run embeds the rest to the same result."""
    monkeypatch.setattr(embed, "results_lag", lambda device: 1)
    real_launch = embed.embed_launch
    launched = []

    def interrupted_at_the_fifth_batch(model, arrays_bhw3):
        launched.append(len(arrays_bhw3))
        if len(launched) == 5:
            raise KeyboardInterrupt
        return real_launch(model, arrays_bhw3)

    monkeypatch.setattr(embed, "embed_launch", interrupted_at_the_fifth_batch)
    out = _copy(ingested, tmp_path / "b")
    with Store.open(out) as store:
        with pytest.raises(KeyboardInterrupt):
            run_stages(_cfg(precision="fp32"), store, ["embed"])
        ids_before, _ = store.embeddings()
    # Chunks of 8 counted as batches are launched: the first holds batch 1 (batch 2 was still on the device),
    # the second batches 2 and 3; batch 4's results were never read.
    assert list(ids_before) == list(range(12))
    monkeypatch.setattr(embed, "embed_launch", real_launch)
    with Store.open(out) as store:
        summary = run_stages(_cfg(precision="fp32"), store, ["embed"])["embed"]
        ids_after, emb_after = store.embeddings()
    assert summary["n_resumed"] == 12 and summary["n_embedded"] == N_IMAGES - 12
    assert list(ids_after) == list(range(N_IMAGES))
    monkeypatch.setattr(embed, "results_lag", lambda device: 0)
    with Store.open(_copy(ingested, tmp_path / "fresh")) as store:
        run_stages(_cfg(precision="fp32"), store, ["embed"])
        _, emb_fresh = store.embeddings()
    assert _cosines(emb_fresh, emb_after).min() > 0.9999


def test_pipeline_returns_each_batch_once_in_order(tiny_model):
    """`_Pipeline.push` holds back `lag` batches and `flush` returns the rest; lag 0 returns each at once."""
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8) for n in (4, 4, 3)]
    step = embed._ModelStep(tiny_model, 4)
    expected = [step(a) for a in batches]
    for lag in (0, 1, 2):
        pipeline = embed._Pipeline(step, lag)
        got = [pipeline.push(np.arange(len(a)) + 10 * k, a) for k, a in enumerate(batches)]
        assert [len(done) for done in got] == [0] * lag + [1] * (3 - lag)
        got_all = [item for done in got for item in done] + pipeline.flush()
        assert pipeline.flush() == []
        assert [ids.tolist() for ids, _ in got_all] == [list(range(10 * k, 10 * k + len(a)))
                                                        for k, a in enumerate(batches)]
        assert all(np.allclose(emb, want, atol=1e-5) for (_, emb), want in zip(got_all, expected))


@pytest.mark.parametrize("precision,stage,lag", [("fp32", "none", 0), ("bf16", "none", 0), ("fp32", "copy", 0),
                                               ("fp32", "copy", 1), ("bf16", "none", 2)])
def test_same_embeddings_as_the_in_thread_loop(ingested, tmp_path, monkeypatch, precision, stage, lag):
    """Worker processes + shared memory + writer thread give exactly what the earlier loop gave: each image decoded
    in this process, the float batch made on the CPU, batches of 4 in id order (one torch thread on both sides,
    so the same kernels run). `copy`: batches as torch tensors from the staging thread (the GPU's path, without
    pinning). `lag`: results read back that many batches later (a GPU's 1: `embed.results_lag`)."""
    monkeypatch.setattr(embed, "loader_stage", lambda on_gpu: stage)
    monkeypatch.setattr(embed, "results_lag", lambda device: lag)
    out = _copy(ingested, tmp_path / "b")
    with Store.open(out) as store:
        summary = run_stages(_cfg(precision=precision, n_threads=1, n_workers=2), store, ["embed"])["embed"]
        ids, emb = store.embeddings()
        paths = store.corpus_paths()
    assert summary["n_workers"] == 2 and summary["batch_size"] == 4 and summary["ring_slots"] == DEFAULT_SLOTS
    assert list(ids) == list(range(N_IMAGES)), "every image, each once"
    model = load_embedding_model("tiny", "cpu", precision, models_dir=out / "models")
    size, mode = model.image_size, model.spec.resize_mode
    reference = []
    with threads.restore_torch_threads(), torch.inference_mode():
        torch.set_num_threads(1)
        for i in range(0, len(ids), 4):
            arrays = np.stack([load_corpus_array(out / paths[int(j)], size, mode) for j in ids[i:i + 4]])
            reference.append(model(arrays_to_batch(arrays)).numpy())
    assert np.array_equal(emb, np.concatenate(reference))


def test_loader_ways_agree_and_report_damaged_files(ingested, tmp_path):
    """Shared-memory views (processes), the staging thread, and threads instead of processes yield the same
    batches; a ring of 2 slots is reused across 6 batches; a damaged file is reported, not yielded."""
    out = _copy(ingested, tmp_path / "b")
    (out / "corpus" / "00000005.jpg").write_bytes(b"garbage")
    with Store.open(out, read_only=True) as store:
        items = sorted(store.corpus_paths().items())[:11]

    def collect(n_slots: int = 2, **kw) -> list:
        with CorpusBatches(out, items, 2, 112, "resize", n_workers=2, n_slots=n_slots, **kw) as batches:
            assert batches.n_slots == min(n_slots, 6), "the ring maps no more slots than there are batches"
            return [(b.image_ids.tolist(), np.array(b.arrays_bhw3.numpy() if isinstance(b.arrays_bhw3, torch.Tensor)
                                                    else b.arrays_bhw3), b.n_items, b.skipped) for b in batches]

    views, staged, in_threads = collect(), collect(stage="copy"), collect(processes=False)
    # Once the last batch's results are in, the workers are told to exit (WorkerPool.finish), before the
    # consumer is done with it.
    with CorpusBatches(out, items, 2, 112, "resize", n_workers=2) as batches:
        for b in batches:
            assert bool(batches._pool._procs) == (b.image_ids[-1] != 10), "finished only at the last batch"
    deep = collect(n_slots=20, stage="copy")  # a GPU's deep ring (ring_slots), deeper than the corpus
    assert [b[0] for b in views] == [[0, 1], [2, 3], [4], [6, 7], [8, 9], [10]]
    assert [b[2] for b in views] == [2, 2, 2, 2, 2, 1]
    (source, reason), = views[2][3]
    assert source == "image 5 (corpus/00000005.jpg)" and "cannot read the corpus copy corpus/00000005.jpg" in reason
    for other in (staged, in_threads, deep):
        assert [(b[0], b[2], b[3]) for b in other] == [(b[0], b[2], b[3]) for b in views]
        assert all(np.array_equal(x[1], y[1]) for x, y in zip(other, views))
    assert np.array_equal(views[3][1][1], load_corpus_array(out / "corpus/00000007.jpg", 112, "resize"))


def test_the_ring_gives_a_gpu_a_head_start_within_its_memory_bound():
    """On a GPU (head_start) the ring holds ~HEAD_START_PER_WORKER images per worker plus the consumer's batch,
    within RING_MAX_BYTES and 1/16 of the machine's memory; a CPU keeps 3 slots; never fewer than 3."""
    slot_bytes = 512 * 224 * 224 * 3
    big_machine = 128 << 30
    assert ring_slots(16, 512, 224, head_start=False, memory_bytes=big_machine) == DEFAULT_SLOTS == 3
    h200 = ring_slots(16, 512, 224, head_start=True, memory_bytes=big_machine)
    assert h200 == 1 + 16 * HEAD_START_PER_WORKER // 512 == 13 and h200 * slot_bytes <= RING_MAX_BYTES
    assert ring_slots(64, 512, 224, head_start=True, memory_bytes=big_machine) == RING_MAX_BYTES // slot_bytes
    assert ring_slots(16, 512, 224, head_start=True, memory_bytes=8 << 30) == (8 << 30) // 16 // slot_bytes == 6
    assert ring_slots(16, 512, 224, head_start=True, memory_bytes=1 << 30) == 3, "never fewer than 3"
    assert ring_slots(2, 512, 224, head_start=True, memory_bytes=big_machine) == 3
    assert ring_slots(4, 64, 224, head_start=True, memory_bytes=big_machine) == 1 + 4 * HEAD_START_PER_WORKER // 64
    assert ring_slots(16, 512, 224, head_start=True) >= 3, "this machine's memory is read"


def test_embed_sizes_its_ring_by_the_device(ingested, tmp_path, monkeypatch):
    """The stage asks `ring_slots` and `kernels_mode` with head_start only on a GPU and maps what they answer (at
    most the batches), and says how its workers resized."""
    asked, asked_kernels = [], []
    monkeypatch.setattr(embed, "ring_slots", lambda *a, **k: (asked.append((a, k)), 5)[1])
    monkeypatch.setattr(embed, "kernels_mode", lambda *a, **k: (asked_kernels.append((a, k)), "off")[1])
    out = _copy(ingested, tmp_path / "b")
    with Store.open(out) as store:
        summary = run_stages(_cfg(precision="fp32", n_threads=1, n_workers=2), store, ["embed"])["embed"]
        n_batches = -(-store.count("embeddings") // summary["batch_size"])
    assert asked == [((2, 4, 112), {"head_start": False})]
    assert asked_kernels == [((N_IMAGES, 4, 5), {"head_start": False})]
    assert n_batches > 5 and summary["ring_slots"] == 5 and summary["resized_with"] == "Pillow"


def test_a_gpus_long_runs_load_the_resize_kernels_in_a_standby():
    """Decoding bounds a GPU's run once the corpus outgrows the ring it fills while the model loads: from
    STANDBY_AFTER_RINGS rings on, the workers get the kernels from a standby; a CPU (the model bounds it) and short
    runs keep what the workers inherit."""
    ring = 13 * 512
    assert kernels_mode(50_000, 512, 13, head_start=True) == "standby"
    assert kernels_mode(STANDBY_AFTER_RINGS * ring + 1, 512, 13, head_start=True) == "standby"
    assert kernels_mode(STANDBY_AFTER_RINGS * ring, 512, 13, head_start=True) == "ready"
    assert kernels_mode(8_000, 512, 13, head_start=True) == "ready", "the issue's 8,000 images: no standby"
    assert kernels_mode(1_000_000, 32, 3, head_start=False) == "ready"


def test_loader_starts_while_the_model_loads_and_a_wrong_peek_is_harmless(ingested, tmp_path, monkeypatch):
    from dataclasses import replace

    from atlasgen import model as model_mod
    out = _copy(ingested, tmp_path / "b")
    spec = model_mod.peek_preprocess_spec("tiny", out / "models")
    assert spec == load_embedding_model("tiny", "cpu", "fp32", models_dir=out / "models").spec
    assert model_mod.peek_preprocess_spec("tiny", tmp_path / "nowhere") is None, "not written yet"
    assert model_mod.peek_preprocess_spec("facebook/no-such-model-cached") is None, "no network, no cache"

    order = []
    real_start, real_load = embed.CorpusBatches.start, embed.load_embedding_model
    monkeypatch.setattr(embed.CorpusBatches, "start", lambda self: (order.append(("start", self.size)),
                                                                    real_start(self))[1])
    monkeypatch.setattr(embed, "load_embedding_model", lambda *a, **k: (order.append(("load", None)),
                                                                         real_load(*a, **k))[1])
    with Store.open(out) as store:
        run_stages(_cfg(precision="fp32", n_threads=1), store, ["embed"])
        _, emb = store.embeddings()
    assert order == [("start", 112), ("load", None)], "decoding starts before the model loads"

    # A peek that disagrees with the loaded model: the loader is started again at the model's size.
    order.clear()
    monkeypatch.setattr(embed, "peek_preprocess_spec", lambda ref, models_dir: replace(spec, image_size=64))
    with Store.open(_copy(ingested, tmp_path / "c")) as store:
        run_stages(_cfg(precision="fp32", n_threads=1), store, ["embed"])
        _, emb_again = store.embeddings()
    assert order == [("start", 64), ("load", None), ("start", 112)]
    assert np.array_equal(emb, emb_again)


def test_model_step_halves_its_batch_when_the_gpu_runs_out(tiny_model, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    whole = embed.embed_batch(tiny_model, arrays)
    real = embed.embed_batch
    sizes = []

    def small_gpu(model, a):
        sizes.append(len(a))
        if len(a) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, a)

    monkeypatch.setattr(embed, "embed_batch", small_gpu)
    step = embed._ModelStep(tiny_model, 8)
    assert np.allclose(step(arrays), whole, atol=1e-5) and step.piece == 2
    assert sizes == [8, 4, 2, 2, 2, 2]
    sizes.clear()
    step(arrays)
    assert sizes == [2, 2, 2, 2], "the smaller piece is kept"


def test_damaged_corpus_file_is_skipped(ingested, tmp_path):
    out = _copy(ingested, tmp_path / "b")
    (out / "corpus" / "00000003.jpg").write_bytes(b"garbage")
    with Store.open(out) as store:
        summary = run_stages(_cfg(precision="fp32"), store, ["embed"])["embed"]
        assert summary["n_skipped"] == 1 and summary["n_embeddings"] == N_IMAGES - 1
        reason = store.scalar("SELECT reason FROM skipped_inputs WHERE stage = 'embed'")
        assert "00000003.jpg" in reason


def test_preprocessing_matches_hand_computation(tiny_model):
    size = tiny_model.spec.image_size
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    arr = pil_to_array(Image.fromarray(pixels), size, tiny_model.spec.resize_mode)
    assert arr.dtype == np.uint8 and np.array_equal(arr, pixels), "an image at the model size is not resampled"
    prepared = tiny_model.prepare(arrays_to_batch(arr[None].copy()))[0].numpy()
    mean = np.array([0.485, 0.456, 0.406]).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1)
    by_hand = (pixels.transpose(2, 0, 1) / 255.0 - mean) / std
    assert np.abs(prepared - by_hand).max() < 1e-5
    # RGBA input is dropped to RGB (as our corpus copies always are).
    assert pil_to_array(Image.fromarray(pixels).convert("RGBA"), size).shape == (size, size, 3)


@pytest.mark.parametrize("mode", ["resize", "center"])
def test_loader_resize_matches_differentiable_resize(mode):
    """The CPU loader (PIL) and the torch resize used by render/probe agree on a smooth non-square image."""
    size = 112
    yy, xx = np.mgrid[0:240, 0:320].astype(np.float32)
    img = np.stack([xx / 320 * 255, yy / 240 * 255, (np.sin(xx / 17) * np.cos(yy / 23) + 1) * 127.5], -1)
    img = img.astype(np.uint8)
    loaded = pil_to_array(Image.fromarray(img), size, mode).astype(np.float32) / 255
    full = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    resized = resize_tensor(full, size, mode)[0].permute(1, 2, 0).numpy()
    assert loaded.shape == resized.shape == (size, size, 3)
    assert np.abs(loaded - resized).mean() < 2 / 255
    # And it is not trivially so: a wrong mode gives a clearly different picture.
    other = resize_tensor(full, size, "center" if mode == "resize" else "resize")[0].permute(1, 2, 0).numpy()
    assert np.abs(loaded - other).mean() > 5 / 255


def test_thread_tuner_keeps_the_fastest(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "n_cores", lambda: 4)
    before = torch.get_num_threads()
    try:
        tuner = threads.ThreadTuner(0, n_batches=100, retune_every=5)
        assert tuner.candidates == [1, 2, 4]
        seconds_per_image = {1: 1.0, 2: 0.4, 4: 2.0}  # a busy machine: all cores is the slowest
        used = []
        for _ in range(9):
            tuner.before_batch()
            used.append(torch.get_num_threads())
            tuner.after_batch(seconds_per_image[used[-1]] * 8, 8)
        assert used[:4] == [1, 1, 2, 4], "warm-up, then each candidate once, fewest threads first"
        assert used[4:] == [2] * 5 and tuner.mostly_used == 2
        tuner.before_batch()
        assert torch.get_num_threads() == 1, "after retune_every batches the candidates are timed again"
        tuner.after_batch(0.1, 1)  # a run's tail: one item, timed at one thread
        assert tuner.mostly_used == 2, "the summary reports the count that ran most of the work"
        assert threads.ThreadTuner(3, n_batches=100).candidates == [3], "an explicit n_threads is kept"
        assert threads.ThreadTuner(0, n_batches=3).candidates == [4], "too few batches to tune: all cores"
    finally:
        torch.set_num_threads(before)


def test_staging_starts_before_the_first_batch_is_asked_for(ingested, tmp_path):
    """The staging thread copies the first batch while the caller is busy (embed: loading the model), and a
    loader closed early, with or without a batch taken, stops it."""
    with Store.open(ingested, read_only=True) as store:
        items = sorted(store.corpus_paths().items())[:6]
    batches = CorpusBatches(ingested, items, 2, 112, "resize", n_workers=2, stage="copy").start()
    try:
        deadline = time.monotonic() + 30
        while not batches._stager._handoff.full() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batches._stager._handoff.full(), "the first batch is staged before anyone asks for it"
        first = next(iter(batches))
        assert first.image_ids.tolist() == [items[0][0], items[1][0]]
    finally:
        batches.close(clean=False)
    assert not batches._stager._thread.is_alive()
    untouched = CorpusBatches(ingested, items, 2, 112, "resize", n_workers=2, stage="copy").start()
    untouched.close(clean=False)
    assert not untouched._stager._thread.is_alive()



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_warm_up_kernels_run(dtype, tmp_path, monkeypatch):
    """What the warm-up thread runs on a GPU (it ignores its own failures there, so they are caught here): tiny
    kernels, then the model step on a one-layer skeleton of the checkpoint at the real shapes."""
    from atlasgen import model as model_mod
    out = embed.first_batch_kernels(torch.device("cpu"), dtype)
    assert out.shape == (2, 2, 2, 8) and out.dtype == dtype
    assert embed.warm_up_device(torch.device("cpu"), "auto") is None, "nothing to warm on a CPU"

    assert model_mod.peek_model_skeleton("tiny", tmp_path) is None, "not written yet"
    model_mod.ensure_random_model(tmp_path / "tiny-dinov3", model_mod.tiny_config())
    config = model_mod.peek_model_config("tiny", tmp_path)
    assert config["model_type"] == "dinov3_vit" and config["num_hidden_layers"] == 2
    skeleton = model_mod.peek_model_skeleton("tiny", tmp_path)
    assert all(p.device.type == "meta" for p in skeleton.parameters()), "nothing allocated, nothing read"
    real = load_embedding_model("tiny", "cpu", "fp32", models_dir=tmp_path)
    # The real model's parameters but its second layer's (and so its shapes).
    shapes = {name: p.shape for name, p in real.backbone.named_parameters() if not name.startswith("model.layer.1.")}
    assert {name: p.shape for name, p in skeleton.named_parameters()} == shapes
    assert any(name.startswith("model.layer.0.") for name in shapes)
    warm = EmbeddingModel(skeleton.to_empty(device="cpu"), real.spec, dtype)
    emb = embed.first_batch_of(warm, 3)
    assert emb.shape == (3, real.dim) and emb.dtype == np.float32

    # The thread itself: the skeleton, given at once (the stage builds it in milliseconds once the model classes
    # are imported); tiny kernels only while a skeleton is late (a fresh process importing them) or instead of
    # none; joined without one, it ends too.
    precision = "fp32" if dtype == torch.float32 else "bf16"
    monkeypatch.setattr(embed.DeviceWarmUp, "SKELETON_WAIT_S", 30.0)  # however slow this machine is now
    warm_up = embed.DeviceWarmUp(torch.device("cpu"), precision, 2)
    warm_up.give(model_mod.peek_model_skeleton("tiny", tmp_path), real.spec)
    warm_up.join()
    assert warm_up.steps_done == ["skeleton"]
    monkeypatch.setattr(embed.DeviceWarmUp, "SKELETON_WAIT_S", 0.01)
    late = embed.DeviceWarmUp(torch.device("cpu"), precision, 2)
    deadline = time.monotonic() + 30
    while not late.steps_done and time.monotonic() < deadline:
        time.sleep(0.01)
    late.give(model_mod.peek_model_skeleton("tiny", tmp_path), real.spec)
    late.join()
    assert late.steps_done == ["kernels", "skeleton"]
    alone = embed.DeviceWarmUp(torch.device("cpu"), "fp32", 2)
    alone.join()
    assert alone.steps_done == ["kernels"] and not alone._thread.is_alive()


def test_embed_hands_the_warm_up_the_checkpoints_skeleton(ingested, tmp_path, monkeypatch):
    """The warm-up thread starts before the model loads and is given the checkpoint's skeleton and input spec,
    built from its config before the load, then joined before the first batch. (On a CPU it does nothing: here a
    recording stand-in.)"""
    events = []

    class Recorder:
        def give(self, skeleton, spec):
            events.append(("give", skeleton.config.num_hidden_layers, spec))

        def join(self):
            events.append(("join",))

    real_load = embed.load_embedding_model
    monkeypatch.setattr(embed, "warm_up_device", lambda *a: (events.append(("start", a)), Recorder())[1])
    monkeypatch.setattr(embed, "load_embedding_model",
                        lambda *a, **k: (events.append(("load",)), real_load(*a, **k))[1])
    out = _copy(ingested, tmp_path / "b")
    with Store.open(out) as store:
        run_stages(_cfg(precision="fp32", n_threads=1), store, ["embed"])
    (_, (device, precision, batch_size)), give, load, join = events
    assert device.type == "cpu" and precision == "fp32" and batch_size == 4
    spec = real_load("tiny", "cpu", "fp32", models_dir=out / "models").spec
    assert give == ("give", 1, spec) and load == ("load",) and join == ("join",)
