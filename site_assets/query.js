// The Query page: DuckDB-WASM, served from this site (assets/duckdb/), runs the reader's SQL over the store's
// Parquet files (data/*.parquet, listed in data/schema.json). A table's file is fetched from the site the
// first time a query names it, decoded by parquet-wasm (DuckDB-WASM's own Parquet reader is an extension it
// would download from elsewhere) and handed to DuckDB as Arrow IPC. DuckDB gets no file, network or extension
// access at all, and results are built with DOM nodes (textContent), never HTML strings.
import * as duckdb from "./duckdb/duckdb-browser.js";
import initParquet, { readParquet } from "./duckdb/parquet_wasm.js";

const MAX_ROWS = 500;
const FEATURE_COLUMNS = /^(feature_id|feature_a|feature_b|other_id)$/;
const IMAGE_COLUMNS = /^image_id$/;

const form = document.getElementById("sql-form");
const input = document.getElementById("sql-input");
const runButton = document.getElementById("sql-run");
const statusEl = document.getElementById("sql-status");
const errorEl = document.getElementById("sql-error");
const resultsEl = document.getElementById("sql-results");
const siteRoot = new URL(form.dataset.root || "./", document.baseURI);
const dataUrl = (name) => new URL("data/" + name, siteRoot).href;

let db = null;
let conn = null;
let tables = {};          // name → schema.json entry
const loaded = new Set(); // tables registered in DuckDB

function setState(state, text) {
  form.dataset.state = state;
  statusEl.textContent = text;
  runButton.disabled = state === "loading" || state === "running";
}

function showError(message) {
  errorEl.textContent = message;
  errorEl.hidden = false;
}

async function start() {
  const engine = (name) => new URL("duckdb/" + name, import.meta.url).href;
  // DuckDB's worker, started by duckdb-worker.js, which joins the WebAssembly's parts when DuckDB fetches it.
  const parts = Number(form.dataset.engineParts) || 0;
  const worker = new Worker(new URL(`duckdb-worker.js?parts=${parts}`, import.meta.url).href);
  db = new duckdb.AsyncDuckDB(new duckdb.VoidLogger(), worker);
  await Promise.all([db.instantiate(engine("duckdb-eh.wasm")), initParquet({ module_or_path: engine("parquet_wasm_bg.wasm") })]);
  // DECIMAL (0.1 + 0.2, a decimal literal) and HUGEINT (what sum() of integers returns) arrive as 128-bit words
  // that Arrow's JavaScript leaves raw: as doubles they print as numbers.
  await db.open({ query: { castBigIntToDouble: true, castDecimalToDouble: true } });
  conn = await db.connect();
  const response = await fetch(dataUrl("schema.json"));
  if (!response.ok) throw new Error(`data/schema.json: HTTP ${response.status}`);
  tables = (await response.json()).tables;
  // The data arrives as Arrow from this page, so DuckDB needs no files, URLs or extensions: turn them all
  // off, then lock the configuration so no query can turn them back on.
  for (const statement of [
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET enable_external_access = false",
    "SET lock_configuration = true",
  ]) {
    await conn.query(statement);
  }
}

async function ensureTables(sql) {
  for (const [name, table] of Object.entries(tables)) {
    if (loaded.has(name) || !new RegExp(`\\b${name}\\b`, "i").test(sql)) continue;
    setState("running", `fetching ${table.file}…`);
    const response = await fetch(dataUrl(table.file));
    if (!response.ok) throw new Error(`${table.file}: HTTP ${response.status}`);
    const decoded = readParquet(new Uint8Array(await response.arrayBuffer()));
    await conn.insertArrowFromIPCStream(decoded.intoIPCStream(), { name, create: true });
    loaded.add(name);
  }
}

// `type`: the Arrow type of the column (or of the list item, struct field, map value), where it is known.
function formatValue(value, type) {
  if (value === null || value === undefined) return "–";
  const { DataType } = globalThis.Arrow;
  if (type && DataType.isStruct(type)) {
    return "{" + type.children.map((f) => `${f.name}: ${formatValue(value[f.name], f.type)}`).join(", ") + "}";
  }
  if (type && DataType.isMap(type) && typeof value.toJSON === "function") {
    const valueType = type.children[0]?.type?.children?.[1]?.type;
    return "{" + Object.entries(value.toJSON()).map(([k, v]) => `${k}: ${formatValue(v, valueType)}`).join(", ") + "}";
  }
  if (typeof value === "number") {
    if (Number.isInteger(value)) return String(value);
    return Math.abs(value) >= 1e-3 && Math.abs(value) < 1e6 ? String(+value.toPrecision(5)) : value.toExponential(3);
  }
  if (typeof value === "bigint") return value.toString();
  if (value instanceof Date) return value.toISOString().replace("T", " ").replace(/\.000Z$|Z$/, "");
  if (typeof value.toArray === "function") {
    const itemType = type && (DataType.isList(type) || DataType.isFixedSizeList(type)) ? type.children[0].type : undefined;
    return "[" + Array.from(value.toArray(), (v) => formatValue(v, itemType)).join(", ") + "]";
  }
  if (typeof value === "object") return JSON.stringify(value, (k, v) => (typeof v === "bigint" ? v.toString() : v));
  return String(value);
}

