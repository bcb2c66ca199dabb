"""Test scaffolding shared by the tests and the benchmarks: synthetic stores and activity.

Nothing here is used by a build. Synthetic data is plausible, seeded and fast to make; the pictures are fake
(a few distinct small WebP files written many times): fine for timing and page tests, not for looking.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp

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
                INSERT INTO feature_stats (feature_id, n_active, frequency, max_value, mean_value, q50, q90, q99,
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
                UPDATE feature_stats SET label = l.label_name || ' (' || l.n || '/' || l.total || ')',
                                    label_name = l.label_name, label_purity = l.n / l.total
                FROM (SELECT feature_id, label_name, n, total FROM (
                          SELECT t.feature_id, i.label label_name, count(*) n,
                                 sum(count(*)) OVER (PARTITION BY t.feature_id) total,
                                 row_number() OVER (PARTITION BY t.feature_id ORDER BY count(*) DESC, i.label) r
                          FROM top_images t JOIN images i USING (image_id) GROUP BY t.feature_id, i.label)
                      WHERE r = 1) l
                WHERE feature_stats.feature_id = l.feature_id""")
            if hostile:
                con.execute("UPDATE feature_stats SET label = ?, label_name = ? WHERE feature_id = 0",
                            [HOSTILE_LABEL + " (9/16)", HOSTILE_LABEL])
            live = np.array([r[0] for r in con.execute(
                "SELECT feature_id FROM feature_stats WHERE n_active > 0 ORDER BY feature_id").fetchall()], np.int32)
            umap_nd = rng.normal(size=(len(live), 2))
            side = max(4, int(np.ceil(np.sqrt(len(live)))))
            on_map = rng.random(len(live)) < 0.8
            gx = np.where(on_map, np.arange(len(live)) % side, -1)
            gy = np.where(on_map, np.arange(len(live)) // side, -1)
            store.insert_frame("feature_map", {
                "feature_id": live, "umap_x": umap_nd[:, 0], "umap_y": umap_nd[:, 1],
                "grid_x": pa.array(gx, mask=gx < 0).cast(pa.int32()), "grid_y": pa.array(gy, mask=gy < 0).cast(pa.int32())})

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
                summary = {"run_id": "synthetic"} if stage == "train" else {"sae_run_id": "synthetic"}
                con.execute("INSERT OR REPLACE INTO stage_runs VALUES (?, ?, 'done', ?, ?, ?, ?, NULL)",
                            [stage, f"synthetic-{stage}", json.dumps(config), json.dumps(summary), now(), now()])
    return out_dir


def synthetic_activity(n_features: int, n_images: int, n_clusters: int, top_k: int = 32, in_cluster: float = 0.8,
                       dead_fraction: float = 0.05, seed: int = 0) -> dict:
    """Planted clusters: each image picks a cluster and activates ~in_cluster of its top_k features from it,
    the rest at random. Returns feature stats, the cluster of every feature and co-activation counts."""
    rng = np.random.default_rng(seed)
    cluster_f = rng.integers(0, n_clusters, n_features)
    dead = rng.random(n_features) < dead_fraction
    # Zipf-like popularity inside clusters, so frequencies (and strengths) spread like real features'.
    pop = (1.0 / rng.permutation(np.arange(1, n_features + 1)) ** 0.6) * ~dead
    members = [np.flatnonzero((cluster_f == c) & ~dead) for c in range(n_clusters)]
    all_live = np.flatnonzero(~dead)
    top_k = min(top_k, len(all_live))
    rows, cols = [], []
    img_cluster = rng.integers(0, n_clusters, n_images)
    n_in = int(round(top_k * in_cluster))
    for i in range(n_images):
        mem = members[img_cluster[i]]
        take_in = min(n_in, len(mem))
        chosen = set()
        if take_in:
            p = pop[mem] / pop[mem].sum()
            chosen.update(rng.choice(mem, take_in, replace=False, p=p).tolist())
        while len(chosen) < top_k:
            chosen.update(rng.choice(all_live, top_k - len(chosen)).tolist())
        rows.extend([i] * len(chosen))
        cols.extend(chosen)
    acts = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_images, n_features))
    co = (acts.T @ acts).tocoo()
    upper = co.row < co.col
    n_active = np.asarray(acts.sum(axis=0)).ravel().astype(np.int64)
    mean_value = np.where(n_active > 0, rng.uniform(0.5, 3.0, n_features), np.nan)
    frequency = n_active / n_images
    return {
        "feature_id": np.arange(n_features), "cluster": cluster_f, "n_active": n_active, "frequency": frequency,
        "mean_value": mean_value, "strength": np.nan_to_num(frequency * mean_value),
        "feature_a": co.row[upper].astype(np.int64), "feature_b": co.col[upper].astype(np.int64),
        "n_images": co.data[upper].astype(np.int64),
    }


