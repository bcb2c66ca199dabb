"""Ingest: images from a folder, a Hugging Face dataset or the generated tiny set → `images` table and
normalised RGB JPEG copies in `corpus/`.

Every input is decoded by us (PIL): EXIF orientation applied, every mode converted to RGB sensibly,
the original (rotated) size recorded, the shorter side brought down to `corpus_side` (never up). Bad
inputs are recorded in `skipped_inputs` and never stop the build. Image ids are 0..n-1 in sorted
source order, so the same corpus always gets the same ids.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import io
import itertools
import json
import os
import re
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .. import hub, resample, tinyset
from ..config import IngestConfig
from ..errors import AtlasError, DataLoadError
from ..paths import corpus_rel
from ..progress import bar, say
from ..store import Store, arrow_column
from ..workers import WorkerPool, ordered_map, resolve_n_workers
from .base import Stage

STAGE = "ingest"
JPEG_QUALITY = 92
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico"}
# OS clutter that is never an input and never worth a "skipped" line.
IGNORED_NAMES = {"thumbs.db", "desktop.ini", "__macosx"}


class SkipInput(Exception):
    """An input that is not a usable image; the message is the reason recorded in skipped_inputs."""


@dataclass(frozen=True)
class Candidate:
    source: str                      # what skipped_inputs/images.source record
    label: str | None
    read: Callable[[], bytes] | str | Path  # a file path, or a function returning the encoded bytes


@dataclass(frozen=True)
class Decoded:
    width: int                       # original size after EXIF rotation
    height: int
    jpeg: bytes                      # the normalised corpus copy


# --- decoding ------------------------------------------------------------------------------------
def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB: alpha composited on white, 16-bit/float greyscale scaled to 8 bit."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_greyscale_to_uint8(np.asarray(image), mode)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "1":
        return image.convert("L").convert("RGB")
    return image.convert("RGB")  # L, CMYK, YCbCr, LAB, HSV


def _greyscale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    arr = arr.astype(np.float64)
    if mode.startswith("I;16"):
        scaled = arr / 257.0  # 0..65535 → 0..255
    elif mode == "I":
        # 16-bit PNGs used to open as "I": scale by the range the values actually use.
        hi = float(arr.max()) if arr.size else 0.0
        scaled = arr if hi <= 255 else arr / 257.0 if hi <= 65535 else (arr - arr.min()) / max(hi - arr.min(), 1) * 255
    else:  # "F": [0, 1] floats, or anything else stretched to its own range
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo >= 0 and hi <= 1:
            scaled = arr * 255.0
        elif lo >= 0 and hi <= 255:
            scaled = arr
        else:
            scaled = (arr - lo) / max(hi - lo, 1e-12) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


@contextlib.contextmanager
def pixel_limit(max_pixels: int):
    """Pillow refuses pictures over 2 × Image.MAX_IMAGE_PIXELS inside Image.open, before our own check against
    `max_pixels` (the one that counts): raise Pillow's limit to ours meanwhile."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(max_pixels, pil_limit or 0)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


def too_many_pixels(n_pixels: int | None, max_pixels: int, size: tuple[int, int] | None = None) -> str:
    """The one skip reason for an oversized image (ours and Pillow's DecompressionBombError alike)."""
    what = (f"{size[0]}×{size[1]} = " if size else "") + (f"{n_pixels:,} pixels" if n_pixels else "the image")
    return (f"decompression bomb: {what} is more than ingest.max_pixels = {max_pixels:,} (raise ingest.max_pixels "
            "to accept it)")


def decode_image(data: bytes | Path, max_pixels: int, corpus_side: int, fast_resize: bool = False) -> Decoded:
    """Decode one input into a normalised JPEG, or raise SkipInput with the reason. `fast_resize`: shrink with
    `resample.bicubic` (the same bytes; only after `resample.prepare()` succeeded in this process or its parent)."""
    rgb, width, height = decode_rgb(data, max_pixels, corpus_side, fast_resize=fast_resize)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=JPEG_QUALITY)
    return Decoded(width, height, buf.getvalue())


