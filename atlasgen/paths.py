"""Every file and folder that atlasgen reads or writes, named in one place.

Stages hand data to each other only through the store and through these paths.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from importlib import resources

from .errors import AtlasError, DiskFullError, disk_full_error, is_no_space


@dataclass(frozen=True)
class BuildPaths:
    """The layout of an output folder (default `build/`)."""

    out_dir: Path

    @property
    def store_path(self) -> Path:
        return self.out_dir / "atlas.duckdb"

    @property
    def status_path(self) -> Path:
        """What a running build is doing (`atlasgen info` reads it while the store is locked): status.py."""
        return self.out_dir / "atlas.status.json"

    @property
    def corpus_dir(self) -> Path:
        """Normalised RGB copies of every accepted input image: `corpus/<image_id>.jpg`."""
        return self.out_dir / "corpus"

    def corpus_image(self, image_id: int) -> Path:
        return self.out_dir / corpus_rel(image_id)

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
        """WebP thumbnails of corpus images: `thumbs/00000001.webp` (the image id, 8 digits)."""
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


# --- paths the user names: a file where a folder must be, or a folder that cannot be made ------------------
def file_in_the_way(path: Path) -> Path | None:
    """The file (or broken link) that stands at `path` or at one of its parent folders, so no folder can be
    made there; None when there is none (the nearest existing one is a folder, or one cannot be looked at:
    making the folder then says why)."""
    path = Path(path)
    try:
        for candidate in (path, *path.parents):
            if candidate.is_dir():
                return None
            if candidate.exists() or candidate.is_symlink():
                return candidate
    except OSError:  # e.g. a parent we may not look into
        return None
    return None


def check_folder_target(path: Path, option: str) -> None:
    """A folder option (`--out`, `--to`): it and its parents must be folders or not exist yet."""
    path = Path(path)
    blocker = file_in_the_way(path)
    if blocker is None:
        return
    what = "a broken link" if blocker.is_symlink() and not blocker.exists() else "a file"
    if blocker == path:
        raise AtlasError(f"{option} {path} is {what}, not a folder",
                         f"pass a folder for {option} (an existing one or a new name), or move the file away")
    raise AtlasError(f"{option} {path} is inside {blocker}, which is {what}, not a folder",
                     f"pass a path for {option} that is not inside a file")


def check_file_target(path: Path, option: str) -> None:
    """A file option that atlasgen writes (`--html`): not a folder, and its parents folders or new."""
    path = Path(path)
    if path.is_dir():
        raise AtlasError(f"{option} {path} is a folder, not a file", f"pass a file name, e.g. {path / 'page.html'}")
    blocker = file_in_the_way(path.parent)
    if blocker is not None:
        raise AtlasError(f"{option} {path} is inside {blocker}, which is a file, not a folder",
                         f"pass a path for {option} that is not inside a file")


def cannot_create_error(path: Path, exc: OSError) -> AtlasError:
    """The one line for a folder or file that could not be made: a file in the way, no permission, a
    read-only or special file system (/proc), a full disk."""
    if is_no_space(exc):
        return disk_full_error(path)
    blocker = file_in_the_way(path)
    why = f"{blocker} is a file" if blocker is not None else (exc.strerror or str(exc))
    return AtlasError(f"cannot create {path}: {why}", "pass a path in a folder you can write to")


def make_folder(path: Path) -> None:
    """`mkdir -p path`; a failure is a one-line AtlasError (`cannot_create_error`), not a traceback."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_create_error(Path(path), e) from None


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


# --- work in progress: one naming rule, so leftovers of a killed process can be found -----------------
# `.NAME.tmp<PID>`: NAME being written by process PID; `.NAME.old<PID>`: the NAME it replaced, being removed.
# Both sit beside NAME. A later run removes those whose process is gone (`sweep_stale_temps`).
TEMP_KINDS = ("tmp", "old")
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)(?P<pid>[0-9]+)$")


def temp_path(final_path: Path, kind: str = "tmp", pid: int | None = None) -> Path:
    """The temp name of `final_path` for `kind` (tmp | old) and process `pid` (default: this one)."""
    assert kind in TEMP_KINDS, f"unknown temp kind {kind}"
    final_path = Path(final_path)
    return final_path.with_name(f".{final_path.name}.{kind}{os.getpid() if pid is None else pid}")


