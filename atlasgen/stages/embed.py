"""Embed: every ingested image → the model's CLS `pooler_output` in `embeddings`.

Here (the local executor) the work is three separable pieces: the loader (`loader.CorpusBatches`: worker
processes decode and resize corpus JPEGs into shared memory, batches ahead of the model, on a GPU as many as they
decode while the model loads; on CUDA a thread stages them in pinned memory for asynchronous copies), the pure
model step `embed_batch`, and the writer (`workers.StoreWriter`: a thread with its own store connection commits
each chunk of `chunk_size` images in one transaction while the model goes on). The model runs in bf16 where the
hardware is fast at it (`precision = "auto"`). An interrupted run resumes with the images that have no embedding
yet.

On Ray (`[run] executor = "ray"`) a chunk is an executor's unit (`embed_unit`, pure): the workers get the model's
weights through Ray's object store and the JPEGs as bytes (or read them from the output folder when `[run]
shared_corpus`), decode in threads and call the same `embed_batch`; only this process writes the store.
"""
from __future__ import annotations

import io
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import EmbedConfig
from ..errors import StageInputError
from ..executor import PackedModel, resolve_precision
from ..loader import CorpusBatches, kernels_mode, load_corpus_array, ring_slots
from ..model import (EmbeddingModel, PreprocessSpec, load_embedding_model, peek_model_skeleton, peek_preprocess_spec,
                     resolve_device, resolve_dtype)
from ..progress import bar, say
from ..store import Store
from ..threads import ThreadTuner, restore_torch_threads
from ..workers import StoreWriter, resolve_n_workers
from .base import Stage

STAGE = "embed"
CPU_BATCH_SIZE = 32        # batch_size = 0 on a CPU: what the CPU path always used
# batch_size = 0 on a GPU: images per loader batch. ViT-S/16 in bf16 on an H100 runs ~11,700 images/s at 1,024;
# 512 halves the wait for the first batch and the ring's and pinned buffers' memory.
MAX_GPU_BATCH_SIZE = 512
REMOTE_DECODE_THREADS = 2  # n_workers = 0 on a Ray worker: its decode threads (the earlier default)


def embed_batch(model: EmbeddingModel, arrays_bhw3) -> np.ndarray:
    """uint8 (B, H, W, 3) → float32 (B, D) embeddings. `arrays_bhw3` is a numpy array or a uint8 torch tensor
    (pinned, for an asynchronous copy to the GPU, or already on the model's device); the uint8 → [0, 1] float
    conversion runs on the model's device, with the same float ops as on the CPU."""
    return embed_launch(model, arrays_bhw3).cpu().numpy()


def embed_launch(model: EmbeddingModel, arrays_bhw3) -> torch.Tensor:
    """`embed_batch` without reading the result back: float32 (B, D) on the model's device, where a GPU may still
    be computing it (the caller reads it when it needs it)."""
    device = model.mean_c11.device
    with torch.inference_mode():
        pixels = _as_tensor(arrays_bhw3).to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        return model(pixels)


def _as_tensor(arrays_bhw3) -> torch.Tensor:
    """A loader batch (a numpy array, or a torch tensor already) as a torch tensor, sharing its memory."""
    return arrays_bhw3 if isinstance(arrays_bhw3, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(arrays_bhw3))


