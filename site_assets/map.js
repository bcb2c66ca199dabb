// The feature map: a pan/zoom viewer over the tile pyramid written by the layout stage (map/index.json,
// map/<z>/<x>_<y>.webp) and the site's labels file (labels-<hash>.json: each placed feature's cell, label
// and strongest co-activating neighbours). Plain JavaScript, no library; pointer events cover mouse, pen and
// touch.
// The view lives in the URL hash (#x=<cell x>&y=<cell y>&z=<zoom>, optionally &f=<feature id>), so a link
// reopens it; #f=<id> alone centres on that feature. Zoom z is a tile level: at z = the top level one
// screen pixel shows one mosaic pixel (the finest tiles' native size, the most the view zooms in: beyond
// it cells would only blur), each level down halves that.
// The view is bounded: a map larger than the viewport always covers it, a smaller one is centred.
(function () {
  "use strict";
  var root = document.querySelector(".map-viewport");
  if (!root) return;
  var layer = root.querySelector(".map-layer");
  var labelLayer = root.querySelector(".map-labels");
  var tip = root.querySelector(".map-tip");
  var marker = root.querySelector(".map-marker");
  var card = root.querySelector(".map-card");
  var nav = root.querySelector(".map-nav");
  var navView = nav ? nav.querySelector(".map-nav-view") : null;
  var status = document.querySelector(".map-status");
  var findForm = document.querySelector(".map-find");
  var tilesBase = root.getAttribute("data-tiles");
  var CLICK_SLOP = 6;            // px a pointer may move and still count as a click
  var FIT_SHARE = 0.94;          // the whole-map view leaves a thin margin around the map
  var CELL_LABEL_PX = 44;        // cells at least this big on screen (or 90% of native) carry "#id label"
  var REGION_PX = 170;           // zoomed out, one region name per block of about this many screen px
  var FLY_MS = 450;              // a find or a neighbour flies the view there in this long
  var MIN_HEIGHT = 300;          // px, the map's least height

  var index = null, feats = [], byCell = null, byId = null, names = [];
  var view = { x: 0, y: 0, z: 0 };      // centre in cells, zoom level (float)
  var zMin = 0, zMax = 0, selected = null;
  var tiles = new Map();                // "z/x_y" → <img>
  var regionsByBlock = new Map();       // block side in cells → [{name, n, x, y}]
  var frame = 0, hashTimer = 0, flight = 0;
  var pointer = null;                   // last mouse position over the map (client px), for the tooltip
  var neighbourMarks = [];

  sizeViewport();
  // The labels file carries the index's geometry too, so it is the one request; the index is the fallback.
  getJson(root.getAttribute("data-labels"))
    .then(function (labels) { return labels.map ? [labels.map, labels] : getJson(root.getAttribute("data-index")).then(function (idx) { return [idx, labels]; }); },
          function () { return getJson(root.getAttribute("data-index")).then(function (idx) { return [idx, null]; }); })
    .then(function (r) { start(r[0], r[1]); })
    .catch(function (e) { say("The map could not be loaded (" + e.message + ")."); });

  function getJson(url) {
    return fetch(url).then(function (r) {
      if (!r.ok) throw new Error("HTTP " + r.status + " for " + url.split("/").pop());
      return r.json();
    });
  }
  function say(text) { if (status) status.textContent = text; }

  // Features from the labels file (the store's labels now); the index's (the layout's) without it.
  function readFeatures(idx, labels) {
    if (labels && labels.features) {
      names = labels.names || [];
      return labels.features.map(function (r) {
        var name = r[3] >= 0 ? names[r[3]] : "", label = r[4] || "";
        if (name && label.charAt(0) === "(") label = name + " " + label;   // "(11/16)" stands for "name (11/16)"
        return { id: r[0], x: r[1], y: r[2], name: name, label: label || name,
                 neighbours: r[5] || [], url: "features/" + r[0] + ".html" };
      });
    }
    return idx.features.map(function (f) {
      var name = (f.label || "").replace(/\s*\(\d+\/\d+\)$/, "");
      return { id: f.id, x: f.x, y: f.y, name: name, label: f.label || "", neighbours: [], url: f.url };
    });
  }

  function start(idx, labels) {
    index = idx;
    feats = readFeatures(idx, labels);
    byCell = new Map(); byId = new Map();
    feats.forEach(function (f) { byCell.set(f.y * idx.grid_side + f.x, f); byId.set(f.id, f); });
    fillFindList();
    root.classList.add("ready");
    sizeViewport();   // again: the page above the map may have settled since the script started
    fitLimits();
    var hadHash = applyHash();
    if (!hadHash) fitAll();
    bind();
    draw();
    if (hadHash) writeHash();   // a view out of bounds is shown (and linked) as the nearest one in bounds
  }

  // --- the viewport's size: the rest of the first screen, so the map fills a phone -------------------
  function sizeViewport() {
    var top = root.getBoundingClientRect().top + window.scrollY;
    var h = window.innerHeight;
    var want = Math.max(MIN_HEIGHT, Math.round(0.6 * h), Math.round(h - top - 12));
    root.style.height = Math.min(want, Math.max(MIN_HEIGHT, h - 8)) + "px";
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
    zMax = topZ();                              // the finest tiles' native size
    zMin = Math.min(fitZoom(), zMax);           // the whole map
  }
  // v within [half, side - half]: the map covers the viewport; a map smaller than the viewport along an
  // axis is centred along it.
  function bound(v, half, side) {
    if (half >= side / 2) return side / 2;
    return Math.min(side - half, Math.max(half, v));
  }
  function clampView() {
    view.z = Math.min(zMax, Math.max(zMin, view.z));
    var s = size(), cellScreen = index.cell_px * scale();
    view.x = bound(view.x, s.w / 2 / cellScreen, index.grid_side);
    view.y = bound(view.y, s.h / 2 / cellScreen, index.grid_side);
  }
  // Mosaic pixel under a point of the viewport (client coordinates).
  function toMosaic(clientX, clientY) {
    var r = root.getBoundingClientRect(), s = scale();
    return { x: view.x * index.cell_px + (clientX - r.left - r.width / 2) / s,
             y: view.y * index.cell_px + (clientY - r.top - r.height / 2) / s };
  }
  // Screen position (viewport px) of a cell's top-left corner.
  function cellOnScreen(cx, cy) {
    var s = size(), sc = scale(), c = index.cell_px;
    return { x: (cx - view.x) * c * sc + s.w / 2, y: (cy - view.y) * c * sc + s.h / 2 };
  }
  function featureAt(clientX, clientY) {
    var p = toMosaic(clientX, clientY);
    var cx = Math.floor(p.x / index.cell_px), cy = Math.floor(p.y / index.cell_px);
    if (cx < 0 || cy < 0 || cx >= index.grid_side || cy >= index.grid_side) return null;
    return byCell.get(cy * index.grid_side + cx) || null;
  }
  function zoomAt(clientX, clientY, dz) {
    stopFlight();
    var before = toMosaic(clientX, clientY);
    view.z = Math.min(zMax, Math.max(zMin, view.z + dz));
    var after = toMosaic(clientX, clientY);
    view.x += (before.x - after.x) / index.cell_px;
    view.y += (before.y - after.y) / index.cell_px;
    changed();
  }
  function panBy(dxScreen, dyScreen) {
    stopFlight();
    var s = scale();
    view.x -= dxScreen / s / index.cell_px;
    view.y -= dyScreen / s / index.cell_px;
    changed();
  }
  function fitAll() {
    stopFlight();
    view.x = view.y = index.grid_side / 2;
    view.z = fitZoom();
    clampView();
  }
  function featureView(f) { return { x: f.x + 0.5, y: f.y + 0.5, z: zMax }; }
  function centreOn(f) {
    selected = f;
    var v = featureView(f);
    view.x = v.x; view.y = v.y; view.z = v.z;
    clampView();
  }
  // Animate the view to a feature (zoom out a little on the way when it is far).
  function flyTo(f) {
    stopFlight();
    selected = f;
    var from = { x: view.x, y: view.y, z: view.z }, to = featureView(f);
    var t0 = performance.now();
    var dist = Math.hypot(to.x - from.x, to.y - from.y) * index.cell_px * scale();
    var dip = Math.min(2, Math.max(0, Math.log2(Math.max(1, dist / Math.max(1, size().w)))));
    function step(now) {
      var t = Math.min(1, (now - t0) / FLY_MS), e = t < 0.5 ? 2 * t * t : 1 - Math.pow(-2 * t + 2, 2) / 2;
      view.x = from.x + (to.x - from.x) * e;
      view.y = from.y + (to.y - from.y) * e;
      view.z = from.z + (to.z - from.z) * e - dip * Math.sin(Math.PI * t);
      clampView();
      draw();
      if (t < 1) flight = requestAnimationFrame(step);
      else { flight = 0; writeHash(); root.setAttribute("data-flown", String(f.id)); }
    }
    root.removeAttribute("data-flown");
    flight = requestAnimationFrame(step);
  }
  function stopFlight() { if (flight) { cancelAnimationFrame(flight); flight = 0; } }

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
    drawLabels();
    drawMarker();
    drawNav();
    if (pointer && !root.classList.contains("dragging")) hover(pointer);   // no stale tooltip after a zoom
  }

  // --- labels: region names zoomed out, "#id label" on each cell zoomed in ----------------------------
  // A block's name is the most common label among its features (at least two of them, or most of a
  // block of one or two), placed at those features' mean cell.
  function regions(block) {
    var got = regionsByBlock.get(block);
    if (got) return got;
    var groups = new Map();
    feats.forEach(function (f) {
      if (!f.name) return;
      var key = Math.floor(f.y / block) * 65536 + Math.floor(f.x / block);
      var g = groups.get(key);
      if (!g) { g = { n: 0, counts: new Map() }; groups.set(key, g); }
      g.n += 1;
      var c = g.counts.get(f.name);
      if (!c) { c = { n: 0, sx: 0, sy: 0 }; g.counts.set(f.name, c); }
      c.n += 1; c.sx += f.x + 0.5; c.sy += f.y + 0.5;
    });
    got = [];
    groups.forEach(function (g) {
      var best = null, bestN = 0;
      g.counts.forEach(function (c, name) { if (c.n > bestN || (c.n === bestN && name < best)) { best = name; bestN = c.n; } });
      if (bestN >= 2 || bestN * 2 > g.n) {
        var c = g.counts.get(best);
        got.push({ name: best, n: bestN, x: c.sx / c.n, y: c.sy / c.n });
      }
    });
    got.sort(function (a, b) { return b.n - a.n || (a.name < b.name ? -1 : 1); });
    regionsByBlock.set(block, got);
    return got;
  }

  var labelPool = [];
  function labelEl(i) {
    var el = labelPool[i];
    if (!el) {
      el = document.createElement("div");
      labelPool.push(el);
      labelLayer.appendChild(el);
    }
    el.hidden = false;
    return el;
  }
  function drawLabels() {
    if (!labelLayer) return;
    var s = size(), cellScreen = index.cell_px * scale(), used = 0;
    if (cellScreen >= Math.min(CELL_LABEL_PX, 0.9 * index.cell_px)) {
      labelLayer.className = "map-labels cells";
      var c0 = Math.max(0, Math.floor(view.x - s.w / 2 / cellScreen)), c1 = Math.min(index.grid_side - 1, Math.floor(view.x + s.w / 2 / cellScreen));
      var r0 = Math.max(0, Math.floor(view.y - s.h / 2 / cellScreen)), r1 = Math.min(index.grid_side - 1, Math.floor(view.y + s.h / 2 / cellScreen));
      var w = Math.round(cellScreen);
      for (var cy = r0; cy <= r1; cy++) {
        for (var cx = c0; cx <= c1; cx++) {
          var f = byCell.get(cy * index.grid_side + cx);
          if (!f) continue;
          var p = cellOnScreen(cx, cy + 1), el = labelEl(used++);
          if (el.getAttribute("data-feature") !== String(f.id)) {
            el.textContent = "";
            var idLine = document.createElement("b"), nameLine = document.createElement("span");
            idLine.textContent = "#" + f.id;
            nameLine.textContent = f.name || "";
            el.appendChild(idLine); el.appendChild(nameLine);
            el.setAttribute("data-feature", String(f.id));
          }
          el.className = "map-label cell-label";
          el.style.width = w + "px";
          el.style.transform = "translate(" + Math.round(p.x) + "px," + Math.round(p.y) + "px) translateY(-100%)";
        }
      }
    } else {
      labelLayer.className = "map-labels regions";
      var block = 1;
      while (block * cellScreen < REGION_PX && block < index.grid_side) block *= 2;
      var boxes = [];
      regions(block).forEach(function (rg) {
        var p = cellOnScreen(rg.x, rg.y), wEst = rg.name.length * 7.5 + 14, hEst = 22;
        var bx = { l: p.x - wEst / 2, r: p.x + wEst / 2, t: p.y - hEst / 2, b: p.y + hEst / 2 };
        if (bx.r < 0 || bx.l > s.w || bx.b < 0 || bx.t > s.h) return;
        for (var i = 0; i < boxes.length; i++) {
          var o = boxes[i];
          if (bx.l < o.r && bx.r > o.l && bx.t < o.b && bx.b > o.t) return;   // overlaps a bigger region's name
        }
        boxes.push(bx);
        var el = labelEl(used++);
        if (el.textContent !== rg.name) { el.textContent = rg.name; el.removeAttribute("data-feature"); }
        el.className = "map-label region-label";
        el.style.width = "";
        el.style.transform = "translate(" + Math.round(p.x) + "px," + Math.round(p.y) + "px) translate(-50%,-50%)";
      });
    }
    for (var k = used; k < labelPool.length; k++) labelPool[k].hidden = true;
    root.setAttribute("data-labels-shown", String(used));
  }

  function placeBox(el, f, extra) {
    var sc = scale(), c = index.cell_px, p = cellOnScreen(f.x, f.y);
    el.style.transform = "translate(" + Math.round(p.x - extra) + "px," + Math.round(p.y - extra) + "px)";
    el.style.width = el.style.height = Math.max(4, Math.round(c * sc) + 2 * extra) + "px";
  }
  function drawMarker() {
    if (!selected) { marker.hidden = true; } else { marker.hidden = false; placeBox(marker, selected, 0); }
    neighbourMarks.forEach(function (m) { placeBox(m.el, m.f, -2); });
    placeCard();
  }
  // The card sits on the side away from its cell: left or right on a wide map, top or bottom on a narrow one
  // (a phone), so it never hides the cell it describes; the find status takes the other end.
  function placeCard() {
    if (!card || card.hidden || !selected) return;
    var s = size(), p = cellOnScreen(selected.x + 0.5, selected.y + 0.5);
    var narrow = s.w < 2.2 * card.offsetWidth;
    var right = !narrow && p.x < s.w / 2, low = narrow && p.y < s.h / 2;
    card.classList.toggle("at-right", right);
    card.classList.toggle("at-bottom", low);
    root.classList.toggle("card-low", low);
  }

  // --- the overview inset (navigator): the whole map, the view's rectangle; click or drag to move --------
  function drawNav() {
    if (!navView) return;
    var s = size(), n = nav.clientWidth, k = n / index.grid_side, cellScreen = index.cell_px * scale();
    var l = (view.x - s.w / 2 / cellScreen) * k, t = (view.y - s.h / 2 / cellScreen) * k;
    var r = (view.x + s.w / 2 / cellScreen) * k, b = (view.y + s.h / 2 / cellScreen) * k;
    l = Math.max(0, l); t = Math.max(0, t); r = Math.min(n, r); b = Math.min(n, b);
    navView.style.transform = "translate(" + l.toFixed(1) + "px," + t.toFixed(1) + "px)";
    navView.style.width = Math.max(2, r - l).toFixed(1) + "px";
    navView.style.height = Math.max(2, b - t).toFixed(1) + "px";
  }
  function bindNav() {
    if (!nav) return;
    var held = false;
    function moveTo(e) {
      var r = nav.getBoundingClientRect();
      stopFlight();
      view.x = (e.clientX - r.left) / r.width * index.grid_side;
      view.y = (e.clientY - r.top) / r.height * index.grid_side;
      changed();
    }
    nav.addEventListener("pointerdown", function (e) {
      e.stopPropagation(); e.preventDefault();
      held = true;
      try { nav.setPointerCapture(e.pointerId); } catch (err) { /* synthetic pointer */ }
      hideTip();
      moveTo(e);
    });
    nav.addEventListener("pointermove", function (e) {
      e.stopPropagation();
      if (held) moveTo(e); else { pointer = null; hideTip(); }
    });
    function up(e) { e.stopPropagation(); held = false; }
    nav.addEventListener("pointerup", up);
    nav.addEventListener("pointercancel", up);
    nav.addEventListener("wheel", function (e) { e.stopPropagation(); }, { passive: true });
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
    if (h.f !== undefined) say("Feature " + h.f + " is not on the map.");
    return false;
  }

  // --- find a feature: by id, or by label (each Enter goes to the next match) -------------------------
  function fillFindList() {
    var list = document.getElementById("map-find-list");
    if (!list) return;
    var seen = new Set();
    feats.forEach(function (f) {
      if (!f.name || seen.has(f.name)) return;
      seen.add(f.name);
      var o = document.createElement("option");
      o.value = f.name;
      list.appendChild(o);
    });
  }
  var lastQuery = "", lastHit = -1;
  function find(query) {
    var q = query.trim();
    if (!q) return;
    var m = /^#?\s*(\d+)$/.exec(q);
    if (m) {
      var f = byId.get(parseInt(m[1], 10));
      if (!f) { notFound("Feature #" + m[1] + " is not on the map (only the strongest " + feats.length + " are)."); return; }
      show(f, "");
      return;
    }
    var ql = q.toLowerCase();
    // feats are strongest first, so the first match is the strongest feature with that label.
    var hits = feats.filter(function (g) {
      return g.name.toLowerCase().indexOf(ql) >= 0 || g.label.toLowerCase().indexOf(ql) >= 0;
    });
    if (!hits.length) { notFound("No feature on the map has a label with “" + q + "”."); return; }
    lastHit = ql === lastQuery ? (lastHit + 1) % hits.length : 0;
    lastQuery = ql;
    var hit = hits[lastHit];
    show(hit, (lastHit + 1) + " of " + hits.length + " matching “" + q + "”" +
         (hits.length > 1 ? " · Enter again for the next" : ""));
  }
  // A find that finds nothing closes the last find's card, which would otherwise still say "2 of 6 matching
  // …" beside the "not found" line; the next find of that label starts again from its first match.
  function notFound(message) {
    closeCard();
    lastQuery = ""; lastHit = -1;
    say(message);
  }
  // The found feature's card says which match it is (the status line is for what was not found).
  function show(f, note) {
    say("");
    flyTo(f);
    openCard(f, note);
  }

  // --- the card of a clicked cell: its label, its strongest co-activating neighbours, its page -----------
  function openCard(f, note) {
    if (!card) return;
    selected = f;
    card.textContent = "";
    if (note) {
      var noteEl = document.createElement("p");
      noteEl.className = "map-card-note";
      noteEl.textContent = note;
      card.appendChild(noteEl);
    }
    var head = document.createElement("p");
    head.className = "map-card-head";
    var strong = document.createElement("strong");
    strong.textContent = "#" + f.id;
    head.appendChild(strong);
    head.appendChild(document.createTextNode(" " + (f.label || "unlabelled")));
    card.appendChild(head);
    var link = document.createElement("a");
    link.className = "map-card-open";
    link.href = f.url;
    link.textContent = "Open feature page →";
    card.appendChild(link);
    var close = document.createElement("button");
    close.type = "button"; close.className = "map-card-close"; close.setAttribute("aria-label", "Close");
    close.textContent = "×";
    close.addEventListener("click", closeCard);
    card.appendChild(close);
    clearNeighbours();
    if (f.neighbours.length) {
      var h = document.createElement("p");
      h.className = "map-card-sub";
      h.textContent = "Fires most often with:";
      card.appendChild(h);
      var ul = document.createElement("ul");
      f.neighbours.forEach(function (id) {
        var g = byId.get(id), li = document.createElement("li"), a;
        if (g) {
          a = document.createElement("button");
          a.type = "button";
          a.addEventListener("click", function () { flyTo(g); openCard(g); });
          var mark = document.createElement("div");
          mark.className = "map-neighbour";
          root.appendChild(mark);
          neighbourMarks.push({ el: mark, f: g });
        } else {
          a = document.createElement("a");
          a.href = "features/" + id + ".html";
          a.title = "not on the map";
        }
        a.textContent = "#" + id + (g && g.name ? " " + g.name : "");
        li.appendChild(a);
        ul.appendChild(li);
      });
      card.appendChild(ul);
    }
    card.hidden = false;
    card.setAttribute("data-feature", String(f.id));
    drawMarker();
    scheduleHash();
  }
  function clearNeighbours() {
    neighbourMarks.forEach(function (m) { m.el.remove(); });
    neighbourMarks = [];
  }
  function closeCard() {
    if (!card) return;
    card.hidden = true;
    root.classList.remove("card-low");
    card.removeAttribute("data-feature");
    clearNeighbours();
  }

  // --- input -------------------------------------------------------------------------------------------
  function bind() {
    var pointers = new Map();   // id → {x, y}
    var downAt = null, moved = 0, pinch = 0;

    root.addEventListener("pointerdown", function (e) {
      if (e.button !== undefined && e.button > 0) return;
      if (card && card.contains(e.target)) return;
      try { root.setPointerCapture(e.pointerId); } catch (err) { /* synthetic or already-released pointer */ }
      pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
      if (pointers.size === 1) { downAt = { x: e.clientX, y: e.clientY }; moved = 0; }
      else { moved = CLICK_SLOP + 1; pinch = pinchDistance(); }
      root.classList.add("dragging");
      hideTip();
      say("");
    });
    root.addEventListener("pointermove", function (e) {
      var p = pointers.get(e.pointerId);
      if (!p) {
        if (e.pointerType !== "mouse") return;
        if (card && card.contains(e.target)) { pointer = null; hideTip(); return; }   // the card is on top
        pointer = { clientX: e.clientX, clientY: e.clientY };
        hover(pointer);
        return;
      }
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
        if (e.type === "pointerup" && moved <= CLICK_SLOP) clickAt(e.clientX, e.clientY);
      } else {
        pinch = pinchDistance();
      }
    }
    root.addEventListener("pointerup", release);
    root.addEventListener("pointercancel", release);
    root.addEventListener("pointerleave", function () { pointer = null; if (!pointers.size) hideTip(); });
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
      if (card && card.contains(e.target)) return;
      var unit = e.deltaMode === 1 ? 16 : e.deltaMode === 2 ? 400 : 1;   // lines / pages → px
      pointer = { clientX: e.clientX, clientY: e.clientY };
      zoomAt(e.clientX, e.clientY, -e.deltaY * unit / 300);
    }, { passive: false });

    root.addEventListener("keydown", function (e) {
      if (e.altKey || e.ctrlKey || e.metaKey) return;
      if (card && card.contains(e.target)) { if (e.key === "Escape") { closeCard(); root.focus(); } return; }
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
        case "Escape": closeCard(); break;
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
    if (findForm) {
      findForm.addEventListener("submit", function (e) {
        e.preventDefault();
        find(findForm.querySelector("input").value);
      });
    }
    bindNav();
    window.addEventListener("hashchange", function () { if (applyHash()) { draw(); writeHash(); } });
    window.addEventListener("resize", function () { sizeViewport(); fitLimits(); changed(); });
  }

  // A click selects a cell and shows its card (label, neighbours, a link to its page); a click on the
  // selected cell opens its page.
  function clickAt(clientX, clientY) {
    var f = featureAt(clientX, clientY);
    if (!f) { closeCard(); return; }
    if (!card || (selected === f && !card.hidden)) { open(f); return; }
    openCard(f);
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
    tip.setAttribute("data-feature", String(f.id));
  }
  function hideTip() { tip.hidden = true; tip.removeAttribute("data-feature"); }

  function open(f) {
    if (!f) return;
    selected = f;
    writeHash();   // so "back" returns to this view with the feature marked
    location.href = f.url;
  }
})();
