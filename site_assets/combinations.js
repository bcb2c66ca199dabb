// Combinations page: show one pair at a time (picker, arrows, #pair-A-B in the URL) and turn each pair's
// strip of interpolation pictures into a single picture with a slider. Without JS every pair is shown.
(function () {
  "use strict";
  var sections = Array.prototype.slice.call(document.querySelectorAll("section.pair"));
  if (!sections.length) { return; }
  var picker = document.getElementById("pair-picker");
  var controls = document.getElementById("pair-controls");

  sections.forEach(function (section) {
    var steps = Array.prototype.slice.call(section.querySelectorAll(".slerp-steps li"));
    var view = section.querySelector(".slerp-view");
    var control = section.querySelector(".slerp-control");
    var slider = section.querySelector(".slerp-slider");
    var img = section.querySelector(".slerp-picture");
    var caption = section.querySelector(".slerp-caption");
    if (!steps.length || !slider || !view) { return; }
    function show(i) {
      var step = steps[i];
      if (img && img.tagName === "IMG" && step.dataset.src) {
        img.src = step.dataset.src;
        img.width = Number(step.dataset.width);
        img.height = Number(step.dataset.height);
        img.alt = step.dataset.caption;
      }
      caption.textContent = step.dataset.caption;
    }
    slider.addEventListener("input", function () { show(Number(slider.value)); });
    show(Number(slider.value));
    view.hidden = false;
    control.hidden = false;
    section.querySelector(".slerp-steps").hidden = true;
  });

  var missing = document.getElementById("pair-missing");
  function select(key, updateHash) {
    var found = false;
    sections.forEach(function (s) {
      var on = s.dataset.key === key;
      s.hidden = !on;
      found = found || on;
    });
    missing.hidden = true;
    if (!found) {
      // A link to a pair that was not rendered (#pair-1-2): say so, and let the URL name the pair shown.
      select(sections[0].dataset.key, true);
      var ab = /^(\d+)-(\d+)$/.exec(key);
      missing.textContent = (ab ? "No combination of #" + ab[1] + " and #" + ab[2] + " was rendered"
                                : "There is no pair \u201c" + key + "\u201d") + "; showing the first pair.";
      missing.hidden = false;
      return;
    }
    picker.value = key;
    if (updateHash) { history.replaceState(null, "", "#pair-" + key); }
  }
  function step(delta) {
    var i = sections.findIndex(function (s) { return !s.hidden; });
    var next = sections[(i + delta + sections.length) % sections.length];
    select(next.dataset.key, true);
  }
  picker.addEventListener("change", function () { select(picker.value, true); });
  document.getElementById("pair-prev").addEventListener("click", function () { step(-1); });
  document.getElementById("pair-next").addEventListener("click", function () { step(1); });
  window.addEventListener("hashchange", function () { select(location.hash.replace(/^#pair-/, ""), false); });
  controls.hidden = false;
  select(location.hash.indexOf("#pair-") === 0 ? location.hash.slice(6) : sections[0].dataset.key, false);
})();
