"""SIGTERM (`kill PID`; a scheduler such as SLURM at a job's time limit or on preemption) stops a command as Ctrl-C
does: the stage is recorded interrupted ("stopped by SIGTERM"), worker pools are stopped, committed work is
kept, and the CLI exits 143 with one line and no traceback; the same command resumes. Forked processes (a pool's
supervisor and workers, any other fork) still die on SIGTERM, so pools can stop them; a second SIGTERM ends the
process at once; `atlasgen serve` stops cleanly (exit 0)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from typer.testing import CliRunner

from atlasgen.cli import app
from atlasgen.errors import AtlasError, Terminated, sigterm_as_interrupt, sigterm_received
from atlasgen.paths import BuildPaths
from atlasgen.store import Store
from atlasgen.testing import descendants, running

runner = CliRunner()
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


# --- in this process -------------------------------------------------------------------------------------------
def test_sigterm_raises_here_only_while_the_block_runs():
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not before
        with pytest.raises(Terminated, match="stopped by SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs here, in the main thread
        assert sigterm_received()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "a second SIGTERM would end the process"
    assert signal.getsignal(signal.SIGTERM) is before and not sigterm_received()


def _sigterm_then(then, before):
    """A stage's stand-in: SIGTERM to this process, then `then` (what a library makes of the interrupt). Only under
    a handler of the command's own (not `before`, the test run's), which a SIGTERM would end."""
    def stage_work(cfg, store):
        assert signal.getsignal(signal.SIGTERM) is not before, "no SIGTERM handler while the command runs"
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        except Terminated:
            then()
        raise AssertionError("SIGTERM did not stop the stage")
    return stage_work


def _reraise():
    raise


def _duckdb_stopped_it():
    raise RuntimeError("Query interrupted")  # how DuckDB reports a signal that came while a statement ran


def _a_worker_died():
    raise AtlasError("1 ingest worker process(es) died (exit code -15)", "...")  # SIGTERM to the whole job


@pytest.mark.parametrize("then", [_reraise, _duckdb_stopped_it, _a_worker_died], ids=["as is", "duckdb", "worker"])
def test_sigterm_in_a_stage_is_recorded_interrupted_and_exits_143(tmp_path, monkeypatch, then):
    from atlasgen.stages import ingest
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(ingest, "candidates_for", _sigterm_then(then, before))
    out = tmp_path / "out"
    result = runner.invoke(app, ["ingest", "--preset", "tiny", "--out", str(out), "--quiet"])
    assert result.exit_code == 143, (result.output, result.exception)
    assert "Traceback" not in result.output
    assert result.output.splitlines() == ["error: stopped by SIGTERM",
                                          "hint: run the same command again to resume where it stopped"]
    assert signal.getsignal(signal.SIGTERM) is before, "the handler is the command's only"
    with Store.open(out, read_only=True) as store:
        row = store.stage_row("ingest")
    assert (row["status"], row["error"]) == ("interrupted", "stopped by SIGTERM")
    doc = json.loads(BuildPaths(out).status_path.read_text())
    assert (doc["state"], doc["error"]) == ("interrupted", "stopped by SIGTERM")
    info = runner.invoke(app, ["info", "--out", str(out)])
    assert info.exit_code == 0 and "last build was stopped by SIGTERM" in info.output, info.output


def test_ctrl_c_is_still_told_apart(tmp_path, monkeypatch):
    from atlasgen.stages import ingest

    def ctrl_c(cfg, store):
        raise KeyboardInterrupt
    monkeypatch.setattr(ingest, "candidates_for", ctrl_c)
    out = tmp_path / "out"
    result = runner.invoke(app, ["ingest", "--preset", "tiny", "--out", str(out), "--quiet"])
    assert result.exit_code == 130 and result.output.splitlines()[0] == "error: interrupted", result.output
    with Store.open(out, read_only=True) as store:
        assert store.stage_row("ingest")["error"] == "interrupted by the user"
    assert "last build was interrupted (Ctrl-C)" in runner.invoke(app, ["info", "--out", str(out)]).output


# --- forked processes still die on SIGTERM ---------------------------------------------------------------------
FORKS = r'''
import multiprocessing as mp, os, signal, sys, time
from atlasgen import errors
from atlasgen.testing import wait_gone
from atlasgen.workers import WorkerPool

def nap(x):
    return os.getpid() if x == "pid" else time.sleep(30)

with errors.sigterm_as_interrupt():
    # A pool ends its workers (and a supervisor its own) with SIGTERM: at once, not after their 30 s tasks.
    for supervised in (True, False):
        pool = WorkerPool(nap, 2, "test", supervised=supervised).__enter__()
        pool.submit("a", "pid"); pool.submit("b", "pid")
        pids = [pool.result("a"), pool.result("b")]
        for k in range(2): pool.submit(k, k)
        time.sleep(0.3)
        t0 = time.time()
        pool.close(clean=False)
        codes = [p.exitcode for p in pool._procs]
        print("pool", supervised, round(time.time() - t0, 1), codes, wait_gone(pids, 5), flush=True)
    # A fork of ours gets SIGTERM's default at once; and where it still ran our handler (the moment before), the
    # handler sees that it is not in its own process and ends it as SIGTERM would.
    for reinstall in (False, True):
        pid = os.fork()
        if pid == 0:
            default = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
            if reinstall:
                signal.signal(signal.SIGTERM, errors._on_sigterm)
            try:
                time.sleep(30)
            finally:
                os._exit(3 if default else 4)
        time.sleep(0.3)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        print("fork", reinstall, os.WIFSIGNALED(status) and os.WTERMSIG(status), flush=True)
    # multiprocessing's own pool (its workers set no handler of their own) ends them with SIGTERM too.
    with mp.get_context("fork").Pool(2) as mp_pool:
        mp_pool.map_async(time.sleep, [30, 30])
        time.sleep(0.3)
        t0 = time.time()
        mp_pool.terminate()
        print("mp", round(time.time() - t0, 1), flush=True)
    # This process: a second SIGTERM while cleaning up after the first ends it at once, without a traceback.
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
    except errors.Terminated:
        print("cleaning up", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        print("still here", flush=True)
'''


def test_forked_processes_still_die_on_sigterm_and_a_second_sigterm_ends_the_process(tmp_path):
    script = tmp_path / "forks.py"
    script.write_text(FORKS)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    lines = run.stdout.splitlines()
    assert run.returncode == -signal.SIGTERM, (run.returncode, run.stdout, run.stderr[-2000:])
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    pools = [line.split(maxsplit=3) for line in lines if line.startswith("pool ")]
    assert len(pools) == 2, lines
    for _, supervised, seconds, rest in pools:
        assert float(seconds) < 5, lines
        # The supervisor stops its workers and exits 0 when told to; workers forked by the owner die of SIGTERM.
        assert rest == ("[0] True" if supervised == "True" else f"[{-signal.SIGTERM}, {-signal.SIGTERM}] True"), lines
    assert f"fork False {signal.SIGTERM}" in lines and f"fork True {signal.SIGTERM}" in lines, lines
    assert any(line.startswith("mp ") and float(line.split()[1]) < 5 for line in lines), lines
    assert lines[-1] == "cleaning up", lines


# --- a real build ----------------------------------------------------------------------------------------------
N_IMAGES = 480  # embed's bar shows progress every 0.5 s: enough of it to stop mid-way


def _start_build(tmp_path, config_text: str):
    config = tmp_path / "atlas.toml"
    config.write_text(config_text)
    out = tmp_path / "build"
    cmd = [sys.executable, "-m", "atlasgen.cli", "build", "--preset", "tiny", "--config", str(config),
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=ENV)
    seen = {"text": b""}

    def watch():
        while True:
            chunk = proc.stderr.read1(4096)
            if not chunk:
                return
            seen["text"] += chunk

    threading.Thread(target=watch, daemon=True).start()
    return proc, out, seen


def test_sigterm_mid_embed_exits_143_records_interrupted_stops_the_workers_and_resumes(tmp_path):
    # Small batches and chunks: embed takes a few seconds, and SIGTERM lands with chunks committed and more to do.
    proc, out, seen = _start_build(tmp_path, f"[ingest]\nn_tiny_images = {N_IMAGES}\n"
                                             "[embed]\nbatch_size = 2\nchunk_size = 4\nn_threads = 1\n")
    progress = re.compile(rb"embed[^\r\n]*?(\d+)/" + str(N_IMAGES).encode())
    deadline = time.time() + 300
    workers: list[int] = []
    while proc.poll() is None and time.time() < deadline:
        found = progress.findall(seen["text"][-4096:])
        if found and int(found[-1]) >= 8:  # two chunks handed to the writer, at least
            workers = descendants(proc.pid)
            if len(workers) >= 2:
                break
        time.sleep(0.02)
    assert proc.poll() is None, f"the build ended before SIGTERM: {seen['text'][-800:]!r}"
    assert len(workers) >= 2, "embed decodes in worker processes (forked by a supervisor)"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, seen["text"][-2000:]
    time.sleep(0.1)  # the watcher reads the last bytes
    text = seen["text"].decode(errors="replace")
    assert "Traceback" not in text, text[-2000:]
    assert "error: stopped by SIGTERM" in text and "run the same command again to resume" in text, text[-800:]
    # The pool stopped its workers before the build exited; nothing of it is left (nor any temp file of it).
    assert not [pid for pid in workers if running(pid)], "worker processes outlived the stopped build"
    assert not [p for p in out.rglob(f"*.tmp{proc.pid}*")], "temp files of the stopped build are left"

    with Store.open(out, read_only=True) as store:
        row = store.stage_row("embed")
        ids_before, _ = store.embeddings()
    assert (row["status"], row["error"]) == ("interrupted", "stopped by SIGTERM")
    n_committed = len(ids_before)
    assert 0 < n_committed < N_IMAGES, f"expected a partial embed, found {n_committed} embeddings"

    rerun = subprocess.run([sys.executable, "-m", "atlasgen.cli", "embed", "--out", str(out)],
                           capture_output=True, text=True, env=ENV, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "embed: resuming an unfinished run (interrupted)" in rerun.stderr, rerun.stderr[-2000:]
    with Store.open(out, read_only=True) as store:
        summary = store.stage_row("embed")["summary"]
    assert summary["n_resumed"] == n_committed and summary["n_embedded"] == N_IMAGES - n_committed


# --- serve -----------------------------------------------------------------------------------------------------
def test_serve_stops_cleanly_on_sigterm(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<title>x</title>")
    proc = subprocess.Popen([sys.executable, "-m", "atlasgen.cli", "serve", "--out", str(tmp_path), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert "serving" in proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and stdout.strip() == "stopped by SIGTERM", (proc.returncode, stdout, stderr)
    assert "Traceback" not in stderr, stderr
