"""Embed-stage throughput vs a naive loop, both measured in this run, on the real ViT-S/16 shape.

Naive baseline: the Hugging Face DINOv3ViTModel called batch by batch in fp32 on PIL-preprocessed images
(open, resize, normalise in the main thread; no overlap), with torch's default thread count.
Ours: `atlasgen.stages.embed.run` (decode threads overlapping the model, bf16 where the CPU is fast at it,
thread count tuned on the first batches), reading the ingested corpus.

Random weights (`vits16_config()` written with save_pretrained into a temp dir); generated 320×240 JPEGs.

    python benchmarks/embed.py            # 256 images, best of 2 rounds
    python benchmarks/embed.py --quick    # 48 images, one round, under a minute
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlasgen.stages import embed, ingest  # noqa: E402
from atlasgen.config import EmbedConfig, IngestConfig  # noqa: E402
from atlasgen.model import IMAGENET_MEAN, IMAGENET_STD, ensure_random_model, vits16_config  # noqa: E402
from atlasgen.progress import set_quiet  # noqa: E402
from atlasgen.store import Store  # noqa: E402


def make_jpegs(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320].astype(np.float32)
    paths = []
    for i in range(n):
        fx, fy, phase = rng.uniform(0.01, 0.1, 2).tolist() + [rng.uniform(0, 6.28)]
        base = np.stack([np.sin(xx * fx + phase), np.cos(yy * fy), np.sin((xx + yy) * fx * 0.5)], -1)
        arr = (base * 90 + 128 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def naive_rate(model_path: Path, paths: list[Path], batch_size: int, n_threads: int | None) -> float:
    from transformers import DINOv3ViTModel
    before = torch.get_num_threads()
    if n_threads:
        torch.set_num_threads(n_threads)
    model = DINOv3ViTModel.from_pretrained(model_path).eval()
    mean = np.array(IMAGENET_MEAN, np.float32)
    std = np.array(IMAGENET_STD, np.float32)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            arrays = []
            for p in paths[i:i + batch_size]:
                with Image.open(p) as im:
                    arr = np.asarray(im.convert("RGB").resize((224, 224), Image.BILINEAR), np.float32) / 255
                arrays.append((arr - mean) / std)
            pixel_values = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
            model(pixel_values=pixel_values).pooler_output.numpy()
    seconds = time.perf_counter() - t0
    torch.set_num_threads(before)
    return len(paths) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="48 images, one round (under a minute)")
    parser.add_argument("--rounds", type=int, default=0, help="default 2 (1 with --quick)")
    parser.add_argument("--n-images", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=0, help="default 16 (8 with --quick)")
    args = parser.parse_args()
    n_images = args.n_images or (48 if args.quick else 256)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.batch_size = args.batch_size or (8 if args.quick else 16)
    set_quiet(True)
    with tempfile.TemporaryDirectory(prefix="atlasgen-bench-embed-") as tmp:
        tmp_path = Path(tmp)
        paths = make_jpegs(tmp_path / "images", n_images)
        model_path = ensure_random_model(tmp_path / "models" / "vits16", vits16_config())
        with Store.open(tmp_path / "build") as store:
            ingest.run(IngestConfig(source=f"folder:{tmp_path / 'images'}"), store)

            default_threads = torch.get_num_threads()
            print(f"{n_images} images 320×240 JPEG, ViT-S/16 shape (random weights), batch {args.batch_size}, "
                  f"{embed.n_cores()} cores, torch default threads {default_threads}, best of {args.rounds} round(s)")
            # Other processes share the machine: alternate the contenders and keep each one's best round.
            naive, ours, naive_same, chosen, dtype = [], [], [], default_threads, ""
            for _ in range(args.rounds):
                naive.append(naive_rate(model_path, paths, args.batch_size, None))
                embed.SPEC.reset_outputs(store)
                summary = embed.run(EmbedConfig(model=str(model_path), precision="auto",
                                                batch_size=args.batch_size, device="cpu"), store)
                ours.append(summary["images_per_s"])
                chosen, dtype = summary["n_threads"], summary["dtype"]
                if chosen != default_threads:
                    naive_same.append(naive_rate(model_path, paths, args.batch_size, chosen))
            print(f"naive fp32 loop ({default_threads} threads, default):    {max(naive):7.1f} img/s")
            print(f"atlasgen embed ({dtype}, {chosen} thread(s), overlap): {max(ours):7.1f} img/s   "
                  f"speed-up {max(ours) / max(naive):.2f}x")
            if naive_same:
                # Separates the gain of bf16 + overlap from the gain of picking the thread count.
                print(f"naive fp32 loop ({chosen} thread(s), as ours chose): {max(naive_same):7.1f} img/s   "
                      f"speed-up {max(ours) / max(naive_same):.2f}x")

if __name__ == "__main__":
    main()
