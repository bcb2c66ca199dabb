"""The DuckDB store: the single source of truth, and a product users query with SQL.

The schema is documented in docs/STORE.md; keep both in step and bump
SCHEMA_VERSION on any incompatible change.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import duckdb
import numpy as np

from .errors import AtlasError, StoreDamagedError, StoreLockedError, StoreVersionError
from .paths import BuildPaths, make_folder


def arrow_column(values: Any, arrow_type: Any = None) -> Any:
    """A numpy array or list → a pyarrow Array, built from buffers where it can. Why: pyarrow's `pa.array`
    imports pandas on its first call (to check for pandas objects): 0.34–0.61 s on our CPU box, holding the GIL; in
    `atlasgen embed` that landed in the writer thread's first commit, stalling the thread that feeds the GPU.
    Handled here: 1-D numeric/bool numpy arrays, and lists of str, int, float or bool with None for nulls (a
    datetime list too). Anything else (lists of lists, ...) goes to `pa.array`."""
    import pyarrow as pa
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values if arrow_type is None or values.type == arrow_type else values.cast(arrow_type)
    if isinstance(values, np.ndarray):
        if values.ndim == 1 and values.dtype.kind in "iufb":
            return _numpy_to_arrow(values, None, arrow_type)
        return pa.array(values, arrow_type)
    values = list(values)
    kinds = {type(v) for v in values if v is not None}
    if not kinds and arrow_type is not None:  # empty, or all null
        return pa.nulls(len(values), arrow_type)
    if kinds == {str} and (arrow_type is None or arrow_type == pa.string()):
        encoded = [b"" if v is None else v.encode("utf-8") for v in values]
        offsets = np.zeros(len(values) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
        if offsets[-1] >= 2 ** 31:
            return pa.array(values, pa.string())
        return pa.Array.from_buffers(pa.string(), len(values),
                                     [_bitmap(_valid_mask(values)), pa.py_buffer(offsets.astype(np.int32)),
                                      pa.py_buffer(b"".join(encoded))])
    if kinds and kinds <= {int, float, bool, np.int32, np.int64, np.float32, np.float64, np.bool_}:
        filler = False if kinds <= {bool, np.bool_} else 0
        filled = np.asarray([filler if v is None else v for v in values])
        if filled.dtype.kind not in "iufb" or (filled.dtype.kind == "f" and arrow_type is not None
                                                 and not pa.types.is_floating(arrow_type)):
            return pa.array(values, arrow_type)  # e.g. ints beyond int64, or floats for an integer column
        return _numpy_to_arrow(filled, _valid_mask(values), arrow_type)
    if kinds == {datetime} and arrow_type is not None and pa.types.is_timestamp(arrow_type) and arrow_type.unit == "us"\
            and arrow_type.tz is None:
        micros = np.asarray([0 if v is None else _naive_micros(v) for v in values], np.int64)
        return pa.Array.from_buffers(arrow_type, len(values), [_bitmap(_valid_mask(values)), pa.py_buffer(micros)])
    return pa.array(values, arrow_type)


_NUMPY_OF_ARROW = {"int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64, "uint8": np.uint8,
                   "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "float": np.float32,
                   "double": np.float64, "bool": np.bool_}


def _numpy_to_arrow(values: np.ndarray, valid: np.ndarray | None, arrow_type: Any) -> Any:
    import pyarrow as pa
    arrow_type = arrow_type or pa.from_numpy_dtype(values.dtype)
    np_type = _NUMPY_OF_ARROW.get(str(arrow_type))
    if np_type is None:  # e.g. a timestamp or decimal target: let pyarrow convert
        return pa.array(values, arrow_type, mask=None if valid is None else ~valid)
    if np_type is np.bool_:
        data = pa.py_buffer(np.packbits(np.asarray(values, bool), bitorder="little"))
    else:
        cast = values.astype(np_type, copy=False)
        if cast.dtype.kind in "iu" and values.dtype.kind in "iu" and not np.array_equal(cast, values):
            raise OverflowError(f"values do not fit {arrow_type}")
        data = pa.py_buffer(np.ascontiguousarray(cast))
    return pa.Array.from_buffers(arrow_type, len(values), [_bitmap(valid), data])


def _valid_mask(values: list) -> np.ndarray | None:
    """Which values are not None; None when all are."""
    valid = np.fromiter((v is not None for v in values), bool, len(values))
    return None if valid.all() else valid


def _bitmap(valid: np.ndarray | None) -> Any:
    """Arrow's validity bitmap (bit i set: value i is there) of a mask; None (all valid) for None."""
    import pyarrow as pa
    return None if valid is None else pa.py_buffer(np.packbits(valid, bitorder="little"))


