"""`atlasgen export`: every table as Parquet that DuckDB reads back equal to the store, schema.json with the
schema comments, and the SAE in the SAELens format reconstructing the store's (top-k capped) activations.

The SAELens check runs twice: always against SAELens's documented format (cfg.json keys, the safetensors key
names and shapes, and its TopK encode formula `topk(relu((x - b_dec) @ W_enc + b_enc), k)` written out here in
numpy), and, where the `sae_lens` package is installed, through `sae_lens.SAE.load_from_disk(...).encode`.
The CI does not install sae_lens (its dependencies would pull a second torch stack); that check was run by
hand with sae-lens 6.54.12 (see docs/STORE.md "Exporting the store")."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from atlasgen.cli import app
from atlasgen.export import schema_descriptions
from atlasgen.store import SCHEMA_VERSION, SCHEMA_SQL, Store

runner = CliRunner()
HAS_SAE_LENS = importlib.util.find_spec("sae_lens") is not None


@pytest.fixture(scope="module")
def exported(tiny_encoded, tmp_path_factory) -> Path:
    to = tmp_path_factory.mktemp("export") / "atlas-export"
    result = runner.invoke(app, ["export", "--out", str(tiny_encoded), "--to", str(to)])
    assert result.exit_code == 0, result.output
    assert "SAELens" in result.output
    return to


def store_activations(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image ids, embeddings, dense top-k capped activations from the `activations` table)."""
    with Store.open(out, read_only=True) as store:
        ids_n, emb_nd = store.embeddings()
        n_features = store.sae_run_used_by("encode")["n_features"]
        rows = store.query("SELECT image_id, feature_id, value FROM activations")
    acts_nf = np.zeros((len(ids_n), n_features), np.float32)
    row_of = {int(i): r for r, i in enumerate(ids_n)}
    for image_id, feature_id, value in rows:
        acts_nf[row_of[image_id], feature_id] = value
    return ids_n, emb_nd, acts_nf


