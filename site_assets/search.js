// Pagefind's UI on search.html. Result URLs are stored from the site root ("/features/12.html"), so prefix
// them with the folder this page is served from: the site then works under any sub-path. Each result shows
// its feature's picture (the page's `image` meta, a path from the site root) and no excerpt when the excerpt
// would only repeat the title (a feature page's indexed text is its id and label, which the title already is).
(function () {
  "use strict";
  var base = new URL(".", document.baseURI).pathname;
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
  var ui = new PagefindUI({ element: "#search", baseUrl: base, bundlePath: base + "pagefind/",
                            showSubResults: false, showImages: true, resetStyles: false,
                            processResult: processResult });
  var q = new URLSearchParams(window.location.search).get("q");
  if (q) { ui.triggerSearch(q); }
})();