def decode_rgb(data: bytes | Path, max_pixels: int, corpus_side: int,
               small_draft_side: int | None = None, fast_resize: bool = False) -> tuple[Image.Image, int, int]:
    """Decode one input into (RGB picture with shorter side ≤ corpus_side, width, height after EXIF
    rotation), or raise SkipInput with the reason. `small_draft_side`: a JPEG that is already corpus-sized
    is drafted at this side instead (what the embed stage does when it reads a corpus copy)."""
    if isinstance(data, Path):
        try:
            if data.stat().st_size == 0:
                raise SkipInput("empty file (0 bytes)")
            data = data.read_bytes()
        except OSError as e:
            raise SkipInput(f"cannot read the file: {e.strerror or e}") from None
    if len(data) == 0:
        raise SkipInput("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # We check the pixel count ourselves against max_pixels, right below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise SkipInput(too_many_pixels(width * height, max_pixels, (width, height)))
            if image.format == "JPEG":
                # Decode big JPEGs at a reduced scale straight away (DCT scaling): much faster, same result.
                small = small_draft_side and min(width, height) <= corpus_side
                side = small_draft_side if small else corpus_side
                image.draft("RGB" if image.mode == "RGB" else None, (side, side))
            image.load()
    except SkipInput:
        raise
    except Image.DecompressionBombError as e:
        # Pillow refuses images over 2 × Image.MAX_IMAGE_PIXELS inside Image.open, before our check.
        found = re.search(r"\(([0-9]+) pixels\)", str(e))
        raise SkipInput(too_many_pixels(int(found.group(1)) if found else None, max_pixels)) from None
    except UnidentifiedImageError:
        raise SkipInput("not an image (the file's format is not one PIL can identify)") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... for broken files
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        kind = "truncated" if "truncated" in text.lower() else "corrupt"
        raise SkipInput(f"{kind} image: {text}") from None
    try:
        orientation = image.getexif().get(0x0112, 1)
        ImageOps.exif_transpose(image, in_place=True)
        if orientation in (5, 6, 7, 8):  # quarter turns: the recorded size is the rotated one
            width, height = height, width
    except Exception:  # a broken EXIF block must not cost us an otherwise good picture
        pass
    try:
        rgb = to_rgb(image)
    except (OSError, ValueError) as e:
        raise SkipInput(f"cannot convert mode {image.mode} to RGB: {e}") from None
    w, h = rgb.size
    short = min(w, h)
    if short > corpus_side:
        scale = corpus_side / short
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if fast_resize and resample.applies(w, h, *size):
            rgb = resample.bicubic(rgb, size)
        else:
            rgb = rgb.resize(size, Image.BICUBIC, reducing_gap=3.0)
    return rgb, width, height


# --- sources -------------------------------------------------------------------------------------
def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_NAMES


def _suffix(rel: str) -> str:
    """Path(rel).suffix without building the Path."""
    name = rel.rsplit("/", 1)[-1]
    i = name.rfind(".")
    return name[i:] if 0 < i < len(name) - 1 else ""


def _walk_files(folder: Path, skip: Path | None = None) -> list[str]:
    """Every non-hidden file below `folder` as a posix path relative to it, in the order of its path's parts
    (what sorting the Paths gave; image ids follow it). Hidden folders are not entered, nor `skip` (the output
    folder, when it lies inside the image folder), nor links to folders. Strings, not Paths: a million-image
    folder is listed in seconds, not minutes. Each folder's entries are sorted by name and a subfolder is
    listed where its name falls, which gives that order without holding every path's parts for one global
    sort (that took ~1.5 KB per file at its peak)."""
    out: list[str] = []
    skip_name = skip.name if skip is not None else None
    # A stack of (this folder's remaining entries, their prefix), walked depth first.
    stack = [(iter(_sorted_entries(os.fspath(folder))), "")]
    while stack:
        entries, prefix = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        if _is_ignored(entry.name):
            continue
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        if not is_dir:
            out.append(prefix + entry.name)
        elif not entry.is_symlink() and not (entry.name == skip_name and Path(entry.path) == skip):
            stack.append((iter(_sorted_entries(entry.path)), prefix + entry.name + "/"))
    return out


def _sorted_entries(path: str) -> list[os.DirEntry]:
    """A folder's entries by name; none for a folder that cannot be read (as os.walk skips it)."""
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda entry: entry.name)
    except OSError:
        return []


def folder_candidates(folder: Path, cfg: IngestConfig, source_name: Callable[[str], str] | None = None,
                      out_dir: Path | None = None) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """(candidates, early skips) for a flat folder, a class-subfolder folder or ImageNet-val + labels_file. Each
    candidate reads its file by path, a string (`source_name(path)` gives its source; default the path itself):
    with a Path per file, listing 50,000 files took 0.93–1.36 s on our CPU box, with strings 0.37–0.52 s.
    `out_dir`: the output folder, never listed when it lies inside `folder` (its store, corpus copies, renders
    and site are atlasgen's outputs, not inputs)."""
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DataLoadError(f"image folder {folder} {what}",
                            "pass --images FOLDER (or set ingest.source = \"folder:PATH\"), or try --preset tiny")
    check_not_output_folder(folder, out_dir)
    name = source_name or (lambda path: path)
    own_files = {Path(f).resolve() for f in (cfg.labels_file, cfg.label_names_file) if f}
    prefix = os.path.join(os.fspath(folder), "")  # the folder with one separator after it
    skipped: list[tuple[str, str]] = []
    images: list[str] = []  # paths relative to the folder, posix
    skip = None
    if out_dir is not None:
        out_dir, real_folder = Path(out_dir).resolve(), folder.resolve()
        if out_dir != real_folder and out_dir.is_relative_to(real_folder):
            skip = Path(folder, out_dir.relative_to(real_folder))  # spelt as the walk spells its folders
    for rel in _walk_files(folder, skip):
        suffix = _suffix(rel)
        if suffix.lower() in IMAGE_EXTENSIONS:
            images.append(rel)
        # Our own label files are never inputs; only a file that is not an image could be one, so only those
        # are resolved (a resolve per image would cost more than the listing).
        elif not (own_files and Path(folder, rel).resolve() in own_files):
            skipped.append((name(_joined(prefix, rel)), f"not an image file (extension {suffix or 'none'})"))
    names = read_label_names(Path(cfg.label_names_file)) if cfg.label_names_file else {}
    if cfg.labels_file:
        labels = _labels_from_file(Path(cfg.labels_file), [rel for rel in images if "/" not in rel])
        rows = [(rel, labels.get(rel)) for rel in images]
    else:
        rows = [(rel, rel.split("/", 1)[0] if "/" in rel else None) for rel in images]
    candidates = []
    for rel, label in rows:
        path = _joined(prefix, rel)
        candidates.append(Candidate(name(path), names.get(label, label) if label is not None else None, path))
    return candidates, skipped


