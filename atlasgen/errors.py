"""User-facing errors: one clear line plus a hint, turned into a non-zero exit by the CLI."""
from __future__ import annotations

import _thread
import contextlib
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
    """Whether `exc` is Ctrl-C in a library's words: DuckDB turns the KeyboardInterrupt that arrives while a
    statement runs into its own error (RuntimeError "Query interrupted"; duckdb.InterruptException)."""
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
