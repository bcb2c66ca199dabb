"""Stage `train`: fit the sparse autoencoder on the store's embeddings, as in the seed study
(Bricken et al. 2023 recipe): ReLU, L1 penalty, unit-norm decoder rows, Adam with linear warm-up and
periodic resampling of dead features.

Loss (per batch, on normalised inputs x with E‖x‖² = d_in):
    mse = mean over examples and dims of (x̂ − x)²          (so predicting 0 gives mse ≈ 1 ≈ fvu)
    l1  = mean over examples of Σ_f a_f · ‖W_dec[f]‖         (the norms are kept at 1)
    loss = mse + l1_coeff · l1

The forward and backward passes are written out by hand (`sae_step`) rather than left to autograd:
that lets the three big (batch × n_features) matrix products run in bf16 with fp32 master weights,
and touches each (batch × n_features) matrix only a few times. `benchmarks/sae.py` measures the gain
against a plain autograd loop; `tests/test_sae.py` checks the gradients against autograd.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch

from .. import progress
from ..config import TrainConfig, config_hash, config_json
from ..errors import AtlasError, StageInputError
from ..model import bf16_is_fast, resolve_device
from ..sae import SparseAutoencoder
from ..store import Store
from ..threads import n_cores, restore_torch_threads
from .base import Stage

# Inputs scored (per-example reconstruction loss) when choosing where to resample dead features.
N_RESAMPLE_CANDIDATES = 65_536
# Below this many (batch × features) entries bf16 gains nothing on a CPU, and fp32 is more exact.
MIN_BF16_ENTRIES = 1 << 20
# Below this many (batch × features) entries per step, train on one thread (see `_threads_for`).
MIN_PARALLEL_ENTRIES = 1 << 20
# Batch size used for whole-corpus evaluation (does not change results).
EVAL_BATCH = 4096


def run(cfg: TrainConfig, store: Store) -> dict:
    ids_n, emb_nd = store.embeddings()
    if len(ids_n) == 0:
        raise StageInputError("the store has no embeddings to train the SAE on",
                              "run `atlasgen embed` (or `atlasgen build`) first")
    if not np.isfinite(emb_nd).all():
        raise AtlasError("some embeddings are NaN or infinite, so the SAE cannot be trained",
                         "re-run `atlasgen embed --force` (try --device cpu or precision fp32)")
    run_id = make_run_id(cfg, emb_nd)
    device = resolve_device(cfg.device)
    with _threads_for(cfg, emb_nd.shape[1]):
        sae, history, info = train_sae(cfg, emb_nd, device)
        final = evaluate(sae, emb_nd, device)
    if not all(math.isfinite(v) for v in final.values()):
        raise AtlasError(f"SAE training diverged (final mse {final['mse']})",
                         "lower [train] lr, or raise warmup_steps")
    folder = store.paths.sae_dir(run_id)
    sae.cpu().save(folder, extra_config={
        "run_id": run_id, "train_config": dataclasses.asdict(cfg), "precision": info["precision"],
        "n_examples": int(len(emb_nd)),
        "normalization": {"mean": sae.input_mean.tolist(), "scale": float(sae.input_scale),
                          "rule": "x = (embedding - mean) * scale, with E|x|^2 = d_in on the training corpus"}})
    weights_path = (folder / "sae.safetensors").relative_to(store.paths.out_dir).as_posix()
    store.save_sae_run({"run_id": run_id, "d_in": sae.d_in, "n_features": sae.n_features,
                        "config_json": config_json(cfg), "weights_path": weights_path, "n_steps": cfg.n_steps,
                        "n_resampled": info["n_resampled"], **{k: final[k] for k in ("mse", "fvu", "l0", "dead_fraction")}},
                       history)
    return {"run_id": run_id, "n_examples": int(len(emb_nd)), "n_features": sae.n_features,
            "precision": info["precision"], "examples_per_s": info["examples_per_s"],
            "n_resampled": info["n_resampled"], **{k: round(v, 5) for k, v in final.items()}}


def make_run_id(cfg: TrainConfig, emb_nd: np.ndarray) -> str:
    """Config hash chained with a digest of the embeddings it was trained on."""
    digest = hashlib.sha256(np.ascontiguousarray(emb_nd, dtype=np.float32).tobytes()).hexdigest()[:16]
    return config_hash(cfg, (digest, str(len(emb_nd))))


@contextmanager
def _threads_for(cfg: TrainConfig, d_in: int):
    """All cores for a real-size SAE; one thread for small ones, where thread hand-offs cost more than
    the tiny matrix products (6x slower on a busy 2-core machine)."""
    big = cfg.batch_size * cfg.expansion * d_in >= MIN_PARALLEL_ENTRIES
    with restore_torch_threads():
        torch.set_num_threads(n_cores() if big else 1)
        yield


def fit_normalization(emb_nd: np.ndarray) -> tuple[np.ndarray, float]:
    """Corpus mean and the scalar scale that makes E‖(emb − mean)·scale‖² = d_in."""
    emb64 = emb_nd.astype(np.float64)
    mean_d = emb64.mean(axis=0)
    mean_sq_norm = float(((emb64 - mean_d) ** 2).sum(axis=1).mean())
    if not mean_sq_norm > 1e-12:
        raise AtlasError("all embeddings are identical, so there is nothing for the SAE to learn",
                         "check the corpus (ingest) and the model (embed)")
    return mean_d.astype(np.float32), math.sqrt(emb_nd.shape[1] / mean_sq_norm)


def choose_dtype(precision: str, device: torch.device, batch_size: int, n_features: int) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    fast = bf16_is_fast(device) and batch_size * n_features >= MIN_BF16_ENTRIES
    return torch.bfloat16 if fast else torch.float32


def sae_step(sae: SparseAutoencoder, x_bd: torch.Tensor, l1_coeff: float, dtype: torch.dtype) -> dict:
    """One forward + backward pass by hand: sets `.grad` on every parameter and returns the batch's
    metrics (floats) and which features fired (`fired_f`, bool).

    Matrix products run in `dtype` (bf16 or fp32); the reconstruction error, the loss and every
    gradient handed to the optimiser are fp32."""
    n_batch, d_in = x_bd.shape
    W_enc, W_dec = sae.W_enc.detach().to(dtype), sae.W_dec.detach().to(dtype)
    b_dec = sae.b_dec.detach()
    # Column sums as (1 × batch) @ (batch × features) products: ~10x cheaper than reductions over the
    # big matrix on CPU (which convert bf16 to fp32 or materialise masks).
    ones_1b = torch.ones(1, n_batch, dtype=dtype, device=x_bd.device)
    xc_bd = (x_bd - b_dec).to(dtype)
    acts_bf = torch.addmm(sae.b_enc.detach().to(dtype), xc_bd, W_enc).relu_()
    recon_bd = (acts_bf @ W_dec).float() + b_dec
    err_bd = recon_bd - x_bd
    sq_err = float(err_bd.pow(2).sum())
    # Activations are ≥ 0, so sign() is the fired indicator; per-feature counts as a product are ~3x
    # cheaper than count_nonzero (in bf16 they are rounded to 3 digits: fine for the logged L0).
    act_sum_f = (ones_1b @ acts_bf).float().squeeze(0)
    n_fired_f = (ones_1b @ torch.sign(acts_bf)).float().squeeze(0)
    # L1 weighted by decoder norms: the norms are 1, and the gradient of the norm factor is parallel to
    # the decoder rows, which `project_decoder_grad` removes anyway; so plain Σ a_f is exact here.
    l1 = float(act_sum_f.sum()) / n_batch

    g_recon_bd = err_bd * (2.0 / (n_batch * d_in))
    g_recon_lp = g_recon_bd.to(dtype)
    grad_W_dec = (acts_bf.t() @ g_recon_lp).float()
    # d loss / d acts = reconstruction part + the L1 slope, added as the product's bias (fused).
    l1_slope_f = torch.full((sae.n_features,), l1_coeff / n_batch, dtype=dtype, device=x_bd.device)
    g_acts_bf = torch.addmm(l1_slope_f, g_recon_lp, W_dec.t())
    g_pre_bf = torch.ops.aten.threshold_backward(g_acts_bf, acts_bf, 0)
    del g_acts_bf
    grad_W_enc = (xc_bd.t() @ g_pre_bf).float()
    grad_b_enc = (ones_1b @ g_pre_bf).float().squeeze(0)
    grad_b_dec = g_recon_bd.sum(dim=0) - sae.W_enc.detach() @ grad_b_enc
    sae.W_enc.grad, sae.b_enc.grad, sae.W_dec.grad, sae.b_dec.grad = grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec

    sq_norm = float(x_bd.pow(2).sum())
    mse = sq_err / (n_batch * d_in)
    return {"mse": mse, "fvu": sq_err / max(sq_norm, 1e-12), "l1": l1,
            "l0": float(n_fired_f.sum()) / n_batch, "fired_f": n_fired_f > 0, "loss": mse + l1_coeff * l1}


@torch.no_grad()
def project_decoder_grad(sae: SparseAutoencoder) -> None:
    """Remove the gradient component parallel to each (unit) decoder row, so the step mostly rotates
    rows and the renormalisation after it changes little (as in Anthropic's setup)."""
    W, G = sae.W_dec.detach(), sae.W_dec.grad
    G.sub_((G * W).sum(dim=1, keepdim=True) * W)


def make_optimizer(sae: SparseAutoencoder, lr: float) -> torch.optim.Adam:
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    try:
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True)
    except (RuntimeError, TypeError):  # fused Adam missing for this device/build
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))


