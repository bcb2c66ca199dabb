"""Embed throughput and peak memory on the real ViT-S/16 shape (random weights), all measured in this run:

- the model-only ceiling: the model's forward on uint8 batches already on the device (what embed could reach);
- where today's time goes: one core's decode + resize per image, the float copy to the device, the model, and
  the commit of a chunk of FLOAT[] rows (today's path does all but decode in one thread, one after the other);
  with it a loader worker's step per image with Pillow against the resize kernels (`atlasgen.resample`), which
  the new path's workers get on a GPU's long runs (`loader.kernels_mode`);
- today's path: a copy of the loop embed had before worker processes (decode threads, the model and every
  commit in the main thread, float batches copied from ordinary memory);
- the new path: `atlasgen.stages.embed.run` (decode in worker processes into shared memory, pinned memory and
  non-blocking copies on CUDA, auto batch size on a GPU, commits in a writer thread);
- on a CPU also the naive loop of earlier figures (the Hugging Face model called batch by batch in fp32 on
  PIL-preprocessed source JPEGs, no overlap, torch's default threads).

The corpus: generated ImageNet-sized photos (500×375 JPEG, ~60 KB) ingested to 256 px copies. Today's and the
new path each run in a fresh process (as `atlasgen embed` does; torch imported and CUDA initialised before the
clock starts, with the model classes' import) at two corpus sizes, N and a smaller one (N/4, or 4 batches of the
new path where N allows, so a CPU's ring of 3 batches is full at both; a GPU's ring holds what the workers decode
while the model loads, 13 batches of 512 for 16 workers, so its memory is flat from 4 × 13 × 512 images on: run N =
50,000 to see that). The rate is images over the wall time of the stage's `run()`, model
loading included ("end to end"; the new path decodes while the model loads), at N; the peak memory at both
sizes shows whether memory grows with N: the process's peak RSS plus its workers' peak unique memory (USS;
pages shared with the process, such as the shared-memory batches, count once).

    python benchmarks/embed.py --device cuda --n-images 8000    # a GPU machine (budget: well under 100 s)
    python benchmarks/embed.py --device cpu --quick             # 2-core box: 48 images, a few minutes

Every run prints its line as it ends (indented), so a run cut short by a timeout still shows what it measured;
the summary follows.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlasgen.config import EmbedConfig, IngestConfig  # noqa: E402
from atlasgen.model import (IMAGENET_MEAN, IMAGENET_STD, arrays_to_batch, ensure_random_model,  # noqa: E402
                            load_embedding_model, resolve_device, vits16_config)
from atlasgen.progress import bar, set_quiet  # noqa: E402
from atlasgen.stages import embed, ingest  # noqa: E402
from atlasgen.loader import DEFAULT_SLOTS, CorpusBatches, load_corpus_array, load_corpus_into, ring_slots  # noqa: E402
from atlasgen.store import Store  # noqa: E402
from atlasgen.testing import (PeakMemory, fresh_process_result, make_photo_folder, print_result,  # noqa: E402
                              two_size_reading, no_two_size_reading)
from atlasgen.threads import ThreadTuner, n_cores, restore_torch_threads  # noqa: E402
from atlasgen import resample, workers  # noqa: E402
from atlasgen.workers import resolve_n_workers  # noqa: E402

GIB = 2 ** 30


# --- today's path: embed.run before worker processes (kept verbatim apart from names) -------------------------
def today_embed_batch(model, arrays_bhw3: np.ndarray) -> np.ndarray:
    device = next(model.backbone.parameters()).device
    with torch.inference_mode():
        return model(arrays_to_batch(arrays_bhw3).to(device)).cpu().numpy()


def today_embed(cfg: EmbedConfig, store: Store) -> dict:
    todo = store.images_without_embedding()
    model = load_embedding_model(cfg.model, cfg.device, cfg.precision, models_dir=store.paths.models_dir)
    size, mode = model.spec.image_size, model.spec.resize_mode
    out_dir = store.paths.out_dir
    n_embedded = 0
    t0 = time.perf_counter()

    def decode(item: tuple[int, str]) -> np.ndarray | str:
        try:
            return load_corpus_array(out_dir / item[1], size, mode)
        except Exception as e:
            return f"cannot read the corpus copy {item[1]}: {e}"

    chunks = [todo[i:i + cfg.chunk_size] for i in range(0, len(todo), cfg.chunk_size)]
    tuner = ThreadTuner(cfg.n_threads, -(-len(todo) // cfg.batch_size))
    with restore_torch_threads(), ThreadPoolExecutor(max(1, cfg.n_workers), thread_name_prefix="embed-decode") as pool, \
            bar(total=len(todo), desc="embed", unit="img"):
        batches = [batch for chunk in chunks for batch in _split(chunk, cfg.batch_size)]
        ahead: deque[list[Future]] = deque()
        next_batch = 0

        def submit_more() -> None:
            nonlocal next_batch
            while next_batch < len(batches) and len(ahead) < 2:
                ahead.append([pool.submit(decode, item) for item in batches[next_batch]])
                next_batch += 1

        for chunk in chunks:
            chunk_ids: list[int] = []
            chunk_emb: list[np.ndarray] = []
            for batch in _split(chunk, cfg.batch_size):
                submit_more()
                results = [f.result() for f in ahead.popleft()]
                submit_more()
                good = [(item, r) for item, r in zip(batch, results) if not isinstance(r, str)]
                if good:
                    tuner.before_batch()
                    t_batch = time.perf_counter()
                    emb_bd = today_embed_batch(model, np.stack([r for _, r in good]))
                    tuner.after_batch(time.perf_counter() - t_batch, len(good))
                    chunk_ids.extend(item[0] for item, _ in good)
                    chunk_emb.append(emb_bd)
            if chunk_ids:
                store.add_embeddings(np.asarray(chunk_ids), np.concatenate(chunk_emb))
                n_embedded += len(chunk_ids)
    seconds = time.perf_counter() - t0
    return {"n_embedded": n_embedded, "images_per_s": round(n_embedded / seconds, 1),
            "n_threads": tuner.mostly_used, "dtype": str(model.dtype).replace("torch.", ""),
            "batch_size": cfg.batch_size, "n_workers": cfg.n_workers}


def _split(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# --- the other measurements -----------------------------------------------------------------------------------
def naive_rate(model_path: Path, paths: list[Path], batch_size: int) -> float:
    """The Hugging Face model batch by batch in fp32 on PIL-preprocessed source JPEGs, no overlap; model loading
    included, as in the other paths' rates."""
    from transformers import DINOv3ViTModel
    t0 = time.perf_counter()
    model = DINOv3ViTModel.from_pretrained(model_path).eval()
    mean = np.array(IMAGENET_MEAN, np.float32)
    std = np.array(IMAGENET_STD, np.float32)
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            arrays = []
            for p in paths[i:i + batch_size]:
                with Image.open(p) as im:
                    arr = np.asarray(im.convert("RGB").resize((224, 224), Image.BILINEAR), np.float32) / 255
                arrays.append((arr - mean) / std)
            pixel_values = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
            model(pixel_values=pixel_values).pooler_output.numpy()
    return len(paths) / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_per_call(fn, device: torch.device, min_seconds: float, min_calls: int = 3) -> float:
    fn()
    fn()
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while n < min_calls or time.perf_counter() - t0 < min_seconds:
        fn()
        n += 1
    _sync(device)
    return (time.perf_counter() - t0) / n


