"""Worker processes for the CPU-bound parts of ingest and embed (JPEG decode, resize, re-encode), and a
writer thread that keeps store commits off the compute path.

Python threads share one interpreter lock, so decoding in threads stops scaling after a few cores (measured on
a 16-core GPU machine: 1,385 images/s on 4 threads, 2,184 on 16); processes scale with the cores. Workers are
forked (Linux's default, as in torch's DataLoader): they start in milliseconds, inherit the imported modules,
the work function (a closure is fine) and any shared memory mapped before the fork. Tasks and results travel
through queues and stay small (paths, ids, reasons); big outputs go through shared memory (embed) or files
(ingest). Where fork is not available, threads do the same work in-process.

A fork is not free, though: the kernel copies the forking process's page tables, so each one costs in proportion
to what the process has mapped (11 ms with torch and transformers imported on our 2-core box, 27 ms with 1 GiB
more of tensors; more after CUDA is up, by reports). Forked one by one from the pool's owner, 16 workers held its
main thread (and the GIL: CPython's `os.fork` keeps it) for that long, just when embed wants to read its model.
So by default (`SUPERVISED`) the owner forks one supervisor process, which forks the workers, reports a worker
that dies, and stops them when it is stopped or the owner is gone: the owner pays one fork, and the supervisor
pays the others on another core.

Workers can be made faster mid-run by something that takes long to load (embed's resize kernels: ~1 s of numba
import and cache loading). `swap` forks new workers from the owner once the owner has loaded it (ingest);
`standby` forks, at the start, a second supervisor that loads it itself, away from the owner (whose threads are
busy with a model), then forks workers that inherit it; `adopt_standby` hands them the tasks from then on.
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import queue
import signal
import threading
import traceback
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from .errors import AtlasError
from .threads import n_cores

# A worker with nothing to do checks this often whether its parent is still alive (a parent killed with
# SIGKILL cannot stop its workers; they notice and exit); a supervisor checks its owner as often.
_PARENT_CHECK_S = 0.5
# Workers are forked by a supervisor process, not by the pool's owner (see the module docstring). A module
# setting, not an option: it changes no result; benchmarks flip it to compare.
SUPERVISED = True
# A supervisor's report on the results queue: (_DIED, False, the worker's exit code).
_DIED = "atlasgen-worker-died"


def resolve_n_workers(n_workers: int) -> int:
    """`n_workers` option → a worker count: 0 means one per core this process may use."""
    return n_workers if n_workers > 0 else n_cores()


def can_fork() -> bool:
    return "fork" in mp.get_all_start_methods()


class WorkerError(RuntimeError):
    """A task raised in a worker process (the message carries the worker's traceback)."""


class WorkerPool:
    """`fn(task)` for submitted tasks in `n_workers` forked processes (threads where fork is unavailable, or with
    `processes=False`); results are collected by key. Leaving the block stops the workers.

        with WorkerPool(decode_unit, 4, "embed") as pool:
            pool.submit(0, task)
            result = pool.result(0)
    """

    def __init__(self, fn: Callable[[Any], Any], n_workers: int, name: str, processes: bool | None = None,
                 supervised: bool | None = None):
        assert n_workers >= 1, n_workers
        self.fn = fn
        self.n_workers = n_workers
        self.name = name
        self.processes = can_fork() if processes is None else processes and can_fork()
        # Processes only: the workers are forked by a supervisor process (None = SUPERVISED).
        self.supervised = SUPERVISED if supervised is None else supervised
        self._done: dict[Any, tuple[bool, Any]] = {}
        self._n_pending = 0
        self._started = False
        # A standby supervisor (`standby`): its task queue, the process, and the end of a pipe that brings its
        # prepare() answer; None when there is none (never made, adopted, or given up).
        self._standby: tuple[Any, Any, Any] | None = None
        self._adopted = False
        self.standby_why_not: str | None = None  # why a standby was not adopted (its prepare() answer, or more)

    # --- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> "WorkerPool":
        if self.processes:
            self._ctx = mp.get_context("fork")
            self._results = self._ctx.Queue()
            self._retired: list[tuple[Any, list]] = []  # (task queue, workers) replaced by swap(), or finish()ed
            # Each task goes to the workers of the moment, a generation: swap(), adopt_standby() and finish()
            # start the next. The generation of each task still pending, and of each retired entry.
            self._generation = 0
            self._pending_generation: dict[Any, int] = {}
            self._retired_generations: list[int] = []
            self._tasks, self._procs = self._fork(self.fn)
        else:
            from concurrent.futures import ThreadPoolExecutor
            self._executor = ThreadPoolExecutor(self.n_workers, thread_name_prefix=f"atlasgen-{self.name}")
            self._futures: dict[Any, Any] = {}
        self._started = True
        return self

    def _fork(self, fn: Callable[[Any], Any]) -> tuple[Any, list]:
        """A task queue and the processes forked now that run `fn` on its tasks: `n_workers` workers, or their
        supervisor (which forks them)."""
        tasks = self._ctx.Queue()
        if self.supervised:
            procs = [self._supervisor(fn, tasks, "supervisor")]
        else:
            procs = _worker_processes(self._ctx, fn, tasks, self._results, self.n_workers, self.name)
        _start(procs)
        return tasks, procs

    def _supervisor(self, fn: Callable[[Any], Any], tasks, role: str, prepare: Callable[[], str | None] | None = None,
                    answer=None):
        """A supervisor process of this pool (not started yet) that forks `n_workers` workers running `fn` on
        `tasks` (`_supervise`)."""
        return self._ctx.Process(target=_supervise, args=(fn, tasks, self._results, os.getpid(), self.n_workers,
                                                          self.name, prepare, answer),
                                 name=f"atlasgen-{self.name}-{role}", daemon=True)

    def swap(self, fn: Callable[[Any], Any]) -> None:
        """Run the tasks submitted from now on with `fn`, in workers forked now, so they inherit what this process
        has loaded since the pool started (ingest's resize kernels). The workers so far finish the tasks they
        were given, then exit; results keep coming by key as before."""
        assert self._started, "swap outside the pool's with-block"
        assert not self.processes or self._procs, "swap after finish()"
        self.fn = fn
        if not self.processes:
            return  # threads share this process: later submits simply call the new fn
        self._retire()
        self._tasks, self._procs = self._fork(fn)

    def standby(self, prepare: Callable[[], str | None]) -> bool:
        """Fork, now, a standby supervisor that runs `prepare()` (None: ready, else why not) and, once ready, forks
        `n_workers` workers of its own, which inherit what it prepared and wait for `adopt_standby`; the current
        workers go on meanwhile. Returns whether a standby was forked (processes only)."""
        assert self._started and self._standby is None, "standby outside the pool's with-block, or twice"
        if not self.processes or not self._procs:
            return False
        tasks = self._ctx.Queue()
        answer_r, answer_w = self._ctx.Pipe(duplex=False)
        proc = self._supervisor(self.fn, tasks, "standby", prepare, answer_w)
        _start([proc])
        answer_w.close()  # the standby's copy is the one that writes
        self._standby = (tasks, proc, answer_r)
        return True

    def adopt_standby(self) -> bool:
        """If the standby's workers are ready, they take every task submitted from now on (the current workers
        finish what they were given, then exit). Never waits. Returns whether that happened, now or before; a
        standby that cannot be ready (its prepare() failed, it died) is given up, with `standby_why_not` saying
        why."""
        if self._standby is None:
            return self._adopted
        tasks, proc, answer_r = self._standby
        try:
            if not answer_r.poll():
                if proc.exitcode is None:
                    return False
                raise EOFError  # it died before answering
            why_not = answer_r.recv()
        except (EOFError, OSError):
            why_not = f"the standby supervisor died (exit code {proc.exitcode})"
        answer_r.close()
        if why_not is not None:
            self.standby_why_not = why_not
            self._drop_standby()
            return False
        self._retire()
        self._tasks, self._procs, self._standby = tasks, [proc], None
        self._adopted = True
        return True

    def _drop_standby(self) -> None:
        """Stop a standby that will not be adopted (it stops its workers, if it has any yet)."""
        if self._standby is None:
            return
        tasks, proc, answer_r = self._standby
        self._standby = None
        if proc.is_alive():
            proc.terminate()
        proc.join(timeout=5)
        answer_r.close()
        tasks.cancel_join_thread()
        tasks.close()

    def __exit__(self, exc_type, *_) -> None:
        self.close(clean=exc_type is None)

    def finish(self) -> None:
        """No more tasks, every result taken: the workers exit now, while the owner goes on, and `close` only waits
        for what is left of that. A worker's exit tears down its forked copy of the owner's address space: `close`
        of 16 idle workers took 70–100 ms from a process with torch imported, 230–300 ms with 1 GiB more of
        tensors (our 2-core box), time embed's last batches and commit can hide."""
        assert self._started and self._n_pending == 0, "finish with tasks still pending"
        if self.processes and self._procs:
            self._retire()
        if self.processes and self._standby is not None:
            self.standby_why_not = "the tasks ran out first"
            self._drop_standby()

    def _retire(self) -> None:
        """The current workers stop once the tasks already queued are done (each takes one None; a supervisor
        exits once all its workers have), kept as retired workers (exiting with code 0) until then."""
        for _ in range(self.n_workers):
            self._tasks.put(None)
        self._retired.append((self._tasks, self._procs))
        self._retired_generations.append(self._generation)
        self._generation += 1
        self._procs = []

    def close(self, clean: bool = True) -> None:
        """Stop the workers: after the queued tasks when `clean`, at once otherwise."""
        if not self._started:
            return
        self._started = False
        if not self.processes:
            self._executor.shutdown(wait=clean, cancel_futures=not clean)
            return
        if self._standby is not None:
            self.standby_why_not = self.standby_why_not or "the pool closed first"
            self._drop_standby()
        if clean and self._n_pending == 0:
            for _ in range(self.n_workers if self._procs else 0):  # none after finish()
                self._tasks.put(None)  # a supervisor exits once all its workers have
            for proc in self._all_procs():
                proc.join(timeout=5)
        for proc in self._all_procs():
            if proc.is_alive():
                proc.terminate()  # a supervisor stops its workers first
        for proc in self._all_procs():
            proc.join(timeout=5)
        # Tasks nobody will read must not keep this process waiting on the queue's feeder thread at exit.
        for q in [self._tasks, self._results] + [tasks for tasks, _ in self._retired]:
            q.cancel_join_thread()
            q.close()

    def _retired_procs(self) -> list:
        return [proc for _, procs in self._retired for proc in procs]

    def _all_procs(self) -> list:
        return self._retired_procs() + self._procs

    # --- work --------------------------------------------------------------------------------------
    def submit(self, key: Any, task: Any) -> None:
        assert self._started, "submit outside the pool's with-block"
        assert not self.processes or self._procs, "submit after finish()"
        self._n_pending += 1
        if self.processes:
            self._pending_generation[key] = self._generation
            self._tasks.put((key, task))
        else:
            self._futures[key] = self._executor.submit(self.fn, task)

    def result(self, key: Any) -> Any:
        """The result of the task submitted under `key` (waits for it); a task's exception is raised here."""
        if not self.processes:
            future = self._futures.pop(key)
            self._n_pending -= 1
            return future.result()
        while key not in self._done:
            try:
                got_key, ok, value = self._results.get(timeout=1.0)
            except queue.Empty:
                self._check_alive()
                continue
            if got_key == _DIED:  # a supervisor's report
                self._raise_died([value])
            self._done[got_key] = (ok, value)
            self._pending_generation.pop(got_key, None)
        ok, value = self._done.pop(key)
        self._n_pending -= 1
        if not ok:
            raise WorkerError(f"a {self.name} worker failed:\n{value}")
        return value

    def _check_alive(self) -> None:
        # A current worker (or supervisor) never exits on its own; a retired one exits 0 once its tasks are done.
        # A supervisor reports its workers' deaths on the results queue (see result()).
        dead = [p for p in self._procs if p.exitcode is not None]
        dead += [p for p in self._retired_procs() if p.exitcode not in (None, 0)]
        # Retired workers all gone with tasks of theirs unanswered (a result queue quiet for a second holds nothing
        # they sent before exiting): a worker died and the report of it was lost with its supervisor. Without
        # this, the owner would wait for those results for ever.
        waiting = set(self._pending_generation.values())
        for (_, procs), generation in zip(self._retired, self._retired_generations):
            if generation in waiting and all(p.exitcode is not None for p in procs):
                dead += [p for p in procs if p not in dead]
        if dead:
            self._raise_died([p.exitcode for p in dead])

    def _raise_died(self, exit_codes: list) -> None:
        raise AtlasError(f"{len(exit_codes)} {self.name} worker process(es) died (exit code "
                         f"{', '.join(str(code) for code in exit_codes)})",
                         f"a negative code is the signal that killed it (-9: out of memory?); lower "
                         f"{self.name}.n_workers or free memory, then run the same command again (it resumes)")


def ordered_map(pool: WorkerPool, tasks: Iterable[tuple[Any, Any]], window: int) -> Iterator[tuple[Any, Any]]:
    """(meta, task) pairs → (meta, pool result) in input order, with at most `window` tasks in flight (bounded
    memory however long `tasks` is). `meta` stays in this process."""
    pending: deque = deque()
    key = 0
    for meta, task in tasks:
        pool.submit(key, task)
        pending.append((key, meta))
        key += 1
        if len(pending) >= window:
            k, m = pending.popleft()
            yield m, pool.result(k)
    while pending:
        k, m = pending.popleft()
        yield m, pool.result(k)


def _supervise(fn: Callable, tasks, results, owner_pid: int, n_workers: int, name: str,
               prepare: Callable[[], str | None] | None = None, answer=None) -> None:
    """A supervisor process: forks `n_workers` workers, reports each that dies (a nonzero exit) on the results
    queue, and returns once they have all exited. Stopped (SIGTERM) or left by its owner, it stops them first.
    A standby (`WorkerPool.standby`) first runs `prepare()` and sends its answer through the pipe end `answer`:
    on None (ready) it goes on as above, else it returns."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the owner handles it and stops us
    # While preparing and forking, SIGTERM kills at once (the workers forked so far die with us, see
    # _worker_loop): a Python handler could run inside another module's at-fork callback, which swallows what it
    # raises. One sent since the fork waited, blocked (see _start), for this.
    _take_sigterm(signal.SIG_DFL)
    if prepare is not None:
        # Ready is answered only once the workers are forked (below), so adopted tasks never wait for a fork.
        try:
            why_not = prepare()
        except Exception as e:  # prepare() should not raise; if it does, the owner keeps its workers
            why_not = f"{type(e).__name__}: {e}"
        if why_not is not None:
            answer.send(why_not)
            return
    # multiprocessing lets no daemonic process have children; ours are daemons too, and die with us.
    mp.current_process().daemon = False
    ctx = mp.get_context("fork")
    procs = _worker_processes(ctx, fn, tasks, results, n_workers, name, die_with_parent=True)
    gc.freeze()  # as the owner does before forking (see _start); kept: this process only waits from now on
    for proc in procs:
        proc.start()
    if answer is not None:
        answer.send(None)  # ready: the workers are forked
        answer.close()
    # From now on SIGTERM asks the loop below to stop the workers first; it wakes the loop through a pipe.
    wake_r, wake_w = os.pipe()
    stopping = []

    def stop(*_) -> None:
        stopping.append(True)
        os.write(wake_w, b"x")

    signal.signal(signal.SIGTERM, stop)
    try:
        running = {proc.sentinel: proc for proc in procs}
        while running and not stopping and os.getppid() == owner_pid:
            for ready in mp_connection.wait([*running, wake_r], timeout=_PARENT_CHECK_S):
                if ready == wake_r:
                    os.read(wake_r, 64)
                    continue
                proc = running.pop(ready)
                proc.join()
                if proc.exitcode != 0:  # a worker exits 0 only when told to stop
                    results.put((_DIED, False, proc.exitcode))
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=5)


def _start(procs: list) -> None:
    """Start (fork) `procs`. Objects alive at the fork stay out of the children's garbage collector: a child that
    collects an inherited object another thread of this process was using (a Playwright greenlet, a DuckDB or
    torch handle) can crash (seen: a segfault in a worker's GC inside PIL.Image.open).

    SIGTERM is blocked in this thread while it forks, so each child starts with it blocked and it waits there until
    the child has set its own disposition (`_take_sigterm`). Unblocked, a SIGTERM that came before then (a pool
    closed right after it started) met the Python handler inherited from this process (ray.init's `sys.exit`, our
    `errors._on_sigterm`): run inside another module's at-fork callback, which swallows what it raises, or dropped
    by CPython once the child had set SIG_DFL. Either way the child lived on and close() could not stop it (seen
    in the test suite: a supervisor left running for ever, which kept the Playwright driver's pipe open, so the
    session hung at its end). A SIGTERM to this process meanwhile is delivered to another thread or at the unblock.
    """
    gc.freeze()
    mask = _block_sigterm()
    try:
        for proc in procs:
            proc.start()
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        gc.unfreeze()


def _block_sigterm():
    """Block SIGTERM in this thread; returns the mask before (None where signal masks are not available)."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _take_sigterm(handler) -> None:
    """In a child forked by `_start`: SIGTERM's disposition for this process, then SIGTERM unblocked (one that came
    since the fork is delivered now, to `handler`)."""
    signal.signal(signal.SIGTERM, handler)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _worker_processes(ctx, fn: Callable, tasks, results, n_workers: int, name: str, die_with_parent: bool = False
                      ) -> list:
    """`n_workers` worker processes of this process (not started yet) that run `fn` on `tasks`."""
    return [ctx.Process(target=_worker_loop, args=(fn, tasks, results, os.getpid(), die_with_parent),
                        name=f"atlasgen-{name}-{i}", daemon=True) for i in range(n_workers)]


def _worker_loop(fn: Callable, tasks, results, parent_pid: int, die_with_parent: bool = False) -> None:
    # Ctrl-C reaches the whole process group: the parent handles it and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # terminate() must stop us, not run a SIGTERM handler inherited from the process that forked us.
    _take_sigterm(signal.SIG_DFL)
    # A supervisor killed outright cannot stop us, and a busy worker would not notice until its task ends: ask
    # the kernel to kill us with it (the thread that forked us is the supervisor's main thread: it lives as long).
    if die_with_parent:
        _kill_me_with_my_parent()
    if os.getppid() != parent_pid:  # gone already, before we could ask
        return
    while True:
        try:
            item = tasks.get(timeout=_PARENT_CHECK_S)
        except queue.Empty:
            if os.getppid() != parent_pid:
                return
            continue
        if item is None:
            return
        key, task = item
        try:
            results.put((key, True, fn(task)))
        except BaseException:  # reported to the parent, which raises it
            results.put((key, False, traceback.format_exc(limit=8)))


def _kill_me_with_my_parent() -> None:
    """Linux's PR_SET_PDEATHSIG: SIGKILL this process when the thread that forked it ends. Where that is
    unavailable the worker notices only when idle."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class StoreWriter:
    """Store writes, in order, in one background thread with its own connection to the store, so the compute
    that produces them (the model) never waits for a commit. Each submitted call is one Store method call
    (one transaction). Leaving the block waits for every write handed over, also when the block raised (what
    was handed over is committed), then raises a write's error if there was one.

        with StoreWriter(store) as writer:
            writer.submit(Store.add_embeddings, ids, emb)
    """

    def __init__(self, store, max_pending: int = 4):
        self.store = store
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None

    def __enter__(self) -> "StoreWriter":
        self._own = self.store.for_thread()
        self._thread = threading.Thread(target=self._loop, name="atlasgen-store-writer", daemon=True)
        self._thread.start()
        return self

    def submit(self, method: Callable, *args) -> None:
        """Queue `method(store, *args)` (blocks while `max_pending` writes wait: the writer sets the pace)."""
        if self._error is not None:
            raise self._error
        self._queue.put((method, args))

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:  # after an error, drain without writing
                method, args = item
                try:
                    method(self._own, *args)
                except BaseException as e:
                    self._error = e

    def __exit__(self, exc_type, *_) -> None:
        self._queue.put(None)
        self._thread.join()
        self._own.close()
        if self._error is not None and exc_type is None:
            raise self._error