def auto_batch_size(model: EmbeddingModel, free_bytes: int | None = None) -> int:
    """`batch_size = 0`: CPU_BATCH_SIZE on a CPU; on a GPU the largest power of two ≤ MAX_GPU_BATCH_SIZE whose
    activations fit in 40% of the free memory (an estimate; a batch that still runs out is halved). `free_bytes`:
    the free memory of the GPU the units run on (a remote worker's); None = the model's own device."""
    device = model.mean_c11.device
    if free_bytes is None and device.type != "cuda":
        return CPU_BATCH_SIZE
    config = model.backbone.config
    size = model.image_size
    n_tokens = (size // config.patch_size) ** 2 + 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    bytes_per_value = torch.finfo(model.dtype).bits // 8
    per_image = (n_tokens * (8 * config.hidden_size + 2 * config.intermediate_size) * bytes_per_value
                 + size * size * 3 * (1 + 4 * 3))  # uint8 input, then float pixels, normalised, cast
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    batch = MAX_GPU_BATCH_SIZE
    while batch > CPU_BATCH_SIZE and batch * per_image > 0.4 * free_bytes:
        batch //= 2
    return batch


class DeviceWarmUp:
    """On a GPU, a thread that pays the once-per-process costs of a model's first batch while the caller loads the
    model from disk: once the caller hands it a skeleton of the model (`give`: built in the caller's thread, which
    imports the model classes anyway, so no two threads import at once), the model step at the real shapes on it
    (`first_batch_of`), so the first batch meets warm kernels. While it waits for the skeleton (a fresh process
    imports the model classes first: seconds), the kinds of kernel a ViT uses on tiny tensors
    (`first_batch_kernels`), and the same without a skeleton; not when the skeleton comes within
    SKELETON_WAIT_S: kernels for other shapes are mostly other kernels, and running them first would only delay
    the skeleton's. Its failures are ignored: the model's first batch then meets the same problem and reports
    it."""

    SKELETON_WAIT_S = 0.1  # the stage builds the skeleton in ~11 ms once the model classes are imported

    def __init__(self, device: torch.device, precision: str, batch_size: int):
        self._handoff: queue.Queue = queue.Queue(maxsize=1)
        self._given = False
        self.steps_done: list[str] = []  # "kernels", "skeleton": what ran (for tests and diagnostics)
        self._thread = threading.Thread(target=self._run, args=(device, precision, batch_size),
                                        name="atlasgen-embed-warm-up", daemon=True)
        self._thread.start()

    def give(self, skeleton: torch.nn.Module | None, spec: PreprocessSpec | None) -> None:
        """The model's skeleton (`model.peek_model_skeleton`, on the meta device) and input spec; None: none."""
        if not self._given:
            self._given = True
            self._handoff.put((skeleton, spec))

    def join(self) -> None:
        self.give(None, None)
        self._thread.join()

    def _run(self, device: torch.device, precision: str, batch_size: int) -> None:
        on_gpu = device.type == "cuda"  # (a CPU runs it too, in tests)

        def tiny_kernels() -> None:
            first_batch_kernels(device, dtype)
            if on_gpu:
                torch.cuda.synchronize(device)
            self.steps_done.append("kernels")

        try:
            dtype = resolve_dtype(precision, device)
            try:
                skeleton, spec = self._handoff.get(timeout=self.SKELETON_WAIT_S)
            except queue.Empty:
                tiny_kernels()
                skeleton, spec = self._handoff.get()
            if skeleton is not None and spec is not None:
                first_batch_of(EmbeddingModel(skeleton.to_empty(device=device), spec, dtype).to(device), batch_size)
                if on_gpu:
                    torch.cuda.synchronize(device)
                self.steps_done.append("skeleton")
            elif not self.steps_done:
                tiny_kernels()
        except Exception:  # see the docstring
            pass
        finally:
            if on_gpu:
                torch.cuda.empty_cache()  # the free memory that auto_batch_size reads stays as it was


def warm_up_device(device: torch.device, precision: str, batch_size: int = MAX_GPU_BATCH_SIZE) -> DeviceWarmUp | None:
    """A `DeviceWarmUp` on a GPU; None elsewhere (nothing to warm)."""
    return DeviceWarmUp(device, precision, batch_size) if device.type == "cuda" else None


def first_batch_of(model: EmbeddingModel, batch_size: int) -> np.ndarray:
    """The model step once, on zeros already on the model's device, at the size the stage's model step will run:
    `batch_size` images, on a GPU at most what `auto_batch_size` gives."""
    device = model.mean_c11.device
    n = min(batch_size, auto_batch_size(model)) if device.type == "cuda" else batch_size
    size = model.image_size
    return embed_batch(model, torch.zeros(n, size, size, 3, dtype=torch.uint8, device=device))


def first_batch_kernels(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The kinds of kernel a ViT's forward uses without gradients (attention, layer norm, GEMM; the patch
    embedding is a GEMM too, `model.PatchConv2d`), on tiny tensors: the warm-up when the model's shape is not
    known before it loads."""
    tokens = torch.zeros(2, 2, 2, 8, device=device, dtype=dtype)  # (B, heads, tokens, head dim)
    attended = torch.nn.functional.scaled_dot_product_attention(tokens, tokens, tokens)
    return torch.nn.functional.layer_norm(attended, (8,)) @ torch.zeros(8, 8, device=device, dtype=dtype)


def loader_stage(on_gpu: bool) -> str:
    """How batches reach the model: pinned staging for an asynchronous copy to a GPU, else shared-memory views."""
    return "pinned" if on_gpu else "none"


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
    n_decode_threads: int                 # decode threads on a Ray worker
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
    assert cfg.batch_size >= 0 and cfg.chunk_size >= 1, "embed.batch_size must be ≥ 0 and chunk_size ≥ 1"
    n_total = store.count("images")
    if n_total == 0:
        raise StageInputError("there are no ingested images to embed",
                              "run `atlasgen ingest` first (or `atlasgen build`) with the same --out")
    todo = store.images_without_embedding()
    n_done_before = n_total - len(todo)
    if n_done_before:
        say(f"embed: {n_done_before} of {n_total} images already embedded, resuming")
    # Nothing to do needs no cluster (the model is loaded here for the summary only).
    if executor is not None and executor.remote and todo:
        return _run_remote(cfg, store, executor, todo, n_total, n_done_before)
    return _run_local(cfg, store, todo, n_total, n_done_before)


def _run_local(cfg: EmbedConfig, store: Store, todo: list[tuple[int, str]], n_total: int, n_done_before: int) -> dict:
    """Loader processes → the model here → the writer thread. The loader starts first when the model's input size
    can be read from its files (`peek_preprocess_spec`): the workers fork from a process that holds no model yet,
    and decode the first batches while the model loads."""
    device = resolve_device(cfg.device)
    on_gpu = device.type == "cuda"
    batch_size = cfg.batch_size or (MAX_GPU_BATCH_SIZE if on_gpu else CPU_BATCH_SIZE)
    n_workers = resolve_n_workers(cfg.n_workers)
    t0 = time.perf_counter()

    # Seconds from the start: the loader's workers forked, the model read (onto the device), the model ready
    # (the device warmed up too), ... so a run shows where its fixed cost goes.
    timeline_s: dict[str, float] = {}

    def loader(spec: PreprocessSpec) -> CorpusBatches:
        # On a GPU the ring is deep enough for the workers to decode through the model's load (ring_slots).
        n_slots = ring_slots(n_workers, batch_size, spec.image_size, head_start=on_gpu)
        # On a GPU's long runs, which decoding bounds, the workers get the resize kernels mid-run.
        kernels = kernels_mode(len(todo), batch_size, n_slots, head_start=on_gpu)
        batches = CorpusBatches(store.paths.out_dir, todo, batch_size, spec.image_size, spec.resize_mode,
                                n_workers, stage=loader_stage(on_gpu), n_slots=n_slots, kernels=kernels).start()
        timeline_s.pop("loader_started", None)  # a restart at the model's size counts; keys in event order
        timeline_s["loader_started"] = time.perf_counter() - t0
        return batches

    spec = peek_preprocess_spec(cfg.model, store.paths.models_dir) if todo else None
    batches = loader(spec) if spec is not None else None
    # After the fork: the workers never see the warm-up thread.
    warming = warm_up_device(device, cfg.precision, batch_size) if todo else None
    try:
        if warming is not None:  # built here, where the model classes are imported for the load anyway
            warming.give(peek_model_skeleton(cfg.model, store.paths.models_dir), spec)
        model = load_embedding_model(cfg.model, device, cfg.precision, models_dir=store.paths.models_dir)
        timeline_s["model_read"] = time.perf_counter() - t0
    except BaseException:
        if batches is not None:
            batches.close(clean=False)
        raise
    finally:
        if warming is not None:
            warming.join()
    if batches is None or (spec.image_size, spec.resize_mode) != (model.spec.image_size, model.spec.resize_mode):
        if batches is not None:  # the files said otherwise than the loaded model: decode again at its size
            batches.close(clean=False)
        batches = loader(model.spec)
    timeline_s["model_loaded"] = time.perf_counter() - t0
    n_workers = batches.n_workers  # no more than there are units to decode
    # On a GPU the model runs the loader's batches in pieces that fit its free memory (an estimate; a piece
    # that still runs out of memory is halved).
    step = _ModelStep(model, min(batch_size, auto_batch_size(model)) if on_gpu and not cfg.batch_size else batch_size)
    pipeline = _Pipeline(step, results_lag(device))
    tuner = ThreadTuner(cfg.n_threads, -(-len(todo) // batch_size))
    n_embedded = 0
    skipped: list[tuple[str, str]] = []
    chunk_ids: list[np.ndarray] = []
    chunk_emb: list[np.ndarray] = []

    def take(done: list[tuple[np.ndarray, np.ndarray]]) -> None:
        for image_ids, emb_bd in done:
            timeline_s.setdefault("first_batch_done", time.perf_counter() - t0)
            assert np.isfinite(emb_bd).all(), "the model returned non-finite embeddings"
            chunk_ids.append(image_ids)
            chunk_emb.append(emb_bd)

    with restore_torch_threads(), batches, StoreWriter(store) as writer, \
            bar(total=n_total, desc="embed", unit="img") as progress:
        progress.update(n_done_before)
        n_in_chunk = 0
        for batch in batches:
            timeline_s.setdefault("first_batch_ready", time.perf_counter() - t0)
            skipped.extend(batch.skipped)
            if len(batch.image_ids):
                tuner.before_batch()
                t_batch = time.perf_counter()
                take(pipeline.push(batch.image_ids, batch.arrays_bhw3))
                tuner.after_batch(time.perf_counter() - t_batch, len(batch.image_ids))
            n_in_chunk += batch.n_items
            progress.update(batch.n_items)
            if n_in_chunk >= cfg.chunk_size:  # (with a lag, the batches still on the device go in the next chunk)
                n_embedded += _commit(writer, chunk_ids, chunk_emb)
                chunk_ids, chunk_emb, n_in_chunk = [], [], 0
        take(pipeline.flush())
        n_embedded += _commit(writer, chunk_ids, chunk_emb)
        timeline_s["last_batch_done"] = time.perf_counter() - t0
    if skipped:
        store.replace_skips(STAGE, skipped)
        say(f"embed: {len(skipped)} corpus image(s) could not be read (see skipped_inputs)")
    seconds = time.perf_counter() - t0
    return {"n_embedded": n_embedded, "n_resumed": n_done_before, "n_embeddings": store.count("embeddings"),
            "n_skipped": len(skipped), "dim": model.dim, "dtype": str(model.dtype).replace("torch.", ""),
            "images_per_s": round(n_embedded / seconds, 1) if seconds > 0 else None,
            "n_threads": tuner.mostly_used, "batch_size": batch_size,
            "n_workers": n_workers, "ring_slots": batches.n_slots, "resized_with": batches.resized_with,
            "timeline_s": {k: round(v, 3) for k, v in {**timeline_s, "done": seconds}.items()}}


def _run_remote(cfg: EmbedConfig, store: Store, executor, todo: list[tuple[int, str]], n_total: int,
                n_done_before: int) -> dict:
    """Chunks as units on the executor's workers; each result committed here as it arrives."""
    # Every worker uses the precision resolved for the hardware the units run on (asked of a worker).
    hardware = executor.unit_hardware(cfg.device)
    precision = resolve_precision(cfg.precision, hardware.bf16_fast)
    model = load_embedding_model(cfg.model, "cpu", precision, models_dir=store.paths.models_dir)
    batch_size = cfg.batch_size or auto_batch_size(model, hardware.free_bytes if hardware.device_type == "cuda"
                                                   else None)
    payload = EmbedWorker(PackedModel.pack(model), cfg.device, batch_size, cfg.n_workers or REMOTE_DECODE_THREADS)
    out_dir = store.paths.out_dir
    units = [EmbedUnit([item[0] for item in chunk], [item[1] for item in chunk], str(out_dir.resolve()))
             for chunk in _split(todo, cfg.chunk_size)]
    n_embedded = 0
    skipped: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    shown: dict[int, int] = {}  # images of a unit already on the progress bar

    def on_step(unit: EmbedUnit, k: int) -> None:
        n = min(batch_size, len(unit.image_ids) - k * batch_size)
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
    summary.update(executor=executor.name, n_workers=executor.n_workers, batch_size=batch_size)
    return summary


def _commit(writer: StoreWriter, chunk_ids: list[np.ndarray], chunk_emb: list[np.ndarray]) -> int:
    """Hand one chunk to the writer (one transaction); returns its number of embeddings."""
    if not chunk_ids:
        return 0
    ids = np.concatenate(chunk_ids)
    writer.submit(Store.add_embeddings, ids, np.concatenate(chunk_emb))
    return len(ids)


class _ModelStep:
    """`embed_batch` over a loader batch, in pieces of `piece` images; on a GPU that runs out of memory the
    piece is halved and the batch retried (the auto batch size is an estimate). `launch`: the same with
    `embed_launch`, the result left on the device."""

    def __init__(self, model: EmbeddingModel, piece: int):
        self.model = model
        self.piece = piece

    def __call__(self, arrays_bhw3) -> np.ndarray:
        return self._in_pieces(arrays_bhw3, lambda a: embed_batch(self.model, a), np.concatenate)

    def launch(self, arrays_bhw3) -> torch.Tensor:
        return self._in_pieces(arrays_bhw3, lambda a: embed_launch(self.model, a), torch.cat)

    def _in_pieces(self, arrays_bhw3, embed: Callable, concatenate: Callable):
        while True:
            try:
                n = len(arrays_bhw3)
                if n <= self.piece:
                    return embed(arrays_bhw3)
                return concatenate([embed(arrays_bhw3[i:i + self.piece]) for i in range(0, n, self.piece)])
            except torch.cuda.OutOfMemoryError:
                if self.piece <= 1:
                    raise
                self.piece //= 2
                torch.cuda.empty_cache()
                say(f"embed: the GPU ran out of memory; model batches of {self.piece} from now on")


def results_lag(device: torch.device) -> int:
    """Batches whose embeddings the stage reads back only after launching the next one: 1 on a GPU (it computes
    batch b + 1 while this thread reads b's results and fetches b + 2), 0 on a CPU (it computes in this thread)."""
    return 1 if device.type == "cuda" else 0


class _Pipeline:
    """The model step over the loader's batches, `lag` batches deep: `push` launches a batch and returns the
    (image_ids, float32 (B, D) embeddings) of the batches that are now done, in order; `flush` the rest.

    With `lag` ≥ 1 on a GPU the GPU never waits for this thread between batches: the next batch is launched
    before the last one's results are read, and its copy to the GPU runs on a stream of its own while the GPU
    computes the last one, its results copied back into page-locked memory. When `push` returns, the batch's input
    has been copied: the loader may reuse its staging buffer once the next batch is asked for. `lag` 0: each
    batch's results at once (`step(arrays)`)."""

    def __init__(self, step: _ModelStep, lag: int):
        assert lag >= 0
        self.step = step
        self.lag = lag
        self._device = step.model.mean_c11.device
        self._copy_stream = torch.cuda.Stream(self._device) if lag and self._device.type == "cuda" else None
        self._pending: deque[tuple[np.ndarray, torch.Tensor, object]] = deque()  # (ids, embeddings, done event)

    def push(self, image_ids: np.ndarray, arrays_bhw3) -> list[tuple[np.ndarray, np.ndarray]]:
        if not self.lag:
            return [(image_ids, self.step(arrays_bhw3))]
        self._pending.append((image_ids, *self._launch(arrays_bhw3)))
        return self._done_while(lambda: len(self._pending) > self.lag)

    def flush(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return self._done_while(lambda: bool(self._pending))

    def _done_while(self, more: Callable[[], bool]) -> list[tuple[np.ndarray, np.ndarray]]:
        done = []
        while more():
            image_ids, emb_bd, ready = self._pending.popleft()
            if ready is not None:
                ready.synchronize()
            done.append((image_ids, emb_bd.numpy()))
        return done

    def _launch(self, arrays_bhw3) -> tuple[torch.Tensor, object]:
        """The batch's embeddings (on the host, maybe not computed yet) and the event that says they are; on a
        CPU they are computed at once (no event)."""
        if self._copy_stream is None:
            return self.step.launch(arrays_bhw3).cpu(), None
        with torch.inference_mode():
            compute = torch.cuda.current_stream(self._device)
            with torch.cuda.stream(self._copy_stream):
                pixels = _as_tensor(arrays_bhw3).to(self._device, non_blocking=True)
                copied = self._copy_stream.record_event()
            compute.wait_stream(self._copy_stream)
            pixels.record_stream(compute)  # allocated on the copy stream, used on the compute stream
            emb_bd = self.step.launch(pixels)
            emb_host_bd = torch.empty(emb_bd.shape, dtype=emb_bd.dtype, pin_memory=True)
            emb_host_bd.copy_(emb_bd, non_blocking=True)
            ready = compute.record_event()
        copied.synchronize()  # a few ms while the GPU computes the previous batch
        return emb_host_bd, ready


def _split(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


SPEC = Stage("embed", EmbedConfig, run, inputs=("ingest",), tables=("embeddings",), skips=True, executor=True)
