"""Stage `encode`: run the latest SAE over every embedding (top-k capped, as in the seed) and write
what the site, the map and SQL users need: sparse `activations`, per-feature stats and automatic labels
(`features`), `top_images` (+ WebP thumbnails), decoder-cosine `similar_features` and `coactivation`.

Everything is computed on the sparse (image, feature, value) triples with vectorised numpy / scipy:
at ImageNet-val scale that is ~1.6 M triples, never a dense images × features matrix.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageOps

from .. import progress
from ..config import EncodeConfig
from ..errors import StageInputError
from ..paths import atomic_path
from ..sae import SparseAutoencoder, load_stage_sae
from ..store import Store
from .base import Stage

N_HIST_BINS = 20
QUANTILES = (0.5, 0.9, 0.99)
# Rows of the decoder cosine matrix computed at once (bounds memory at 12k features).
SIMILAR_CHUNK = 2048
TABLES = ("activations", "feature_stats", "top_images", "similar_features", "coactivation")


def run(cfg: EncodeConfig, store: Store) -> dict:
    ids_n, emb_nd = store.embeddings()
    if len(ids_n) == 0:
        raise StageInputError("the store has no embeddings to encode", "run `atlasgen embed` (or `atlasgen build`) first")
    sae, sae_run_id = load_stage_sae(store, used_by="train")
    if emb_nd.shape[1] != sae.d_in:
        raise StageInputError(f"the embeddings have {emb_nd.shape[1]} dims but the latest SAE expects {sae.d_in}",
                              "retrain it: `atlasgen train --force`")
    img_a, feat_a, val_a = encode_sparse(sae, ids_n, emb_nd, cfg.top_k, cfg.batch_size)
    n_images, n_features = len(ids_n), sae.n_features
    labels = store.image_labels()
    stats = feature_stats(feat_a, val_a, n_features, n_images)
    top = top_images(img_a, feat_a, val_a, cfg.n_top_images)
    label_cols = feature_labels(top, labels, n_features)
    similar = similar_features(sae, cfg.n_similar)
    co_a, co_b, co_n = coactivation(img_a, feat_a, ids_n, n_features)
    failures = write_thumbnails(store, np.unique(top["image_id"]), cfg.thumb_side)

    store.replace_encoding({"image_id": img_a, "feature_id": feat_a, "value": val_a}, {**stats, **label_cols}, top,
                           similar, {"feature_a": co_a, "feature_b": co_b, "n_images": co_n}, failures)
    n_live = int((stats["n_active"] > 0).sum())
    return {"sae_run_id": sae_run_id, "n_activations": int(len(val_a)), "n_live_features": n_live, "n_features": n_features,
            "mean_l0": round(len(val_a) / n_images, 3), "n_coactivation_pairs": int(len(co_n)),
            "n_thumbs": int(len(np.unique(top["image_id"])) - len(failures)), "n_thumb_failures": len(failures)}


@torch.no_grad()
def encode_sparse(sae: SparseAutoencoder, ids_n: np.ndarray, emb_nd: np.ndarray, top_k: int,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image_id, feature_id, value) of every non-zero top-k capped activation, by image then feature."""
    imgs, feats, vals = [], [], []
    emb = torch.from_numpy(emb_nd)
    bar = progress.bar(total=len(emb_nd), desc="encode", unit="img")
    k = min(top_k, sae.n_features)
    for start in range(0, len(emb_nd), batch_size):
        # Same values as sae.encode_embeddings(emb, top_k), without building the dense capped matrix.
        acts_bf = sae.encode(sae.normalize(emb[start:start + batch_size].float()))
        values_bk, idx_bk = acts_bf.topk(k, dim=1)
        values_bk, idx_bk = values_bk.numpy(), idx_bk.numpy()
        rows, slots = np.nonzero(values_bk > 0)
        order = np.lexsort((idx_bk[rows, slots], rows))  # by image, then feature
        rows, slots = rows[order], slots[order]
        imgs.append(ids_n[start + rows].astype(np.int32))
        feats.append(idx_bk[rows, slots].astype(np.int32))
        vals.append(values_bk[rows, slots].astype(np.float32))
        bar.update(len(acts_bf))
    bar.close()
    return np.concatenate(imgs), np.concatenate(feats), np.concatenate(vals)


def _group_starts(n_per_group: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(n_per_group)[:-1]]).astype(np.int64)