def check_not_output_folder(folder: Path, out_dir: Path | None) -> None:
    """Refuse an output folder that is the image folder itself: every later ingest would read the store,
    corpus copies, thumbnails and renders back as inputs (an output folder inside it is fine: it is not listed)."""
    if out_dir is not None and Path(out_dir).resolve() == folder.resolve():
        raise DataLoadError(f"the output folder {out_dir} is the image folder, so atlasgen's outputs would be read "
                            "back as images",
                            f"pass another --out, outside the images or inside them (e.g. --out {Path(folder, 'build')})")


def _joined(prefix: str, rel: str) -> str:
    """str(Path(folder, rel)) for a posix `rel` and the folder's `prefix` (`os.path.join(folder, "")`)."""
    return prefix + (rel if os.sep == "/" else rel.replace("/", os.sep))


def _labels_from_file(labels_path: Path, flat_images: list[str]) -> dict[str, str]:
    """ImageNet-val labels for the file names directly in the folder: one label per line in sorted file order,
    or CSV rows `filename,label` (the label may be a space-separated prediction string; its first token is used;
    the file name may leave out the extension)."""
    if not labels_path.is_file():
        raise DataLoadError(f"ingest.labels_file {labels_path} does not exist", "fix the path in your --config")
    lines = [ln.strip() for ln in labels_path.read_text(encoding="utf-8", errors="replace").splitlines()]
    lines = [ln for ln in lines if ln]
    if lines and "," in lines[0]:
        by_name: dict[str, str] = {}
        for row in csv.reader(lines):
            if len(row) < 2 or not row[1].strip():
                continue
            by_name[row[0].strip()] = row[1].strip().split()[0]
        out = {}
        for file_name in flat_images:
            suffix = _suffix(file_name)
            label = by_name.get(file_name, by_name.get(file_name[:len(file_name) - len(suffix)]))
            if label is not None:
                out[file_name] = label
        if not out:
            raise DataLoadError(f"no file name in {labels_path} matches an image in the folder",
                                "the CSV needs rows 'filename,label' naming the images (with or without extension)")
        return out
    if len(lines) != len(flat_images):
        raise DataLoadError(f"{labels_path} has {len(lines)} labels but the folder has {len(flat_images)} images "
                            "directly inside it",
                            "one label per line, in sorted file-name order (the ImageNet val ground-truth file), "
                            "or use a CSV 'filename,label'")
    return dict(zip(flat_images, lines))


def read_label_names(path: Path) -> dict[str, str]:
    """Label id/wnid → readable name. Lines `n01440764 tench, Tinca tinca` (first name kept), or a JSON
    object such as ImageNet's class index {"0": ["n01440764", "tench"]} (both the index and the wnid map)."""
    if not path.is_file():
        raise DataLoadError(f"ingest.label_names_file {path} does not exist", "fix the path in your --config")
    text = path.read_text(encoding="utf-8", errors="replace")
    out: dict[str, str] = {}
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataLoadError(f"{path} is not valid JSON: {e}", "use lines 'id name' or a JSON object") from None
        for key, value in data.items():
            if isinstance(value, (list, tuple)) and value:
                out[str(key)] = str(value[-1])
                if len(value) > 1:
                    out[str(value[0])] = str(value[-1])
            else:
                out[str(key)] = str(value)
        return out
    for line in text.splitlines():
        parts = line.strip().replace("\t", " ").split(" ", 1)
        if len(parts) == 2 and parts[1].strip():
            out[parts[0]] = parts[1].split(",")[0].strip()
    return out


