"""The inversions page (`inversions.html`): the study's opening figures. Each inverted corpus image next to its
generations (render kind 'image', one per seed, each with the cosine of its embedding to the image's), and
the seed's ablation (kind 'ablation': raw pixels without and with augmentations, the transformer generator
with augmentations) on one image."""
from __future__ import annotations

from pathlib import Path

from ..assets import Picture
from ..core import SiteWriter
from ..data import SiteData

# The ablation's variants (render.ABLATION_VARIANTS), in the study's order, with its captions.
ABLATION_CAPTIONS = {"pixels+noaug": "Raw pixels, no augmentations", "pixels+aug": "Raw pixels with augmentations",
                     "transformer+aug": "Transformer with augmentations"}
# Other spellings of a variant (the synthetic test store's "pixels" is "pixels+noaug").
ABLATION_ALIASES = {"pixels": "pixels+noaug"}


def original_picture(data: SiteData, image_id: int, corpus_path: str | None) -> Picture | None:
    """The corpus image as the site shows it: its corpus copy (the decompositions page's rule), else its
    thumbnail."""
    store = data.store
    if corpus_path and (store.paths.out_dir / corpus_path).is_file():
        pic = data.files.picture(corpus_path, f"corpus/{data.thumb_tag}/{Path(corpus_path).name}")
        if pic is not None:
            return pic
    return data.thumb(image_id)


def _variant_order(variant: str | None) -> tuple[int, str]:
    order = list(ABLATION_CAPTIONS)
    variant = ABLATION_ALIASES.get(variant, variant)
    return (order.index(variant) if variant in order else len(order), variant or "")


def write_inversions(writer: SiteWriter, data: SiteData) -> None:
    store = data.store
    rows = store.image_inversion_renders()
    if not rows:
        return  # nothing inverted: the page table writes the "not built" placeholder
    sources = store.image_sources(sorted({r["image_id"] for r in rows if r["image_id"] is not None}))

    def original(image_id: int) -> dict:
        corpus_path, label, _ = sources.get(image_id, (None, None, None))
        return {"image_id": image_id, "label": label, "pic": original_picture(data, image_id, corpus_path)}

    def generation(r: dict, caption: str) -> dict:
        return {"pic": data.render_picture(r), "cosine": r["cosine"], "caption": caption, "seed": r["seed"],
                "variant": r["variant"]}

    images: dict[int, dict] = {}
    ablations: dict[int, dict] = {}
    for r in rows:
        image_id = r["image_id"]
        if r["kind"] == "image":
            entry = images.setdefault(image_id, {**original(image_id), "generations": []})
            entry["generations"].append(generation(r, f"seed {r['seed']}"))
        else:
            entry = ablations.setdefault(image_id, {**original(image_id), "generations": []})
            entry["generations"].append(generation(r, ABLATION_CAPTIONS.get(ABLATION_ALIASES.get(r["variant"], r["variant"]), r["variant"] or "")))
    for entry in ablations.values():
        entry["generations"].sort(key=lambda g: _variant_order(g["variant"]))
    writer.render("inversions.html", "inversions.html", {
        "images": list(images.values()), "ablations": list(ablations.values()),
        "n_image_renders": sum(len(e["generations"]) for e in images.values()),
        "n_ablation_renders": sum(len(e["generations"]) for e in ablations.values())})