def _naive_micros(value: datetime) -> int:
    """A naive datetime (as `now()` makes them) → microseconds since the epoch, as Arrow's timestamp[us]."""
    assert value.tzinfo is None, "timestamps in the store are naive UTC"
    return (value - datetime(1970, 1, 1)) // timedelta(microseconds=1)


# 2: features split into feature_stats (encode) + feature_map (layout) behind a `features` view;
#    stage_runs.error; the SAE run a stage used is in its summary.
SCHEMA_VERSION = 2

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta (
    key VARCHAR PRIMARY KEY,
    value VARCHAR
);
CREATE TABLE IF NOT EXISTS stage_runs (
    stage VARCHAR PRIMARY KEY,          -- ingest, embed, train, encode, render, layout, probe, toy, site
    config_hash VARCHAR NOT NULL,       -- hash of the stage config and of its inputs' hashes
    status VARCHAR NOT NULL,            -- running | done | failed | interrupted
    config_json VARCHAR,
    summary_json VARCHAR,               -- what the stage reports (counts, timings; sae_run_id where it used one)
    started_at TIMESTAMP,
    finished_at TIMESTAMP,
    error VARCHAR                       -- the error a failed stage ended with (NULL otherwise)
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
    mse DOUBLE,                         -- final metrics over the whole corpus; mse of the normalised input x (0 gives ~1)
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
CREATE TABLE IF NOT EXISTS feature_stats (    -- written by encode
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
    strength DOUBLE                     -- frequency * mean_value: the map's ranking measure
);
CREATE TABLE IF NOT EXISTS feature_map (      -- written by layout
    feature_id INTEGER PRIMARY KEY,
    umap_x DOUBLE, umap_y DOUBLE,       -- co-activation UMAP (no row for dead features)
    grid_x INTEGER, grid_y INTEGER      -- cell on the map grid (NULL when not on the map)
);
-- One row per feature: its stats and, where the layout has placed it, its map position.
CREATE OR REPLACE VIEW features AS
    SELECT s.*, m.umap_x, m.umap_y, m.grid_x, m.grid_y
    FROM feature_stats s LEFT JOIN feature_map m USING (feature_id);
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
                     "feature_stats", "feature_map", "top_images", "similar_features", "coactivation", "renders",
                     "probes")


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
    if "Read-only file system" in text:
        return AtlasError(f"cannot write the store {path}: {path.parent} is on a read-only file system",
                          "pass an --out on a writable disk")
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


