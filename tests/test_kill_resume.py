"""Killing a real `atlasgen build` (SIGKILL) in the middle of embed, then rerunning: the committed
chunks survive and are not redone, and the rerun finishes the rest."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from atlasgen.store import Store
from atlasgen.testing import descendants, wait_gone

N_IMAGES = 480


def test_killed_mid_embed_resumes_without_redoing_finished_chunks(tmp_path):
    config = tmp_path / "atlas.toml"
    # Small chunks and batches so the kill lands between commits.
    config.write_text(f"[ingest]\nn_tiny_images = {N_IMAGES}\n[embed]\nbatch_size = 4\nchunk_size = 8\nn_threads = 1\n")
    out = tmp_path / "build"
    cmd = [sys.executable, "-m", "atlasgen.cli", "build", "--preset", "tiny", "--config", str(config), "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    progress = {"n": 0, "tail": b""}

    def watch():
        buffer = b""
        while True:
            chunk = proc.stderr.read1(4096) if hasattr(proc.stderr, "read1") else proc.stderr.read(64)
            if not chunk:
                return
            buffer = progress["tail"] = (buffer + chunk)[-4096:]
            found = re.findall(rb"embed[^\r\n]*?(\d+)/" + str(N_IMAGES).encode(), buffer)
            if found:
                progress["n"] = int(found[-1])

    threading.Thread(target=watch, daemon=True).start()
    deadline = time.time() + 300
    while progress["n"] < 64 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the build ended before it could be killed mid-embed: {progress['tail'][-800:]!r}"
    assert progress["n"] >= 64, "embed progress never reached 64 images"
    workers = descendants(proc.pid)
    assert len(workers) >= 2, "embed decodes in worker processes (forked by a supervisor)"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The workers notice that their parent is gone and exit (they must not linger, decoding or waiting).
    assert wait_gone(workers, 10), "worker processes outlived the killed build"

    with Store.open(out, read_only=True) as store:
        assert store.stage_row("embed")["status"] == "running"
        ids_before, emb_before = store.embeddings()
    n_committed = len(ids_before)
    assert 0 < n_committed < N_IMAGES, f"expected a partial embed, found {n_committed} embeddings"

    rerun = subprocess.run([sys.executable, "-m", "atlasgen.cli", "embed", "--out", str(out), "--quiet"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    with Store.open(out, read_only=True) as store:
        summary = store.stage_row("embed")["summary"]
        ids_after, emb_after = store.embeddings()
    assert summary["n_resumed"] == n_committed and summary["n_embedded"] == N_IMAGES - n_committed
    assert len(ids_after) == N_IMAGES
    keep = np.isin(ids_after, ids_before)
    np.testing.assert_array_equal(emb_after[keep], emb_before), "finished chunks were recomputed or changed"
