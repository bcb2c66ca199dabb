"""The decompositions page: example images with their active features (`[site] decompose_image_ids`, or
one image per label in turn)."""
from __future__ import annotations

from pathlib import Path

from ...config import SiteConfig
from ...progress import say
from ..core import SiteWriter
from ..data import SiteData


def decompose_image_ids(store, cfg: SiteConfig) -> list[int]:
    if cfg.decompose_image_ids:
        wanted = [int(i) for i in cfg.decompose_image_ids]
        known = store.known_image_ids(wanted)
        missing = [i for i in wanted if i not in known]
        if missing:
            say(f"site: decompose_image_ids {missing} are not in the store; left out")
        return [i for i in wanted if i in known]
    return store.example_image_ids(cfg.n_decompose_auto)


def write_decompositions(writer: SiteWriter, data: SiteData) -> None:
    store = data.store
    image_ids = decompose_image_ids(store, writer.cfg)
    acts = store.activations_by_image(image_ids)
    rows = store.image_sources(image_ids)
    examples = []
    for image_id in image_ids:
        corpus_path, label, source = rows[image_id]
        has_corpus = bool(corpus_path) and (store.paths.out_dir / corpus_path).is_file()
        pic = data.files.picture(corpus_path, f"corpus/{data.thumb_tag}/{Path(corpus_path).name}") \
            if has_corpus else None
        pic = pic or data.thumb(image_id)
        image = {"image_id": image_id, "label": label, "title": f"image {image_id}" + (f" · {label}" if label else ""),
                 "src": pic.src if pic else None, "width": pic.width if pic else None,
                 "height": pic.height if pic else None}
        features = []
        for fid, value in acts.get(image_id, ()):
            fpic = data.best.get(fid)
            features.append({"feature_id": fid, "label": data.by_id.get(fid, {}).get("label"), "value": value,
                             "picture": fpic.src if fpic else None, "width": fpic.width if fpic else None,
                             "height": fpic.height if fpic else None, "href": f"features/{fid}.html"})
        examples.append({"image": image, "features": features})
    writer.render("decompositions.html", "decompositions.html", {"examples": examples})
