"""Torch thread choices shared by the compute stages (embed, render, train, toy)."""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch


def n_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class ThreadTuner:
    """Picks the torch thread count by timing real batches, and re-checks now and then.

    All cores is right on an idle machine, but when other processes share the cores, OpenMP's barriers
    wait on descheduled threads and one thread can be several times faster (measured: 4x for ViT-S
    on 2 busy cores). Candidates are tried from fewest threads up, so at most one timed batch runs with
    the possibly slow all-core setting; batch 0 is a warm-up with the first candidate. Every
    `retune_every` batches the candidates are timed again, since the load on a shared machine changes."""

    def __init__(self, n_threads: int, n_batches: int, retune_every: int = 200):
        cores = n_cores()
        if n_threads > 0 or "OMP_NUM_THREADS" in os.environ:
            self.candidates = [n_threads if n_threads > 0 else torch.get_num_threads()]
        else:
            self.candidates = sorted({1, max(1, cores // 2), cores})
        if n_batches < len(self.candidates) + 2:  # too little work to be worth measuring
            self.candidates = self.candidates[-1:]
        self.retune_every = retune_every
        self.timings: dict[int, float] = {}
        self.chosen: int | None = self.candidates[0] if len(self.candidates) == 1 else None
        self._trial = -1  # -1: warm-up batch
        self._since_choice = 0
        self._n_items_by_threads: dict[int, int] = {}  # images (or target-steps) run at each thread count

    @property
    def mostly_used(self) -> int:
        """The thread count that ran the most work (what a summary reports: the last choice can come from a
        retune on the few items of a run's tail)."""
        if not self._n_items_by_threads:
            return self.chosen or self.candidates[0]
        return max(self._n_items_by_threads, key=self._n_items_by_threads.get)

    def before_batch(self) -> None:
        if self.chosen is not None and len(self.candidates) > 1 and self._since_choice >= self.retune_every:
            self.chosen, self.timings, self._trial = None, {}, 0
        if self.chosen is not None:
            torch.set_num_threads(self.chosen)
        else:
            torch.set_num_threads(self.candidates[max(0, self._trial)])

    def after_batch(self, seconds: float, n_images: int) -> None:
        n_threads = torch.get_num_threads()
        self._n_items_by_threads[n_threads] = self._n_items_by_threads.get(n_threads, 0) + n_images
        if self.chosen is not None:
            self._since_choice += 1
            return
        if self._trial >= 0:
            self.timings[self.candidates[self._trial]] = seconds / max(1, n_images)
        self._trial += 1
        if self._trial == len(self.candidates):
            self.chosen = min(self.timings, key=self.timings.get)
            self._since_choice = 0


@contextmanager
def restore_torch_threads():
    """Put torch's thread count back as it was after the block (stages tune it for themselves)."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)
