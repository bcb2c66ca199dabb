"""The DuckDB store: the single source of truth, and a product users query with SQL.

The schema is documented in the README ("The store"); keep both in step and bump
SCHEMA_VERSION on any incompatible change.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import duckdb
import numpy as np

from .errors import AtlasError, StoreDamagedError, StoreLockedError, StoreVersionError
from .paths import BuildPaths

SCHEMA_VERSION = 1

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta (
    key VARCHAR PRIMARY KEY,
    value VARCHAR
);
CREATE TABLE IF NOT EXISTS stage_runs (
    stage VARCHAR PRIMARY KEY,          -- ingest, embed, train, encode, render, layout, probe, toy, site
    config_hash VARCHAR NOT NULL,       -- hash of the stage config and of its inputs' hashes
    status VARCHAR NOT NULL,            -- running | done
    config_json VARCHAR,
    summary_json VARCHAR,               -- what the stage reports (counts, timings)
    started_at TIMESTAMP,
    finished_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS images (
    image_id INTEGER PRIMARY KEY,
    source VARCHAR NOT NULL,            -- file path, or hf://<dataset>/<split>/<index>
    label VARCHAR,                      -- class name (NULL when unlabelled)
    label_id INTEGER,
    width INTEGER,                      -- original size, after EXIF rotation
    height INTEGER,
    corpus_path VARCHAR NOT NULL        -- normalised RGB copy, relative to the output folder
);
CREATE TABLE IF NOT EXISTS skipped_inputs (
    source VARCHAR NOT NULL,
    stage VARCHAR NOT NULL,
    reason VARCHAR NOT NULL,
    skipped_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS embeddings (
    image_id INTEGER PRIMARY KEY,
    embedding FLOAT[] NOT NULL          -- the model's CLS pooler_output (384 floats for ViT-S)
);
CREATE TABLE IF NOT EXISTS sae_runs (
    run_id VARCHAR PRIMARY KEY,         -- config hash of the train stage
    d_in INTEGER,
    n_features INTEGER,
    config_json VARCHAR,
    weights_path VARCHAR,               -- sae/<run_id>/sae.safetensors, relative to the output folder
    n_steps INTEGER,
    mse DOUBLE,                         -- final metrics over the whole corpus
    fvu DOUBLE,                         -- fraction of variance unexplained
    l0 DOUBLE,                          -- mean number of active features per image (before the top-k cap)
    dead_fraction DOUBLE,               -- features that never fire on the corpus
    n_resampled INTEGER,                -- total dead features resampled during training
    created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS sae_metrics (
    run_id VARCHAR,
    step INTEGER,                       -- last optimiser step of the logged window
    mse DOUBLE,
    fvu DOUBLE,
    l1 DOUBLE,
    l0 DOUBLE,
    dead_fraction DOUBLE,               -- fraction not fired within the dead-feature window
    lr DOUBLE,
    n_resampled INTEGER                 -- features resampled at this step (0 if none)
);
CREATE TABLE IF NOT EXISTS activations (
    image_id INTEGER NOT NULL,
    feature_id INTEGER NOT NULL,
    value FLOAT NOT NULL                -- SAE activation (top-k capped, > 0)
);
CREATE TABLE IF NOT EXISTS features (
    feature_id INTEGER PRIMARY KEY,
    n_active INTEGER,                   -- images where the feature is among the active ones
    frequency DOUBLE,                   -- n_active / number of images
    max_value DOUBLE,
    mean_value DOUBLE,                  -- mean over the images where it is active
    q50 DOUBLE, q90 DOUBLE, q99 DOUBLE, -- quantiles over active images
    histogram INTEGER[],                -- counts of active values in 20 equal bins over (0, max_value]
    label VARCHAR,                      -- automatic label, e.g. 'strawberry (11/16)'
    label_name VARCHAR,                 -- just the class name of the label
    label_purity DOUBLE,                -- share of the top images that carry label_name
    strength DOUBLE,                    -- frequency * mean_value: the map's ranking measure
    umap_x DOUBLE, umap_y DOUBLE,       -- co-activation UMAP (NULL for dead features)
    grid_x INTEGER, grid_y INTEGER      -- cell on the map grid (NULL when not on the map)
);
CREATE TABLE IF NOT EXISTS top_images (
    feature_id INTEGER NOT NULL,
    rank INTEGER NOT NULL,              -- 0 = strongest
    image_id INTEGER NOT NULL,
    value FLOAT NOT NULL
);
CREATE TABLE IF NOT EXISTS similar_features (
    feature_id INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    other_id INTEGER NOT NULL,
    cosine FLOAT NOT NULL               -- cosine of the two decoder directions
);
CREATE TABLE IF NOT EXISTS coactivation (
    feature_a INTEGER NOT NULL,         -- feature_a < feature_b; the diagonal is features.n_active
    feature_b INTEGER NOT NULL,
    n_images INTEGER NOT NULL           -- images where both are active
);
CREATE TABLE IF NOT EXISTS renders (
    render_id VARCHAR PRIMARY KEY,      -- hash of target, seed and render config
    kind VARCHAR NOT NULL,              -- feature | image | sum | slerp | orth | ablation
    feature_a INTEGER,                  -- target feature (feature, sum, slerp start, orth: kept feature)
    feature_b INTEGER,                  -- second feature (sum, slerp end, orth: removed feature)
    image_id INTEGER,                   -- target image (image, ablation)
    t DOUBLE,                           -- slerp position in [0, 1]
    seed INTEGER,
    variant VARCHAR,                    -- parameterisation+augmentation, e.g. 'transformer+aug'
    path VARCHAR NOT NULL,              -- WebP, relative to the output folder
    cosine DOUBLE,                      -- final cosine of the picture's embedding to the target
    self_activation DOUBLE,             -- feature targets: SAE activation of feature_a on the picture
    self_rank INTEGER,                  -- feature targets: its rank among all features (0 = top)
    params_json VARCHAR,                -- parameterisation, steps, views, lr, precision, model, SAE run, rng seed
    settings_hash VARCHAR,              -- hash of the settings shared by one render run (model, SAE run, steps, ...)
    created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS probes (
    probe VARCHAR NOT NULL,             -- sweep name from the config
    step INTEGER NOT NULL,              -- index along the sweep
    step_value DOUBLE,                  -- e.g. size in px or count
    step_label VARCHAR,
    image_path VARCHAR,                 -- probe picture, relative to the output folder
    feature_id INTEGER NOT NULL,
    value FLOAT NOT NULL                -- SAE activation (all non-zero features, no top-k cap)
);
"""

