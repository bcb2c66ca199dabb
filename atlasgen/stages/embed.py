"""Embed: every ingested image → the model's CLS `pooler_output` in `embeddings`.

Corpus JPEGs are decoded and resized by worker threads (`pil_to_array`, our own preprocessing) while
the model runs on the previous batch; the model runs in bf16 where the hardware is fast at it
(`precision = "auto"`). Embeddings are committed per chunk of `chunk_size` images, one transaction each,
so an interrupted run resumes with the images that have no embedding yet.

A chunk is an executor's unit (`embed_unit`, pure): here, or on Ray workers (`[run] executor = "ray"`), which
get the model's weights through Ray's object store and the JPEGs as bytes (or read them from the output
folder when `[run] shared_corpus`); only this process writes the store.
"""
from __future__ import annotations

import io
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch
from PIL import Image

from ..config import EmbedConfig
from ..errors import StageInputError
from ..executor import LocalExecutor, PackedModel, resolve_precision
from ..model import EmbeddingModel, arrays_to_batch, load_embedding_model, pil_to_array, resolve_device
from ..progress import bar, say
from ..store import Store
from ..threads import ThreadTuner, restore_torch_threads
from .base import Stage

STAGE = "embed"


def load_corpus_array(path: Path | BinaryIO, size: int, resize_mode: str) -> np.ndarray:
    """One corpus JPEG (a path, or its bytes as a file object) → uint8 (size, size, 3), exactly as the model
    sees it."""
    with Image.open(path) as image:
        # DCT-domain downscaling when the JPEG is much bigger than the model input (a no-op for our
        # 256 px corpus at 224).
        image.draft("RGB", (size, size))
        return pil_to_array(image, size, resize_mode)


