// Click (or Enter on) a picture inside a `.zoomable` block to see it large in a modal <dialog>; Esc, the close
// button or a click outside the picture closes it, and focus returns to the picture. A picture's
// data-full attribute, when set, names a larger file to show instead of its own src.
(function () {
  "use strict";
  var pictures = document.querySelectorAll(".zoomable img");
  if (!pictures.length || typeof HTMLDialogElement === "undefined") { return; }
  var dialog = document.createElement("dialog");
  dialog.className = "lightbox";
  dialog.setAttribute("aria-label", "Enlarged picture");
  // The large picture exists only while the lightbox is open (an <img> without a file would count as broken).
  var big = null;
  var caption = document.createElement("p");
  caption.className = "lightbox-caption";
  var close = document.createElement("button");
  close.type = "button";
  close.className = "lightbox-close";
  close.textContent = "Close (Esc)";
  dialog.append(close, caption);
  document.body.appendChild(dialog);
  var opener = null;

  function open(img) {
    opener = img;
    big = document.createElement("img");
    big.className = "lightbox-picture";
    big.src = img.dataset.full || img.currentSrc || img.src;
    big.alt = img.alt;
    dialog.insertBefore(big, caption);
    var li = img.closest("li, figure");
    caption.textContent = li ? li.textContent.replace(/\s+/g, " ").trim() : img.alt;
    dialog.showModal();
    close.focus();
  }
  close.addEventListener("click", function () { dialog.close(); });
  dialog.addEventListener("click", function (e) { if (e.target === dialog) { dialog.close(); } });
  dialog.addEventListener("close", function () {
    if (big) { big.remove(); big = null; }
    if (opener) { opener.focus(); }
  });
  Array.prototype.forEach.call(pictures, function (img) {
    img.tabIndex = 0;
    img.classList.add("zoom-in");
    img.addEventListener("click", function (e) { e.preventDefault(); open(img); });
    img.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(img); }
    });
  });
})();
