"""Model-ready batches of corpus images for embed: decoded and resized in worker processes, straight into
shared memory.

`CorpusBatches(...)` yields `Batch(image_ids, arrays_bhw3, skipped)` in the order of its items. Each batch is
split into units, one per worker, and every worker writes its images (uint8, the model's size) into a ring of
shared-memory slots, one batch per slot; results on the queues are only a few bytes per unit. A slot is refilled
only after the consumer has asked for the next batch, so a yielded batch stays valid until then.

`stage` says what the consumer receives:
- "none": numpy views of the shared slots (CPU: the model reads them in place).
- "pinned": torch tensors in page-locked memory, filled by a background thread while the model runs, so the
  copy to the GPU can be asynchronous (`tensor.to("cuda", non_blocking=True)`).
- "copy": the same background thread into ordinary memory (tests the staging path without a GPU).

`kernels` says how the workers resize: with the numba kernels of `atlasgen.resample` where the process that forks
them has them ("ready": the same bytes as Pillow's, a worker's step per image ~1.27× faster), also loading them
in a standby supervisor and handing the batches after that to its workers ("standby"; for a GPU's long runs,
which the workers' decoding bounds), or with Pillow alone ("off").
"""
from __future__ import annotations

import mmap
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np
from PIL import Image

from . import resample
from .model import pil_to_array, resize_plan
from .workers import WorkerPool

STAGES = ("none", "pinned", "copy")
KERNELS = ("ready", "standby", "off")
DEFAULT_SLOTS = 3  # a batch being consumed, the others being filled: enough when the model is what bounds the run
# A head start for a model that outruns its workers (a GPU's): while the model loads and warms up (~0.8 s on an
# H200 machine), each worker can decode ~384 corpus copies (2.26 ms each there); a shallow ring stops them after
# a few batches and the run then waits for decoding. The ring holds that many, within RING_MAX_BYTES.
HEAD_START_PER_WORKER = 384
RING_MAX_BYTES = 1 << 30
# A corpus of more than this many rings, on a GPU, has its workers load the resize kernels (`kernels_mode`).
STANDBY_AFTER_RINGS = 2


def load_corpus_array(path: Path | BinaryIO, size: int, resize_mode: str) -> np.ndarray:
    """One corpus JPEG (a path, or its bytes as a file object) → uint8 (size, size, 3), exactly as the model
    sees it."""
    with Image.open(path) as image:
        # DCT-domain downscaling when the JPEG is much bigger than the model input (a no-op for our
        # 256 px corpus at 224).
        image.draft("RGB", (size, size))
        return pil_to_array(image, size, resize_mode)


def load_corpus_into(path: Path | BinaryIO, size: int, resize_mode: str, out_hw3: np.ndarray, kernels: bool) -> None:
    """`load_corpus_array` written into `out_hw3` (uint8 (size, size, 3)), with `kernels` by `resample.bilinear_into`
    where it applies (after `resample.prepare()` succeeded in this process or the one that forked it): the same
    bytes, without Pillow's resize and the copies out of it."""
    if not kernels:
        out_hw3[...] = load_corpus_array(path, size, resize_mode)
        return
    with Image.open(path) as image:
        image.draft("RGB", (size, size))
        image.load()
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        resized_wh, box = resize_plan(*rgb.size, size, resize_mode)
        if resample.applies(*rgb.size, *resized_wh):
            resample.bilinear_into(rgb, resized_wh, box, out_hw3)
        else:  # a picture over 6× the model's size (not our corpus copies): Pillow reduces it first
            out_hw3[...] = pil_to_array(rgb, size, resize_mode)


