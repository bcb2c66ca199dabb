"""SAE training (atlasgen.stages.train) on planted sparse directions, plus the SAE module itself."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from atlasgen.stages import train
from atlasgen.testing import disable_features, run_stage
from atlasgen.config import TrainConfig, load_config
from atlasgen.errors import AtlasError
from atlasgen.sae import SparseAutoencoder, load_stage_sae
from atlasgen.store import Store

D_IN, N_TRUE, N_SAMPLES = 32, 64, 8192


def planted_data(seed: int = 0, n: int = N_SAMPLES, d: int = D_IN, n_true: int = N_TRUE, k: float = 3.0):
    """Each sample: a sparse non-negative mix of ~k of n_true random unit directions, plus small noise."""
    rng = np.random.default_rng(seed)
    dirs_td = rng.normal(size=(n_true, d))
    dirs_td /= np.linalg.norm(dirs_td, axis=1, keepdims=True)
    on_nt = rng.random((n, n_true)) < k / n_true
    coef_nt = on_nt * rng.uniform(0.5, 1.5, size=(n, n_true))
    emb_nd = coef_nt @ dirs_td + 0.01 * rng.normal(size=(n, d)) + 0.3  # offset: a non-zero corpus mean
    return emb_nd.astype(np.float32), dirs_td.astype(np.float32)


def small_config(**changes) -> TrainConfig:
    base = dict(expansion=4, l1_coeff=0.05, lr=3e-3, warmup_steps=50, n_steps=1500, batch_size=256,
                dead_window=200, resample_every=300, resample_until=0.6, log_every=50, seed=0,
                precision="fp32", device="cpu")
    base.update(changes)
    return TrainConfig(**base)


def store_with(tmp_path, emb_nd) -> Store:
    store = Store.open(tmp_path / "out")
    with store.transaction():
        store.insert_embeddings(np.arange(len(emb_nd)), emb_nd)
    return store


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """One training run through `train.run` on planted data, shared by the checks below."""
    emb_nd, dirs_td = planted_data()
    store = store_with(tmp_path_factory.mktemp("planted"), emb_nd)
    summary = run_stage(store, small_config())
    yield store, summary, emb_nd, dirs_td
    store.close()


def test_recovers_planted_directions(planted_run):
    store, summary, _, dirs_td = planted_run
    sae = load_stage_sae(store, "train")[0]
    cos_tf = torch.from_numpy(dirs_td) @ sae.feature_directions().t()
    best_t = cos_tf.max(dim=1).values
    recovered = float((best_t > 0.9).float().mean())
    assert recovered >= 0.8, f"only {recovered:.0%} of planted directions found (max cosines {best_t})"
    assert summary["fvu"] < 0.25, summary


def test_mse_falls_and_metrics_are_logged(planted_run):
    store, summary, _, _ = planted_run
    rows = store.query("SELECT step, mse, fvu, l1, l0, dead_fraction, lr, n_resampled FROM sae_metrics "
                       "WHERE run_id = ? ORDER BY step", [summary["run_id"]])
    assert len(rows) == 1500 // 50
    first, last = rows[0], rows[-1]
    assert last[1] < 0.6 * first[1], f"mse did not fall: {first[1]} → {last[1]}"
    assert rows[-1][6] == pytest.approx(3e-3)
    assert all(0 <= r[5] <= 1 and r[4] > 0 for r in rows)
    run = store.query("SELECT d_in, n_features, n_steps, mse, fvu, l0, dead_fraction, n_resampled, weights_path "
                      "FROM sae_runs")
    assert len(run) == 1
    d_in, n_features, n_steps, mse, fvu, l0, dead, n_res, weights_path = run[0]
    assert (d_in, n_features, n_steps) == (D_IN, 4 * D_IN, 1500)
    assert 0 < fvu < 0.25 and 0 < l0 < 20 and 0 <= dead < 1
    assert n_res == sum(r[7] for r in rows)
    assert (store.paths.out_dir / weights_path).exists()


def test_decoder_rows_unit_norm_and_normalisation(planted_run):
    store, _, emb_nd, _ = planted_run
    sae = load_stage_sae(store, "train")[0]
    norms = sae.W_dec.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
    x = sae.normalize(torch.from_numpy(emb_nd))
    assert abs(float(x.pow(2).sum(dim=1).mean()) - D_IN) < 0.01 * D_IN
    assert float(x.mean(dim=0).abs().max()) < 1e-3
    config = json.loads((store.paths.sae_dir(store.sae_run_used_by("train")["run_id"]) / "sae.json").read_text())
    assert config["train_config"]["expansion"] == 4 and len(config["normalization"]["mean"]) == D_IN


def test_manual_gradients_match_autograd():
    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 48)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    x = torch.randn(64, 16)
    l1_coeff = 0.01
    metrics = train.sae_step(sae, x, l1_coeff, torch.float32)
    manual = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad(set_to_none=True)
    recon, acts = sae(x)
    loss = (recon - x).pow(2).mean() + l1_coeff * (acts * sae.W_dec.norm(dim=1)).sum(dim=1).mean()
    loss.backward()
    train.project_decoder_grad(sae)  # our L1 drops the decoder-norm factor: equal after projection
    auto_dec = sae.W_dec.grad.clone()
    sae.W_dec.grad = manual["W_dec"]
    train.project_decoder_grad(sae)
    assert metrics["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert torch.allclose(sae.W_dec.grad, auto_dec, atol=1e-6)
    for name in ("W_enc", "b_enc", "b_dec"):
        assert torch.allclose(manual[name], dict(sae.named_parameters())[name].grad, atol=1e-6), name


def test_bf16_step_close_to_fp32():
    torch.manual_seed(1)
    sae = SparseAutoencoder(64, 512)
    x = torch.randn(256, 64)
    m32 = train.sae_step(sae, x, 0.01, torch.float32)
    g32 = sae.W_enc.grad.clone()
    m16 = train.sae_step(sae, x, 0.01, torch.bfloat16)
    assert m16["mse"] == pytest.approx(m32["mse"], rel=0.02)
    cos = torch.nn.functional.cosine_similarity(g32.flatten(), sae.W_enc.grad.flatten(), dim=0)
    assert cos > 0.99


def test_resampling_revives_dead_features(tmp_path):
    emb_nd, _ = planted_data(seed=1, n=4096)
    forced = torch.arange(0, 128, 2)  # half the dictionary starts unable to fire
    cfg = small_config(n_steps=400, dead_window=100, resample_every=150, resample_until=0.5)
    sae, history, info = train.train_sae(cfg, emb_nd, torch.device("cpu"), on_init=disable_features(forced))
    assert info["n_resampled"] >= len(forced)
    assert sum(r["n_resampled"] for r in history) == info["n_resampled"]
    with torch.no_grad():
        acts = sae(sae.normalize(torch.from_numpy(emb_nd)))[1]
    fired = (acts[:, forced] > 0).any(dim=0)
    assert float(fired.float().mean()) > 0.5, f"only {int(fired.sum())}/{len(forced)} forced-dead features fire"
    # Without resampling they stay dead: the check above can fail.
    sae0, _, info0 = train.train_sae(small_config(n_steps=400, resample_every=0), emb_nd, torch.device("cpu"),
                                     on_init=disable_features(forced))
    with torch.no_grad():
        acts0 = sae0(sae0.normalize(torch.from_numpy(emb_nd)))[1]
    assert info0["n_resampled"] == 0 and not bool((acts0[:, forced] > 0).any())


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(2)
    sae = SparseAutoencoder(24, 96)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.input_mean.normal_()
        sae.input_scale.fill_(0.37)
    sae.save(tmp_path / "sae", extra_config={"note": "x"})
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    emb = torch.randn(50, 24)
    assert torch.equal(sae.encode_embeddings(emb, top_k=8), loaded.encode_embeddings(emb, top_k=8))
    assert torch.equal(sae(emb)[0], loaded(emb)[0])
    assert json.loads((tmp_path / "sae" / "sae.json").read_text())["note"] == "x"


def test_seeded_runs_are_identical_and_reset_clears(tmp_path):
    emb_nd, _ = planted_data(seed=3, n=1024)
    store = store_with(tmp_path, emb_nd)
    cfg = small_config(n_steps=60, log_every=20)
    s1 = run_stage(store, cfg)
    w1 = load_stage_sae(store, "train")[0].W_dec.detach().clone()
    s2 = run_stage(store, cfg)
    assert s1["run_id"] == s2["run_id"] and torch.equal(w1, load_stage_sae(store, "train")[0].W_dec.detach())
    assert store.count("sae_runs") == 1 and store.count("sae_metrics") == 3
    lrs = [r[0] for r in store.query("SELECT lr FROM sae_metrics ORDER BY step")]
    assert lrs == pytest.approx([3e-3 * 20 / 50, 3e-3 * 40 / 50, 3e-3])  # linear warm-up over 50 steps
    train.SPEC.reset_outputs(store)
    assert store.count("sae_runs") == 0 and store.count("sae_metrics") == 0
    assert not (store.paths.out_dir / "sae").exists()
    store.close()


def test_empty_store_and_bad_config_are_user_errors(tmp_path):
    store = Store.open(tmp_path / "out")
    with pytest.raises(AtlasError, match="no embeddings"):
        run_stage(store, small_config())
    with store.transaction():
        store.insert_embeddings(np.arange(4), np.ones((4, 8), np.float32))
    with pytest.raises(AtlasError, match="identical"):
        run_stage(store, small_config())
    store.close()
    with pytest.raises(AtlasError, match="precision"):
        load_config("tiny", overrides={"train": {"precision": "fp8"}})


def test_bf16_training_as_good_as_fp32(planted_run):
    _, summary, emb_nd, dirs_td = planted_run
    sae, _, info = train.train_sae(small_config(precision="bf16"), emb_nd, torch.device("cpu"))
    assert info["precision"] == "bf16"
    final = train.evaluate(sae, emb_nd, torch.device("cpu"))
    assert final["fvu"] < 1.1 * summary["fvu"]
    best_t = (torch.from_numpy(dirs_td) @ sae.feature_directions().t()).max(dim=1).values
    assert float((best_t > 0.9).float().mean()) >= 0.8
