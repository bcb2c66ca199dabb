// DuckDB-WASM's worker (duckdb/duckdb-browser-eh.worker.js), with its WebAssembly published in parts: a 34 MB
// file is over the per-file limits of Netlify and Cloudflare Pages, so the site stage cuts duckdb-eh.wasm into
// duckdb-eh.0.wasm, duckdb-eh.1.wasm, ... (atlasgen/site/query.py). When DuckDB fetches duckdb-eh.wasm, this
// fetches the parts (?parts=N in this worker's URL, from query.js) at once and answers with them joined, as
// application/wasm.
const nParts = Number(new URLSearchParams(self.location.search).get("parts")) || 0;
const fetchFromSite = self.fetch.bind(self);

async function joinedParts(url) {
  const parts = await Promise.all(Array.from({ length: nParts }, async (_, i) => {
    const response = await fetchFromSite(url.replace(/\.wasm$/, `.${i}.wasm`), { credentials: "same-origin" });
    if (!response.ok) throw new Error(`duckdb-eh.${i}.wasm: HTTP ${response.status}`);
    return response.arrayBuffer();
  }));
  const joined = new Blob(parts, { type: "application/wasm" });
  return new Response(joined, { headers: { "Content-Type": "application/wasm", "Content-Length": String(joined.size) } });
}

self.fetch = (input, init) => {
  const url = new URL(typeof input === "string" ? input : input.url, self.location.href);
  if (nParts > 0 && url.pathname.endsWith("/duckdb/duckdb-eh.wasm")) return joinedParts(url.href);
  return fetchFromSite(input, init);
};

importScripts("duckdb/duckdb-browser-eh.worker.js");
