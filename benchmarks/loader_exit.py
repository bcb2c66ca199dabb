"""The loader's tail: how long `CorpusBatches.close` keeps the consumer after its last batch, with the workers
told to exit once the last batch's results are in (`WorkerPool.finish`, the default) against waiting to be closed.

    python benchmarks/loader_exit.py --n-images 960 --batch-size 64 --wait 0.6 --ballast-gib 1

A worker's exit tears down its forked copy of the consumer's address space, so the process imports torch and
transformers (as embed's does) and holds `--ballast-gib` GiB of tensors (embed's process is ~2.2 GiB on a GPU
machine). `--wait` stands in for the model's last batches and the final commit, which the exit can overlap.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import DINOv3ViTModel  # noqa: F401  (a process like embed's)

from atlasgen import workers
from atlasgen.loader import CorpusBatches
from atlasgen.testing import make_photo_folder
from atlasgen.workers import resolve_n_workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=960, help="generated corpus copies (341×256)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-workers", type=int, default=16, help="loader workers (0: one per core)")
    parser.add_argument("--wait", type=float, default=0.6, help="seconds between the last batch and close")
    parser.add_argument("--ballast-gib", type=float, default=1.0, help="GiB of tensors this process holds")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    ballast = torch.ones(int(args.ballast_gib * (1 << 28)))  # float32: 4 bytes each
    n_workers = resolve_n_workers(args.n_workers)
    with tempfile.TemporaryDirectory(prefix="atlasgen-bench-loader-exit-") as tmp:
        root = Path(tmp)
        # Photo-like JPEGs of a corpus copy's size (ingest's 256 px copies of 500×375 photos).
        make_photo_folder(root / "corpus", args.n_images, width=341, height=256)
        items = list(enumerate(sorted(p.relative_to(root).as_posix() for p in root.glob("corpus/*/*.jpg"))))
        real_finish = workers.WorkerPool.finish
        close_ms: dict[str, list[float]] = {"told to exit after the last batch": [], "left to close": []}
        for _ in range(args.rounds):  # alternating
            for name in close_ms:
                workers.WorkerPool.finish = real_finish if name.startswith("told") else (lambda self: None)
                try:
                    batches = CorpusBatches(root, items, args.batch_size, 224, "resize", n_workers).start()
                    n = sum(len(batch.image_ids) for batch in batches)
                    assert n == len(items), (n, len(items))
                    time.sleep(args.wait)
                    t0 = time.perf_counter()
                    batches.close()
                    close_ms[name].append(1e3 * (time.perf_counter() - t0))
                finally:
                    workers.WorkerPool.finish = real_finish
    print(f"loader exit: {n_workers} workers, {args.n_images} images in batches of {args.batch_size}, this process "
          f"holding {ballast.numel() * 4 / (1 << 30):.1f} GiB of tensors; close after {args.wait:.2f} s of "
          f"other work:", flush=True)
    for name, ms in close_ms.items():
        print(f"  {name}: {min(ms):.1f} ms (all: {', '.join(f'{x:.1f}' for x in ms)})", flush=True)


if __name__ == "__main__":
    main()
