"""The feature pages (`features/<id>.html`) and the feature listing (`features/index.html`, static
`page-NNN.html` pages and the `data-NNN.json` chunks that features.js sorts and filters)."""
from __future__ import annotations

import bisect
import json
import math
from collections import defaultdict
from pathlib import Path

from ...config import SiteConfig
from ...progress import bar
from ..core import SiteWriter
from ..data import SiteData
from .feature_map import map_overview_url


# Example images from lower activation ranges, beside the top images (as Anthropic's and Neuronpedia's feature
# dashboards show them): how many per range, and each range's heading (Store.feature_examples_by_band's bands).
N_EXAMPLES_PER_BAND = 6
BAND_TITLES = ("Top 10% of its activations (after the top images)", "Between the median and the top 10%",
               "Below the median")


def _example_picture(data: SiteData, image_id: int, corpus_path: str | None):
    """An example image's picture: its thumbnail if it has one, else its corpus copy."""
    pic = data.thumb(image_id)
    if pic is None and corpus_path and (data.store.paths.out_dir / corpus_path).is_file():
        pic = data.files.picture(corpus_path, f"corpus/{data.thumb_tag}/{Path(corpus_path).name}")
    return pic


def _bands(data: SiteData, rows: list) -> list[dict]:
    """The feature's example images grouped by activation range, ranges with no image left out."""
    bands: dict[int, list] = defaultdict(list)
    for band, image_id, value, corpus_path in rows:
        bands[band].append({"image_id": image_id, "value": value, "label": data.image_labels.get(image_id),
                            "pic": _example_picture(data, image_id, corpus_path)})
    out = []
    for band in sorted(bands):
        values = [e["value"] for e in bands[band]]
        out.append({"band": band, "title": BAND_TITLES[band] if band < len(BAND_TITLES) else f"range {band}",
                    "low": min(values), "high": max(values), "examples": bands[band]})
    return out


def frequency_ranks(features: list[dict]) -> dict[int, int]:
    """feature id → its rank by how often it fires (1 = most often; ties share the best rank)."""
    freqs = sorted(-(f["frequency"] or 0.0) for f in features)
    return {f["feature_id"]: bisect.bisect_left(freqs, -(f["frequency"] or 0.0)) + 1 for f in features}


def _feature_page_context(data: SiteData, index: int, sums: list[dict]) -> dict:
    f = data.features[index]
    fid = f["feature_id"]
    renders = []
    for r in data.renders.get(fid, ()):
        pic = data.render_picture(r)
        renders.append({**r, "pic": pic, "reactivates": (r["self_activation"] or 0) > 0})
    top = [{"image_id": i, "value": v, "label": data.image_labels.get(i), "pic": data.thumb(i)}
           for i, v in data.top_images.get(fid, ())]
    similar = [data.tile(o, f"cos {c:.2f}", "../") for o, c in data.similar.get(fid, ())]
    coactive = [data.tile(o, f"{n:,} images", "../") for o, n in data.coactive.get(fid, ())]
    combos = []
    for r in sums:
        if fid in (r["feature_a"], r["feature_b"]):
            combos.append({"a": r["feature_a"], "b": r["feature_b"], "pic": data.render_picture(r),
                           "a_label": data.by_id.get(r["feature_a"], {}).get("label"),
                           "b_label": data.by_id.get(r["feature_b"], {}).get("label")})
    prev_id = data.features[index - 1]["feature_id"] if index > 0 else None
    next_id = data.features[index + 1]["feature_id"] if index + 1 < len(data.features) else None
    return {"f": f, "renders": renders, "top": top, "similar": similar, "coactive": coactive, "combos": combos,
            "probes": data.probes_of.get(fid, []), "prev_id": prev_id, "next_id": next_id,
            "on_map": f["grid_x"] is not None, "picture": data.best.get(fid), "map_side": data.map_side,
            "map_overview": map_overview_url(data)}


def write_feature_pages(writer: SiteWriter, data: SiteData) -> None:
    # Pairs are few; index them once so a feature page does not scan them all.
    sums_by_feature: dict[int, list[dict]] = defaultdict(list)
    for r in data.pair_renders:
        if r["kind"] == "sum":
            sums_by_feature[r["feature_a"]].append(r)
            if r["feature_b"] != r["feature_a"]:
                sums_by_feature[r["feature_b"]].append(r)
    template = writer.env.get_template("feature.html")
    examples = data.store.feature_examples_by_band(N_EXAMPLES_PER_BAND)
    ranks = frequency_ranks(data.features)
    n_live = sum(1 for f in data.features if (f["n_active"] or 0) > 0)
    for index in bar(range(len(data.features)), desc="feature pages", unit="page"):
        f = data.features[index]
        fid = f["feature_id"]
        ctx = _feature_page_context(data, index, sums_by_feature.get(fid, []))
        ctx.update({"bands": _bands(data, examples.get(fid, [])), "rank": ranks[fid],
                    "n_ranked": len(data.features), "n_live": n_live, "best_pic": data.best.get(fid)})
        out_rel = f"features/{fid}.html"
        writer.write_html(out_rel, template.render({"root": "../", "page_path": out_rel,
                                                    "site_title": writer.cfg.title, **ctx}))


def chunk_first_ids(data: SiteData, cfg: SiteConfig) -> list[int]:
    """The first feature id of each `data-NNN.json` chunk (features by id), so a page can fetch the chunk that
    holds a given id (the search page, for a query that is an id)."""
    return [f["feature_id"] for f in data.features[::_chunk_size(cfg)]]


def _chunk_size(cfg: SiteConfig) -> int:
    return max(1, int(cfg.chunk_size))


def write_listing(writer: SiteWriter, data: SiteData) -> None:
    """features/index.html (first page, sort/filter script), page-NNN.html (static pages), data-NNN.json."""
    cfg = writer.cfg
    per_page = max(1, int(cfg.features_per_page))
    chunk = _chunk_size(cfg)
    feats = data.features
    n_pages = max(1, math.ceil(len(feats) / per_page))
    n_chunks = math.ceil(len(feats) / chunk)
    (writer.site_dir / "features").mkdir(parents=True, exist_ok=True)
    for c in range(n_chunks):
        rows = []
        for f in feats[c * chunk:(c + 1) * chunk]:
            pic = data.best.get(f["feature_id"])
            rows.append([f["feature_id"], f["label"] or "", round(f["frequency"] or 0.0, 6),
                         round(f["strength"] or 0.0, 6), f["n_active"] or 0,
                         pic.src if pic else None, pic.width if pic else 0, pic.height if pic else 0])
        (writer.site_dir / "features" / f"data-{c:03d}.json").write_text(
            json.dumps(rows, separators=(",", ":"), ensure_ascii=False), encoding="utf-8")

    def page_name(p: int) -> str:
        return "index.html" if p == 1 else f"page-{p:03d}.html"
    pages = [{"number": p, "href": page_name(p)} for p in range(1, n_pages + 1)]
    n_live = sum(1 for f in feats if (f["n_active"] or 0) > 0)
    for p in range(1, n_pages + 1):
        tiles = [dict(data.tile(f["feature_id"], root="../"), frequency=f["frequency"], strength=f["strength"])
                 for f in feats[(p - 1) * per_page:p * per_page]]
        writer.render("features.html", f"features/{page_name(p)}", {
            "tiles": tiles, "pages": pages, "page_number": p, "n_pages": n_pages, "n_features": len(feats),
            "n_live": n_live, "n_chunks": n_chunks, "per_page": per_page, "is_first": p == 1})