def batch_indices(n: int, batch_size: int, n_steps: int, generator: torch.Generator):
    """Shuffled epochs over the corpus, concatenated; every example is seen once per epoch."""
    pool = torch.empty(0, dtype=torch.long)
    for _ in range(n_steps):
        while len(pool) < batch_size:
            pool = torch.cat([pool, torch.randperm(n, generator=generator)])
        idx, pool = pool[:batch_size], pool[batch_size:]
        yield idx


@torch.no_grad()
def resample_dead(sae: SparseAutoencoder, opt: torch.optim.Adam, dead_idx: torch.Tensor, x_nd: torch.Tensor,
                  generator: torch.Generator) -> None:
    """Bricken et al. 2023: re-initialise dead features at inputs the SAE reconstructs badly."""
    n_dead = len(dead_idx)
    if n_dead == 0:
        return
    n = len(x_nd)
    cand = torch.randperm(n, generator=generator)[:N_RESAMPLE_CANDIDATES].to(x_nd.device)
    losses = []
    for chunk in cand.split(EVAL_BATCH):
        x = x_nd[chunk]
        recon, _ = sae(x)
        losses.append((recon - x).pow(2).sum(dim=1))
    loss_n = torch.cat(losses).double().cpu()
    weights_n = loss_n.pow(2)
    if not float(weights_n.sum()) > 0:
        weights_n = torch.ones_like(weights_n)
    replace = n_dead > int((weights_n > 0).sum())
    picks = torch.multinomial(weights_n, n_dead, replacement=replace, generator=generator)
    inputs_kd = x_nd[cand[picks.to(cand.device)]]
    unit_kd = inputs_kd / inputs_kd.norm(dim=1, keepdim=True).clamp_min(1e-8)
    alive = torch.ones(sae.n_features, dtype=torch.bool, device=dead_idx.device)
    alive[dead_idx] = False
    enc_norms_f = sae.W_enc.norm(dim=0)
    mean_alive_norm = float(enc_norms_f[alive.to(enc_norms_f.device)].mean()) if bool(alive.any()) else 1.0
    dead_idx = dead_idx.to(sae.W_dec.device)
    sae.W_dec[dead_idx] = unit_kd
    sae.W_enc[:, dead_idx] = unit_kd.t() * (0.2 * mean_alive_norm)
    sae.b_enc[dead_idx] = 0.0
    for param, dim in ((sae.W_dec, 0), (sae.W_enc, 1), (sae.b_enc, 0)):
        state = opt.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].index_fill_(dim, dead_idx, 0.0)


