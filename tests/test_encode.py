"""The encode stage on a small store: activations, feature stats, labels, top images, similar features,
co-activation and thumbnails, each cross-checked against a direct computation or SQL."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from atlasgen.stages import encode
from atlasgen.config import EncodeConfig, TrainConfig
from atlasgen.sae import SparseAutoencoder, load_stage_sae
from atlasgen.testing import record_sae, run_stage
from atlasgen.store import Store

D_IN, N_IMAGES, TOP_K = 24, 240, 6
LABELS = ("apple", "boat", "cloud", "dog")
DEAD_FEATURE = 5


def make_store(out_dir, labelled: bool = True, seed: int = 0) -> Store:
    """Images (generated JPEG corpus copies, four labels) with label-clustered embeddings."""
    rng = np.random.default_rng(seed)
    store = Store.open(out_dir)
    centres = rng.normal(size=(len(LABELS), D_IN)) * 2
    ids = np.arange(10, 10 + N_IMAGES)  # ids not starting at 0, to catch index/id mix-ups
    label_idx = rng.integers(0, len(LABELS), N_IMAGES)
    emb = centres[label_idx] + rng.normal(size=(N_IMAGES, D_IN))
    store.paths.corpus_dir.mkdir(parents=True, exist_ok=True)
    with store.transaction():
        for image_id, li in zip(ids, label_idx):
            path = store.paths.corpus_image(int(image_id))
            Image.new("RGB", (80, 60), tuple(int(c) for c in rng.integers(0, 255, 3))).save(path, quality=90)
            store.con.execute("INSERT INTO images VALUES (?, ?, ?, ?, 80, 60, ?)", [
                int(image_id), f"src/{image_id}.jpg", LABELS[li] if labelled else None, int(li) if labelled else None,
                path.relative_to(store.paths.out_dir).as_posix()])
        store.insert_embeddings(ids, emb.astype(np.float32))
    return store


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    store = make_store(tmp_path_factory.mktemp("enc") / "out")
    run_stage(store, TrainConfig(expansion=3, l1_coeff=0.02, lr=3e-3, warmup_steps=20, n_steps=200, batch_size=64,
                                 dead_window=100, resample_every=0, log_every=50, precision="fp32", device="cpu"))
    # Make one feature certainly dead, to check dead features still get a row.
    run = store.sae_run_used_by("train")
    sae = SparseAutoencoder.load(run["weights_path"])
    with torch.no_grad():
        sae.b_enc[DEAD_FEATURE] = -1e4
    sae.save(run["weights_path"].parent)
    cfg = EncodeConfig(top_k=TOP_K, n_top_images=8, n_similar=4, thumb_side=32, batch_size=50)
    summary = run_stage(store, cfg)
    yield store, summary, cfg
    store.close()


def dense_acts(store) -> tuple[np.ndarray, np.ndarray]:
    ids, emb = store.embeddings()
    return ids, load_stage_sae(store, "train")[0].encode_embeddings(torch.from_numpy(emb), TOP_K).numpy()


def test_activations_match_direct_encoding(encoded):
    store, summary, _ = encoded
    ids, acts = dense_acts(store)
    rows = store.query("SELECT image_id, feature_id, value FROM activations")
    got = np.zeros_like(acts)
    index = {int(i): r for r, i in enumerate(ids)}
    for image_id, feature_id, value in rows:
        got[index[image_id], feature_id] = value
    assert len(rows) == int((acts > 0).sum()) == summary["n_activations"]
    np.testing.assert_allclose(got, acts, rtol=1e-6)
    assert store.scalar("SELECT max(n) FROM (SELECT count(*) n FROM activations GROUP BY image_id)") <= TOP_K
    assert store.scalar("SELECT min(value) FROM activations") > 0
    assert summary["mean_l0"] == pytest.approx(len(rows) / N_IMAGES)


def test_feature_stats_agree_with_sql(encoded):
    store, summary, _ = encoded
    n_features = load_stage_sae(store, "train")[0].n_features
    assert store.count("features") == n_features
    mismatches = store.query("""
        WITH a AS (SELECT feature_id, count(*) n, max(value) mx, avg(value) mean,
                          quantile_cont(value, 0.5) q50, quantile_cont(value, 0.9) q90,
                          quantile_cont(value, 0.99) q99 FROM activations GROUP BY feature_id)
        SELECT f.feature_id FROM features f LEFT JOIN a USING (feature_id)
        WHERE f.n_active != coalesce(a.n, 0)
           OR abs(f.frequency - coalesce(a.n, 0) / ?) > 1e-9
           OR (a.n > 0 AND (abs(f.max_value - a.mx) > 1e-5 OR abs(f.mean_value - a.mean) > 1e-5
               OR abs(f.q50 - a.q50) > 1e-5 OR abs(f.q90 - a.q90) > 1e-5 OR abs(f.q99 - a.q99) > 1e-5))
           OR abs(f.strength - f.frequency * f.mean_value) > 1e-9
           OR list_sum(f.histogram) != f.n_active OR len(f.histogram) != 20
           OR f.umap_x IS NOT NULL OR f.grid_x IS NOT NULL""", [N_IMAGES])
    assert mismatches == []
    assert store.query("SELECT n_active, label FROM features WHERE feature_id = ?", [DEAD_FEATURE]) == [(0, None)]
    assert summary["n_live_features"] == store.scalar("SELECT count(*) FROM features WHERE n_active > 0")
    # The top value always lands in the last histogram bin.
    assert store.scalar("SELECT count(*) FROM features WHERE n_active > 0 AND histogram[20] < 1") == 0


def test_top_images_are_the_strongest_in_order(encoded):
    store, _, cfg = encoded
    rows = store.query("SELECT feature_id, rank, image_id, value FROM top_images ORDER BY feature_id, rank")
    by_feature: dict[int, list] = {}
    for f, rank, image_id, value in rows:
        by_feature.setdefault(f, []).append((rank, image_id, value))
    ids, acts = dense_acts(store)
    assert set(by_feature) == set(np.flatnonzero((acts > 0).any(axis=0)))
    for f, items in by_feature.items():
        assert [r for r, _, _ in items] == list(range(len(items)))
        values = [v for _, _, v in items]
        assert values == sorted(values, reverse=True)
        expected = np.sort(acts[:, f][acts[:, f] > 0])[::-1][:cfg.n_top_images]
        np.testing.assert_allclose(values, expected, rtol=1e-6)


def test_labels_from_top_images(encoded):
    store, _, _ = encoded
    top = store.query("SELECT t.feature_id, i.label FROM top_images t JOIN images i USING (image_id) "
                      "ORDER BY t.feature_id, t.rank")
    expected: dict[int, tuple[int, int]] = {}
    groups: dict[int, list[str]] = {}
    for f, label in top:
        groups.setdefault(f, []).append(label)
    features = {f: (label, name, purity) for f, label, name, purity in
                store.query("SELECT feature_id, label, label_name, label_purity FROM features WHERE n_active > 0")}
    assert set(features) == set(groups)
    for f, labels in groups.items():
        label, name, purity = features[f]
        m = re.fullmatch(r"(.+) \((\d+)/(\d+)\)", label)
        assert m, label
        k, n = int(m.group(2)), int(m.group(3))
        assert m.group(1) == name and n == len(labels) and k == labels.count(name)
        assert k == max(labels.count(x) for x in set(labels)) and purity == pytest.approx(k / n)
        expected[f] = (k, n)
    # Clustered embeddings: most features' top images share a label.
    assert np.mean([k / n for k, n in expected.values()]) > 0.5


def test_similar_features_by_decoder_cosine(encoded):
    store, _, cfg = encoded
    dirs = load_stage_sae(store, "train")[0].feature_directions().numpy()
    cos = dirs @ dirs.T
    np.fill_diagonal(cos, -np.inf)
    rows = store.query("SELECT feature_id, rank, other_id, cosine FROM similar_features ORDER BY feature_id, rank")
    assert len(rows) == len(dirs) * cfg.n_similar
    for f, rank, other, c in rows:
        assert other != f
        assert c == pytest.approx(cos[f, other], abs=1e-5)
        assert c == pytest.approx(np.sort(cos[f])[::-1][rank], abs=1e-5)


def test_coactivation_equals_brute_force(encoded):
    store, summary, _ = encoded
    _, acts = dense_acts(store)
    on = (acts > 0).astype(np.int64)
    brute = on.T @ on
    rows = store.query("SELECT feature_a, feature_b, n_images FROM coactivation")
    got = {(a, b): n for a, b, n in rows}
    expected = {(a, b): int(brute[a, b]) for a, b in zip(*np.nonzero(np.triu(brute, k=1)))}
    assert got == expected and len(rows) > 0
    assert all(a < b and n > 0 for a, b, n in rows)
    assert summary["n_coactivation_pairs"] == len(rows)


def test_thumbnails_are_webp(encoded):
    store, summary, cfg = encoded
    image_ids = [r[0] for r in store.query("SELECT DISTINCT image_id FROM top_images")]
    assert summary["n_thumbs"] == len(image_ids) > 0
    for image_id in image_ids:
        path = store.paths.thumb(image_id)
        head = path.read_bytes()[:12]
        assert head[:4] == b"RIFF" and head[8:12] == b"WEBP", path
        with Image.open(path) as im:
            assert im.format == "WEBP" and im.size == (cfg.thumb_side, cfg.thumb_side)
    assert not list(store.paths.thumbs_dir.glob(".*tmp*"))


def test_unlabelled_corpus_missing_images_and_reset(tmp_path):
    store = make_store(tmp_path / "out", labelled=False, seed=1)
    sae = SparseAutoencoder(D_IN, 48)
    record_sae(store, sae, "handmade", used_by=("train",))
    victim = store.scalar("SELECT min(image_id) FROM images")
    store.paths.corpus_image(victim).unlink()  # its thumbnail cannot be made: skipped and recorded
    summary = run_stage(store, EncodeConfig(top_k=4, n_top_images=300, n_similar=2, thumb_side=16))
    assert store.scalar("SELECT count(*) FROM features WHERE label IS NOT NULL OR label_name IS NOT NULL") == 0
    assert summary["n_thumb_failures"] == 1
    assert store.query("SELECT stage FROM skipped_inputs") == [("encode",)]
    encode.SPEC.reset_outputs(store)
    assert all(store.count(t) == 0 for t in encode.TABLES)
    assert not store.paths.thumbs_dir.exists()
    store.close()


def test_encode_without_sae_is_a_user_error(tmp_path):
    from atlasgen.errors import StageInputError
    store = make_store(tmp_path / "out")
    with pytest.raises(StageInputError, match="no trained SAE"):
        run_stage(store, EncodeConfig())
    store.close()
