"""Faults around a build: temp files of killed processes, published folders swapped in whole, damaged and
locked stores, a full disk, oversized images, the build status file, and the headers the site is served
with. Every user-facing failure is one line plus a hint, exit 2, and no traceback."""
from __future__ import annotations

import errno
import io
import json
import os
import struct
import subprocess
import sys
import tomllib
import urllib.request
import zlib
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from atlasgen import paths as paths_mod
from atlasgen.cli import app
from atlasgen.errors import DiskFullError, StoreDamagedError, StoreLockedError
from atlasgen.paths import BuildPaths, atomic_dir, atomic_path, parse_temp_name, sweep_stale_temps, temp_path
from atlasgen.store import Store
from atlasgen.testing import insert_synthetic, synthetic_activity

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def assert_one_line_error(result, *needles: str) -> str:
    """Exit 2, "error: ..." plus "hint: ...", no traceback; returns the output."""
    out = result.output
    assert result.exit_code == 2, out
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and any(line.startswith("hint: ") for line in lines), out
    for needle in needles:
        assert needle in out, f"{needle!r} not in {out!r}"
    return out


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- temp files: one naming rule, stale ones swept --------------------------------------------------------
def test_temp_names_follow_one_rule():
    final = Path("/x/renders/feature/abc.webp")
    tmp = temp_path(final)
    assert tmp.name == f".abc.webp.tmp{os.getpid()}" and tmp.parent == final.parent
    assert parse_temp_name(tmp.name) == ("abc.webp", "tmp", os.getpid())
    assert parse_temp_name(temp_path(Path("site"), "old", 12).name) == ("site", "old", 12)
    for name in ("abc.webp", "a.tmp", ".tinyset.json", ".site.tmp", "x.tmp123", ".x.tmp12a"):
        assert parse_temp_name(name) is None, name


