// Probe sweeps: a slider per sweep picks the step; the probe picture, its caption, the charts' dashed
// markers (each chart layout has its own, at the x positions in its data-xs) and the legend's values follow.
// Data comes from data-* attributes written at build time.
(function () {
  "use strict";

  function parse(el, key) {
    try { return JSON.parse(el.getAttribute("data-" + key) || "[]"); } catch (e) { return []; }
  }

  function init(section) {
    var srcs = parse(section, "srcs"), labels = parse(section, "labels"), values = parse(section, "values");
    var charts = section.querySelectorAll(".probe-chart");
    var slider = section.querySelector(".probe-slider");
    if (!slider || !srcs.length) { return; }
    var root = section.getAttribute("data-root") || "";
    var img = section.querySelector(".probe-image");
    var caption = section.querySelector(".probe-step-label");
    var outs = section.querySelectorAll(".probe-value");

    function show(i) {
      i = Math.max(0, Math.min(srcs.length - 1, i));
      img.src = root + srcs[i];
      img.alt = "probe picture at " + labels[i];
      caption.textContent = labels[i];
      for (var c = 0; c < charts.length; c++) {
        var xs = parse(charts[c], "xs"), marker = charts[c].querySelector(".probe-marker");
        if (marker && xs.length > i) {
          marker.setAttribute("x1", xs[i]);
          marker.setAttribute("x2", xs[i]);
        }
      }
      for (var k = 0; k < outs.length; k++) {
        var v = values[i] && values[i][k];
        outs[k].textContent = typeof v === "number" ? v.toFixed(3) : "";
      }
      section.setAttribute("data-step", String(i));
    }

    slider.addEventListener("input", function () { show(parseInt(slider.value, 10)); });
    // A click on a chart jumps to the nearest step.
    Array.prototype.forEach.call(charts, function (svg) {
      var xs = parse(svg, "xs");
      if (!xs.length) { return; }
      svg.addEventListener("click", function (ev) {
        var box = svg.getBoundingClientRect(), vb = svg.viewBox.baseVal;
        var x = (ev.clientX - box.left) / box.width * vb.width;
        var best = 0;
        for (var j = 1; j < xs.length; j++) { if (Math.abs(xs[j] - x) < Math.abs(xs[best] - x)) { best = j; } }
        slider.value = String(best);
        show(best);
      });
    });
    slider.closest("label").hidden = false;
    show(parseInt(slider.value, 10) || 0);
  }

  var sections = document.querySelectorAll(".probe-sweep[data-srcs]");
  for (var i = 0; i < sections.length; i++) { init(sections[i]); }
})();
