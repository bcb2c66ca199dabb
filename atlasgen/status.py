"""The build status file, `OUT/atlas.status.json`: what a running build is doing, for other processes.

While a build runs, DuckDB's lock keeps every other process out of the store (readers included), so
`atlasgen info` and `atlasgen query` read this file instead: the build's process id, the stage it is in,
and the progress of its current bar (done/total, rate, ETA). The pipeline opens it (`build_status`), each
stage start is recorded, and `progress.bar` reports into it; it is rewritten atomically (temp name, then
rename) at most once a second, and a last time when the build ends ("done", "failed", or "interrupted" by
Ctrl-C or SIGTERM). A build killed outright (SIGKILL, a power cut) leaves "running" with a process id that no
longer exists, which readers report as interrupted.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections import deque
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from .paths import BuildPaths, atomic_path, pid_alive

T = TypeVar("T")
STATUS_VERSION = 1
# At most one rewrite per this many seconds from progress updates (stage changes always write).
MIN_WRITE_INTERVAL_S = 1.0
# The rate is measured over about this many recent seconds.
RATE_WINDOW_S = 30.0

_current: "BuildStatus | None" = None


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Tracker:
    """One progress bar's counts, reported into the status file."""

    def __init__(self, status: "BuildStatus", desc: str, total: int | None, unit: str):
        self.status, self.desc, self.total, self.unit = status, desc, total, unit
        self.n = 0
        # (time, count) samples; the first is taken after the first update, so a bar that starts by
        # counting work done earlier (a resumed stage) does not report that as speed.
        self.samples: deque[tuple[float, int]] = deque()

    def advance(self, n: int = 1) -> None:
        self.n += n
        t = time.monotonic()
        if not self.samples or t - self.samples[-1][0] >= MIN_WRITE_INTERVAL_S:
            self.samples.append((t, self.n))
            while len(self.samples) > 2 and t - self.samples[1][0] > RATE_WINDOW_S:
                self.samples.popleft()
        self.status.progress(self)

    def counted(self, iterable: Iterable[T]) -> Iterator[T]:
        for item in iterable:
            yield item
            self.advance(1)

    def rate(self) -> float | None:
        """Units per second over the recent window, None until there are two samples."""
        if len(self.samples) < 2:
            return None
        (t0, n0), t1 = self.samples[0], time.monotonic()
        return (self.n - n0) / (t1 - t0) if t1 > t0 and self.n > n0 else None

    def as_dict(self) -> dict:
        rate = self.rate()
        eta = (self.total - self.n) / rate if rate and self.total is not None and self.total >= self.n else None
        return {"task": self.desc, "done": self.n, "total": self.total, "unit": self.unit,
                "rate": None if rate is None else round(rate, 3), "eta_s": None if eta is None else round(eta, 1)}


class BuildStatus:
    """The status of this process's build, mirrored into `path`."""

    def __init__(self, path: Path, stages: list[str]):
        self.path = Path(path)
        self.doc = {"version": STATUS_VERSION, "pid": os.getpid(), "command": _command_line(), "state": "running",
                    "started_at": _now_iso(), "updated_at": None, "stages": list(stages), "stage": None,
                    "stage_index": None, "n_stages": len(stages), "stage_started_at": None, "progress": None,
                    "error": None}
        self._last_write = 0.0
        self._tracker: Tracker | None = None

    def stage(self, name: str) -> None:
        stages = self.doc["stages"]
        self.doc.update(stage=name, stage_index=stages.index(name) + 1 if name in stages else None,
                        stage_started_at=_now_iso())
        self._tracker = None
        self.write(force=True)

    def track(self, desc: str, total: int | None, unit: str) -> Tracker:
        self._tracker = Tracker(self, desc, total, unit)
        self.write()
        return self._tracker

    def progress(self, tracker: Tracker) -> None:
        if tracker is self._tracker:  # an older bar of this stage may still count; the newest one is shown
            self.write()

    def finish(self, state: str, error: str | None = None) -> None:
        self.doc.update(state=state, error=error, finished_at=_now_iso())
        self.write(force=True)

    def write(self, force: bool = False) -> None:
        """Rewrite the file, at most once per MIN_WRITE_INTERVAL_S unless `force`."""
        now = time.monotonic()
        if not force and now - self._last_write < MIN_WRITE_INTERVAL_S:
            return
        self._last_write = now
        self.doc["progress"] = self._tracker.as_dict() if self._tracker is not None else None
        self.doc["updated_at"] = _now_iso()
        try:
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(self.doc, indent=1))
        except Exception:  # advisory only: a full disk is reported by the writes that matter
            pass


def _command_line() -> str:
    words = [Path(sys.argv[0]).name if sys.argv else "atlasgen", *sys.argv[1:]]
    if words and words[0] in ("cli.py", "__main__.py"):
        words[0] = "atlasgen"
    text = " ".join(words)
    return text if len(text) <= 200 else text[:197] + "..."