def test_sweep_removes_temps_of_dead_processes_only(tmp_path):
    dead = dead_pid()
    (tmp_path / "renders" / "feature").mkdir(parents=True)
    stale_file = tmp_path / "renders" / "feature" / f".abc.webp.tmp{dead}"
    stale_file.write_bytes(b"half a picture")
    stale_dir = tmp_path / f".site.tmp{dead}"
    (stale_dir / "features").mkdir(parents=True)
    (stale_dir / "features" / "1.html").write_text("half a site")
    live = tmp_path / "corpus" / f".00000001.jpg.tmp{os.getpid()}"
    live.parent.mkdir()
    live.write_bytes(b"being written")
    # A swap cut short between its two renames: the old map is only under its .old name.
    cut_swap = tmp_path / f".map.old{dead}"
    cut_swap.mkdir()
    (cut_swap / "index.json").write_text("{}")
    # The same with the new folder already in place: the old one is just removed.
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("new")
    old_site = tmp_path / f".site.old{dead}"
    old_site.mkdir()
    keep = [tmp_path / "renders" / "feature" / "abc.webp", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    for path in keep:
        path.write_text("mine")

    done = sweep_stale_temps(tmp_path)
    assert not stale_file.exists() and not stale_dir.exists() and not old_site.exists()
    assert live.exists(), "a live process's temp must stay"
    assert (tmp_path / "map" / "index.json").exists() and not cut_swap.exists(), "an orphaned .old is put back"
    assert all(p.exists() for p in keep)
    assert len(done) == 4
    assert sweep_stale_temps(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_dir_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(paths_mod, "exchange_paths", lambda a, b: False)
    site = tmp_path / "site"
    with atomic_dir(site) as tmp:
        (tmp / "index.html").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(site) as tmp:
            (tmp / "index.html").write_text("v2, half")
            assert (site / "index.html").read_text() == "v1", "readers see the old site while the new one is built"
            raise RuntimeError("killed mid-build")
    assert (site / "index.html").read_text() == "v1"
    with atomic_dir(site) as tmp:
        (tmp / "index.html").write_text("v2")
    assert (site / "index.html").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"], "no temp left behind"


def test_site_and_layout_reset_keep_what_readers_see(tmp_path):
    from atlasgen.stages import layout, site
    store = Store.open(tmp_path)
    for folder in (store.paths.site_dir, store.paths.map_dir):
        folder.mkdir()
        (folder / "index.html").write_text("published")
    site.reset(store)
    layout.reset(store)
    store.close()
    assert (store.paths.site_dir / "index.html").exists() and (store.paths.map_dir / "index.html").exists()


# --- damaged and locked stores ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store_file(tmp_path_factory) -> Path:
    """A real store with a few hundred KB of rows (so there are data blocks to damage)."""
    out = tmp_path_factory.mktemp("store")
    with Store.open(out) as store:
        insert_synthetic(store, synthetic_activity(400, 300, 8, seed=0))
    return BuildPaths(out).store_path


def damaged_copy(store_file: Path, folder: Path, how: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = bytearray(store_file.read_bytes())
    if how == "text":
        data = bytearray(b"this is a text file someone saved as atlas.duckdb\n" * 40)
    elif how == "empty":
        data = bytearray()
    elif how.startswith("truncated"):
        data = data[:int(how.split(":")[1])]
    elif how.startswith("overwritten"):
        at = int(how.split(":")[1])
        data[at:at + 512] = b"\xa5" * 512
    (folder / "atlas.duckdb").write_bytes(bytes(data))
    return folder


@pytest.mark.parametrize("how,needle", [
    ("text", "is not a DuckDB database"),
    ("empty", "is not a DuckDB database"),
    ("truncated:100", "is truncated"),
    ("truncated:8192", "is truncated"),
    ("overwritten:100", "is corrupt"),
    ("overwritten:4096", "is corrupt"),
])
def test_damaged_store_is_one_line_with_what_to_do(store_file, tmp_path, how, needle):
    out = damaged_copy(store_file, tmp_path / "out", how)
    with pytest.raises(StoreDamagedError, match=needle):
        Store.open(out, read_only=True)
    for args in (["info"], ["query", "SELECT 1"], ["build", "--preset", "tiny"], ["site"]):
        result = runner.invoke(app, [*args, "--out", str(out), "--quiet"] if args[0] in ("build", "site")
                               else [*args, "--out", str(out)])
        text = assert_one_line_error(result, needle)
        assert "restore atlas.duckdb from a copy" in text and f"atlasgen build --out {out}" in text
        assert "another atlasgen process" not in text and "read-only" not in text


def test_corrupt_block_found_by_a_query_is_one_line(store_file, tmp_path):
    """A damaged data block opens fine and fails only when a query reads it: still our line, not the SQL hint."""
    data = store_file.read_bytes()
    for at in range(12288, len(data), 1 << 16):  # the first block that opens but fails when read
        out = damaged_copy(store_file, tmp_path / f"at{at}", f"overwritten:{at}")
        try:
            store = Store.open(out, read_only=True)
        except StoreDamagedError:
            continue
        failing = None
        try:
            for failing in ("SELECT * FROM features", "SELECT * FROM coactivation"):
                store.query(failing)
            failing = None
        except duckdb.Error:
            break
        finally:
            store.close()
    else:
        pytest.fail("no damaged block that opens and then fails to read was found")
    text = assert_one_line_error(runner.invoke(app, ["query", failing, "--out", str(out), "--limit", "0"]),
                                 "is corrupt", "restore atlas.duckdb")
    assert "read-only" not in text


def test_truncated_store_found_in_the_middle_of_a_stage_is_one_line(store_file, tmp_path):
    """Damage that DuckDB only notices when it reads a block (not at open) is classified where it shows."""
    from atlasgen.cli import environment_error
    error = environment_error(duckdb.IOException(
        'IO Error: Could not read enough bytes from file "x/atlas.duckdb": attempted to read 262144 bytes from '
        'location 1060864'), tmp_path)
    assert isinstance(error, StoreDamagedError) and "truncated" in error.message
    error = environment_error(duckdb.Error("Corrupt database file: computed checksum 1 does not match stored "
                                           "checksum 2 in block at location 8192"), tmp_path)
    assert isinstance(error, StoreDamagedError) and "corrupt" in error.message
    assert environment_error(duckdb.BinderException("Binder Error: column x not found"), tmp_path) is None, \
        "a bug in our SQL must keep its traceback"


def test_corrupt_write_ahead_log(store_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "atlas.duckdb").write_bytes(store_file.read_bytes())
    con = duckdb.connect(str(out / "atlas.duckdb"))
    con.execute("SET checkpoint_threshold = '1GB'")
    con.execute("INSERT INTO skipped_inputs SELECT 'x' || range, 'ingest', 'r', NULL FROM range(500)")
    wal = (out / "atlas.duckdb.wal").read_bytes()
    saved = out.parent / "saved"
    saved.mkdir()
    (saved / "atlas.duckdb").write_bytes((out / "atlas.duckdb").read_bytes())
    (saved / "atlas.duckdb.wal").write_bytes(wal[:100] + b"\xa5" * 300 + wal[400:])
    con.close()
    assert_one_line_error(runner.invoke(app, ["info", "--out", str(saved)]), "write-ahead log",
                          "move atlas.duckdb.wal away")


LOCK_HOLDER = """
import sys, time
from atlasgen.progress import bar, set_quiet
from atlasgen.status import build_status
from atlasgen.store import Store
from atlasgen.testing import insert_synthetic, synthetic_activity
set_quiet(True)
store = Store.open(sys.argv[1])
if sys.argv[2] == "build":
    with build_status(store.paths, ["ingest", "embed", "train", "encode", "render"]) as status:
        status.stage("render")
        progress = bar(total=40, desc="render", unit="target")
        progress.update(12)
        status.write(force=True)
        print("ready", flush=True)
        time.sleep(120)
print("ready", flush=True)
time.sleep(120)
"""


def hold_lock(out: Path, kind: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out), kind], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_store_on_a_read_only_disk_says_so(tmp_path):
    """DuckDB's words when it cannot create the store on a read-only mount (an existing empty --out there)."""
    import duckdb
    from atlasgen.store import store_error
    path = tmp_path / "atlas.duckdb"
    error = store_error(duckdb.IOException(f'IO Error: Cannot open file "{path}": Read-only file system'), path)
    assert error.message == f"cannot write the store {path}: {tmp_path} is on a read-only file system"
    assert "writable" in error.hint


def test_store_locked_by_another_process_names_it(tmp_path):
    Store.open(tmp_path).close()
    proc = hold_lock(tmp_path, "plain")
    try:
        with pytest.raises(StoreLockedError) as info:
            Store.open(tmp_path, read_only=True)
        assert info.value.pid == proc.pid
        for args in (["info"], ["query", "SELECT 1"], ["site", "--quiet"]):
            assert_one_line_error(runner.invoke(app, [*args, "--out", str(tmp_path)]),
                                  f"in use by process {proc.pid}", f"kill {proc.pid}")
    finally:
        proc.kill()
        proc.wait()


def test_info_and_query_during_a_build_show_its_progress(tmp_path):
    Store.open(tmp_path).close()
    proc = hold_lock(tmp_path, "build")
    try:
        result = runner.invoke(app, ["info", "--out", str(tmp_path)])
        assert result.exit_code == 0, result.output
        assert f"build running: pid {proc.pid}" in result.output
        assert "stage 5/5 render: render 12/40 target (30%)" in result.output
        picture = tmp_path / "picture.png"
        Image.new("RGB", (32, 32)).save(picture)
        for args in (["query", "SELECT count(*) FROM images"], ["export", "--to", str(tmp_path / "x")],
                     ["decompose", str(picture)]):  # every command that opens the store says the same
            text = assert_one_line_error(runner.invoke(app, [*args, "--out", str(tmp_path)]), "a build is running",
                                         "render 12/40 target (30%)", f"atlasgen info --out {tmp_path}")
            assert "Conflicting lock" not in text
    finally:
        proc.kill()
        proc.wait()
    # Killed: the status file still says "running", but its process is gone.
    result = runner.invoke(app, ["info", "--out", str(tmp_path)])
    assert result.exit_code == 0 and "tables:" in result.output
    assert f"last build was interrupted (pid {proc.pid} ended without finishing" in result.output


def test_a_killed_stage_shows_as_stopped_and_its_readers_say_it_did_not_finish(tmp_path):
    """A stage row still marked running in a store no build holds (its process was killed) reads "stopped" in
    `info`, not "running"; a stage that needs it says it did not finish, not that it never ran."""
    with Store.open(tmp_path) as store:
        store.remember_build({"preset": "tiny", "config": None, "overrides": {}})
        store.mark_stage_started("layout", "0" * 16, "{}")  # then killed: never marked done or failed
    result = runner.invoke(app, ["info", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if l.strip().startswith("layout"))
    assert "stopped" in line and "running" not in line, result.output
    assert "ended without finishing" in result.output
    assert_one_line_error(runner.invoke(app, ["site", "--out", str(tmp_path), "--quiet"]),
                          "needs the layout stage, which was interrupted", "again to finish it")


def test_ctrl_c_in_a_query_does_not_talk_of_resuming(tmp_path, monkeypatch):
    import atlasgen.query

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(atlasgen.query, "run_query", interrupted)
    result = runner.invoke(app, ["query", "SELECT 1", "--out", str(tmp_path)])
    assert result.exit_code == 130 and "error: interrupted" in result.output, result.output
    assert "resume" not in result.output


def test_status_file_follows_a_build_in_process(tmp_path):
    """Stage, bar counts (quiet too), and the final state; written atomically (no temp left)."""
    from atlasgen import status
    from atlasgen.progress import bar, set_quiet
    set_quiet(True)
    paths = BuildPaths(tmp_path)
    with status.build_status(paths, ["ingest", "embed"]) as st:
        st.stage("embed")
        for _ in bar(range(5), desc="embed", unit="img"):
            pass
        manual = bar(total=10, desc="chunks", unit="chunk")
        manual.update(3)
        manual.update(4)
        st.write(force=True)
        doc = status.read_status(paths)
        assert doc["state"] == "running" and doc["pid"] == os.getpid() and doc["stage"] == "embed"
        assert doc["stage_index"] == 2 and doc["n_stages"] == 2
        assert doc["progress"]["task"] == "chunks" and doc["progress"]["done"] == 7 and doc["progress"]["total"] == 10
        assert status.brief(doc).startswith("stage 2/2 embed: chunks 7/10 chunk (70%)")
    doc = status.read_status(paths)
    assert doc["state"] == "done" and status.describe(doc)[0].startswith("last build finished")
    with pytest.raises(ValueError):
        with status.build_status(paths, ["ingest"]):
            raise ValueError("boom")
    doc = status.read_status(paths)
    assert doc["state"] == "failed" and doc["error"] == "boom"
    assert [p.name for p in tmp_path.iterdir()] == ["atlas.status.json"]


def test_info_on_an_ended_build_says_where_it_stopped_not_a_running_clock():
    """A failed build's stage line shows how long that stage ran before it stopped, not "running for" a time that
    keeps growing, and no ETA."""
    from datetime import datetime, timedelta, timezone
    from atlasgen import status
    now = datetime.now(timezone.utc)
    doc = {"state": "failed", "error": "boom", "pid": 1, "stage": "render", "stage_index": 5, "n_stages": 9,
           "started_at": (now - timedelta(hours=2)).isoformat(), "stage_started_at": (now - timedelta(hours=1)).isoformat(),
           "updated_at": (now - timedelta(minutes=50)).isoformat()}
    head, stage = status.describe(doc)
    assert head.startswith("last build failed 50m 00s ago: boom")
    assert stage.strip() == "stage 5/9 render: stopped after 10m 00s", stage
    doc["progress"] = {"task": "render", "done": 5, "total": 10, "unit": "target", "rate": 2.0, "eta_s": 2.5}
    assert "ETA" not in status.describe(doc)[1] and "ETA" in status.brief(doc)


# --- a full disk -------------------------------------------------------------------------------------------
def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_writing_corpus_copies_is_one_line(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (i * 60, 10, 10)).save(images / f"{i}.png")
    monkeypatch.setattr(Path, "write_bytes", _no_space)
    out = tmp_path / "out"
    text = assert_one_line_error(runner.invoke(app, ["ingest", "--images", str(images), "--out", str(out), "--quiet"]),
                                 "no space left on the device while writing", str(out), "free there",
                                 "run the same command again")
    assert "Errno" not in text
    # The ingest journal (what the rerun resumes from) and its .incoming folder (cleared when the next run
    # starts) are kept on purpose; nothing else may be left.
    from atlasgen.stages.ingest import INCOMING_NAME, JOURNAL_NAME
    left = {p.name for p in (out / "corpus").glob(".*")} - {INCOMING_NAME, JOURNAL_NAME}
    assert not left, f"temp files left: {left}"


def test_full_disk_writing_a_webp_is_one_line(tmp_path, monkeypatch):
    from atlasgen.stages.render import write_webp
    monkeypatch.setattr(Image.Image, "save", _no_space)
    target = tmp_path / "renders" / "feature" / "abc.webp"
    with pytest.raises(DiskFullError) as info:
        write_webp(target, np.zeros((8, 8, 3), np.uint8))
    assert str(target) in info.value.message and "free there" in info.value.message
    assert not any(parse_temp_name(p.name) for p in target.parent.iterdir())


def test_full_disk_saving_safetensors_is_one_line(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own error type, with Rust's io::Error text."""
    from safetensors import SafetensorError

    from atlasgen import sae as sae_mod
    message = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'

    def fail(*args, **kwargs):
        raise SafetensorError(message)
    monkeypatch.setattr(sae_mod, "save_file", fail)
    with pytest.raises(DiskFullError, match="sae.safetensors"):
        sae_mod.SparseAutoencoder(4, 8).save(tmp_path / "sae" / "run")
    # The tiny model is written with save_pretrained into a temp folder (paths.atomic_dir).
    with pytest.raises(DiskFullError, match="tiny-dinov3"):
        with atomic_dir(tmp_path / "models" / "tiny-dinov3"):
            fail()
    assert not list((tmp_path / "models").iterdir())


def test_full_disk_in_duckdb_is_one_line(tmp_path, monkeypatch):
    """DuckDB's own text for a failed write (it keeps no errno), raised mid-build."""
    from atlasgen.store import Store as StoreCls
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30)).save(images / "a.png")

    def fail(self, *args, **kwargs):
        raise duckdb.IOException(f'IO Error: Could not write file "{self.paths.store_path}.wal": '
                                 'No space left on device')
    monkeypatch.setattr(StoreCls, "mark_stage_done", fail)
    out = tmp_path / "out"
    assert_one_line_error(runner.invoke(app, ["ingest", "--images", str(images), "--out", str(out), "--quiet"]),
                          f"while writing {out / 'atlas.duckdb'}", "free there")


# --- oversized images ---------------------------------------------------------------------------------------
def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width × height (Pillow reads the size from IHDR without decoding anything)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height,max_pixels", [
    (20_000, 10_000, 89_478_485),     # 200 M pixels: over Pillow's own 2 × limit, so Pillow raises first
    (12_000, 10_000, 89_478_485),     # 120 M: between the limit and 2 × (Pillow only warns)
    (700, 700, 250_000),              # our smaller ingest.max_pixels
    (40_000, 40_000, 10_000),         # tiny max_pixels, huge image
])
def test_every_oversized_image_gets_our_max_pixels_message(width, height, max_pixels):
    from atlasgen.stages.ingest import SkipInput, decode_image
    with pytest.raises(SkipInput) as info:
        decode_image(png_header_only(width, height), max_pixels, 256)
    reason = str(info.value)
    assert f"ingest.max_pixels = {max_pixels:,}" in reason and f"{width * height:,} pixels" in reason
    assert "DOS attack" not in reason


