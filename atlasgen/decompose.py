"""Decompose any image into SAE features with a built store: embed it with the store's model,
encode it with the store's latest SAE (and the encode stage's top-k cap), list the active features.

Also the shared "embed PIL images with the store's model" helpers used by the probe stage.
"""
from __future__ import annotations

import base64
import mimetypes
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import AtlasError, DataLoadError, StageInputError
from .model import EmbeddingModel, load_embedding_model, pil_to_array
from .paths import atomic_path, site_assets_dir, templates_dir
from .sae import SparseAutoencoder, load_stage_sae

BAR_WIDTH = 30


def stage_config(store, stage: str) -> dict:
    """The config a finished stage ran with (from `stage_runs.config_json`)."""
    config = store.stage_config(stage)
    if config is None:
        raise StageInputError(f"the store has no finished {stage} stage",
                              f"run `atlasgen build` (or `atlasgen {stage}`) with the same --out first")
    return config


def load_store_model(store, device: str = "auto") -> EmbeddingModel:
    """The embedding model (and precision) the store's embed stage used, so values match `activations`."""
    embed_cfg = stage_config(store, "embed")
    return load_embedding_model(embed_cfg["model"], device, embed_cfg.get("precision", "auto"),
                                models_dir=store.paths.models_dir)


def ingest_max_pixels(store) -> int:
    """The pixel limit the store's images were ingested with (`ingest.max_pixels`)."""
    from .config import IngestConfig
    return int((store.stage_config("ingest") or {}).get("max_pixels", IngestConfig().max_pixels))


def too_big_error(path: Path, reason: str) -> DataLoadError:
    """An image over `ingest.max_pixels`, in ingest's words (`reason` from `ingest.too_many_pixels`)."""
    return DataLoadError(f"{path}: {reason}", "shrink the picture first: decompose reads images as this store's "
                                              "ingest did, with its ingest.max_pixels")


def load_image(path: Path, max_pixels: int | None = None) -> Image.Image:
    """Read an image file as ingest does: EXIF rotation applied, RGB. Unreadable → DataLoadError. With
    `max_pixels` (the store's `ingest.max_pixels`), a picture with more pixels is refused as ingest refuses it,
    before it is decoded and without Pillow's DecompressionBombWarning."""
    from .stages.ingest import pixel_limit, too_many_pixels
    path = Path(path)
    if not path.is_file():
        raise DataLoadError(f"{path} does not exist or is not a file", "pass the path of an image file")
    try:
        with warnings.catch_warnings(), pixel_limit(max_pixels or 0):
            if max_pixels:  # checked right below, against the store's own limit
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if max_pixels and im.width * im.height > max_pixels:
                    raise too_big_error(path, too_many_pixels(im.width * im.height, max_pixels, im.size))
                im.load()
                im = ImageOps.exif_transpose(im)
                return im.convert("RGB")
    except Image.DecompressionBombError as e:
        if max_pixels:  # over 2 × max_pixels: Pillow refuses it inside Image.open, before our check
            found = re.search(r"\(([0-9]+) pixels\)", str(e))
            raise too_big_error(path, too_many_pixels(int(found.group(1)) if found else None, max_pixels)) from None
        raise DataLoadError(f"{path} is not a readable image ({e})", "shrink the picture first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        text = (str(e).splitlines()[0] if str(e) else type(e).__name__).replace(repr(str(path)), "").strip()
        raise DataLoadError(f"{path} is not a readable image ({text})",
                            "pass a JPEG, PNG, WebP or other image file Pillow can read") from None


def normalise_like_ingest(store, path: Path, model_side: int | None = None) -> Image.Image:
    """The picture as ingest + embed see it (ingest's `decode_rgb`: EXIF rotation, RGB with alpha on white,
    shorter side down to `ingest.corpus_side`, the same JPEG drafts). Ingest's JPEG re-encode of the corpus
    copy is a storage step and is skipped, so a corpus file decomposes to exactly its stored rows."""
    from .config import IngestConfig
    from .stages.ingest import SkipInput, decode_rgb, pixel_limit
    ingest_cfg = stage_config(store, "ingest")
    max_pixels = int(ingest_cfg.get("max_pixels", IngestConfig().max_pixels))
    corpus_side = int(ingest_cfg.get("corpus_side", IngestConfig().corpus_side))
    path = Path(path)
    if not path.is_file():
        raise DataLoadError(f"{path} does not exist or is not a file", "pass the path of an image file")
    try:
        with pixel_limit(max_pixels):
            rgb, _, _ = decode_rgb(path, max_pixels, corpus_side, small_draft_side=model_side)
    except SkipInput as e:
        if "ingest.max_pixels" in str(e):
            raise too_big_error(path, str(e)) from None
        raise DataLoadError(f"{path} is not a readable image ({e})",
                            "pass a JPEG, PNG, WebP or other image file Pillow can read") from None
    return rgb


def embed_pil(model: EmbeddingModel, images: list[Image.Image], batch_size: int = 16) -> np.ndarray:
    """RGB PIL images → embeddings (N, D) float32, with the same CPU preprocessing as the embed stage."""
    from .stages.embed import embed_batch
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        arrays_bhw3 = np.stack([pil_to_array(im, model.image_size, model.spec.resize_mode) for im in chunk])
        out.append(embed_batch(model, arrays_bhw3))
    return np.concatenate(out, axis=0) if out else np.zeros((0, model.dim), np.float32)


@torch.no_grad()
def encode(sae: SparseAutoencoder, emb_nd: np.ndarray, top_k: int | None) -> np.ndarray:
    """Embeddings → SAE activations (N, F); `top_k=None` keeps every non-zero feature."""
    return sae.encode_embeddings(torch.from_numpy(np.asarray(emb_nd, np.float32)), top_k=top_k).numpy()


@dataclass
class Decomposition:
    image_path: Path
    features: list[dict]  # feature_id, label, value, picture (absolute Path or None); strongest first


class Decomposer:
    """Holds the store's model and SAE so many images are decomposed with one load."""

    def __init__(self, store, device: str = "auto"):
        self.store = store
        self.model = load_store_model(store, device)
        self.sae, self.sae_run_id = load_stage_sae(store)
        self.top_k = int(stage_config(store, "encode").get("top_k", 32))

    def __call__(self, image_path: Path) -> Decomposition:
        image = normalise_like_ingest(self.store, image_path, self.model.image_size)
        acts_f = encode(self.sae, embed_pil(self.model, [image]), self.top_k)[0]
        ids = np.flatnonzero(acts_f > 0)
        ids = ids[np.argsort(-acts_f[ids], kind="stable")]
        labels = self.store.feature_labels(ids.tolist())
        pictures = self.store.feature_pictures(ids.tolist())
        return Decomposition(Path(image_path), [
            {"feature_id": int(i), "label": labels.get(int(i)) or "", "value": float(acts_f[i]),
             "picture": pictures.get(int(i))} for i in ids])


def format_table(dec: Decomposition, top: int | None = None) -> str:
    """Plain-text table: feature id, label, activation and a bar scaled to the strongest feature."""
    feats = dec.features[:top] if top else dec.features
    lines = [f"{dec.image_path}: {len(dec.features)} active feature(s)"
             + (f", showing the top {len(feats)}" if top and len(dec.features) > len(feats) else "")]
    if not feats:
        return "\n".join(lines)
    peak = feats[0]["value"] or 1.0
    label_w = min(40, max([5] + [len(f["label"]) for f in feats]))
    lines.append(f"{'feature':>8}  {'label':<{label_w}}  {'value':>8}")
    for f in feats:
        n = int(round(f["value"] / peak * BAR_WIDTH))
        label = f["label"] if len(f["label"]) <= label_w else f["label"][:label_w - 1] + "…"
        lines.append(f"{f['feature_id']:>8}  {label:<{label_w}}  {f['value']:>8.4f}  {'█' * max(n, 1)}")
    return "\n".join(lines)


def data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(str(path))[0] or ("image/webp" if str(path).endswith(".webp") else "image/jpeg")
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def image_data_uri(image: Image.Image, side: int = 384) -> str:
    import io
    image = image.copy()
    image.thumbnail((side, side))
    buf = io.BytesIO()
    image.save(buf, "WEBP", quality=85)
    return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode()


def _site_env():
    """The site's Jinja environment (its filters and the `_decomposition.html` partial), or a plain one if
    the site package is missing. Our own instance: `url` must pass data: URIs through untouched."""
    try:
        from .site.core import make_env, url_path
    except ImportError:
        import jinja2
        return jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir())), autoescape=True), False
    env = make_env()
    env.filters["url"] = lambda path: str(path) if str(path).startswith("data:") else url_path(path)
    return env, True