def hf_candidates(dataset: str, split: str, cfg: IngestConfig) -> Iterator[Candidate]:
    """Stream a Hugging Face dataset: the first Image column, the label from the first ClassLabel."""
    offline = _check_hub_reachable(dataset)
    try:
        import datasets
        # Offline, only the local cache can serve it, and streaming would go to the network.
        ds = datasets.load_dataset(dataset, cfg.hf_config or None, split=split, streaming=not offline)
        features = ds.features
        if features is None and hasattr(ds, "_resolve_features"):
            ds = ds._resolve_features()  # some streamed formats only know their features after a first row
            features = ds.features
        if features is None:
            raise DataLoadError(f"the dataset {dataset} does not declare its features (columns and types)",
                                "use a dataset with an Image column, or --images FOLDER")
    except AtlasError:
        raise
    except Exception as e:  # datasets raises many kinds (connection, missing config, missing split)
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataLoadError(f"could not load the Hugging Face dataset {dataset} (split {split}): {text}",
                            "check the name, split and ingest.hf_config; or use --images FOLDER, or --preset tiny"
                            ) from None
    image_col = next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
    if image_col is None:
        raise DataLoadError(f"the dataset {dataset} has no image column (features: {', '.join(features)})",
                            "pick a dataset with an Image feature, or use --images FOLDER")
    label_col = next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    names = list(features[label_col].names) if label_col else None
    # Raw bytes: we decode (and skip bad images) ourselves instead of failing inside datasets.
    ds = ds.cast_column(image_col, datasets.Image(decode=False))
    for index, row in enumerate(ds):
        cell = row[image_col] or {}
        label = None
        if label_col is not None and row.get(label_col) is not None and row[label_col] >= 0:
            label = names[row[label_col]]
        yield Candidate(f"hf://{dataset}/{split}/{index}", label, _hf_reader(cell))


def _hf_reader(cell: dict) -> Callable[[], bytes]:
    def read() -> bytes:
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path") and Path(cell["path"]).is_file():
            return Path(cell["path"]).read_bytes()
        raise SkipInput("the dataset row has no image bytes")
    return read


def _check_hub_reachable(dataset: str) -> bool:
    """Fail fast, in one line, when the hub cannot be reached (instead of datasets' long retries).
    Returns True in offline mode with the dataset in the local cache."""
    if Path(dataset).expanduser().exists():
        return False  # a local dataset folder: datasets reads it without the hub
    hint = ("use --images FOLDER for local images, or --preset tiny for the built-in set; if the dataset is in "
            "your Hugging Face cache, set HF_HUB_OFFLINE=1")
    if hub.offline_mode("HF_DATASETS_OFFLINE"):
        if not _in_hf_cache(dataset):
            raise DataLoadError(f"could not fetch the Hugging Face dataset {dataset}: offline mode (HF_HUB_OFFLINE) "
                                "and it is not in the local cache", hint.rsplit(";", 1)[0])
        return True
    hub.probe("datasets", dataset, "dataset", DataLoadError, unreachable_hint=hint,
              missing_hint="check the name (e.g. frgfm/imagenette), or set HF_TOKEN for a private one",
              gated_hint="accept its terms on the hub and set HF_TOKEN")
    return False


def _in_hf_cache(dataset: str) -> bool:
    cache_roots = [Path(os.environ.get("HF_DATASETS_CACHE", Path.home() / ".cache" / "huggingface" / "datasets")),
                   Path(os.environ.get("HF_HUB_CACHE", Path.home() / ".cache" / "huggingface" / "hub"))]
    slug = dataset.replace("/", "___")
    hub_slug = "datasets--" + dataset.replace("/", "--")
    return any((root / slug).exists() or (root / hub_slug).exists() for root in cache_roots)


def parse_source(source: str) -> tuple[str, str]:
    """"tiny" | "folder:PATH" | "hf:DATASET[:SPLIT]" → (kind, rest)."""
    if source == "tiny":
        return "tiny", ""
    kind, sep, rest = source.partition(":")
    if sep and kind in ("folder", "hf") and rest:
        return kind, rest
    raise AtlasError(f"ingest.source {source!r} is not tiny, folder:PATH or hf:DATASET[:SPLIT]",
                     "use --images FOLDER, --dataset NAME[:SPLIT], or --preset tiny")


def candidates_for(cfg: IngestConfig, store: Store) -> tuple[Iterable[Candidate], list[tuple[str, str]], str]:
    """(candidates in id order, early skips, a description of the source)."""
    kind, rest = parse_source(cfg.source)
    if kind == "tiny":
        folder = tinyset.generate(store.paths.tiny_source_dir, cfg.n_tiny_images)
        out_dir = store.paths.out_dir
        cands, skipped = folder_candidates(folder, cfg, lambda path: Path(path).relative_to(out_dir).as_posix())
        return cands, skipped, f"the tiny generated set ({cfg.n_tiny_images} images)"
    if kind == "folder":
        folder = Path(rest).expanduser().resolve()
        cands, skipped = folder_candidates(folder, cfg, out_dir=store.paths.out_dir)
        return cands, skipped, f"folder {folder}"
    dataset, _, split = rest.partition(":")
    split = split or "train"
    return hf_candidates(dataset, split, cfg), [], f"Hugging Face dataset {dataset} ({split})"