def ring_slots(n_workers: int, batch_size: int, size: int, head_start: bool,
               memory_bytes: int | None = None) -> int:
    """Slots (batches) in the loader's shared ring. `head_start`: the model outruns the workers (a GPU), so the
    ring holds what the workers decode while the model loads (HEAD_START_PER_WORKER each) plus the batch being
    consumed, within RING_MAX_BYTES and 1/16 of the machine's memory (`memory_bytes`; None = this machine's);
    else DEFAULT_SLOTS. Never fewer than DEFAULT_SLOTS; a corpus smaller than the ring maps only what it needs."""
    if not head_start:
        return DEFAULT_SLOTS
    if memory_bytes is None:
        memory_bytes = _physical_memory_bytes()
    wanted = 1 + -(-n_workers * HEAD_START_PER_WORKER // batch_size)
    fitting = min(RING_MAX_BYTES, memory_bytes // 16) // (batch_size * size * size * 3)
    return max(DEFAULT_SLOTS, min(wanted, fitting))


def kernels_mode(n_items: int, batch_size: int, n_slots: int, head_start: bool) -> str:
    """`CorpusBatches(kernels=...)` for a run: "standby" where the workers bound it, a model that outruns them
    (`head_start`: a GPU) over more than STANDBY_AFTER_RINGS rings of batches (the first ring is decoded while
    the model loads, and the model drains it while the workers decode about as much again); else "ready" (what
    the workers inherit is free; loading the kernels costs a core-second and a fork)."""
    if head_start and n_items > STANDBY_AFTER_RINGS * n_slots * batch_size:
        return "standby"
    return "ready"


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not on POSIX: assume a small machine
        return 8 << 30


@dataclass
class Batch:
    image_ids: np.ndarray                 # int64 (B,) of the images that decoded
    arrays_bhw3: object                   # uint8 (B, size, size, 3): numpy array, or torch tensor when staged
    n_items: int                          # items this batch covered (decoded + skipped)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason) for skipped_inputs


class CorpusBatches:
    """Batches of `items` ((image_id, corpus path relative to `root`), in order) as the model sees them.

        with CorpusBatches(out_dir, todo, 32, 224, "resize", n_workers=2) as batches:
            for batch in batches:
                ...
    """

    def __init__(self, root: Path, items: Sequence[tuple[int, str]], batch_size: int, size: int, resize_mode: str,
                 n_workers: int, stage: str = "none", n_slots: int = DEFAULT_SLOTS, processes: bool | None = None,
                 kernels: str = "ready"):
        assert stage in STAGES and kernels in KERNELS, (stage, kernels)
        assert batch_size >= 1 and n_workers >= 1 and n_slots >= 2
        self.root = Path(root)
        self.items = list(items)
        self.batch_size = batch_size
        self.size = size
        self.resize_mode = resize_mode
        self.stage = stage
        self.n_slots = n_slots    # batches decoded ahead: one being consumed, the others being filled (ring_slots)
        self.processes = processes
        self.kernels = kernels
        # How the workers resized: "kernels" from the first batch, "kernels from batch k" (a standby adopted),
        # else "Pillow" (with why the kernels were not used, where they were asked for).
        self.resized_with = "Pillow"
        # One unit per worker per batch.
        self.unit_size = max(1, -(-batch_size // n_workers))
        self.batches = [self.items[i:i + batch_size] for i in range(0, len(self.items), batch_size)]
        # No more workers than units to decode (a small corpus on a many-core machine forks fewer).
        self.n_workers = max(1, min(n_workers, sum(-(-len(b) // self.unit_size) for b in self.batches)))
        self._started = False
        self._stager: _Stager | None = None

    def start(self) -> "CorpusBatches":
        """Allocate the ring, fork the workers and hand them the first `n_slots` batches, so decoding runs while
        the caller does something else (embed loads the model). Entering the block starts it too."""
        if self._started:
            return self
        # The ring is never bigger than the work: a small corpus maps a small ring.
        self.n_slots = n_slots = min(self.n_slots, max(1, len(self.batches)))
        capacity = min(self.batch_size, max(1, len(self.items)))
        shape = (n_slots, capacity, self.size, self.size, 3)
        n_bytes = int(np.prod(shape))
        # Nothing to decode forks nothing.
        processes = self.processes if self.batches else False
        self._pool = WorkerPool(self._decode_unit, self.n_workers, "embed", processes=processes)
        if self._pool.processes:
            # Anonymous shared memory (MAP_SHARED): forked workers write into the same pages; not limited by the
            # size of /dev/shm as POSIX shared memory would be.
            self._mmap = mmap.mmap(-1, n_bytes)
            self._slots = np.frombuffer(self._mmap, np.uint8, n_bytes).reshape(shape)
        else:
            self._mmap = None
            self._slots = np.empty(shape, np.uint8)
        self._pool.__enter__()  # forks: after the slots exist
        self._started = True
        self._n_submitted = 0
        self._standing_by = False
        if self.kernels != "off" and resample.ready():  # the workers inherited them
            self.resized_with = "kernels"
        elif self.kernels == "standby" and self._pool.processes:
            self._standing_by = self._pool.standby(resample.prepare)
        while self._n_submitted < min(len(self.batches), self.n_slots):
            self._submit(self._n_submitted)
            self._n_submitted += 1
        # The staging thread starts now too: allocating the page-locked buffers (which also brings up the CUDA
        # context) and copying the first batch overlap what the caller does next (embed loads the model).
        self._stager = _Stager(self._slot_batches(), self._slots.shape[1:], self.stage == "pinned") \
            if self.stage != "none" else None
        return self

    def close(self, clean: bool = True) -> None:
        """Stop the workers (at once unless `clean` and every batch was taken)."""
        if not self._started:
            return
        self._started = False
        if self._stager is not None:
            self._stager.stop()
        self._pool.close(clean=clean)
        # The mapping is freed with the last view of it (a consumer may still hold the last batch).
        self._slots = self._mmap = None

    def __enter__(self) -> "CorpusBatches":
        return self if self._started else self.start()

    def __exit__(self, exc_type, *_) -> None:
        self.close(clean=exc_type is None)

    # --- in the workers --------------------------------------------------------------------------------
    def _decode_unit(self, task: tuple[int, int, list[tuple[int, str]]]) -> list[tuple[int, str]]:
        """Decode one unit into its slot; returns (index in unit, reason) for each image that failed."""
        slot, offset, items = task
        failed = []
        kernels = self.kernels != "off" and resample.ready()  # (in this worker: what its forking process had)
        for i, (_, rel_path) in enumerate(items):
            try:
                load_corpus_into(self.root / rel_path, self.size, self.resize_mode, self._slots[slot, offset + i],
                                 kernels)
            except Exception as e:  # corpus files are ours, but a user may have deleted or damaged one
                text = str(e).splitlines()[0] if str(e) else type(e).__name__
                failed.append((i, f"cannot read the corpus copy {rel_path}: {text}"))
        return failed

    # --- in this process -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        assert self._started, "iterate inside the with-block (or after start())"
        return self._slot_batches() if self._stager is None else self._stager.batches()

    def _submit(self, b: int) -> None:
        if b:  # (batch 0 never waits: the standby has only just been forked)
            self._check_standby(b)
        slot = b % len(self._slots)
        batch = self.batches[b]
        for offset in range(0, len(batch), self.unit_size):
            self._pool.submit((b, offset), (slot, offset, batch[offset:offset + self.unit_size]))

    def _check_standby(self, b: int) -> None:
        """While a standby is pending: hand it batch `b` and those after if it is ready (never waits), or record
        why it will not be (it failed, or the batches ran out first)."""
        if not self._standing_by:
            return
        if self._pool.adopt_standby():
            self.resized_with, self._standing_by = f"kernels from batch {b}", False
        elif self._pool.standby_why_not is not None:
            self.resized_with, self._standing_by = f"Pillow ({self._pool.standby_why_not})", False

    def _slot_batches(self) -> Iterator[Batch]:
        """Batches as views of the shared slots; batch b's slot is refilled (with batch b + n_slots) only
        when the consumer asks for batch b + 1."""
        n_slots = len(self._slots)
        for b, batch in enumerate(self.batches):
            while self._n_submitted < len(self.batches) and self._n_submitted < b + n_slots:
                self._submit(self._n_submitted)
                self._n_submitted += 1
            failed: dict[int, str] = {}
            for offset in range(0, len(batch), self.unit_size):
                for i, reason in self._pool.result((b, offset)):
                    failed[offset + i] = reason
            if b == len(self.batches) - 1:
                self._pool.finish()  # the workers' exit overlaps the consumer's last batches (WorkerPool.finish)
                self._check_standby(b + 1)  # a standby still pending was given up: says why
            arrays = self._slots[b % n_slots, :len(batch)]
            ids = np.fromiter((image_id for image_id, _ in batch), np.int64, len(batch))
            skipped = []
            if failed:
                good = [i for i in range(len(batch)) if i not in failed]
                skipped = [(f"image {batch[i][0]} ({batch[i][1]})", failed[i]) for i in sorted(failed)]
                arrays, ids = arrays[good], ids[good]
            yield Batch(ids, arrays, len(batch), skipped)



class _Stager:
    """Copies each batch out of its shared slot into one of three staging tensors in a background thread, one
    batch ahead of the consumer. Three suffice: the consumer's, the one waiting in the queue, the one being
    filled (the queue holds one, so filling batch b + 2 starts only after the consumer took b + 1)."""

    def __init__(self, raw: Iterator[Batch], batch_shape: tuple[int, ...], pinned: bool):
        self._raw = raw
        self._handoff: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._done = object()
        self._thread = threading.Thread(target=self._fill, args=(batch_shape, pinned), name="atlasgen-embed-stage",
                                        daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._handoff.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, batch_shape: tuple[int, ...], pinned: bool) -> None:
        try:
            import torch
            buffers = [torch.empty(batch_shape, dtype=torch.uint8, pin_memory=pinned) for _ in range(3)]
            for k, batch in enumerate(self._raw):
                n = len(batch.image_ids)
                staged = buffers[k % 3][:n]
                if n:
                    staged.copy_(torch.from_numpy(np.ascontiguousarray(batch.arrays_bhw3)))
                if not self._put(Batch(batch.image_ids, staged, batch.n_items, batch.skipped)):
                    return
            self._put(self._done)
        except BaseException as e:  # raised again in the consumer
            self._put(e)

    def batches(self) -> Iterator[Batch]:
        """The staged batches, in order (one pass)."""
        try:
            while True:
                item = self._handoff.get()
                if item is self._done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop the thread (idempotent); the raw batches' generator is closed once the thread is out of it."""
        self._stop.set()
        self._thread.join()
        self._raw.close()
