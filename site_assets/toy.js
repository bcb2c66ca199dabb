// Superposition toy: animate the 2-D codes frame by frame (one frame per `frame_every` optimiser steps) on
// a canvas, with play/pause and a frame slider; the class arrows appear on the last frame. The data is
// toy.json (steps, labels, colours, arrows, the view `bounds` fitted to every frame) and codes.bin (every
// frame's codes as little-endian int16, times `scale`). Every frame is drawn in the same view, so the
// codes' growth is visible and no digit leaves it. If the data cannot be loaded, the build-time SVG of the
// final frame stays.
(function () {
  "use strict";
  var box = document.querySelector(".toy[data-meta][data-codes]");
  if (!box || !window.fetch || !window.DataView) { return; }
  var canvas = box.querySelector(".toy-canvas"), finalSvg = box.querySelector(".toy-final");
  var controls = box.querySelector(".toy-controls"), slider = box.querySelector(".toy-slider");
  var playBtn = box.querySelector(".toy-play"), stepOut = box.querySelector(".toy-step");
  var data = null, codes = null, frame = 0, timer = null, FRAME_MS = 80;

  // Data → canvas pixels: the square view `bounds` fills the canvas less a margin (as the final SVG does).
  function projector() {
    var b = data.bounds, side = canvas.width, m = side * data.margin_fraction, inner = side - 2 * m;
    return function (x, y) {
      return [m + (x - b.x0) / (b.x1 - b.x0) * inner, m + (b.y1 - y) / (b.y1 - b.y0) * inner];
    };
  }

  // The pixel position of every code of frame i, as drawn.
  function points(i) {
    var px = projector(), out = [], base = i * data.n_codes * 2;
    for (var k = 0; k < data.n_codes; k++) {
      out.push(px(codes[base + 2 * k] * data.scale, codes[base + 2 * k + 1] * data.scale));
    }
    return out;
  }

  function draw(i) {
    var ctx = canvas.getContext("2d"), side = canvas.width, px = projector(), o = px(0, 0);
    var m = side * data.margin_fraction, last = i === data.n_frames - 1, pts = points(i);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, side, side);
    ctx.strokeStyle = "#ddd";
    ctx.lineWidth = 1;
    ctx.beginPath(); ctx.moveTo(m, o[1]); ctx.lineTo(side - m, o[1]); ctx.moveTo(o[0], m); ctx.lineTo(o[0], side - m);
    ctx.stroke();
    ctx.globalAlpha = 0.65;
    for (var k = 0; k < pts.length; k++) {
      ctx.fillStyle = data.colours[data.labels[k]];
      ctx.beginPath();
      ctx.arc(pts[k][0], pts[k][1], 2.4, 0, 2 * Math.PI);
      ctx.fill();
    }
    ctx.globalAlpha = 1;
    if (last) {
      ctx.lineWidth = 2.5;
      ctx.font = "bold 15px sans-serif";
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      data.arrows.forEach(function (ar) {
        var e = px(ar.x, ar.y), t = px(ar.x * 1.12, ar.y * 1.12), ang = Math.atan2(e[1] - o[1], e[0] - o[0]);
        ctx.strokeStyle = ctx.fillStyle = data.colours[ar.label];
        ctx.beginPath(); ctx.moveTo(o[0], o[1]); ctx.lineTo(e[0], e[1]); ctx.stroke();
        ctx.beginPath(); ctx.moveTo(e[0], e[1]);
        ctx.lineTo(e[0] - 9 * Math.cos(ang - 0.4), e[1] - 9 * Math.sin(ang - 0.4));
        ctx.lineTo(e[0] - 9 * Math.cos(ang + 0.4), e[1] - 9 * Math.sin(ang + 0.4));
        ctx.closePath(); ctx.fill();
        ctx.fillText(String(ar.label), t[0], t[1]);
      });
    }
    frame = i;
    slider.value = String(i);
    stepOut.textContent = "step " + data.steps[i] + " / " + data.n_steps;
    box.setAttribute("data-frame", String(i));
  }

  function stop() {
    if (timer !== null) { clearInterval(timer); timer = null; }
    playBtn.textContent = "Play";
    playBtn.setAttribute("aria-pressed", "false");
  }

  function play() {
    if (frame >= data.n_frames - 1) { draw(0); }
    playBtn.textContent = "Pause";
    playBtn.setAttribute("aria-pressed", "true");
    timer = setInterval(function () {
      if (frame >= data.n_frames - 1) { stop(); return; }
      draw(frame + 1);
    }, FRAME_MS);
  }

  function get(url, kind) {
    return fetch(url).then(function (r) {
      if (!r.ok) { throw new Error(url + ": HTTP " + r.status); }
      return kind === "json" ? r.json() : r.arrayBuffer();
    });
  }

  Promise.all([get(box.getAttribute("data-meta"), "json"), get(box.getAttribute("data-codes"), "bin")])
    .then(function (got) {
      data = got[0];
      var view = new DataView(got[1]), n = data.n_frames * data.n_codes * 2;
      if (got[1].byteLength !== 2 * n) { throw new Error("codes.bin: " + got[1].byteLength + " bytes, expected " + 2 * n); }
      codes = new Int16Array(n);
      for (var j = 0; j < n; j++) { codes[j] = view.getInt16(2 * j, true); }
      // For tests and the curious: the plot area and every code's pixel position in frame i, as drawn.
      box.toyView = { points: points, side: canvas.width, margin: canvas.width * data.margin_fraction,
                      n_frames: data.n_frames };
      slider.max = String(data.n_frames - 1);
      canvas.hidden = false;
      finalSvg.hidden = true;
      controls.hidden = false;
      playBtn.addEventListener("click", function () { if (timer === null) { play(); } else { stop(); } });
      slider.addEventListener("input", function () { stop(); draw(parseInt(slider.value, 10)); });
      var reduced = window.matchMedia && window.matchMedia("(prefers-reduced-motion: reduce)").matches;
      if (reduced) { draw(data.n_frames - 1); } else { draw(0); play(); }
    }).catch(function () {
      // Opened from disk (file://) or the data missing: the final SVG stays.
    });
})();
