"""Ingest throughput and peak memory: today's path (a copy of the loop ingest had before worker processes:
decode threads, every write in the main process) against the stage as it is now (worker processes that decode
and write the corpus copies; the main process only renames and journals), both in this run, on generated
ImageNet-sized JPEGs (500×375, ~60 KB, one sub-folder per class).

Each run is a fresh process, as `atlasgen ingest` is: it pays its own start-up, the resize kernels' included
where the stage loads them. Each contender runs at two corpus sizes (N/4 and N); the rate is taken from the N
run (the best of `--rounds`, alternating the contenders, as other jobs may share the machine), and the peak
memory at both sizes shows whether memory grows with the corpus: the process's peak RSS plus its workers' peak
unique memory (USS; pages they share with the process count once). The last lines check that all paths
produced the same rows and byte-identical corpus copies.

    python benchmarks/ingest.py --n-images 8000      # a 16-core machine (budget: well under 100 s)
    python benchmarks/ingest.py                      # 400 images, best of 2 rounds: a 2-core box, ~1 minute
    python benchmarks/ingest.py --quick              # 200 images

The new path also runs with Pillow alone, so one run shows what the resize kernels (atlasgen.resample) change
at each size: the stage loads them in a thread while its workers start with Pillow, for corpora big enough
(`resample.worth_loading`). A line before the runs times the resize alone and the kernels' start-up.

Every run prints its line as it ends (indented), so a run cut short by a timeout still shows what it measured;
the summary follows. A last timing restores one lost corpus copy of the new path's N run, with the journal the
stage keeps after it commits (that input alone decoded again) and without it (every input read again).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Iterator

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlasgen import resample  # noqa: E402
from atlasgen.config import IngestConfig  # noqa: E402
from atlasgen.paths import atomic_path  # noqa: E402
from atlasgen.progress import set_quiet  # noqa: E402
from atlasgen.stages import ingest  # noqa: E402
from atlasgen.store import Store  # noqa: E402
from atlasgen.testing import (PeakMemory, fresh_process_result, make_photo_folder, print_result,  # noqa: E402
                              two_size_reading, no_two_size_reading)
from atlasgen.threads import n_cores  # noqa: E402
from atlasgen.workers import resolve_n_workers  # noqa: E402

GIB = 2 ** 30


# --- today's path: ingest.run before worker processes (kept verbatim apart from names) ----------------------
def _today_ordered_map(fn, items: Iterable, n_workers: int, window: int) -> Iterator:
    with ThreadPoolExecutor(max_workers=max(1, n_workers), thread_name_prefix="ingest") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append((item, pool.submit(fn, item)))
                if len(pending) >= window:
                    yield pending.popleft()
            while pending:
                yield pending.popleft()
        finally:
            for _, fut in pending:
                fut.cancel()


def today_folder_candidates(folder: Path) -> tuple[list[ingest.Candidate], list[tuple[str, str]]]:
    """Today's listing of a class-folder corpus (a Path per file, each resolved to rule out the label files)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not ingest._is_ignored(d))
        out.extend(Path(root) / f for f in sorted(files) if not ingest._is_ignored(f))
    own_files: set[Path] = set()
    images, skipped = [], []
    for path in sorted(out):
        if path.resolve() in own_files:
            continue
        if path.suffix.lower() in ingest.IMAGE_EXTENSIONS:
            images.append(path)
        else:
            skipped.append((str(path), f"not an image file (extension {path.suffix or 'none'})"))
    rows = [(p, p.relative_to(folder).parts[0] if len(p.relative_to(folder).parts) > 1 else None) for p in images]
    return [ingest.Candidate(str(p), label, p) for p, label in rows], skipped