# --- the stage -----------------------------------------------------------------------------------
JOURNAL_NAME = ".ingest-journal.jsonl"  # in corpus/: what an unfinished run has done (see _Journal)
INCOMING_NAME = ".incoming"             # in corpus/: copies written by the workers before they get their id
# In corpus/: written by a repair (a rerun over a committed images table) before it first puts a copy in place
# whose bytes differ from the copy it replaces (an edited input), so that the repair, resumed after an interrupt,
# still reports the change; deleted once the table is committed.
CHANGED_NAME = ".ingest-changed"
MAX_TASK_SIZE = 16                      # inputs per worker task
# Lost corpus copies a rerun writes again here, one by one, before the rest goes to the workers: the handful a
# deleted file or two leaves; many more (a deleted corpus) are faster redone in parallel from the first over this.
MAX_RESTORED_HERE = 256


def run(cfg: IngestConfig, store: Store) -> dict:
    assert cfg.corpus_side >= 16, f"ingest.corpus_side must be ≥ 16, got {cfg.corpus_side}"
    assert cfg.max_pixels > 0, f"ingest.max_pixels must be > 0, got {cfg.max_pixels}"
    t0 = time.perf_counter()
    candidates, skipped, description = candidates_for(cfg, store)
    timeline_s = {"listed": time.perf_counter() - t0}  # seconds from the start; a streamed dataset lists lazily
    say(f"ingest: reading {description}")
    total = len(candidates) if isinstance(candidates, list) else None
    if total is not None and cfg.limit:
        total = min(total, cfg.limit)
    if total == 0 and not skipped:
        raise DataLoadError(f"no images found in {description}",
                            "point --images at a folder of .jpg/.png files, or use --preset tiny")
    n_workers = resolve_n_workers(cfg.n_workers)
    if total is not None:
        n_workers = max(1, min(n_workers, total))  # a handful of images on a many-core machine forks fewer
    corpus_dir = store.paths.corpus_dir
    incoming_dir = corpus_dir / INCOMING_NAME
    shutil.rmtree(incoming_dir, ignore_errors=True)  # left by a killed run
    incoming_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {k: [] for k in ("image_id", "source", "label", "width", "height", "corpus_path")}
    if total is None:  # streamed: load it (where that fails, fail fast) before workers and kernels start
        stream = iter(candidates)
        candidates = itertools.chain(list(itertools.islice(stream, 1)), stream)
    # The resize kernels (atlasgen.resample): from the start if this process has them already, else loaded while
    # the workers start with Pillow, for what is left to decode if that is big enough to repay it.
    fast_resize = resample.ready()

    def at(event: str) -> Callable[[], None]:
        return lambda: timeline_s.setdefault(event, time.perf_counter() - t0)

    # A committed images table means this run repairs a finished ingest (the pipeline resets the stage first
    # when its config changed): the journal is then the finished run's record.
    committed = store.count("images") > 0
    changed_marker = corpus_dir / CHANGED_NAME
    n_changed = int(committed and changed_marker.exists())  # an interrupted repair's change (see CHANGED_NAME)

    def restore(cand: Candidate, image_id: int, width: int, height: int) -> bool:
        return _restore_copy(cand, store.paths.corpus_image(image_id), incoming_dir, cfg, fast_resize, width, height)

    try:
        # The pixel limit is set before the workers fork, so they inherit it.
        with pixel_limit(cfg.max_pixels), _Journal(corpus_dir / JOURNAL_NAME) as journal, \
                bar(total=total, desc="ingest", unit="img") as progress:
            rest = journal.resume(iter(candidates), rows, skipped, store, progress, cfg.limit, restore, committed)
            first = None if cfg.limit and len(rows["image_id"]) >= cfg.limit else next(rest, None)
            if first is None:  # a repair or resume that left nothing to decode starts no workers, no kernels
                n_workers = 0
            else:
                n_left = None if total is None else max(1, total - journal.next_index)  # (total: capped by limit)
                if n_left is not None:
                    n_workers = max(1, min(n_workers, n_left))
                load_kernels = not fast_resize and resample.worth_loading(n_left, n_workers)
                fast_resize, n_new_bytes = _read_all(
                    itertools.chain([first], rest), cfg, rows, skipped, store, journal, progress, n_workers, n_left,
                    fast_resize, load_kernels, on_first=at("first_result"), on_kernels=at("kernels_ready"),
                    changed_marker=changed_marker if committed else None)
                n_changed += n_new_bytes
            n_resumed, n_restored, stale_ids = journal.n_resumed, journal.n_restored, journal.max_image_id
    finally:  # copies the workers wrote but this process had not put in place (an interrupt, an error)
        shutil.rmtree(incoming_dir, ignore_errors=True)
    timeline_s["read"] = time.perf_counter() - t0
    n_labels = commit_images(store, rows, skipped)
    n_images = len(rows["image_id"])
    # Committed. The journal stays, the record of what made each copy, so that restoring a lost copy later reads
    # that one input again, not all of them. Copies an earlier, longer run left beyond the last id go.
    changed_marker.unlink(missing_ok=True)
    for image_id in range(n_images, stale_ids + 1):
        store.paths.corpus_image(image_id).unlink(missing_ok=True)
    if n_images == 0:
        raise DataLoadError(f"none of the {len(skipped)} inputs in {description} could be read",
                            f"see: atlasgen query \"SELECT * FROM skipped_inputs\" --out {store.paths.out_dir}; "
                            "or use --preset tiny")
    for source, reason in skipped[:5]:
        say(f"ingest: skipped {source}: {reason}")
    if len(skipped) > 5:
        say(f"ingest: ... and {len(skipped) - 5} more skipped inputs")
    timeline_s["done"] = time.perf_counter() - t0
    return {"n_images": n_images, "n_skipped": len(skipped), "n_labels": n_labels, "source": cfg.source,
            "n_resumed": n_resumed, "n_restored": n_restored, "n_workers": n_workers, "fast_resize": fast_resize,
            # A repair's copies whose bytes changed, or that it could not compare (their old copy was lost and
            # their input not journalled): the pipeline then counts ingest as changed, whatever its table says.
            **({"n_files_changed": n_changed} if committed else {}),
            "timeline_s": {k: round(v, 3) for k, v in timeline_s.items()}}