@contextmanager
def build_status(paths: BuildPaths, stages: list[str]) -> Iterator[BuildStatus]:
    """Keep `paths.status_path` up to date while the block runs (the pipeline wraps a build in this)."""
    global _current
    outer = _current
    status = BuildStatus(paths.status_path, stages)
    _current = status
    status.write(force=True)
    try:
        yield status
    except BaseException as e:
        from .errors import interrupt_reason, is_interrupt, sigterm_received
        if is_interrupt(e) or sigterm_received():  # Ctrl-C, or SIGTERM (errors.Terminated)
            status.finish("interrupted", interrupt_reason())
        else:
            text = getattr(e, "message", None) or str(e)
            status.finish("failed", text.splitlines()[0] if text else type(e).__name__)
        raise
    else:
        status.finish("done")
    finally:
        _current = outer


def keeps_build_status(run_stages):
    """Decorates `pipeline.run_stages(cfg, store, stages, ...)`: the status file lives as long as the call."""
    @functools.wraps(run_stages)
    def wrapper(cfg, store, stages, *args, **kwargs):
        from .stages import REGISTRY
        stages = list(stages)
        with build_status(store.paths, [s.name for s in REGISTRY.ordered(stages)]):
            return run_stages(cfg, store, stages, *args, **kwargs)
    return wrapper


def enter_stage(name: str) -> None:
    """Record that the running build starts (or checks) stage `name`."""
    if _current is not None:
        _current.stage(name)


def track(desc: str, total: int | None, unit: str) -> Tracker | None:
    """A tracker for a new progress bar of the running build (None outside a build)."""
    return _current.track(desc, total, unit) if _current is not None else None


# --- reading it (other processes) ----------------------------------------------------------------------
def read_status(paths: BuildPaths) -> dict | None:
    """The status file's contents, or None if there is none (or it cannot be read)."""
    try:
        doc = json.loads(paths.status_path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("version") == STATUS_VERSION else None


def running_build(paths: BuildPaths, pid: int | None = None) -> dict | None:
    """The status of a build that is running now (its process is alive), optionally that of process `pid`."""
    doc = read_status(paths)
    if doc is None or doc.get("state") != "running" or not pid_alive(int(doc.get("pid") or 0)):
        return None
    if pid is not None and int(doc["pid"]) != pid:
        return None
    return doc


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def _age(iso: str | None) -> float | None:
    try:
        return (datetime.now(timezone.utc) - datetime.fromisoformat(iso)).total_seconds()
    except (TypeError, ValueError):
        return None


def brief(doc: dict, live: bool = True) -> str:
    """One line: stage k/n name, task done/total (pct), rate, ETA. `live`: the build still runs; for one that
    has ended, where it stopped: no ETA, and how long the stage ran rather than a clock that keeps counting."""
    parts = []
    if doc.get("stage"):
        parts.append(f"stage {doc.get('stage_index') or '?'}/{doc.get('n_stages') or '?'} {doc['stage']}")
    else:
        parts.append("starting")
    prog = doc.get("progress") or {}
    if prog:
        total = prog.get("total")
        unit = prog.get("unit") or "it"
        count = f"{prog.get('done', 0):,}/{total:,}" if total else f"{prog.get('done', 0):,}"
        pct = f" ({100 * prog.get('done', 0) / total:.0f}%)" if total else ""
        rate = f", {prog['rate']:.3g} {unit}/s" if prog.get("rate") else ""
        eta = f", ETA {duration(prog['eta_s'])}" if live and prog.get("eta_s") is not None else ""
        parts.append(f"{prog.get('task') or 'progress'} {count} {unit}{pct}{rate}{eta}")
    else:
        running = _age(doc.get("stage_started_at"))
        if running is not None and doc.get("stage"):
            if live:
                parts.append(f"running for {duration(running)}")
            else:
                stopped = _age(doc.get("updated_at"))
                ran = running - stopped if stopped is not None else None
                parts.append(f"stopped after {duration(ran)}" if ran is not None and ran >= 0 else "stopped there")
    return parts[0] + (": " + ", ".join(parts[1:]) if len(parts) > 1 else "")


def describe(doc: dict, running: bool | None = None) -> list[str]:
    """The lines `atlasgen info` prints about a build from its status file. `running`: whether that build
    still runs (default: whether its process exists; False when the store could be opened, i.e. no build
    holds it, even if the process id has been reused since)."""
    pid = doc.get("pid")
    state = doc.get("state")
    alive = pid_alive(int(pid or 0)) if running is None else running
    started = _age(doc.get("started_at"))
    updated = _age(doc.get("updated_at"))
    if state == "running" and alive:
        head = (f"build running: pid {pid}, started {duration(started)} ago "
                f"(status updated {duration(updated)} ago): {doc.get('command', '')}")
    elif state == "running":
        head = (f"last build was interrupted (pid {pid} ended without finishing, status from {duration(updated)} ago): "
                "run it again to resume")
    elif state == "failed":
        head = f"last build failed {duration(updated)} ago: {doc.get('error') or 'see its output'}"
    elif state == "interrupted":
        how = "stopped by SIGTERM" if "SIGTERM" in (doc.get("error") or "") else "interrupted (Ctrl-C)"
        head = f"last build was {how} {duration(updated)} ago: run it again to resume"
    else:
        head = f"last build finished {duration(updated)} ago"
    lines = [head]
    if state != "done" and (doc.get("stage") or doc.get("progress")):
        lines.append("  " + brief(doc, live=state == "running" and alive))
    return lines