def today_ingest(cfg: IngestConfig, store: Store) -> dict:
    kind, rest = ingest.parse_source(cfg.source)
    assert kind == "folder", "the benchmark's corpus is a folder"
    candidates, skipped = today_folder_candidates(Path(rest).expanduser().resolve())
    total = len(candidates)

    def work(cand):
        data = cand.read if isinstance(cand.read, Path) else cand.read()
        return ingest.decode_image(data, cfg.max_pixels, cfg.corpus_side)

    rows: dict[str, list] = {k: [] for k in ("image_id", "source", "label", "width", "height", "corpus_path")}
    n_workers = max(1, cfg.n_workers)
    pil_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(cfg.max_pixels, pil_limit or 0)
    out_dir = store.paths.out_dir
    try:
        for cand, fut in _today_ordered_map(work, candidates, n_workers, window=4 * n_workers + 4):
            try:
                decoded = fut.result()
            except ingest.SkipInput as e:
                skipped.append((cand.source, str(e)))
                continue
            image_id = len(rows["image_id"])
            corpus_path = store.paths.corpus_image(image_id)
            with atomic_path(corpus_path) as tmp_path:
                tmp_path.write_bytes(decoded.jpeg)
            for key, value in (("image_id", image_id), ("source", cand.source), ("label", cand.label),
                               ("width", decoded.width), ("height", decoded.height),
                               ("corpus_path", corpus_path.relative_to(out_dir).as_posix())):
                rows[key].append(value)
            if cfg.limit and len(rows["image_id"]) >= cfg.limit:
                break
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit
    ingest.commit_images(store, rows, skipped)  # the same commit as the stage: only the reading differs
    assert total == len(rows["image_id"]) + len(skipped) or cfg.limit
    return {"n_images": len(rows["image_id"])}


def ingest_without_kernels(cfg: IngestConfig, store: Store) -> dict:
    """The stage with Pillow alone (the resize kernels never loaded, whatever the corpus size)."""
    saved = resample.worth_loading
    resample.worth_loading = lambda n_images, n_workers: False
    try:
        return ingest.run(cfg, store)
    finally:
        resample.worth_loading = saved


# --one NAME runs one of these in a fresh process.
PATHS = {"today": today_ingest, "new": ingest.run, "new-pillow": ingest_without_kernels}


_RESIZE_CHECK = """
import json, resource, sys, time
from pathlib import Path
from PIL import Image
from atlasgen import resample
picture = Image.open(sys.argv[1]).convert("RGB")
t0 = time.perf_counter()
why_not = resample.prepare()
start_s = time.perf_counter() - t0
def best_ms(fn):
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(100):
            fn()
        runs.append((time.perf_counter() - t0) * 10)
    return min(runs)
pil_ms = best_ms(lambda: picture.resize((341, 256), Image.BICUBIC, reducing_gap=3.0))
kernel_ms = None if why_not else best_ms(lambda: resample.bicubic(picture, (341, 256)))
# A worker's whole step per photo (decode, resize, JPEG encode) over distinct photos, as ingest runs it: what
# the allocator does between pictures shows here, not in a loop over one picture.
from atlasgen.stages.ingest import decode_image
photos = [p.read_bytes() for p in sorted(Path(sys.argv[1]).parent.parent.rglob("*.jpg"))[:200]]
def per_photo(fast):
    decode_image(photos[0], 10 ** 9, 256, fast)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for data in photos:
        decode_image(data, 10 ** 9, 256, fast)
    seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return seconds * 1e3 / len(photos), (r1.ru_minflt - r0.ru_minflt) / len(photos)
step = {"pil": [], "kernel": []}
for _ in range(3):
    step["pil"].append(per_photo(False))
    if not why_not:
        step["kernel"].append(per_photo(True))
print(json.dumps({"why_not": why_not, "start_s": start_s, "pil_ms": pil_ms, "kernel_ms": kernel_ms,
                  "n_photos": len(photos), "step": {k: min(v) if v else None for k, v in step.items()}}))
"""


def resize_line(folder: Path) -> str:
    """The worker's biggest step, one 500×375 picture shrunk to 341×256: Pillow against the kernels (best of 3 ×
    100 calls), and the kernels' start-up (`resample.prepare()`: numba's import and first call), each in a fresh
    process, twice (the first compiles if nothing is cached yet); and a worker's whole step per photo (decode,
    resize, encode) over distinct photos with each, with its page faults."""
    picture_path = next(folder.rglob("*.jpg"))
    got = []
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", _RESIZE_CHECK, str(picture_path)], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent.parent)
        if run.returncode:
            last = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit code {run.returncode}"
            return f"resize check FAILED: {last}"
        got.append(json.loads(run.stdout.strip().splitlines()[-1]))
    first, second = got
    if second["why_not"]:
        return f"resize kernels unavailable here: {second['why_not']}"
    return (f"resize of one 500×375 picture to 341×256 (a worker's biggest step): Pillow {second['pil_ms']:.2f} "
            f"ms, kernels {second['kernel_ms']:.2f} ms ({second['pil_ms'] / second['kernel_ms']:.2f}x); the "
            f"kernels' start-up (numba's import and first call, in a process with atlasgen loaded) "
            f"{second['start_s']:.2f} s ({first['start_s']:.2f} s the time before, which compiles if nothing was "
            f"cached)\n{_step_line(second)}")


