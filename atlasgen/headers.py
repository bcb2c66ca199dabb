"""The HTTP headers the site is served with: one table for `atlasgen serve` and for netlify.toml.

`HEADER_RULES` lists (path pattern, headers) in Netlify's syntax (`/*` matches everything below); a request
gets the headers of every rule whose pattern matches its path. `netlify_headers_toml()` writes the table as
netlify.toml's [[headers]] blocks, and a test checks the checked-in netlify.toml against it.

Every long-cached (immutable) folder has names that change with the content: renders are named by a hash
of what made them, thumbnails and corpus copies sit under the encode config hash, and map tiles under the
map's content hash (`map/<hash>/`, see layout.map_content_hash).
"""
from __future__ import annotations

from .site.core import csp_header

IMMUTABLE = "public, max-age=31536000, immutable"

SECURITY_HEADERS = {
    "Content-Security-Policy": csp_header(),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}

HEADER_RULES: tuple[tuple[str, dict[str, str]], ...] = (
    ("/*", SECURITY_HEADERS),
    ("/renders/*", {"Cache-Control": IMMUTABLE}),
    ("/thumbs/*", {"Cache-Control": IMMUTABLE}),
    ("/corpus/*", {"Cache-Control": IMMUTABLE}),
    ("/map/*", {"Cache-Control": IMMUTABLE}),
    # Pagefind's index fragments are content-hashed, but pagefind.js and its entry file are not.
    ("/pagefind/*", {"Cache-Control": "public, max-age=3600"}),
)


def matches(pattern: str, url_path: str) -> bool:
    """Netlify's path patterns as we use them: an exact path, or a prefix ending in `/*`."""
    if pattern.endswith("/*"):
        return url_path.startswith(pattern[:-1]) or url_path == pattern[:-2]
    return url_path == pattern


def headers_for(url_path: str) -> dict[str, str]:
    """The headers for a request path (query string and fragment ignored)."""
    path = url_path.split("?", 1)[0].split("#", 1)[0] or "/"
    out: dict[str, str] = {}
    for pattern, values in HEADER_RULES:
        if matches(pattern, path):
            out.update(values)
    return out


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def netlify_headers_toml() -> str:
    """HEADER_RULES as netlify.toml [[headers]] blocks (what the checked-in file must contain)."""
    blocks = []
    for pattern, values in HEADER_RULES:
        lines = ["[[headers]]", f"  for = {_toml_string(pattern)}", "  [headers.values]"]
        lines += [f"    {name} = {_toml_string(value)}" for name, value in values.items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


if __name__ == "__main__":  # python -m atlasgen.headers > the [[headers]] part of netlify.toml
    print(netlify_headers_toml(), end="")
