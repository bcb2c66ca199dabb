"""Benchmark of the site stage on a synthetic store, and the synthetic store itself (also used by tests).

    python benchmarks/site.py            # 12,288 features, 4 seeds each, 20,000 images
    python benchmarks/site.py --quick    # 2,048 features (under a minute)

Prints pages/s and the site size per feature, against a baseline measured in the same run: writing the
same number of files of the same total size with plain Python (the floor any site generator pays).
The pictures are fake (a few distinct small WebP files written many times): fine for timing, not for looking.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HOSTILE_LABEL = '<script>alert("pwned")</script> & "quoted" \'label\''


def _webp_bytes(rng: np.random.Generator, side: int, n_variants: int) -> list[bytes]:
    from PIL import Image
    out = []
    for _ in range(n_variants):
        pixels = rng.integers(0, 255, size=(side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="WEBP", quality=60)
        out.append(buf.getvalue())
    return out


def make_synthetic_store(out_dir: Path | str, n_features: int = 64, n_images: int = 200, n_labels: int = 8,
                         n_active_per_image: int = 12, n_seeds: int = 2, n_pairs: int = 2, slerp_steps: int = 5,
                         n_top: int = 16, picture_side: int = 48, hostile: bool = True, seed: int = 0) -> Path:
    """Fill `out_dir/atlas.duckdb` with plausible rows in every table and write small WebP pictures.

    Feature 0 (and the first label) get a hostile label with markup and quotes when `hostile`. Every
    upstream stage is marked done, so `atlasgen site --out out_dir` runs on it. Returns out_dir."""
    import pyarrow as pa

    from atlasgen.store import Store, now

    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    labels = [f"class {i}" for i in range(n_labels)]
    if hostile:
        labels[0] = HOSTILE_LABEL
    pictures = _webp_bytes(rng, picture_side, 8)

    with Store.open(out_dir) as store:
        paths = store.paths
        con = store.con
        image_ids = np.arange(n_images, dtype=np.int32)
        label_ids = (image_ids % n_labels).astype(np.int32)
        paths.thumbs_dir.mkdir(parents=True, exist_ok=True)
        for i in image_ids:
            paths.thumb(int(i)).write_bytes(pictures[int(i) % len(pictures)])

        # Sparse activations: each image fires a few features, biased by its label so labels mean something.
        # The last tenth of the features never fire (dead), as in a real SAE.
        n_live = max(2, n_features - n_features // 10)
        act_image, act_feature, act_value = [], [], []
        for i in image_ids:
            base = (int(label_ids[i]) * 7) % n_live
            chosen = set(((base + rng.integers(0, 5, size=3)) % n_live).tolist())
            chosen |= set(rng.choice(n_live, size=min(n_live, n_active_per_image), replace=False).tolist())
            chosen = sorted(chosen)[:n_active_per_image + 3]
            values = rng.gamma(2.0, 0.05, size=len(chosen)).astype(np.float32) + 1e-3
            act_image += [int(i)] * len(chosen)
            act_feature += chosen
            act_value += values.tolist()
        act_image = np.array(act_image, np.int32)
        act_feature = np.array(act_feature, np.int32)
        act_value = np.array(act_value, np.float32)

        with store.transaction():
            store.insert_frame("images", {
                "image_id": image_ids, "source": [f"/data/img_{i}.jpg" for i in image_ids],
                "label": [labels[j] for j in label_ids], "label_id": label_ids,
                "width": np.full(n_images, 320, np.int32), "height": np.full(n_images, 240, np.int32),
                "corpus_path": [f"corpus/{i:08d}.jpg" for i in image_ids]})
            store.record_skip("/data/broken.jpg", "ingest", "cannot identify image file")
            store.insert_embeddings(image_ids, rng.normal(size=(n_images, 8)).astype(np.float32))
            con.execute("INSERT INTO sae_runs VALUES ('synthetic', 8, ?, '{}', 'sae/synthetic/sae.safetensors', "
                        "2000, 0.012, 0.21, 14.5, 0.04, 37, ?)", [n_features, now()])
            steps = np.arange(25, 2025, 25)
            store.insert_frame("sae_metrics", {
                "run_id": ["synthetic"] * len(steps), "step": steps.astype(np.int32),
                "mse": 0.05 * np.exp(-steps / 600) + 0.01, "fvu": 0.8 * np.exp(-steps / 500) + 0.2,
                "l1": 0.3 * np.exp(-steps / 800), "l0": 60 * np.exp(-steps / 400) + 14,
                "dead_fraction": 0.3 * np.exp(-steps / 300) + 0.04, "lr": np.full(len(steps), 1e-3),
                "n_resampled": np.where(steps % 400 == 0, 5, 0).astype(np.int32)})
            store.insert_frame("activations", {"image_id": act_image, "feature_id": act_feature, "value": act_value})

            # Feature stats, top images and labels from the activations, in SQL as encode would.
            con.execute(f"""
                INSERT INTO top_images
                SELECT feature_id, rank, image_id, value FROM (
                    SELECT feature_id, image_id, value,
                           (row_number() OVER (PARTITION BY feature_id ORDER BY value DESC, image_id) - 1)::INT AS rank
                    FROM activations) WHERE rank < {int(n_top)}""")
            con.execute(f"""
                INSERT INTO features (feature_id, n_active, frequency, max_value, mean_value, q50, q90, q99,
                                      histogram, strength)
                SELECT f.i, coalesce(s.n, 0), coalesce(s.n, 0) / {n_images}, s.mx, s.mean, s.q50, s.q90, s.q99,
                       CASE WHEN s.n IS NULL THEN NULL ELSE h.hist END, coalesce(s.n, 0) / {n_images} * s.mean
                FROM range({n_features}) f(i)
                LEFT JOIN (SELECT feature_id, count(*) n, max(value) mx, avg(value) mean,
                                  quantile_cont(value, 0.5) q50, quantile_cont(value, 0.9) q90,
                                  quantile_cont(value, 0.99) q99
                           FROM activations GROUP BY feature_id) s ON s.feature_id = f.i
                LEFT JOIN (SELECT feature_id, list(coalesce(c, 0) ORDER BY b) hist FROM (
                               SELECT a.feature_id, b.b, c.c FROM (SELECT DISTINCT feature_id FROM activations) a
                               CROSS JOIN range(20) b(b)
                               LEFT JOIN (SELECT a.feature_id,
                                                 least(19, floor(a.value / m.mx * 20))::INT bin, count(*)::INT c
                                          FROM activations a JOIN (SELECT feature_id, max(value) mx FROM activations
                                                                   GROUP BY feature_id) m USING (feature_id)
                                          GROUP BY ALL) c ON c.feature_id = a.feature_id AND c.bin = b.b)
                           GROUP BY feature_id) h ON h.feature_id = f.i""")
            con.execute("""
                UPDATE features SET label = l.label_name || ' (' || l.n || '/' || l.total || ')',
                                    label_name = l.label_name, label_purity = l.n / l.total
                FROM (SELECT feature_id, label_name, n, total FROM (
                          SELECT t.feature_id, i.label label_name, count(*) n,
                                 sum(count(*)) OVER (PARTITION BY t.feature_id) total,
                                 row_number() OVER (PARTITION BY t.feature_id ORDER BY count(*) DESC, i.label) r
                          FROM top_images t JOIN images i USING (image_id) GROUP BY t.feature_id, i.label)
                      WHERE r = 1) l
                WHERE features.feature_id = l.feature_id""")
            if hostile:
                con.execute("UPDATE features SET label = ?, label_name = ? WHERE feature_id = 0",
                            [HOSTILE_LABEL + " (9/16)", HOSTILE_LABEL])
            live = np.array([r[0] for r in con.execute(
                "SELECT feature_id FROM features WHERE n_active > 0 ORDER BY feature_id").fetchall()], np.int32)
            umap_nd = rng.normal(size=(len(live), 2))
            side = max(4, int(np.ceil(np.sqrt(len(live)))))
            on_map = rng.random(len(live)) < 0.8
            con.register("_map", pa.table({
                "feature_id": live, "ux": umap_nd[:, 0], "uy": umap_nd[:, 1],
                "gx": np.where(on_map, np.arange(len(live)) % side, -1).astype(np.int32),
                "gy": np.where(on_map, np.arange(len(live)) // side, -1).astype(np.int32)}))
            con.execute("""UPDATE features SET umap_x = m.ux, umap_y = m.uy,
                               grid_x = CASE WHEN m.gx < 0 THEN NULL ELSE m.gx END,
                               grid_y = CASE WHEN m.gy < 0 THEN NULL ELSE m.gy END
                           FROM _map m WHERE features.feature_id = m.feature_id""")
            con.unregister("_map")

            n_sim = min(10, n_features - 1)
            sim_f = np.repeat(np.arange(n_features, dtype=np.int32), n_sim)
            sim_rank = np.tile(np.arange(n_sim, dtype=np.int32), n_features)
            sim_other = ((sim_f + 1 + rng.integers(0, n_features - 1, size=len(sim_f))) % n_features).astype(np.int32)
            sim_cos = np.sort(rng.uniform(0.1, 0.6, size=(n_features, n_sim)), axis=1)[:, ::-1].reshape(-1)
            store.insert_frame("similar_features", {"feature_id": sim_f, "rank": sim_rank, "other_id": sim_other,
                                                    "cosine": sim_cos.astype(np.float32)})
            con.execute("""
                INSERT INTO coactivation
                SELECT a.feature_id, b.feature_id, count(*)::INT FROM activations a JOIN activations b
                    ON a.image_id = b.image_id AND a.feature_id < b.feature_id GROUP BY ALL""")

            # Renders: every feature × seeds, a few pairs (sum, slerp, orth both ways), images, ablation.
            rows: dict[str, list] = {k: [] for k in ("render_id", "kind", "feature_a", "feature_b", "image_id", "t",
                                                     "seed", "variant", "path", "cosine", "self_activation",
                                                     "self_rank")}

            def add(kind, a=None, b=None, image=None, t=None, s=0, variant="transformer+aug", self_act=None,
                    self_rank=None):
                render_id = f"{kind}{len(rows['render_id']):07d}{rng.integers(0, 1 << 30):08x}"
                rel = f"renders/{kind}/{render_id}.webp"
                target = out_dir / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(pictures[len(rows["render_id"]) % len(pictures)])
                for key, value in zip(rows, (render_id, kind, a, b, image, t, s, variant, rel,
                                             float(rng.uniform(0.3, 0.9)), self_act, self_rank)):
                    rows[key].append(value)

            for f in range(n_features):
                for s in range(n_seeds):
                    fires = bool(rng.random() < 0.7)
                    add("feature", a=f, s=s, self_act=float(rng.uniform(0.01, 0.3)) if fires else 0.0,
                        self_rank=int(rng.integers(0, 3)) if fires else int(rng.integers(20, 400)))
            pairs = [(int(a), int(b)) for a, b in zip(live[:n_pairs], live[::-1][:n_pairs]) if a != b][:n_pairs]
            for a, b in pairs:
                add("sum", a=a, b=b)
                for t in np.linspace(0, 1, slerp_steps):
                    add("slerp", a=a, b=b, t=float(t))
                add("orth", a=a, b=b)
                add("orth", a=b, b=a)
            for image in image_ids[:2]:
                add("image", image=int(image))
            for variant in ("pixels", "pixels+aug", "transformer+aug"):
                add("ablation", image=0, variant=variant)
            n_r = len(rows["render_id"])
            rows["params_json"] = ["{}"] * n_r
            rows["created_at"] = [now()] * n_r
            types = {"feature_a": pa.int32(), "feature_b": pa.int32(), "image_id": pa.int32(), "t": pa.float64(),
                     "self_activation": pa.float64(), "self_rank": pa.int32(), "seed": pa.int32()}
            store.insert_frame("renders", {k: pa.array(v, type=types.get(k)) for k, v in rows.items()})

            paths.probes_dir.mkdir(parents=True, exist_ok=True)
            probe_rows: dict[str, list] = {k: [] for k in ("probe", "step", "step_value", "step_label", "image_path",
                                                           "feature_id", "value")}
            for step in range(5):
                rel = f"probes/shrink_{step}.webp"
                (out_dir / rel).write_bytes(pictures[step % len(pictures)])
                for f in live[:3]:
                    for key, value in zip(probe_rows, ("shrink", step, 224 / (step + 1), f"{224 // (step + 1)} px",
                                                       rel, int(f), float(rng.uniform(0, 0.3)))):
                        probe_rows[key].append(value)
            store.insert_frame("probes", probe_rows)

            for stage in ("ingest", "embed", "train", "encode", "render", "layout", "probe", "toy"):
                config = {"model": "synthetic-vits16"} if stage == "embed" else {}
                con.execute("INSERT OR REPLACE INTO stage_runs VALUES (?, ?, 'done', ?, '{}', ?, ?)",
                            [stage, f"synthetic-{stage}", json.dumps(config), now(), now()])
    return out_dir


def _baseline_write(n_files: int, total_bytes: int, folder: Path) -> float:
    """Seconds to write n_files files of total_bytes in plain Python: the floor for any generator."""
    payload = b"x" * max(1, total_bytes // max(1, n_files))
    t0 = time.perf_counter()
    for i in range(n_files):
        sub = folder / f"{i % 64:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"{i}.html").write_bytes(payload)
    return time.perf_counter() - t0


def _dir_size(folder: Path) -> tuple[int, int]:
    n, size = 0, 0
    for root, _, files in os.walk(folder):
        for name in files:
            n += 1
            size += os.path.getsize(os.path.join(root, name))
    return n, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,048 features instead of 12,288 (under a minute)")
    parser.add_argument("--no-search", action="store_true", help="skip the Pagefind index")
    parser.add_argument("--keep", type=Path, default=None, help="build into this folder and keep it")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from atlasgen.stages import site
    from atlasgen.config import SiteConfig
    from atlasgen.progress import set_quiet
    from atlasgen.store import Store

    n_features = 2048 if args.quick else 12_288
    n_images = 4000 if args.quick else 20_000
    work = args.keep or Path(tempfile.mkdtemp(prefix="atlasgen-site-bench-"))
    set_quiet(True)
    t0 = time.perf_counter()
    make_synthetic_store(work, n_features=n_features, n_images=n_images, n_labels=100, n_seeds=4, n_pairs=6,
                         slerp_steps=11, hostile=False)
    print(f"synthetic store: {n_features:,} features, {n_images:,} images in {time.perf_counter() - t0:.1f}s")
    with Store.open(work) as store:
        t0 = time.perf_counter()
        summary = site.run(SiteConfig(search_index=not args.no_search), store)
        seconds = time.perf_counter() - t0
        n_files, size = _dir_size(store.paths.site_dir)
        html = list(store.paths.site_dir.rglob("*.html"))
        html_bytes = sum(p.stat().st_size for p in html)
    baseline_dir = Path(tempfile.mkdtemp(prefix="atlasgen-site-baseline-"))
    baseline = _baseline_write(len(html), html_bytes, baseline_dir)
    shutil.rmtree(baseline_dir)
    print(f"site stage: {seconds:.1f}s for {len(html):,} pages -> {len(html) / seconds:,.0f} pages/s "
          f"(page-phase {summary.get('seconds_pages', 0):.1f}s, search index {summary.get('seconds_search', 0):.1f}s)")
    print(f"baseline (plain writes of the same {len(html):,} files): {baseline:.2f}s -> site stage is "
          f"{seconds / baseline:.0f}x the floor")
    print(f"site: {n_files:,} files, {size / 1e6:.1f} MB, {size / n_features / 1e3:.1f} kB per feature "
          f"(HTML {html_bytes / n_features / 1e3:.1f} kB per feature)")
    biggest = max(html, key=lambda p: p.stat().st_size)
    print(f"largest page: {biggest.relative_to(store.paths.site_dir)} {biggest.stat().st_size / 1e3:.0f} kB")
    if args.keep is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
