"""Shared fixtures: the tiny model, tiny builds (shared per session), an http server and a browser."""
from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from atlasgen.config import load_config
from atlasgen.progress import set_quiet
from atlasgen.serve import SiteServer

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
ARTIFACTS_DIR = Path(os.environ.get("ATLASGEN_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))


@pytest.fixture(autouse=True)
def no_child_process_left():
    """Each test leaves no multiprocessing child of this process running (a pool's supervisor or worker). Such a
    child keeps every pipe this process had open when it was forked, the Playwright driver's included, so the
    session would hang at its end waiting for the driver to see its pipe close. What is left after 5 s is killed
    and the test fails."""
    import multiprocessing
    yield
    deadline = time.monotonic() + 5
    while (left := multiprocessing.active_children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        for proc in left:
            proc.kill()
            proc.join(timeout=5)
        pytest.fail(f"the test left {len(left)} process(es) running: {', '.join(p.name for p in left)}")


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests, the previous count restored after them."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny random DINOv3, written with save_pretrained and loaded back like a real checkpoint."""
    from atlasgen.model import load_embedding_model
    models_dir = tmp_path_factory.mktemp("models")
    return load_embedding_model("tiny", "cpu", "fp32", models_dir=models_dir)


def _build(out_dir: Path, stages: tuple[str, ...]) -> Path:
    from atlasgen.pipeline import run_stages
    from atlasgen.store import Store
    set_quiet(True)
    with Store.open(out_dir) as store:
        run_stages(load_config("tiny"), store, stages)
    return out_dir


@pytest.fixture(scope="session")
def tiny_encoded(tmp_path_factory) -> Path:
    """Output folder of a tiny build through ingest, embed, train and encode (shared; copy before changing)."""
    return _build(tmp_path_factory.mktemp("tiny_encoded"), ("ingest", "embed", "train", "encode"))


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory, tiny_encoded) -> Path:
    """Output folder of a whole tiny build, site included (shared; copy before changing)."""
    from typer.testing import CliRunner
    from atlasgen.cli import app
    out_dir = tmp_path_factory.mktemp("tiny_build") / "build"
    shutil.copytree(tiny_encoded, out_dir)  # ingest..encode are up to date there, so build skips them
    result = CliRunner().invoke(app, ["build", "--preset", "tiny", "--out", str(out_dir), "--quiet"])
    assert result.exit_code == 0, f"tiny build failed: {result.output}\n{result.exception!r}"
    return out_dir


def copy_build(src: Path, dst: Path) -> Path:
    """A private copy of a shared build, for tests that change it."""
    shutil.copytree(src, dst)
    return dst


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def serve_dir():
    """serve_dir(path) → base URL of a http server on 127.0.0.1 serving that folder (closed at session end)."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = SiteServer(("127.0.0.1", 0), handler)  # quiet when the browser cancels a request
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture(scope="session")
def site_url(tiny_build, serve_dir) -> str:
    return serve_dir(tiny_build / "site")


def chromium_path() -> str | None:
    path = os.environ.get("ATLASGEN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    return path if Path(path).exists() else None


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium through Playwright: Debian's chromium (or $ATLASGEN_CHROMIUM), else Playwright's own."""
    from playwright.sync_api import Error as PlaywrightError, sync_playwright
    with sync_playwright() as p:
        path = chromium_path()
        try:
            b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True) if path else \
                p.chromium.launch(args=CHROMIUM_ARGS, headless=True)
        except PlaywrightError as e:
            # One line for every browser test instead of a page of Playwright's own install advice.
            pytest.skip(f"no usable Chromium ({str(e).splitlines()[0][:80]}): run `make test`, which installs "
                        "Debian's chromium, or `apt-get install -y chromium`, or set ATLASGEN_CHROMIUM=/path")
        yield b
        b.close()


class PageWatch:
    """Collects console errors, failed requests and requests that leave 127.0.0.1 for one page."""

    def __init__(self, page):
        self.page = page
        self.console_errors: list[str] = []
        self.failed: list[str] = []
        self.external: list[str] = []
        page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.console_errors.append(str(e)))
        page.on("requestfailed", lambda r: self.failed.append(r.url))
        page.on("request", lambda r: self.external.append(r.url)
                if not r.url.startswith(("http://127.0.0.1", "data:", "blob:", "about:")) else None)

    def assert_clean(self):
        assert not self.console_errors, f"console errors: {self.console_errors}"
        assert not self.failed, f"failed requests: {self.failed}"
        assert not self.external, f"requests leaving the site: {self.external}"


@pytest.fixture
def page(browser):
    """A fresh page with a PageWatch at `page.watch`; call `page.watch.assert_clean()` at the end."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.watch = PageWatch(pg)
    yield pg
    context.close()


def save_screenshot(page, name: str) -> Path:
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS_DIR / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    return path
