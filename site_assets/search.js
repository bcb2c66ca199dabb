// Pagefind's UI on search.html. Result URLs are stored from the site root ("/features/12.html"), so prefix
// them with the folder this page is served from: the site then works under any sub-path. Each result shows
// its feature's picture (the page's `image` meta, a path from the site root) and no excerpt when the excerpt
// would only repeat the title (a feature page's indexed text is its id and label, which the title already is).
// The query is kept in the URL (?q=) as it changes, so a reload or a shared link shows the same search.
(function () {
  "use strict";
  var base = new URL(".", document.baseURI).pathname;
  var box = document.getElementById("search");
  function plain(html) { return String(html || "").replace(/<[^>]*>/g, "").replace(/[\s.]+/g, " ").trim(); }
  function processResult(result) {
    var meta = result.meta || {};
    if (meta.image && !/^(\/|[a-z]+:)/i.test(meta.image)) {
      meta.image = base + meta.image;
      meta.image_alt = meta.title || "";
    }
    if (plain(result.excerpt) === plain(meta.title)) { result.excerpt = ""; }
    return result;
  }

  // A query that is a feature id ("#12", or a bare "12") shows that feature first, above Pagefind's results:
  // Pagefind ranks text, and other ids and label counts with those digits ("#129", "(1/2)", "(12/16)") can
  // rank above it. Its label and picture come from the listing's data-NNN.json chunk that holds its id
  // (rows [id, label, frequency, strength, n_active, picture from the site root, width, height]).
  var starts = (box.dataset.chunkStarts || "").split(",").filter(Boolean).map(Number);
  var pinned = document.createElement("p");
  pinned.className = "search-feature";
  pinned.hidden = true;
  var asked = 0;
  function showPinned(row) {
    var a = document.createElement("a");
    a.href = base + "features/" + row[0] + ".html";
    if (row[5]) {
      var img = document.createElement("img");
      img.src = base + row[5].split("/").map(encodeURIComponent).join("/");
      img.width = row[6]; img.height = row[7]; img.alt = "";
      a.appendChild(img);
    }
    var text = document.createElement("span");
    text.textContent = "Feature #" + row[0] + " " + (row[1] || "unlabelled");
    a.appendChild(text);
    pinned.replaceChildren(a);
    // Under the search box, above Pagefind's results (its form keeps its own nodes where they are).
    var drawer = box.querySelector(".pagefind-ui__drawer");
    if (drawer && pinned.parentNode !== drawer.parentNode) { drawer.parentNode.insertBefore(pinned, drawer); }
    else if (!pinned.parentNode) { box.appendChild(pinned); }
    pinned.hidden = false;
  }
  function pin(q) {
    var m = /^#?\s*(\d+)$/.exec(q), mine = ++asked;
    pinned.hidden = true;
    if (!m) { return; }
    var id = Number(m[1]), chunk = -1;
    for (var i = 0; i < starts.length && starts[i] <= id; i++) { chunk = i; }
    if (chunk < 0) { return; }
    fetch(base + "features/data-" + String(chunk).padStart(3, "0") + ".json")
      .then(function (resp) { return resp.ok ? resp.json() : []; })
      .then(function (rows) {
        var row = rows.find(function (r) { return r[0] === id; });
        if (row && mine === asked) { showPinned(row); }
      })
      .catch(function (err) { console.warn("feature data not loaded: " + err); });
  }

  function onQuery(term) {
    var q = term.trim();
    var url = new URL(window.location.href);
    if (q) { url.searchParams.set("q", q); } else { url.searchParams.delete("q"); }
    history.replaceState(history.state, "", url);
    pin(q);
  }
  var ui = new PagefindUI({ element: "#search", baseUrl: base, bundlePath: base + "pagefind/",
                            showSubResults: false, showImages: true, resetStyles: false,
                            processResult: processResult,
                            processTerm: function (term) { onQuery(term); return term; } });
  // Pagefind runs no search for an empty box (cleared by hand or with its Clear button).
  box.addEventListener("input", function (e) { if (!e.target.value.trim()) { onQuery(""); } });
  box.addEventListener("click", function (e) {
    if (e.target.closest(".pagefind-ui__search-clear")) { onQuery(""); }
  });
  var q = new URLSearchParams(window.location.search).get("q");
  if (q) { ui.triggerSearch(q); }
})();
