// The feature map: a pan/zoom viewer over the tile pyramid written by the layout stage (map/index.json,
// map/<z>/<x>_<y>.webp). Plain JavaScript, no library; pointer events cover mouse, pen and touch.
// The view lives in the URL hash (#x=<cell x>&y=<cell y>&z=<zoom>, optionally &f=<feature id>), so a link
// reopens it; #f=<id> alone centres on that feature. Zoom z is a tile level: at z = the top level one
// screen pixel shows one mosaic pixel, each level down halves that.
(function () {
  "use strict";
  var root = document.querySelector(".map-viewport");
  if (!root) return;
  var layer = root.querySelector(".map-layer");
  var tip = root.querySelector(".map-tip");
  var marker = root.querySelector(".map-marker");
  var status = document.querySelector(".map-status");
  var tilesBase = root.getAttribute("data-tiles");
  var CLICK_SLOP = 6;          // px a pointer may move and still count as a click
  var FEATURE_CELL_SCREEN = 160; // px a cell gets when the view jumps to one feature
  var FIT_SHARE = 0.94;        // the whole-map view leaves a thin margin around the map

  var index = null, byCell = null, byId = null;
  var view = { x: 0, y: 0, z: 0 };      // centre in cells, zoom level (float)
  var zMin = 0, zMax = 0, selected = null;
  var tiles = new Map();                // "z/x_y" → <img>
  var frame = 0, hashTimer = 0;

  fetch(root.getAttribute("data-index"))
    .then(function (r) { if (!r.ok) throw new Error("map index: HTTP " + r.status); return r.json(); })
    .then(start)
    .catch(function (e) { if (status) status.textContent = "The map could not be loaded (" + e.message + ")."; });

  function start(data) {
    index = data;
    byCell = new Map(); byId = new Map();
    data.features.forEach(function (f) { byCell.set(f.y * data.grid_side + f.x, f); byId.set(f.id, f); });
    root.classList.add("ready");
    fitLimits();
    if (!applyHash()) fitAll();
    bind();
    draw();
  }

  // --- geometry ---------------------------------------------------------------------------------
  function topZ() { return index.levels.length - 1; }
  function scale() { return Math.pow(2, view.z - topZ()); }   // screen px per mosaic px
  function size() { return { w: root.clientWidth, h: root.clientHeight }; }
  function fitZoom() {
    var s = size();
    return topZ() + Math.log2(Math.max(1, FIT_SHARE * Math.min(s.w, s.h)) / index.full_px);
  }
  function fitLimits() {
    zMin = Math.min(fitZoom(), topZ()) - 1;
    zMax = topZ() + 2;
  }
  function clampView() {
    view.z = Math.min(zMax, Math.max(zMin, view.z));
    view.x = Math.min(index.grid_side, Math.max(0, view.x));
    view.y = Math.min(index.grid_side, Math.max(0, view.y));
  }
  // Mosaic pixel under a point of the viewport (client coordinates).
  function toMosaic(clientX, clientY) {
    var r = root.getBoundingClientRect(), s = scale();
    return { x: view.x * index.cell_px + (clientX - r.left - r.width / 2) / s,
             y: view.y * index.cell_px + (clientY - r.top - r.height / 2) / s };
  }
  function featureAt(clientX, clientY) {
    var p = toMosaic(clientX, clientY);
    var cx = Math.floor(p.x / index.cell_px), cy = Math.floor(p.y / index.cell_px);
    if (cx < 0 || cy < 0 || cx >= index.grid_side || cy >= index.grid_side) return null;
    return byCell.get(cy * index.grid_side + cx) || null;
  }
  function zoomAt(clientX, clientY, dz) {
    var before = toMosaic(clientX, clientY);
    view.z += dz; clampView();
    var after = toMosaic(clientX, clientY);
    view.x += (before.x - after.x) / index.cell_px;
    view.y += (before.y - after.y) / index.cell_px;
    changed();
  }
  function panBy(dxScreen, dyScreen) {
    var s = scale();
    view.x -= dxScreen / s / index.cell_px;
    view.y -= dyScreen / s / index.cell_px;
    changed();
  }
  function fitAll() {
    view.x = view.y = index.grid_side / 2;
    view.z = fitZoom();
    clampView();
  }
  function centreOn(f) {
    selected = f;
    view.x = f.x + 0.5; view.y = f.y + 0.5;
    view.z = topZ() + Math.log2(FEATURE_CELL_SCREEN / index.cell_px);
    clampView();
  }

  // --- drawing: only the tiles in view, at the level that fits the zoom ------------------------
  function changed() { clampView(); scheduleDraw(); scheduleHash(); }
  function scheduleDraw() { if (!frame) frame = requestAnimationFrame(function () { frame = 0; draw(); }); }

  function draw() {
    var s = size(), sc = scale();
    var level = Math.max(0, Math.min(topZ(), Math.ceil(view.z - 0.3)));
    var lv = index.levels[level], tile = index.tile_px;
    var perLevelPx = index.full_px / lv.size;           // mosaic px per level px
    var left = view.x * index.cell_px - s.w / 2 / sc, top = view.y * index.cell_px - s.h / 2 / sc;
    var span = tile * perLevelPx;                        // mosaic px per tile
    var x0 = Math.max(0, Math.floor(left / span)), y0 = Math.max(0, Math.floor(top / span));
    var x1 = Math.min(lv.n_tiles - 1, Math.floor((left + s.w / sc) / span));
    var y1 = Math.min(lv.n_tiles - 1, Math.floor((top + s.h / sc) / span));
    var wanted = new Set();
    for (var ty = y0; ty <= y1; ty++) {
      for (var tx = x0; tx <= x1; tx++) {
        var key = level + "/" + tx + "_" + ty;
        wanted.add(key);
        var img = tiles.get(key);
        if (!img) {
          img = document.createElement("img");
          img.alt = ""; img.decoding = "async"; img.draggable = false;
          img.src = tilesBase + level + "/" + tx + "_" + ty + "." + (index.tile_format || "webp");
          tiles.set(key, img);
          layer.appendChild(img);
        }
        var wPx = Math.min(tile, lv.size - tx * tile), hPx = Math.min(tile, lv.size - ty * tile);
        // Rounded edges, so neighbouring tiles meet without hairline gaps.
        var l = Math.round((tx * span - left) * sc), t = Math.round((ty * span - top) * sc);
        var r = Math.round((tx * span + wPx * perLevelPx - left) * sc);
        var b = Math.round((ty * span + hPx * perLevelPx - top) * sc);
        img.style.transform = "translate(" + l + "px," + t + "px)";
        img.style.width = (r - l) + "px"; img.style.height = (b - t) + "px";
      }
    }
    tiles.forEach(function (img, key) { if (!wanted.has(key)) { img.remove(); tiles.delete(key); } });
    root.setAttribute("data-level", String(level));
    root.setAttribute("data-tiles-shown", String(wanted.size));
    root.classList.toggle("pixelated", view.z > topZ());
    drawMarker();
  }

  function drawMarker() {
    if (!selected) { marker.hidden = true; return; }
    var s = size(), sc = scale(), c = index.cell_px;
    var left = view.x * c - s.w / 2 / sc, top = view.y * c - s.h / 2 / sc;
    marker.hidden = false;
    marker.style.transform = "translate(" + Math.round((selected.x * c - left) * sc) + "px," +
      Math.round((selected.y * c - top) * sc) + "px)";
    marker.style.width = marker.style.height = Math.max(4, Math.round(c * sc)) + "px";
  }

  // --- the URL hash ---------------------------------------------------------------------------------
  function scheduleHash() {
    clearTimeout(hashTimer);
    hashTimer = setTimeout(writeHash, 120);
  }
  function writeHash() {
    var h = "#x=" + view.x.toFixed(2) + "&y=" + view.y.toFixed(2) + "&z=" + view.z.toFixed(2) +
      (selected ? "&f=" + selected.id : "");
    if (location.hash !== h) history.replaceState(null, "", h);
  }
  function parseHash() {
    var out = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      var kv = part.split("=");
      if (kv.length === 2 && kv[1] !== "") out[decodeURIComponent(kv[0])] = decodeURIComponent(kv[1]);
    });
    return out;
  }
  // True if the hash named a view or a feature.
  function applyHash() {
    var h = parseHash();
    var f = h.f !== undefined ? byId.get(parseInt(h.f, 10)) : undefined;
    var x = parseFloat(h.x), y = parseFloat(h.y), z = parseFloat(h.z);
    if (isFinite(x) && isFinite(y) && isFinite(z)) {
      selected = f || null;
      view.x = x; view.y = y; view.z = z;
      clampView();
      return true;
    }
    if (f) { centreOn(f); return true; }
    if (h.f !== undefined && status) status.textContent = "Feature " + h.f + " is not on the map.";
    return false;
  }

  // --- input -------------------------------------------------------------------------------------------
  function bind() {
    var pointers = new Map();   // id → {x, y}
    var downAt = null, moved = 0, pinch = 0;

    root.addEventListener("pointerdown", function (e) {
      if (e.button !== undefined && e.button > 0) return;
      try { root.setPointerCapture(e.pointerId); } catch (err) { /* synthetic or already-released pointer */ }
      pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
      if (pointers.size === 1) { downAt = { x: e.clientX, y: e.clientY }; moved = 0; }
      else { moved = CLICK_SLOP + 1; pinch = pinchDistance(); }
      root.classList.add("dragging");
      hideTip();
    });
    root.addEventListener("pointermove", function (e) {
      var p = pointers.get(e.pointerId);
      if (!p) { hover(e); return; }
      if (pointers.size === 1) {
        panBy(e.clientX - p.x, e.clientY - p.y);
        moved = Math.max(moved, Math.hypot(e.clientX - downAt.x, e.clientY - downAt.y));
        p.x = e.clientX; p.y = e.clientY;
      } else if (pointers.size === 2) {
        var midBefore = pinchMid();
        p.x = e.clientX; p.y = e.clientY;
        var midAfter = pinchMid(), dist = pinchDistance();
        panBy(midAfter.x - midBefore.x, midAfter.y - midBefore.y);
        if (pinch > 0 && dist > 0) zoomAt(midAfter.x, midAfter.y, Math.log2(dist / pinch));
        pinch = dist;
      }
    });
    function release(e) {
      if (!pointers.has(e.pointerId)) return;
      pointers.delete(e.pointerId);
      if (pointers.size === 0) {
        root.classList.remove("dragging");
        if (e.type === "pointerup" && moved <= CLICK_SLOP) open(featureAt(e.clientX, e.clientY));
      } else {
        pinch = pinchDistance();
      }
    }
    root.addEventListener("pointerup", release);
    root.addEventListener("pointercancel", release);
    root.addEventListener("pointerleave", function (e) { if (!pointers.size) hideTip(); });
    function pinchPoints() { return Array.from(pointers.values()).slice(0, 2); }
    function pinchDistance() {
      var p = pinchPoints();
      return p.length < 2 ? 0 : Math.hypot(p[0].x - p[1].x, p[0].y - p[1].y);
    }
    function pinchMid() {
      var p = pinchPoints();
      return p.length < 2 ? p[0] : { x: (p[0].x + p[1].x) / 2, y: (p[0].y + p[1].y) / 2 };
    }

    root.addEventListener("wheel", function (e) {
      e.preventDefault();
      var unit = e.deltaMode === 1 ? 16 : e.deltaMode === 2 ? 400 : 1;   // lines / pages → px
      zoomAt(e.clientX, e.clientY, -e.deltaY * unit / 300);
    }, { passive: false });

    root.addEventListener("keydown", function (e) {
      if (e.altKey || e.ctrlKey || e.metaKey) return;
      var s = size(), step = Math.min(s.w, s.h) / 6, r = root.getBoundingClientRect();
      var cx = r.left + r.width / 2, cy = r.top + r.height / 2;
      switch (e.key) {
        case "ArrowLeft": panBy(step, 0); break;
        case "ArrowRight": panBy(-step, 0); break;
        case "ArrowUp": panBy(0, step); break;
        case "ArrowDown": panBy(0, -step); break;
        case "+": case "=": zoomAt(cx, cy, 0.5); break;
        case "-": case "_": zoomAt(cx, cy, -0.5); break;
        case "0": fitAll(); changed(); break;
        case "Enter": if (selected) open(selected); return;
        default: return;
      }
      e.preventDefault();
    });
    document.querySelectorAll("[data-map-zoom]").forEach(function (button) {
      button.addEventListener("click", function () {
        var r = root.getBoundingClientRect(), dz = button.getAttribute("data-map-zoom");
        if (dz === "fit") { fitAll(); changed(); }
        else zoomAt(r.left + r.width / 2, r.top + r.height / 2, parseFloat(dz));
      });
    });
    window.addEventListener("hashchange", function () { if (applyHash()) { draw(); writeHash(); } });
    window.addEventListener("resize", function () { fitLimits(); changed(); });
  }

  function hover(e) {
    var f = featureAt(e.clientX, e.clientY);
    root.classList.toggle("on-feature", !!f);
    if (!f) { hideTip(); return; }
    tip.textContent = "";
    var id = document.createElement("strong");
    id.textContent = "#" + f.id;
    tip.appendChild(id);
    if (f.label) tip.appendChild(document.createTextNode(" " + f.label));
    var r = root.getBoundingClientRect();
    var x = e.clientX - r.left + 14, y = e.clientY - r.top + 14;
    tip.hidden = false;
    // Keep the tip inside the viewport near the right and bottom edges.
    if (x + tip.offsetWidth > r.width) x = Math.max(0, e.clientX - r.left - tip.offsetWidth - 10);
    if (y + tip.offsetHeight > r.height) y = Math.max(0, e.clientY - r.top - tip.offsetHeight - 10);
    tip.style.transform = "translate(" + Math.round(x) + "px," + Math.round(y) + "px)";
  }
  function hideTip() { tip.hidden = true; }

  function open(f) {
    if (!f) return;
    selected = f;
    writeHash();   // so "back" returns to this view with the feature marked
    location.href = f.url;
  }
})();