OUTPUT_TABLES_ALL = ("images", "skipped_inputs", "embeddings", "sae_runs", "sae_metrics", "activations",
                     "features", "top_images", "similar_features", "coactivation", "renders", "probes")


# --- what went wrong with a store file, in one line -----------------------------------------------------
_LOCK_PID_RE = re.compile(r"\(PID (\d+)\)")


def process_name(pid: int) -> str | None:
    """The command line of a running process, shortened (Linux /proc; None elsewhere or when gone)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    words = [a.decode(errors="replace") for a in argv if a]
    if len(words) >= 3 and words[1] == "-m":
        words = words[2:]  # python -m atlasgen.cli build ... → atlasgen.cli build ...
    elif words and Path(words[0]).name.startswith("python") and len(words) > 1:
        words = words[1:]
    text = " ".join(" ".join([Path(words[0]).name, *words[1:]]).split()) if words else ""
    return text if len(text) <= 80 else text[:77] + "..."


def store_error(exc: BaseException, path: Path) -> AtlasError:
    """The one-line user error for a DuckDB failure opening the store at `path`: see `classify_store_error`;
    anything else becomes a generic "cannot use the store" line (still no traceback)."""
    error = classify_store_error(exc, path)
    if error is not None:
        return error
    text = str(exc)
    first = text.splitlines()[0] if text else type(exc).__name__
    if "Permission denied" in text:
        return AtlasError(f"cannot open the store {path}: permission denied",
                          "check the file's owner and permissions, or pass another --out")
    return AtlasError(f"cannot use the store {path}: {first}",
                      "check that --out is an atlasgen output folder on a working disk")


def classify_store_error(exc: BaseException, path: Path) -> AtlasError | None:
    """The user error for a store failure we recognise, whenever it shows (opening the store or in the middle
    of a stage): locked by another process, not a DuckDB file, truncated, corrupt, a corrupt write-ahead log,
    a full disk. None for anything else (a bug in our SQL must still show its traceback)."""
    from .errors import disk_full_error, human_bytes, is_no_space
    path = Path(path)
    text = str(exc)
    first = text.splitlines()[0] if text else type(exc).__name__
    out = path.parent
    size = path.stat().st_size if path.exists() else None
    rebuild = (f"restore {path.name} from a copy, or move it away and run `atlasgen build --out {out}` (same "
               "--preset/--config) to rebuild it from the images")
    if "Could not set lock" in text or "Conflicting lock" in text:
        match = _LOCK_PID_RE.search(text)
        pid = int(match.group(1)) if match else None
        name = process_name(pid) if pid else None
        who = f"process {pid}" + (f" ({name})" if name else "") if pid else "another process"
        return StoreLockedError(f"the store {path} is in use by {who}",
                                "wait for it to finish" + (f", or stop it with `kill {pid}`" if pid else "") +
                                f"; `atlasgen info --out {out}` shows a running build's progress", pid=pid)
    if is_no_space(exc):
        return disk_full_error(path)
    if "not a valid DuckDB database file" in text:
        return StoreDamagedError(f"{path} is not a DuckDB database ({human_bytes(size)} of something else)",
                                 f"point --out at an atlasgen output folder; if this was the store, {rebuild}")
    if "Could not read enough bytes" in text:
        return StoreDamagedError(f"the store {path} is truncated: it has {human_bytes(size)}, DuckDB needs more "
                                 f"({first.split(': ', 1)[-1]})", rebuild)
    if "WAL" in text and ("Corrupt" in text or "replaying" in text):
        return StoreDamagedError(f"the store's write-ahead log {path}.wal is corrupt ({first})",
                                 f"move {path.name}.wal away and run the same command again: the store goes back to "
                                 f"its last checkpoint and unfinished stages run again; or {rebuild}")
    if "Corrupt database file" in text or "checksum" in text:
        return StoreDamagedError(f"the store {path} is corrupt ({first})", rebuild)
    return None


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Store:
    """An open atlas store. `Store.open(out_dir)` creates it if needed and checks its version."""

    def __init__(self, con: duckdb.DuckDBPyConnection, paths: BuildPaths, read_only: bool):
        self.con = con
        self.paths = paths
        self.read_only = read_only

    @classmethod
    def open(cls, out_dir: Path | str, read_only: bool = False) -> "Store":
        paths = BuildPaths(Path(out_dir))
        path = paths.store_path
        if read_only and not path.exists():
            raise AtlasError(f"no atlas store at {path}", "run `atlasgen build --out DIR` first, or pass the right --out")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as e:
            raise store_error(e, path) from None
        store = cls(con, paths, read_only)
        try:
            store._check_or_create_schema()
        except duckdb.Error as e:
            con.close()
            raise store_error(e, path) from None
        return store

    def _check_or_create_schema(self) -> None:
        has_meta = self.con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'").fetchone()[0]
        if has_meta:
            row = self.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else None
            if version != SCHEMA_VERSION:
                side = "newer" if (version or 0) > SCHEMA_VERSION else "older"
                raise StoreVersionError(
                    f"{self.paths.store_path} has store schema version {version}, this atlasgen reads version "
                    f"{SCHEMA_VERSION} (the file is {side})",
                    "rebuild into a fresh --out folder, or use the atlasgen version that wrote it")
            return
        n_tables = self.con.execute("SELECT count(*) FROM information_schema.tables").fetchone()[0]
        if n_tables:
            raise StoreVersionError(f"{self.paths.store_path} is a DuckDB file but not an atlas store",
                                    "point --out at an atlasgen output folder")
        if self.read_only:
            raise AtlasError(f"{self.paths.store_path} is empty", "run `atlasgen build` first")
        with self.transaction():
            self.con.execute(SCHEMA_SQL)
            self.con.execute("INSERT INTO meta VALUES ('schema_version', ?), ('created_at', ?)",
                             [str(SCHEMA_VERSION), now().isoformat()])

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except duckdb.Error:
            if exc is None:  # a failing close must not hide the error that is already on its way out
                raise

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield self.con
        except BaseException:
            try:
                self.con.execute("ROLLBACK")
            except duckdb.Error:  # e.g. the database was invalidated by a full disk: keep the first error
                pass
            raise
        self.con.execute("COMMIT")

    # --- convenience -------------------------------------------------------------------------
    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        return self.con.execute(sql, params or []).fetchall()

    def scalar(self, sql: str, params: list | None = None) -> Any:
        row = self.con.execute(sql, params or []).fetchone()
        return row[0] if row else None

    def count(self, table: str) -> int:
        return int(self.scalar(f"SELECT count(*) FROM {table}"))

    def record_skip(self, source: str, stage: str, reason: str) -> None:
        self.con.execute("INSERT INTO skipped_inputs VALUES (?, ?, ?, ?)", [source, stage, reason, now()])

    # --- stage bookkeeping ---------------------------------------------------------------------
    def stage_row(self, stage: str) -> dict | None:
        rows = self.con.execute("SELECT config_hash, status, summary_json, finished_at, config_json FROM stage_runs "
                                "WHERE stage = ?", [stage]).fetchall()
        if not rows:
            return None
        row = rows[0]
        return {"config_hash": row[0], "status": row[1], "summary": json.loads(row[2] or "{}"), "finished_at": row[3],
                "config": json.loads(row[4] or "{}")}

    def stage_config(self, stage: str) -> dict | None:
        """The config a finished stage ran with, or None when it has not finished."""
        row = self.stage_row(stage)
        return row["config"] if row and row["status"] == "done" else None

    def stage_is_done(self, stage: str, config_hash: str) -> bool:
        row = self.stage_row(stage)
        return bool(row and row["status"] == "done" and row["config_hash"] == config_hash)

    def mark_stage_started(self, stage: str, config_hash: str, config_json: str) -> None:
        self.con.execute(
            "INSERT OR REPLACE INTO stage_runs VALUES (?, ?, 'running', ?, NULL, ?, NULL)",
            [stage, config_hash, config_json, now()])

    def mark_stage_done(self, stage: str, summary: dict) -> None:
        self.con.execute("UPDATE stage_runs SET status = 'done', summary_json = ?, finished_at = ? WHERE stage = ?",
                         [json.dumps(summary, default=str), now(), stage])

    # --- arrays ----------------------------------------------------------------------------------
    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(image_ids[N], embeddings[N, D] float32), ordered by image_id."""
        table = self.arrow("SELECT image_id, embedding FROM embeddings ORDER BY image_id")
        ids_n = table.column("image_id").to_numpy().astype(np.int64)
        if len(ids_n) == 0:
            return ids_n, np.zeros((0, 0), np.float32)
        lists = table.column("embedding").combine_chunks()
        emb_nd = lists.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(ids_n), -1)
        return ids_n, emb_nd

    def arrow(self, sql: str, params: list | None = None):
        """Run `sql` and return a pyarrow Table (works across DuckDB 1.x and 2.x)."""
        # DuckDB 2 refuses con.sql() while an execute() result is unfinished (any earlier .fetchone());
        # a fresh execute() replaces that result and fetching it to the end finishes it.
        self.con.execute("SELECT 1").fetchall()
        relation = self.con.sql(sql, params=params) if params else self.con.sql(sql)
        if hasattr(relation, "to_arrow_table"):
            return relation.to_arrow_table()
        return relation.arrow()

    def insert_embeddings(self, image_ids: np.ndarray, emb_nd: np.ndarray) -> None:
        import pyarrow as pa
        emb_nd = np.ascontiguousarray(emb_nd, dtype=np.float32)
        dim = emb_nd.shape[1]
        values = pa.array(emb_nd.reshape(-1))
        offsets = pa.array(np.arange(0, (len(emb_nd) + 1) * dim, dim, dtype=np.int32))
        batch = pa.table({"image_id": pa.array(np.asarray(image_ids, dtype=np.int32)),
                          "embedding": pa.ListArray.from_arrays(offsets, values)})
        self.con.register("_emb_batch", batch)
        try:
            self.con.execute("INSERT INTO embeddings SELECT image_id, embedding FROM _emb_batch")
        finally:
            self.con.unregister("_emb_batch")

    def insert_frame(self, table: str, columns: dict[str, Any]) -> None:
        """Bulk insert columns (name → numpy array or list) into `table`, by column name."""
        import pyarrow as pa
        arrow = pa.table({k: (v if isinstance(v, pa.Array) else pa.array(v)) for k, v in columns.items()})
        self.con.register("_frame", arrow)
        try:
            cols = ", ".join(columns)
            self.con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _frame")
        finally:
            self.con.unregister("_frame")

    def latest_sae_run(self) -> dict | None:
        row = self.con.execute(
            "SELECT run_id, weights_path, d_in, n_features FROM sae_runs ORDER BY created_at DESC LIMIT 1").fetchone()
        if row is None:
            return None
        return {"run_id": row[0], "weights_path": self.paths.out_dir / row[1], "d_in": row[2], "n_features": row[3]}

    # --- faults: artefact checks (artefacts.py) ----------------------------------------------------------
    def corpus_paths(self) -> list[str]:
        """Every image's corpus copy, relative to the output folder."""
        return [r[0] for r in self.con.execute("SELECT corpus_path FROM images ORDER BY image_id").fetchall()]

    def top_image_ids(self) -> list[int]:
        """The images that have a thumbnail (those among some feature's top images)."""
        return [int(r[0]) for r in self.con.execute(
            "SELECT DISTINCT image_id FROM top_images ORDER BY image_id").fetchall()]

    def render_paths(self) -> list[str]:
        """Every render's WebP, relative to the output folder."""
        return [r[0] for r in self.con.execute("SELECT path FROM renders ORDER BY render_id").fetchall()]

    def probe_image_paths(self) -> list[str]:
        """Every probe step's picture, relative to the output folder."""
        return [r[0] for r in self.con.execute(
            "SELECT DISTINCT image_path FROM probes WHERE image_path IS NOT NULL ORDER BY 1").fetchall()]
