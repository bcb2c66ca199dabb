"""The map page (`map.html`): the layout stage's tile pyramid (`OUT/map/`), copied into `site/map/`;
map.js pans and zooms it."""
from __future__ import annotations

import json

from ...stages.layout import MAP_INDEX_NAME
from ..assets import SiteFiles
from ..core import SiteWriter
from ..data import SiteData


def map_context(store, files: SiteFiles) -> dict:
    """Put the map's tiles into the site; the page's context (`map` is None when the layout wrote no map)."""
    index_path = store.paths.map_dir / MAP_INDEX_NAME
    if not index_path.exists():
        return {"map": None}
    files.put_tree(store.paths.map_dir, "map")
    index = json.loads(index_path.read_text())
    return {"map": {"grid_side": index["grid_side"], "n_placed": len(index["features"]),
                    "n_levels": len(index["levels"]), "cell_px": index["cell_px"],
                    "index_url": f"map/{MAP_INDEX_NAME}", "tiles_url": "map/", "overview_url": "map/0/0_0.webp"}}


def write_map(writer: SiteWriter, data: SiteData) -> None:
    writer.render("map.html", "map.html", map_context(data.store, data.files))