def parse_temp_name(name: str) -> tuple[str, str, int] | None:
    """(NAME, kind, pid) if `name` follows the temp naming rule, else None."""
    match = _TEMP_RE.match(name)
    return (match["name"], match["kind"], int(match["pid"])) if match else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (this process counts as alive)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def sweep_stale_temps(root: Path) -> list[Path]:
    """Remove the temp files and folders of dead processes below `root` (temps of live ones are left
    alone). A `.NAME.old<PID>` whose NAME is missing (a swap cut short between its two renames) is renamed
    back to NAME instead, so a published folder is never lost. Returns the paths removed or restored."""
    root = Path(root)
    done: list[Path] = []
    if not root.is_dir():
        return done
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in list(dirnames) + filenames:
            parsed = parse_temp_name(name)
            if parsed is None:
                continue
            if name in dirnames:
                dirnames.remove(name)  # never look inside a temp folder
            final_name, kind, pid = parsed
            if pid_alive(pid):
                continue
            path = here / name
            final_path = here / final_name
            try:
                if kind == "old" and not final_path.exists():
                    os.replace(path, final_path)
                elif path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                continue
            done.append(path)
    return done


def missing_model_folder(model_ref: str) -> str | None:
    """Why `model_ref` names a local folder that is not there (it is written as a path: /x, ./x, ../x, ~/x),
    or None. Anything else may be a hub id, and only the hub can say."""
    if model_ref.startswith(("/", "./", "../", "~")) and not Path(model_ref).expanduser().exists():
        return f"there is no model folder at {model_ref}"
    return None


def _umask() -> int:
    """This process's umask (Linux reports it in /proc; elsewhere it is set and put back at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_umask_allows(path: Path) -> None:
    """Give a file the mode an ordinary write would (0o666 less the umask): safetensors writes its files
    owner-only (0600), so colleagues on a shared machine could read every output but the SAE's weights."""
    os.chmod(path, 0o666 & ~_umask())


@contextmanager
def atomic_path(final_path: Path):
    """Yield a temp path beside `final_path`; rename it into place only if the block succeeds.
    A full disk becomes a DiskFullError naming `final_path` and the space left there."""
    final_path = Path(final_path)
    make_folder(final_path.parent)
    tmp_path = temp_path(final_path)
    try:
        yield tmp_path
        os.replace(tmp_path, final_path)
    except Exception as e:
        if is_no_space(e) and not isinstance(e, DiskFullError):
            raise disk_full_error(final_path) from None
        raise
    finally:
        if tmp_path.exists() or tmp_path.is_symlink():
            if tmp_path.is_dir() and not tmp_path.is_symlink():
                shutil.rmtree(tmp_path, ignore_errors=True)
            else:
                tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(final_dir: Path):
    """Yield a fresh empty temp folder beside `final_dir`; if the block succeeds, swap it into place, else
    remove it. Readers of `final_dir` see the old folder until the swap and the new one after it: on Linux
    the two are exchanged in one step (renameat2 RENAME_EXCHANGE); elsewhere the old folder is first
    renamed to `.NAME.old<PID>` (which `sweep_stale_temps` puts back if the process dies right then)."""
    final_dir = Path(final_dir)
    make_folder(final_dir.parent)
    tmp_dir = temp_path(final_dir)
    old_dir = temp_path(final_dir, "old")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        tmp_dir.mkdir()
    except OSError as e:
        raise cannot_create_error(final_dir, e) from None
    try:
        yield tmp_dir
        if final_dir.exists() and exchange_paths(tmp_dir, final_dir):
            pass  # tmp_dir now holds the old folder; removed below
        else:
            if final_dir.exists():
                os.replace(final_dir, old_dir)
            os.replace(tmp_dir, final_dir)
            shutil.rmtree(old_dir, ignore_errors=True)
    except Exception as e:
        if is_no_space(e) and not isinstance(e, DiskFullError):
            raise disk_full_error(final_dir) from None
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE). False where the system or the
    file system cannot (the caller falls back to two renames)."""
    func = _renameat2()
    if func is None:
        return False
    if func(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no glibc ≥ 2.28 (musl, old systems)
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    func.restype = ctypes.c_int
    return func


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


def corpus_rel(image_id: int) -> str:
    """An image's corpus copy relative to the output folder, as `images.corpus_path` records it."""
    return f"corpus/{image_id:08d}.jpg"
