// Probe sweeps: a slider per sweep picks the step; the probe picture, its caption, the chart's dashed
// marker and the legend's values follow. Data comes from data-* attributes written at build time.
(function () {
  "use strict";

  function parse(el, key) {
    try { return JSON.parse(el.getAttribute("data-" + key) || "[]"); } catch (e) { return []; }
  }

  function init(section) {
    var srcs = parse(section, "srcs"), labels = parse(section, "labels"), xs = parse(section, "xs"),
        values = parse(section, "values");
    var slider = section.querySelector(".probe-slider");
    if (!slider || !srcs.length) { return; }
    var root = section.getAttribute("data-root") || "";
    var img = section.querySelector(".probe-image");
    var caption = section.querySelector(".probe-step-label");
    var marker = section.querySelector(".probe-marker");
    var outs = section.querySelectorAll(".probe-value");

    function show(i) {
      i = Math.max(0, Math.min(srcs.length - 1, i));
      img.src = root + srcs[i];
      img.alt = "probe picture at " + labels[i];
      caption.textContent = labels[i];
      if (marker && xs.length > i) {
        marker.setAttribute("x1", xs[i]);
        marker.setAttribute("x2", xs[i]);
      }
      for (var k = 0; k < outs.length; k++) {
        var v = values[i] && values[i][k];
        outs[k].textContent = typeof v === "number" ? v.toFixed(3) : "";
      }
      section.setAttribute("data-step", String(i));
    }

    slider.addEventListener("input", function () { show(parseInt(slider.value, 10)); });
    // A click on the chart jumps to the nearest step.
    var svg = section.querySelector(".probe-chart");
    if (svg && xs.length) {
      svg.addEventListener("click", function (ev) {
        var box = svg.getBoundingClientRect(), vb = svg.viewBox.baseVal;
        var x = (ev.clientX - box.left) / box.width * vb.width;
        var best = 0;
        for (var j = 1; j < xs.length; j++) { if (Math.abs(xs[j] - x) < Math.abs(xs[best] - x)) { best = j; } }
        slider.value = String(best);
        show(best);
      });
    }
    slider.closest("label").hidden = false;
    show(parseInt(slider.value, 10) || 0);
  }

  var sections = document.querySelectorAll(".probe-sweep[data-srcs]");
  for (var i = 0; i < sections.length; i++) { init(sections[i]); }
})();