def feature_stats(feat_a: np.ndarray, val_a: np.ndarray, n_features: int, n_images: int) -> dict[str, object]:
    """One row per feature. Dead features: n_active 0 and 0 for every statistic."""
    order = np.lexsort((val_a, feat_a))  # by feature, then ascending value
    v_s = val_a[order].astype(np.float64)
    n_active = np.bincount(feat_a, minlength=n_features).astype(np.int64)
    live = n_active > 0
    starts = _group_starts(n_active)
    max_value = np.zeros(n_features)
    max_value[live] = v_s[(starts + n_active - 1)[live]]
    sums = np.bincount(feat_a, weights=val_a.astype(np.float64), minlength=n_features)
    mean_value = np.divide(sums, n_active, out=np.zeros(n_features), where=live)
    quantiles = {}
    for q in QUANTILES:
        # Linear interpolation between order statistics (numpy's default, DuckDB's quantile_cont).
        pos = q * np.maximum(n_active - 1, 0)
        lo, frac = np.floor(pos).astype(np.int64), pos - np.floor(pos)
        hi = np.minimum(lo + 1, np.maximum(n_active - 1, 0))
        if len(v_s):
            v_lo = v_s[np.minimum(starts + lo, len(v_s) - 1)]
            v_hi = v_s[np.minimum(starts + hi, len(v_s) - 1)]
            quantiles[f"q{round(q * 100)}"] = np.where(live, v_lo + frac * (v_hi - v_lo), 0.0)
        else:
            quantiles[f"q{round(q * 100)}"] = np.zeros(n_features)
    # Bins over (0, max]: a value equal to max falls in the last bin.
    bin_a = np.clip(np.ceil(val_a / np.maximum(max_value[feat_a], 1e-30) * N_HIST_BINS) - 1, 0, N_HIST_BINS - 1)
    hist_fb = np.bincount(feat_a.astype(np.int64) * N_HIST_BINS + bin_a.astype(np.int64),
                          minlength=n_features * N_HIST_BINS).astype(np.int32)
    histogram = pa.ListArray.from_arrays(pa.array(np.arange(0, (n_features + 1) * N_HIST_BINS, N_HIST_BINS,
                                                            dtype=np.int32)), pa.array(hist_fb))
    frequency = n_active / max(n_images, 1)
    return {"feature_id": np.arange(n_features, dtype=np.int32), "n_active": n_active.astype(np.int32),
            "frequency": frequency, "max_value": max_value, "mean_value": mean_value, **quantiles,
            "histogram": histogram, "strength": frequency * mean_value}


def top_images(img_a: np.ndarray, feat_a: np.ndarray, val_a: np.ndarray, n_top: int) -> dict[str, np.ndarray]:
    """The `n_top` strongest images per feature; rank 0 is the strongest (ties: lower image id first)."""
    order = np.lexsort((img_a, -val_a, feat_a))
    f_s = feat_a[order]
    n_per = np.bincount(f_s) if len(f_s) else np.zeros(0, np.int64)
    rank = np.arange(len(f_s)) - _group_starts(n_per)[f_s] if len(f_s) else np.zeros(0, np.int64)
    keep = rank < n_top
    return {"feature_id": f_s[keep].astype(np.int32), "rank": rank[keep].astype(np.int32),
            "image_id": img_a[order][keep].astype(np.int32), "value": val_a[order][keep].astype(np.float32)}


def feature_labels(top: dict[str, np.ndarray], labels: dict[int, str], n_features: int) -> dict[str, list]:
    """Most common label among each feature's top images, e.g. 'strawberry (11/16)': 11 of its 16 top
    images are strawberries. Ties go to the label of the stronger image. NULL without labels."""
    label = [None] * n_features
    name = [None] * n_features
    purity = [None] * n_features
    if labels:
        feats, imgs = top["feature_id"], top["image_id"]
        bounds = np.flatnonzero(np.diff(feats)) + 1
        for group in np.split(np.arange(len(feats)), bounds):
            if len(group) == 0:
                continue
            f = int(feats[group[0]])
            counts: Counter = Counter()
            first_rank: dict[str, int] = {}
            for i, img in enumerate(imgs[group]):  # group is in rank order
                lab = labels.get(int(img))
                if lab is not None:
                    counts[lab] += 1
                    first_rank.setdefault(lab, i)
            if not counts:
                continue
            best = max(counts, key=lambda lab: (counts[lab], -first_rank[lab]))
            label[f] = f"{best} ({counts[best]}/{len(group)})"
            name[f] = best
            purity[f] = counts[best] / len(group)
    return {"label": pa.array(label, pa.string()), "label_name": pa.array(name, pa.string()),
            "label_purity": pa.array(purity, pa.float64())}


