"""The DuckDB store: the single source of truth, and a product users query with SQL.

The schema is documented in the README ("The store"); keep both in step and bump
SCHEMA_VERSION on any incompatible change.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import duckdb
import numpy as np

from .errors import AtlasError, StoreVersionError
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
        except duckdb.IOException as e:
            raise AtlasError(f"cannot open the store {path}: {str(e).splitlines()[0]}",
                             "is another atlasgen process using this output folder?") from None
        except duckdb.Error as e:
            raise AtlasError(f"{path} is not a DuckDB atlas store: {str(e).splitlines()[0]}",
                             "point --out at an atlasgen output folder, or delete the file") from None
        store = cls(con, paths, read_only)
        store._check_or_create_schema()
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

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield self.con
        except BaseException:
            self.con.execute("ROLLBACK")
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

    # --- query and export (the store as a product) ---------------------------------------------
    def lock_down(self) -> None:
        """From here on this connection opens no file, URL or extension and no setting can change: what
        `atlasgen query` runs users' SQL on. DuckDB refuses `read_text('/etc/hostname')`, COPY, ATTACH,
        INSTALL/LOAD and SET of these settings itself; the temp folder beside the store is its only other file."""
        assert self.read_only, "lock_down is for read-only stores"
        for setting in ("autoinstall_known_extensions = false", "autoload_known_extensions = false",
                        "allow_community_extensions = false", "enable_external_access = false",
                        "lock_configuration = true"):
            self.con.execute(f"SET {setting}")

    def table_names(self) -> list[str]:
        """The store's tables (main schema), by name."""
        return [r[0] for r in self.con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
            "AND table_type = 'BASE TABLE' ORDER BY table_name").fetchall()]

    def table_columns(self, table: str) -> list[tuple[str, str]]:
        """(column name, DuckDB type) of `table`, in column order."""
        return [(r[0], r[1]) for r in self.con.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = 'main' "
            "AND table_name = ? ORDER BY ordinal_position", [table]).fetchall()]

    def copy_to_parquet(self, table: str, path: Path, columns: list[str] | None = None) -> int:
        """Write `table` (all columns, or just `columns`) to the Parquet file `path`; returns its row count."""
        known = {c for c, _ in self.table_columns(table)}
        assert known, f"no table {table}"
        cols = columns or [c for c, _ in self.table_columns(table)]
        assert set(cols) <= known, f"{table} has no column(s) {set(cols) - known}"
        select = ", ".join(f'"{c}"' for c in cols)
        target = str(path).replace("'", "''")
        self.con.execute(f"COPY (SELECT {select} FROM \"{table}\") TO '{target}' "
                         "(FORMAT parquet, COMPRESSION zstd)")
        return self.count(f'"{table}"')
