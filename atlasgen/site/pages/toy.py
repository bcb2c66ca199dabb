"""The superposition toy page (`toy.html`): the toy stage's frames (`OUT/toy/frames.json`), written into the
site compactly (`toy/toy.json`: everything but the codes; `toy/codes.bin`: every frame's codes as
little-endian int16), animated by toy.js in one view fitted to every frame, and the last frame drawn as SVG
for readers without JavaScript."""
from __future__ import annotations

import json

import numpy as np

from ..assets import SiteFiles
from ..charts import TOY_MARGIN_FRACTION, toy_bounds, toy_final_svg
from ..core import SiteWriter
from ..data import SiteData

FINAL_SVG_FILE = "final.svg"
META_FILE = "toy.json"
CODES_FILE = "codes.bin"
# int16 codes: value = round(code / scale), scale = the largest |code| / 32767 (a 480 px view moves a dot by
# under 1/60 px per step, against the stage's 3 decimals in JSON at ~20 bytes a point; int16 is 4 bytes).
CODE_MAX = 32767


def pack_codes(frames: list[dict]) -> tuple[np.ndarray, bytes, float]:
    """Every frame's codes as (frames × codes × 2 floats, their int16 little-endian bytes, scale)."""
    codes_fn2 = np.asarray([f["codes"] for f in frames], np.float64).reshape(len(frames), -1, 2)
    scale = max(float(np.abs(codes_fn2).max()) if codes_fn2.size else 0.0, 1e-9) / CODE_MAX
    packed = np.round(codes_fn2 / scale).clip(-CODE_MAX, CODE_MAX).astype("<i2")
    return codes_fn2, packed.tobytes(), scale


def toy_context(store, files: SiteFiles) -> dict | None:
    """Put the toy's frames (compact) and the final picture (an .svg file) into the site; the page's context,
    or None when the toy has not run."""
    from ...stages.toy import FRAMES_FILE  # here: the stages import the site package (the site stage)
    frames_path = store.paths.toy_dir / FRAMES_FILE
    if not frames_path.exists():
        return None
    payload = json.loads(frames_path.read_text())
    codes_fn2, packed, scale = pack_codes(payload["frames"])
    bounds = toy_bounds(codes_fn2, payload["arrows"])
    meta = {key: payload[key] for key in ("n_steps", "frame_every", "labels", "colours", "arrows",
                                          "train_accuracy", "test_accuracy")}
    meta.update({"steps": [f["step"] for f in payload["frames"]], "n_frames": int(codes_fn2.shape[0]),
                 "n_codes": int(codes_fn2.shape[1]), "scale": scale, "codes_layout": "int16le[frame][code][x, y]",
                 "bounds": {k: round(v, 4) for k, v in bounds.items()}, "margin_fraction": TOY_MARGIN_FRACTION})
    toy_dir = files.site_dir / "toy"
    toy_dir.mkdir(parents=True, exist_ok=True)
    (toy_dir / META_FILE).write_text(json.dumps(meta, separators=(",", ":")))
    (toy_dir / CODES_FILE).write_bytes(packed)
    final_svg = toy_final_svg(payload, meta["bounds"])
    (toy_dir / FINAL_SVG_FILE).write_text(final_svg)
    return {
        "page_title": "Superposition toy",
        "toy": {
            "meta_url": f"toy/{META_FILE}",
            "codes_url": f"toy/{CODES_FILE}",
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