async function pictures(featureIds, imageIds) {
  const wanted = (ids) => [...ids].filter(Number.isInteger).join(", ");
  const found = { feature: new Map(), image: new Map() };
  const parts = [];
  if (featureIds.size) parts.push(`(kind = 'feature' AND id IN (${wanted(featureIds)}))`);
  if (imageIds.size) parts.push(`(kind = 'image' AND id IN (${wanted(imageIds)}))`);
  if (!parts.length || !tables.site_pictures) return found;
  await ensureTables("site_pictures");
  const result = await conn.query(`SELECT kind, id, src, width, height FROM site_pictures WHERE ${parts.join(" OR ")}`);
  for (const row of result.toArray()) {
    found[row.kind].set(Number(row.id), { src: row.src, width: Number(row.width), height: Number(row.height) });
  }
  return found;
}

function pictureCell(td, id, pic, href) {
  const wrap = href ? document.createElement("a") : document.createElement("span");
  wrap.className = "sql-ref";
  if (href) wrap.href = new URL(href, siteRoot).href;
  if (pic) {
    const img = document.createElement("img");
    img.src = new URL(pic.src.split("/").map(encodeURIComponent).join("/"), siteRoot).href;
    img.width = 40;
    img.height = Math.max(1, Math.round((40 * pic.height) / Math.max(pic.width, 1)));
    img.alt = "";
    img.loading = "lazy";
    wrap.append(img);
  }
  const label = document.createElement("span");
  label.textContent = (href ? "#" : "") + id;
  wrap.append(label);
  td.append(wrap);
}

// Arrow hands timestamps and dates over as milliseconds: show them as dates.
function isTime(type) {
  const { DataType } = globalThis.Arrow;
  return DataType.isTimestamp(type) || DataType.isDate(type);
}

async function render(result, seconds) {
  const columns = result.schema.fields.map((f) => f.name);
  const types = result.schema.fields.map((f) => f.type);
  const times = types.map(isTime);
  const rows = result.toArray();
  const dates = result.schema.fields.map((f) => globalThis.Arrow.DataType.isDate(f.type));
  const shown = rows.slice(0, MAX_ROWS).map((row) => columns.map((c, i) => {
    if (!times[i] || typeof row[c] !== "number") return row[c];
    return dates[i] ? new Date(row[c]).toISOString().slice(0, 10) : new Date(row[c]);
  }));
  const featureIds = new Set();
  const imageIds = new Set();
  columns.forEach((c, i) => {
    const target = FEATURE_COLUMNS.test(c) ? featureIds : IMAGE_COLUMNS.test(c) ? imageIds : null;
    if (target) for (const r of shown) if (r[i] !== null && r[i] !== undefined) target.add(Number(r[i]));
  });
  const pics = await pictures(featureIds, imageIds);

  const table = document.createElement("table");
  table.className = "sql-table-result";
  const head = table.createTHead().insertRow();
  for (const c of columns) {
    const th = document.createElement("th");
    th.textContent = c;
    head.append(th);
  }
  const body = table.createTBody();
  for (const r of shown) {
    const tr = body.insertRow();
    r.forEach((value, i) => {
      const td = tr.insertCell();
      const id = Number(value);
      if (value !== null && value !== undefined && Number.isInteger(id) && FEATURE_COLUMNS.test(columns[i])) {
        td.className = "sql-feature";
        pictureCell(td, id, pics.feature.get(id), `features/${id}.html`);
      } else if (value !== null && value !== undefined && Number.isInteger(id) && IMAGE_COLUMNS.test(columns[i])) {
        td.className = "sql-image";
        pictureCell(td, id, pics.image.get(id), null);
      } else {
        td.textContent = formatValue(value, types[i]);
        if (typeof value === "number" || typeof value === "bigint") td.className = "num";
      }
    });
  }
  const summary = document.createElement("p");
  summary.className = "muted sql-summary";
  summary.textContent = `${rows.length} row${rows.length === 1 ? "" : "s"}` +
    (rows.length > MAX_ROWS ? ` (the first ${MAX_ROWS} shown)` : "") + ` · ${seconds.toFixed(2)} s`;
  resultsEl.replaceChildren(summary, table);
}

async function run() {
  const sql = input.value;
  errorEl.hidden = true;
  if (!sql.replace(/--[^\n]*/g, "").replace(/\/\*[\s\S]*?\*\//g, "").trim()) {
    showError("No SQL to run: the query is empty or only comments.");
    setState("error", "nothing to run");
    return;
  }
  setState("running", "running…");
  const t0 = performance.now();
  try {
    await ensureTables(sql);
    const result = await conn.query(sql);
    await render(result, (performance.now() - t0) / 1000);
    setState("done", "done");
  } catch (e) {
    resultsEl.replaceChildren();
    showError(String(e && e.message ? e.message : e));
    setState("error", "the query failed");
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (form.dataset.state !== "loading" && form.dataset.state !== "running") run();
});
input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    form.requestSubmit();
  }
});
for (const button of document.querySelectorAll(".sql-example")) {
  button.addEventListener("click", () => {
    input.value = button.dataset.sql;
    form.requestSubmit();
  });
}

start().then(
  () => setState("ready", "ready"),
  (e) => {
    showError(`DuckDB could not start in this browser: ${e && e.message ? e.message : e}`);
    setState("error", "DuckDB could not start");
  },
);
