"""Progress bars with rate and ETA on stderr; `--quiet` silences them all."""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


def bar(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it"):
    """A progress bar (rate and ETA) unless quiet; use as an iterable or call .update(n)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=_quiet, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5, leave=False)


def say(message: str) -> None:
    """A one-line status message on stderr unless quiet."""
    if not _quiet:
        print(message, file=sys.stderr, flush=True)
