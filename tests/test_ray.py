"""The executor seam and embed/render on a local Ray (2 CPUs, the tiny preset): the same store as the local
executor, a worker killed mid-render, a driver SIGKILLed mid-render, and the clear errors around them.

Ray starts once for the module (a module fixture); every test that needs it joins that one.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from atlasgen.cli import app
from atlasgen.config import RunConfig, load_config
from atlasgen.errors import AtlasError
from atlasgen.pipeline import run_stages
from atlasgen.progress import set_quiet
from atlasgen.stages import render
from atlasgen.store import Store

try:
    import ray  # noqa: F401
    HAS_RAY = True
except ImportError:
    HAS_RAY = False
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (pip install 'atlasgen[ray]' or '.[test]')")

# A small render of the tiny atlas: 8 features, 1 image, 2 pairs (the top co-activating and the most similar:
# sum, 3 slerps, 2 orth each) and the 3-variant ablation: 24 targets in 9 units (5 of 4, 1 of 1, 3 ablation).
SMALL_RENDER = ('[render]\nfeatures = "top:8"\nn_seeds = 1\nn_steps = 6\nbatch_targets = 4\nn_auto_images = 1\n'
                'n_auto_pairs = 1\nslerp_steps = 3\nn_threads = 1\n')


# One thread, as a 1-CPU Ray worker has (on a shared 2-core machine more threads are slower anyway).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray with 2 CPUs, started once for the module; yields its address (for other processes)."""
    import ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix sockets live under it
    # Workers at normal priority (Ray's default nice 15 starves them on a busy CI machine).
    ray.init(num_cpus=2, _temp_dir=temp_dir, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 1024 ** 2, _system_config={"worker_niceness": 0})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _render_rows(out: Path) -> dict[str, tuple]:
    with Store.open(out, read_only=True) as store:
        rows = store.query("SELECT render_id, kind, feature_a, feature_b, image_id, t, seed, variant, path, cosine, "
                           "self_activation, self_rank FROM renders")
    return {r[0]: r[1:] for r in rows}


def _picture(out: Path, rel: str) -> np.ndarray:
    with Image.open(out / rel) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


@needs_ray
def test_ray_store_equals_local_even_with_a_worker_killed_mid_render(ray_cluster, tiny_encoded, tmp_path,
                                                                   monkeypatch):
    from atlasgen.executor import RayExecutor
    set_quiet(True)
    config = tmp_path / "small.toml"
    config.write_text(SMALL_RENDER)
    cfg = load_config("tiny", config)

    local = _copy(tiny_encoded, tmp_path / "local")
    with Store.open(local) as store:
        local_summary = run_stages(cfg, store, ["render"])["render"]

    on_ray = _copy(tiny_encoded, tmp_path / "ray")
    executor = RayExecutor(RunConfig(executor="ray", ray_n_workers=2))
    try:
        executor.workers("auto")
        pids_before = executor.worker_pids()
        with Store.open(on_ray) as store:
            # embed again (forced), on the workers, images sent as bytes: the embeddings the local embed made
            local_ids, local_emb = store.embeddings()
            embed_summary = run_stages(cfg, store, ["embed"], force=True, executor=executor)["embed"]
            ray_ids, ray_emb = store.embeddings()
            assert embed_summary["executor"] == "ray" and embed_summary["n_embedded"] == len(local_ids)
            np.testing.assert_array_equal(ray_ids, local_ids)
            np.testing.assert_allclose(ray_emb, local_emb, rtol=1e-4, atol=1e-4)

            # render on the workers, SIGKILLing one of them as soon as the first unit is committed (both have
            # a unit running and one queued then): Ray restarts it and retries its units
            saves = Counter()
            real_save = render.save_unit

            def save_then_kill_one(store_, unit, *args, **kwargs):
                saves[unit[0].render_id] += 1
                real_save(store_, unit, *args, **kwargs)
                if sum(saves.values()) == 1:
                    os.kill(pids_before[0], signal.SIGKILL)

            monkeypatch.setattr(render, "save_unit", save_then_kill_one)
            ray_summary = run_stages(cfg, store, ["render"], executor=executor)["render"]
        pids_after = executor.worker_pids()
    finally:
        executor.close()

    assert pids_before[0] not in pids_after and pids_before[1] in pids_after, "the killed worker was restarted"
    assert ray_summary["executor"] == "ray" and ray_summary["n_workers"] == 2
    assert ray_summary["n_rendered"] == ray_summary["n_planned"] == local_summary["n_planned"] == 24
    assert len(saves) == 9 and set(saves.values()) == {1}, f"every unit is recorded exactly once: {saves}"

    local_rows, ray_rows = _render_rows(local), _render_rows(on_ray)
    assert set(ray_rows) == set(local_rows), "the same render ids"
    for render_id, row in local_rows.items():
        other = ray_rows[render_id]
        assert other[:8] == row[:8], "kind, features, image, t, seed, variant and path agree"
        assert abs(other[8] - row[8]) < 1e-3, f"cosine {other[8]} vs {row[8]}"
        assert (other[9] is None) == (row[9] is None) and (row[9] is None or abs(other[9] - row[9]) < 1e-3)
        diff = np.abs(_picture(on_ray, other[7]) - _picture(local, row[7]))
        assert diff.mean() < 0.5 and diff.max() <= 8, f"pictures differ: mean {diff.mean():.3f}, max {diff.max()}"