def commit_images(store: Store, rows: dict[str, list], skipped: list[tuple[str, str]]) -> int:
    """Number the labels and write every accepted image and every skipped input, in one transaction; returns
    the number of labels."""
    import pyarrow as pa
    # Labels are numbered in sorted name order (for a Hugging Face dataset too, so ids never depend on it).
    label_ids = {name: i for i, name in enumerate(sorted({l for l in rows["label"] if l is not None}))}
    rows["label_id"] = [label_ids[l] if l is not None else None for l in rows["label"]]
    types = {"image_id": pa.int32(), "source": pa.string(), "label": pa.string(), "label_id": pa.int32(),
             "width": pa.int32(), "height": pa.int32(), "corpus_path": pa.string()}
    store.replace_images({name: arrow_column(rows[name], arrow_type) for name, arrow_type in types.items()},
                         skipped, STAGE)
    return len(label_ids)


def _read_all(candidates: Iterator[Candidate], cfg: IngestConfig, rows: dict[str, list],
              skipped: list[tuple[str, str]], store: Store, journal: "_Journal", progress, n_workers: int,
              total: int | None, fast_resize: bool = False, load_kernels: bool = False,
              on_first: Callable[[], object] = lambda: None, on_kernels: Callable[[], object] = lambda: None,
              changed_marker: Path | None = None) -> tuple[bool, int]:
    """Decode and write corpus copies in worker processes, tasks of a few inputs each and a bounded number in
    flight; here, in input order, give each accepted copy its id (a rename), collect the table rows and
    journal what was done. `fast_resize`: the workers resize with the kernels (see `decode_image`);
    `load_kernels`: prepare them in a thread meanwhile and swap in workers that use them once they are ready.
    `on_first()` when the first task's results are in, `on_kernels()` when the kernels are ready.
    `changed_marker`: in a repair, each copy is compared with the one it replaces, and this file is written
    before the first that differs (or had none to compare with). Returns (whether workers used the kernels, the
    number of such copies)."""
    incoming_dir = store.paths.corpus_dir / INCOMING_NAME
    # Plain strings in the per-image loop: this process does it for every image while the workers decode.
    incoming_prefix, out_prefix = os.fspath(incoming_dir) + os.sep, os.fspath(store.paths.out_dir) + os.sep
    task_size = MAX_TASK_SIZE if total is None else max(1, min(MAX_TASK_SIZE, total // (4 * n_workers)))

    def work(fast: bool) -> Callable:
        return functools.partial(_decode_task, incoming_dir=str(incoming_dir), max_pixels=cfg.max_pixels,
                                 corpus_side=cfg.corpus_side, fast_resize=fast)

    preparing = None  # resample.prepare() in a thread, until its answer is taken
    why_not = None
    n_changed = 0
    try:
        with WorkerPool(work(fast_resize), n_workers, "ingest") as pool:
            if load_kernels:  # started after the fork, so no worker inherits a half-done import
                executor = ThreadPoolExecutor(1, thread_name_prefix="atlasgen-resize-kernels")
                preparing = executor.submit(resample.prepare)
                executor.shutdown(wait=False)  # its one thread ends with the task
            for metas, results in ordered_map(pool, _tasks(candidates, journal.next_index, task_size),
                                              window=4 * n_workers):
                on_first()
                if preparing is not None and preparing.done():
                    on_kernels()
                    why_not, preparing = preparing.result(), None
                    if why_not is None:
                        pool.swap(work(True))  # the tasks already handed out finish with Pillow
                        fast_resize = True
                lines = []
                for cand, (index, width, height, stat, reason) in zip(metas, results):
                    if reason is not None:
                        skipped.append((cand.source, reason))
                        lines.append(_Journal.line(index, cand.source, stat, None, 0, 0, reason))
                    else:
                        image_id = len(rows["image_id"])
                        corpus_path = _add_image_row(rows, image_id, cand, width, height)
                        copy_path = out_prefix + corpus_path
                        if changed_marker is not None and not _same_bytes(f"{incoming_prefix}{index}.jpg", copy_path):
                            n_changed += 1
                            if n_changed == 1:
                                changed_marker.touch()
                        os.replace(f"{incoming_prefix}{index}.jpg", copy_path)  # a failure ends the run
                        lines.append(_Journal.line(index, cand.source, stat, image_id, width, height, None))
                    if cfg.limit and len(rows["image_id"]) >= cfg.limit:
                        break
                progress.update(len(lines))
                journal.append(lines)
                if cfg.limit and len(rows["image_id"]) >= cfg.limit:
                    break
    finally:
        if preparing is not None:
            # The corpus was read before the kernels were ready. Wait for them rather than leave numba compiling
            # (a first compile ever: seconds, cached for the next run) while this process exits.
            why_not = preparing.result()
            on_kernels()
    if why_not is not None:
        say(f"ingest: resizing with Pillow alone ({why_not})")
    return fast_resize, n_changed


def _same_bytes(new_path: str, old_path: str) -> bool:
    """Whether the file at `old_path` exists and holds the same bytes as `new_path`."""
    try:
        with open(old_path, "rb") as f:
            old = f.read()
    except OSError:
        return False
    with open(new_path, "rb") as f:
        return f.read() == old


def _restore_copy(cand: Candidate, copy_path: Path, incoming_dir: Path, cfg: IngestConfig, fast_resize: bool,
                  width: int, height: int) -> bool:
    """Write a lost corpus copy again from its unchanged input (a journalled one); False, writing nothing, where the
    input no longer gives the journalled picture (then it and the inputs after it are redone as new)."""
    try:
        data = Path(cand.read) if isinstance(cand.read, (str, Path)) else cand.read()
        decoded = decode_image(data, cfg.max_pixels, cfg.corpus_side, fast_resize)
    except Exception:  # SkipInput, or a streamed row that fails to download: not what the journal says
        return False
    if (decoded.width, decoded.height) != (width, height):
        return False
    temp_path = incoming_dir / f"restored-{copy_path.name}"
    temp_path.write_bytes(decoded.jpeg)
    os.replace(temp_path, copy_path)
    return True


def _add_image_row(rows: dict[str, list], image_id: int, cand: Candidate, width: int, height: int) -> str:
    """Append an accepted image's row (a fresh read's or a journalled one's); returns its corpus path."""
    corpus_path = corpus_rel(image_id)
    for key, value in (("image_id", image_id), ("source", cand.source), ("label", cand.label), ("width", width),
                       ("height", height), ("corpus_path", corpus_path)):
        rows[key].append(value)
    return corpus_path


def _tasks(candidates: Iterator[Candidate], first_index: int, task_size: int
           ) -> Iterator[tuple[list[Candidate], list[tuple[int, object, str | None]]]]:
    """(candidates, task) pairs: a task is [(index, input, reason)], the input a file path (str) or encoded
    bytes, or a reason when reading it here already failed (a streamed dataset row)."""
    metas: list[Candidate] = []
    task: list[tuple[int, object, str | None]] = []
    for index, cand in enumerate(candidates, start=first_index):
        if isinstance(cand.read, (str, Path)):
            item = (index, os.fspath(cand.read), None)
        else:
            try:
                item = (index, cand.read(), None)
            except SkipInput as e:
                item = (index, None, str(e))
            except Exception as e:  # e.g. a streamed row that fails to download
                item = (index, None, f"cannot read the input: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        metas.append(cand)
        task.append(item)
        if len(task) >= task_size:
            yield metas, task
            metas, task = [], []
    if task:
        yield metas, task


def _decode_task(task: list[tuple[int, object, str | None]], incoming_dir: str, max_pixels: int,
                 corpus_side: int, fast_resize: bool = False
                 ) -> list[tuple[int, int, int, tuple[int, int] | None, str | None]]:
    """In a worker: decode each input and write its corpus copy to incoming/<index>.jpg. Returns (index, width,
    height, (file size, mtime) of a file input, skip reason or None) per input."""
    out = []
    for index, data, reason in task:
        stat = None
        if reason is None:
            if isinstance(data, str):
                path = Path(data)
                try:
                    st = path.stat()
                    stat = (st.st_size, st.st_mtime_ns)
                except OSError:
                    pass  # decode_image reports it
                data = path
            try:
                decoded = decode_image(data, max_pixels, corpus_side, fast_resize)
            except SkipInput as e:
                reason = str(e)
            else:
                Path(incoming_dir, f"{index}.jpg").write_bytes(decoded.jpeg)
                out.append((index, decoded.width, decoded.height, stat, None))
                continue
        out.append((index, 0, 0, stat, reason))
    return out


class _Journal:
    """What an ingest has done, one JSON line per input in input order: [index, source, [file size, mtime] or null,
    image_id or null, width, height, skip reason or null]. Written after each copy is in place, and kept once the
    images table is committed, as the record of what made each copy. A rerun with the same config (after an
    interrupt, or to restore lost copies of a finished run; the pipeline resets the stage, corpus/ and all, when
    the config changes) reuses the longest prefix that still matches the inputs: same source, same file size and
    mtime, the same image id. Those are not decoded again, except an input whose copy is gone: that one is
    decoded and written again here (up to MAX_RESTORED_HERE of them). Everything from the first mismatch on is
    redone."""

    def __init__(self, path: Path):
        self.path = path
        self.n_resumed = 0        # inputs taken from the journal
        self.n_restored = 0       # of those, the ones whose lost copy was written again
        self.next_index = 0       # the first input this run decodes
        self.max_image_id = -1    # the highest image id the journal knew (stale copies above the new count go)
        self._committed = False   # whether the journal is a finished run's (for the message)

    def __enter__(self) -> "_Journal":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")
        return self

    def __exit__(self, *_) -> None:
        self._file.close()

    @staticmethod
    def line(index: int, source: str, stat, image_id: int | None, width: int, height: int, reason: str | None) -> bytes:
        return (json.dumps([index, source, list(stat) if stat else None, image_id, width, height, reason],
                           ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")

    def append(self, lines: list[bytes]) -> None:
        if lines:
            self._file.write(b"".join(lines))
            self._file.flush()

    def resume(self, candidates: Iterator[Candidate], rows: dict[str, list], skipped: list[tuple[str, str]],
               store: Store, progress, limit: int,
               restore: Callable[[Candidate, int, int, int], bool] = lambda *_: False,
               committed: bool = False) -> Iterator[Candidate]:
        """Take the matching prefix into `rows`/`skipped`; returns the candidates still to decode.
        `restore(candidate, image_id, width, height)` writes a lost copy again (False: the input no longer gives
        it). `committed`: the journal is a finished run's."""
        self._committed = committed
        f = self._file
        f.seek(0)
        offset = 0
        for index, cand in enumerate(candidates):
            if limit and len(rows["image_id"]) >= limit:
                return self._cut(offset, itertools.chain([cand], candidates), index)
            raw = f.readline()
            entry = self._parse(raw)
            found = None if entry is None else self._matches(entry, index, cand, len(rows["image_id"]), store)
            if found == "lost":
                if self.n_restored < MAX_RESTORED_HERE and restore(cand, entry[3], entry[4], entry[5]):
                    self.n_restored += 1
                    found = "kept"
            if found != "kept":
                return self._cut(offset, itertools.chain([cand], candidates), index)
            offset += len(raw)
            _, _, _, image_id, width, height, reason = entry
            if reason is not None:
                skipped.append((cand.source, reason))
            else:
                _add_image_row(rows, image_id, cand, width, height)
                self.max_image_id = max(self.max_image_id, image_id)
            self.n_resumed += 1
            progress.update(1)
        return self._cut(offset, iter(()), self.n_resumed)

    def _cut(self, offset: int, rest: Iterator[Candidate], next_index: int) -> Iterator[Candidate]:
        """Keep the journal up to `offset` (what was reused); note the highest id in the part dropped."""
        for raw in iter(self._file.readline, b""):
            entry = self._parse(raw)
            if entry is None:
                break
            if entry[3] is not None:
                self.max_image_id = max(self.max_image_id, entry[3])
        self._file.truncate(offset)
        self._file.seek(offset)
        self.next_index = next_index
        restored = f", {self.n_restored} lost corpus cop{'y' if self.n_restored == 1 else 'ies'} written again" \
            if self.n_restored else ""
        if self.n_resumed and self._committed:
            say(f"ingest: {self.n_resumed} input(s) unchanged since the last run, kept{restored}")
        elif self.n_resumed:
            say(f"ingest: {self.n_resumed} input(s) already done by an unfinished run, resuming{restored}")
        return rest

    @staticmethod
    def _parse(raw: bytes) -> list | None:
        if not raw.endswith(b"\n"):
            return None  # end of file, or a line cut short by a kill
        try:
            entry = json.loads(raw)
        except ValueError:
            return None
        return entry if isinstance(entry, list) and len(entry) == 7 else None

    @staticmethod
    def _matches(entry: list, index: int, cand: Candidate, next_id: int, store: Store) -> str | None:
        """"kept": the entry is this input's, unchanged (its copy present, or a skip); "lost": the same, but its
        copy is gone; None: the entry is not this input's, or the input changed."""
        e_index, e_source, e_stat, image_id, _, _, reason = entry
        if e_index != index or e_source != cand.source:
            return None
        if isinstance(cand.read, (str, Path)):
            try:
                st = os.stat(cand.read)
            except OSError:
                return None
            if e_stat != [st.st_size, st.st_mtime_ns]:
                return None
        if reason is not None:
            return "kept"
        if image_id != next_id:
            return None
        try:
            return "kept" if store.paths.corpus_image(image_id).stat().st_size > 0 else "lost"
        except OSError:
            return "lost"


SPEC = Stage("ingest", IngestConfig, run, tables=("images",), folders=("corpus_dir",), skips=True)