def _inline_css() -> str:
    """The site's stylesheets, inlined so the standalone page needs no other file."""
    assets = site_assets_dir()
    return "\n".join((assets / name).read_text() for name in ("site.css", "decomposition.css")
                     if (assets / name).exists())


def write_html(decs: list[Decomposition], html_path: Path, store, top: int | None = None) -> Path:
    """A self-contained decomposition page: CSS inline, pictures as data URIs, through the site's
    `_decomposition.html` partial when the site module provides it."""
    env, has_site = _site_env()
    items = []
    max_pixels = ingest_max_pixels(store)
    for dec in decs:
        feats = dec.features[:top] if top else dec.features
        peak = (feats[0]["value"] if feats else 1.0) or 1.0
        features = [{"feature_id": f["feature_id"], "label": f["label"], "value": f["value"],
                     "fraction": f["value"] / peak,
                     "picture": data_uri(f["picture"]) if f["picture"] else "",
                     "href": f"features/{f['feature_id']}.html"} for f in feats]
        image = load_image(dec.image_path, max_pixels)
        items.append({"image": {"src": image_data_uri(image), "name": dec.image_path.name,
                                "title": dec.image_path.name, "path": str(dec.image_path)},
                      "features": features, "n_active": len(dec.features)})
    use_partial = has_site and _has_template(env, "_decomposition.html")
    template = env.get_template("decompose_standalone.html")
    html = template.render(items=items, css=_inline_css(), use_partial=use_partial, root="",
                           store_path=str(store.paths.store_path))
    html_path = Path(html_path)
    with atomic_path(html_path) as tmp:
        tmp.write_text(html)
    return html_path


def _has_template(env, name: str) -> bool:
    import jinja2
    try:
        env.get_template(name)
        return True
    except jinja2.TemplateNotFound:
        return False


def decompose_files(out_dir: Path, image_paths: list[Path], top: int | None = None, html: Path | None = None,
                    device: str = "auto") -> tuple[list[Decomposition], str]:
    """Decompose every image (all are read first, so a bad file fails before any model work)."""
    from .store import Store
    if top is not None and top < 0:
        raise AtlasError(f"--top {top} is negative", "pass --top 0 for every active feature, or a positive count")
    if not image_paths:
        raise AtlasError("no image given", "pass one or more image files: atlasgen decompose photo.jpg --out build/")
    with Store.open(out_dir, read_only=True) as store:
        max_pixels = ingest_max_pixels(store)
        for path in image_paths:
            load_image(path, max_pixels)
        decomposer = Decomposer(store, device)
        decs = [decomposer(Path(p)) for p in image_paths]
        text = "\n\n".join(format_table(d, top) for d in decs)
        if html is not None:
            write_html(decs, html, store, top)
    return decs, text