@torch.no_grad()
def similar_features(sae: SparseAutoencoder, n_similar: int) -> dict[str, np.ndarray]:
    """The `n_similar` features whose decoder directions have the highest cosine (itself excluded)."""
    dirs_fd = sae.feature_directions().float()
    n_features = len(dirs_fd)
    k = min(n_similar, n_features - 1)
    if k <= 0:
        empty_i = np.zeros(0, np.int32)
        return {"feature_id": empty_i, "rank": empty_i, "other_id": empty_i, "cosine": np.zeros(0, np.float32)}
    fids, ranks, others, cosines = [], [], [], []
    for start in range(0, n_features, SIMILAR_CHUNK):
        rows = torch.arange(start, min(start + SIMILAR_CHUNK, n_features))
        cos_rf = dirs_fd[rows] @ dirs_fd.t()
        cos_rf[torch.arange(len(rows)), rows] = -float("inf")
        values, idx = cos_rf.topk(k, dim=1)
        fids.append(rows.repeat_interleave(k).numpy())
        ranks.append(np.tile(np.arange(k), len(rows)))
        others.append(idx.flatten().numpy())
        cosines.append(values.flatten().numpy())
    return {"feature_id": np.concatenate(fids).astype(np.int32), "rank": np.concatenate(ranks).astype(np.int32),
            "other_id": np.concatenate(others).astype(np.int32),
            "cosine": np.concatenate(cosines).astype(np.float32)}


def coactivation(img_a: np.ndarray, feat_a: np.ndarray, ids_n: np.ndarray,
                 n_features: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images where both features are active, for feature_a < feature_b, non-zero pairs only (A.T @ A on
    the binary images × features matrix)."""
    import scipy.sparse as sp
    rows = np.searchsorted(ids_n, img_a)
    a_nf = sp.csr_matrix((np.ones(len(rows), np.int32), (rows, feat_a)), shape=(len(ids_n), n_features))
    co_ff = (a_nf.T.tocsr() @ a_nf).tocsr()
    co_ff.sort_indices()
    # Upper triangle straight from the CSR arrays (already ordered by row, then column): much faster
    # than sp.triu + a sort at millions of pairs.
    row = np.repeat(np.arange(n_features, dtype=np.int32), np.diff(co_ff.indptr))
    keep = (co_ff.indices > row) & (co_ff.data > 0)
    return row[keep], co_ff.indices[keep].astype(np.int32), co_ff.data[keep].astype(np.int32)


def repair(cfg: EncodeConfig, store: Store) -> dict:
    """The thumbnails a finished encode lost, written again from its `top_images` (nothing is encoded again);
    the thumbnails that still fail replace encode's rows in `skipped_inputs`."""
    top_ids = store.top_image_ids()
    failures = write_thumbnails(store, np.asarray(top_ids, dtype=np.int64), cfg.thumb_side)
    store.replace_skips(SPEC.name, failures)
    return {"n_thumbs": len(top_ids) - len(failures), "n_thumb_failures": len(failures)}


def write_thumbnails(store: Store, image_ids: np.ndarray, side: int) -> list[tuple[str, str]]:
    """Square WebP thumbnails (centre crop) of the given images; returns (source, reason) failures.
    Existing thumbnails are kept, so a rerun after an interruption only writes the missing ones."""
    paths = store.paths
    wanted = {int(i) for i in image_ids}
    rows = store.corpus_paths()
    failures: list[tuple[str, str]] = []
    jobs = []
    for image_id in sorted(wanted):
        if paths.thumb(image_id).exists():
            continue
        if image_id not in rows:
            failures.append((f"image_id:{image_id}", "no row in images, so no thumbnail"))
            continue
        jobs.append((image_id, paths.out_dir / rows[image_id]))
    paths.thumbs_dir.mkdir(parents=True, exist_ok=True)

    def make(job):
        image_id, src = job
        try:
            with Image.open(src) as im:
                thumb = ImageOps.fit(im.convert("RGB"), (side, side), Image.LANCZOS)
            with atomic_path(paths.thumb(image_id)) as tmp:
                thumb.save(tmp, format="WEBP", quality=82, method=4)
            return None
        except (OSError, ValueError) as e:  # missing or unreadable corpus copy: skip, report
            return (str(src), f"thumbnail failed: {type(e).__name__}: {e}")

    bar = progress.bar(total=len(jobs), desc="thumbnails", unit="img")
    with ThreadPoolExecutor(max_workers=2) as pool:
        for result in pool.map(make, jobs):
            if result is not None:
                failures.append(result)
            bar.update(1)
    bar.close()
    return failures


SPEC = Stage("encode", EncodeConfig, run, inputs=("train",), tables=TABLES, folders=("thumbs_dir",), skips=True,
             repair=repair)
