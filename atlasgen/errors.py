"""User-facing errors: one clear line plus a hint, turned into a non-zero exit by the CLI."""
from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys


class AtlasError(Exception):
    """A problem with the user's input or environment (not a bug in atlasgen)."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message + (f" (hint: {self.hint})" if self.hint else "")


class StoreVersionError(AtlasError):
    pass


class ModelLoadError(AtlasError):
    pass


class DataLoadError(AtlasError):
    pass


class StageInputError(AtlasError):
    """A stage was asked to run before the stage it needs (e.g. encode before train)."""


class DiskFullError(AtlasError):
    """The disk (or the user's quota) ran out while writing a file."""


# How each writer we use reports a full disk: OSError errno, safetensors' Rust io::Error, DuckDB's text.
_NO_SPACE_TEXTS = ("No space left on device", "StorageFull", "Disk quota exceeded", "QuotaExceeded")


def is_no_space(exc: BaseException) -> bool:
    """Whether `exc` (from open/write, Pillow, safetensors or DuckDB) means the disk is full."""
    import errno
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return any(t in text for t in _NO_SPACE_TEXTS)


def is_interrupt(exc: BaseException) -> bool:
    """Whether `exc` is Ctrl-C (or SIGTERM, see `sigterm_as_interrupt`) in a library's words: DuckDB turns the
    KeyboardInterrupt that arrives while a statement runs into its own error (RuntimeError "Query interrupted";
    duckdb.InterruptException)."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    if type(exc).__name__ == "InterruptException" and type(exc).__module__.lstrip("_").startswith("duckdb"):
        return True
    return isinstance(exc, RuntimeError) and str(exc).strip() == "Query interrupted"


@contextlib.contextmanager
def interrupts_kept():
    """Ctrl-C that lands inside a C callback (llvmlite's while numba compiles UMAP's code, a ctypes callback, a
    weakref finaliser) is printed as "Exception ignored ..." and lost, and the work went on to the end with exit 0.
    Meanwhile such a KeyboardInterrupt is not printed but sent again to the main thread a moment later (from a
    timer: sent from the hook, it would be raised in the hook), where it is raised once Python code runs there.
    Yields a function that says whether any was caught that way."""
    import threading
    previous = sys.unraisablehook
    timers: list[threading.Timer] = []

    def hook(unraisable) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            timer = threading.Timer(INTERRUPT_RESEND_S, _thread.interrupt_main)
            timer.daemon = True
            timers.append(timer)
            timer.start()
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield lambda: bool(timers)
    finally:
        sys.unraisablehook = previous
        for timer in timers:  # the caller raises it instead
            timer.cancel()


INTERRUPT_RESEND_S = 0.05  # after the C callback that swallowed it has returned


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill PID`; a scheduler such as SLURM at a job's time limit or on preemption), raised in the main
    thread as Ctrl-C's KeyboardInterrupt is, so everything that cleans up after Ctrl-C runs for it too: the stage
    is recorded interrupted, worker pools are stopped, committed work is kept, temp files are removed."""

    def __init__(self, message: str = "stopped by SIGTERM"):
        super().__init__(message)


# The process that installed `_on_sigterm` (None: not installed), and whether SIGTERM came since it was.
_sigterm_owner: int | None = None
_sigterm_received = False


def _on_sigterm(signum, frame) -> None:
    if os.getpid() != _sigterm_owner:
        # A process forked from the one that installed this handler (a worker, a supervisor, any pool), before it
        # set its own: SIGTERM must end it as it would have without us, or a pool could not stop it.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    global _sigterm_received
    _sigterm_received = True
    # Once is enough: a second SIGTERM while cleaning up ends the process at once, as SIGTERM did before.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


def _default_sigterm_in_child() -> None:
    """After a fork: a child of a process under `sigterm_as_interrupt` gets SIGTERM's default back at once (before
    any Python code of its own runs; `_on_sigterm` covers the moment before this)."""
    if _sigterm_owner is not None and signal.getsignal(signal.SIGTERM) is _on_sigterm:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        except (ValueError, OSError):
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_default_sigterm_in_child)


def sigterm_received() -> bool:
    """Whether SIGTERM stopped the current command (see `sigterm_as_interrupt`)."""
    return _sigterm_received


def interrupt_reason() -> str:
    """What stopped the current command, as recorded for an interrupted stage."""
    return "stopped by SIGTERM" if _sigterm_received else "interrupted by the user"


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While the block runs, SIGTERM to this process raises `Terminated` (a KeyboardInterrupt) in its main thread,
    as Ctrl-C does, and `sigterm_received()` says so until the block ends; then the previous handler is back.
    Only this process: a forked child resets SIGTERM to its default right after the fork, and the handler itself
    checks the process id, so pools still end their workers with SIGTERM. A second SIGTERM ends the process at
    once. Outside the main thread (where Python cannot set handlers) it does nothing."""
    global _sigterm_owner, _sigterm_received
    if _sigterm_owner == os.getpid():  # inside another such block: its handler stays
        yield
        return
    _sigterm_received = False
    import threading
    previous = signal.getsignal(signal.SIGTERM)
    # None: a handler set outside Python, which could not be put back.
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    _sigterm_owner = os.getpid()
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _sigterm_owner = None
        _sigterm_received = False


def reclaim_sigterm() -> None:
    """Install `_on_sigterm` again where a library has replaced it inside `sigterm_as_interrupt` (ray.init sets
    its own, which exits with status 1 or 15 and records the stage failed), unless SIGTERM has already come."""
    import threading
    if (_sigterm_owner == os.getpid() and not _sigterm_received
            and threading.current_thread() is threading.main_thread()):
        signal.signal(signal.SIGTERM, _on_sigterm)


def free_bytes(path) -> int | None:
    """Free space on the file system holding `path` (or its nearest existing parent)."""
    import shutil
    from pathlib import Path
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def human_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def disk_full_error(path) -> DiskFullError:
    """The one message for a full disk: which path, how much is free there, and what to do."""
    return DiskFullError(f"no space left on the device while writing {path} ({human_bytes(free_bytes(path))} free "
                         "there)", "free some space (or build into a bigger disk with --out), then run the same "
                               "command again: finished work is kept and the build resumes")


class StoreLockedError(AtlasError):
    """Another process holds the store's write lock (DuckDB allows one writer and no readers beside it)."""

    def __init__(self, message: str, hint: str = "", pid: int | None = None):
        super().__init__(message, hint)
        self.pid = pid


class StoreDamagedError(AtlasError):
    """The store file is not a DuckDB database, is truncated, or fails its checksums."""
