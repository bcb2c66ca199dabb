// Superposition toy: animate the 2-D codes frame by frame (one frame per `frame_every` optimiser steps) on
// a canvas, with play/pause and a frame slider; the class arrows appear on the last frame. If frames.json
// cannot be loaded, the page keeps the build-time SVG of the final frame.
(function () {
  "use strict";
  var box = document.querySelector(".toy[data-frames]");
  if (!box || !window.fetch) { return; }
  var canvas = box.querySelector(".toy-canvas"), finalSvg = box.querySelector(".toy-final");
  var controls = box.querySelector(".toy-controls"), slider = box.querySelector(".toy-slider");
  var playBtn = box.querySelector(".toy-play"), stepOut = box.querySelector(".toy-step");
  var data = null, frame = 0, timer = null, FRAME_MS = 80;

  // A robust extent (98th percentile of |coordinate|), so a few outliers do not shrink the clusters.
  function extentOf(codes) {
    var vals = [];
    for (var i = 0; i < codes.length; i++) { vals.push(Math.abs(codes[i][0]), Math.abs(codes[i][1])); }
    vals.sort(function (a, b) { return a - b; });
    return Math.max(1e-6, (vals[Math.floor(0.98 * (vals.length - 1))] || 0) * 1.15);
  }

  function draw(i) {
    var f = data.frames[i], ctx = canvas.getContext("2d"), side = canvas.width, half = side / 2;
    var last = i === data.frames.length - 1;
    var ext = extentOf(f.codes);
    if (last) {
      for (var a = 0; a < data.arrows.length; a++) {
        ext = Math.max(ext, Math.abs(data.arrows[a].x) * 1.3, Math.abs(data.arrows[a].y) * 1.3);
      }
    }
    var s = (half - 12) / ext;
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, side, side);
    ctx.strokeStyle = "#ddd";
    ctx.beginPath(); ctx.moveTo(0, half); ctx.lineTo(side, half); ctx.moveTo(half, 0); ctx.lineTo(half, side); ctx.stroke();
    ctx.globalAlpha = 0.65;
    for (var k = 0; k < f.codes.length; k++) {
      ctx.fillStyle = data.colours[data.labels[k]];
      ctx.beginPath();
      ctx.arc(half + f.codes[k][0] * s, half - f.codes[k][1] * s, 2.4, 0, 2 * Math.PI);
      ctx.fill();
    }
    ctx.globalAlpha = 1;
    if (last) {
      ctx.lineWidth = 2.5;
      ctx.font = "bold 15px sans-serif";
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      data.arrows.forEach(function (ar) {
        var ex = half + ar.x * s, ey = half - ar.y * s, ang = Math.atan2(ey - half, ex - half);
        ctx.strokeStyle = ctx.fillStyle = data.colours[ar.label];
        ctx.beginPath(); ctx.moveTo(half, half); ctx.lineTo(ex, ey); ctx.stroke();
        ctx.beginPath(); ctx.moveTo(ex, ey);
        ctx.lineTo(ex - 9 * Math.cos(ang - 0.4), ey - 9 * Math.sin(ang - 0.4));
        ctx.lineTo(ex - 9 * Math.cos(ang + 0.4), ey - 9 * Math.sin(ang + 0.4));
        ctx.closePath(); ctx.fill();
        ctx.fillText(String(ar.label), half + ar.x * s * 1.14, half - ar.y * s * 1.14);
      });
    }
    frame = i;
    slider.value = String(i);
    stepOut.textContent = "step " + f.step + " / " + data.n_steps;
    box.setAttribute("data-frame", String(i));
  }

  function stop() {
    if (timer !== null) { clearInterval(timer); timer = null; }
    playBtn.textContent = "Play";
    playBtn.setAttribute("aria-pressed", "false");
  }

  function play() {
    if (frame >= data.frames.length - 1) { draw(0); }
    playBtn.textContent = "Pause";
    playBtn.setAttribute("aria-pressed", "true");
    timer = setInterval(function () {
      if (frame >= data.frames.length - 1) { stop(); return; }
      draw(frame + 1);
    }, FRAME_MS);
  }

  fetch(box.getAttribute("data-frames")).then(function (r) {
    if (!r.ok) { throw new Error("frames.json: HTTP " + r.status); }
    return r.json();
  }).then(function (json) {
    data = json;
    slider.max = String(data.frames.length - 1);
    canvas.hidden = false;
    finalSvg.hidden = true;
    controls.hidden = false;
    playBtn.addEventListener("click", function () { if (timer === null) { play(); } else { stop(); } });
    slider.addEventListener("input", function () { stop(); draw(parseInt(slider.value, 10)); });
    var reduced = window.matchMedia && window.matchMedia("(prefers-reduced-motion: reduce)").matches;
    if (reduced) { draw(data.frames.length - 1); } else { draw(0); play(); }
  }).catch(function () {
    // Opened from disk (file://) or frames.json missing: the final SVG stays.
  });
})();