def ceiling_rate(model, batch_size: int, min_seconds: float) -> float:
    """Images/s of the model alone: uint8 batches already on the device, no copies, no decoding."""
    device = model.mean_c11.device
    size = model.image_size
    pixels = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, device=device)
    with torch.inference_mode():
        seconds = _time_per_call(lambda: model(pixels.permute(0, 3, 1, 2).float().div_(255.0)), device, min_seconds)
    return batch_size / seconds


def profile_today(model, corpus_paths: list[Path], batch_size: int, chunk_size: int, tmp_path: Path) -> str:
    """Where today's time goes, per image: decode + resize on one core, the float copy to the device, the model,
    and the commit of a chunk of rows."""
    device = model.mean_c11.device
    size, mode = model.image_size, model.spec.resize_mode
    sample = corpus_paths[:64]
    t0 = time.perf_counter()
    arrays = [load_corpus_array(p, size, mode) for p in sample]
    decode_ms = (time.perf_counter() - t0) / len(sample) * 1e3
    kernels = decode_with_kernels(sample, size, mode)
    batch = np.stack((arrays * (batch_size // len(arrays) + 1))[:batch_size])
    copy_s = _time_per_call(lambda: arrays_to_batch(batch).to(device), device, 0.5)
    on_device = arrays_to_batch(batch).to(device)
    with torch.inference_mode():
        model_s = _time_per_call(lambda: model(on_device), device, 1.0)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(chunk_size, model.dim)).astype(np.float32)
    with Store.open(tmp_path / "commit-probe") as store:
        store.add_embeddings(np.arange(chunk_size), emb)  # warm-up
        k = [1]

        def commit():
            store.add_embeddings(np.arange(k[0] * chunk_size, (k[0] + 1) * chunk_size), emb)
            k[0] += 1
        commit_s = _time_per_call(commit, torch.device("cpu"), 0.5)
    return (f"where today's time goes, per image (batch {batch_size}, chunk {chunk_size}): decode + resize "
            f"{decode_ms:.2f} ms on one core{kernels}; float copy to {device.type} {copy_s / batch_size * 1e3:.3f} ms; "
            f"model {model_s / batch_size * 1e3:.3f} ms; commit {commit_s / chunk_size * 1e3:.3f} ms "
            f"(all but decoding in the main thread, one after the other)")


def decode_with_kernels(paths: list[Path], size: int, mode: str, rounds: int = 3) -> str:
    """A loader worker's step per image (decode, resize, write into the batch) with Pillow against the resize
    kernels (`loader.kernels_mode`: a GPU's long runs), on one core: best of `rounds`, alternating; the same
    bytes. Where the kernels are unavailable, why not."""
    why_not = resample.prepare()
    if why_not is not None:
        return f" (no resize kernels: {why_not})"
    out_hw3 = np.empty((size, size, 3), np.uint8)
    load_corpus_into(paths[0], size, mode, out_hw3, kernels=True)  # (first calls: numba's dispatch)
    ms: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for kernels in ms:
            t0 = time.perf_counter()
            for path in paths:
                load_corpus_into(path, size, mode, out_hw3, kernels)
            ms[kernels].append((time.perf_counter() - t0) / len(paths) * 1e3)
    pillow_ms, kernels_ms = min(ms[False]), min(ms[True])
    assert np.array_equal(out_hw3, load_corpus_array(paths[-1], size, mode))
    return (f" (a loader worker's step: {pillow_ms:.2f} ms with Pillow, {kernels_ms:.2f} ms with the resize "
            f"kernels, {pillow_ms / kernels_ms:.2f}x, best of {rounds})")


NEW_DIRECT = "new path, workers forked directly"  # the --fork-ab contender
NEW_SYNC = "new path, results read at once"       # the --lag-ab contender
NEW_PILLOW = "new path, Pillow alone"             # the --kernels-ab contender
# Variants of the new path timed in the same rounds: (--one, what the ratio line calls it).
VARIANTS = {NEW_DIRECT: ("new-direct", "the same path with its workers forked directly"),
            NEW_SYNC: ("new-sync", "the same path reading each batch's results before the next is launched"),
            NEW_PILLOW: ("new-pillow", "the same path with its workers resizing with Pillow alone")}


def head_start(out_dir: Path, batch_size: int, size: int, resize_mode: str, on_gpu: bool, wait_s: float,
               rounds: int = 2) -> str:
    """The loader alone, as embed starts it: its workers decode while the model loads (simulated by a wait of
    `wait_s`), then a model that takes no time takes every batch. The seconds after the wait, with today's ring of
    DEFAULT_SLOTS batches against `ring_slots`' (best of `rounds`, alternating)."""
    with Store.open(out_dir, read_only=True) as store:
        items = sorted(store.corpus_paths().items())
    n_workers = resolve_n_workers(0)
    deep = ring_slots(n_workers, batch_size, size, head_start=True)
    seconds: dict[int, list[float]] = {DEFAULT_SLOTS: [], deep: []}
    for _ in range(rounds):
        for n_slots in seconds:
            # Pillow, as a fresh `atlasgen embed` of 8,000 images resizes (this process has the kernels loaded).
            with CorpusBatches(out_dir, items, batch_size, size, resize_mode, n_workers,
                               stage=embed.loader_stage(on_gpu), n_slots=n_slots, kernels="off") as batches:
                time.sleep(wait_s)
                t0 = time.perf_counter()
                n = sum(len(batch.image_ids) for batch in batches)
                seconds[n_slots].append(time.perf_counter() - t0)
            assert n == len(items), (n, len(items))
    shallow_s, deep_s = min(seconds[DEFAULT_SLOTS]), min(seconds[deep])
    # Below ~10 ms the deep ring had every batch decoded before the wait ended: a ratio would be noise.
    ratio = f"{shallow_s / deep_s:.2f}x" if deep_s >= 0.01 else "every batch decoded during the wait"
    return (f"loader head start ({n_workers} workers, batches of {batch_size}, a model load of {wait_s:.2f} s "
            f"simulated by a wait, then a model that takes no time): all {len(items)} images "
            f"{shallow_s:.3f} s after the wait with a ring of {DEFAULT_SLOTS} batches, {deep_s:.3f} s with "
            f"ring_slots' {min(deep, -(-len(items) // batch_size))} ({ratio}; best of {rounds}, all: "
            f"{', '.join(f'{x:.3f}' for x in seconds[DEFAULT_SLOTS])} against "
            f"{', '.join(f'{x:.3f}' for x in seconds[deep])} s)")


def run_embed(fn, cfg: EmbedConfig, out_dir: Path, device: torch.device) -> dict:
    """One embed into `out_dir` (after a reset): the stage's summary + wall seconds and peak memory."""
    with Store.open(out_dir) as store:
        embed.SPEC.reset_outputs(store)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with PeakMemory() as peak:
            t0 = time.perf_counter()
            summary = fn(cfg, store)
            wall_s = time.perf_counter() - t0
    gpu_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {**summary, "wall_s": wall_s, "main_bytes": peak.main_bytes, "workers_bytes": peak.workers_bytes,
            "gpu_peak_bytes": gpu_peak}


def one_run(args) -> None:
    """`--one today|new`: a single embed in this fresh process, as `atlasgen embed` runs it, with torch imported
    and CUDA initialised first (once-per-process costs, not the stage's); prints one RESULT line of JSON."""
    device = resolve_device(args.device)
    # Once-per-process costs, paid before the clock as every later stage of a build would find them paid: the
    # model classes' import, the CUDA context and its GEMM library handle.
    from transformers import AutoModel, DINOv3ViTModel  # noqa: F401
    if device.type == "cuda":
        (torch.ones(8, 8, device=device) @ torch.ones(8, 8, device=device)).sum().item()
    fn = today_embed if args.one == "today" else embed.run
    # "new-direct": the stage as it is, with its loader's workers forked by this process itself, one by one (as
    # before workers.SUPERVISED): what the supervisor saves the main thread before the model load.
    workers.SUPERVISED = args.one != "new-direct"
    # "new-sync": on a GPU each batch's results read back before the next batch is launched (as before
    # embed.results_lag), with the batch's copy to the GPU on the model's stream.
    if args.one == "new-sync":
        embed.results_lag = lambda device: 0
    # "new-pillow": the loader's workers never get the resize kernels (as before loader.kernels_mode).
    if args.one == "new-pillow":
        embed.kernels_mode = lambda *args, **kwargs: "off"
    cfg = EmbedConfig(model=args.model, device=device.type, batch_size=args.batch_size, n_workers=args.n_workers,
                      n_threads=args.n_threads)
    print_result(run_embed(fn, cfg, Path(args.store), device))


def run_isolated(which: str, store_dir: Path, model_path: Path, device: torch.device, batch_size: int,
                 n_workers: int, n_threads: int = 0) -> dict:
    """One run in a fresh process (clean peak memory, workers forked from a process like `atlasgen embed`'s),
    then its embeddings read here."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", which, "--store", str(store_dir),
           "--model", str(model_path), "--device", device.type, "--batch-size", str(batch_size),
           "--n-workers", str(n_workers), "--n-threads", str(n_threads)]
    r = fresh_process_result(cmd)
    with Store.open(store_dir, read_only=True) as store:
        r["emb"] = store.embeddings()[1]
    return r


def _mem(r: dict) -> str:
    return (f"{(r['main_bytes'] + r['workers_bytes']) / GIB:.2f} GiB (the process {r['main_bytes'] / GIB:.2f} + "
            f"workers {r['workers_bytes'] / GIB:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--n-images", type=int, default=0,
                        help="corpus size N (default: 8,000 on CUDA, 96 on a CPU, 48 with --quick); N/4 is the "
                             "small size")
    parser.add_argument("--quick", action="store_true", help="48 images, one round")
    parser.add_argument("--new-only", action="store_true",
                        help="time only the new path (a scale check: today's path at 50,000 images takes over a "
                             "minute on an H100)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds at size N, best kept (default 2 on a CPU, "
                                                               "1 with --quick or on CUDA)")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="one batch size for every path (default: on a CPU 16, 8 with --quick, as in earlier "
                             "figures; on CUDA today's default 32 for today's path and the auto size for the new)")
    parser.add_argument("--naive", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the naive Hugging Face loop (default: on a CPU only)")
    parser.add_argument("--n-threads", type=int, default=0,
                        help="torch threads for both paths (default 0: each tunes its own, which on a busy CPU adds "
                             "noise of its own)")
    parser.add_argument("--fork-ab", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the new path with its workers forked by the process itself, one by one, "
                             "instead of by a supervisor process (default: on CUDA, unless --new-only)")
    parser.add_argument("--lag-ab", action=argparse.BooleanOptionalAction, default=False,
                        help="also time the new path reading each batch's results before launching the next (no "
                             "side-stream copy), against embed.results_lag's one batch on a GPU (default: off)")
    parser.add_argument("--kernels-ab", action=argparse.BooleanOptionalAction, default=False,
                        help="also time the new path with its loader's workers resizing with Pillow alone, against "
                             "the resize kernels they get from a standby on a GPU's long runs (loader.kernels_mode: "
                             "on an H200-class machine from ~13,000 images; default: off)")
    parser.add_argument("--head-start-wait", type=float, default=0.8,
                        help="seconds of model load the loader head-start check simulates (default 0.8: the H200 "
                             "machine's ~0.8 s before the model was ready)")
    # One run (a child process).
    parser.add_argument("--one", choices=("today", "new", *(one for one, _ in VARIANTS.values())),
                        help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--n-workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_quiet(True)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # "Loading weights" bars on every model load
    except Exception:  # an older or newer transformers without it: the bars are only noise
        pass
    if args.one:
        one_run(args)
        return
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    n_images = args.n_images or (48 if args.quick else 8000 if on_gpu else 96)
    rounds = args.rounds or (1 if args.quick or on_gpu else 2)
    batch_today = args.batch_size or (32 if on_gpu else 8 if args.quick else 16)
    batch_new = args.batch_size or (0 if on_gpu else batch_today)
    naive = args.naive if args.naive is not None else not on_gpu
    fork_ab = args.fork_ab if args.fork_ab is not None else on_gpu and not args.new_only
    # The small size has at least 4 of the new path's batches where N allows, so its ring of 3 batches is full
    # at both sizes and the comparison shows what grows with the corpus.
    n_small = max(1, n_images // 4, min(4 * (batch_new or embed.MAX_GPU_BATCH_SIZE), n_images // 2))
    t_start = time.perf_counter()
    gpu_name = f" ({torch.cuda.get_device_name(device)})" if on_gpu else ""
    print(f"embed benchmark: {device.type}{gpu_name}, {n_cores()} cores, torch {torch.__version__}, "
          f"ViT-S/16 shape (random weights), precision auto", flush=True)
    with tempfile.TemporaryDirectory(prefix="atlasgen-bench-embed-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        folder = make_photo_folder(tmp_path / "images", n_images)
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        with Store.open(tmp_path / "big") as store:
            ingest.run(IngestConfig(source=f"folder:{folder}"), store)
        with Store.open(tmp_path / "small") as store:
            ingest.run(IngestConfig(source=f"folder:{folder}", limit=n_small), store)
        print(f"corpus: {n_images} generated 500×375 JPEGs (written in {t_gen:.1f} s), ingested to 256 px copies "
              f"(N and the small size {n_small}: {time.perf_counter() - t0:.1f} s)", flush=True)
        model_path = ensure_random_model(tmp_path / "models" / "vits16", vits16_config())
        sources = sorted(folder.rglob("*.jpg"))
        corpus = sorted((tmp_path / "big" / "corpus").glob("*.jpg"))

        model = load_embedding_model(str(model_path), device, "auto")
        batch_auto = batch_new or embed.auto_batch_size(model)
        try:
            print(profile_today(model, corpus, batch_today, 256, tmp_path), flush=True)
        except Exception as e:
            print(f"profile FAILED: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()

        try:
            print(head_start(tmp_path / "big", batch_new or embed.MAX_GPU_BATCH_SIZE, model.image_size,
                             model.spec.resize_mode, on_gpu, args.head_start_wait), flush=True)
        except Exception as e:
            print(f"loader head start FAILED: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()

        ceiling = None

        def measure_ceiling(threads: int) -> float:
            with restore_torch_threads():
                if not on_gpu:
                    torch.set_num_threads(threads)
                rate = ceiling_rate(model, batch_auto, 2.0 if on_gpu else 5.0)
            print(f"model-only ceiling ({str(model.dtype).replace('torch.', '')}, batch {batch_auto}"
                  f"{'' if on_gpu else f', {threads} thread(s)'}, uint8 already on the device): {rate:9.1f} img/s",
                  flush=True)
            return rate

        if on_gpu:  # first, so a run cut short by a timeout still has it
            try:
                ceiling = measure_ceiling(0)
            except Exception as e:
                print(f"model-only ceiling FAILED: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc()

        # (name, --one, batch size, workers): today's defaults (batch 32 on CUDA, 2 decode threads), the new ones.
        contenders = [("today's path", "today", batch_today, 2), ("new path", "new", batch_new, 0)]
        if args.new_only:
            contenders = contenders[1:]
        for variant, wanted in ((NEW_DIRECT, fork_ab), (NEW_SYNC, args.lag_ab), (NEW_PILLOW, args.kernels_ab)):
            if wanted:
                contenders.append((variant, VARIANTS[variant][0], batch_new, 0))
        results: dict[str, list[dict]] = {name: [] for name, *_ in contenders}
        small: dict[str, dict] = {}
        naive_rates: list[float] = []

        def run_and_show(name: str, which: str, batch_size: int, n_workers: int, store_dir: Path, n: int
                         ) -> dict | None:
            """One run in a fresh process, shown at once (a run cut short by a timeout keeps what it printed).
            Its rate: images over the wall time of the stage's run(), model loading included."""
            try:
                r = run_isolated(which, store_dir, model_path, device, batch_size, n_workers, args.n_threads)
            except Exception as e:
                print(f"  {name}, {n} images: FAILED: {type(e).__name__}: {e}", flush=True)
                return None
            r["rate"] = r["n_embedded"] / r["wall_s"]
            tl = r.get("timeline_s") or {}
            timeline = (f"; timeline: loader started {tl['loader_started']:.2f} s, model read {tl['model_read']:.2f} "
                        f"s, model loaded {tl['model_loaded']:.2f} s, first batch ready "
                        f"{tl['first_batch_ready']:.2f} s and embedded {tl['first_batch_done']:.2f} s, last batch "
                        f"{tl['last_batch_done']:.2f} s, done {tl['done']:.2f} s"
                        if {"loader_started", "model_read", "model_loaded", "first_batch_ready", "first_batch_done",
                            "last_batch_done", "done"} <= set(tl) else "")
            ring = f", a ring of {r['ring_slots']} batches" if "ring_slots" in r else ""
            ring += f", resized with {r['resized_with']}" if "resized_with" in r else ""
            print(f"  {name}, {n} images: {r['rate']:.1f} img/s ({r['wall_s']:.2f} s with model loading; batch "
                  f"{r['batch_size']}, {r['n_workers']} {'threads' if which == 'today' else 'worker processes'}"
                  f"{ring}), "
                  f"peak memory {_mem(r)}{timeline}", flush=True)
            return r

        for name, *how in contenders:  # the small size first
            r = run_and_show(name, *how, tmp_path / "small", n_small)
            if r is not None:
                small[name] = r
        for _ in range(rounds):  # other jobs may share the machine: alternate, keep each one's best round
            if naive:
                naive_rates.append(naive_rate(model_path, sources, batch_today))
                print(f"  naive fp32 loop, {n_images} images: {naive_rates[-1]:.1f} img/s", flush=True)
            for name, *how in contenders:
                r = run_and_show(name, *how, tmp_path / "big", n_images)
                if r is not None:
                    results[name].append(r)

        best = {name: max(runs, key=lambda r: r["rate"]) for name, runs in results.items() if runs}
        if ceiling is None:
            ceiling = measure_ceiling(best.get("new path", {}).get("n_threads") or torch.get_num_threads())
        if naive_rates:
            print(f"naive fp32 loop (batch {batch_today}, torch default threads), {n_images} images: "
                  f"{max(naive_rates):9.1f} img/s end to end", flush=True)
        for name, r in best.items():
            how = (f"{r['n_workers']} decode threads" if name == "today's path" else
                   f"{r['n_workers']} worker processes{', pinned' if on_gpu else ''}, writer thread")
            line = (f"{name} ({r['dtype']}, batch {r['batch_size']}, {how}, {r['n_threads']} torch thread(s)), "
                    f"{n_images} images: {r['rate']:9.1f} img/s end to end = {r['rate'] / ceiling:6.1%} of the "
                    f"ceiling ({r['wall_s']:.2f} s, model loading included)")
            if name == "new path" and "today's path" in best:
                line += f"; {r['rate'] / best[contenders[0][0]]['rate']:.2f}x today's"
            for variant, (_, what) in VARIANTS.items():
                if name == "new path" and variant in best:
                    line += f"; {r['rate'] / best[variant]['rate']:.2f}x {what}"
            if naive_rates:
                line += f"; {r['rate'] / max(naive_rates):.2f}x naive"
            if len(results[name]) > 1:  # the best round above; the spread says how far to trust it
                rates = [run["rate"] for run in results[name]]
                line += (f"; best of {len(rates)} rounds (median {statistics.median(rates):,.1f} img/s; all: "
                         f"{', '.join(f'{rate:,.1f}' for rate in rates)})")
            print(line, flush=True)
        for name, r in best.items():
            if name in small:
                s = small[name]
                gpu = (f"; GPU (torch max allocated) {s['gpu_peak_bytes'] / GIB:.2f} → "
                       f"{r['gpu_peak_bytes'] / GIB:.2f} GiB" if on_gpu else "")
                ratio = (r["main_bytes"] + r["workers_bytes"]) / max(s["main_bytes"] + s["workers_bytes"], 1)
                # The loader's ring is bounded (loader.ring_slots) but never bigger than the corpus: a small
                # corpus maps fewer slots, which is growth up to the bound, not with the corpus.
                ring = (f"; the loader's ring {s['ring_slots']} → {r['ring_slots']} batches of {r['batch_size']} "
                        f"(bounded: a corpus smaller than the ring maps only what it needs)"
                        if s.get("ring_slots", 0) != r.get("ring_slots", 0) else "")
                print(f"peak memory (a fresh process per run), {name}: {n_small} images {_mem(s)}; {n_images} images "
                      f"{_mem(r)} (×{ratio:.2f} for ×{n_images / n_small:.1f} images){gpu}{ring}", flush=True)
        for name, r in best.items():
            # wall = fixed + n / steady, read off the two sizes: how much of the end-to-end rate is start-up
            # (model load, first device calls, workers, the first batch) and what a large corpus would reach.
            s = small.get(name)
            if s is None:  # its run at the small size failed, and said so above
                continue
            reading = two_size_reading(n_small, s["wall_s"], n_images, r["wall_s"])
            if reading is None:
                print(no_two_size_reading(name), flush=True)
                continue
            fixed, steady = reading
            print(f"two-size reading, {name}: ~{fixed:.2f} s fixed + {steady:,.0f} img/s steady "
                  f"({steady / ceiling:.0%} of the ceiling); at 50,000 images "
                  f"~{50_000 / (fixed + 50_000 / steady):,.0f} "
                  f"img/s end to end (an estimate from two measured points)", flush=True)
        if {"today's path", "new path"} <= set(best):
            a, b = best["today's path"]["emb"], best["new path"]["emb"]
            if a.shape == b.shape:
                cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
                print(f"new path's embeddings vs today's: max |Δ| {np.abs(a - b).max():.2e}, min cosine {cos.min():.6f}"
                      f"{' (identical)' if np.array_equal(a, b) else ''}", flush=True)
            else:
                print(f"new path's embeddings vs today's: shapes differ {a.shape} vs {b.shape}", flush=True)
        for variant in VARIANTS:
            if variant in best and "new path" in best:
                print(f"{variant}: embeddings identical to the new path's: "
                      f"{'yes' if np.array_equal(best[variant]['emb'], best['new path']['emb']) else 'NO'}",
                      flush=True)
    print(f"benchmark wall time: {time.perf_counter() - t_start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