@needs_ray
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_driver_killed_mid_render_resumes_without_redoing(ray_cluster, tiny_encoded, tmp_path, sig):
    """SIGKILL leaves the stage running; SIGTERM (a scheduler's) stops it as Ctrl-C does, although ray.init set
    its own handler: exit 143, one line, the stage interrupted. Either way the rerun redoes nothing finished."""
    out = _copy(tiny_encoded, tmp_path / "build")
    config = tmp_path / "small.toml"
    # 16 feature targets in 8 units of 2, nothing else: small units, so the kill lands between commits. One
    # worker is enough here (and starts sooner on a busy machine).
    config.write_text('[render]\nfeatures = "top:16"\nn_seeds = 1\nn_steps = 8\nbatch_targets = 2\n'
                      'n_auto_images = 0\nn_auto_pairs = 0\nablation = false\n[run]\nray_n_workers = 1\n')
    n_planned = 16
    cmd = [sys.executable, "-m", "atlasgen.cli", "render", "--preset", "tiny", "--config", str(config),
           "--out", str(out), "--executor", "ray", "--ray-address", ray_cluster]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    progress = {"n": 0, "tail": b""}

    def watch():
        buffer = b""
        while True:
            chunk = proc.stderr.read1(4096)
            if not chunk:
                return
            buffer = progress["tail"] = (buffer + chunk)[-4096:]
            found = re.findall(rb"render[^\r\n]*?(\d+)/" + str(n_planned).encode(), buffer)
            if found:
                progress["n"] = int(found[-1])

    threading.Thread(target=watch, daemon=True).start()
    deadline = time.time() + 240
    # Progress counts a unit just before committing it: at 4 targets the first unit (2) is surely committed.
    while progress["n"] < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"render ended before it could be killed: {progress['tail'][-800:]!r}"
    proc.send_signal(sig)
    code = proc.wait(timeout=60)

    with Store.open(out, read_only=True) as store:
        stage_row = store.stage_row("render")
    if sig == signal.SIGKILL:
        assert stage_row["status"] == "running"
    else:
        time.sleep(0.1)  # the watcher reads the last bytes
        tail = progress["tail"].decode(errors="replace")
        assert code == 143 and "error: stopped by SIGTERM" in tail and "Traceback" not in tail, (code, tail[-2000:])
        assert (stage_row["status"], stage_row["error"]) == ("interrupted", "stopped by SIGTERM")
    before = _render_rows(out)
    mtimes = {rid: os.stat(out / row[7]).st_mtime_ns for rid, row in before.items()}
    assert 2 <= len(before) < n_planned, f"expected a partial render, found {len(before)} renders"

    # The rerun joins the same cluster (this process's Ray) through the CLI.
    rerun = CliRunner().invoke(app, ["render", "--preset", "tiny", "--config", str(config), "--out", str(out),
                                     "--executor", "ray", "--quiet"])
    assert rerun.exit_code == 0, rerun.output
    with Store.open(out, read_only=True) as store:
        summary = store.stage_row("render")["summary"]
    after = _render_rows(out)
    assert summary["n_planned"] == n_planned and summary["n_rendered"] == n_planned - len(before)
    assert len(after) == n_planned and all(after[rid] == row for rid, row in before.items())
    assert all(os.stat(out / before[rid][7]).st_mtime_ns == m for rid, m in mtimes.items()), \
        "committed pictures were written again"


