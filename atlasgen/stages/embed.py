"""Embed: every ingested image → the model's CLS `pooler_output` in `embeddings`.

Three pieces, each on its own: the loader (`loader.CorpusBatches`: worker processes decode and resize corpus
JPEGs into shared memory, several batches ahead of the model; on CUDA a thread stages them in pinned memory for
asynchronous copies), the pure model step `embed_batch`, and the writer (`workers.StoreWriter`: a thread with
its own store connection commits each chunk of `chunk_size` images in one transaction while the model goes on).
The model runs in bf16 where the hardware is fast at it (`precision = "auto"`). An interrupted run resumes
with the images that have no embedding yet.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..config import EmbedConfig
from ..errors import StageInputError
from ..loader import CorpusBatches, load_corpus_array  # noqa: F401  (load_corpus_array: re-exported)
from ..model import EmbeddingModel, load_embedding_model
from ..progress import bar, say
from ..store import Store
from ..threads import ThreadTuner, restore_torch_threads
from ..workers import StoreWriter, resolve_n_workers
from .base import Stage

STAGE = "embed"
CPU_BATCH_SIZE = 32        # batch_size = 0 on a CPU: what the CPU path always used
MAX_GPU_BATCH_SIZE = 1024  # ViT-S/16 in bf16 on an H100 is at its full rate by then


def embed_batch(model: EmbeddingModel, arrays_bhw3) -> np.ndarray:
    """uint8 (B, H, W, 3) → float32 (B, D) embeddings. `arrays_bhw3` is a numpy array or a uint8 torch tensor
    (pinned, for an asynchronous copy to the GPU); the uint8 → [0, 1] float conversion runs on the model's
    device, with the same float ops as on the CPU."""
    device = model.mean_c11.device
    with torch.inference_mode():
        pixels = arrays_bhw3 if isinstance(arrays_bhw3, torch.Tensor) else \
            torch.from_numpy(np.ascontiguousarray(arrays_bhw3))
        pixels = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        return model(pixels).cpu().numpy()


def auto_batch_size(model: EmbeddingModel) -> int:
    """`batch_size = 0`: CPU_BATCH_SIZE on a CPU; on a GPU the largest power of two ≤ MAX_GPU_BATCH_SIZE whose
    activations fit in 40% of the free memory (an estimate; a batch that still runs out is halved)."""
    device = model.mean_c11.device
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    config = model.backbone.config
    size = model.image_size
    n_tokens = (size // config.patch_size) ** 2 + 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    bytes_per_value = torch.finfo(model.dtype).bits // 8
    per_image = (n_tokens * (8 * config.hidden_size + 2 * config.intermediate_size) * bytes_per_value
                 + size * size * 3 * (1 + 4 * 3))  # uint8 input, then float pixels, normalised, cast
    free_bytes, _ = torch.cuda.mem_get_info(device)
    batch = MAX_GPU_BATCH_SIZE
    while batch > CPU_BATCH_SIZE and batch * per_image > 0.4 * free_bytes:
        batch //= 2
    return batch


def loader_stage(on_gpu: bool) -> str:
    """How batches reach the model: pinned staging for an asynchronous copy to a GPU, else shared-memory views."""
    return "pinned" if on_gpu else "none"


def run(cfg: EmbedConfig, store: Store) -> dict:
    assert cfg.batch_size >= 0 and cfg.chunk_size >= 1, "embed.batch_size must be ≥ 0 and chunk_size ≥ 1"
    n_total = store.count("images")
    if n_total == 0:
        raise StageInputError("there are no ingested images to embed",
                              "run `atlasgen ingest` first (or `atlasgen build`) with the same --out")
    todo = store.images_without_embedding()
    n_done_before = n_total - len(todo)
    if n_done_before:
        say(f"embed: {n_done_before} of {n_total} images already embedded, resuming")
    model = load_embedding_model(cfg.model, cfg.device, cfg.precision, models_dir=store.paths.models_dir)
    on_gpu = model.mean_c11.device.type == "cuda"
    batch_size = cfg.batch_size or auto_batch_size(model)
    n_workers = resolve_n_workers(cfg.n_workers)
    n_embedded = 0
    skipped: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    tuner = ThreadTuner(cfg.n_threads, -(-len(todo) // batch_size))
    step = _ModelStep(model, batch_size)
    batches = CorpusBatches(store.paths.out_dir, todo, batch_size, model.spec.image_size, model.spec.resize_mode,
                            n_workers, stage=loader_stage(on_gpu))
    n_workers = batches.n_workers  # no more than there are units to decode
    with restore_torch_threads(), batches, StoreWriter(store) as writer, \
            bar(total=n_total, desc="embed", unit="img") as progress:
        progress.update(n_done_before)
        chunk_ids: list[np.ndarray] = []
        chunk_emb: list[np.ndarray] = []
        n_in_chunk = 0
        for batch in batches:
            skipped.extend(batch.skipped)
            if len(batch.image_ids):
                tuner.before_batch()
                t_batch = time.perf_counter()
                emb_bd = step(batch.arrays_bhw3)
                tuner.after_batch(time.perf_counter() - t_batch, len(batch.image_ids))
                assert np.isfinite(emb_bd).all(), "the model returned non-finite embeddings"
                chunk_ids.append(batch.image_ids)
                chunk_emb.append(emb_bd)
            n_in_chunk += batch.n_items
            progress.update(batch.n_items)
            if n_in_chunk >= cfg.chunk_size:
                n_embedded += _commit(writer, chunk_ids, chunk_emb)
                chunk_ids, chunk_emb, n_in_chunk = [], [], 0
        n_embedded += _commit(writer, chunk_ids, chunk_emb)
    if skipped:
        store.replace_skips(STAGE, skipped)
        say(f"embed: {len(skipped)} corpus image(s) could not be read (see skipped_inputs)")
    seconds = time.perf_counter() - t0
    return {"n_embedded": n_embedded, "n_resumed": n_done_before, "n_embeddings": store.count("embeddings"),
            "n_skipped": len(skipped), "dim": model.dim, "dtype": str(model.dtype).replace("torch.", ""),
            "images_per_s": round(n_embedded / seconds, 1) if seconds > 0 else None,
            "n_threads": tuner.last_chosen or tuner.candidates[0], "batch_size": batch_size,
            "n_workers": n_workers}


def _commit(writer: StoreWriter, chunk_ids: list[np.ndarray], chunk_emb: list[np.ndarray]) -> int:
    """Hand one chunk to the writer (one transaction); returns its number of embeddings."""
    if not chunk_ids:
        return 0
    ids = np.concatenate(chunk_ids)
    writer.submit(Store.add_embeddings, ids, np.concatenate(chunk_emb))
    return len(ids)


class _ModelStep:
    """`embed_batch` over a loader batch, in pieces of `piece` images; on a GPU that runs out of memory the
    piece is halved and the batch retried (the auto batch size is an estimate)."""

    def __init__(self, model: EmbeddingModel, piece: int):
        self.model = model
        self.piece = piece

    def __call__(self, arrays_bhw3) -> np.ndarray:
        while True:
            try:
                n = len(arrays_bhw3)
                if n <= self.piece:
                    return embed_batch(self.model, arrays_bhw3)
                return np.concatenate([embed_batch(self.model, arrays_bhw3[i:i + self.piece])
                                       for i in range(0, n, self.piece)])
            except torch.cuda.OutOfMemoryError:
                if self.piece <= 1:
                    raise
                self.piece //= 2
                torch.cuda.empty_cache()
                say(f"embed: the GPU ran out of memory; model batches of {self.piece} from now on")


SPEC = Stage("embed", EmbedConfig, run, inputs=("ingest",), tables=("embeddings",), skips=True)
