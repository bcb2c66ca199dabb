"""The search page, and the Pagefind index over the feature pages (run after every page is written)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ...errors import AtlasError
from ..core import SiteWriter
from ..data import SiteData
from .features import chunk_first_ids


def write_search(writer: SiteWriter, data: SiteData) -> None:
    writer.render("search.html", "search.html", {"search_index": writer.cfg.search_index,
                                                 "chunk_starts": chunk_first_ids(data, writer.cfg)})


def index_search(site_dir: Path) -> None:
    """Pagefind over the feature pages (the ones marked data-pagefind-body); bundle in site/pagefind/."""
    result = subprocess.run([sys.executable, "-m", "pagefind", "--site", str(site_dir), "--output-subdir",
                             "pagefind", "--force-language", "en", "--silent"], capture_output=True, text=True)
    if result.returncode != 0 or not (site_dir / "pagefind" / "pagefind-ui.js").exists():
        message = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise AtlasError(f"the Pagefind search index failed: {message[0]}",
                         "check that `python -m pagefind --help` works, or set [site] search_index = false")