def init_sae(d_in: int, n_features: int, generator: torch.Generator) -> SparseAutoencoder:
    """Random unit decoder rows, encoder = decoder transpose scaled by 2·d_in / n_features.

    With a tied encoder about half the features fire on any input and Σ relu(x·w_f) w_f ≈
    (n_features / 2·d_in) x; the scale makes the first reconstruction about the size of x instead of
    16x too big at 32x expansion, which otherwise costs hundreds of steps to undo."""
    sae = SparseAutoencoder(d_in, n_features)
    sae.reset_parameters(generator)
    with torch.no_grad():
        sae.W_enc.mul_(min(1.0, 2.0 * d_in / n_features))
    return sae


def train_sae(cfg: TrainConfig, emb_nd: np.ndarray, device: torch.device,
              on_init: Callable[[SparseAutoencoder], None] | None = None) -> tuple[SparseAutoencoder, list[dict], dict]:
    """Train an SAE; returns it (normalisation set), the per-window metrics and a small info dict.

    `on_init` may change the freshly initialised SAE (under no_grad) before training starts, e.g. to start
    from chosen weights; `atlasgen.testing.disable_features` uses it to make features dead on purpose."""
    with _threads_for(cfg, emb_nd.shape[1]):
        return _train_sae(cfg, emb_nd, device, on_init)