def insert_synthetic(store, data: dict) -> None:
    """Write synthetic_activity() output into the features and coactivation tables (labels 'cluster C')."""
    with store.transaction():
        store.insert_frame("feature_stats", {
            "feature_id": data["feature_id"].astype(np.int32), "n_active": data["n_active"].astype(np.int32),
            "frequency": data["frequency"], "mean_value": data["mean_value"], "strength": data["strength"],
            "label": [f"cluster {c}" for c in data["cluster"]]})
        store.insert_frame("coactivation", {
            "feature_a": data["feature_a"].astype(np.int32), "feature_b": data["feature_b"].astype(np.int32),
            "n_images": data["n_images"].astype(np.int32)})


def disable_features(feature_ids) -> "Callable":
    """An `on_init` hook for `train.train_sae` that makes these features unable to fire at the start (zero
    encoder column, negative bias), so only dead-feature resampling can revive them."""
    def hook(sae) -> None:
        sae.W_enc[:, feature_ids] = 0.0
        sae.b_enc[feature_ids] = -1.0
    return hook


def run_stage(store, cfg) -> dict:
    """Run the stage whose config `cfg` is, as the pipeline would record it (started, then done with its
    summary), so stages after it find what it used. For tests that drive one stage with a hand-made config."""
    from .config import config_hash, config_json
    from .stages import REGISTRY
    stage = next(s for s in REGISTRY if isinstance(cfg, s.config))
    store.mark_stage_started(stage.name, config_hash(cfg), config_json(cfg))
    summary = dict(stage.run(cfg, store) or {})
    store.mark_stage_done(stage.name, summary)
    return summary


def record_sae(store, sae, run_id: str = "run0", used_by: tuple[str, ...] = ("train", "encode")) -> None:
    """Save a hand-made SAE as training run `run_id` and record it as the run the `used_by` stages used
    (train's `run_id`, the others' `sae_run_id`), as a build would leave it."""
    folder = store.paths.sae_dir(run_id)
    sae.save(folder)
    store.save_sae_run({"run_id": run_id, "d_in": sae.d_in, "n_features": sae.n_features, "config_json": "{}",
                        "weights_path": (folder / "sae.safetensors").relative_to(store.paths.out_dir).as_posix(),
                        "n_steps": 0, "mse": None, "fvu": None, "l0": None, "dead_fraction": None,
                        "n_resampled": 0}, [])
    for stage in used_by:
        row = store.stage_row(stage)
        summary = {**(row["summary"] if row else {}), ("run_id" if stage == "train" else "sae_run_id"): run_id}
        if row is None or row["status"] != "done":
            store.mark_stage_started(stage, "handmade", "{}")
        store.mark_stage_done(stage, summary)


# --- ingest/embed speed: generated photos and peak memory -------------------------------------------------
_NOISE_BANK: dict[tuple[int, int], np.ndarray] = {}


def _photo_jpeg(args: tuple[str, int, int, int, int]) -> None:
    """One photo-like JPEG: smooth colour waves plus sensor-like noise, so it costs what a photo costs to
    decode (~60 KB at 500×375 and quality 90)."""
    from PIL import Image
    path, index, width, height, quality = args
    if (width, height) not in _NOISE_BANK:  # once per process: noise windows are cut from it at random offsets
        bank_rng = np.random.default_rng(width * 7919 + height)
        _NOISE_BANK[(width, height)] = bank_rng.normal(0, 9, size=(2 * height, 2 * width, 3)).astype(np.float32)
    bank = _NOISE_BANK[(width, height)]
    rng = np.random.default_rng(index)
    fx, fy, f2 = rng.uniform(0.005, 0.08, 3).astype(np.float32)
    phase = rng.uniform(0, 6.28, 3).astype(np.float32)
    x = np.arange(width, dtype=np.float32)
    y = np.arange(height, dtype=np.float32)[:, None]
    img = np.empty((height, width, 3), np.float32)
    img[..., 0] = np.sin(x * fx + phase[0]) + np.cos(y * fy + phase[1]) * 0.5
    img[..., 1] = np.cos(x * fy + phase[2]) * np.sin(y * fx) + 0.3 * np.sin(y * f2)
    img[..., 2] = np.sin(x * f2 + phase[1]) * np.cos(y * f2)
    img *= 70
    img += 128
    top, left = rng.integers(0, height), rng.integers(0, width)
    img += bank[top:top + height, left:left + width]
    np.clip(img, 0, 255, out=img)
    Image.fromarray(img.astype(np.uint8)).save(path, quality=quality)


def make_photo_folder(folder: Path | str, n_images: int, width: int = 500, height: int = 375, quality: int = 90,
                      n_procs: int = 0, n_classes: int = 10) -> Path:
    """`n_images` generated photo-like JPEGs (ImageNet-val size by default) in one sub-folder per class, written
    by a process pool (`n_procs` = 0: one per core). Deterministic by index."""
    import multiprocessing as mp

    from .threads import n_cores
    folder = Path(folder)
    jobs = []
    for i in range(n_images):
        sub = folder / f"class{i % n_classes:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        jobs.append((str(sub / f"img{i:07d}.jpg"), i, width, height, quality))
    n_procs = n_procs or n_cores()
    if n_procs == 1 or n_images < 32:
        for job in jobs:
            _photo_jpeg(job)
    else:
        with mp.get_context("fork").Pool(n_procs) as pool:
            pool.map(_photo_jpeg, jobs, chunksize=16)
    return folder


