"""Layout stage: the feature map.

co-activation → UMAP (2-D, every live feature) → grid cells for the strongest features → a WebP tile
pyramid of the features' pictures plus `map/index.json`, which the map page (`templates/map.html`,
`site_assets/map.js`) pans and zooms.

Why Hellinger on row-normalised co-activation profiles: each live feature's row (how often it fires
together with every other feature, its own count on the diagonal) divided by its sum is a probability
distribution over "companions". Hellinger compares such distributions by their square roots, so a
rare feature and a frequent one with the same companions land together (raw counts would sort by
frequency instead), and the square root damps the few very frequent companions every feature shares.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from ..config import LayoutConfig, config_hash
from ..errors import AtlasError, StageInputError
from ..paths import atomic_dir
from ..progress import bar, say
from .base import Stage

MAP_INDEX_NAME = "index.json"
# Cells without a feature and the placeholder of a feature that has no picture yet.
EMPTY_RGB = (24, 26, 30)
PLACEHOLDER_RGB = (92, 96, 104)
WEBP_QUALITY = 82


# --- the stage ------------------------------------------------------------------------------------
def run(cfg: LayoutConfig, store) -> dict:
    t0 = time.perf_counter()
    feats = _read_features(store)
    live = feats["n_active"] > 0
    live_ids = feats["feature_id"][live]
    if len(live_ids) == 0:
        raise StageInputError("no live features to lay out (every feature has n_active = 0)",
                              "check the encode stage: `atlasgen info --out DIR`; train longer or on more images")
    profiles = coactivation_profiles(store, live_ids, feats["n_active"][live])
    say(f"layout: UMAP of {len(live_ids):,} live features ({profiles.nnz:,} co-activation entries)")
    xy_n2 = umap_layout(profiles, cfg)
    t_umap = time.perf_counter() - t0

    t1 = time.perf_counter()
    n_map = min(cfg.n_map_features, len(live_ids), cfg.grid_side * cfg.grid_side)
    order = _strongest_first(live_ids, feats)[:n_map]
    cells_m2 = assign_grid(xy_n2[order], cfg.grid_side)
    t_grid = time.perf_counter() - t1

    grid_x = np.full(len(live_ids), -1, np.int64)
    grid_y = np.full(len(live_ids), -1, np.int64)
    grid_x[order], grid_y[order] = cells_m2[:, 0], cells_m2[:, 1]
    store.replace_feature_map({
        "feature_id": pa.array(live_ids.astype(np.int32)),
        "umap_x": pa.array(xy_n2[:, 0].astype(np.float64)),
        "umap_y": pa.array(xy_n2[:, 1].astype(np.float64)),
        "grid_x": pa.array(grid_x, mask=grid_x < 0).cast(pa.int32()),
        "grid_y": pa.array(grid_y, mask=grid_y < 0).cast(pa.int32()),
    })

    t2 = time.perf_counter()
    placed_ids = live_ids[order]
    labels = dict(zip(feats["feature_id"].tolist(), feats["label"]))
    tiles = write_map(store, cfg, placed_ids, cells_m2, [labels.get(int(f)) for f in placed_ids])
    t_tiles = time.perf_counter() - t2
    return {"n_live": int(len(live_ids)), "n_placed": int(n_map), "grid_side": cfg.grid_side,
            "n_levels": tiles["n_levels"], "n_tiles": tiles["n_tiles"], "n_pictures": tiles["n_pictures"],
            "content_hash": tiles["content_hash"], "umap_seconds": round(t_umap, 2), "grid_seconds": round(t_grid, 2), "tile_seconds": round(t_tiles, 2)}


def repair(cfg: LayoutConfig, store) -> dict:
    """The map (tiles and index) of a finished layout drawn again from `feature_map`, when files of it were lost:
    no UMAP and no grid assignment; the same pictures give the same tiles and content hash."""
    feats = _read_features(store)
    ids_m, cells_m2 = store.map_cells()
    order = _strongest_first(ids_m, feats)  # the order `run` placed them in, which the index lists
    labels = dict(zip(feats["feature_id"].tolist(), feats["label"]))
    placed_ids = ids_m[order]
    tiles = write_map(store, cfg, placed_ids, cells_m2[order], [labels.get(int(f)) for f in placed_ids])
    return {key: tiles[key] for key in ("n_levels", "n_tiles", "n_pictures", "content_hash")}


def _strongest_first(feature_ids: np.ndarray, feats: dict) -> np.ndarray:
    """Indices of `feature_ids` by strength, strongest first; ties by id, so the choice is reproducible."""
    strength_by_id = np.nan_to_num(feats["strength"].astype(np.float64), nan=0.0)
    strength = strength_by_id[np.searchsorted(feats["feature_id"], feature_ids)]
    return np.lexsort((feature_ids, -strength))


def reset(store) -> None:
    """Clears the map positions. map/ stays until `write_map` swaps the new map in (the site copies it)."""
    store.clear_stage_outputs("layout", ("feature_map",), skips=False)


def _read_features(store) -> dict:
    feats = store.feature_ranking()
    if len(feats["feature_id"]) == 0:
        raise StageInputError("the store has no features", "run `atlasgen encode --out DIR` first")
    return feats


# --- co-activation profiles and UMAP -------------------------------------------------------------
def coactivation_profiles(store, live_ids: np.ndarray, n_active: np.ndarray) -> sp.csr_matrix:
    """(n_live, n_live) CSR: symmetric co-activation counts with n_active on the diagonal, each row summing to 1."""
    n_live = len(live_ids)
    a, b, w = store.coactivation_counts()
    # Map feature ids to rows; pairs with a dead feature (cannot happen with consistent counts) are dropped.
    row_of = np.full(int(max(live_ids.max(), a.max(initial=0), b.max(initial=0))) + 1, -1, np.int64)
    row_of[live_ids] = np.arange(n_live)
    ra, rb = row_of[a], row_of[b]
    keep = (ra >= 0) & (rb >= 0) & (ra != rb)
    ra, rb, w = ra[keep], rb[keep], w[keep]
    diag = np.arange(n_live)
    rows = np.concatenate([ra, rb, diag])
    cols = np.concatenate([rb, ra, diag])
    vals = np.concatenate([w, w, n_active.astype(np.float64)])
    counts = sp.csr_matrix((vals, (rows, cols)), shape=(n_live, n_live))
    counts.sum_duplicates()
    row_sum = np.asarray(counts.sum(axis=1)).ravel()
    assert (row_sum > 0).all(), "every live feature has its diagonal, so no row can be empty"
    return sp.csr_matrix(sp.diags(1.0 / row_sum) @ counts)


def umap_layout(profiles: sp.csr_matrix, cfg: LayoutConfig) -> np.ndarray:
    """(n, 2) float coordinates, reproducible for cfg.seed.

    Hellinger(p, q) = ‖√p − √q‖ / √2, so for the Hellinger metric the square-rooted profiles are
    projected onto `svd_dims` components (TruncatedSVD, seeded) and UMAP runs with Euclidean
    distance on that dense matrix: NN-descent on dense 64-d rows is several times faster than on
    sparse rows with thousands of entries, and the neighbour graph it finds is nearly the same.

    With too few features for UMAP's neighbour graph (< n_neighbors + 2) the fallback is PCA of the
    square-rooted profiles, the classical-MDS picture of the same geometry."""
    n = profiles.shape[0]
    if n == 1:
        return np.zeros((1, 2))
    if n < cfg.n_neighbors + 2:
        return _pca_layout(profiles)
    import warnings

    import umap
    data, metric = profiles, cfg.metric
    if cfg.metric == "hellinger" and 0 < cfg.svd_dims < n - 1:
        from sklearn.decomposition import TruncatedSVD
        root = profiles.copy()
        root.data = np.sqrt(root.data)
        data = TruncatedSVD(cfg.svd_dims, algorithm="randomized", random_state=cfg.seed).fit_transform(root)
        data, metric = data.astype(np.float32), "euclidean"
    reducer = umap.UMAP(n_neighbors=cfg.n_neighbors, min_dist=cfg.min_dist, metric=metric, n_components=2,
                        random_state=cfg.seed, n_jobs=1, verbose=False)
    with warnings.catch_warnings():
        # random_state disables parallelism (that is the point); umap warns about it every time.
        warnings.simplefilter("ignore")
        try:
            xy = reducer.fit_transform(data)
        except (ValueError, TypeError) as e:
            raise AtlasError(f"[layout] UMAP failed with metric {cfg.metric!r}: {e}",
                             "use a umap-learn metric such as 'hellinger', 'cosine' or 'euclidean'") from None
    xy = np.asarray(xy, dtype=np.float64)
    if not np.isfinite(xy).all():  # disconnected tiny graphs can yield NaNs; keep the run usable
        xy = _pca_layout(profiles)
    return xy


def _pca_layout(profiles: sp.csr_matrix) -> np.ndarray:
    root = np.sqrt(profiles.toarray())
    root -= root.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(root, full_matrices=False)
    xy = u[:, :2] * s[:2]
    if xy.shape[1] < 2:
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    # SVD signs are arbitrary; fix them so the picture does not flip between runs.
    for k in range(2):
        if xy[np.argmax(np.abs(xy[:, k])), k] < 0:
            xy[:, k] = -xy[:, k]
    return xy


# --- grid assignment ------------------------------------------------------------------------------
def assign_grid(xy_m2: np.ndarray, grid_side: int, n_candidates: int = 64) -> np.ndarray:
    """(m, 2) int cells (x, y) in [0, grid_side), one feature per cell, neighbours kept neighbours.

    The points are rescaled into the grid (per axis, robust to a few outliers), then a linear
    assignment minimises the total squared distance from points to their cells. Each point may only
    take one of its `n_candidates` nearest cells, which makes the cost matrix sparse (2,500 × 64 entries
    instead of 2,500 × 14,400) and the solve take well under a second; if a dense clump has no full
    matching within its nearest cells, the candidate count doubles until it has."""
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching
    from scipy.spatial import cKDTree

    m = len(xy_m2)
    n_cells = grid_side * grid_side
    assert m <= n_cells, f"{m} features do not fit {n_cells} cells"
    if m == 0:
        return np.zeros((0, 2), np.int64)
    pts = _fit_to_grid(np.asarray(xy_m2, np.float64), grid_side)
    cx, cy = np.meshgrid(np.arange(grid_side), np.arange(grid_side))
    cells_c2 = np.stack([cx.ravel(), cy.ravel()], axis=1).astype(np.float64) + 0.5
    tree = cKDTree(cells_c2)
    k = max(1, n_candidates)
    while True:
        k = min(k, n_cells)
        dist_mk, near_mk = tree.query(pts, k=k)
        dist_mk, near_mk = np.asarray(dist_mk).reshape(m, -1), np.asarray(near_mk).reshape(m, -1)
        # +1 on every cost: the sparse solver reads a zero as "no edge"; a constant does not move the optimum.
        cost = sp.csr_matrix((dist_mk.ravel() ** 2 + 1.0, near_mk.ravel(), np.arange(0, m * k + 1, k)),
                             shape=(m, n_cells))
        try:
            _, chosen = min_weight_full_bipartite_matching(cost)
            break
        except ValueError:  # no full matching among the candidates
            assert k < n_cells, "with every cell a candidate a full matching always exists"
            k *= 2
    assert len(np.unique(chosen)) == m, "assignment must be one-to-one"
    return np.stack([chosen % grid_side, chosen // grid_side], axis=1).astype(np.int64)


def _fit_to_grid(xy: np.ndarray, grid_side: int) -> np.ndarray:
    """Affine per-axis map of the points into [0, grid_side]², the 0.5–99.5 percentiles spanning the grid."""
    out = np.empty_like(xy)
    for k in range(2):
        lo, hi = np.percentile(xy[:, k], [0.5, 99.5]) if len(xy) > 20 else (xy[:, k].min(), xy[:, k].max())
        span = hi - lo if hi > lo else 1.0
        out[:, k] = np.clip((xy[:, k] - lo) / span, 0.0, 1.0) * (grid_side - 1e-6) if hi > lo \
            else np.full(len(xy), grid_side / 2)
    return out


# --- tiles ------------------------------------------------------------------------------------------
def pyramid_levels(full_px: int, tile_px: int) -> list[dict]:
    """Levels 0 (the whole mosaic in one tile) … max (full resolution); each level halves the next."""
    max_level = max(0, math.ceil(math.log2(full_px / tile_px))) if full_px > tile_px else 0
    levels = []
    size = full_px
    sizes = [full_px]
    for _ in range(max_level):
        size = (size + 1) // 2
        sizes.append(size)
    for z, size in enumerate(reversed(sizes)):
        n = math.ceil(size / tile_px)
        levels.append({"z": z, "size": size, "n_tiles": n})
    return levels


def _cell_image(path: Path | None, cell_px: int) -> np.ndarray:
    from PIL import Image
    if path is not None:
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB").resize((cell_px, cell_px), Image.LANCZOS))
        except (OSError, ValueError):
            pass  # an unreadable picture gets the placeholder, the map still builds
    tile = np.empty((cell_px, cell_px, 3), np.uint8)
    tile[:] = PLACEHOLDER_RGB
    edge = max(1, cell_px // 16)
    tile[:edge, :], tile[-edge:, :], tile[:, :edge], tile[:, -edge:] = (EMPTY_RGB,) * 4
    return tile


def write_map(store, cfg: LayoutConfig, placed_ids: np.ndarray, cells_m2: np.ndarray, labels: list) -> dict:
    """Cut the mosaic into the tile pyramid and write index.json, into a temp folder renamed to map/."""
    with atomic_dir(store.paths.map_dir) as tmp_dir:
        stats = _write_tiles(tmp_dir, store, cfg, placed_ids, cells_m2)
        index = {
            "version": 1,
            "config_hash": config_hash(cfg),
            "grid_side": cfg.grid_side,
            "cell_px": cfg.cell_px,
            "tile_px": cfg.tile_px,
            "full_px": cfg.grid_side * cfg.cell_px,
            "levels": stats["levels"],
            "tile_format": "webp",
            "features": [
                {"id": int(f), "x": int(c[0]), "y": int(c[1]), "label": lab or "",
                 "url": f"features/{int(f)}.html"}
                for f, c, lab in zip(placed_ids, cells_m2, labels)],
        }
        index["content_hash"] = map_content_hash(tmp_dir, index)
        (tmp_dir / MAP_INDEX_NAME).write_text(json.dumps(index, separators=(",", ":")))
    return {"n_levels": len(stats["levels"]), "n_tiles": stats["n_tiles"], "n_pictures": stats["n_pictures"],
            "content_hash": index["content_hash"]}


def map_content_hash(map_dir: Path, index: dict) -> str:
    """A hash of every tile's bytes and of the index (without this hash): the site serves the map under
    `map/<hash>/`, so a tile's URL changes whenever any tile or the index does, and the year-long immutable
    cache rule for /map/* (netlify.toml, `atlasgen serve`) never shows a stale tile."""
    digest = hashlib.sha256()
    body = {k: v for k, v in index.items() if k != "content_hash"}
    digest.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for path in sorted(p for p in Path(map_dir).rglob("*") if p.is_file() and p.name != MAP_INDEX_NAME):
        digest.update(path.relative_to(map_dir).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _write_tiles(out_dir: Path, store, cfg: LayoutConfig, placed_ids, cells_m2) -> dict:
    """Full-resolution tiles are built one strip (a row of tiles) at a time from the cell pictures, and
    each strip, halved, fills the next level down; only that half-size mosaic (¼ of the full one) is ever
    held whole, and the lower levels are halved from it."""
    from PIL import Image

    cell, tile, side = cfg.cell_px, cfg.tile_px, cfg.grid_side
    full = side * cell
    levels = pyramid_levels(full, tile)
    max_z = len(levels) - 1
    pictures = store.feature_pictures(placed_ids)
    at_cell = {(int(c[0]), int(c[1])): int(f) for f, c in zip(placed_ids, cells_m2)}
    cache: dict[int, np.ndarray] = {}
    n_tiles = 0
    for lv in levels:
        (out_dir / str(lv["z"])).mkdir()

    def save(arr: np.ndarray, z: int, x: int, y: int) -> None:
        Image.fromarray(arr).save(out_dir / str(z) / f"{x}_{y}.webp", "WEBP", quality=WEBP_QUALITY, method=4)

    half = np.empty(((full + 1) // 2, (full + 1) // 2, 3), np.uint8) if max_z > 0 else None
    n_strips = levels[max_z]["n_tiles"]
    for ty in bar(range(n_strips), total=n_strips, desc="map tiles", unit="row"):
        y0, y1 = ty * tile, min(full, (ty + 1) * tile)
        strip = np.empty((y1 - y0, full, 3), np.uint8)
        strip[:] = EMPTY_RGB
        for gy in range(y0 // cell, (y1 - 1) // cell + 1):
            for gx in range(side):
                fid = at_cell.get((gx, gy))
                if fid is None:
                    continue
                img = cache.get(fid)
                if img is None:
                    img = cache[fid] = _cell_image(pictures.get(fid), cell)
                top = gy * cell
                a, b = max(top, y0), min(top + cell, y1)
                strip[a - y0:b - y0, gx * cell:(gx + 1) * cell] = img[a - top:b - top]
        for tx in range(levels[max_z]["n_tiles"]):
            save(np.ascontiguousarray(strip[:, tx * tile:(tx + 1) * tile]), max_z, tx, ty)
            n_tiles += 1
        if half is not None:
            h = _halve(strip)
            half[y0 // 2:y0 // 2 + len(h)] = h
    level_img = half
    for z in range(max_z - 1, -1, -1):
        size = levels[z]["size"]
        assert level_img.shape[0] == size, f"level {z}: {level_img.shape[0]} px, expected {size}"
        n = levels[z]["n_tiles"]
        for ty in range(n):
            for tx in range(n):
                save(np.ascontiguousarray(level_img[ty * tile:(ty + 1) * tile, tx * tile:(tx + 1) * tile]), z, tx, ty)
                n_tiles += 1
        if z > 0:
            level_img = _halve(level_img)
    return {"levels": levels, "n_tiles": n_tiles, "n_pictures": len(pictures)}


def _halve(arr: np.ndarray) -> np.ndarray:
    """2×2 box average (the odd last row/column averaged with itself)."""
    h, w = arr.shape[:2]
    if h % 2 or w % 2:
        arr = np.pad(arr, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    a = arr.astype(np.uint16)
    out = (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2] + 2) // 4
    return out.astype(np.uint8)


# The map is a published folder: its reset swaps, it never leaves readers without one (see `reset`).
SPEC = Stage("layout", LayoutConfig, run, inputs=("encode", "render"), tables=("feature_map",),
             folders=("map_dir",), reset=reset, pages=("map.html",), repair=repair)
