"""The superposition toy: documented accuracy (seeded), frame count and 2-D codes, the site's final SVG."""
from __future__ import annotations

import json

import pytest

from atlasgen.stages import toy
from atlasgen.config import ToyConfig, load_config
from atlasgen.store import Store


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    cfg = load_config("tiny").toy
    with Store.open(out) as store:
        summary = toy.run(cfg, store)
    return out, cfg, summary


def test_toy_reaches_documented_accuracy(toy_store):
    _, cfg, summary = toy_store
    # README documents >= 0.8 held-out accuracy for the tiny preset's 300 steps (seed 0 gives ~0.88).
    assert summary["test_accuracy"] >= 0.8, summary
    assert summary["train_accuracy"] >= 0.9, summary


def test_untrained_toy_is_at_chance():
    # The accuracy test must be able to fail: with one step the bottleneck knows nothing yet.
    result = toy.train_toy(ToyConfig(n_steps=1, frame_every=1))
    assert result["test_accuracy"] < 0.5


def test_frames_are_2d_and_counted(toy_store):
    out, cfg, summary = toy_store
    payload = json.loads((out / "toy" / "frames.json").read_text())
    frames = payload["frames"]
    assert len(frames) == cfg.n_steps // cfg.frame_every + 1 == summary["n_frames"]
    assert [f["step"] for f in frames] == list(range(0, cfg.n_steps + 1, cfg.frame_every))
    n = len(payload["labels"])
    assert n == cfg.n_codes
    for frame in (frames[0], frames[-1]):
        assert len(frame["codes"]) == n
        assert all(len(c) == 2 for c in frame["codes"])
    assert frames[0]["codes"] != frames[-1]["codes"], "codes must move during training"
    assert len(payload["arrows"]) == 10


def test_final_svg_has_class_arrows(toy_store, tmp_path):
    """The site's toy page draws the last frame (inline, and as site/toy/final.svg) with one arrow per class."""
    from atlasgen.site.assets import SiteFiles
    from atlasgen.site.pages.toy import toy_context
    out, _, _ = toy_store
    with Store.open(out, read_only=True) as store:
        context = toy_context(store, SiteFiles(out, tmp_path))
    svg = (tmp_path / "toy" / "final.svg").read_text()
    assert svg.startswith("<svg") and svg == str(context["toy"]["final_svg"])
    assert svg.count("marker-end=") == 10
    assert svg.count("<circle") == context["toy"]["n_codes"], "every digit of the last frame is drawn"
    assert not (out / "toy" / "final.svg").exists(), "the toy stage writes data; the site draws it"


def test_site_toy_data_is_compact_and_exact(toy_store, tmp_path):
    """The site's toy data (toy.json + int16 codes.bin) holds every frame to within the quantisation step,
    in at most a third of the stage's frames.json, and its view holds every code of every frame."""
    import numpy as np
    from atlasgen.site.assets import SiteFiles
    from atlasgen.site.pages.toy import toy_context
    out, _, _ = toy_store
    with Store.open(out, read_only=True) as store:
        toy_context(store, SiteFiles(out, tmp_path))
    source = json.loads((out / "toy" / "frames.json").read_text())
    meta = json.loads((tmp_path / "toy" / "toy.json").read_text())
    raw = (tmp_path / "toy" / "codes.bin").read_bytes()
    assert not (tmp_path / "toy" / "frames.json").exists()
    site_bytes = len(raw) + (tmp_path / "toy" / "toy.json").stat().st_size
    assert site_bytes * 3 <= (out / "toy" / "frames.json").stat().st_size
    codes = np.frombuffer(raw, "<i2").reshape(meta["n_frames"], meta["n_codes"], 2) * meta["scale"]
    expected = np.asarray([f["codes"] for f in source["frames"]])
    assert np.abs(codes - expected).max() <= meta["scale"] / 2 + 1e-9
    assert meta["steps"] == [f["step"] for f in source["frames"]] and meta["labels"] == source["labels"]
    b = meta["bounds"]
    assert (b["x0"] < expected[..., 0].min() and expected[..., 0].max() < b["x1"]
            and b["y0"] < expected[..., 1].min() and expected[..., 1].max() < b["y1"]), "every frame fits the view"
    assert b["x1"] - b["x0"] < 1.5 * max(np.ptp(expected[..., 0]), np.ptp(expected[..., 1])), "the view is tight"


def test_toy_is_seeded():
    a = toy.train_toy(ToyConfig(n_steps=20, frame_every=10, n_codes=50))
    b = toy.train_toy(ToyConfig(n_steps=20, frame_every=10, n_codes=50))
    assert a["frames"][-1]["codes"] == b["frames"][-1]["codes"]
