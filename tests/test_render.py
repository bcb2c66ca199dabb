"""The render stage and its inversion engine, on the tiny random DINOv3 (seeded, small step counts)."""
from __future__ import annotations

import json
import os
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from atlasgen import inversion
from atlasgen.stages import render
from atlasgen.config import RenderConfig, load_config
from atlasgen.inversion import InversionSettings
from atlasgen.model import arrays_to_batch
from atlasgen.paths import sweep_stale_temps
from atlasgen.progress import set_quiet
from atlasgen.sae import SparseAutoencoder
from atlasgen.testing import record_sae
from atlasgen.store import Store

N_IMAGES, N_FEATURES = 24, 192


# One thread: on a shared 2-core machine OpenMP barriers make 2 threads several times slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Blocky colour images (uint8, n×size×size×3): different enough to give different embeddings."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
    return small.repeat(size // 4, axis=1).repeat(size // 4, axis=2)


@pytest.fixture(scope="module")
def sae_and_emb(tiny_model):
    """A random SAE(96 → 192) whose input mean comes from tiny-model embeddings of generated images."""
    torch.manual_seed(0)
    with torch.no_grad():
        emb_nd = tiny_model(arrays_to_batch(_images(N_IMAGES, 112)))
    sae = SparseAutoencoder(d_in=emb_nd.shape[1], n_features=N_FEATURES)
    sae.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.input_mean.copy_(emb_nd.mean(0))
        sae.input_scale.fill_(float(emb_nd.shape[1] ** 0.5 / (emb_nd - emb_nd.mean(0)).norm(dim=1).mean()))
    return sae, emb_nd


def make_store(out_dir: Path, sae: SparseAutoencoder, emb_nd: torch.Tensor) -> Path:
    """A store with what render reads (as encode leaves it): images, embeddings, a finished embed stage
    with the tiny model, an SAE run, feature stats, co-activation and similar features."""
    with Store.open(out_dir) as store:
        n = emb_nd.shape[0]
        store.insert_frame("images", {"image_id": list(range(n)), "source": [f"gen{i}" for i in range(n)],
                                      "label": [f"c{i % 3}" for i in range(n)], "label_id": [i % 3 for i in range(n)],
                                      "width": [112] * n, "height": [112] * n,
                                      "corpus_path": [f"corpus/{i:08d}.jpg" for i in range(n)]})
        store.insert_embeddings(np.arange(n), emb_nd.numpy())
        store.mark_stage_started("embed", "h", json.dumps({"model": "tiny", "precision": "fp32"}))
        store.mark_stage_done("embed", {})
        record_sae(store, sae, "run0")
        acts_nf = sae.encode_embeddings(emb_nd).detach().numpy()
        n_active = (acts_nf > 0).sum(0)
        store.insert_frame("feature_stats", {"feature_id": list(range(N_FEATURES)), "n_active": n_active.tolist()})
        store.insert_frame("coactivation", {"feature_a": [3, 5], "feature_b": [7, 9], "n_images": [10, 4]})
        store.insert_frame("similar_features", {"feature_id": [11, 12], "rank": [0, 0], "other_id": [12, 11],
                                                "cosine": [0.5, 0.5]})
    return out_dir


def small_cfg(**changes) -> RenderConfig:
    base = dict(features="top:5", n_seeds=1, n_views=2, n_steps=2, batch_targets=4, n_auto_pairs=1, slerp_steps=3,
                n_auto_images=1, precision="fp32", device="cpu")
    base.update(changes)
    return RenderConfig(**base)


# --- the engine ---------------------------------------------------------------------------------------
def test_cosine_to_feature_direction_rises_with_steps(tiny_model, sae_and_emb):
    sae, _ = sae_and_emb
    dirs_bd = sae.feature_directions()[:8]
    centres_bd = sae.input_mean.expand(8, -1)
    settings = InversionSettings(n_views=4, n_steps=0, lr=0.01)
    before = inversion.invert(tiny_model, dirs_bd, list(range(8)), settings, centres_bd=centres_bd)
    after = inversion.invert(tiny_model, dirs_bd, list(range(8)), InversionSettings(n_views=4, n_steps=30, lr=0.01),
                             centres_bd=centres_bd)
    gain_b = after.cosine_b - before.cosine_b
    assert gain_b.mean() > 0.05, f"cosine barely moved: {before.cosine_b} → {after.cosine_b}"
    assert (gain_b > 0).float().mean() >= 0.75
    # The training loss (augmented views) falls too.
    assert after.loss_sb[-5:].mean() < after.loss_sb[:5].mean()


@pytest.mark.parametrize("param", inversion.PARAMS)
def test_parameterisations_make_pictures_in_range(tiny_model, param):
    dirs_bd = torch.randn(2, tiny_model.dim)
    result = inversion.invert(tiny_model, dirs_bd, [1, 2], InversionSettings(param=param, n_views=3, n_steps=2,
                                                                             size=72))
    assert result.images_b3hw.shape == (2, 3, 72, 72)
    assert 0.0 <= result.images_b3hw.min() and result.images_b3hw.max() <= 1.0
    assert result.images_b3hw.std() > 0.01, "a flat picture: the parameterisation produced nothing"
    assert torch.isfinite(result.cosine_b).all() and result.embeddings_bd.shape == (2, tiny_model.dim)


def test_augmentations_are_batched_differentiable_and_seeded():
    images = torch.rand(3, 3, 64, 64, requires_grad=True)
    u = inversion.draw_augmentations(inversion.target_generators([1, 2, 3]), 5)
    views = inversion.augment_views(images, u, 48)
    assert views.shape == (15, 3, 48, 48)
    views.square().sum().backward()
    assert images.grad.abs().sum() > 0
    # Views of one target differ from each other (crops, flips, jitter), and the draws repeat per seed.
    assert (views[0] - views[1]).abs().mean() > 1e-3
    assert torch.equal(u, inversion.draw_augmentations(inversion.target_generators([1, 2, 3]), 5))
    assert not torch.equal(u[0], inversion.draw_augmentations(inversion.target_generators([9]), 5)[0])
    # A local crop (second half of the views) zooms in: it is smoother than the global view of noise.
    noise = torch.rand(1, 3, 96, 96)
    v = inversion.augment_views(noise, torch.full((1, 2, inversion.N_AUG), 0.6), 96)
    assert inversion.total_variation(v[1:2]) < inversion.total_variation(v[0:1])


@pytest.mark.parametrize("param", ["transformer", "pixels"])
def test_batched_and_one_by_one_give_the_same_result(tiny_model, param):
    dirs_bd = torch.randn(3, tiny_model.dim, generator=torch.Generator().manual_seed(3))
    seeds = [11, 22, 33]
    settings = InversionSettings(param=param, n_views=3, n_steps=4)
    batched = inversion.invert(tiny_model, dirs_bd, seeds, settings)
    for k in (2, 0):
        alone = inversion.invert(tiny_model, dirs_bd[k:k + 1], seeds[k:k + 1], settings)
        assert torch.allclose(alone.images_b3hw[0], batched.images_b3hw[k], atol=1e-4)
        assert torch.allclose(alone.cosine_b[0], batched.cosine_b[k], atol=1e-4)
    # Chunking the views (memory bound) does not change the result either.
    chunked = inversion.invert(tiny_model, dirs_bd, seeds, InversionSettings(param=param, n_views=3, n_steps=4,
                                                                             max_views_per_pass=3))
    assert torch.allclose(chunked.images_b3hw, batched.images_b3hw, atol=1e-4)
    # And another seed gives another picture.
    other = inversion.invert(tiny_model, dirs_bd[:1], [12], settings)
    assert (other.images_b3hw[0] - batched.images_b3hw[0]).abs().mean() > 1e-3


def _legacy_invert():
    """Today's loop before issue 10, kept in benchmarks/render.py as the baseline."""
    import importlib.util
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "render.py"
    import sys
    if "bench_render" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_render", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_render"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["bench_render"].legacy_invert


def test_engine_reproduces_todays_loop_step_for_step(tiny_model):
    """With stopping off, the continuous-batching engine (own Adam, schedules drawn up front, no host sync)
    takes the same steps as today's loop: same per-step losses, and the last picture's cosine at least."""
    dirs_bd = torch.randn(4, tiny_model.dim, generator=torch.Generator().manual_seed(5))
    seeds = [3, 1, 4, 1]
    # local_size=0: today's loop renders every view at the model's input size.
    settings = InversionSettings(n_views=3, n_steps=10, size=64, stop_delta=0, local_size=0)
    final, cos0_sb, _ = _legacy_invert()(tiny_model, dirs_bd, seeds, settings)
    new = inversion.invert(tiny_model, dirs_bd, seeds, settings, n_slots=3)
    assert torch.allclose(new.cos0_sb, cos0_sb, atol=1e-5), "the engine's trajectory left today's"
    with torch.no_grad():
        last_cos = inversion.cosine_to_targets(tiny_model(final), torch.nn.functional.normalize(dirs_bd, dim=-1), 0)
    # The engine returns the better of its best and its last picture: never worse than today's last picture.
    assert (new.cosine_b >= last_cos - 1e-5).all()
    assert new.steps_b.tolist() == [10] * 4 and torch.isfinite(new.loss_sb).all()


@pytest.mark.parametrize("param", ["transformer", "fourier"])
def test_same_picture_alone_in_a_batch_and_under_continuous_batching(tiny_model, param):
    """A target owns its weights, generator, schedule, Adam state and stopping decision, so it renders the
    same alone, in a batch, and in 2 slots refilled as targets stop (with per-target stopping on)."""
    dirs_bd = torch.randn(5, tiny_model.dim, generator=torch.Generator().manual_seed(7))
    seeds = [10, 20, 30, 40, 50]
    settings = InversionSettings(param=param, n_views=2, n_steps=50, size=48, min_steps=20, stop_window=10,
                                 stop_delta=0.02)
    batch = inversion.invert(tiny_model, dirs_bd, seeds, settings)
    assert len(set(batch.steps_b.tolist())) > 1, "no target stopped early: the test would not test refills"
    continuous = inversion.invert(tiny_model, dirs_bd, seeds, settings, n_slots=2)
    # Padded model passes (as on a GPU, for a compiled graph of one shape) change nothing either.
    padded = inversion.Inverter(tiny_model, replace(settings, max_views_per_pass=8), 3,
                                static_shapes=True).run(dirs_bd, seeds)
    for other in (continuous, padded):
        assert other.steps_b.tolist() == batch.steps_b.tolist()
        assert torch.allclose(other.images_b3hw, batch.images_b3hw, atol=1e-4)
        assert torch.allclose(other.cosine_b, batch.cosine_b, atol=1e-4)
    for k in (4, 1):
        alone = inversion.invert(tiny_model, dirs_bd[k:k + 1], seeds[k:k + 1], settings)
        assert alone.steps_b[0] == batch.steps_b[k]
        assert torch.allclose(alone.images_b3hw[0], batch.images_b3hw[k], atol=1e-4)
    # Loss histories end where each target stopped.
    for k, n in enumerate(batch.steps_b.tolist()):
        assert torch.isfinite(batch.loss_sb[:n, k]).all() and torch.isnan(batch.loss_sb[n:, k]).all()


def test_per_target_stopping_rule():
    rising = np.linspace(0.1, 0.9, 60)
    flat = np.concatenate([np.linspace(0.1, 0.8, 20), np.full(40, 0.8)])
    assert not inversion.converged(rising, window=20, delta=0.005)
    assert inversion.converged(flat, window=20, delta=0.005)
    assert not inversion.converged(flat[:20], window=20, delta=0.005), "too short a history never converges"
    # Noise below the best does not count as progress; a new best above delta does.
    noisy = flat.copy()
    noisy[-5:] = [0.7, 0.79, 0.6, 0.8, 0.75]
    assert inversion.converged(noisy, window=20, delta=0.005)
    noisy[-1] = 0.81
    assert not inversion.converged(noisy, window=20, delta=0.005)


def test_batched_adam_matches_torch_adam_with_one_step_count_per_slot():
    g = torch.Generator().manual_seed(0)
    w_s = torch.randn(3, 4, 5, generator=g)
    ours = torch.nn.Parameter(w_s.clone())
    adam = inversion.BatchedAdam([ours], lr=0.01)
    refs = [torch.nn.Parameter(w_s[k].clone()) for k in range(3)]
    opts = [torch.optim.Adam([r], lr=0.01) for r in refs]
    for step in range(12):
        grads = torch.randn(3, 4, 5, generator=g)
        active = [0, 1, 2] if step % 4 else [0, 2]  # slot 1 sits some steps out: its weights must not move
        ours.grad = grads.clone()
        adam.step(torch.tensor([1.0 if k in active else 0.0 for k in range(3)]))
        for k in active:
            refs[k].grad = grads[k].clone()
            opts[k].step()
        if step == 6:  # slot 2 is refilled: fresh weights, moments and step count
            fresh = torch.randn(4, 5, generator=g)
            with torch.no_grad():
                ours[2] = fresh
            adam.reset(torch.tensor([2]))
            refs[2] = torch.nn.Parameter(fresh.clone())
            opts[2] = torch.optim.Adam([refs[2]], lr=0.01)
        for k in range(3):
            assert torch.allclose(ours[k], refs[k], atol=1e-6), f"slot {k} left torch.optim.Adam at step {step}"


def test_tiny_preset_quality_does_not_drop(tiny_model, sae_and_emb):
    """The tiny preset's render settings on 12 of its features: the new engine (no early stop within 24 steps,
    the better of best and last picture, preferring one with its own feature first) reaches at least today's loop's cosine and own-feature-first share."""
    sae, _ = sae_and_emb
    tiny = load_config("tiny").render
    assert tiny.min_steps >= tiny.n_steps or tiny.stop_delta == 0, "the tiny preset should not stop early"
    features = list(range(0, 96, 8))
    dirs_bd = sae.feature_directions()[features]
    centres_bd = sae.input_mean.expand(len(features), -1)
    seeds = [render.rng_seed(("feature", f), 0) for f in features]
    settings = InversionSettings(param=tiny.param, n_views=tiny.n_views, n_steps=tiny.n_steps, size=tiny.size,
                                 lr=tiny.lr, tv_weight=tiny.tv_weight, min_steps=tiny.min_steps,
                                 stop_window=tiny.stop_window, stop_delta=tiny.stop_delta, local_size=tiny.local_size)
    final, _, _ = _legacy_invert()(tiny_model, dirs_bd, seeds, settings, centres_bd)
    # As the render stage runs it: with the own-feature-first test (stop_own_first) when the preset has it.
    ready = render.own_first_test(sae, features, torch.device("cpu")) if tiny.stop_own_first else None
    new = inversion.invert(tiny_model, dirs_bd, seeds, settings, centres_bd=centres_bd, ready=ready)

    def scores(images):
        with torch.no_grad():
            emb = tiny_model(images)
            cos = inversion.cosine_to_targets(emb, torch.nn.functional.normalize(dirs_bd, dim=-1), centres_bd)
            acts = sae.encode_embeddings(emb)
        return cos, (acts.argmax(dim=1) == torch.tensor(features)).float().mean()

    old_cos, old_first = scores(final)
    new_cos, new_first = scores(new.images_b3hw)
    assert (new_cos >= old_cos - 1e-4).all() and new_cos.mean() >= old_cos.mean()
    assert new_first >= old_first


def test_compile_failure_falls_back_to_eager_with_the_same_result(tiny_model, monkeypatch, capsys):
    monkeypatch.setattr("atlasgen.progress._quiet", False)
    dirs_bd = torch.randn(3, tiny_model.dim, generator=torch.Generator().manual_seed(2))
    settings = InversionSettings(n_views=2, n_steps=3, size=48)
    eager = inversion.invert(tiny_model, dirs_bd, [1, 2, 3], settings)

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("inductor: no C++ compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    inv = inversion.Inverter(tiny_model, settings, 3, compile=True, static_shapes=True)
    assert inv.compiled
    result = inv.run(dirs_bd, [1, 2, 3])
    assert not inv.compiled and torch.allclose(result.images_b3hw, eager.images_b3hw, atol=1e-5)
    err = capsys.readouterr().err
    assert err.count("torch.compile failed") == 1 and "Traceback" not in err


def test_out_of_memory_halves_the_views_per_pass_and_retries(tiny_model, monkeypatch):
    monkeypatch.setattr("atlasgen.progress._quiet", True)
    dirs_bd = torch.randn(4, tiny_model.dim, generator=torch.Generator().manual_seed(4))
    settings = InversionSettings(n_views=2, n_steps=3, size=48, max_views_per_pass=8)
    expected = inversion.invert(tiny_model, dirs_bd, [5, 6, 7, 8], settings)
    inv = inversion.Inverter(tiny_model, settings, 4)
    real_loss, calls = inv.eager_loss, []

    def loss_that_runs_out_once(img, *args):
        calls.append(len(img))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_loss(img, *args)

    inv.eager_loss = loss_that_runs_out_once
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    result = inv.run(dirs_bd, [5, 6, 7, 8])
    assert inv.chunk_targets == 2 and calls[:3] == [4, 2, 2]
    assert torch.allclose(result.images_b3hw, expected.images_b3hw, atol=1e-5)


def test_auto_batch_respects_the_memory_budget_and_keeps_cpu_defaults():
    vits = inversion.ModelShape(hidden=384, n_layers=12, intermediate=1536, patch=16, n_extra_tokens=5,
                                image_size=224, dtype_bytes=2)
    assert abs(inversion.forward_flops(vits, 224) / 1e9 - 9.4) < 0.1
    last = (0, 0)
    for free_gib in (0.25, 1, 4, 16, 40, 78, 140):
        free = free_gib * 2 ** 30
        slots, vpp = inversion.auto_batch(free, vits, 8, 224, 200)
        assert slots >= 1 and vpp >= 8 and vpp % 8 == 0 and slots >= vpp // 8
        assert vpp <= inversion.AUTO_VIEWS_PER_PASS
        if (slots, vpp) != (1, 8):  # the floor (one target) is allowed to exceed a tiny budget
            assert inversion.step_bytes(vits, slots, vpp, 8, 224, 200) <= inversion.AUTO_MEMORY_FRACTION * free
        assert slots >= last[0] and vpp >= last[1], "more memory never gives a smaller batch"
        last = (slots, vpp)
    assert last == (inversion.AUTO_PASSES_PER_STEP * inversion.AUTO_VIEWS_PER_PASS // 8, inversion.AUTO_VIEWS_PER_PASS)
    # Small local views cost less memory, so a tight budget holds more of them.
    tight = 6 * 2 ** 30
    assert inversion.auto_batch(tight, vits, 8, 224, 200, local_size=96)[1] >= inversion.auto_batch(tight, vits, 8, 224, 200)[1]


def test_sizing_on_a_cpu_keeps_todays_values_and_explicit_values_win(tiny_model):
    cpu = torch.device("cpu")
    auto = render.resolve_sizing(RenderConfig(), tiny_model, cpu)
    assert (auto.n_slots, auto.views_per_pass, auto.unit_targets, auto.compile) == (16, 64, 16, False)
    explicit = render.resolve_sizing(RenderConfig(batch_targets=5, max_views_per_pass=10, unit_targets=7,
                                                  compile="on"), tiny_model, cpu)
    assert (explicit.n_slots, explicit.views_per_pass, explicit.unit_targets, explicit.compile) == (5, 10, 7, True)
    # The sizing fields do not change results, so they are not part of the stage's hash.
    from atlasgen.config import config_hash
    assert config_hash(RenderConfig()) == config_hash(RenderConfig(batch_targets=5, max_views_per_pass=10,
                                                                   unit_targets=7, compile="off"))


def test_slerp_sum_and_orthogonalised_directions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(96, generator=g), torch.randn(96, generator=g)
    ua, ub = a / a.norm(), b / b.norm()
    assert torch.allclose(inversion.slerp(a, b, 0.0), ua, atol=1e-6)
    assert torch.allclose(inversion.slerp(a, b, 1.0), ub, atol=1e-6)
    mid = inversion.slerp(a, b, 0.5)
    assert abs(float(mid.norm()) - 1) < 1e-5
    assert abs(float(mid @ ua) - float(mid @ ub)) < 1e-5, "the slerp midpoint is equally far from both ends"
    cos_t = [float(inversion.slerp(a, b, t) @ ub) for t in np.linspace(0, 1, 6)]
    assert all(x < y for x, y in zip(cos_t, cos_t[1:])), "slerp moves steadily towards b"
    for x, y in ((a, b), (b, a)):
        o = inversion.orthogonalize(x, y)
        assert abs(float(o @ y)) < 1e-5 and abs(float(o.norm()) - 1) < 1e-5
        assert float(o @ x) > 0, "the orthogonalised direction keeps its own part"
    s = inversion.pair_sum(a, b)
    assert abs(float(s.norm()) - 1) < 1e-5 and abs(float(s @ ua) - float(s @ ub)) < 1e-5


# --- the stage ----------------------------------------------------------------------------------------
@pytest.fixture
def store_dir(tmp_path, sae_and_emb):
    set_quiet(True)
    sae, emb_nd = sae_and_emb
    return make_store(tmp_path / "build", sae, emb_nd)


def _rows(store) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in store.query("SELECT render_id, kind, path, cosine, created_at FROM renders")}


def test_stage_plans_every_kind_records_results_and_skips_done_work(store_dir):
    cfg = small_cfg()
    with Store.open(store_dir) as store:
        summary = render.run(cfg, store)
        # 5 features + 1 image + 2 pairs × (sum + 3 slerps + 2 orth) + 3 ablation variants
        assert summary["n_planned"] == summary["n_rendered"] == 5 + 1 + 2 * 6 + 3
        assert (summary["n_feature"], summary["n_image"], summary["n_sum"], summary["n_slerp"], summary["n_orth"],
                summary["n_ablation"]) == (5, 1, 2, 6, 4, 3)
        rows = store.query("SELECT kind, feature_a, path, cosine, self_activation, self_rank, variant FROM renders")
        for kind, a, path, cosine, act, rank, variant in rows:
            assert (store_dir / path).is_file() and path.startswith(f"renders/{kind}/") and path.endswith(".webp")
            assert -1 <= cosine <= 1
            assert (act is not None and 0 <= rank < N_FEATURES) if kind == "feature" else act is None
        assert {r[0] for r in store.query("SELECT variant FROM renders WHERE kind = 'ablation'")} == {
            "pixels+noaug", "pixels+aug", "transformer+aug"}
        top = [r[0] for r in store.query("SELECT feature_id FROM features ORDER BY n_active DESC, feature_id LIMIT 5")]
        assert sorted(r[0] for r in store.query("SELECT feature_a FROM renders WHERE kind = 'feature'")) == sorted(top)
        # Slerp endpoints are the two features: t = 0 and 1 present per pair.
        assert store.query("SELECT count(*) FROM renders WHERE kind = 'slerp' AND t IN (0, 1)")[0][0] == 4
        params = [json.loads(r[0]) for r in store.query("SELECT params_json FROM renders")]
        assert all(1 <= p["steps"] <= cfg.n_steps for p in params)
        assert summary["targets_per_hour"] > 0 and summary["ms_per_target_step"] > 0
        assert 1 <= summary["mean_steps"] <= cfg.n_steps and summary["n_slots"] == cfg.batch_targets
        before = _rows(store)
        again = render.run(cfg, store)
        assert again["n_rendered"] == 0 and _rows(store) == before
        # New settings supersede the old renders (rows and files).
        changed = render.run(small_cfg(n_steps=1, features="0", n_seeds=1), store)
        assert changed["n_superseded"] == len(before) and store.count("renders") == 1
        assert not any((store_dir / r[1]).exists() for r in before.values())


def test_planned_pair_directions(store_dir, sae_and_emb):
    sae, emb_nd = sae_and_emb
    dirs_fd = sae.feature_directions().numpy()
    with Store.open(store_dir) as store:
        targets = render.plan(small_cfg(slerp_steps=5, pairs=("20,30",)), store, sae, torch.device("cpu"))
    slerps = [tg for tg in targets if tg.kind == "slerp" and (tg.feature_a, tg.feature_b) == (20, 30)]
    assert [tg.t for tg in slerps] == [0, 0.25, 0.5, 0.75, 1]
    assert np.allclose(slerps[0].direction_d, dirs_fd[20], atol=1e-6)
    assert np.allclose(slerps[-1].direction_d, dirs_fd[30], atol=1e-6)
    assert len({tg.rng_seed for tg in slerps}) == 1, "a slerp sequence shares its generator seed"
    orth = {tg.feature_a: tg.direction_d for tg in targets
            if tg.kind == "orth" and {tg.feature_a, tg.feature_b} == {20, 30}}
    assert abs(orth[20] @ dirs_fd[30]) < 1e-5 and abs(orth[30] @ dirs_fd[20]) < 1e-5
    assert abs(np.linalg.norm(orth[20]) - 1) < 1e-5
    # Image targets live in the raw embedding space; feature targets in the SAE's.
    image = next(tg for tg in targets if tg.kind == "image")
    assert image.space == "embedding" and np.allclose(image.direction_d, emb_nd[image.image_id].numpy())
    assert {tg.space for tg in targets if tg.kind in ("feature", "sum", "slerp", "orth")} == {"sae"}


def test_interrupted_render_resumes_without_redoing(store_dir, monkeypatch):
    cfg = small_cfg(features="top:6", n_seeds=2)
    real_render_unit = render.render_unit
    calls = []

    def render_unit_then_crash(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_render_unit(*args, **kwargs)

    with Store.open(store_dir) as store:
        monkeypatch.setattr(render, "render_unit", render_unit_then_crash)
        with pytest.raises(KeyboardInterrupt):
            render.run(cfg, store)
        # The first unit (one unit = batch_targets targets on a CPU) was saved by the writer thread before
        # the interrupt propagated.
        first = _rows(store)
        assert len(first) == cfg.batch_targets
        mtimes = {rid: os.stat(store_dir / row[1]).st_mtime_ns for rid, row in first.items()}
        monkeypatch.setattr(render, "render_unit", real_render_unit)
        summary = render.run(cfg, store)
        assert summary["n_rendered"] == summary["n_planned"] - cfg.batch_targets
        rows = _rows(store)
        assert len(rows) == summary["n_planned"] and all(rows[rid] == first[rid] for rid in first)
        assert all(os.stat(store_dir / first[rid][1]).st_mtime_ns == m for rid, m in mtimes.items())


def test_explicit_features_render_just_those_and_keep_others(store_dir):
    with Store.open(store_dir) as store:
        render.run(small_cfg(features="4"), store)
        summary = render.run(small_cfg(features="1,2,3", n_seeds=2), store)
        assert summary["n_planned"] == summary["n_rendered"] == 6 and summary["n_feature"] == 6
        got = store.query("SELECT feature_a, count(*) FROM renders GROUP BY feature_a ORDER BY feature_a")
        assert got == [(1, 2), (2, 2), (3, 2), (4, 1)]


def test_a_run_of_the_config_s_plan_removes_what_it_no_longer_asks_for(store_dir):
    """Fewer seeds, features, pairs, images and no ablation: a run of [render]'s plan deletes the renders it no
    longer asks for (rows and files), so the site shows what the config says; the renders a --features list
    asked for stay while their seed is still made, and a --features run removes nothing."""
    with Store.open(store_dir) as store:
        render.run(small_cfg(features="top:3", n_seeds=2), store)
        top3 = [r[0] for r in store.query("SELECT feature_id FROM features ORDER BY n_active DESC, feature_id LIMIT 3")]
        listed = next(f for f in range(N_FEATURES) if f not in top3)
        render.run(small_cfg(features=str(listed), n_seeds=2), store)
        before = dict(store.query("SELECT render_id, path FROM renders"))
        assert {r[0] for r in store.query("SELECT DISTINCT kind FROM renders")} == {
            "feature", "image", "sum", "slerp", "orth", "ablation"}
        fewer = small_cfg(features="top:2", n_seeds=1, n_auto_pairs=0, n_auto_images=0, ablation=False)
        summary = render.run(fewer, store)
        kept = store.query("SELECT kind, feature_a, seed FROM renders ORDER BY feature_a")
        assert sorted(kept) == sorted([("feature", f, 0) for f in top3[:2]] + [("feature", listed, 0)])
        assert summary["n_rendered"] == 0 and summary["n_not_asked"] == len(before) - 3
        gone = set(before) - {r[0] for r in store.query("SELECT render_id FROM renders")}
        assert not any((store_dir / before[rid]).exists() for rid in gone)
        # A run for a list of ids keeps everything else, whatever [render] asks for.
        summary = render.run(small_cfg(features=str(top3[2]), n_seeds=1, n_auto_pairs=0), store)
        assert summary["n_not_asked"] == 0 and store.count("renders") == 4


def test_auto_features_never_drop_what_another_device_planned(store_dir, monkeypatch):
    """`features = "auto"` is every feature on a GPU and the top few on a CPU: a forced CPU run of a build made
    on a GPU machine keeps the GPU's feature renders (it still drops seeds no longer asked for)."""
    with Store.open(store_dir) as store:
        render.run(small_cfg(features="top:4", n_seeds=2, n_auto_pairs=0, n_auto_images=0, ablation=False), store)
        monkeypatch.setattr(render, "CPU_AUTO_FEATURES", 2)
        summary = render.run(small_cfg(features="auto", n_seeds=1, n_auto_pairs=0, n_auto_images=0,
                                       ablation=False), store)
        assert summary["n_planned"] == 2 and summary["n_not_asked"] == 4
        assert store.query("SELECT count(DISTINCT feature_a), max(seed) FROM renders") == [(4, 0)]


def test_bad_feature_lists_are_user_errors(store_dir):
    from atlasgen.config import load_config
    from atlasgen.errors import AtlasError
    # Wrong syntax fails when the config loads, before any stage runs ...
    for bad in (dict(features="1,x"), dict(features="top:z"), dict(features="some"), dict(pairs=["1,1"]),
                dict(pairs=["1"]), dict(param="paint"), dict(precision="fp8")):
        with pytest.raises(AtlasError):
            load_config("tiny", overrides={"render": bad})
    # ... ids the store does not have fail when render sees the store.
    with Store.open(store_dir) as store:
        for bad in (dict(features=f"{N_FEATURES}"), dict(image_ids=(999,))):
            with pytest.raises(AtlasError):
                render.run(small_cfg(**bad), store)
        assert store.count("renders") == 0


def test_reset_keeps_renders_and_tidies(store_dir):
    with Store.open(store_dir) as store:
        render.run(small_cfg(features="0,1"), store)
        paths = [r[0] for r in store.query("SELECT path FROM renders ORDER BY path")]
        (store_dir / paths[0]).unlink()
        # A temp file of a killed render (paths.temp_path's rule): the pipeline's sweep removes it.
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        stray = store.paths.renders_dir / "feature" / f".x.webp.tmp{dead.pid}"
        stray.write_bytes(b"x")
        orphan = store.paths.renders_dir / "feature" / "nobody.webp"
        orphan.write_bytes(b"x")
        render.reset(store)
        assert [r[0] for r in store.query("SELECT path FROM renders")] == paths[1:]
        assert not orphan.exists() and stray.exists()
        assert sweep_stale_temps(store.paths.out_dir) == [stray] and not stray.exists()
        summary = render.run(small_cfg(features="0,1"), store)
        assert summary["n_rendered"] == 1 and store.count("renders") == 2


# --- the command line -----------------------------------------------------------------------------------
def test_cli_render_features_renders_just_those(tiny_encoded, tmp_path):
    from typer.testing import CliRunner
    from atlasgen.cli import app
    from conftest import copy_build
    out = copy_build(tiny_encoded, tmp_path / "build")
    result = CliRunner().invoke(app, ["render", "--features", "1,2,3", "--preset", "tiny", "--out", str(out),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    n_seeds = load_config("tiny").render.n_seeds
    with Store.open(out, read_only=True) as store:
        got = store.query("SELECT feature_a, count(*) FROM renders GROUP BY ALL ORDER BY 1")
        assert got == [(1, n_seeds), (2, n_seeds), (3, n_seeds)]
        assert store.query("SELECT DISTINCT kind FROM renders") == [("feature",)]
    bad = CliRunner().invoke(app, ["render", "--features", "1,99999", "--preset", "tiny", "--out", str(out), "--quiet"])
    assert bad.exit_code == 2 and "out of range" in bad.output and "Traceback" not in bad.output


def test_own_first_test_picks_the_picture_and_can_gate_stopping(tiny_model, sae_and_emb):
    """`ready` (the render stage's own-feature-first test): the result prefers a passing picture
    (prefer_own_first) without changing when targets stop; with stop_own_first a target stops early only once
    it has one; either way a target renders the same alone and in a batch."""
    sae, _ = sae_and_emb
    features = [0, 8, 16, 24, 32]
    dirs_bd = sae.feature_directions()[features]
    centres_bd = sae.input_mean.expand(len(features), -1)
    seeds = [11, 22, 33, 44, 55]
    settings = InversionSettings(n_views=2, n_steps=50, size=48, min_steps=20, stop_window=10, stop_delta=0.02)
    gating = replace(settings, stop_own_first=True)
    free = inversion.invert(tiny_model, dirs_bd, seeds, settings, centres_bd=centres_bd)
    assert free.steps_b.min() < settings.n_steps, "no target stopped early: the test would not test the gate"

    def never(emb, targets):
        return torch.zeros(len(targets), dtype=torch.bool)

    def always(emb, targets):
        return torch.ones(len(targets), dtype=torch.bool)

    assert inversion.invert(tiny_model, dirs_bd, seeds, gating, centres_bd, ready=never).steps_b.tolist() == [50] * 5
    for ready, st in ((always, gating), (never, settings)):  # a test every or no picture passes changes nothing
        same = inversion.invert(tiny_model, dirs_bd, seeds, st, centres_bd, ready=ready)
        assert same.steps_b.tolist() == free.steps_b.tolist()
        assert torch.allclose(same.images_b3hw, free.images_b3hw, atol=1e-5)

    def own_first(images):
        with torch.no_grad():
            acts = sae.encode_embeddings(tiny_model(images))
        return acts.argmax(dim=1) == torch.tensor(features)

    ready = render.own_first_test(sae, features, torch.device("cpu"))
    preferred = inversion.invert(tiny_model, dirs_bd, seeds, settings, centres_bd, ready=ready)
    assert preferred.steps_b.tolist() == free.steps_b.tolist(), "prefer_own_first must not change the stops"
    assert own_first(preferred.images_b3hw).sum() >= own_first(free.images_b3hw).sum()
    gated = inversion.invert(tiny_model, dirs_bd, seeds, gating, centres_bd, ready=ready)
    assert (gated.steps_b >= free.steps_b).all()
    assert gated.steps_b.min() < settings.n_steps, "no gated target stopped early: nothing below is checked"
    first = own_first(gated.images_b3hw)
    for k, n in enumerate(gated.steps_b.tolist()):
        if n < settings.n_steps:  # stopped early: only with its own feature first on its picture
            assert first[k], f"target {k} stopped at step {n} without its feature first"
    # The test reads each target's own embedding only: alone, a target renders as in the batch.
    k = 3
    for st, batch in ((settings, preferred), (gating, gated)):
        alone = inversion.invert(tiny_model, dirs_bd[k:k + 1], seeds[k:k + 1], st, centres_bd[k:k + 1],
                                 ready=render.own_first_test(sae, features[k:k + 1], torch.device("cpu")))
        assert alone.steps_b[0] == batch.steps_b[k]
        assert torch.allclose(alone.images_b3hw[0], batch.images_b3hw[k], atol=1e-4)
    # Targets that are not features always pass.
    mixed = render.own_first_test(sae, [None, features[0]], torch.device("cpu"))
    assert render.own_first_test(sae, [None, None], torch.device("cpu")) is None
    assert bool(mixed(torch.zeros(1, tiny_model.dim), [0])[0])
