"""The site's Query page (`query.html`): readers run SQL over the store in their browser.

What it publishes beside the pages:
- `data/<table>.parquet` + `data/schema.json`: the store's tables (SITE_TABLES; the embeddings are left out
  for size, and columns holding paths on the builder's disk or the builder's config are left out), plus
  `site_pictures` (kind 'feature' | 'image', id, src, width, height): the picture the site shows for each
  feature and the thumbnails it has of images, so results can show them.
- `assets/duckdb/`: DuckDB-WASM (one bundle: the "eh" build, for browsers with WebAssembly exceptions),
  Apache Arrow and parquet-wasm, copied from `vendor/duckdb-wasm/node_modules` (npm, pinned by its
  package-lock.json). DuckDB-WASM has no Parquet reader built in (it would fetch its parquet extension from
  extensions.duckdb.org, off the site), so the page decodes a table's Parquet file with parquet-wasm and
  hands DuckDB the rows as Arrow IPC. DuckDB's browser module imports "apache-arrow" by bare name, which a
  page cannot resolve without an inline import map (the CSP forbids inline scripts), so the copy binds that
  import to the global `Arrow` of Arrow's own browser build, loaded just before it.
DuckDB's WebAssembly (34 MB) is published in parts of at most ENGINE_PART_BYTES (`duckdb-eh.0.wasm`, `duckdb-eh.1.wasm`,
...), under the per-file limits of Netlify and Cloudflare Pages (`site.hosting`), named `.wasm` so hosts
serve them as application/wasm, which they compress; the page starts DuckDB's worker
through `assets/duckdb-worker.js`, which fetches the parts and joins them when DuckDB fetches `duckdb-eh.wasm`.
The page loads all this only on itself; `query.js` fetches a table's Parquet file when a query names it.
Without the npm files (or with `[site] sql = false`) the page is left out with one line, not a failure.

Called from the site stage through two hooks: `prepare()` before pages are written (it decides whether the
page exists, so the nav can link it) and `QueryPage.write()` after them (it needs the pictures they copied).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .. import paths as paths_mod
from ..export import SCHEMA_FILE, write_tables
from ..progress import say

PAGE = "query.html"
NAV_ENTRY = ("Query", PAGE)
DATA_DIR = "data"
ENGINE_DIR = "assets/duckdb"
# Published tables → the columns left out (the rest are published).
SITE_TABLES: dict[str, set[str]] = {
    "features": set(), "activations": set(), "top_images": set(), "similar_features": set(),
    "coactivation": set(), "probes": set(), "sae_metrics": set(),
    # Paths in the build folder that the site does not have (it copies only the pictures it shows, under
    # other names: site_pictures has those), and a path on the builder's disk.
    "sae_runs": {"weights_path"},
    "images": {"source", "corpus_path"},
    "renders": {"params_json"},  # names the model, which may be a local folder
}
PICTURES_TABLE = "site_pictures"
PICTURES_DESCRIPTION = {
    "kind": "feature | image", "id": "feature_id or image_id",
    "src": "the picture on this site, relative to the site root (a feature's best render, else its top image; "
           "an image's thumbnail)",
    "width": "in px", "height": "in px"}
# Engine files: name in assets/duckdb/ → path under node_modules.
DUCKDB_MODULE = "duckdb-browser.js"
ENGINE_FILES = {
    DUCKDB_MODULE: "@duckdb/duckdb-wasm/dist/duckdb-browser.mjs",
    "duckdb-browser-eh.worker.js": "@duckdb/duckdb-wasm/dist/duckdb-browser-eh.worker.js",
    "duckdb-eh.wasm": "@duckdb/duckdb-wasm/dist/duckdb-eh.wasm",
    "arrow.js": "apache-arrow/Arrow.es2015.min.js",
    "LICENSE-apache-arrow.txt": "apache-arrow/LICENSE.txt",
    "NOTICE-apache-arrow.txt": "apache-arrow/NOTICE.txt",
    "parquet_wasm.js": "parquet-wasm/esm/parquet_wasm.js",
    "parquet_wasm_bg.wasm": "parquet-wasm/esm/parquet_wasm_bg.wasm",
    "LICENSE-parquet-wasm.txt": "parquet-wasm/LICENSE_MIT",
}
# The engine file published in parts (see the module docstring), and their size: under Netlify's 10 MB per file,
# the smallest per-file limit in site.hosting.HOST_LIMITS.
ENGINE_IN_PARTS = "duckdb-eh.wasm"
ENGINE_PART_BYTES = 8 << 20
_ARROW_IMPORT = re.compile(r'import\s*\*\s*as\s*([A-Za-z_$][\w$]*)\s*from\s*"apache-arrow"\s*;')
_SOURCE_MAP = re.compile(r"\n//# sourceMappingURL=\S+\s*$")


@dataclass(frozen=True)
class Engine:
    modules_dir: Path
    version: str        # @duckdb/duckdb-wasm
    arrow_version: str
    parquet_wasm_version: str


def find_engine() -> tuple[Engine | None, str]:
    """DuckDB-WASM from the vendored npm install, or (None, why not)."""
    modules = paths_mod.duckdb_wasm_modules()
    if modules is None:
        return None, ("DuckDB-WASM is not installed (run `npm ci --prefix vendor/duckdb-wasm`, or set "
                      "ATLASGEN_DUCKDB_WASM to its node_modules)")
    missing = [rel for rel in ENGINE_FILES.values() if not (modules / rel).is_file()]
    if missing:
        return None, f"DuckDB-WASM in {modules} lacks {missing[0]} (reinstall: npm ci --prefix vendor/duckdb-wasm)"
    version = json.loads((modules / "@duckdb/duckdb-wasm/package.json").read_text())["version"]
    arrow_version = json.loads((modules / "apache-arrow/package.json").read_text())["version"]
    parquet_wasm_version = json.loads((modules / "parquet-wasm/package.json").read_text())["version"]
    return Engine(modules, version, arrow_version, parquet_wasm_version), ""


def browser_module(engine: Engine) -> str | None:
    """duckdb-browser.mjs with its "apache-arrow" imports bound to the global Arrow; None if it no longer
    has the expected form (a DuckDB-WASM update)."""
    text = (engine.modules_dir / ENGINE_FILES[DUCKDB_MODULE]).read_text(encoding="utf-8")
    text, n = _ARROW_IMPORT.subn(lambda m: f"var {m.group(1)}=globalThis.Arrow;", text)
    if n == 0 or re.search(r'from\s*"apache-arrow"|\bimport\s*[\w*{]', text):
        return None
    return _SOURCE_MAP.sub("\n", text)


def write_parts(src: Path, folder: Path, part_bytes: int) -> int:
    """`src` cut into `folder/<stem>.0<suffix>`, `.1<suffix>`, ... (`duckdb-eh.0.wasm`) of at most `part_bytes`
    each; returns how many."""
    n_parts = 0
    with open(src, "rb") as f:
        while chunk := f.read(part_bytes):
            (folder / f"{src.stem}.{n_parts}{src.suffix}").write_bytes(chunk)
            n_parts += 1
    return n_parts


def prepare(cfg, store, site_dir: Path) -> "QueryPage | None":
    """The Query page to write, or None (`[site] sql = false`, or no DuckDB-WASM: one line says so)."""
    if not cfg.sql:
        return None
    engine, why = find_engine()
    module = browser_module(engine) if engine else None
    if engine is not None and module is None:
        why = f"DuckDB-WASM {engine.version}'s browser module has an unexpected form (expected one 'apache-arrow' import)"
    if module is None:
        say(f"site: the Query page is left out: {why}")
        return None
    return QueryPage(engine, module)


class QueryPage:
    nav = NAV_ENTRY

    def __init__(self, engine: Engine, module_text: str):
        self.engine = engine
        self.module_text = module_text

    def write(self, writer, data) -> dict:
        """Engine files, Parquet tables, schema.json and the page. Returns the site summary's additions."""
        site_dir: Path = writer.site_dir
        store = data.store
        engine_bytes, n_engine_parts = self._copy_engine(site_dir / ENGINE_DIR)
        data_dir = site_dir / DATA_DIR
        data_dir.mkdir(parents=True, exist_ok=True)
        known = set(store.table_names())
        tables = {t: [c for c, _ in store.table_columns(t) if c not in dropped]
                  for t, dropped in SITE_TABLES.items() if t in known}
        schema = {"tables": write_tables(store, data_dir, tables)}
        schema["tables"][PICTURES_TABLE] = self._write_pictures(data, data_dir / f"{PICTURES_TABLE}.parquet")
        schema["duckdb_wasm"] = self.engine.version
        (data_dir / SCHEMA_FILE).write_text(json.dumps(schema, indent=1), encoding="utf-8")
        data_bytes = sum(p.stat().st_size for p in data_dir.iterdir())
        writer.render("query.html", PAGE, {
            "examples": examples(data), "tables": schema["tables"], "duckdb_version": self.engine.version,
            "arrow_version": self.engine.arrow_version, "engine_mb": engine_bytes / 1e6, "data_mb": data_bytes / 1e6,
            "engine_parts": n_engine_parts})
        return {"query_page": True, "query_engine_bytes": engine_bytes, "query_data_bytes": data_bytes}

    def _copy_engine(self, engine_dir: Path) -> tuple[int, int]:
        """The engine's files into `engine_dir`; returns (their bytes, the number of ENGINE_IN_PARTS's parts)."""
        engine_dir.mkdir(parents=True, exist_ok=True)
        n_parts = 0
        for name, rel in ENGINE_FILES.items():
            src, dst = self.engine.modules_dir / rel, engine_dir / name
            if name == ENGINE_IN_PARTS:
                n_parts = write_parts(src, engine_dir, ENGINE_PART_BYTES)
            elif name == DUCKDB_MODULE:
                dst.write_text(self.module_text, encoding="utf-8")
            elif name.endswith(".js"):  # without the source-map comment: the maps are not published
                dst.write_text(_SOURCE_MAP.sub("\n", src.read_text(encoding="utf-8")), encoding="utf-8")
            else:
                paths_mod.link_or_copy(src, dst)
        (engine_dir / "VERSIONS.txt").write_text(
            f"@duckdb/duckdb-wasm {self.engine.version} (MIT licence), apache-arrow {self.engine.arrow_version} "
            "(Apache-2.0: LICENSE-apache-arrow.txt, NOTICE-apache-arrow.txt), parquet-wasm "
            f"{self.engine.parquet_wasm_version} (MIT or Apache-2.0: LICENSE-parquet-wasm.txt), from the npm "
            "registry through vendor/duckdb-wasm/package-lock.json; duckdb-browser.js binds its 'apache-arrow' "
            "import to arrow.js.\n",
            encoding="utf-8")
        return sum(p.stat().st_size for p in engine_dir.iterdir()), n_parts

    @staticmethod
    def _write_pictures(data, path: Path) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq
        rows = [("feature", fid, pic) for fid, pic in sorted(data.best.items()) if pic is not None]
        image_ids = sorted({int(i) for tops in data.top_images.values() for i, _ in tops})
        rows += [("image", i, pic) for i in image_ids if (pic := data.thumb(i)) is not None]
        table = pa.table({"kind": pa.array([r[0] for r in rows], pa.string()),
                          "id": pa.array([int(r[1]) for r in rows], pa.int32()),
                          "src": pa.array([r[2].src for r in rows], pa.string()),
                          "width": pa.array([int(r[2].width) for r in rows], pa.int32()),
                          "height": pa.array([int(r[2].height) for r in rows], pa.int32())})
        pq.write_table(table, path, compression="zstd")
        types = {"kind": "VARCHAR", "id": "INTEGER", "src": "VARCHAR", "width": "INTEGER", "height": "INTEGER"}
        return {"file": path.name, "n_rows": len(rows),
                "columns": [{"name": c, "type": t, "description": PICTURES_DESCRIPTION[c]} for c, t in types.items()]}


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def examples(data) -> list[dict]:
    """Ready queries on this store: top features of its commonest label, features that fire together, the
    decomposition of the strongest feature's top image."""
    out = []
    labels = Counter(label for label in data.image_labels.values() if label)
    if labels:
        label = sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        out.append({"key": "label", "title": f"Top features of “{label}”", "sql": f"""\
-- The features that fire on the most images labelled {_sql_text(label)}
SELECT a.feature_id, f.label, count(*) AS n_images, round(avg(a.value), 3) AS mean_value
FROM activations a
JOIN images i USING (image_id)
JOIN features f USING (feature_id)
WHERE i.label = {_sql_text(label)}
GROUP BY a.feature_id, f.label
ORDER BY n_images DESC, mean_value DESC, a.feature_id
LIMIT 20"""})
    out.append({"key": "together", "title": "Features that fire together", "sql": """\
-- Pairs of features active on the same images (3 or more); jaccard = shared / images with either
SELECT c.feature_a, c.feature_b, c.n_images,
       round(c.n_images / (fa.n_active + fb.n_active - c.n_images), 3) AS jaccard,
       fa.label AS label_a, fb.label AS label_b
FROM coactivation c
JOIN features fa ON fa.feature_id = c.feature_a
JOIN features fb ON fb.feature_id = c.feature_b
WHERE c.n_images >= 3
ORDER BY jaccard DESC, c.n_images DESC, c.feature_a, c.feature_b
LIMIT 20"""})
    strongest = sorted((f for f in data.features if data.top_images.get(f["feature_id"])),
                       key=lambda f: (-(f["strength"] or 0), f["feature_id"]))
    if strongest:
        image_id = int(data.top_images[strongest[0]["feature_id"]][0][0])
        label = data.image_labels.get(image_id)
        out.append({"key": "image", "title": f"Decomposition of image {image_id}", "sql": f"""\
-- Image {image_id}{f' ({label})' if label else ''} as a sum of features, strongest first
SELECT a.image_id, a.feature_id, f.label, round(a.value, 3) AS value
FROM activations a
JOIN features f USING (feature_id)
WHERE a.image_id = {image_id}
ORDER BY a.value DESC, a.feature_id"""})
    return out

