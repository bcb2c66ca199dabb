"""`atlasgen export --to DIR`: the store as open files other tools read.

    DIR/schema.json                     every table: its file, row count and columns (name, DuckDB type, the
                                        description from the comments in store.SCHEMA_SQL)
    DIR/<table>.parquet                 one Parquet file (zstd) per store table
    DIR/sae/cfg.json                    the SAE in the SAELens (>= 6) disk format: SAE.load_from_disk(DIR/sae)
    DIR/sae/sae_weights.safetensors     W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec, float32
    DIR/sae/sparsity.safetensors        log10 of each feature's firing frequency ("sparsity"), as SAELens saves it

Our SAE normalises its input, x = (embedding − mean) × scale, then encodes relu((x − b_dec) W_enc + b_enc).
The shift and the scalar fold exactly into SAELens's own form relu((embedding − b_dec') W_enc' + b_enc') with
W_enc' = scale·W_enc, b_dec' = mean + b_dec/scale, W_dec' = W_dec/scale, so the exported SAE takes raw
model embeddings (DINOv3 CLS pooler_output) and decodes back to them, with `normalize_activations: "none"`.
The architecture is SAELens's "topk" with k = the encode stage's top_k, which is how `encode` computes the
store's activations (top-k of the ReLU activations); set "architecture": "standard" for the uncapped ReLU SAE.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .errors import AtlasError
from .paths import as_umask_allows, atomic_dir, atomic_path

EXPORT_FORMAT = "atlasgen-export"
SCHEMA_FILE = "schema.json"
SAE_FOLDER = "sae"
SAELENS_CFG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_SPARSITY_FILE = "sparsity.safetensors"
# The SAELens disk format written here (version 6 configs: "architecture" and "metadata" at the top level).
SAELENS_FORMAT_VERSION = "6.0.0"
# The model output our SAE reads: SAELens records it as the hook name.
HOOK_NAME = "pooler_output"


# --- schema -------------------------------------------------------------------------------------
def schema_descriptions(schema_sql: str | None = None) -> dict[str, dict[str, str | None]]:
    """{table: {column: description}} from the `-- comments` in SCHEMA_SQL. A comment describes every
    column declared on its line (`q50 DOUBLE, q90 DOUBLE, q99 DOUBLE, -- quantiles ...`); columns with no
    comment get None."""
    if schema_sql is None:
        from .store import SCHEMA_SQL as schema_sql
    tables: dict[str, dict[str, str | None]] = {}
    current: dict[str, str | None] | None = None
    for line in schema_sql.splitlines():
        m = re.match(r"\s*CREATE TABLE (?:IF NOT EXISTS )?(\w+)", line, flags=re.I)
        if m:
            current = tables.setdefault(m.group(1), {})
            continue
        if current is None or line.strip().startswith(")"):
            continue
        code, _, comment = line.partition("--")
        for name in re.findall(r"(?:^|,)\s*([a-z_][a-z0-9_]*)\s+[A-Z]", code.strip()):
            if name.upper() not in ("PRIMARY", "UNIQUE", "FOREIGN", "CHECK", "CONSTRAINT"):
                current[name] = comment.strip() or None
    # The `features` view is feature_stats joined with feature_map: its columns are described there.
    if "feature_stats" in tables and "feature_map" in tables:
        tables["features"] = {**tables["feature_stats"],
                              **{k: v for k, v in tables["feature_map"].items() if k != "feature_id"}}
    return tables


def table_schema(store, tables: dict[str, list[str] | None], n_rows: dict[str, int]) -> dict:
    """The `tables` part of schema.json for `tables` ({name: columns or None for all})."""
    described = schema_descriptions()
    out = {}
    for table, wanted in tables.items():
        columns = [(c, t) for c, t in store.table_columns(table) if wanted is None or c in wanted]
        notes = described.get(table, {})
        out[table] = {"file": f"{table}.parquet", "n_rows": n_rows[table],
                      "columns": [{"name": c, "type": t, "description": notes.get(c)} for c, t in columns]}
    return out


def write_tables(store, folder: Path, tables: dict[str, list[str] | None]) -> dict:
    """Each table of `tables` as `folder/<table>.parquet`; returns their schema.json entries."""
    n_rows = {}
    for table, columns in tables.items():
        n_rows[table] = store.copy_to_parquet(table, folder / f"{table}.parquet", columns)
    return table_schema(store, tables, n_rows)


# --- the SAE in the SAELens format ---------------------------------------------------------------
def saelens_weights(sae) -> dict[str, np.ndarray]:
    """Our SAE with its input normalisation folded in (float64 arithmetic, float32 out), SAELens key names."""
    W_enc = sae.W_enc.detach().double().cpu().numpy()      # (d_in, d_sae)
    b_enc = sae.b_enc.detach().double().cpu().numpy()      # (d_sae,)
    W_dec = sae.W_dec.detach().double().cpu().numpy()      # (d_sae, d_in)
    b_dec = sae.b_dec.detach().double().cpu().numpy()      # (d_in,)
    mean = sae.input_mean.detach().double().cpu().numpy()  # (d_in,)
    scale = float(sae.input_scale.detach().double().cpu())
    assert scale > 0, "the SAE's input scale must be positive"
    folded = {"W_enc": W_enc * scale, "b_enc": b_enc, "W_dec": W_dec / scale, "b_dec": mean + b_dec / scale}
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in folded.items()}


def saelens_config(d_in: int, d_sae: int, top_k: int | None, model_name: str | None, run_id: str,
                   scale: float) -> dict:
    """cfg.json as SAELens 6 writes it (SAEConfig.to_dict()), plus what atlasgen knows in `metadata`."""
    cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none"}
    if top_k is not None:
        cfg.update({"architecture": "topk", "k": int(min(top_k, d_sae)), "rescale_acts_by_decoder_norm": False})
    else:
        cfg["architecture"] = "standard"
    from . import __version__
    cfg["metadata"] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
        "model_name": model_name, "model_class_name": "DINOv3ViTModel", "hook_name": HOOK_NAME,
        "hook_head_index": None, "prepend_bos": False, "context_size": None, "dataset_path": None,
        "exported_by": f"atlasgen {__version__}", "atlasgen_run_id": run_id,
        "atlasgen_note": (f"input normalisation (x - mean) * {scale:.6g} folded into W_enc, W_dec and b_dec: "
                          "feed raw pooler_output embeddings; trained as ReLU + L1 with unit decoder rows in the "
                          "normalised space" + (f"; k = encode.top_k ({top_k})" if top_k is not None else "")),
    }
    return cfg


def write_saelens(store, folder: Path) -> dict | None:
    """The store's latest SAE in `folder` (cfg.json, sae_weights.safetensors, sparsity.safetensors); None
    when the store has no trained SAE."""
    from safetensors.numpy import save_file
    from .sae import SparseAutoencoder
    run = store.sae_run_used_by("encode")  # the SAE whose activations the store holds
    if run is None:
        return None
    sae = SparseAutoencoder.load(Path(run["weights_path"]))
    encode_cfg = store.stage_config("encode")
    top_k = int(encode_cfg["top_k"]) if encode_cfg and encode_cfg.get("top_k") else None
    model_name = (store.stage_config("embed") or {}).get("model")
    cfg = saelens_config(sae.d_in, sae.n_features, top_k, model_name, run["run_id"], float(sae.input_scale))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(saelens_weights(sae), str(folder / SAELENS_WEIGHTS_FILE))
    as_umask_allows(folder / SAELENS_WEIGHTS_FILE)
    (folder / SAELENS_CFG_FILE).write_text(json.dumps(cfg, indent=2))
    freq = store.feature_frequencies()
    if freq:
        frequency = np.array([freq.get(i) or 0.0 for i in range(sae.n_features)], np.float64)
        save_file({"sparsity": np.log10(frequency + 1e-10).astype(np.float32)}, str(folder / SAELENS_SPARSITY_FILE))
        as_umask_allows(folder / SAELENS_SPARSITY_FILE)
    return {"folder": SAE_FOLDER, "format": "SAELens", "architecture": cfg["architecture"], "k": cfg.get("k"),
            "d_in": sae.d_in, "d_sae": sae.n_features, "run_id": run["run_id"],
            "files": sorted(p.name for p in folder.iterdir())}


# --- the command ---------------------------------------------------------------------------------
def _check_target(to_dir: Path) -> None:
    """Refuse to replace a folder that holds anything but a previous export."""
    if not to_dir.exists():
        return
    if not to_dir.is_dir():
        raise AtlasError(f"--to {to_dir} is a file", "pass a new or empty folder")
    if not any(to_dir.iterdir()):
        return
    try:
        marker = json.loads((to_dir / SCHEMA_FILE).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        marker = None
    if marker != EXPORT_FORMAT:
        raise AtlasError(f"--to {to_dir} is not empty and holds no atlasgen export",
                         "pass a new or empty folder (an earlier export there is replaced)")


def export_store(out_dir: Path, to_dir: Path) -> dict:
    """Every store table as Parquet, schema.json and the SAE (SAELens) into `to_dir`, built in a temp folder
    beside it and swapped into place (an earlier export there is replaced whole)."""
    from . import __version__
    from .store import Store
    to_dir = Path(to_dir)
    _check_target(to_dir)
    with Store.open(out_dir, read_only=True) as store:
        tables = {name: None for name in store.table_names()}
        with atomic_dir(to_dir) as tmp_dir:
            table_entries = write_tables(store, tmp_dir, tables)
            sae_entry = write_saelens(store, tmp_dir / SAE_FOLDER)
            schema = {"format": EXPORT_FORMAT, "atlasgen_version": __version__,
                      "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "store_schema_version": store.schema_version(),
                      "tables": table_entries, "sae": sae_entry}
            with atomic_path(tmp_dir / SCHEMA_FILE) as tmp:
                tmp.write_text(json.dumps(schema, indent=1))
    return schema
