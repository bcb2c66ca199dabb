// Pagefind's UI on search.html. Result URLs are stored from the site root ("/features/12.html"), so prefix
// them with the folder this page is served from: the site then works under any sub-path.
(function () {
  "use strict";
  var base = new URL(".", document.baseURI).pathname;
  var ui = new PagefindUI({ element: "#search", baseUrl: base, bundlePath: base + "pagefind/",
                            showSubResults: false, showImages: false, resetStyles: false });
  var q = new URLSearchParams(window.location.search).get("q");
  if (q) { ui.triggerSearch(q); }
})();
