"""`atlasgen serve`: serve OUT/site over http on this machine (Pagefind search and the data files need http,
not file://), with the same headers the site gets on Netlify (atlasgen/headers.py)."""
from __future__ import annotations

import errno
import functools
import http.server
import mimetypes
import sys
from pathlib import Path

from .errors import AtlasError, Terminated
from .headers import headers_for

# Types Python's table may lack; with nosniff the browser refuses scripts and wasm sent with a wrong type.
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("image/webp", ".webp")
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("application/json", ".json")


class SiteHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with the headers netlify.toml sets (headers.HEADER_RULES); no directory listings;
    quiet unless `verbose`."""

    verbose = False

    def end_headers(self) -> None:
        for name, value in headers_for(self.path).items():
            self.send_header(name, value)
        super().end_headers()

    def list_directory(self, path):
        self.send_error(404, "No such page")
        return None

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """A 404 sends the site's own 404.html (as Netlify does), with status 404; other errors as usual."""
        page = Path(self.directory) / "404.html"
        if code != 404 or self.command not in ("GET", "HEAD") or not page.is_file():
            super().send_error(code, message, explain)
            return
        body = page.read_bytes()
        self.send_response(404, message)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if self.command == "GET":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        if self.verbose:
            super().log_message(format, *args)


class SiteServer(http.server.ThreadingHTTPServer):
    """A browser that cancels a request (a page left while its pictures load, an aborted range read of the
    database) resets the connection: no traceback on the terminal for that; any other error as usual."""

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # reset, broken pipe, aborted
            return
        super().handle_error(request, client_address)


def make_server(site_dir: Path, host: str = "127.0.0.1", port: int = 8000,
                verbose: bool = False) -> SiteServer:
    """A server for `site_dir` (not started: call serve_forever(), shutdown()). Port 0 picks a free port."""
    site_dir = Path(site_dir)
    if not 0 <= port <= 65535:
        raise AtlasError(f"--port {port} is not a TCP port", "pass a port from 1 to 65535, or 0 for a free one")
    if not (site_dir / "index.html").is_file():
        raise AtlasError(f"no site at {site_dir}", "build it first: atlasgen site --out OUT (or atlasgen build)")
    handler = functools.partial(type("Handler", (SiteHandler,), {"verbose": verbose}), directory=str(site_dir))
    try:
        return SiteServer((host, port), handler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise AtlasError(f"port {port} on {host} is already in use", "pick another one with --port") from None
        raise AtlasError(f"cannot listen on {host}:{port}: {e.strerror}", "check --host and --port") from None


def url_of(server: http.server.ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{shown}:{port}/"


def serve(site_dir: Path, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False) -> None:
    """Serve until Ctrl-C, or SIGTERM under the CLI (`kill PID`, `systemctl stop`, `docker stop`: a server's usual
    way to end, so a clean one, "stopped" and exit 0 as after Ctrl-C)."""
    server = make_server(site_dir, host, port, verbose)
    try:
        # Inside the try: a SIGTERM sent as soon as this line is read can arrive before serve_forever starts (seen
        # once on a loaded machine: exit 143 instead of a clean stop).
        print(f"serving {site_dir} at {url_of(server)}  (Ctrl-C stops)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt as e:
        print("stopped by SIGTERM" if isinstance(e, Terminated) else "stopped", flush=True)
    finally:
        server.server_close()
