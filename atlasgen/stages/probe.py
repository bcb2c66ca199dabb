"""Probe sweeps: controlled pictures (one object shrinking, an object multiplying, named readouts such
as whole vs sliced) run through the store's model and SAE *without* the top-k cap, so every non-zero
feature activation is recorded in `probes`.

Sweeps are TOML tables under `[[probe.sweeps]]` (schema in docs/PIPELINE.md "Probes" and `parse_sweep`):

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

import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor

from ..config import ProbeConfig
from ..errors import AtlasError
from ..paths import atomic_path
from ..progress import bar, say
from .base import Stage

KINDS = ("size", "count", "readout")
CUTS = ("", "sliced", "half")
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


@functools.lru_cache(maxsize=32)
def _drawn_shape(kind: str, rgb: tuple[int, int, int]) -> Image.Image:
    """A drawn shape, cropped; kept, as every config load parses the sweeps (drawing one at 4× supersampling
    takes ~0.1 s, and the tiny preset's sweeps use the same circle five times). Callers get copies."""
    from ..tinyset import draw_object
    return _crop_to_alpha(draw_object(kind, rgb, _DRAW_PX))


def load_object(spec: str, key: str = "", where: str = "probe") -> Image.Image:
    """An RGBA object cropped to its visible box: `shape:KIND:COLOUR` (drawn by tinyset) or an image file."""
    if spec.startswith("shape:"):
        from ..tinyset import OBJECT_KINDS
        parts = spec.split(":", 2)
        if len(parts) != 3 or parts[1] not in OBJECT_KINDS:
            raise AtlasError(f"{where}: object {spec!r} is not shape:KIND:COLOUR",
                             f"KIND is one of {', '.join(OBJECT_KINDS)}; e.g. shape:circle:red")
        return _drawn_shape(parts[1], _colour(parts[2], where)).copy()
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
        raise AtlasError("each [[probe.sweeps]] entry must be a table", "see docs/PIPELINE.md 'Probes'")
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


SPEC = Stage("probe", ProbeConfig, run, inputs=("encode",), tables=("probes",), folders=("probes_dir",),
             pages=("probes.html",))
