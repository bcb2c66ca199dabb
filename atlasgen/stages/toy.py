"""The superposition toy from the seed study: the 10 classes of scikit-learn's bundled 8×8 digits
squeezed through a 2-D bottleneck (64 → hidden → 2 → 10), trained with full-batch Adam (seeded).

Writes `toy/frames.json` (the 2-D codes of a fixed subset of digits every `frame_every` steps,
rounded to 3 decimals; labels once) and `toy/final.svg` (the final codes plus one arrow per class
along its mean code direction). The site's toy page animates the frames.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from markupsafe import Markup

from ..config import ToyConfig
from ..paths import atomic_path
from ..progress import bar
from ..threads import restore_torch_threads
from .base import Stage

FRAMES_FILE = "frames.json"
FINAL_SVG_FILE = "final.svg"
# Ten distinguishable colours (Tableau 10), one per digit class; shared with toy.js through the JSON.
CLASS_COLOURS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
                 "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    digits = load_digits()  # bundled with scikit-learn: no download
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


class BottleneckNet(torch.nn.Module):
    """64 pixels → (hidden, ReLU) → 2-D code → 10 class logits."""

    def __init__(self, hidden: int):
        super().__init__()
        if hidden > 0:
            self.encoder = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))
        else:
            self.encoder = torch.nn.Linear(64, 2)
        self.classifier = torch.nn.Linear(2, 10)

    def forward(self, x_n64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code_n2 = self.encoder(x_n64)
        return code_n2, self.classifier(code_n2)


def train_toy(cfg: ToyConfig) -> dict:
    """Train the toy; returns frames (step, codes), labels of the recorded digits, class arrows and accuracies."""
    assert cfg.n_steps > 0 and cfg.frame_every > 0, "toy n_steps and frame_every must be positive"
    x_n64, y_n = _load_digits()
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(y_n), generator=gen).numpy()
    n_test = int(round(len(y_n) * cfg.test_fraction))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    shown_idx = np.sort(perm[:min(cfg.n_codes, len(perm))])
    x = torch.from_numpy(x_n64)
    y = torch.from_numpy(y_n)
    torch.manual_seed(cfg.seed)
    net = BottleneckNet(cfg.hidden)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    x_train, y_train = x[train_idx], y[train_idx]
    x_shown = x[shown_idx]

    frames = []

    def record(step: int) -> None:
        with torch.no_grad():
            codes_n2 = net.encoder(x_shown).numpy()
        frames.append({"step": step, "codes": np.round(codes_n2, 3).tolist()})

    record(0)
    losses = []
    for step in bar(range(1, cfg.n_steps + 1), desc="toy", unit="step"):
        _, logits = net(x_train)
        loss = torch.nn.functional.cross_entropy(logits, y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % cfg.frame_every == 0 or step == cfg.n_steps:
            record(step)

    with torch.no_grad():
        codes_all, logits_all = net(x)
        pred = logits_all.argmax(1)
        train_acc = float((pred[train_idx] == y[train_idx]).float().mean())
        test_acc = float((pred[test_idx] == y[test_idx]).float().mean()) if n_test else float("nan")
        codes_np = codes_all.numpy()
    arrows = []
    for c in range(10):
        mean_2 = codes_np[y_n == c].mean(axis=0)
        arrows.append({"label": c, "x": round(float(mean_2[0]), 3), "y": round(float(mean_2[1]), 3),
                       "angle_deg": round(math.degrees(math.atan2(mean_2[1], mean_2[0])), 1)})
    return {"frames": frames, "labels": y_n[shown_idx].tolist(), "arrows": arrows,
            "train_accuracy": round(train_acc, 4), "test_accuracy": round(test_acc, 4),
            "final_loss": round(losses[-1], 4), "n_train": int(len(train_idx)), "n_test": int(n_test)}


def final_svg(result: dict, side: int = 480) -> str:
    """The last frame's codes as dots, and one arrow per class from the origin to its mean code."""
    codes = np.asarray(result["frames"][-1]["codes"], dtype=np.float64)
    arrows = result["arrows"]
    # A robust extent (98th percentile), so a few outlying digits do not shrink the clusters to a dot.
    extent = max(float(np.quantile(np.abs(codes), 0.98)) * 1.15 if len(codes) else 1.0,
                 max(max(abs(a["x"]), abs(a["y"])) for a in arrows) * 1.3, 1e-6)
    half = side / 2

    def px(x: float, y: float) -> tuple[float, float]:
        return half + x / extent * (half - 12), half - y / extent * (half - 12)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {side} {side}" width="{side}" height="{side}" '
             f'class="toy-final-plot" role="img" aria-label="final 2-D codes of the digits with one arrow per class">',
             '<defs>' + "".join(
                 f'<marker id="toy-head-{c}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
                 f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{CLASS_COLOURS[c]}"/></marker>'
                 for c in range(10)) + '</defs>',
             f'<rect width="{side}" height="{side}" fill="#fff"/>',
             f'<line x1="0" y1="{half}" x2="{side}" y2="{half}" stroke="#ddd"/>',
             f'<line x1="{half}" y1="0" x2="{half}" y2="{side}" stroke="#ddd"/>']
    for (x, y), label in zip(codes, result["labels"]):
        if max(abs(x), abs(y)) > extent:
            continue
        cx, cy = px(x, y)
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="2.2" fill="{CLASS_COLOURS[label]}" fill-opacity="0.6"/>')
    for a in arrows:
        ex, ey = px(a["x"], a["y"])
        colour = CLASS_COLOURS[a["label"]]
        parts.append(f'<line x1="{half}" y1="{half}" x2="{ex:.1f}" y2="{ey:.1f}" stroke="{colour}" stroke-width="2.5" '
                     f'marker-end="url(#toy-head-{a["label"]})"/>')
        tx, ty = px(a["x"] * 1.12, a["y"] * 1.12)
        parts.append(f'<text x="{tx:.1f}" y="{ty:.1f}" font-size="15" font-weight="bold" text-anchor="middle" '
                     f'dominant-baseline="middle" fill="{colour}" stroke="#fff" stroke-width="3" '
                     f'paint-order="stroke">{a["label"]}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def run(cfg: ToyConfig, store) -> dict:
    # The network is tiny: extra threads only fight over shared cores (10× slower on a busy 2-core box).
    with restore_torch_threads():
        torch.set_num_threads(1)
        result = train_toy(cfg)
    toy_dir = store.paths.toy_dir
    toy_dir.mkdir(parents=True, exist_ok=True)
    payload = {"n_steps": cfg.n_steps, "frame_every": cfg.frame_every, "labels": result["labels"],
               "colours": list(CLASS_COLOURS), "arrows": result["arrows"],
               "train_accuracy": result["train_accuracy"], "test_accuracy": result["test_accuracy"],
               "frames": result["frames"]}
    with atomic_path(toy_dir / FRAMES_FILE) as tmp:
        tmp.write_text(json.dumps(payload, separators=(",", ":")))
    with atomic_path(toy_dir / FINAL_SVG_FILE) as tmp:
        tmp.write_text(final_svg(result))
    return {"train_accuracy": result["train_accuracy"], "test_accuracy": result["test_accuracy"],
            "final_loss": result["final_loss"], "n_frames": len(result["frames"]),
            "n_codes": len(result["labels"]), "n_train": result["n_train"], "n_test": result["n_test"]}


def site_pages(store, site_dir: Path) -> list[tuple[str, str, dict]]:
    """The toy page: (template, output path relative to the site, context). Empty if the toy has not run."""
    frames_path = store.paths.toy_dir / FRAMES_FILE
    svg_path = store.paths.toy_dir / FINAL_SVG_FILE
    if not frames_path.exists() or not svg_path.exists():
        return []
    out_dir = Path(site_dir) / "toy"
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(frames_path, out_dir / FRAMES_FILE)
    shutil.copyfile(svg_path, out_dir / FINAL_SVG_FILE)
    payload = json.loads(frames_path.read_text())
    context = {
        "page_title": "Superposition toy",
        "toy": {
            "frames_url": f"toy/{FRAMES_FILE}",
            "final_svg": Markup(svg_path.read_text()),
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
    return [("toy.html", "toy.html", context)]


SPEC = Stage("toy", ToyConfig, run, folders=("toy_dir",), pages=("toy.html",))
