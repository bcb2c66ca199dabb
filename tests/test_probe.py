"""Probe sweeps: pictures built as specified, every step recorded in `probes`, charts on the site page."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from scipy import ndimage

from atlasgen.stages import probe
from atlasgen.config import ProbeConfig, config_json, load_config
from atlasgen.errors import AtlasError
from atlasgen.testing import record_sae
from atlasgen.store import Store

BG = (230, 230, 230)


def foreground(image) -> np.ndarray:
    """Pixels that differ clearly from the plain probe background."""
    arr = np.asarray(image.convert("RGB"), dtype=np.int16)
    return np.abs(arr - np.array(BG, np.int16)).max(axis=2) > 40


def fake_store(out_dir, n_features: int = 192) -> Store:
    """A store with the tiny model, a random SAE and the stage rows probe/decompose read."""
    from atlasgen.model import load_embedding_model
    from atlasgen.sae import SparseAutoencoder
    store = Store.open(out_dir)
    load_embedding_model("tiny", "cpu", "fp32", models_dir=store.paths.models_dir)
    torch.manual_seed(0)
    sae = SparseAutoencoder(96, n_features)
    for stage, cfg in (("ingest", {"corpus_side": 256}), ("embed", {"model": "tiny", "precision": "fp32"}),
                       ("encode", {"top_k": 32})):
        store.mark_stage_started(stage, "h", json.dumps(cfg))
        store.mark_stage_done(stage, {})
    record_sae(store, sae, "run0")
    return store


@pytest.fixture(scope="module")
def tiny_sweeps():
    return {s.name: s for s in probe.parse_sweeps(load_config("tiny").probe)}


def test_size_sweep_object_box_matches_each_size(tiny_sweeps):
    sweep = tiny_sweeps["circle-size"]
    sizes = [112, 96, 80, 64, 48, 40, 32, 24, 16, 12]
    assert [s.value for s in sweep.steps] == sizes
    for step, size in zip(sweep.steps, sizes):
        ys, xs = np.nonzero(foreground(step.image))
        w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        assert abs(max(w, h) - size) <= 2, (size, w, h)
        # centred on the canvas
        assert abs((xs.max() + xs.min()) / 2 - 63.5) <= 1.5 and abs((ys.max() + ys.min()) / 2 - 63.5) <= 1.5


def test_count_sweep_has_that_many_separate_objects(tiny_sweeps):
    sweep = tiny_sweeps["circle-count"]
    assert [s.value for s in sweep.steps] == list(range(1, 13))
    for step in sweep.steps:
        _, n_objects = ndimage.label(foreground(step.image))
        assert n_objects == int(step.value)
        boxes = probe.count_layout(int(step.value), 24, 128, 6)
        for i, a in enumerate(boxes):
            assert 0 <= a[0] and a[2] <= 128 and 0 <= a[1] and a[3] <= 128
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_readout_whole_vs_cut(tiny_sweeps):
    whole, sliced, half = tiny_sweeps["circle-readout"].steps
    assert [whole.label, sliced.label, half.label] == ["whole", "sliced", "half"]
    assert ndimage.label(foreground(whole.image))[1] == 1
    assert ndimage.label(foreground(sliced.image))[1] == 3
    assert foreground(half.image).sum() < 0.6 * foreground(whole.image).sum()


def test_drawn_shapes_are_kept_and_handed_out_as_copies():
    """Every config load parses the sweeps, so a drawn shape is drawn once per process; a caller that
    paints on what it got does not change what the next one gets."""
    first = probe.load_object("shape:circle:red")
    before = np.asarray(first).copy()
    first.paste((0, 0, 255, 255), (0, 0, first.width, first.height))
    again = probe.load_object("shape:circle:red")
    assert again is not first
    np.testing.assert_array_equal(np.asarray(again), before)
    assert probe._drawn_shape.cache_info().hits >= 1
    assert not np.array_equal(np.asarray(probe.load_object("shape:circle:blue")), before)


def test_count_that_does_not_fit_is_a_user_error():
    cfg = ProbeConfig(canvas=64, sweeps=({"name": "x", "kind": "count", "object": "shape:circle:red", "size": 30,
                                          "max_count": 9},))
    with pytest.raises(AtlasError, match="do not fit"):
        probe.parse_sweeps(cfg)


@pytest.mark.parametrize("bad, match", [
    ({"name": "a", "kind": "spin", "object": "shape:circle:red"}, "kind"),
    ({"name": "a", "kind": "size", "object": "shape:blob:red"}, "shape:KIND:COLOUR"),
    ({"name": "a", "kind": "size", "object": "/no/such.png"}, "neither"),
    ({"name": "a b", "kind": "size", "object": "shape:circle:red"}, "name"),
    ({"name": "a", "kind": "size", "object": "shape:circle:red", "sizes": [500]}, "larger than"),
    ({"name": "a", "kind": "size", "object": "shape:circle:red", "colour": "red"}, "unknown option"),
])
def test_bad_sweeps_are_user_errors(bad, match):
    with pytest.raises(AtlasError, match=match):
        probe.parse_sweeps(ProbeConfig(sweeps=(bad,)))


def test_image_file_object_with_colour_key(tmp_path):
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (200, 100), "white")
    ImageDraw.Draw(img).rectangle((20, 30, 179, 69), fill=(0, 0, 200))
    img.save(tmp_path / "bar.png")
    cfg = ProbeConfig(canvas=128, sweeps=({"name": "bar", "kind": "size", "object": str(tmp_path / "bar.png"),
                                           "key": "#ffffff", "background": "#e6e6e6", "sizes": [100, 50]},))
    (sweep,) = probe.parse_sweeps(cfg)
    for step in sweep.steps:
        ys, xs = np.nonzero(foreground(step.image))
        assert abs((xs.max() - xs.min() + 1) - step.value) <= 2  # the 160×40 bar, keyed out of its white page
        assert (ys.max() - ys.min() + 1) <= step.value / 3


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    store = fake_store(out)
    cfg = load_config("tiny").probe
    store.mark_stage_started("probe", "h", config_json(cfg))  # as the pipeline does around run()
    summary = probe.run(cfg, store)
    store.mark_stage_done("probe", summary)
    yield store, cfg, summary
    store.close()


def test_probe_stage_records_every_step(probed):
    store, cfg, summary = probed
    assert summary["n_sweeps"] == 3 and summary["n_steps"] == 10 + 12 + 3
    rows = store.query("SELECT probe, count(DISTINCT step), min(value) FROM probes GROUP BY probe ORDER BY probe")
    assert [(r[0], r[1]) for r in rows] == [("circle-count", 12), ("circle-readout", 3), ("circle-size", 10)]
    assert all(r[2] > 0 for r in rows), "only non-zero activations are recorded"
    # No top-k cap: a random SAE has far more than 32 features active on most pictures.
    assert store.scalar("SELECT max(n) FROM (SELECT count(*) AS n FROM probes GROUP BY probe, step)") > 32
    for (path,) in store.query("SELECT DISTINCT image_path FROM probes"):
        assert (store.paths.out_dir / path).exists()
    labels = [r[0] for r in store.query("SELECT DISTINCT step_label FROM probes WHERE probe = 'circle-size' "
                                        "ORDER BY step_label")]
    assert "112px" in labels and "12px" in labels
    assert len(summary["features"]["circle-size"]) == cfg.n_auto_features


def test_probe_values_match_a_direct_encode(probed):
    from atlasgen.decompose import embed_pil, encode, load_store_model
    from atlasgen.sae import load_stage_sae
    from PIL import Image
    store, _, _ = probed
    path = store.scalar("SELECT image_path FROM probes WHERE probe = 'circle-count' AND step = 4 LIMIT 1")
    acts_f = encode(load_stage_sae(store, "train")[0], embed_pil(load_store_model(store, "cpu"),
                                                       [Image.open(store.paths.out_dir / path).convert("RGB")]), None)[0]
    stored = dict(store.query("SELECT feature_id, value FROM probes WHERE probe = 'circle-count' AND step = 4"))
    assert set(stored) == set(np.flatnonzero(acts_f > 0).tolist())
    for fid, value in stored.items():
        assert value == pytest.approx(acts_f[fid], rel=1e-3, abs=1e-4)


def test_probe_site_page_has_charts(probed, tmp_path):
    from atlasgen.site.assets import SiteFiles
    from atlasgen.site.pages.probes import probes_context
    store, _, _ = probed
    context = probes_context(store, SiteFiles(store.paths.out_dir, tmp_path))
    sweeps = context["sweeps"]
    assert [s["name"] for s in sweeps] == ["circle-size", "circle-count", "circle-readout"]
    colour_of = {}
    for s in sweeps:
        assert set(s["charts"]) == {"wide", "narrow"}, "each chart in a desktop and a phone layout"
        for f in s["features"]:  # one colour per feature on the whole page
            assert colour_of.setdefault(f["feature_id"], f["colour"]) == f["colour"]
    for s in sweeps[:2]:
        for chart in s["charts"].values():
            assert "<polyline" in chart and "probe-marker" in chart and 'class="y-title"' in chart
            xs = json.loads(re.search(r'data-xs="([^"]*)"', chart).group(1))
            assert len(xs) == len(s["steps"]) and xs == sorted(xs)
        assert len(s["features"]) == 4
    assert "<rect" in sweeps[2]["charts"]["wide"]
    for s in sweeps:
        for st in s["steps"]:
            assert (tmp_path / st["src"]).exists()
    probe.SPEC.reset_outputs(store)
    assert store.count("probes") == 0 and not store.paths.probes_dir.exists()


def test_tiny_build_probes_page_has_charts(tiny_build):
    html = (tiny_build / "site" / "probes.html").read_text()
    # two sweeps with lines and one readout, each in a wide and a narrow layout
    assert html.count('class="probe-chart"') == 2 * 2 and html.count('class="probe-bars"') == 1 * 2
    assert html.count("<polyline") >= 2
    assert 'src="assets/probes.js"' in html
    for name, n_steps in (("circle-size", 10), ("circle-count", 12), ("circle-readout", 3)):
        assert f'id="probe-{name}"' in html
        assert len(list((tiny_build / "site" / "probes" / name).glob("*.webp"))) == n_steps
    with Store.open(tiny_build, read_only=True) as store:
        assert store.scalar("SELECT count(DISTINCT (probe, step)) FROM probes") == 25
        fid = store.scalar("SELECT feature_id FROM probes WHERE probe = 'circle-size' ORDER BY value DESC LIMIT 1")
    assert f'href="features/{fid}.html"' in html


def test_feature_pages_link_to_the_probe_charts_that_draw_them(tiny_build):
    """A feature page's probe list links a sweep's name to its chart only where that chart draws the feature
    (charts show a few features); elsewhere it says the chart shows other features."""
    site = tiny_build / "site"
    drawn = {}  # sweep → the feature ids its chart links to
    for part in (site / "probes.html").read_text().split('<section class="probe-sweep" id="probe-')[1:]:
        name = part.split('"', 1)[0]
        drawn[name] = {int(f) for f in re.findall(r'href="features/([0-9]+)\.html"', part)}
    with Store.open(tiny_build, read_only=True) as store:
        peaks = store.probe_peaks_by_feature()
    pairs = [(fid, name) for fid, sweeps in peaks.items() for name, _ in sweeps]
    in_chart = [(fid, name) for fid, name in pairs if fid in drawn[name]]
    elsewhere = [(fid, name) for fid, name in pairs if fid not in drawn[name]]
    assert in_chart and elsewhere
    for fid, name in in_chart[:4] + elsewhere[:4]:
        html = (site / "features" / f"{fid}.html").read_text()
        linked = f'<a href="../probes.html#probe-{name}">{name}</a>' in html
        assert linked == ((fid, name) in in_chart), (fid, name)
        assert (f"{name} (max activation" in html and "shows other features" in html) or linked


def test_readout_image_items_and_image_background(tmp_path):
    from PIL import Image
    Image.new("RGB", (300, 200), (10, 200, 30)).save(tmp_path / "green.jpg")
    Image.new("RGB", (64, 64), (0, 0, 250)).save(tmp_path / "bg.png")
    cfg = ProbeConfig(canvas=96, sweeps=({"name": "r", "kind": "readout", "background": str(tmp_path / "bg.png"),
                                          "object": "shape:square:red",
                                          "items": [{"name": "photo", "image": str(tmp_path / "green.jpg")},
                                                    {"name": "square", "size": 40}]},))
    (sweep,) = probe.parse_sweeps(cfg)
    photo, square = (np.asarray(s.image) for s in sweep.steps)
    assert photo.shape == square.shape == (96, 96, 3)
    assert np.abs(photo.astype(int) - [10, 200, 30]).max() <= 12  # the file, centre-cropped to the canvas
    assert tuple(square[2, 2]) == (0, 0, 250) and square[48, 48, 0] > 200  # red square on the image background
