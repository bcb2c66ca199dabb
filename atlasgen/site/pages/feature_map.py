"""The map page (`map.html`): the layout stage's tile pyramid (`OUT/map/`), copied into
`site/map/<content hash>/`, so a tile's URL changes whenever the map does (the year-long immutable cache rule
for /map/* stays right); map.js pans and zooms it.

Next to the map's index goes `labels-<hash>.json`, what the map's labels, its "find feature" box and its
click card need, read from the store through `SiteData` (so a relabelled store shows its new labels without a
new layout): each placed feature's cell, its label and its strongest co-activating neighbours. Compact on
purpose (one array per feature, label names once), so the page stays light at thousands of placed features:

    {"version": 1, "map": {grid_side, cell_px, tile_px, full_px, levels, tile_format} (the index's geometry),
     "names": [label name, ...],
     "features": [[id, x, y, name index or -1, label, [neighbour id, ...]], ...]}   # strongest first

where a label "<its name> (11/16)" is written "(11/16)" (map.js puts the name back): about 70 bytes a feature.

The page fetches only this file (the index, with its own copy of every placed feature, stays for tools).
"""
from __future__ import annotations

import hashlib
import json
import weakref

from ..core import SiteWriter
from ..data import SiteData

# What map.js needs of the index besides the features.
GEOMETRY_KEYS = ("grid_side", "cell_px", "tile_px", "full_px", "levels", "tile_format")
# Neighbours a clicked cell shows (its strongest co-activating features), at most.
N_MAP_NEIGHBOURS = 4
# SiteData → what `map_files` put into that site (the tiles go in once per build).
_MAP_FILES: "weakref.WeakKeyDictionary[SiteData, dict | None]" = weakref.WeakKeyDictionary()


def map_files(data: SiteData) -> dict | None:
    """Put the map's tiles into the site (once) and return {base, index}: `base` its folder in the site
    ("map/<hash>/"), `index` its index.json; None when the layout wrote no map. The feature pages call this
    too (their inset shows the map's overview tile), before the map page is written."""
    if data in _MAP_FILES:
        return _MAP_FILES[data]
    # Imported here: the stages import the site package (the site stage), so it cannot import them first.
    from ...stages.layout import MAP_INDEX_NAME, map_content_hash
    store = data.store
    index_path = store.paths.map_dir / MAP_INDEX_NAME
    out = None
    if index_path.exists():
        index = json.loads(index_path.read_text())
        tag = index.get("content_hash") or map_content_hash(store.paths.map_dir, index)  # maps from before the hash
        base = f"map/{tag}/"
        data.files.put_tree(store.paths.map_dir, base.rstrip("/"))
        out = {"base": base, "index": index}
    _MAP_FILES[data] = out
    return out


def map_overview_url(data: SiteData) -> str | None:
    """The whole map in one small picture (the pyramid's level 0), relative to the site root; None without a map."""
    m = map_files(data)
    return None if m is None else m["base"] + "0/0_0." + m["index"].get("tile_format", "webp")


def map_labels(data: SiteData, index: dict) -> dict:
    """The labels file's content (see the module docstring): placed features strongest first (the index's
    order), each at its cell from the store (`features.grid_x/grid_y`), else the index's."""
    names: list[str] = []
    name_at: dict[str, int] = {}
    rows = []
    for entry in index["features"]:
        fid = int(entry["id"])
        f = data.by_id.get(fid, {})
        x = f.get("grid_x") if f.get("grid_x") is not None else entry["x"]
        y = f.get("grid_y") if f.get("grid_y") is not None else entry["y"]
        name = f.get("label_name")
        if name and name not in name_at:
            name_at[name] = len(names)
            names.append(name)
        neighbours = [int(o) for o, _ in data.coactive.get(fid, ())[:N_MAP_NEIGHBOURS]]
        label = f.get("label") or entry.get("label") or ""
        if name and label.startswith(name + " ("):
            label = label[len(name) + 1:]
        rows.append([fid, int(x), int(y), name_at[name] if name else -1, label, neighbours])
    return {"version": 1, "map": {k: index[k] for k in GEOMETRY_KEYS if k in index}, "names": names,
            "features": rows}


def map_context(data: SiteData) -> dict:
    """Put the map's tiles and labels into the site; the page's context (`map` is None when the layout wrote
    no map)."""
    from ...stages.layout import MAP_INDEX_NAME
    m = map_files(data)
    if m is None:
        return {"map": None}
    index, base = m["index"], m["base"]
    body = json.dumps(map_labels(data, index), separators=(",", ":"), ensure_ascii=False).encode()
    # Named by its own content: the map's folder is cached as immutable, and labels change without the tiles.
    labels_name = f"labels-{hashlib.sha256(body).hexdigest()[:12]}.json"
    labels_path = data.files.site_dir / base / labels_name
    labels_path.parent.mkdir(parents=True, exist_ok=True)
    labels_path.write_bytes(body)
    return {"map": {"grid_side": index["grid_side"], "n_placed": len(index["features"]),
                    "n_levels": len(index["levels"]), "cell_px": index["cell_px"],
                    "index_url": base + MAP_INDEX_NAME, "labels_url": base + labels_name, "tiles_url": base,
                    "overview_url": map_overview_url(data)}}


def write_map(writer: SiteWriter, data: SiteData) -> None:
    writer.render("map.html", "map.html", map_context(data))