def _step_line(check: dict) -> str:
    (pil_ms, pil_faults), (kernel_ms, kernel_faults) = check["step"]["pil"], check["step"]["kernel"]
    return (f"a worker's step per photo (decode, resize, JPEG encode; {check['n_photos']} distinct photos, one "
            f"core, best of 3): Pillow {pil_ms:.2f} ms ({pil_faults:.0f} page faults), kernels {kernel_ms:.2f} ms "
            f"({kernel_faults:.0f} page faults), {pil_ms / kernel_ms:.2f}x")


# --- measuring ----------------------------------------------------------------------------------------------
def one_run(args) -> None:
    """`--one NAME`: a single ingest in this fresh process, as `atlasgen ingest` runs it (nothing loaded that the
    stage loads itself, such as the resize kernels); prints one RESULT line of JSON."""
    set_quiet(True)
    cfg = IngestConfig(source=args.source, n_workers=args.n_workers, limit=args.limit)
    with Store.open(Path(args.store)) as store:
        with PeakMemory() as peak:
            t0 = time.perf_counter()
            summary = PATHS[args.one](cfg, store)
            seconds = time.perf_counter() - t0
    print_result({"seconds": seconds, "n_images": summary["n_images"], "main_bytes": peak.main_bytes,
                  "workers_bytes": peak.workers_bytes, "timeline_s": summary.get("timeline_s", {}),
                  "fast_resize": summary.get("fast_resize")})


