"""Probe sweeps: controlled pictures (one object shrinking, an object multiplying, named readouts such
as whole vs sliced) run through the store's model and SAE *without* the top-k cap, so every non-zero
feature activation is recorded in `probes`.

Sweeps are TOML tables under `[[probe.sweeps]]` (schema in README "Probes" and `parse_sweep`):

    [[probe.sweeps]]
    name = "circle-size"            # unique; letters, digits, - and _
    kind = "size"                   # size | count | readout
    object = "shape:circle:red"     # shape:KIND:COLOUR (tinyset kinds) or an image file (RGBA, or set key)
    key = ""                        # image files without alpha: this background colour becomes transparent
    background = "#f0f0f0"          # a colour ("#rrggbb" or a name) or an image file
    features = []                   # feature ids to chart; empty = the strongest over the sweep
    sizes = [112, 96, 64, 32, 16]   # size: object size (longest side, px) per step; or min_size/max_size/n_steps
    # count: size = 24 and counts = [1, 2, 3] (or max_count = N); gap = px between objects
    # readout: items = [{name = "whole", object = "shape:circle:red", size = 96},
    #                   {name = "sliced", object = "shape:circle:red", size = 96, cut = "sliced"},
    #                   {name = "photo", image = "berry.jpg"}]
"""
from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from markupsafe import Markup, escape
from PIL import Image, ImageColor

from ..config import ProbeConfig
from ..errors import AtlasError
from ..paths import atomic_path
from ..progress import bar, say
from .base import Stage

KINDS = ("size", "count", "readout")
CUTS = ("", "sliced", "half")
# Feature line colours on the charts (Tableau 10).
PALETTE = ("#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f",
           "#bab0ac")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# Objects are drawn this large, cropped to their visible box and scaled down (smooth edges at any size).
_DRAW_PX = 512


@dataclass
class Step:
    value: float
    label: str
    image: Image.Image


@dataclass
class Sweep:
    name: str
    kind: str
    title: str
    features: list[int]
    steps: list[Step] = field(default_factory=list)


# --- pictures ------------------------------------------------------------------------------------
def _colour(text: str, where: str) -> tuple[int, int, int]:
    from .. import tinyset
    if text in getattr(tinyset, "COLOURS", {}):
        return tinyset.COLOURS[text]
    try:
        return ImageColor.getrgb(text)[:3]
    except ValueError:
        raise AtlasError(f"{where}: {text!r} is not a colour", 'use "#rrggbb" or a colour name such as "red"') from None


def _crop_to_alpha(obj: Image.Image) -> Image.Image:
    box = obj.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    if box is None:
        raise AtlasError("the probe object is fully transparent", "use an RGBA image with a visible object, or set key")
    return obj.crop(box)


def load_object(spec: str, key: str = "", where: str = "probe") -> Image.Image:
    """An RGBA object cropped to its visible box: `shape:KIND:COLOUR` (drawn by tinyset) or an image file."""
    if spec.startswith("shape:"):
        from ..tinyset import OBJECT_KINDS, draw_object
        parts = spec.split(":", 2)
        if len(parts) != 3 or parts[1] not in OBJECT_KINDS:
            raise AtlasError(f"{where}: object {spec!r} is not shape:KIND:COLOUR",
                             f"KIND is one of {', '.join(OBJECT_KINDS)}; e.g. shape:circle:red")
        return _crop_to_alpha(draw_object(parts[1], _colour(parts[2], where), _DRAW_PX))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise AtlasError(f"{where}: object {spec!r} is neither shape:KIND:COLOUR nor an existing image file",
                         "give a path (relative to the working folder) or e.g. shape:circle:red")
    from ..decompose import load_image
    if key:
        rgb = np.asarray(load_image(path), dtype=np.int16)
        dist = np.abs(rgb - np.asarray(_colour(key, where), np.int16)).max(axis=2)
        alpha = np.where(dist <= 24, 0, 255).astype(np.uint8)
        obj = Image.fromarray(np.dstack([rgb.astype(np.uint8), alpha]), "RGBA")
    else:
        try:
            with Image.open(path) as im:
                obj = im.convert("RGBA")
        except OSError as e:
            raise AtlasError(f"{where}: cannot read {path}: {e}", "use a PNG/WebP with transparency") from None
    return _crop_to_alpha(obj)


def make_background(spec: str, canvas: int, where: str = "probe") -> Image.Image:
    path = Path(spec).expanduser()
    if spec and not spec.startswith("#") and path.is_file():
        from ..decompose import load_image
        from ..model import pil_to_array
        return Image.fromarray(pil_to_array(load_image(path), canvas, "center"))
    return Image.new("RGB", (canvas, canvas), _colour(spec or "#f0f0f0", where))


