"""The superposition toy page (`toy.html`): the toy stage's frames (`OUT/toy/frames.json` → `site/toy/`),
animated by toy.js, and the last frame drawn as SVG for readers without JavaScript."""
from __future__ import annotations

import json

from ..assets import SiteFiles
from ..charts import toy_final_svg
from ..core import SiteWriter
from ..data import SiteData

FINAL_SVG_FILE = "final.svg"


def toy_context(store, files: SiteFiles) -> dict | None:
    """Put the toy's frames (and the final picture as an .svg file) into the site; the page's context, or
    None when the toy has not run."""
    from ...stages.toy import FRAMES_FILE  # here: the stages import the site package (the site stage)
    frames_path = store.paths.toy_dir / FRAMES_FILE
    if not frames_path.exists():
        return None
    files.put(frames_path, f"toy/{FRAMES_FILE}")
    payload = json.loads(frames_path.read_text())
    final_svg = toy_final_svg(payload)
    (files.site_dir / "toy" / FINAL_SVG_FILE).write_text(final_svg)
    return {
        "page_title": "Superposition toy",
        "toy": {
            "frames_url": f"toy/{FRAMES_FILE}",
            "final_svg": final_svg,
            "n_frames": len(payload["frames"]),
            "n_steps": payload["n_steps"],
            "last_step": payload["frames"][-1]["step"],
            "frame_every": payload["frame_every"],
            "n_codes": len(payload["labels"]),
            "train_accuracy": payload["train_accuracy"],
            "test_accuracy": payload["test_accuracy"],
            "arrows": payload["arrows"],
            "colours": payload["colours"],
        },
    }


def write_toy(writer: SiteWriter, data: SiteData) -> None:
    context = toy_context(data.store, data.files)
    if context is not None:
        writer.render("toy.html", "toy.html", context)
