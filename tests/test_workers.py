"""Worker processes and the store writer thread: results by key and in order, a task's error and a dead worker
raised in the parent, workers swapped for new ones mid-run, workers gone with the pool, writes handed over
committed even when the caller fails."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from atlasgen.errors import AtlasError
from atlasgen.store import Store
from atlasgen.workers import StoreWriter, WorkerError, WorkerPool, ordered_map


def _square_or_fail(x: int) -> tuple[int, int]:
    if x == 13:
        raise ValueError("thirteen")
    return x * x, os.getpid()


@pytest.mark.parametrize("processes", [True, False])
def test_pool_results_in_order_and_errors(processes):
    with WorkerPool(_square_or_fail, 2, "test", processes=processes) as pool:
        got = list(ordered_map(pool, ((i, i) for i in range(20) if i != 13), window=3))
        assert [m for m, _ in got] == [i for i in range(20) if i != 13]
        assert [r[0] for _, r in got] == [i * i for i in range(20) if i != 13]
        pids = {r[1] for _, r in got}
        assert (os.getpid() not in pids) == processes, "processes run elsewhere, threads here"
        pool.submit("bad", 13)
        with pytest.raises(WorkerError if processes else ValueError, match="thirteen"):
            pool.result("bad")
    if processes:
        assert all(not p.is_alive() for p in pool._procs), "leaving the block stops the workers"


def test_dead_worker_is_one_clear_error():
    with pytest.raises(AtlasError, match="worker process.*died"):
        with WorkerPool(lambda x: time.sleep(30), 1, "test") as pool:
            pool.submit(0, 0)
            time.sleep(0.3)
            os.kill(pool._procs[0].pid, signal.SIGKILL)
            pool.result(0)


def _tagged(tag: str):
    def fn(x: int) -> tuple[str, int, int]:
        time.sleep(0.01)
        return tag, x, os.getpid()
    return fn


@pytest.mark.parametrize("processes", [True, False])
def test_swap_runs_later_tasks_with_the_new_function_in_new_workers(processes):
    with WorkerPool(_tagged("old"), 2, "test", processes=processes) as pool:
        for i in range(6):
            pool.submit(i, i)
        first_procs = list(pool._procs) if processes else []
        pool.swap(_tagged("new"))
        for i in range(6, 12):
            pool.submit(i, i)
        got = [pool.result(i) for i in range(12)]
        assert [x for _, x, _ in got] == list(range(12))
        assert [tag for tag, _, _ in got] == ["old"] * 6 + ["new"] * 6, "tasks given before the swap stay old"
        if processes:
            old_pids = {pid for tag, _, pid in got if tag == "old"}
            new_pids = {pid for tag, _, pid in got if tag == "new"}
            assert old_pids <= {p.pid for p in first_procs} and new_pids <= {p.pid for p in pool._procs}
            assert not old_pids & new_pids, "the new function runs in freshly forked workers"
            for proc in first_procs:
                proc.join(timeout=5)
            assert all(p.exitcode == 0 for p in first_procs), "the old workers exit once their tasks are done"
    if processes:
        assert not any(p.is_alive() for p in pool._all_procs())


def test_a_retired_worker_that_dies_with_tasks_left_is_one_clear_error():
    with pytest.raises(AtlasError, match="worker process.*died"):
        with WorkerPool(lambda x: time.sleep(30), 1, "test") as pool:
            pool.submit(0, 0)
            time.sleep(0.3)
            old = pool._procs[0]
            pool.swap(lambda x: x)
            os.kill(old.pid, signal.SIGKILL)
            pool.result(0)


def test_store_writer_commits_what_was_handed_over(tmp_path):
    emb = np.ones((3, 4), np.float32)
    with Store.open(tmp_path / "b") as store:
        with pytest.raises(KeyboardInterrupt):
            with StoreWriter(store) as writer:
                writer.submit(Store.add_embeddings, np.arange(3), emb)
                writer.submit(Store.add_embeddings, np.arange(3, 6), emb)
                raise KeyboardInterrupt
        assert store.count("embeddings") == 6, "writes handed over before the interrupt are committed"
        with pytest.raises(Exception):  # a duplicate key (DuckDB's message varies)
            with StoreWriter(store) as writer:
                writer.submit(Store.add_embeddings, np.arange(3), emb)  # ids already there
        assert store.count("embeddings") == 6, "the failed chunk rolled back"
