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


class _Bar(tqdm):
    """tqdm that also reports counts to the build status file (status.py), quiet or not."""

    def __init__(self, *args, tracker=None, **kwargs):
        self._tracker = tracker
        super().__init__(*args, **kwargs)

    def update(self, n=1):
        if self._tracker is not None and n:
            self._tracker.advance(n)
        return super().update(n)


def bar(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it"):
    """A progress bar (rate and ETA) unless quiet; use as an iterable or call .update(n). During a build its
    counts also go to the status file that `atlasgen info` shows (even when quiet)."""
    from . import status
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    tracker = status.track(desc, total, unit)
    if tracker is not None and iterable is not None:
        iterable = tracker.counted(iterable)  # counted as consumed; tqdm's own update() calls are not
        tracker_for_updates = None
    else:
        tracker_for_updates = tracker
    return _Bar(iterable, total=total, desc=desc, unit=unit, disable=_quiet, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5, leave=False, tracker=tracker_for_updates)


def say(message: str) -> None:
    """A one-line status message on stderr unless quiet; on a line of its own above any bar being drawn."""
    if not _quiet:
        tqdm.write(message, file=sys.stderr)
        sys.stderr.flush()


def close_bars() -> None:
    """Close every bar still open (one an error or Ctrl-C left behind), so what is printed next starts on a line
    of its own."""
    for open_bar in list(getattr(tqdm, "_instances", ())):
        try:
            open_bar.close()
        except Exception:  # a bar half torn down by the error: nothing left to clear
            pass