def test_every_table_reads_back_equal(tiny_encoded, exported):
    with Store.open(tiny_encoded, read_only=True) as store:
        tables = store.table_names()
    assert {"activations", "features", "embeddings", "images", "meta", "stage_runs"} <= set(tables)
    con = duckdb.connect(str(tiny_encoded / "atlas.duckdb"), read_only=True)
    try:
        for table in tables:
            path = str(exported / f"{table}.parquet")
            n_store = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            n_file = con.execute("SELECT count(*) FROM read_parquet(?)", [path]).fetchone()[0]
            assert n_file == n_store, table
            for a, b in ((f"SELECT * FROM {table}", f"SELECT * FROM read_parquet('{path}')"),
                         (f"SELECT * FROM read_parquet('{path}')", f"SELECT * FROM {table}")):
                n_diff = con.execute(f"SELECT count(*) FROM ({a} EXCEPT ALL {b})").fetchone()[0]
                assert n_diff == 0, f"{table}: {n_diff} rows differ"
            store_types = [r[1] for r in con.execute(f"DESCRIBE {table}").fetchall()]
            file_types = [r[1] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{path}')").fetchall()]
            assert file_types == store_types, table
        assert con.execute("SELECT count(*) FROM activations").fetchone()[0] > 100
    finally:
        con.close()


def test_schema_json_describes_every_column(tiny_encoded, exported):
    schema = json.loads((exported / "schema.json").read_text())
    assert schema["format"] == "atlasgen-export" and schema["store_schema_version"] == SCHEMA_VERSION
    with Store.open(tiny_encoded, read_only=True) as store:
        for table in store.table_names():
            entry = schema["tables"][table]
            assert entry["file"] == f"{table}.parquet" and entry["n_rows"] == store.count(table)
            assert [(c["name"], c["type"]) for c in entry["columns"]] == store.table_columns(table)
    columns = {c["name"]: c for c in schema["tables"]["features"]["columns"]}
    assert columns["frequency"]["description"] == "n_active / number of images"
    assert columns["q90"]["description"] == columns["q50"]["description"] == "quantiles over active images"
    assert columns["grid_y"]["description"].startswith("cell on the map grid")
    assert columns["histogram"]["type"] == "INTEGER[]"
    assert schema["tables"]["activations"]["columns"][2]["description"] == "SAE activation (top-k capped, > 0)"
    assert schema["sae"]["format"] == "SAELens" and schema["sae"]["architecture"] == "topk"


def test_schema_comments_parse_for_every_column():
    """Every column declared in SCHEMA_SQL is found (a described or an undescribed one)."""
    described = schema_descriptions(SCHEMA_SQL)
    assert len(described) == SCHEMA_SQL.count("CREATE TABLE") + SCHEMA_SQL.count("CREATE OR REPLACE VIEW")
    assert list(described["features"])[:4] == ["feature_id", "n_active", "frequency", "max_value"]
    assert described["features"]["umap_x"] == described["features"]["umap_y"] == "co-activation UMAP (no row for dead features)"
    assert described["images"]["image_id"] is None


def test_saelens_layout_and_formula_reconstruct_the_store(tiny_encoded, exported):
    """The documented SAELens (>= 6) disk format, and its TopK encode on raw embeddings = our activations."""
    sae_dir = exported / "sae"
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    weights = load_file(str(sae_dir / "sae_weights.safetensors"))
    d_in, d_sae, k = cfg["d_in"], cfg["d_sae"], cfg["k"]
    assert cfg["architecture"] == "topk" and cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    assert cfg["dtype"] == "float32" and cfg["rescale_acts_by_decoder_norm"] is False
    assert cfg["metadata"]["sae_lens_version"] >= "6" and cfg["metadata"]["hook_name"] == "pooler_output"
    assert {name: w.shape for name, w in weights.items()} == {
        "W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    assert all(w.dtype == np.float32 for w in weights.values())
    assert load_file(str(sae_dir / "sparsity.safetensors"))["sparsity"].shape == (d_sae,)

    _, emb_nd, stored_nf = store_activations(tiny_encoded)
    with Store.open(tiny_encoded, read_only=True) as store:
        assert k == store.stage_config("encode")["top_k"]
    assert d_in == emb_nd.shape[1] and d_sae == stored_nf.shape[1]
    # SAELens TopKSAE.encode: process_sae_in subtracts b_dec, then topk of the pre-activations, then ReLU.
    pre_nf = (emb_nd.astype(np.float64) - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    acts_nf = np.zeros_like(pre_nf)
    top_nk = np.argpartition(-pre_nf, k - 1, axis=1)[:, :k]
    np.put_along_axis(acts_nf, top_nk, np.maximum(np.take_along_axis(pre_nf, top_nk, axis=1), 0), axis=1)
    scale = np.abs(stored_nf).max()
    assert (stored_nf > 0).sum() > 10 * len(stored_nf), "too few activations to compare"
    np.testing.assert_allclose(acts_nf, stored_nf, atol=1e-4 * scale, rtol=1e-4)
    # The decoder maps back to the embedding space (not the normalised one): reconstructions are close to
    # the embeddings as a whole (the tiny SAE explains most of the variance).
    recon_nd = stored_nf @ weights["W_dec"] + weights["b_dec"]
    fvu = ((recon_nd - emb_nd) ** 2).sum() / ((emb_nd - emb_nd.mean(0)) ** 2).sum()
    assert fvu < 0.5, fvu


@pytest.mark.skipif(not HAS_SAE_LENS, reason="sae_lens is not installed (checked by hand, see the module doc)")
def test_sae_lens_loads_and_encodes_the_export(tiny_encoded, exported):
    import torch
    from sae_lens import SAE
    sae = SAE.load_from_disk(str(exported / "sae"), device="cpu")
    assert type(sae).__name__ == "TopKSAE"
    _, emb_nd, stored_nf = store_activations(tiny_encoded)
    with torch.no_grad():
        acts_nf = sae.encode(torch.from_numpy(emb_nd)).numpy()
        recon_nd = sae.decode(torch.from_numpy(stored_nf)).numpy()
    np.testing.assert_allclose(acts_nf, stored_nf, atol=1e-4 * np.abs(stored_nf).max(), rtol=1e-4)
    weights = load_file(str(exported / "sae" / "sae_weights.safetensors"))
    np.testing.assert_allclose(recon_nd, stored_nf @ weights["W_dec"] + weights["b_dec"], atol=1e-4)


def test_export_refuses_a_foreign_folder_and_replaces_an_earlier_export(tiny_encoded, exported, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["export", "--out", str(tiny_encoded), "--to", str(foreign)])
    assert result.exit_code == 2 and "holds no atlasgen export" in result.output
    assert (foreign / "notes.txt").read_text() == "keep me"
    again = tmp_path / "again"
    shutil.copytree(exported, again)
    (again / "stale.parquet").write_text("old")
    result = runner.invoke(app, ["export", "--out", str(tiny_encoded), "--to", str(again)])
    assert result.exit_code == 0, result.output
    assert not (again / "stale.parquet").exists() and (again / "features.parquet").is_file()
    assert not list(tmp_path.glob(".again.*")), "the temp folder was left behind"


def test_every_exported_file_and_the_sae_weights_are_readable_as_the_umask_allows(tiny_encoded, exported):
    """safetensors writes owner-only files (0600); ours get what any other write gets, as the Parquet files do."""
    import os
    mask = os.umask(0o022)
    os.umask(mask)
    expected = 0o666 & ~mask
    assert expected != 0o600, "the umask hides the difference this test looks for"
    with Store.open(tiny_encoded, read_only=True) as store:
        weights = tiny_encoded / store.sae_run_used_by("encode")["weights_path"]
    files = [p for p in exported.rglob("*") if p.is_file()] + [weights]
    assert any(p.suffix == ".safetensors" for p in files) and any(p.suffix == ".parquet" for p in files)
    modes = {p.relative_to(p.parents[1]).as_posix(): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(expected)}, modes
