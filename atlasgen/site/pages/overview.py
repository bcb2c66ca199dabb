"""The overview (`index.html`): model, corpus, SAE quality and training curves, a gallery of the strongest
features."""
from __future__ import annotations

from ..charts import line_svg
from ..core import SiteWriter
from ..data import SiteData


def write_overview(writer: SiteWriter, data: SiteData) -> None:
    store, cfg = data.store, writer.cfg
    sae = store.sae_quality()
    curves = []
    # "Dead" has one meaning on the page: fires on no image of the corpus (feature_stats, as the listing and the
    # "fire" counts use). The training log's own dead_fraction (not fired within the last `dead_window` steps,
    # the features resampling revives) is another measure, so its curve is titled "idle", not "dead".
    dead_window = (store.stage_config("train") or {}).get("dead_window")
    idle_title = f"idle features (not fired in {dead_window:,} steps)" if dead_window else "idle features"
    if sae:
        metrics = store.sae_training_curve(sae["run_id"])
        for col, name, log_y in ((1, "fraction of variance unexplained", False), (2, "reconstruction MSE", True),
                                 (3, "L0 (active features per image)", False), (4, idle_title, False)):
            curves.append(line_svg([(m[0], m[col]) for m in metrics], name, log_y=log_y))
    gallery = [data.tile(f["feature_id"]) for f in sorted(
        (f for f in data.features if data.best.get(f["feature_id"]) is not None and (f["n_active"] or 0) > 0),
        key=lambda f: -(f["strength"] or 0))[:cfg.n_gallery]]
    n_live = sum(1 for f in data.features if (f["n_active"] or 0) > 0)
    writer.render("index.html", "index.html", {
        "model": (store.stage_config("embed") or {}).get("model"), "n_images": data.n_images,
        "labels": store.label_counts(), "n_skipped": store.count("skipped_inputs"), "sae": sae, "curves": curves,
        "gallery": gallery, "n_features": len(data.features), "n_live": n_live,
        "n_dead": len(data.features) - n_live, "dead_window": dead_window,
        "n_inversions": len(store.image_inversion_renders()),
        "n_renders": sum(len(v) for v in data.renders.values()),
        "n_pairs": len({(r["feature_a"], r["feature_b"]) for r in data.pair_renders if r["kind"] == "sum"})})