def done_under(row: dict | None, config_hash: str) -> bool:
    """Whether a `Store.stage_row` row is of a stage that finished under `config_hash`."""
    return bool(row and row["status"] == "done" and row["config_hash"] == config_hash)


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
        make_folder(path.parent)
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
        rows = self.con.execute("SELECT config_hash, status, summary_json, finished_at, config_json, error, "
                                "started_at FROM stage_runs WHERE stage = ?", [stage]).fetchall()
        if not rows:
            return None
        row = rows[0]
        return {"config_hash": row[0], "status": row[1], "summary": json.loads(row[2] or "{}"), "finished_at": row[3],
                "config": json.loads(row[4] or "{}"), "error": row[5], "started_at": row[6]}

    def stage_rows(self) -> dict[str, dict]:
        """Every stage's row, by stage name."""
        names = [r[0] for r in self.con.execute("SELECT stage FROM stage_runs").fetchall()]
        return {name: self.stage_row(name) for name in names}

    def stage_config(self, stage: str) -> dict | None:
        """The config a finished stage ran with, or None when it has not finished."""
        row = self.stage_row(stage)
        return row["config"] if row and row["status"] == "done" else None

    def stage_is_done(self, stage: str, config_hash: str) -> bool:
        return done_under(self.stage_row(stage), config_hash)

    def mark_stage_started(self, stage: str, config_hash: str, config_json: str, summary: dict | None = None) -> None:
        """`summary`: what the running stage's row keeps until it ends (a repair's earlier digest); default none."""
        self.con.execute(
            "INSERT OR REPLACE INTO stage_runs VALUES (?, ?, 'running', ?, ?, ?, NULL, NULL)",
            [stage, config_hash, config_json, json.dumps(summary) if summary is not None else None, now()])

    def mark_stage_done(self, stage: str, summary: dict, finished_at=None) -> None:
        """`finished_at`: keep this time (a repair that left the stage's tables as they were: its readers, whose
        hashes cover it, stay up to date); default now."""
        self.con.execute("UPDATE stage_runs SET status = 'done', summary_json = ?, finished_at = ?, error = NULL "
                         "WHERE stage = ?", [json.dumps(summary, default=str), finished_at or now(), stage])

    def tables_digest(self, tables: tuple[str, ...]) -> str:
        """A digest of these tables' rows, in any order, leaving out timestamps (when a row was written is not
        what it says): equal digests, equal contents."""
        parts = []
        for table in tables:
            columns = [name for name, kind in self.con.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
                "ORDER BY ordinal_position", [table]).fetchall() if not kind.startswith("TIMESTAMP")]
            assert columns, f"no table {table}"
            n_rows, hash_sum = self.con.execute(
                f"SELECT count(*), sum(hash({', '.join(columns)})::HUGEINT) FROM {table}").fetchone()
            parts.append(f"{table}:{n_rows}:{hash_sum}")
        return ";".join(parts)

    def mark_stage_failed(self, stage: str, error: str, status: str = "failed") -> None:
        """A stage that ended with an error (or was interrupted): `info` shows it; a rerun with the same
        config resumes it, keeping what it had committed."""
        assert status in ("failed", "interrupted"), status
        self.con.execute("UPDATE stage_runs SET status = ?, error = ?, finished_at = ? WHERE stage = ?",
                         [status, error[:2000], now(), stage])

    def clear_stage_outputs(self, stage: str, tables: tuple[str, ...], skips: bool) -> None:
        """A stage's default reset: empty the tables it writes (and its skipped inputs), in one transaction."""
        with self.transaction() as con:
            for table in tables:
                con.execute(f"DELETE FROM {table}")
            if skips:
                con.execute("DELETE FROM skipped_inputs WHERE stage = ?", [stage])

    # --- the build's remembered config -----------------------------------------------------------------
    def remembered_build(self) -> dict | None:
        """What `build` was last run with ({preset, config, overrides}), or None."""
        row = self.scalar("SELECT value FROM meta WHERE key = 'build_config'")
        return json.loads(row) if row else None

    def remember_build(self, build: dict) -> None:
        self.con.execute("INSERT OR REPLACE INTO meta VALUES ('build_config', ?)", [json.dumps(build)])

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
        offsets = arrow_column(np.arange(0, (len(emb_nd) + 1) * dim, dim, dtype=np.int32))
        batch = pa.Table.from_arrays([arrow_column(np.asarray(image_ids), pa.int32()),
                                      pa.ListArray.from_arrays(offsets, arrow_column(emb_nd.reshape(-1)))],
                                     names=["image_id", "embedding"])
        with self._registered("_emb_batch", batch):
            self.con.execute("INSERT INTO embeddings SELECT image_id, embedding FROM _emb_batch")

    @contextmanager
    def _registered(self, name: str, arrow_table):
        """`arrow_table` visible to SQL as `name` for the block. When the block fails, the connection may be
        in an aborted transaction where unregistering fails too: the block's error is the one raised."""
        self.con.register(name, arrow_table)
        try:
            yield
        except BaseException:
            with suppress(Exception):
                self.con.unregister(name)
            raise
        self.con.unregister(name)

    def insert_frame(self, table: str, columns: dict[str, Any]) -> None:
        """Bulk insert columns (name → numpy array or list) into `table`, by column name."""
        import pyarrow as pa
        arrow = pa.Table.from_arrays([arrow_column(v) for v in columns.values()], names=list(columns))
        with self._registered("_frame", arrow):
            cols = ", ".join(columns)
            self.con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _frame")

    # --- the SAE runs ----------------------------------------------------------------------------------
    def sae_run(self, run_id: str) -> dict | None:
        row = self.con.execute("SELECT run_id, weights_path, d_in, n_features FROM sae_runs WHERE run_id = ?",
                               [run_id]).fetchone()
        if row is None:
            return None
        return {"run_id": row[0], "weights_path": self.paths.out_dir / row[1], "d_in": row[2], "n_features": row[3]}

    def sae_run_used_by(self, stage: str = "encode") -> dict | None:
        """The SAE run a finished stage used, as recorded in its summary (`run_id` for train, `sae_run_id` for
        the stages after it). `encode` is the default: its activations are what the store shows."""
        row = self.stage_row(stage)
        if row is None or row["status"] != "done":
            return None
        run_id = row["summary"].get("run_id" if stage == "train" else "sae_run_id")
        return self.sae_run(run_id) if run_id else None

    def save_sae_run(self, run: dict, history: list[dict]) -> None:
        """One training run's row and its metric history, replacing any earlier copy of that run."""
        with self.transaction() as con:
            con.execute("DELETE FROM sae_metrics WHERE run_id = ?", [run["run_id"]])
            con.execute("DELETE FROM sae_runs WHERE run_id = ?", [run["run_id"]])
            if history:
                self.insert_frame("sae_metrics", {"run_id": [run["run_id"]] * len(history),
                                                  **{k: [row[k] for row in history] for k in history[0]}})
            columns = ("run_id", "d_in", "n_features", "config_json", "weights_path", "n_steps", "mse", "fvu", "l0",
                       "dead_fraction", "n_resampled", "created_at")
            con.execute(f"INSERT INTO sae_runs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                        [run[c] if c != "created_at" else now() for c in columns])

    # --- images (ingest) -------------------------------------------------------------------------------
    def replace_images(self, images: dict[str, Any], skipped: list[tuple[str, str]], stage: str = "ingest") -> None:
        """All ingested images (columns of `images`) and the inputs skipped, in one transaction; a rerun
        after an interrupt rewrites everything (image ids are deterministic)."""
        with self.transaction() as con:
            con.execute("DELETE FROM images")
            con.execute("DELETE FROM skipped_inputs WHERE stage = ?", [stage])
            if len(images["image_id"]):
                self.insert_frame("images", images)
            self._insert_skips(stage, skipped)

    def replace_skips(self, stage: str, skipped: list[tuple[str, str]]) -> None:
        """A stage's skipped inputs (source, reason), replacing the ones it recorded before."""
        with self.transaction() as con:
            con.execute("DELETE FROM skipped_inputs WHERE stage = ?", [stage])
            self._insert_skips(stage, skipped)

    def _insert_skips(self, stage: str, skipped: list[tuple[str, str]]) -> None:
        import pyarrow as pa
        if skipped:
            stamp = now()
            self.insert_frame("skipped_inputs", {
                "source": arrow_column([s for s, _ in skipped], pa.string()),
                "stage": arrow_column([stage] * len(skipped), pa.string()),
                "reason": arrow_column([r for _, r in skipped], pa.string()),
                "skipped_at": arrow_column([stamp] * len(skipped), pa.timestamp("us"))})

    def corpus_paths(self) -> dict[int, str]:
        """image_id → its normalised corpus copy, relative to the output folder."""
        return {int(i): p for i, p in self.query("SELECT image_id, corpus_path FROM images")}
    # --- site reads ------------------------------------------------------------------------------
    # What the site pages, the map tiles and `decompose` read; typed, and named for what they return.
    FEATURE_PAGE_COLUMNS = ("feature_id", "n_active", "frequency", "max_value", "mean_value", "q50", "q90", "q99",
                            "histogram", "label", "label_name", "label_purity", "strength", "grid_x", "grid_y")
    RENDER_COLUMNS = ("render_id", "kind", "feature_a", "feature_b", "image_id", "t", "seed", "variant", "path",
                      "cosine", "self_activation", "self_rank")

    def _grouped(self, sql: str, params: list | None = None) -> dict:
        """Rows grouped by their first column, in row order: key → [the rest of each row, as a tuple]."""
        out: dict = {}
        for key, *rest in self.con.execute(sql, params or []).fetchall():
            out.setdefault(key, []).append(tuple(rest))
        return out

    def feature_rows(self) -> list[dict]:
        """Every feature's stats, label and map cell (FEATURE_PAGE_COLUMNS), by feature id."""
        cols = self.FEATURE_PAGE_COLUMNS
        return [dict(zip(cols, r)) for r in self.con.execute(
            f"SELECT {', '.join(cols)} FROM features ORDER BY feature_id").fetchall()]

    def feature_labels(self, feature_ids: list[int]) -> dict[int, str | None]:
        """feature id → its automatic label, for the given ids."""
        ids = [int(f) for f in feature_ids]
        if not ids:
            return {}
        rows = self.con.execute(f"SELECT feature_id, label FROM features WHERE feature_id IN "
                                f"({','.join(map(str, ids))})").fetchall()
        return {int(f): label for f, label in rows}

    def feature_pictures(self, feature_ids) -> dict[int, Path]:
        """THE picture of each feature (the map tiles, every page of the site and `decompose` show this one):
        its best 'feature' render (one that re-activates the feature first, then the highest cosine, then
        the lowest seed), else the thumbnail of its top image; only files that exist. Features with
        neither are left out."""
        wanted = {int(f) for f in feature_ids}
        if not wanted:
            return {}
        out: dict[int, Path] = {}
        rows = self.con.execute("""
            SELECT feature_a, path FROM renders WHERE kind = 'feature' AND feature_a IS NOT NULL
            ORDER BY feature_a, coalesce(self_activation, 0) > 0 DESC, coalesce(cosine, -2.0) DESC,
                     seed NULLS LAST, render_id""").fetchall()
        for fid, rel in rows:
            fid = int(fid)
            if fid in wanted and fid not in out and (self.paths.out_dir / rel).is_file():
                out[fid] = self.paths.out_dir / rel
        for fid, image_id in self.con.execute("SELECT feature_id, image_id FROM top_images WHERE rank = 0").fetchall():
            fid = int(fid)
            if fid in wanted and fid not in out and self.paths.thumb(int(image_id)).is_file():
                out[fid] = self.paths.thumb(int(image_id))
        return out

    def picture_renders(self) -> list[dict]:
        """Renders the site shows (kinds feature, sum, slerp, orth; RENDER_COLUMNS), by kind, features, t, seed."""
        cols = self.RENDER_COLUMNS
        return [dict(zip(cols, r)) for r in self.con.execute(
            f"SELECT {', '.join(cols)} FROM renders WHERE kind IN ('feature', 'sum', 'slerp', 'orth') "
            "ORDER BY kind, feature_a, feature_b, t, seed").fetchall()]

    def top_images_by_feature(self) -> dict[int, list[tuple[int, float]]]:
        """feature id → [(image id, activation)], strongest first."""
        return self._grouped("SELECT feature_id, image_id, value FROM top_images ORDER BY feature_id, rank")

    def similar_by_feature(self) -> dict[int, list[tuple[int, float]]]:
        """feature id → [(other feature id, decoder cosine)], most similar first."""
        return self._grouped("SELECT feature_id, other_id, cosine FROM similar_features ORDER BY feature_id, rank")

    def top_coactive_by_feature(self, n: int) -> dict[int, list[tuple[int, int]]]:
        """feature id → its `n` most co-activating features [(other feature id, images where both fire)]."""
        return self._grouped("""
                SELECT f, other, n FROM (
                    SELECT feature_a AS f, feature_b AS other, n_images AS n FROM coactivation
                    UNION ALL SELECT feature_b, feature_a, n_images FROM coactivation)
                QUALIFY row_number() OVER (PARTITION BY f ORDER BY n DESC, other) <= ?
                ORDER BY f, n DESC, other""", [int(n)])

    def probe_peaks_by_feature(self) -> dict[int, list[tuple[str, float]]]:
        """feature id → [(probe sweep, its largest activation along the sweep)], by sweep name."""
        return self._grouped("SELECT feature_id, probe, max(value) FROM probes GROUP BY probe, feature_id "
                             "ORDER BY probe")

    def image_labels(self) -> dict[int, str]:
        """image_id → label, for labelled images."""
        return dict(self.query("SELECT image_id, label FROM images WHERE label IS NOT NULL"))

    # --- embeddings (embed) ----------------------------------------------------------------------------
    def images_without_embedding(self) -> list[tuple[int, str]]:
        """(image_id, corpus_path) of images without an embedding, in id order; rows for image ids that
        ingest no longer has (it was rerun on a changed folder) are dropped first."""
        with self.transaction() as con:
            con.execute("DELETE FROM embeddings WHERE image_id NOT IN (SELECT image_id FROM images)")
        return self.query("""SELECT i.image_id, i.corpus_path FROM images i
                             LEFT JOIN embeddings e USING (image_id)
                             WHERE e.image_id IS NULL ORDER BY i.image_id""")

    def add_embeddings(self, image_ids: np.ndarray, emb_nd: np.ndarray) -> None:
        """One committed chunk of embeddings (the unit an interrupted embed resumes from)."""
        with self.transaction():
            self.insert_embeddings(image_ids, emb_nd)

    # --- activations and features (encode) -------------------------------------------------------------
    def replace_encoding(self, activations: dict, feature_stats: dict, top_images: dict, similar: dict,
                         coactivation: dict, skipped: list[tuple[str, str]]) -> None:
        """Everything encode derives from one SAE run, in one transaction."""
        with self.transaction() as con:
            for table in ("activations", "feature_stats", "top_images", "similar_features", "coactivation"):
                con.execute(f"DELETE FROM {table}")
            con.execute("DELETE FROM skipped_inputs WHERE stage = 'encode'")
            self.insert_frame("activations", activations)
            self.insert_frame("feature_stats", feature_stats)
            self.insert_frame("top_images", top_images)
            self.insert_frame("similar_features", similar)
            self.insert_frame("coactivation", coactivation)
            self._insert_skips("encode", skipped)

    def feature_ranking(self) -> dict[str, Any]:
        """Every feature's id, n_active, strength and label (columns as arrays/lists), by feature id."""
        table = self.arrow("SELECT feature_id, n_active, strength, label FROM feature_stats ORDER BY feature_id")
        return {"feature_id": table.column("feature_id").to_numpy().astype(np.int64),
                "n_active": table.column("n_active").fill_null(0).to_numpy().astype(np.int64),
                "strength": table.column("strength").fill_null(0.0).to_numpy().astype(np.float64),
                "label": table.column("label").to_pylist()}

    def most_frequent_features(self, n: int) -> list[int]:
        """The n features that fire most often (live ones only), ties by id."""
        rows = self.query("SELECT feature_id FROM feature_stats WHERE n_active > 0 "
                          "ORDER BY n_active DESC, feature_id LIMIT ?", [max(0, n)])
        return [int(r[0]) for r in rows]

    def coactivation_counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(feature_a, feature_b, n_images) of every co-activating pair."""
        table = self.arrow("SELECT feature_a, feature_b, n_images FROM coactivation WHERE n_images > 0")
        return (table.column("feature_a").to_numpy().astype(np.int64),
                table.column("feature_b").to_numpy().astype(np.int64),
                table.column("n_images").to_numpy().astype(np.float64))

    # --- the map (layout) ------------------------------------------------------------------------------
    def replace_feature_map(self, frame: dict) -> None:
        """Every live feature's UMAP position and grid cell (NULL when not on the map)."""
        with self.transaction() as con:
            con.execute("DELETE FROM feature_map")
            self.insert_frame("feature_map", frame)

    def map_cells(self) -> tuple[np.ndarray, np.ndarray]:
        """(feature ids, (M, 2) grid cells) of the features on the map, by feature id."""
        table = self.arrow("SELECT feature_id, grid_x, grid_y FROM feature_map WHERE grid_x IS NOT NULL "
                           "ORDER BY feature_id")
        cells_m2 = np.stack([table.column("grid_x").to_numpy(), table.column("grid_y").to_numpy()], axis=1)
        return table.column("feature_id").to_numpy().astype(np.int64), cells_m2.astype(np.int64).reshape(-1, 2)

    # --- probes ----------------------------------------------------------------------------------------
    def replace_probes(self, columns: dict) -> None:
        with self.transaction() as con:
            con.execute("DELETE FROM probes")
            if len(columns["probe"]):
                self.insert_frame("probes", columns)
    def label_counts(self) -> list[tuple[str, int]]:
        """(label, number of images), most common first."""
        return self.con.execute("SELECT label, count(*) n FROM images WHERE label IS NOT NULL GROUP BY label "
                                "ORDER BY n DESC, label").fetchall()

    def sae_quality(self, used_by: str = "encode") -> dict | None:
        """Size and final quality (run_id, n_features, n_steps, mse, fvu, l0, dead_fraction, n_resampled, d_in)
        of the SAE run a stage used (by default the one whose activations the store holds), or None."""
        run = self.sae_run_used_by(used_by)
        if run is None:
            return None
        cols = ("run_id", "n_features", "n_steps", "mse", "fvu", "l0", "dead_fraction", "n_resampled", "d_in")
        row = self.con.execute(f"SELECT {', '.join(cols)} FROM sae_runs WHERE run_id = ?", [run["run_id"]]).fetchone()
        return dict(zip(cols, row)) if row else None

    def sae_training_curve(self, run_id: str) -> list[tuple[int, float, float, float, float]]:
        """(step, fvu, mse, l0, dead_fraction) of one SAE run's logged windows, by step."""
        return self.con.execute("SELECT step, fvu, mse, l0, dead_fraction FROM sae_metrics WHERE run_id = ? "
                                "ORDER BY step", [run_id]).fetchall()

    def known_image_ids(self, image_ids: list[int]) -> set[int]:
        """The given image ids that are in the store."""
        ids = [int(i) for i in image_ids]
        if not ids:
            return set()
        return {r[0] for r in self.con.execute(
            f"SELECT image_id FROM images WHERE image_id IN ({','.join(map(str, ids))})").fetchall()}

    def example_image_ids(self, n: int) -> list[int]:
        """`n` encoded images spanning the corpus: one per label in turn (the lowest id of each)."""
        return [r[0] for r in self.con.execute("""
            SELECT image_id FROM (
                SELECT image_id, label, row_number() OVER (PARTITION BY label ORDER BY image_id) AS r
                FROM images WHERE image_id IN (SELECT DISTINCT image_id FROM activations))
            ORDER BY r, label NULLS LAST, image_id LIMIT ?""", [int(n)]).fetchall()]

    def activations_by_image(self, image_ids: list[int]) -> dict[int, list[tuple[int, float]]]:
        """image id → [(feature id, activation)], strongest first, for the given images."""
        ids = [int(i) for i in image_ids]
        if not ids:
            return {}
        return self._grouped(f"SELECT image_id, feature_id, value FROM activations WHERE image_id IN "
                             f"({','.join(map(str, ids))}) ORDER BY image_id, value DESC, feature_id")

    def image_sources(self, image_ids: list[int]) -> dict[int, tuple[str, str | None, str]]:
        """image id → (corpus_path, label, source), for the given images."""
        ids = [int(i) for i in image_ids] or [-1]
        return {r[0]: tuple(r[1:]) for r in self.con.execute(
            f"SELECT image_id, corpus_path, label, source FROM images WHERE image_id IN "
            f"({','.join(map(str, ids))})").fetchall()}

    def probe_steps(self) -> dict[str, list[tuple[int, float, str, str]]]:
        """probe sweep → its steps [(step, step_value, step_label, image_path)], by sweep and step."""
        return self._grouped("SELECT probe, step, any_value(step_value), any_value(step_label), any_value(image_path) "
                             "FROM probes GROUP BY probe, step ORDER BY probe, step")

    def probe_strongest_features(self, probe: str, n: int) -> list[int]:
        """The `n` features with the largest activation along one probe sweep (ties: lower id)."""
        return [int(r[0]) for r in self.con.execute(
            "SELECT feature_id FROM probes WHERE probe = ? GROUP BY feature_id ORDER BY max(value) DESC, feature_id "
            "LIMIT ?", [probe, int(n)]).fetchall()]

    def probe_values(self, probe: str) -> dict[tuple[int, int], float]:
        """(feature id, step) → activation, for one probe sweep (absent = 0)."""
        return {(int(f), int(s)): float(v) for f, s, v in self.con.execute(
            "SELECT feature_id, step, value FROM probes WHERE probe = ?", [probe]).fetchall()}
    # --- renders ---
    def render_files(self) -> list[tuple[str, str]]:
        """(render_id, path) of every render row."""
        return self.query("SELECT render_id, path FROM renders")

    def renders_made_otherwise(self, settings_hash: str) -> list[tuple[str, str]]:
        """(render_id, path) of renders made with other settings than `settings_hash`."""
        return self.query("SELECT render_id, path FROM renders WHERE settings_hash IS DISTINCT FROM ?", [settings_hash])

    def renders_with_settings(self, settings_hash: str) -> list[tuple[str, str, int, str, bool, str]]:
        """(render_id, kind, seed, variant, listed, path) of renders made with these settings; `listed`: asked
        for by a list of feature ids (`render --features`)."""
        return self.query("SELECT render_id, kind, seed, variant, coalesce(params_json->>'listed' = 'true', false), "
                          "path FROM renders WHERE settings_hash = ?", [settings_hash])

    def delete_renders(self, render_ids: list[str] | None = None) -> None:
        """Delete these render rows (all when None), in one transaction."""
        with self.transaction() as con:
            if render_ids is None:
                con.execute("DELETE FROM renders")
            else:
                con.execute("DELETE FROM renders WHERE render_id IN (SELECT unnest(?))", [list(render_ids)])

    def render_results(self, render_ids: list[str]) -> list[tuple[str, float | None, int | None]]:
        """(kind, cosine, self_rank) of these renders."""
        return self.query("SELECT kind, cosine, self_rank FROM renders WHERE render_id IN (SELECT unnest(?))",
                          [list(render_ids)])

    def strongest_pairs(self, n: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The n most co-activating feature pairs, and the n + (those) most similar pairs by decoder cosine,
        each (a, b) with a < b."""
        co = self.query("SELECT feature_a, feature_b FROM coactivation WHERE feature_a < feature_b "
                        "ORDER BY n_images DESC, feature_a, feature_b LIMIT ?", [n])
        sim = self.query("SELECT least(feature_id, other_id) AS a, greatest(feature_id, other_id) AS b, "
                         "max(cosine) AS c FROM similar_features WHERE feature_id <> other_id GROUP BY a, b "
                         "ORDER BY c DESC, a, b LIMIT ?", [n + len(co)])
        return [(int(a), int(b)) for a, b in co], [(int(a), int(b)) for a, b, _ in sim]

    def one_embedded_image_per_label(self, n: int) -> list[int]:
        """The first embedded image of each label (in label order, unlabelled last), at most n."""
        rows = self.query("SELECT min(i.image_id) FROM images i JOIN embeddings e USING (image_id) "
                          "GROUP BY i.label_id ORDER BY i.label_id NULLS LAST LIMIT ?", [n])
        return [int(r[0]) for r in rows]

    def first_embedded_images(self, n: int) -> list[int]:
        return [int(r[0]) for r in self.query("SELECT image_id FROM embeddings ORDER BY image_id LIMIT ?", [n])]

    def replace_renders(self, columns: dict[str, list]) -> None:
        """Insert render rows (column → values) in one transaction, replacing rows with the same render_id (a
        row left by a run that crashed between file and row write is replaced, not duplicated)."""
        import pyarrow as pa
        types = {"feature_a": pa.int32(), "feature_b": pa.int32(), "image_id": pa.int32(), "t": pa.float64(),
                 "seed": pa.int32(), "cosine": pa.float64(), "self_activation": pa.float64(),
                 "self_rank": pa.int32(), "created_at": pa.timestamp("us")}
        with self.transaction():
            self.con.execute("DELETE FROM renders WHERE render_id IN (SELECT unnest(?))", [columns["render_id"]])
            self.insert_frame("renders", {k: arrow_column(v, types.get(k)) for k, v in columns.items()})
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
        """The store's tables and views (main schema: `features` is a view), by name."""
        return [r[0] for r in self.con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
            "AND table_type IN ('BASE TABLE', 'VIEW') ORDER BY table_name").fetchall()]

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

    # --- exports -----------------------------------------------------------------------------------------
    def feature_frequencies(self) -> dict[int, float]:
        """feature_id → frequency (share of images where it is active)."""
        return {int(f): float(v) for f, v in self.query("SELECT feature_id, frequency FROM features")}

    def schema_version(self) -> int:
        return int(self.scalar("SELECT value FROM meta WHERE key = 'schema_version'"))
    # --- faults: artefact checks (artefacts.py) ----------------------------------------------------------
    def sae_weight_paths(self) -> list[str]:
        """Every SAE run's weights file, relative to the output folder."""
        return [r[0] for r in self.con.execute("SELECT weights_path FROM sae_runs ORDER BY run_id").fetchall()]

    def corpus_copy_paths(self) -> list[str]:
        """Every image's corpus copy, relative to the output folder, by image id."""
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

    # --- ingest/embed speed ------------------------------------------------------------------------------
    def for_thread(self) -> "Store":
        """A second Store on the same database for one other thread (a DuckDB connection must not be used
        by two threads at once); close it when that thread is done."""
        return Store(self.con.cursor(), self.paths, self.read_only)

    # --- site pages: inversions page, feature examples by activation range (issue 13) --------------------
    def image_inversion_renders(self) -> list[dict]:
        """Inversions of corpus images (kinds 'image' and 'ablation'; RENDER_COLUMNS), by image, kind, seed,
        variant."""
        cols = self.RENDER_COLUMNS
        return [dict(zip(cols, r)) for r in self.con.execute(
            f"SELECT {', '.join(cols)} FROM renders WHERE kind IN ('image', 'ablation') "
            "ORDER BY image_id, kind, seed, variant, render_id").fetchall()]

    def feature_examples_by_band(self, n_per_band: int) -> dict[int, list[tuple[int, int, float, str | None]]]:
        """feature id → [(band, image id, activation, corpus_path)]: up to `n_per_band` images from each of three
        activation ranges of the images where the feature fires (band 0: at or above its 90th percentile q90,
        1: from the median q50 to q90, 2: below q50), leaving out its top images (shown on their own). The pick
        inside a band is a fixed pseudo-random sample (a hash of image and feature), taken first from images that
        already have a thumbnail (some feature's top image), so the site adds few new picture files; strongest
        first."""
        return self._grouped("""
            WITH thumbed AS (SELECT DISTINCT image_id, true AS has_thumb FROM top_images)
            SELECT feature_id, band, image_id, value, corpus_path FROM (
                SELECT a.feature_id, a.image_id, a.value,
                       CASE WHEN a.value >= s.q90 THEN 0 WHEN a.value >= s.q50 THEN 1 ELSE 2 END AS band,
                       hash(a.image_id, a.feature_id) AS pick
                FROM activations a JOIN feature_stats s USING (feature_id)
                WHERE NOT EXISTS (SELECT 1 FROM top_images t
                                  WHERE t.feature_id = a.feature_id AND t.image_id = a.image_id))
            JOIN images USING (image_id) LEFT JOIN thumbed USING (image_id)
            QUALIFY row_number() OVER (PARTITION BY feature_id, band ORDER BY has_thumb NULLS LAST, pick) <= ?
            ORDER BY feature_id, band, value DESC, image_id""", [int(n_per_band)])