def test_oversized_image_is_skipped_during_ingest(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "huge.png").write_bytes(png_header_only(20_000, 10_000))
    Image.new("RGB", (40, 30)).save(images / "ok.png")
    out = tmp_path / "out"
    result = runner.invoke(app, ["ingest", "--images", str(images), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    with Store.open(out, read_only=True) as store:
        reason = store.scalar("SELECT reason FROM skipped_inputs WHERE source LIKE '%huge.png'")
    assert "200,000,000 pixels" in reason and "ingest.max_pixels" in reason



@pytest.mark.parametrize("width,height,max_pixels", [
    (10_000, 10_000, None),           # over Pillow's limit, under 2 ×: Pillow only warns (then "truncated")
    (20_000, 10_000, None),           # over 2 ×: Pillow refuses it first
    (700, 700, 250_000),              # the store was ingested with a smaller ingest.max_pixels
])
def test_decompose_of_an_oversized_image_says_so_as_ingest_does(tmp_path, width, height, max_pixels):
    import warnings
    with Store.open(tmp_path / "out") as store:
        if max_pixels is not None:
            store.mark_stage_started("ingest", "0" * 16, json.dumps({"max_pixels": max_pixels}))
            store.mark_stage_done("ingest", {})
    image = tmp_path / "big.png"
    image.write_bytes(png_header_only(width, height))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = runner.invoke(app, ["decompose", str(image), "--out", str(tmp_path / "out")])
    from atlasgen.config import IngestConfig
    limit = max_pixels or IngestConfig().max_pixels
    assert_one_line_error(result, f"{width * height:,} pixels is more than ingest.max_pixels = {limit:,}")
    assert "DecompressionBombWarning" not in result.output and "truncated" not in result.output
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


def test_decompose_reads_what_the_store_s_max_pixels_allows_over_pillow_s_own_limit(tmp_path, monkeypatch):
    """A store ingested with a max_pixels over twice Pillow's limit: decompose reads what ingest accepted
    (Pillow's own refusal is lifted to the store's limit while it reads, as ingest does), then restores it."""
    from atlasgen.decompose import load_image, normalise_like_ingest
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # stands for Pillow's 89 M: 60 × 60 is over 2 ×
    with Store.open(tmp_path / "out") as store:
        store.mark_stage_started("ingest", "0" * 16, json.dumps({"max_pixels": 5_000, "corpus_side": 32}))
        store.mark_stage_done("ingest", {})
        image = tmp_path / "big.png"
        Image.new("RGB", (60, 60), "red").save(image)
        assert load_image(image, 5_000).size == (60, 60)
        assert normalise_like_ingest(store, image).size == (32, 32)
    assert Image.MAX_IMAGE_PIXELS == 1_000


# --- missing artefacts ------------------------------------------------------------------------------------
def test_missing_artefacts_names_what_is_gone(tmp_path):
    from atlasgen.artefacts import missing_artefacts
    store = Store.open(tmp_path)
    con = store.con
    con.execute("INSERT INTO images VALUES (0, 'a.png', NULL, NULL, 4, 4, 'corpus/00000000.jpg'), "
                "(1, 'b.png', NULL, NULL, 4, 4, 'corpus/00000001.jpg')")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "00000000.jpg").write_bytes(b"x")
    assert missing_artefacts(store, "ingest") == "1 of 2 corpus copies are missing (e.g. corpus/00000001.jpg)"
    (tmp_path / "corpus" / "00000001.jpg").write_bytes(b"x")
    assert missing_artefacts(store, "ingest") is None
    assert missing_artefacts(store, "embed") is None, "embed's output is rows only"
    con.execute("INSERT INTO sae_runs (run_id, weights_path, created_at) VALUES ('r1', 'sae/r1/sae.safetensors', now())")
    (tmp_path / "sae" / "r1").mkdir(parents=True)
    (tmp_path / "sae" / "r1" / "sae.safetensors").write_bytes(b"x")
    assert missing_artefacts(store, "train") == "1 of 2 SAE files are missing (e.g. sae/r1/sae.json)"
    con.execute("INSERT INTO renders (render_id, kind, path) VALUES ('x', 'feature', 'renders/feature/x.webp')")
    assert missing_artefacts(store, "render") == "its renders renders/feature/x.webp is missing"
    assert "map index" in missing_artefacts(store, "layout")
    assert "site pages" in missing_artefacts(store, "site")
    assert "toy files" in missing_artefacts(store, "toy")
    store.close()


# --- headers: serve and netlify.toml from one table ---------------------------------------------------------
def test_netlify_toml_has_exactly_the_header_table():
    from atlasgen.headers import HEADER_RULES, netlify_headers_toml
    config = tomllib.loads((REPO / "netlify.toml").read_text())
    assert [(h["for"], h["values"]) for h in config["headers"]] == [(p, dict(v)) for p, v in HEADER_RULES]
    assert netlify_headers_toml() in (REPO / "netlify.toml").read_text(), "regenerate: python -m atlasgen.headers"
    assert config["build"]["publish"] == "build/site"


def test_serve_sends_the_netlify_headers(tmp_path):
    import threading

    from atlasgen.headers import headers_for
    from atlasgen.serve import make_server
    site = tmp_path / "site"
    (site / "map" / "0123456789abcdef" / "0").mkdir(parents=True)
    (site / "index.html").write_text("<title>x</title>")
    (site / "map" / "0123456789abcdef" / "0" / "0_0.webp").write_bytes(b"RIFF")
    netlify = tomllib.loads((REPO / "netlify.toml").read_text())["headers"]
    server = make_server(site, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for url_path in ("/index.html", "/map/0123456789abcdef/0/0_0.webp"):
            with urllib.request.urlopen(base + url_path, timeout=10) as resp:
                sent = dict(resp.headers)
            expected = {}
            for rule in netlify:  # what Netlify would send: every matching rule, later ones adding
                if url_path.startswith(rule["for"].rstrip("*")):
                    expected.update(rule["values"])
            assert expected == headers_for(url_path)
            for name, value in expected.items():
                assert sent.get(name) == value, (url_path, name)
        assert "Permissions-Policy" in sent and sent["Cache-Control"].endswith("immutable")
    finally:
        server.shutdown()
        server.server_close()


def test_serve_is_quiet_when_the_browser_cancels_a_request(tmp_path, capsys):
    """A reset connection (the reader left the page while pictures loaded) prints nothing; another error still
    prints its traceback."""
    from atlasgen.serve import make_server
    (tmp_path / "index.html").write_text("<title>x</title>")
    server = make_server(tmp_path, port=0)
    try:
        for error in (ConnectionResetError(104, "Connection reset by peer"), BrokenPipeError(32, "Broken pipe"),
                      ValueError("a real bug")):
            try:
                raise error
            except Exception:
                server.handle_error(None, ("127.0.0.1", 5))
        err = capsys.readouterr().err
        assert "ValueError: a real bug" in err
        assert "ConnectionResetError" not in err and "BrokenPipeError" not in err
    finally:
        server.server_close()


def test_a_failed_bulk_insert_raises_its_own_error(tmp_path):
    """A failing INSERT from a registered Arrow table is the error raised (unregistering after it may fail
    too in an aborted transaction, and must not hide it)."""
    from atlasgen.store import Store
    from atlasgen.testing import make_synthetic_store
    with Store.open(make_synthetic_store(tmp_path / "out", n_features=8, n_images=20)) as store:
        with pytest.raises(Exception) as err:
            with store.transaction():
                store.insert_frame("no_such_table", {"a": [1, 2]})
        assert "no_such_table" in str(err.value)
        assert store.query("SELECT 1")[0][0] == 1  # the connection is usable afterwards



# --- options that name paths: a file in the way is one line, before any work --------------------------------
@pytest.mark.parametrize("command", [["ingest", "--preset", "tiny"], ["build", "--preset", "tiny"], ["info"],
                                     ["query", "SELECT 1"], ["serve"], ["export", "--to", "export"],
                                     ["decompose", "photo.png"]], ids=lambda c: c[0])
@pytest.mark.parametrize("where", ["file", "inside-file"])
def test_out_that_is_a_file_is_one_line(tmp_path, command, where):
    (tmp_path / "somefile").write_text("not a folder")
    out = tmp_path / "somefile" if where == "file" else tmp_path / "somefile" / "sub"
    result = runner.invoke(app, [*command, "--out", str(out)])
    assert_one_line_error(result, f"--out {out} is ", "is a file" if where == "file" else "which is a file")
    assert (tmp_path / "somefile").read_text() == "not a folder"


def test_export_to_and_decompose_html_that_cannot_be_written_are_one_line(tmp_path):
    (tmp_path / "somefile").write_text("not a folder")
    (tmp_path / "folder").mkdir()
    Store.open(tmp_path / "out").close()  # an empty store: export gets as far as making its folder
    out = ["--out", str(tmp_path / "out")]
    result = runner.invoke(app, ["export", "--to", str(tmp_path / "somefile" / "sub"), *out])
    assert_one_line_error(result, "--to", "which is a file")
    result = runner.invoke(app, ["decompose", "photo.png", "--html", str(tmp_path / "folder"), *out])
    assert_one_line_error(result, "--html", "is a folder, not a file")
    result = runner.invoke(app, ["decompose", "photo.png", "--html", str(tmp_path / "somefile" / "x.html"), *out])
    assert_one_line_error(result, "--html", "which is a file")
    if Path("/proc/self").is_dir():  # a folder where nothing can be made (Linux): found when it is made
        result = runner.invoke(app, ["export", "--to", "/proc/atlasgen-export", *out])
        assert_one_line_error(result, "cannot create /proc/atlasgen-export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "out", "somefile"]


# --- option values checked as they are read --------------------------------------------------------------------
@pytest.mark.parametrize("command", [["decompose", "photo.png"], ["embed"], ["render"], ["build"]],
                         ids=lambda c: c[0])
@pytest.mark.parametrize("device", ["gpu", "CPU"])
def test_device_is_checked_by_every_command_that_takes_it(tmp_path, command, device):
    result = runner.invoke(app, [*command, "--out", str(tmp_path / "out"), "--device", device])
    assert_one_line_error(result, f"--device {device} is not one of auto, cpu, cuda")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("port", ["99999", "65536", "-1"])
def test_serve_port_out_of_range_is_one_line(tmp_path, port):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<title>x</title>")
    result = runner.invoke(app, ["serve", "--out", str(tmp_path), "--port", port])
    assert_one_line_error(result, f"--port {port} is not a TCP port")


def test_ctrl_c_inside_a_duckdb_statement_of_a_stage_is_an_interrupt(tmp_path, monkeypatch):
    """DuckDB reports Ctrl-C during a statement as RuntimeError "Query interrupted": the stage is recorded
    interrupted (not failed) and the command exits 130 with one line."""
    from atlasgen.stages import ingest

    def interrupted(cfg, store):
        raise RuntimeError("Query interrupted")
    monkeypatch.setattr(ingest, "candidates_for", interrupted)
    out = tmp_path / "out"
    result = runner.invoke(app, ["ingest", "--preset", "tiny", "--out", str(out), "--quiet"])
    assert result.exit_code == 130 and "Traceback" not in result.output, (result.output, result.exception)
    assert result.output.splitlines()[0] == "error: interrupted"
    with Store.open(out, read_only=True) as store:
        assert store.stage_row("ingest")["status"] == "interrupted"
    assert json.loads(BuildPaths(out).status_path.read_text())["state"] == "interrupted"


EMPTY_OPTIONS = [
    (["ingest", "--preset", "tiny", "--images", ""], "--images"),   # was: the whole working folder, recursively
    (["ingest", "--preset", "tiny", "--out", ""], "--out"),         # was: a build in the working folder
    (["ingest", "--preset", "tiny", "--model", ""], "--model"),
    (["ingest", "--preset", "tiny", "--config", ""], "--config"),   # was: the working folder as a config file
    (["ingest", "--dataset", " "], "--dataset"),
    (["ingest", "--preset", ""], "--preset"),
    (["embed", "--ray-address", ""], "--ray-address"),
    (["render", "--features", ""], "--features"),                  # was: silently the config's features
    (["decompose", ""], "an IMAGE argument"),
    (["decompose", "photo.png", "--html", ""], "--html"),
    (["export", "--to", ""], "--to"),
    (["serve", "--host", ""], "--host"),                            # was: listening on every interface
]


@pytest.mark.parametrize("args,option", EMPTY_OPTIONS, ids=[option for _, option in EMPTY_OPTIONS])
def test_empty_path_or_name_option_is_one_line(tmp_path, monkeypatch, args, option):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photo.png").write_bytes(b"not read")
    out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
    result = runner.invoke(app, [*args, *out])
    assert_one_line_error(result, f"error: {option} is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"], "nothing was made"


def test_a_parent_that_cannot_be_looked_at_leaves_the_word_to_mkdir(tmp_path, monkeypatch):
    """A parent folder we may not stat (EACCES; root cannot make one, so stat is made to refuse): the check
    stands aside instead of raising, and making the folder says why in one line."""
    real_stat = Path.stat
    locked = tmp_path / "locked"

    def stat(self, *args, **kwargs):
        if self != locked and self.is_relative_to(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)
    locked.mkdir()
    monkeypatch.setattr(Path, "stat", stat)
    assert paths_mod.file_in_the_way(locked / "out" / "sub") is None
    paths_mod.check_folder_target(locked / "out", "--out")  # no error: mkdir will tell


def test_messages_and_the_error_line_do_not_stick_to_a_progress_bar(monkeypatch):
    """A stage's message while its bar is drawn, and the CLI's error line after an error or Ctrl-C left a bar
    open, each start on a line of their own (the bar is cleared first), not after the bar's text."""
    import io
    import typer
    from atlasgen import cli, progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(progress, "_quiet", False)
    open_bar = progress.bar(total=10, desc="train SAE", unit="step")
    open_bar.update(3)
    progress.say("ingest: kept")
    with pytest.raises(typer.Exit):
        cli._fail("interrupted", code=130)
    text = err.getvalue()
    assert "train SAE" in text
    for line in ("ingest: kept\n", "error: interrupted\n"):
        before = text[:text.index(line)]
        assert before.endswith("\r") or before.endswith("\n"), repr(before[-80:])
