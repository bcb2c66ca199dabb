"""The site's pages: one static table maps each page to its writer and its title in the navigation, and
`build` writes them all (then the Pagefind index).

A page that a pipeline stage provides (its `SPEC.pages`, see `stage_pages`) is written only when that stage has finished in the
store; otherwise, or when its writer found nothing to show, the page is a "not built" placeholder that says
how to build it, so the navigation never has a dead link.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ...config import SiteConfig
from ..assets import SiteFiles
from ..core import SiteWriter, make_env
from .. import query
from ..data import SiteData
from ..hosting import hosting_notes
from ...progress import say
from .combinations import write_combinations
from .decompositions import write_decompositions
from .feature_map import write_map
from .features import write_feature_pages, write_listing
from .inversions import write_inversions
from .not_found import write_not_found
from .overview import write_overview
from .probes import write_probes
from .search import index_search, write_search
from .toy import write_toy


@dataclass(frozen=True)
class Page:
    path: str                                       # the page, relative to the site root
    title: str | None                               # its label in the navigation (None: not in it)
    write: Callable[[SiteWriter, SiteData], None]   # writes the page (and any pages and files it owns)


# Every page of the site, in navigation order.
PAGES = (
    Page("features/<id>.html", None, write_feature_pages),
    Page("index.html", "Overview", write_overview),
    Page("features/index.html", "Features", write_listing),
    Page("map.html", "Map", write_map),
    Page("inversions.html", "Inversions", write_inversions),
    Page("combinations.html", "Combinations", write_combinations),
    Page("decompositions.html", "Decompositions", write_decompositions),
    Page("probes.html", "Probes", write_probes),
    Page("toy.html", "Toy", write_toy),
    Page("search.html", "Search", write_search),
    Page("404.html", None, write_not_found),
)
NAV = tuple((p.title, p.path) for p in PAGES if p.title)



def stage_pages() -> dict[str, tuple[str, ...]]:
    """The pages each pipeline stage provides (its `SPEC.pages` in the registry): written only once that
    stage has finished, a placeholder before."""
    from ...stages import REGISTRY  # the registry imports the site stage, which imports this package
    return {stage.name: stage.pages for stage in REGISTRY if stage.pages}


def check_stage_pages(pages: tuple[Page, ...], stage_pages: dict[str, tuple[str, ...]]) -> None:
    """Every page a stage provides must have a writer (and a navigation title) in the page table."""
    titled = {p.path for p in pages if p.title}
    for stage, provided in stage_pages.items():
        for path in provided:
            if path not in titled:
                raise LookupError(f"the {stage} stage provides {path}, but the site's page table has no writer "
                                  "(with a navigation title) for it")



def build(cfg: SiteConfig, store, site_dir: Path) -> dict:
    """Write the whole site into `site_dir` (an empty folder); returns the site stage's summary."""
    t0 = time.perf_counter()
    # The Query page is decided first, so every page's navigation can link it (it is left out, with one
    # line, when `[site] sql = false` or DuckDB-WASM's files are absent).
    query_page = query.prepare(cfg, store, site_dir)
    env = make_env(NAV + ((query_page.nav,) if query_page is not None else ()))
    writer = SiteWriter(env, site_dir, cfg)
    files = SiteFiles(store.paths.out_dir, site_dir)
    files.put_static_assets()
    data = SiteData(store, cfg, files)
    data.tile_body = env.get_template("_macros.html").module.tile_body
    t_data = time.perf_counter() - t0

    stage_of = {path: stage for stage, provided in stage_pages().items() for path in provided}
    for page in PAGES:
        stage = stage_of.get(page.path)
        if stage is None or store.stage_config(stage) is not None:
            page.write(writer, data)
    for page in PAGES:
        if page.path in stage_of and page.path not in writer.written:
            writer.render("not_built.html", page.path, {"section": page.title, "stage": stage_of[page.path]})
    # After the other pages: it publishes the pictures they copied.
    query_summary = query_page.write(writer, data) if query_page is not None else {"query_page": False}
    t_pages = time.perf_counter() - t0

    if cfg.search_index:
        index_search(site_dir)
    t_search = time.perf_counter() - t0 - t_pages
    # What a static host will take: one line per limit the site is over (e.g. the Query page's engine is
    # larger than Cloudflare Pages' 25 MiB per file), so a reader learns it before a deploy fails.
    figures, host_notes = hosting_notes(site_dir)
    for line in host_notes:
        say(line)
    return {"n_files": figures["n_files"], "total_bytes": figures["total_bytes"], "host_limits_over": len(host_notes),
            "n_pages": writer.n_pages, "n_feature_pages": len(data.features), "n_pictures": files.n_pictures,
            "n_missing_pictures": files.n_missing, "n_copied_pictures": files.n_copied,
            "seconds_data": round(t_data, 2), "seconds_pages": round(t_pages, 2),
            "seconds_search": round(t_search, 2), "search_index": cfg.search_index, **query_summary}
