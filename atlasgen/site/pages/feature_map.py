"""The map page (`map.html`): the layout stage's tile pyramid (`OUT/map/`), copied into
`site/map/<content hash>/`, so a tile's URL changes whenever the map does (the year-long immutable cache rule
for /map/* stays right); map.js pans and zooms it."""
from __future__ import annotations

import json

from ..assets import SiteFiles
from ..core import SiteWriter
from ..data import SiteData


def map_context(store, files: SiteFiles) -> dict:
    """Put the map's tiles into the site; the page's context (`map` is None when the layout wrote no map)."""
    # Imported here: the stages import the site package (the site stage), so it cannot import them first.
    from ...stages.layout import MAP_INDEX_NAME, map_content_hash
    index_path = store.paths.map_dir / MAP_INDEX_NAME
    if not index_path.exists():
        return {"map": None}
    index = json.loads(index_path.read_text())
    tag = index.get("content_hash") or map_content_hash(store.paths.map_dir, index)  # maps from before the hash
    base = f"map/{tag}/"
    files.put_tree(store.paths.map_dir, base.rstrip("/"))
    return {"map": {"grid_side": index["grid_side"], "n_placed": len(index["features"]),
                    "n_levels": len(index["levels"]), "cell_px": index["cell_px"],
                    "index_url": base + MAP_INDEX_NAME, "tiles_url": base, "overview_url": base + "0/0_0.webp"}}


def write_map(writer: SiteWriter, data: SiteData) -> None:
    writer.render("map.html", "map.html", map_context(data.store, data.files))
