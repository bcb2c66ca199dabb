"""Embed: every ingested image → the model's CLS `pooler_output` in `embeddings`.

Corpus JPEGs are decoded and resized by worker threads (`pil_to_array`, our own preprocessing) while
the model runs on the previous batch; the model runs in bf16 where the hardware is fast at it
(`precision = "auto"`). Embeddings are committed per chunk of `chunk_size` images, one transaction each,
so an interrupted run resumes with the images that have no embedding yet.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import EmbedConfig
from ..errors import StageInputError
from ..model import EmbeddingModel, arrays_to_batch, load_embedding_model, pil_to_array
from ..progress import bar, say
from ..store import Store
from ..threads import ThreadTuner, restore_torch_threads
from .base import Stage

STAGE = "embed"


def load_corpus_array(path: Path, size: int, resize_mode: str) -> np.ndarray:
    """One corpus JPEG → uint8 (size, size, 3), exactly as the model sees it."""
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


def run(cfg: EmbedConfig, store: Store) -> dict:
    assert cfg.batch_size >= 1 and cfg.chunk_size >= 1, "embed.batch_size and embed.chunk_size must be ≥ 1"
    n_total = store.count("images")
    if n_total == 0:
        raise StageInputError("there are no ingested images to embed",
                              "run `atlasgen ingest` first (or `atlasgen build`) with the same --out")
    todo = store.images_without_embedding()
    n_done_before = n_total - len(todo)
    if n_done_before:
        say(f"embed: {n_done_before} of {n_total} images already embedded, resuming")
    model = load_embedding_model(cfg.model, cfg.device, cfg.precision, models_dir=store.paths.models_dir)
    size, mode = model.spec.image_size, model.spec.resize_mode
    out_dir = store.paths.out_dir
    n_embedded = 0
    skipped: list[tuple[str, str]] = []
    t0 = time.perf_counter()

    def decode(item: tuple[int, str]) -> np.ndarray | str:
        try:
            return load_corpus_array(out_dir / item[1], size, mode)
        except Exception as e:  # corpus files are ours, but a user may have deleted or damaged one
            return f"cannot read the corpus copy {item[1]}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"

    chunks = [todo[i:i + cfg.chunk_size] for i in range(0, len(todo), cfg.chunk_size)]
    tuner = ThreadTuner(cfg.n_threads, -(-len(todo) // cfg.batch_size))
    with restore_torch_threads(), ThreadPoolExecutor(max(1, cfg.n_workers), thread_name_prefix="embed-decode") as pool, \
            bar(total=n_total, desc="embed", unit="img") as progress:
        progress.update(n_done_before)
        # Decoding runs ahead of the model by up to two batches, across chunk boundaries.
        batches = [batch for chunk in chunks for batch in _split(chunk, cfg.batch_size)]
        ahead: deque[list[Future]] = deque()
        next_batch = 0

        def submit_more() -> None:
            nonlocal next_batch
            while next_batch < len(batches) and len(ahead) < 2:
                ahead.append([pool.submit(decode, item) for item in batches[next_batch]])
                next_batch += 1

        batch_index = 0
        for chunk in chunks:
            chunk_ids: list[int] = []
            chunk_emb: list[np.ndarray] = []
            for batch in _split(chunk, cfg.batch_size):
                submit_more()
                results = [f.result() for f in ahead.popleft()]
                submit_more()
                assert batches[batch_index] == batch, "decode order and batch order diverged"
                batch_index += 1
                good = [(item, r) for item, r in zip(batch, results) if not isinstance(r, str)]
                skipped.extend((f"image {item[0]} ({item[1]})", r) for item, r in zip(batch, results)
                               if isinstance(r, str))
                if good:
                    tuner.before_batch()
                    t_batch = time.perf_counter()
                    emb_bd = embed_batch(model, np.stack([r for _, r in good]))
                    tuner.after_batch(time.perf_counter() - t_batch, len(good))
                    assert np.isfinite(emb_bd).all(), "the model returned non-finite embeddings"
                    chunk_ids.extend(item[0] for item, _ in good)
                    chunk_emb.append(emb_bd)
                progress.update(len(batch))
            if chunk_ids:
                store.add_embeddings(np.asarray(chunk_ids), np.concatenate(chunk_emb))
                n_embedded += len(chunk_ids)
    if skipped:
        store.replace_skips(STAGE, skipped)
        say(f"embed: {len(skipped)} corpus image(s) could not be read (see skipped_inputs)")
    seconds = time.perf_counter() - t0
    return {"n_embedded": n_embedded, "n_resumed": n_done_before, "n_embeddings": store.count("embeddings"),
            "n_skipped": len(skipped), "dim": model.dim, "dtype": str(model.dtype).replace("torch.", ""),
            "images_per_s": round(n_embedded / seconds, 1) if seconds > 0 else None,
            "n_threads": tuner.last_chosen or tuner.candidates[0]}


def _split(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


SPEC = Stage("embed", EmbedConfig, run, inputs=("ingest",), tables=("embeddings",), skips=True)