def measure(which: str, cfg: IngestConfig, out_dir: Path) -> tuple[float, int, SimpleNamespace, dict]:
    """(seconds, images, peak memory of the process and its workers, the stage's timeline and kernel use) of one
    ingest into a fresh folder, in a fresh process: each path pays its own start-up, as `atlasgen ingest` does."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", which, "--store", str(out_dir),
           "--source", cfg.source, "--n-workers", str(cfg.n_workers), "--limit", str(cfg.limit)]
    r = fresh_process_result(cmd)
    peak = SimpleNamespace(main_bytes=r["main_bytes"], workers_bytes=r["workers_bytes"],
                           peak_bytes=r["main_bytes"] + r["workers_bytes"])
    return r["seconds"], r["n_images"], peak, {**r["timeline_s"], "fast_resize": r["fast_resize"]}


def repair_line(out_dir: Path, cfg: IngestConfig) -> str:
    """Restoring one lost corpus copy of the finished ingest in `out_dir`, in a fresh process each: without the
    journal (every input read again, what the stage did before it kept its journal) and with it (that input
    alone decoded again)."""
    lost = out_dir / "corpus" / "00000001.jpg"
    seconds = {}
    for name in ("without", "with"):  # the run without it writes the journal again for the next one
        lost.unlink()
        if name == "without":
            (out_dir / "corpus" / ingest.JOURNAL_NAME).unlink()
        seconds[name], n_images, _, _ = measure("new", cfg, out_dir)
        assert lost.is_file(), "the repair did not restore the lost copy"
    return (f"restoring one lost corpus copy of {n_images} images (fresh processes): every input read again "
            f"{seconds['without']:.2f} s; from the journal, that input alone {seconds['with']:.2f} s "
            f"({seconds['without'] / max(seconds['with'], 1e-9):.1f}x faster)")


def _timeline(timeline: dict) -> str:
    if not {"listed", "first_result", "read", "done"} <= set(timeline):
        return ""
    kernels = ""
    if "kernels_ready" in timeline:
        kernels = (f", resize kernels ready {timeline['kernels_ready']:.2f} s "
                   f"({'swapped in' if timeline['fast_resize'] else 'not used'})")
    return (f"; timeline: inputs listed {timeline['listed']:.2f} s, first copies {timeline['first_result']:.2f} s"
            f"{kernels}, all read {timeline['read']:.2f} s, committed {timeline['done']:.2f} s")


def _mem(peak: SimpleNamespace) -> str:
    return (f"{peak.peak_bytes / GIB:.2f} GiB (the process {peak.main_bytes / GIB:.2f} + workers "
            f"{peak.workers_bytes / GIB:.2f})")


def same_result(dir_a: Path, dir_b: Path) -> str:
    with Store.open(dir_a, read_only=True) as a, Store.open(dir_b, read_only=True) as b:
        sql = "SELECT image_id, source, label, label_id, width, height, corpus_path FROM images ORDER BY image_id"
        rows_a, rows_b = a.query(sql), b.query(sql)
    if rows_a != rows_b:
        return f"NO: the images tables differ ({len(rows_a)} vs {len(rows_b)} rows)"
    n_diff = sum((dir_a / r[6]).read_bytes() != (dir_b / r[6]).read_bytes() for r in rows_a)
    if n_diff:
        return f"NO: {n_diff} of {len(rows_a)} corpus copies differ"
    return f"yes ({len(rows_a)} rows, every corpus copy byte-identical)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=0, help="corpus size N (default 8,000 with ≥ 8 cores, "
                                                                  "else 400); N/4 is the small size")
    parser.add_argument("--quick", action="store_true", help="200 images")
    parser.add_argument("--new-only", action="store_true",
                        help="time only the new path (a scale check: today's path at 50,000 images takes minutes)")
    parser.add_argument("--n-workers", type=int, default=0, help="the new path's workers (0: one per core)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds at size N, best kept (default: 1 with ≥ 8 "
                                                               "cores, else 2)")
    # One run in a fresh process (what measure() starts): internal.
    parser.add_argument("--one", choices=sorted(PATHS), help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one_run(args)
        return
    cores = n_cores()
    args.rounds = args.rounds or (1 if cores >= 8 else 2)
    n_images = args.n_images or (200 if args.quick else 8000 if cores >= 8 else 400)
    n_small = max(1, n_images // 4)
    set_quiet(True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="atlasgen-bench-ingest-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        folder = make_photo_folder(tmp_path / "images", n_images)
        print(f"ingest benchmark: {cores} cores; corpus: {n_images} generated 500×375 JPEGs in 10 class folders "
              f"(written in {time.perf_counter() - t0:.1f} s by {cores} processes), corpus copies at 256 px",
              flush=True)
        source = f"folder:{folder}"
        listing = {}
        for name, list_fn in (("today", lambda: today_folder_candidates(folder)),
                              ("new", lambda: ingest.folder_candidates(folder, IngestConfig(source=source)))):
            t0 = time.perf_counter()
            list_fn()
            listing[name] = time.perf_counter() - t0
        print(f"listing the {n_images} files (serial, before any decoding): today's {listing['today']:.3f} s, "
              f"new {listing['new']:.3f} s ({listing['today'] / max(listing['new'], 1e-9):.1f}x)", flush=True)
        print(resize_line(folder), flush=True)
        # (name, path, config, both sizes): the extra baseline with more threads is timed at N only.
        today_name = "today's path (2 decode threads, the old default)"
        contenders = [(today_name, "today", IngestConfig(source=source, n_workers=2), True)]
        if args.new_only:
            contenders = []
        elif cores > 2:
            contenders.append((f"today's path with {cores} decode threads", "today",
                               IngestConfig(source=source, n_workers=cores), False))
        n_new = resolve_n_workers(args.n_workers)
        new_cfg = IngestConfig(source=source, n_workers=args.n_workers)
        # The stage as it is decides on the resize kernels by corpus size; against it, Pillow alone.
        contenders.append((f"new path ({n_new} worker processes)", "new", new_cfg, True))
        contenders.append(("new path, Pillow alone (no resize kernels)", "new-pillow", new_cfg, True))
        kernels_at = {size: resample.worth_loading(size, n_new) for size in (n_small, n_images)}
        print(f"the new path loads its resize kernels (while its workers start with Pillow) at "
              f"{n_small} images: {'yes' if kernels_at[n_small] else 'no'}, at {n_images}: "
              f"{'yes' if kernels_at[n_images] else 'no'}", flush=True)
        small: dict[str, tuple[int, SimpleNamespace, float, dict]] = {}  # name → (images, peak, seconds, timeline)
        best: dict[str, tuple[float, int, SimpleNamespace, dict]] = {}  # name → measure() of the fastest round
        for k, (name, which, cfg, both_sizes) in enumerate(contenders):  # the small size: memory only
            if both_sizes:
                try:
                    seconds, n_done, peak, timeline = measure(which, replace(cfg, limit=n_small),
                                                              tmp_path / f"small{k}")
                    small[name] = (n_done, peak, seconds, timeline)
                    print(f"  {name}, {n_done} images: {n_done / seconds:.1f} img/s, peak memory {_mem(peak)}"
                          f"{_timeline(timeline)}", flush=True)
                except Exception as e:  # one failing contender must not cost the others' figures
                    print(f"{name}, {n_small} images: FAILED: {type(e).__name__}: {e}", flush=True)
                    traceback.print_exc()
        for r in range(args.rounds):  # other jobs may share the machine: alternate, keep each one's best round
            for k, (name, which, cfg, _) in enumerate(contenders):
                try:
                    got = measure(which, cfg, tmp_path / f"out{k}-{r}")
                    print(f"  {name}, {got[1]} images: {got[1] / got[0]:.1f} img/s ({got[0]:.1f} s), peak memory "
                          f"{_mem(got[2])}{_timeline(got[3])}", flush=True)
                    if name not in best or got[0] < best[name][0]:
                        best[name] = got
                except Exception as e:
                    print(f"{name}, {n_images} images: FAILED: {type(e).__name__}: {e}", flush=True)
                    traceback.print_exc()
        for name, (seconds, n_done, peak, _) in best.items():
            rate = n_done / seconds
            vs = (f"   {rate / (best[today_name][1] / best[today_name][0]):.2f}x today's"
                  if name != today_name and today_name in best else "")
            print(f"{name}, {n_done} images: {rate:8.1f} img/s ({seconds:.1f} s){vs}", flush=True)
        new_name, pillow_name = contenders[-2][0], contenders[-1][0]
        if new_name in best and pillow_name in best:
            ratio = (best[new_name][1] / best[new_name][0]) / (best[pillow_name][1] / best[pillow_name][0])
            print(f"{new_name}: {ratio:.2f}x the rate of the {pillow_name}", flush=True)
        for name, (n_a, p_a, s_a, t_a) in small.items():
            if name not in best:
                continue
            s_b, n_b, p_b, t_b = best[name]
            # The resize kernels load only above a corpus size: where one size loaded them and the other did not,
            # memory takes a step (numba's modules, ~0.1 GiB; not growth with the corpus) and the two sizes ran
            # different code.
            step = ("kernels_ready" in t_a) != ("kernels_ready" in t_b)
            print(f"peak memory, {name}: {n_a} images {_mem(p_a)}; {n_b} images {_mem(p_b)} "
                  f"(×{p_b.peak_bytes / max(p_a.peak_bytes, 1):.2f} for ×{n_b / n_a:.0f} images"
                  f"{'; the resize kernels loaded at the larger size only: numba modules' if step else ''})",
                  flush=True)
            # wall = fixed + n / steady, read off the two sizes (both list the whole folder: the listing counts
            # as fixed here): how much of the rate is start-up and what a large corpus would reach.
            reading = two_size_reading(n_a, s_a, n_b, s_b)
            if reading is None:
                print(no_two_size_reading(name), flush=True)
            else:
                fixed, steady = reading
                print(f"two-size reading, {name}: ~{fixed:.2f} s fixed + {steady:,.0f} img/s steady; at 50,000 "
                      f"images ~{50_000 / (fixed + 50_000 / steady):,.0f} img/s (an estimate from two measured "
                      f"points{'; they ran with and without the resize kernels' if step else ''})", flush=True)
        k_new = next(k for k, c in enumerate(contenders) if c[0] == new_name)
        try:
            print(repair_line(tmp_path / f"out{k_new}-0", contenders[k_new][2]), flush=True)
        except Exception as e:
            print(f"repair FAILED: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
        for k in range(1, len(contenders)):
            try:
                same = same_result(tmp_path / "out0-0", tmp_path / f"out{k}-0")
                print(f"result of {contenders[k][0]} identical to {contenders[0][0]}'s: {same}", flush=True)
            except Exception as e:
                print(f"comparison FAILED: {type(e).__name__}: {e}", flush=True)
    print(f"benchmark wall time: {time.perf_counter() - t_start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
