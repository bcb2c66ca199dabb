"""A stage is done only while its artefacts exist.

`stage_runs` says a stage finished, but its files live outside the store and can be deleted or lost (a
cleaned disk, a copied store, a half-restored backup). Before the pipeline skips a finished stage it asks
`missing_artefacts(store, stage)`: None when every file the stage wrote is there, else one line saying what
is gone, and the stage runs again (its `run` redoes only what is missing where it can, e.g. render and the
thumbnails). The checks look only at files the store names (or the fixed files a stage always writes);
they stat files, they do not read them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

from .store import Store


def _first_missing(out_dir: Path, rel_paths: Iterable[str], what: str) -> str | None:
    """"N of M <what> are missing (e.g. PATH)" or None."""
    rel_paths = list(rel_paths)
    gone = [p for p in rel_paths if not (out_dir / p).is_file()]
    if not gone:
        return None
    if len(rel_paths) == 1:
        return f"its {what} {gone[0]} is missing"
    return f"{len(gone):,} of {len(rel_paths):,} {what} are missing (e.g. {gone[0]})"


def _ingest(store: Store) -> str | None:
    return _first_missing(store.paths.out_dir, store.corpus_copy_paths(), "corpus copies")


def _train(store: Store) -> str | None:
    from .sae import CONFIG_FILE, WEIGHTS_FILE
    files = []
    for weights_path in store.sae_weight_paths():  # every run the store lists (train's reset clears them)
        folder = Path(weights_path).parent
        files += [(folder / WEIGHTS_FILE).as_posix(), (folder / CONFIG_FILE).as_posix()]
    return _first_missing(store.paths.out_dir, files, "SAE files") if files else None


def _encode(store: Store) -> str | None:
    paths = store.paths
    return _first_missing(paths.out_dir, [paths.thumb(i).relative_to(paths.out_dir).as_posix()
                                          for i in store.top_image_ids()], "thumbnails")


def _render(store: Store) -> str | None:
    return _first_missing(store.paths.out_dir, store.render_paths(), "renders")


def _layout(store: Store) -> str | None:
    from .stages.layout import MAP_INDEX_NAME
    map_dir = store.paths.map_dir
    rel = map_dir.relative_to(store.paths.out_dir)
    try:
        index = json.loads((map_dir / MAP_INDEX_NAME).read_text())
        levels = index["levels"]
        fmt = index.get("tile_format", "webp")
    except (OSError, ValueError, KeyError, TypeError):
        return f"its map index {(rel / MAP_INDEX_NAME).as_posix()} is missing or unreadable"
    tiles = [(rel / str(lv["z"]) / f"{x}_{y}.{fmt}").as_posix()
             for lv in levels for y in range(lv["n_tiles"]) for x in range(lv["n_tiles"])]
    return _first_missing(store.paths.out_dir, tiles, "map tiles")


def _probe(store: Store) -> str | None:
    return _first_missing(store.paths.out_dir, store.probe_image_paths(), "probe pictures")


def _toy(store: Store) -> str | None:
    from .stages.toy import FRAMES_FILE
    rel = store.paths.toy_dir.relative_to(store.paths.out_dir)
    return _first_missing(store.paths.out_dir, [(rel / FRAMES_FILE).as_posix()], "toy files")


def _site(store: Store) -> str | None:
    rel = store.paths.site_dir.relative_to(store.paths.out_dir)
    return _first_missing(store.paths.out_dir, [(rel / "index.html").as_posix(),
                                                (rel / "features" / "index.html").as_posix()], "site pages")


# Stages whose outputs are only rows in the store (embed) have no check.
CHECKS: dict[str, Callable[[Store], str | None]] = {
    "ingest": _ingest, "train": _train, "encode": _encode, "render": _render, "layout": _layout,
    "probe": _probe, "toy": _toy, "site": _site,
}


def missing_artefacts(store: Store, stage: str) -> str | None:
    """None if every file that finished `stage` wrote still exists, else one line saying what is missing."""
    check = CHECKS.get(stage)
    return check(store) if check is not None else None
