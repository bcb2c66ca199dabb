"""Layout stage: UMAP on co-activation, grid assignment, tile pyramid, index.json, site copy."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atlasgen.stages import layout
from atlasgen.testing import insert_synthetic, synthetic_activity
from atlasgen.config import load_config, LayoutConfig
from atlasgen.errors import AtlasError, StageInputError
from atlasgen.progress import set_quiet
from atlasgen.store import Store

# Small enough that UMAP takes its exact-distance path (fast after numba's one-off compile).
N_FEATURES, N_IMAGES, N_CLUSTERS = 360, 1500, 6
CFG = LayoutConfig(n_map_features=120, grid_side=14, n_neighbors=10, cell_px=24, tile_px=64, seed=3)


@pytest.fixture(scope="module")
def synthetic():
    set_quiet(True)
    return synthetic_activity(N_FEATURES, N_IMAGES, N_CLUSTERS, seed=7)


def _store_with(tmp_path: Path, data: dict) -> Store:
    store = Store.open(tmp_path)
    insert_synthetic(store, data)
    return store


@pytest.fixture(scope="module")
def laid_out(tmp_path_factory, synthetic):
    """A store with synthetic co-activation after one layout run: (store, summary)."""
    store = _store_with(tmp_path_factory.mktemp("layout"), synthetic)
    summary = layout.run(CFG, store)
    yield store, summary
    store.close()


def _features(store) -> dict[int, tuple]:
    return {r[0]: r[1:] for r in store.query(
        "SELECT feature_id, umap_x, umap_y, grid_x, grid_y, n_active, strength FROM features")}


def test_layout_is_reproducible_for_a_seed(laid_out, synthetic, tmp_path):
    store, _ = laid_out
    again = _store_with(tmp_path / "again", synthetic)
    layout.run(CFG, again)
    first, second = _features(store), _features(again)
    xy1 = np.array([first[f][:2] for f in sorted(first) if first[f][0] is not None])
    xy2 = np.array([second[f][:2] for f in sorted(second) if second[f][0] is not None])
    assert xy1.shape == xy2.shape and len(xy1) > 300
    np.testing.assert_allclose(xy1, xy2, rtol=0, atol=1e-9)
    assert [first[f][2:4] for f in sorted(first)] == [second[f][2:4] for f in sorted(second)]
    # A different seed gives a different picture (the seed really reaches UMAP).
    other = layout.umap_layout(layout.coactivation_profiles(
        again, np.array(sorted(f for f in second if second[f][0] is not None)),
        np.array([second[f][4] for f in sorted(second) if second[f][0] is not None])), LayoutConfig(
        n_neighbors=CFG.n_neighbors, seed=CFG.seed + 1))
    assert not np.allclose(other, xy1)
    again.close()


def test_live_features_get_coordinates_and_dead_ones_stay_null(laid_out):
    store, summary = laid_out
    rows = _features(store)
    for fid, (ux, uy, gx, gy, n_active, _) in rows.items():
        if n_active > 0:
            assert ux is not None and uy is not None and math.isfinite(ux) and math.isfinite(uy)
        else:
            assert ux is None and uy is None and gx is None and gy is None, f"dead feature {fid} was laid out"
    assert any(r[4] == 0 for r in rows.values()), "the synthetic data must contain dead features"
    assert summary["n_live"] == sum(1 for r in rows.values() if r[4] > 0)


def test_grid_assignment_is_one_to_one_and_takes_the_strongest(laid_out):
    store, summary = laid_out
    rows = _features(store)
    placed = {f: (r[2], r[3]) for f, r in rows.items() if r[2] is not None}
    assert len(placed) == CFG.n_map_features == summary["n_placed"]
    assert len(set(placed.values())) == len(placed), "two features share a cell"
    assert all(0 <= x < CFG.grid_side and 0 <= y < CFG.grid_side for x, y in placed.values())
    assert all((r[2] is None) == (r[3] is None) for r in rows.values())
    by_strength = sorted(rows, key=lambda f: (-rows[f][5], f))[:CFG.n_map_features]
    assert set(placed) == set(by_strength)


def test_assign_grid_keeps_neighbours_and_handles_clumps():
    rng = np.random.default_rng(0)
    # Two tight clumps far apart: every cell stays unique, and each clump's points stay together.
    xy = np.concatenate([rng.normal(0, 0.01, (100, 2)), rng.normal(10, 0.01, (100, 2))])
    cells = layout.assign_grid(xy, 20)
    assert len({tuple(c) for c in cells}) == 200
    centre_a, centre_b = cells[:100].mean(0), cells[100:].mean(0)
    spread_a = np.linalg.norm(cells[:100] - centre_a, axis=1).max()
    assert np.linalg.norm(centre_a - centre_b) > 2 * spread_a
    # A full grid (as many points as cells) is still a permutation.
    full = layout.assign_grid(rng.normal(size=(64, 2)), 8)
    assert len({tuple(c) for c in full}) == 64
    # Points on a diagonal line map (monotonically) to cells along it.
    line = np.stack([np.arange(10.0), np.arange(10.0)], 1)
    diag = layout.assign_grid(line, 10)
    assert (np.diff(diag[:, 0]) >= 0).all() and (np.diff(diag[:, 1]) >= 0).all()


def test_coactivating_features_land_near_each_other(laid_out, synthetic):
    store, _ = laid_out
    rows = _features(store)
    ids = np.array([f for f in sorted(rows) if rows[f][0] is not None])
    xy = np.array([rows[f][:2] for f in ids])
    grid = {f: rows[f][2:4] for f in ids if rows[f][2] is not None}
    cluster = synthetic["cluster"][ids]
    rng = np.random.default_rng(1)
    i, j = rng.integers(0, len(ids), 4000), rng.integers(0, len(ids), 4000)
    keep = i != j
    i, j = i[keep], j[keep]
    d = np.linalg.norm(xy[i] - xy[j], axis=1)
    same = cluster[i] == cluster[j]
    assert np.median(d[same]) < 0.5 * np.median(d[~same])
    # The grid keeps it: same-cluster placed features are nearer on the grid than random placed pairs.
    placed = np.array(sorted(grid))
    cells = np.array([grid[f] for f in placed], float)
    pc = synthetic["cluster"][placed]
    a, b = rng.integers(0, len(placed), 3000), rng.integers(0, len(placed), 3000)
    gd = np.linalg.norm(cells[a] - cells[b], axis=1)
    sm = (pc[a] == pc[b]) & (a != b)
    assert np.median(gd[sm]) < 0.6 * np.median(gd[pc[a] != pc[b]])


def test_tiles_exist_for_every_level_and_index_lists_placed_features(laid_out):
    store, summary = laid_out
    map_dir = store.paths.map_dir
    index = json.loads((map_dir / "index.json").read_text())
    full = CFG.grid_side * CFG.cell_px  # 336 px → 6 tiles of 64 at full resolution
    assert index["full_px"] == full and index["grid_side"] == CFG.grid_side and index["tile_px"] == CFG.tile_px
    levels = index["levels"]
    assert [lv["z"] for lv in levels] == list(range(len(levels)))
    assert levels[-1]["size"] == full and levels[-1]["n_tiles"] == math.ceil(full / CFG.tile_px)
    assert levels[0]["n_tiles"] == 1 and levels[0]["size"] <= CFG.tile_px
    for lower, upper in zip(levels, levels[1:]):
        assert lower["size"] == (upper["size"] + 1) // 2
    n_files = 0
    for lv in levels:
        files = sorted(p.name for p in (map_dir / str(lv["z"])).iterdir())
        expected = sorted(f"{x}_{y}.webp" for x in range(lv["n_tiles"]) for y in range(lv["n_tiles"]))
        assert files == expected, f"level {lv['z']}"
        n_files += len(files)
        with Image.open(map_dir / str(lv["z"]) / "0_0.webp") as im:
            assert im.size == (min(CFG.tile_px, lv["size"]),) * 2
    assert n_files == summary["n_tiles"]
    rows = {r[0]: (r[1], r[2], r[3]) for r in store.query(
        "SELECT feature_id, grid_x, grid_y, label FROM features WHERE grid_x IS NOT NULL")}
    listed = {f["id"]: (f["x"], f["y"], f["label"]) for f in index["features"]}
    assert listed == rows
    assert all(f["url"] == f"features/{f['id']}.html" for f in index["features"])
    assert not list(map_dir.parent.glob(".map.tmp*")), "temp folder left behind"


def test_cells_show_the_first_feature_render_or_a_placeholder(tmp_path, synthetic):
    store = _store_with(tmp_path, synthetic)
    strongest = store.query("SELECT feature_id FROM features ORDER BY strength DESC, feature_id LIMIT 2")
    with_pic, without_pic = strongest[0][0], strongest[1][0]
    pic_dir = tmp_path / "renders" / "feature"
    pic_dir.mkdir(parents=True)
    # Seed 0 (red) is the one shown, not seed 1 (blue).
    for seed, colour in ((1, (0, 0, 255)), (0, (255, 0, 0))):
        Image.new("RGB", (40, 40), colour).save(pic_dir / f"{with_pic}_{seed}.webp")
        store.con.execute("INSERT INTO renders (render_id, kind, feature_a, seed, path) VALUES (?, 'feature', ?, ?, ?)",
                          [f"r{seed}", with_pic, seed, f"renders/feature/{with_pic}_{seed}.webp"])
    cfg = LayoutConfig(n_map_features=20, grid_side=6, n_neighbors=10, cell_px=16, tile_px=32, seed=0)
    summary = layout.run(cfg, store)
    assert summary["n_pictures"] == 1
    max_z = summary["n_levels"] - 1

    def cell_rgb(fid):
        gx, gy = store.query("SELECT grid_x, grid_y FROM features WHERE feature_id = ?", [fid])[0]
        px, py = gx * cfg.cell_px + cfg.cell_px // 2, gy * cfg.cell_px + cfg.cell_px // 2
        with Image.open(store.paths.map_dir / str(max_z) / f"{px // cfg.tile_px}_{py // cfg.tile_px}.webp") as im:
            return np.asarray(im.convert("RGB"))[py % cfg.tile_px, px % cfg.tile_px].astype(int)

    red = cell_rgb(with_pic)
    assert red[0] > 180 and red[1] < 60 and red[2] < 60, red
    grey = cell_rgb(without_pic)
    assert np.abs(grey - np.array(layout.PLACEHOLDER_RGB)).max() < 20, grey
    store.close()


def test_few_live_features_fall_back_and_still_place_them(tmp_path):
    data = synthetic_activity(12, 60, 2, top_k=4, dead_fraction=0.0, seed=2)
    store = _store_with(tmp_path, data)
    summary = layout.run(LayoutConfig(n_map_features=10, grid_side=4, n_neighbors=15, cell_px=8, tile_px=16), store)
    assert summary["n_placed"] == 10
    xy = np.array(store.query("SELECT umap_x, umap_y FROM features WHERE umap_x IS NOT NULL"), float)
    assert len(xy) == 12 and np.isfinite(xy).all() and xy.std(0).min() > 0
    cells = store.query("SELECT grid_x, grid_y FROM features WHERE grid_x IS NOT NULL")
    assert len(set(cells)) == 10
    store.close()


def test_bad_input_is_a_user_error(tmp_path):
    store = Store.open(tmp_path / "empty")
    with pytest.raises(StageInputError, match="no features"):
        layout.run(CFG, store)
    insert_synthetic(store, synthetic_activity(20, 50, 2, seed=0))
    with pytest.raises(AtlasError, match="tile_px"):
        load_config("tiny", overrides={"layout": {"tile_px": 15}})
    with pytest.raises(AtlasError, match="grid_side"):
        load_config("tiny", overrides={"layout": {"grid_side": 0}})
    store.con.execute("UPDATE feature_stats SET n_active = 0")
    with pytest.raises(StageInputError, match="no live features"):
        layout.run(CFG, store)
    store.close()


def test_reset_clears_columns_and_the_map_page_copies_the_map_under_its_content_hash(tmp_path, synthetic):
    from atlasgen.config import SiteConfig
    from atlasgen.site.assets import SiteFiles
    from atlasgen.site.data import SiteData
    from atlasgen.site.pages.feature_map import map_context
    store = _store_with(tmp_path / "out", synthetic)
    cfg = LayoutConfig(n_map_features=30, grid_side=8, n_neighbors=10, cell_px=16, tile_px=32)
    summary = layout.run(cfg, store)
    site_dir = tmp_path / "site"
    data = SiteData(store, SiteConfig(), SiteFiles(store.paths.out_dir, site_dir))
    ctx = map_context(data)["map"]
    assert ctx["n_placed"] == 30 and ctx["grid_side"] == 8
    tag = summary["content_hash"]
    assert ctx["index_url"] == f"map/{tag}/index.json" and ctx["tiles_url"] == f"map/{tag}/"
    assert re.fullmatch(rf"map/{tag}/labels-[0-9a-f]{{12}}\.json", ctx["labels_url"])
    src_files = sorted(p.relative_to(store.paths.map_dir) for p in store.paths.map_dir.rglob("*") if p.is_file())
    dst_files = sorted(p.relative_to(site_dir / "map" / tag) for p in (site_dir / "map").rglob("*")
                       if p.is_file() and not p.name.startswith("labels-"))
    assert src_files == dst_files and len(src_files) > 3
    # The labels file: every placed feature at its cell from the store, strongest first like the index.
    labels = json.loads((site_dir / ctx["labels_url"]).read_text())
    index = json.loads((store.paths.map_dir / "index.json").read_text())
    assert [r[0] for r in labels["features"]] == [f["id"] for f in index["features"]]
    cells = {f["feature_id"]: (f["grid_x"], f["grid_y"]) for f in store.feature_rows()}
    assert all(cells[fid] == (x, y) for fid, x, y, *_ in labels["features"])
    assert all(-1 <= r[3] < len(labels["names"]) and len(r[5]) <= 4 for r in labels["features"])
    layout.reset(store)
    assert store.scalar("SELECT count(*) FROM features WHERE umap_x IS NOT NULL OR grid_x IS NOT NULL") == 0
    assert (store.paths.map_dir / "index.json").exists(), "reset keeps the map until a new one is swapped in"
    store.close()


def test_map_content_hash_follows_the_tiles(tmp_path, synthetic):
    """Same input, same hash (URLs stay cached); other tiles, another hash (no stale tile under /map/*)."""
    store = _store_with(tmp_path / "out", synthetic)
    cfg = LayoutConfig(n_map_features=30, grid_side=8, n_neighbors=10, cell_px=16, tile_px=32)
    first = layout.run(cfg, store)["content_hash"]
    assert layout.run(cfg, store)["content_hash"] == first
    index = json.loads((store.paths.map_dir / "index.json").read_text())
    assert index["content_hash"] == first == layout.map_content_hash(store.paths.map_dir, index)
    tile = next((store.paths.map_dir / "0").glob("*.webp"))
    tile.write_bytes(tile.read_bytes() + b"\0")
    assert layout.map_content_hash(store.paths.map_dir, index) != first, "a changed tile changes the hash"
    assert layout.run(LayoutConfig(n_map_features=30, grid_side=8, n_neighbors=10, cell_px=20, tile_px=32),
                      store)["content_hash"] != first
    store.close()


def test_tiny_build_gets_a_map_with_its_grid(tiny_encoded, tmp_path):
    from atlasgen.config import load_config
    from atlasgen.pipeline import run_stages
    out = tmp_path / "build"
    shutil.copytree(tiny_encoded, out)
    cfg = load_config("tiny")
    with Store.open(out) as store:
        summaries = run_stages(cfg, store, ["layout"])
        n_live = store.scalar("SELECT count(*) FROM features WHERE n_active > 0")
        n_placed = store.scalar("SELECT count(*) FROM features WHERE grid_x IS NOT NULL")
        assert n_placed == min(cfg.layout.n_map_features, n_live) == summaries["layout"]["n_placed"]
        assert store.scalar("SELECT max(grid_x) FROM features") < cfg.layout.grid_side
        assert store.scalar("SELECT count(*) FROM features WHERE umap_x IS NOT NULL") == n_live
    index = json.loads((out / "map" / "index.json").read_text())
    assert index["grid_side"] == cfg.layout.grid_side == 16 and len(index["features"]) == n_placed
    assert (out / "map" / str(len(index["levels"]) - 1) / "0_0.webp").exists()


def test_lost_map_files_are_drawn_again_without_umap(tmp_path, synthetic, monkeypatch):
    """A finished layout that lost map files draws the map again from `feature_map` (its repair): no UMAP,
    the same tiles, index and content hash, and the stage keeps its finish time."""
    import dataclasses
    from atlasgen.pipeline import run_stages
    cfg = load_config("tiny", overrides={"layout": dataclasses.asdict(CFG)})
    with _store_with(tmp_path / "out", synthetic) as store:
        first = run_stages(cfg, store, ["layout"])["layout"]
        before = store.stage_row("layout")
        index_path = store.paths.map_dir / layout.MAP_INDEX_NAME
        index = index_path.read_text()
        tiles = sorted(store.paths.map_dir.rglob("*.webp"))
        lost = tiles[len(tiles) // 2]
        lost_bytes = lost.read_bytes()
        lost.unlink()

        def umap_again(*args, **kwargs):
            raise AssertionError("UMAP ran again")

        monkeypatch.setattr(layout, "umap_layout", umap_again)
        again = run_stages(cfg, store, ["layout"])["layout"]
        assert again["repaired"] and again["content_hash"] == first["content_hash"]
        assert lost.read_bytes() == lost_bytes and index_path.read_text() == index
        assert sorted(store.paths.map_dir.rglob("*.webp")) == tiles
        assert store.stage_row("layout")["finished_at"] == before["finished_at"]
        assert run_stages(cfg, store, ["layout"])["layout"]["skipped"]
