"""Files into the site, one way: `SiteFiles` puts each file from the output folder (pictures, the map's
tiles, probe pictures, the toy's frames) into the site once, hard-linked where possible, else copied
(`paths.link_or_copy`), and the static CSS/JS from `site_assets/`. Also the WebP size parser that gives
every <img> its width and height without decoding the picture."""
from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from .. import paths as paths_mod


def webp_size(path: Path) -> tuple[int, int] | None:
    """Width and height from a WebP header (30 bytes read), falling back to Pillow for other formats."""
    try:
        with open(path, "rb") as f:
            head = f.read(30)
    except OSError:
        return None
    if len(head) >= 30 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        chunk = head[12:16]
        if chunk == b"VP8 ":
            w, h = struct.unpack("<HH", head[26:30])
            return w & 0x3FFF, h & 0x3FFF
        if chunk == b"VP8L":
            bits = int.from_bytes(head[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X":
            return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    try:
        from PIL import Image
        with Image.open(path) as im:
            return im.size
    except Exception:  # unreadable picture: the caller shows a placeholder
        return None


@dataclass(frozen=True)
class Picture:
    src: str        # path relative to the site root
    width: int
    height: int


class SiteFiles:
    """Puts files into the site folder, each destination once. Files from the output folder are immutable
    (written to a temp name, then renamed), so they are hard-linked where possible, else copied."""

    def __init__(self, out_dir: Path, site_dir: Path):
        self.out_dir = Path(out_dir)
        self.site_dir = Path(site_dir)
        self._pictures: dict[str, Picture | None] = {}
        self._made_dirs: set[Path] = set()
        self.n_missing = 0      # pictures that were missing or unreadable
        self.n_linked = 0       # pictures hard-linked
        self.n_copied = 0       # pictures copied (no hard link possible)

    @property
    def n_pictures(self) -> int:
        return len(self._pictures)

    def picture(self, rel_src: str | None, rel_dst: str | None = None) -> Picture | None:
        """A picture from the output folder (path relative to it) at `rel_dst` in the site (default: the same
        relative path), with its size; None (counted missing) when it is absent or unreadable."""
        if not rel_src:
            return None
        rel_dst = rel_dst or rel_src
        if rel_dst in self._pictures:
            return self._pictures[rel_dst]
        src = self.out_dir / rel_src
        size = webp_size(src)
        if size is None:
            self.n_missing += 1
            self._pictures[rel_dst] = None
            return None
        if self.put(src, rel_dst):
            self.n_linked += 1
        else:
            self.n_copied += 1
        pic = Picture(rel_dst, int(size[0]), int(size[1]))
        self._pictures[rel_dst] = pic
        return pic

    def put(self, src: Path, rel_dst: str, link: bool = True) -> bool:
        """One file at `rel_dst` in the site; True if hard-linked, False if copied (always when not `link`)."""
        dst = self.site_dir / rel_dst
        if dst.parent not in self._made_dirs:
            dst.parent.mkdir(parents=True, exist_ok=True)
            self._made_dirs.add(dst.parent)
        if link:
            return paths_mod.link_or_copy(src, dst)
        shutil.copy2(src, dst)
        return False

    def put_tree(self, src_dir: Path, rel_dst: str) -> int:
        """Every file under `src_dir` at the same place under `rel_dst`; returns how many."""
        n = 0
        for src in sorted(Path(src_dir).rglob("*")):
            if src.is_file():
                self.put(src, f"{rel_dst}/{src.relative_to(src_dir).as_posix()}")
                n += 1
        return n

    def put_static_assets(self, rel_dst: str = "assets") -> None:
        """The CSS, JavaScript and icons of `site_assets/` (not its package files). Copied, never linked:
        they are source files a developer edits in place, and an edit in the site must not reach them."""
        (self.site_dir / rel_dst).mkdir(parents=True, exist_ok=True)
        for path in sorted(paths_mod.site_assets_dir().iterdir()):
            if path.is_file() and not path.name.startswith(("_", ".")) and path.suffix != ".py":
                self.put(path, f"{rel_dst}/{path.name}", link=False)


def decomposition_css() -> str:
    """CSS of the `_decomposition.html` partial, for a standalone page to inline (`atlasgen decompose --html`)."""
    return (paths_mod.site_assets_dir() / "decomposition.css").read_text()