def _train_sae(cfg: TrainConfig, emb_nd: np.ndarray, device: torch.device,
               on_init: Callable[[SparseAutoencoder], None] | None) -> tuple[SparseAutoencoder, list[dict], dict]:
    import time
    n, d_in = emb_nd.shape
    n_features = cfg.expansion * d_in
    mean_d, scale = fit_normalization(emb_nd)
    generator = torch.Generator().manual_seed(cfg.seed)
    sae = init_sae(d_in, n_features, generator)
    with torch.no_grad():
        sae.input_mean.copy_(torch.from_numpy(mean_d))
        sae.input_scale.fill_(scale)
        if on_init is not None:
            on_init(sae)
    sae.to(device)
    x_nd = sae.normalize(torch.from_numpy(emb_nd).to(device)).detach()
    dtype = choose_dtype(cfg.precision, device, cfg.batch_size, n_features)
    opt = make_optimizer(sae, cfg.lr)
    last_fired_f = torch.zeros(n_features, dtype=torch.long, device=device)
    resample_last = int(cfg.resample_until * cfg.n_steps)
    history: list[dict] = []
    window = {"mse": 0.0, "fvu": 0.0, "l1": 0.0, "l0": 0.0, "n": 0, "n_resampled": 0}
    n_resampled_total = 0
    t0 = time.perf_counter()
    bar = progress.bar(total=cfg.n_steps, desc="train SAE", unit="step")
    for step, idx in enumerate(batch_indices(n, cfg.batch_size, cfg.n_steps, generator), start=1):
        lr = cfg.lr * min(1.0, step / max(cfg.warmup_steps, 1))
        for group in opt.param_groups:
            group["lr"] = lr
        metrics = sae_step(sae, x_nd[idx.to(device)], cfg.l1_coeff, dtype)
        project_decoder_grad(sae)
        opt.step()
        sae.normalize_decoder()
        last_fired_f[metrics["fired_f"]] = step
        for key in ("mse", "fvu", "l1", "l0"):
            window[key] += metrics[key]
        window["n"] += 1
        if cfg.resample_every and step % cfg.resample_every == 0 and step <= resample_last:
            dead_idx = torch.nonzero(step - last_fired_f >= cfg.dead_window).flatten()
            resample_dead(sae, opt, dead_idx, x_nd, generator)
            last_fired_f[dead_idx] = step
            window["n_resampled"] += len(dead_idx)
            n_resampled_total += len(dead_idx)
        if step % cfg.log_every == 0 or step == cfg.n_steps:
            k = window["n"]
            row = {"step": step, **{key: window[key] / k for key in ("mse", "fvu", "l1", "l0")},
                   "dead_fraction": float((step - last_fired_f >= cfg.dead_window).float().mean()),
                   "lr": lr, "n_resampled": window["n_resampled"]}
            history.append(row)
            bar.set_postfix(loss=f"{row['mse'] + cfg.l1_coeff * row['l1']:.4f}", mse=f"{row['mse']:.4f}",
                            l0=f"{row['l0']:.1f}", dead=f"{row['dead_fraction']:.2f}")
            window = {"mse": 0.0, "fvu": 0.0, "l1": 0.0, "l0": 0.0, "n": 0, "n_resampled": 0}
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    sae.eval()
    return sae, history, {"precision": "bf16" if dtype == torch.bfloat16 else "fp32",
                          "n_resampled": n_resampled_total,
                          "examples_per_s": round(cfg.n_steps * cfg.batch_size / max(seconds, 1e-9), 1)}


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, emb_nd: np.ndarray, device: torch.device) -> dict:
    """Whole-corpus metrics in fp32, without the inference top-k cap."""
    sae = sae.to(device)
    sq_err = sq_norm = 0.0
    n_active = 0
    fired_f = torch.zeros(sae.n_features, dtype=torch.bool, device=device)
    emb = torch.from_numpy(emb_nd)
    for chunk in emb.split(EVAL_BATCH):
        x = sae.normalize(chunk.to(device))
        recon, acts = sae(x)
        sq_err += float((recon - x).pow(2).sum())
        sq_norm += float(x.pow(2).sum())
        positive = acts > 0
        n_active += int(positive.sum())
        fired_f |= positive.any(dim=0)
    n, d_in = emb_nd.shape
    return {"mse": sq_err / (n * d_in), "fvu": sq_err / max(sq_norm, 1e-12), "l0": n_active / n,
            "dead_fraction": float((~fired_f).float().mean())}


SPEC = Stage("train", TrainConfig, run, inputs=("embed",), tables=("sae_runs", "sae_metrics"),
             folders=("sae_root",))
