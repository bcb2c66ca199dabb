"""Every file and folder that atlasgen reads or writes, named in one place.

Stages hand data to each other only through the store and through these paths.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from importlib import resources


@dataclass(frozen=True)
class BuildPaths:
    """The layout of an output folder (default `build/`)."""

    out_dir: Path

    @property
    def store_path(self) -> Path:
        return self.out_dir / "atlas.duckdb"

    @property
    def corpus_dir(self) -> Path:
        """Normalised RGB copies of every accepted input image: `corpus/<image_id>.jpg`."""
        return self.out_dir / "corpus"

    def corpus_image(self, image_id: int) -> Path:
        return self.corpus_dir / f"{image_id:08d}.jpg"

    @property
    def tiny_source_dir(self) -> Path:
        """Where the tiny preset writes its generated labelled images before ingest."""
        return self.out_dir / "sources" / "tiny"

    @property
    def models_dir(self) -> Path:
        return self.out_dir / "models"

    @property
    def tiny_model_dir(self) -> Path:
        return self.models_dir / "tiny-dinov3"

    @property
    def sae_root(self) -> Path:
        """Every training run's weights: `sae/<run_id>/`."""
        return self.out_dir / "sae"

    def sae_dir(self, run_id: str) -> Path:
        """`sae/<run_id>/` holds `sae.safetensors` and `sae.json` for one training run."""
        return self.sae_root / run_id

    @property
    def thumbs_dir(self) -> Path:
        """WebP thumbnails of corpus images: `thumbs/<image_id>.webp`."""
        return self.out_dir / "thumbs"

    def thumb(self, image_id: int) -> Path:
        return self.thumbs_dir / f"{image_id:08d}.webp"

    @property
    def renders_dir(self) -> Path:
        """Rendered (inverted) pictures: `renders/<kind>/<render_id>.webp`."""
        return self.out_dir / "renders"

    @property
    def map_dir(self) -> Path:
        """The tile pyramid and its JSON index written by the layout stage."""
        return self.out_dir / "map"

    @property
    def probes_dir(self) -> Path:
        return self.out_dir / "probes"

    @property
    def toy_dir(self) -> Path:
        return self.out_dir / "toy"

    @property
    def site_dir(self) -> Path:
        return self.out_dir / "site"

    @property
    def tmp_dir(self) -> Path:
        return self.out_dir / "tmp"


def templates_dir() -> Path:
    """Jinja2 templates, shipped inside the wheel as `atlasgen.templates`."""
    return _resource_dir("atlasgen.templates", "templates")


def site_assets_dir() -> Path:
    """CSS and JavaScript copied verbatim into the site, shipped as `atlasgen.site_assets`."""
    return _resource_dir("atlasgen.site_assets", "site_assets")


def _resource_dir(package: str, repo_folder: str) -> Path:
    try:
        path = Path(str(resources.files(package)))
        if path.is_dir():
            return path
    except ModuleNotFoundError:
        pass
    path = Path(__file__).resolve().parent.parent / repo_folder
    assert path.is_dir(), f"{repo_folder}/ not found next to the package ({path})"
    return path


@contextmanager
def atomic_path(final_path: Path):
    """Yield a temp path beside `final_path`; rename it into place only if the block succeeds."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = final_path.with_name(f".{final_path.name}.tmp{os.getpid()}")
    try:
        yield tmp_path
        os.replace(tmp_path, final_path)
    finally:
        if tmp_path.exists():
            if tmp_path.is_dir():
                shutil.rmtree(tmp_path)
            else:
                tmp_path.unlink()


@contextmanager
def atomic_dir(final_dir: Path):
    """Yield a fresh empty temp folder beside `final_dir`; if the block succeeds, swap it into place
    (the old folder, if any, is moved aside first and then removed), else remove it."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = final_dir.with_name(f".{final_dir.name}.tmp{os.getpid()}")
    old_dir = final_dir.with_name(f".{final_dir.name}.old{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    try:
        yield tmp_dir
        if final_dir.exists():
            os.replace(final_dir, old_dir)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old_dir, ignore_errors=True)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link `src` to `dst` (pictures are immutable, so the site can share them); copy when links are
    not possible (another file system, or not allowed). True if linked."""
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copy2(src, dst)
        return False


def duckdb_wasm_modules() -> Path | None:
    """The `node_modules` folder holding @duckdb/duckdb-wasm and apache-arrow for the site's Query page:
    $ATLASGEN_DUCKDB_WASM, else `vendor/duckdb-wasm/node_modules` of this checkout (installed by
    `npm ci --prefix vendor/duckdb-wasm`, pinned by its package-lock.json), else the same under the current
    folder; None when neither holds the package."""
    candidates = [os.environ.get("ATLASGEN_DUCKDB_WASM"),
                  Path(__file__).resolve().parent.parent / "vendor" / "duckdb-wasm" / "node_modules",
                  Path.cwd() / "vendor" / "duckdb-wasm" / "node_modules"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "@duckdb" / "duckdb-wasm" / "package.json").is_file():
            return Path(candidate)
    return None
