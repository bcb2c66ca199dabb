"""The superposition toy from the seed study: the 10 classes of scikit-learn's bundled 8×8 digits
squeezed through a 2-D bottleneck (64 → hidden → 2 → 10), trained with full-batch Adam (seeded).

Writes `toy/frames.json`: the 2-D codes of a fixed subset of digits every `frame_every` steps (rounded
to 3 decimals), their labels and colours, one arrow per class along its mean code, and the accuracies.
The site's toy page animates the frames and draws the last one (`atlasgen.site.charts.toy_final_svg`).
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch

from ..config import ToyConfig
from ..paths import atomic_path
from ..progress import bar
from ..threads import restore_torch_threads
from .base import Stage

FRAMES_FILE = "frames.json"
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
    return {"train_accuracy": result["train_accuracy"], "test_accuracy": result["test_accuracy"],
            "final_loss": result["final_loss"], "n_frames": len(result["frames"]),
            "n_codes": len(result["labels"]), "n_train": result["n_train"], "n_test": result["n_test"]}


SPEC = Stage("toy", ToyConfig, run, folders=("toy_dir",), pages=("toy.html",))