# --- without a cluster ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_packed_model_and_sae_rebuild_the_same_functions(tiny_model, precision):
    """What travels through Ray's object store (numpy weights, bf16 as its bit patterns) builds back the same
    model and SAE: equal outputs, not just close ones."""
    from atlasgen.executor import PackedModel, PackedSAE
    from atlasgen.model import EmbeddingModel
    from atlasgen.sae import SparseAutoencoder
    import copy
    # A copy: EmbeddingModel casts the backbone in place, and the session's tiny model must stay fp32.
    model = EmbeddingModel(copy.deepcopy(tiny_model.backbone), tiny_model.spec,
                           getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[precision]))
    rebuilt = PackedModel.pack(model).build(torch.device("cpu"))
    assert rebuilt.dtype == model.dtype
    pixels = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(pixels), model(pixels))
    sae = SparseAutoencoder(96, 40)
    sae.reset_parameters(torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.input_mean.normal_()
        emb = torch.randn(5, 96)
        assert torch.equal(PackedSAE.pack(sae).build(torch.device("cpu")).encode_embeddings(emb),
                           sae.encode_embeddings(emb))


def test_embed_unit_reads_bytes_as_it_reads_files(tiny_encoded, tiny_model):
    """A worker that gets the JPEG bytes (no shared corpus) embeds exactly what one reading the files does."""
    from atlasgen.stages.embed import EmbedUnit, EmbedWorker, _with_bytes, embed_unit
    with Store.open(tiny_encoded, read_only=True) as store:
        rows = store.query("SELECT image_id, corpus_path FROM images ORDER BY image_id LIMIT 6")
    unit = EmbedUnit([r[0] for r in rows], [r[1] for r in rows], str(tiny_encoded))
    unit.image_ids.append(999)
    unit.corpus_paths.append("corpus/missing.jpg")  # unreadable: skipped either way, with the same reason
    worker = EmbedWorker(tiny_model, "cpu", batch_size=4, n_decode_threads=2)
    from_files = embed_unit(worker, unit)
    from_bytes = embed_unit(worker, _with_bytes(unit))
    assert list(from_files.image_ids) == list(from_bytes.image_ids) == [r[0] for r in rows]
    assert np.array_equal(from_files.emb_nd, from_bytes.emb_nd)
    assert from_files.skipped == from_bytes.skipped and "corpus/missing.jpg" in from_files.skipped[0][1]


def test_executor_without_ray_installed_is_one_clear_line(tmp_path, monkeypatch):
    from atlasgen import executor
    monkeypatch.setattr(executor, "ray_available", lambda: False)
    result = CliRunner().invoke(app, ["build", "--preset", "tiny", "--out", str(tmp_path), "--executor", "ray"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "needs Ray" in result.output and "pip install 'atlasgen[ray]'" in result.output
    with Store.open(tmp_path, read_only=True) as store:
        assert store.stage_row("ingest") is None, "it fails before any stage runs"


def test_run_options_are_checked_and_leave_the_stage_hashes_alone(tmp_path, monkeypatch):
    from atlasgen import executor
    bad = CliRunner().invoke(app, ["render", "--out", str(tmp_path), "--executor", "local", "--ray-address", "auto"])
    assert bad.exit_code == 2 and "--ray-address needs --executor ray" in bad.output
    # Nobody listens there: one line at once, before any stage (not minutes of Ray retrying).
    monkeypatch.setattr(executor, "ray_available", lambda: True)
    bad = CliRunner().invoke(app, ["build", "--preset", "tiny", "--out", str(tmp_path), "--ray-address", "127.0.0.1:1"])
    assert bad.exit_code == 2 and "no Ray cluster answers at 127.0.0.1:1" in bad.output
    with Store.open(tmp_path, read_only=True) as store:
        assert store.stage_row("ingest") is None
    bad = CliRunner().invoke(app, ["embed", "--preset", "tiny", "--out", str(tmp_path), "--executor", "spark"])
    assert bad.exit_code == 2 and "[run] executor = 'spark'" in bad.output and "Traceback" not in bad.output
    user = tmp_path / "atlas.toml"
    user.write_text('[run]\nexecutor = "ray"\nray_address = "10.0.0.5:6379"\nray_n_workers = 3\n')
    on_ray, local = load_config("tiny", user), load_config("tiny")
    assert on_ray.run == RunConfig(executor="ray", ray_address="10.0.0.5:6379", ray_n_workers=3)
    from atlasgen.config import config_hash
    from atlasgen.stages import REGISTRY
    assert all(config_hash(on_ray.stage(s)) == config_hash(local.stage(s)) for s in REGISTRY.names)
    (tmp_path / "typo.toml").write_text("[run]\nexecuter = \"ray\"\n")
    with pytest.raises(AtlasError, match="executer"):
        load_config("tiny", tmp_path / "typo.toml")
