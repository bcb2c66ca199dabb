// All-features listing: load the feature table from data-NNN.json chunks and sort/filter it in the browser.
// Rows: [id, label, frequency, strength, n_active, picture (from the site root), width, height].
// Without JS the page keeps its static first page and the links to the other pages by id.
// Dead features (they fire on no image) are left out unless "show dead features" is ticked; frequency and
// strength sort most first, id and label in order (the "descending" box follows the sort, and can be changed).
(function () {
  "use strict";
  var grid = document.getElementById("feature-grid");
  var form = document.getElementById("feature-controls");
  if (!grid || !form) { return; }
  var nChunks = Number(grid.dataset.chunks);
  var perPage = Number(grid.dataset.perPage);
  var sortSel = document.getElementById("feature-sort");
  var desc = document.getElementById("feature-desc");
  var filter = document.getElementById("feature-filter");
  var showDead = document.getElementById("feature-dead");
  var empty = document.getElementById("feature-empty");
  var count = document.getElementById("feature-count");
  var more = document.getElementById("feature-more");
  var rows = [];
  var shown = perPage;
  var loaded = 0;

  function tile(r) {
    var a = document.createElement("a");
    a.className = "tile";
    a.href = r[0] + ".html";
    if (r[5]) {
      var img = document.createElement("img");
      img.src = "../" + r[5].split("/").map(encodeURIComponent).join("/");
      img.width = r[6]; img.height = r[7];
      img.alt = "feature " + r[0];
      img.loading = "lazy"; img.decoding = "async";
      a.appendChild(img);
    } else {
      var none = document.createElement("span");
      none.className = "no-picture"; none.textContent = "no picture";
      a.appendChild(none);
    }
    var extra = (100 * r[2]).toFixed(2) + "% · strength " + r[3].toPrecision(3);
    [["tile-id", "#" + r[0]], ["tile-label", r[1] || "unlabelled"], ["tile-extra", extra]].forEach(function (p) {
      var s = document.createElement("span");
      s.className = p[0]; s.textContent = p[1]; s.title = p[1];
      a.appendChild(s);
    });
    a.title = "#" + r[0] + " " + (r[1] || "unlabelled") + " · fires on " + extra;
    return a;
  }

  function current() {
    var key = sortSel.value;
    var col = { id: 0, label: 1, frequency: 2, strength: 3 }[key];
    var text = filter.value.trim().toLowerCase();
    // "#12" names one feature by its id; without the "#", digits also match labels ("… (8/12)").
    var byId = /^#\s*(\d+)$/.exec(text);
    var needle = text.replace(/^#/, "");
    var list = rows.filter(function (r) {
      if (!showDead.checked && !r[4]) { return false; }
      if (byId) { return r[0] === Number(byId[1]); }
      return !needle || String(r[0]) === needle || (r[1] || "").toLowerCase().indexOf(needle) >= 0;
    });
    list.sort(function (a, b) {
      var x = a[col], y = b[col];
      var c = key === "label" ? String(x).localeCompare(String(y)) : x - y;
      return c || a[0] - b[0];
    });
    if (desc.checked) { list.reverse(); }
    return list;
  }

  function render() {
    var list = current();
    var frag = document.createDocumentFragment();
    list.slice(0, shown).forEach(function (r) { frag.appendChild(tile(r)); });
    grid.replaceChildren(frag);
    count.textContent = list.length.toLocaleString() + (list.length === 1 ? " feature" : " features") +
      (loaded < nChunks ? " (loading " + loaded + "/" + nChunks + ")" : "");
    more.hidden = list.length <= shown;
    var needle = filter.value.trim();
    empty.hidden = list.length > 0 || loaded < nChunks;
    empty.textContent = needle ? "No feature matches \u201c" + needle + "\u201d" +
      (showDead.checked ? "." : " among the features that fire (tick \u201cshow dead features\u201d to search them too).")
      : "No feature to show.";
  }

  function reset() { shown = perPage; render(); }
  sortSel.addEventListener("change", function () {
    desc.checked = sortSel.value === "frequency" || sortSel.value === "strength";
    reset();
  });
  [desc, showDead].forEach(function (el) { el.addEventListener("change", reset); });
  filter.addEventListener("input", reset);
  form.addEventListener("submit", function (e) { e.preventDefault(); });
  more.addEventListener("click", function () { shown += perPage; render(); });

  function load(i) {
    if (i >= nChunks) { return Promise.resolve(); }
    var name = "data-" + String(i).padStart(3, "0") + ".json";
    return fetch(name).then(function (resp) {
      if (!resp.ok) { throw new Error(name + ": HTTP " + resp.status); }
      return resp.json();
    }).then(function (chunk) {
      rows = rows.concat(chunk);
      loaded = i + 1;
      if (i === 0 || loaded === nChunks) { render(); }
      return load(i + 1);
    });
  }
  form.hidden = false;
  document.getElementById("feature-pages").hidden = true;
  load(0).catch(function (err) {
    // Opened from file:// (no fetch): keep the static page and its links.
    form.hidden = true;
    document.getElementById("feature-pages").hidden = false;
    console.warn("feature data not loaded: " + err);
  });
})();