def scale_object(obj: Image.Image, size: int) -> Image.Image:
    """Scale so the longest side is `size` px."""
    w, h = obj.size
    scale = size / max(w, h)
    return obj.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)


def cut_object(obj: Image.Image, cut: str) -> Image.Image:
    """'sliced': three vertical slices pulled apart and staggered; 'half': the left half only."""
    if not cut:
        return obj
    w, h = obj.size
    if cut == "half":
        return obj.crop((0, 0, w // 2, h))
    assert cut == "sliced", f"unknown cut {cut!r}"
    n = 3
    gap = max(2, w // 10)
    edges = [round(i * w / n) for i in range(n + 1)]
    shift = max(1, h // 12)
    out = Image.new("RGBA", (w + gap * (n - 1), h + shift), (0, 0, 0, 0))
    for i in range(n):
        piece = obj.crop((edges[i], 0, edges[i + 1], h))
        out.paste(piece, (edges[i] + i * gap, shift if i % 2 else 0), piece)
    return _crop_to_alpha(out)


def paste_centred(background: Image.Image, obj: Image.Image, centre: tuple[float, float] | None = None) -> Image.Image:
    out = background.copy()
    cx, cy = centre if centre else (out.width / 2, out.height / 2)
    out.paste(obj, (int(round(cx - obj.width / 2)), int(round(cy - obj.height / 2))), obj)
    return out


def count_layout(n: int, size: int, canvas: int, gap: int) -> list[tuple[int, int, int, int]]:
    """Boxes (x0, y0, x1, y1) of `n` objects on a centred grid (rows filled left to right, the last row
    centred); deterministic and never overlapping. Raises if the grid does not fit the canvas."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pitch = size + gap
    if cols * size + (cols - 1) * gap > canvas or rows * size + (rows - 1) * gap > canvas:
        raise AtlasError(f"{n} objects of {size} px (gap {gap}) do not fit a {canvas} px canvas",
                         "lower size, gap or the largest count, or raise probe.canvas")
    top = (canvas - (rows * size + (rows - 1) * gap)) // 2
    boxes = []
    for r in range(rows):
        in_row = min(cols, n - r * cols)
        left = (canvas - (in_row * size + (in_row - 1) * gap)) // 2
        for c in range(in_row):
            x0, y0 = left + c * pitch, top + r * pitch
            boxes.append((x0, y0, x0 + size, y0 + size))
    return boxes


# --- sweep parsing ---------------------------------------------------------------------------------
def _int_list(value, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and v > 0 for v in value):
        raise AtlasError(f"{where} must be a non-empty list of positive integers", "e.g. sizes = [112, 64, 32, 16]")
    return value


def parse_sweep(raw: dict, cfg: ProbeConfig, n_features: int | None = None) -> tuple[Sweep, dict]:
    """Validate one [[probe.sweeps]] table and build its pictures. Returns the sweep and its resolved spec."""
    if not isinstance(raw, dict):
        raise AtlasError("each [[probe.sweeps]] entry must be a table", "see README 'Probes'")
    name = str(raw.get("name", ""))
    where = f"[[probe.sweeps]] {name or '(unnamed)'}"
    if not _NAME_RE.match(name):
        raise AtlasError(f"{where}: name must be letters, digits, - or _", 'e.g. name = "circle-size"')
    kind = raw.get("kind")
    if kind not in KINDS:
        raise AtlasError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}", 'e.g. kind = "size"')
    known = {"name", "kind", "title", "object", "key", "background", "features", "canvas", "sizes", "min_size",
             "max_size", "n_steps", "size", "counts", "max_count", "gap", "items"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise AtlasError(f"{where}: unknown option(s) {', '.join(unknown)}", f"known: {', '.join(sorted(known))}")
    canvas = int(raw.get("canvas", cfg.canvas))
    features = raw.get("features", [])
    if not isinstance(features, list) or not all(isinstance(f, int) and f >= 0 for f in features):
        raise AtlasError(f"{where}: features must be a list of feature ids", "e.g. features = [12, 40]")
    if n_features is not None and any(f >= n_features for f in features):
        raise AtlasError(f"{where}: feature ids must be below {n_features} (the SAE's size)", "fix features = [...]")
    background = make_background(str(raw.get("background", "#f0f0f0")), canvas, where)
    sweep = Sweep(name, kind, str(raw.get("title", name.replace("-", " ").replace("_", " "))), list(features))

    def obj_from(spec_raw: dict) -> Image.Image:
        spec = spec_raw.get("object", raw.get("object"))
        if not spec:
            raise AtlasError(f"{where}: no object given", 'e.g. object = "shape:circle:red" or a PNG path')
        return load_object(str(spec), str(spec_raw.get("key", raw.get("key", ""))), where)

    if kind == "size":
        if "sizes" in raw:
            sizes = _int_list(raw["sizes"], f"{where}: sizes")
        else:
            hi, lo = int(raw.get("max_size", canvas)), int(raw.get("min_size", max(8, canvas // 14)))
            n = int(raw.get("n_steps", 12))
            sizes = sorted({int(round(v)) for v in np.geomspace(hi, lo, max(2, n))}, reverse=True)
        if max(sizes) > canvas:
            raise AtlasError(f"{where}: size {max(sizes)} px is larger than the {canvas} px canvas",
                             "lower sizes or raise canvas")
        obj = obj_from(raw)
        for s in sizes:
            sweep.steps.append(Step(float(s), f"{s}px", paste_centred(background, scale_object(obj, s))))
    elif kind == "count":
        size = int(raw.get("size", canvas // 5))
        counts = _int_list(raw["counts"], f"{where}: counts") if "counts" in raw else \
            list(range(1, int(raw.get("max_count", 9)) + 1))
        gap = int(raw.get("gap", max(2, size // 6)))
        obj = scale_object(obj_from(raw), size)
        for n in counts:
            img = background.copy()
            for x0, y0, x1, y1 in count_layout(n, size, canvas, gap):
                img = paste_centred(img, obj, ((x0 + x1) / 2, (y0 + y1) / 2))
            sweep.steps.append(Step(float(n), f"{n} object{'s' if n != 1 else ''}", img))
    else:
        items = raw.get("items")
        if not isinstance(items, list) or not items:
            raise AtlasError(f"{where}: a readout needs items = [{{name = ..., object = ...}}, ...]",
                             'e.g. items = [{name = "whole", object = "shape:circle:red"}]')
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not item.get("name"):
                raise AtlasError(f"{where}: item {i} needs a name", 'e.g. {name = "whole", object = "shape:circle:red"}')
            cut = str(item.get("cut", ""))
            if cut not in CUTS:
                raise AtlasError(f"{where}: cut {cut!r} is not one of sliced, half", 'e.g. cut = "sliced"')
            if "image" in item:
                from ..decompose import load_image
                from ..model import pil_to_array
                img = Image.fromarray(pil_to_array(load_image(Path(str(item["image"])).expanduser()), canvas, "center"))
            else:
                bg = make_background(str(item["background"]), canvas, where) if "background" in item else background
                size = int(item.get("size", round(canvas * 0.7)))
                img = paste_centred(bg, cut_object(scale_object(obj_from(item), size), cut))
            sweep.steps.append(Step(float(i), str(item["name"]), img))
    return sweep, raw


def parse_sweeps(cfg: ProbeConfig, n_features: int | None = None) -> list[Sweep]:
    sweeps = [parse_sweep(dict(raw), cfg, n_features)[0] for raw in cfg.sweeps]
    names = [s.name for s in sweeps]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise AtlasError(f"probe sweep name(s) used twice: {', '.join(dupes)}", "give every [[probe.sweeps]] its own name")
    return sweeps


# --- stage -----------------------------------------------------------------------------------------
def step_image_path(paths, sweep: str, step: int) -> Path:
    return paths.probes_dir / sweep / f"{step:03d}.webp"


def run(cfg: ProbeConfig, store) -> dict:
    from ..decompose import embed_pil, encode, load_store_model
    from ..sae import load_stage_sae
    sae, sae_run_id = load_stage_sae(store)
    sweeps = parse_sweeps(cfg, sae.n_features)
    if not sweeps:
        say("probe: no [[probe.sweeps]] in the config, nothing to do")
        return {"n_sweeps": 0, "n_steps": 0, "n_rows": 0}
    model = load_store_model(store, cfg.device)
    cols: dict[str, list] = {k: [] for k in ("probe", "step", "step_value", "step_label", "image_path",
                                             "feature_id", "value")}
    chosen = {}
    n_steps = 0
    for sweep in bar(sweeps, desc="probe sweeps", unit="sweep"):
        images = [s.image for s in sweep.steps]
        acts_sf = encode(sae, embed_pil(model, images), top_k=None)
        for i, st in enumerate(sweep.steps):
            path = step_image_path(store.paths, sweep.name, i)
            with atomic_path(path) as tmp:
                # Lossless, so the saved picture is exactly what the model saw.
                st.image.save(tmp, "WEBP", lossless=True, quality=80, method=4)
            ids = np.flatnonzero(acts_sf[i] > 0)
            n = len(ids)
            cols["probe"] += [sweep.name] * n
            cols["step"] += [i] * n
            cols["step_value"] += [st.value] * n
            cols["step_label"] += [st.label] * n
            cols["image_path"] += [str(path.relative_to(store.paths.out_dir))] * n
            cols["feature_id"] += ids.tolist()
            cols["value"] += acts_sf[i, ids].tolist()
        chosen[sweep.name] = sweep.features or top_features(acts_sf, cfg.n_auto_features)
        n_steps += len(sweep.steps)
    import pyarrow as pa
    store.replace_probes({
        "probe": cols["probe"], "step": pa.array(cols["step"], pa.int32()),
        "step_value": pa.array(cols["step_value"], pa.float64()), "step_label": cols["step_label"],
        "image_path": cols["image_path"], "feature_id": pa.array(cols["feature_id"], pa.int32()),
        "value": pa.array(cols["value"], pa.float32())})
    return {"sae_run_id": sae_run_id, "n_sweeps": len(sweeps), "n_steps": n_steps, "n_rows": len(cols["probe"]), "features": chosen}


def top_features(acts_sf: np.ndarray, n: int) -> list[int]:
    """The `n` features with the largest max activation over the sweep's steps (ties: lower id)."""
    peak_f = acts_sf.max(axis=0)
    order = np.lexsort((np.arange(len(peak_f)), -peak_f))
    return [int(f) for f in order[:n] if peak_f[f] > 0]


# --- site --------------------------------------------------------------------------------------------
def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * exp >= v:
            return m * exp
    return 10 * exp


def line_chart_svg(sweep_name: str, labels: list[str], series: list[dict], width: int = 640, height: int = 260
                   ) -> tuple[Markup, list[float]]:
    """Inline SVG line chart: one line per feature along the sweep's steps, plus a step marker that
    probes.js moves. Returns the SVG and the x position of every step (for the marker)."""
    ml, mr, mt, mb = 48, 36, 12, 44
    n = len(labels)
    y_max = _nice_max(max([max(s["values"]) for s in series] + [0.0]))
    xs = [ml + (width - ml - mr) * (i / (n - 1) if n > 1 else 0.5) for i in range(n)]

    def y(v: float) -> float:
        return mt + (height - mt - mb) * (1 - v / y_max)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="probe-chart" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="feature activations along the {escape(sweep_name)} sweep">']
    for k in range(5):
        v = y_max * k / 4
        out.append(f'<line class="grid" x1="{ml}" x2="{width - mr}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{ml - 6}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="11" fill="#555">{v:.3g}</text>')
    every = max(1, math.ceil(n / 9))
    for i, label in enumerate(labels):
        if i % every == 0 or i == n - 1:
            out.append(f'<text x="{xs[i]:.1f}" y="{height - mb + 16}" text-anchor="middle" font-size="11" '
                       f'fill="#555">{escape(label)}</text>')
    out.append(f'<line x1="{ml}" x2="{width - mr}" y1="{height - mb}" y2="{height - mb}" stroke="#888"/>')
    for s in series:
        pts = " ".join(f"{xs[i]:.1f},{y(v):.1f}" for i, v in enumerate(s["values"]))
        out.append(f'<polyline class="probe-line" data-feature="{s["feature_id"]}" points="{pts}" fill="none" '
                   f'stroke="{s["colour"]}" stroke-width="2"/>')
        for i, v in enumerate(s["values"]):
            out.append(f'<circle cx="{xs[i]:.1f}" cy="{y(v):.1f}" r="3" fill="{s["colour"]}"><title>feature '
                       f'{s["feature_id"]} at {escape(labels[i])}: {v:.3f}</title></circle>')
    out.append(f'<line class="probe-marker" x1="{xs[0]:.1f}" x2="{xs[0]:.1f}" y1="{mt}" y2="{height - mb}" '
               f'stroke="#222" stroke-width="1.5" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{(ml + width - mr) / 2}" y="{height - 6}" text-anchor="middle" font-size="12" '
               f'fill="#333">{escape(sweep_name)}</text>')
    out.append("</svg>")
    return Markup("".join(out)), xs


def bars_svg(sweep_name: str, labels: list[str], series: list[dict], width: int = 640) -> Markup:
    """Grouped horizontal bars: one group per readout item, one bar per feature."""
    bar_h, group_gap, ml, mr = 14, 14, 110, 60
    n_f = max(1, len(series))
    group_h = n_f * bar_h + group_gap
    height = len(labels) * group_h + 10
    v_max = _nice_max(max([max(s["values"]) for s in series] + [0.0]))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="probe-bars" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="feature activations for the {escape(sweep_name)} readout">']
    for i, label in enumerate(labels):
        top = 5 + i * group_h
        out.append(f'<text x="{ml - 8}" y="{top + n_f * bar_h / 2 + 4:.1f}" text-anchor="end" font-size="12" '
                   f'fill="#222">{escape(label)}</text>')
        for j, s in enumerate(series):
            v = s["values"][i]
            w = (width - ml - mr) * v / v_max
            yy = top + j * bar_h
            out.append(f'<rect class="probe-bar" x="{ml}" y="{yy}" width="{w:.1f}" height="{bar_h - 3}" '
                       f'fill="{s["colour"]}"><title>feature {s["feature_id"]}: {v:.3f}</title></rect>')
            out.append(f'<text x="{ml + w + 4:.1f}" y="{yy + bar_h - 4}" font-size="10" fill="#333">'
                       f'{s["feature_id"]}: {v:.3f}</text>')
    out.append("</svg>")
    return Markup("".join(out))


def site_pages(store, site_dir: Path) -> list[tuple[str, str, dict]]:
    """Copy probe pictures into the site and return the probes page (template, output path, context)."""
    from ..decompose import feature_labels
    rows = store.query("SELECT config_json, summary_json FROM stage_runs WHERE stage = 'probe' AND status = 'done'")
    row = rows[0] if rows else None
    if row is None:
        return []
    cfg = json.loads(row[0] or "{}")
    summary = json.loads(row[1] or "{}")
    named = {s["name"]: s for s in cfg.get("sweeps", [])}
    chosen_by_sweep = summary.get("features", {})
    site_dir = Path(site_dir)
    rows = store.query("SELECT probe, step, any_value(step_value), any_value(step_label), any_value(image_path) "
                       "FROM probes GROUP BY probe, step ORDER BY probe, step")
    steps_by_sweep: dict[str, list] = {}
    for probe, step, value, label, image_path in rows:
        steps_by_sweep.setdefault(probe, []).append((step, value, label, image_path))
    sweeps = []
    order = [n for n in named if n in steps_by_sweep] + sorted(set(steps_by_sweep) - set(named))
    for name in order:
        spec = named.get(name, {})
        steps = steps_by_sweep[name]
        n_auto = int(cfg.get("n_auto_features", 4))
        feature_ids = spec.get("features") or chosen_by_sweep.get(name) or [
            int(r[0]) for r in store.query("SELECT feature_id FROM probes WHERE probe = ? GROUP BY feature_id "
                                           "ORDER BY max(value) DESC, feature_id LIMIT ?", [name, n_auto])]
        values = {(int(f), int(s)): float(v) for f, s, v in store.query(
            "SELECT feature_id, step, value FROM probes WHERE probe = ?", [name])}
        labels_by_feature = feature_labels(store, [int(f) for f in feature_ids])
        series = [{"feature_id": int(f), "label": labels_by_feature.get(int(f)) or "",
                   "colour": PALETTE[k % len(PALETTE)], "href": f"features/{int(f)}.html",
                   "values": [values.get((int(f), s[0]), 0.0) for s in steps]} for k, f in enumerate(feature_ids)]
        srcs = []
        for step, _, _, image_path in steps:
            src_path = store.paths.out_dir / image_path
            rel = Path("probes") / name / Path(image_path).name
            (site_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            if src_path.exists():
                shutil.copyfile(src_path, site_dir / rel)
            srcs.append(rel.as_posix())
        step_labels = [s[2] or "" for s in steps]
        kind = spec.get("kind", "size")
        entry = {"name": name, "kind": kind, "title": spec.get("title") or name.replace("-", " ").replace("_", " "),
                 "features": series, "steps": [{"label": l, "src": src} for l, src in zip(step_labels, srcs)],
                 "srcs_json": json.dumps(srcs), "labels_json": json.dumps(step_labels),
                 "values_json": json.dumps([[round(s["values"][i], 4) for s in series] for i in range(len(steps))])}
        if kind == "readout":
            entry["chart"] = bars_svg(entry["title"], step_labels, series)
            entry["xs_json"] = "[]"
        else:
            entry["chart"], xs = line_chart_svg(entry["title"], step_labels, series)
            entry["xs_json"] = json.dumps([round(x, 1) for x in xs])
        sweeps.append(entry)
    # A finished probe stage without sweeps still gets its page, which says how to add some.
    return [("probes.html", "probes.html", {"page_title": "Probes", "sweeps": sweeps})]


SPEC = Stage("probe", ProbeConfig, run, inputs=("encode",), tables=("probes",), folders=("probes_dir",),
             pages=("probes.html",))