def _children(pid: int) -> list[int]:
    """A process's children: from /proc/PID/task/TID/children (a thread that ends meanwhile is passed over), or
    (kernels without that file) from every /proc/N/stat."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out.extend(int(c) for c in f.read().split())
            except FileNotFoundError:
                if os.path.isdir(f"/proc/{pid}/task/{tid}"):
                    raise  # the thread is there, the file is not: a kernel without it
        return out
    except FileNotFoundError:
        out = []  # what the scan below finds, once
    except OSError:
        return out
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def descendants(pid: int) -> list[int]:
    """A process's children, theirs, and so on (a pool's workers are its supervisor's children)."""
    out, stack = [], _children(pid)
    while stack:
        child = stack.pop()
        out.append(child)
        stack.extend(_children(child))
    return out


def running(pid: int) -> bool:
    """Whether a process runs: a zombie waiting for a reaper (that may never come in a container) does not count,
    unlike `paths.pid_alive`."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, seconds: float = 10) -> bool:
    """Whether every process in `pids` stops running within `seconds`."""
    import time
    deadline = time.time() + seconds
    while any(running(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.05)
    return not any(running(pid) for pid in pids)


def _status_bytes(pid: int | str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _uss_bytes(pid: int) -> int:
    """Pages only this process holds (Private_Clean + Private_Dirty): what a forked worker adds to its parent."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1]) * 1024
    except OSError:
        pass
    return total


def two_size_reading(n_small: int, seconds_small: float, n_big: int, seconds_big: float) -> tuple[float, float] | None:
    """wall = fixed + n / steady, read off runs at two corpus sizes: (fixed seconds, steady items/s), or None when
    the two runs cannot tell them apart: the bigger one not slower, or a negative fixed cost (the small run went
    faster per item than the marginal rate: noise, as on a shared CPU box). An estimate from two measured
    points."""
    if n_big <= n_small or seconds_big <= seconds_small:
        return None
    steady = (n_big - n_small) / (seconds_big - seconds_small)
    fixed = seconds_small - n_small / steady
    return (fixed, steady) if fixed >= 0 else None


def no_two_size_reading(name: str) -> str:
    """The line a benchmark prints where `two_size_reading` gives None, so a missing reading is not read as a
    missing run."""
    return (f"two-size reading, {name}: none (the two sizes do not separate a fixed cost from a steady rate; "
            f"noise, or too few items)")


_RESULT_PREFIX = "RESULT "


def print_result(result: dict) -> None:
    """End a benchmark's fresh process: its one result as a JSON line that `fresh_process_result` picks out of
    whatever else the process printed."""
    print(_RESULT_PREFIX + json.dumps(result, default=str), flush=True)


def fresh_process_result(cmd: list[str]) -> dict:
    """Run `cmd` (a benchmark's one-run mode, in a fresh process: clean peak memory, its own start-up) and return
    what it passed to `print_result`; RuntimeError with the end of its stderr if it failed."""
    import subprocess
    proc = subprocess.run(cmd, capture_output=True, text=True)
    results = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT_PREFIX)]
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"exit code {proc.returncode}: {proc.stderr.strip()[-3000:]}")
    return json.loads(results[-1][len(_RESULT_PREFIX):])


class PeakMemory:
    """Peak memory during the block: this process's peak RSS (the kernel's high-water mark, reset at the start;
    sampled where it cannot be reset) plus the peak of its worker processes' unique memory (USS: pages only they
    hold, so pages shared with this process — its modules, the shared-memory batches — count once). Reading a
    worker's USS walks its page tables, so those samples are spaced to cost at most ~10% of one core.

        with PeakMemory() as peak:
            work()
        print(peak.main_bytes, peak.workers_bytes, peak.peak_bytes)
    """

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.main_bytes = 0
        self.workers_bytes = 0

    @property
    def peak_bytes(self) -> int:
        return self.main_bytes + self.workers_bytes

    def __enter__(self) -> "PeakMemory":
        import threading
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (Linux ≥ 4.0)
            self._hwm = True
        except OSError:
            self._hwm = False
        self.main_bytes = _status_bytes("self", "VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        import time
        next_workers = 0.0
        while not self._stop.wait(self.interval_s):
            if not self._hwm:
                self.main_bytes = max(self.main_bytes, _status_bytes("self", "VmRSS"))
            if time.perf_counter() >= next_workers:
                t0 = time.perf_counter()
                self.workers_bytes = max(self.workers_bytes, sum(_uss_bytes(p) for p in descendants(os.getpid())))
                next_workers = time.perf_counter() + 9 * (time.perf_counter() - t0)

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
        hwm = _status_bytes("self", "VmHWM") if self._hwm else 0
        self.main_bytes = max(self.main_bytes, hwm, _status_bytes("self", "VmRSS"))