def embed_batch(model: EmbeddingModel, arrays_bhw3: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) → float32 (B, D) embeddings."""
    device = next(model.backbone.parameters()).device
    with torch.inference_mode():
        return model(arrays_to_batch(arrays_bhw3).to(device)).cpu().numpy()


@dataclass
class EmbedUnit:
    """One chunk of images (the commit granularity): ids and corpus paths relative to the output folder
    `root`. `data`: each image's JPEG bytes (or why it could not be read), filled by the driver just before the
    unit goes to a worker that cannot read the corpus; None = the worker reads root/corpus_path."""

    image_ids: list[int]
    corpus_paths: list[str]
    root: str
    data: list[bytes | str] | None = None


@dataclass
class EmbedUnitResult:
    image_ids: np.ndarray                 # (N,) the images embedded, in unit order
    emb_nd: np.ndarray                    # (N, D) float32
    skipped: list[tuple[str, str]]        # (source, reason) of images that could not be read


@dataclass
class EmbedWorker:
    """What a worker needs for every unit (the executor's payload; `setup_embed_worker` builds it)."""

    model: EmbeddingModel | PackedModel   # packed when it travels to a Ray worker
    device: str
    batch_size: int
    n_decode_threads: int
    tuner: ThreadTuner | None = None      # local only: picks torch threads by timing real batches


def setup_embed_worker(worker: EmbedWorker) -> EmbedWorker:
    if isinstance(worker.model, PackedModel):
        return replace(worker, model=worker.model.build(resolve_device(worker.device)))
    return worker


def _unreadable(corpus_path: str, e: Exception) -> str:
    return f"cannot read the corpus copy {corpus_path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


def embed_unit(worker: EmbedWorker, unit: EmbedUnit, on_step: Callable[[int], None] | None = None) -> EmbedUnitResult:
    """Decode and embed one chunk (pure: no store). Decoding runs ahead of the model by up to two batches.
    `on_step(k)` after batch k."""
    model = worker.model
    size, mode = model.spec.image_size, model.spec.resize_mode
    root = Path(unit.root)
    items = list(zip(unit.image_ids, unit.corpus_paths, unit.data or [None] * len(unit.image_ids)))

    def decode(item: tuple[int, str, bytes | str | None]) -> np.ndarray | str:
        _, corpus_path, data = item
        if isinstance(data, str):  # the driver could not read it
            return data
        try:
            return load_corpus_array(io.BytesIO(data) if data is not None else root / corpus_path, size, mode)
        except Exception as e:  # corpus files are ours, but a user may have deleted or damaged one
            return _unreadable(corpus_path, e)

    ids: list[int] = []
    embs: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    batches = _split(items, worker.batch_size)
    with ThreadPoolExecutor(max(1, worker.n_decode_threads), thread_name_prefix="embed-decode") as pool:
        ahead: deque[list[Future]] = deque()
        next_batch = 0

        def submit_more() -> None:
            nonlocal next_batch
            while next_batch < len(batches) and len(ahead) < 2:
                ahead.append([pool.submit(decode, item) for item in batches[next_batch]])
                next_batch += 1

        for k, batch in enumerate(batches):
            submit_more()
            results = [f.result() for f in ahead.popleft()]
            submit_more()
            good = [(item, r) for item, r in zip(batch, results) if not isinstance(r, str)]
            skipped.extend((f"image {item[0]} ({item[1]})", r) for item, r in zip(batch, results) if isinstance(r, str))
            if good:
                if worker.tuner is not None:
                    worker.tuner.before_batch()
                t_batch = time.perf_counter()
                emb_bd = embed_batch(model, np.stack([r for _, r in good]))
                if worker.tuner is not None:
                    worker.tuner.after_batch(time.perf_counter() - t_batch, len(good))
                assert np.isfinite(emb_bd).all(), "the model returned non-finite embeddings"
                ids.extend(item[0] for item, _ in good)
                embs.append(emb_bd)
            if on_step is not None:
                on_step(k)
    emb_nd = np.concatenate(embs) if embs else np.zeros((0, model.dim), np.float32)
    return EmbedUnitResult(np.asarray(ids, dtype=np.int64), emb_nd, skipped)


def _with_bytes(unit: EmbedUnit) -> EmbedUnit:
    """The unit with its JPEG bytes read here, for a worker that cannot see the output folder."""
    data: list[bytes | str] = []
    for corpus_path in unit.corpus_paths:
        try:
            data.append((Path(unit.root) / corpus_path).read_bytes())
        except OSError as e:
            data.append(_unreadable(corpus_path, e))
    return replace(unit, data=data)


def run(cfg: EmbedConfig, store: Store, executor=None) -> dict:
    assert cfg.batch_size >= 1 and cfg.chunk_size >= 1, "embed.batch_size and embed.chunk_size must be ≥ 1"
    n_total = store.count("images")
    if n_total == 0:
        raise StageInputError("there are no ingested images to embed",
                              "run `atlasgen ingest` first (or `atlasgen build`) with the same --out")
    todo = store.images_without_embedding()
    n_done_before = n_total - len(todo)
    if n_done_before:
        say(f"embed: {n_done_before} of {n_total} images already embedded, resuming")
    # Nothing to do needs no cluster: the model is loaded here for the summary only.
    executor = executor if executor is not None and todo else LocalExecutor()
    if executor.remote:
        # Every worker uses the precision resolved for the hardware the units run on (asked of a worker).
        precision = resolve_precision(cfg.precision, executor.unit_hardware(cfg.device).bf16_fast)
        model = load_embedding_model(cfg.model, "cpu", precision, models_dir=store.paths.models_dir)
        payload = EmbedWorker(PackedModel.pack(model), cfg.device, cfg.batch_size, cfg.n_workers)
        tuner = None
    else:
        model = load_embedding_model(cfg.model, cfg.device, cfg.precision, models_dir=store.paths.models_dir)
        tuner = ThreadTuner(cfg.n_threads, -(-len(todo) // cfg.batch_size))
        payload = EmbedWorker(model, cfg.device, cfg.batch_size, cfg.n_workers, tuner)
    out_dir = store.paths.out_dir
    units = [EmbedUnit([item[0] for item in chunk], [item[1] for item in chunk], str(out_dir.resolve()))
             for chunk in _split(todo, cfg.chunk_size)]
    n_embedded = 0
    skipped: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    shown: dict[int, int] = {}  # images of a unit already on the progress bar

    def on_step(unit: EmbedUnit, k: int) -> None:
        n = min(cfg.batch_size, len(unit.image_ids) - k * cfg.batch_size)
        shown[unit.image_ids[0]] = shown.get(unit.image_ids[0], 0) + n
        progress.update(n)

    with restore_torch_threads(), bar(total=n_total, desc="embed", unit="img") as progress:
        progress.update(n_done_before)
        ship = None if executor.shared_corpus else _with_bytes
        for unit, result in executor.map_units(setup_embed_worker, payload, embed_unit, units,
                                               unit_id=lambda u: u.image_ids[0], device=cfg.device, ship=ship,
                                               on_step=on_step):
            if len(result.image_ids):
                store.add_embeddings(result.image_ids, result.emb_nd)
                n_embedded += len(result.image_ids)
            skipped.extend(result.skipped)
            progress.update(len(unit.image_ids) - shown.pop(unit.image_ids[0], 0))
    if skipped:
        store.replace_skips(STAGE, skipped)
        say(f"embed: {len(skipped)} corpus image(s) could not be read (see skipped_inputs)")
    seconds = time.perf_counter() - t0
    summary = {"n_embedded": n_embedded, "n_resumed": n_done_before, "n_embeddings": store.count("embeddings"),
               "n_skipped": len(skipped), "dim": model.dim, "dtype": str(model.dtype).replace("torch.", ""),
               "images_per_s": round(n_embedded / seconds, 1) if seconds > 0 else None}
    if tuner is not None:
        summary["n_threads"] = tuner.last_chosen or tuner.candidates[0]
    else:
        summary.update(executor=executor.name, n_workers=executor.n_workers)
    return summary


def _split(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


SPEC = Stage("embed", EmbedConfig, run, inputs=("ingest",), tables=("embeddings",), skips=True, executor=True)
