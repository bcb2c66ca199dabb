"""What the pages read: everything from the store in a handful of bulk reads (typed `Store` methods, no SQL
here), and the pictures the pages show, put into the site through `SiteFiles`."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..config import SiteConfig
from .assets import Picture, SiteFiles


def safe_tag(text: str | None) -> str:
    """A short file-name-safe tag (a config hash) for a picture folder, so its URLs never change meaning."""
    return re.sub(r"[^A-Za-z0-9_-]", "", text or "")[:12] or "build"


def probe_chart_features(store) -> dict[str, list[int]]:
    """Probe sweep → the features its chart on the probes page draws, in page order: the sweep's own `features`,
    else those the probe stage chose, else its strongest. {} until the probe stage is done."""
    row = store.stage_row("probe")
    if row is None or row["status"] != "done":
        return {}
    cfg, summary = row["config"], row["summary"]
    named = {s["name"]: s for s in cfg.get("sweeps", [])}
    chosen_by_sweep = summary.get("features", {})
    swept = store.probe_steps()
    order = [n for n in named if n in swept] + sorted(set(swept) - set(named))
    n_auto = int(cfg.get("n_auto_features", 4))
    return {name: [int(f) for f in (named.get(name, {}).get("features") or chosen_by_sweep.get(name)
                                    or store.probe_strongest_features(name, n_auto))] for name in order}


class SiteData:
    """Everything the feature pages, the listing, the overview, decompositions and combinations need."""

    def __init__(self, store, cfg: SiteConfig, files: SiteFiles):
        self.store, self.cfg, self.files = store, cfg, files
        self._thumbs: dict[int, Picture | None] = {}
        self._tile_bodies: dict[tuple, Any] = {}
        self.tile_body = None  # the `tile_body` macro, set by the writer
        encode_row = store.stage_row("encode")
        # Thumbnails are named by image id; the encode config hash in the folder name makes the URLs immutable.
        self.thumb_tag = safe_tag(encode_row["config_hash"] if encode_row else None)

        self.features: list[dict] = store.feature_rows()
        self.by_id = {f["feature_id"]: f for f in self.features}
        grid = [max(f["grid_x"], f["grid_y"]) for f in self.features if f["grid_x"] is not None and f["grid_y"] is not None]
        self.map_side = int((store.stage_config("layout") or {}).get("grid_side") or (max(grid) + 1 if grid else 0))

        self.image_labels = store.image_labels()
        self.renders: dict[int, list[dict]] = defaultdict(list)
        self.pair_renders: list[dict] = []
        for row in store.picture_renders():
            if row["kind"] == "feature":
                self.renders[row["feature_a"]].append(row)
            else:
                self.pair_renders.append(row)
        self.top_images = store.top_images_by_feature()
        self.similar = store.similar_by_feature()
        self.coactive = store.top_coactive_by_feature(cfg.n_coactive)
        # A feature page links to a probe chart only where that chart draws the feature.
        self.probe_charts = probe_chart_features(store)
        charted = {(name, f) for name, ids in self.probe_charts.items() for f in ids}
        self.probes_of = {fid: [{"name": name, "max_value": vmax, "charted": (name, fid) in charted}
                                for name, vmax in peaks] for fid, peaks in store.probe_peaks_by_feature().items()}
        self.n_images = store.count("images")

        # Each feature's picture, by the store's one rule (the map tiles and `decompose` show the same).
        paths = store.feature_pictures(self.by_id)
        self.best: dict[int, Picture | None] = {fid: self.picture_at(paths.get(fid)) for fid in self.by_id}

    def picture_at(self, path: Path | None) -> Picture | None:
        """A picture from the output folder (a render or a thumbnail) in the site."""
        if path is None:
            return None
        if path.parent == self.store.paths.thumbs_dir:
            return self.files.picture(path.relative_to(self.store.paths.out_dir).as_posix(),
                                      f"thumbs/{self.thumb_tag}/{path.name}")
        return self.files.picture(path.relative_to(self.store.paths.out_dir).as_posix())

    def render_picture(self, row: dict) -> Picture | None:
        return self.files.picture(row["path"])

    def thumb(self, image_id: int) -> Picture | None:
        if image_id not in self._thumbs:
            self._thumbs[image_id] = self.picture_at(self.store.paths.thumb(image_id))
        return self._thumbs[image_id]

    def tile(self, fid: int, extra: str = "", root: str | None = None) -> dict:
        """A feature tile's context; with `root`, its inside pre-rendered once (pages show the same tiles a lot)."""
        f = self.by_id.get(fid, {})
        t = {"id": fid, "label": f.get("label"), "pic": self.best.get(fid), "extra": extra}
        if root is not None and self.tile_body is not None:
            key = (fid, root)
            if key not in self._tile_bodies:
                self._tile_bodies[key] = self.tile_body(t, root)
            t["body"] = self._tile_bodies[key]
        return t
