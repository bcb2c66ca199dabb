"""Where a fresh process's first embed batch goes on a GPU: the once-per-process costs behind embed's start-up.

Each measurement runs in a fresh process that has imported torch and the model classes, made its CUDA context
and run one fp32 GEMM before the clock (as `benchmarks/embed.py`'s runs do), at the real ViT-S/16 shape with
random weights:

- `parts`: the first call of each kind of kernel a ViT's forward could use, on tiny bf16 tensors, one after
  the other (convolution, GEMM, attention, layer norm);
- `conv`: the model loaded as embed loads it (`from_pretrained`, bf16, to the device), then its first three
  forwards on a batch of 512 (`--batch`), with the patch embedding as the convolution (cuDNN on a GPU);
- `gemm`: the same with the patch embedding as embed runs it (`model.PatchConv2d`: one GEMM, no gradients),
  and how far its embeddings are from the convolution's;
- `skeleton`: `gemm` after embed's warm-up as it now runs (in the stage, in a thread while the model loads;
  here before the load, timed on its own): the model step once on a one-layer skeleton of the checkpoint at the
  real shapes (`embed.DeviceWarmUp`, given `model.peek_model_skeleton(...)`), so the first forward meets warm
  kernels;
- `tiny+skeleton`: the same with the warm-up running the tiny kernels first (`embed.first_batch_kernels`), as
  it did before the skeleton came within `DeviceWarmUp.SKELETON_WAIT_S` (and still does while a fresh process
  imports the model classes).

    python benchmarks/cuda_first_calls.py --device cuda      # a GPU machine, ~1 minute
    python benchmarks/cuda_first_calls.py --device cpu --batch 8   # anywhere: checks that it runs (~30 s; ~4.5 min at 512)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child(mode: str, device_name: str, model_path: str, batch: int) -> dict:
    import torch
    import torch.nn.functional as F
    # Before the clock, as benchmarks/embed.py's runs: the model classes' import, the CUDA context and its GEMM
    # library handle.
    from transformers import AutoModel, DINOv3ViTModel  # noqa: F401
    from atlasgen import model as M
    from atlasgen.stages.embed import embed_batch
    device = torch.device(device_name)
    if device.type == "cuda":
        (torch.ones(8, 8, device=device) @ torch.ones(8, 8, device=device)).sum().item()
    dtype = torch.bfloat16
    out: dict = {"mode": mode}

    def timed(name: str, fn) -> object:
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        out[name + "_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
        return result

    if mode == "parts":
        x = torch.zeros(2, 3, 32, 32, device=device, dtype=dtype)
        timed("conv", lambda: F.conv2d(x, torch.zeros(8, 3, 16, 16, device=device, dtype=dtype), stride=16))
        a = torch.zeros(64, 64, device=device, dtype=dtype)
        timed("gemm", lambda: a @ a)
        q = torch.zeros(2, 2, 8, 8, device=device, dtype=dtype)
        timed("sdpa", lambda: F.scaled_dot_product_attention(q, q, q))
        timed("layer_norm", lambda: F.layer_norm(a, (64,)))
        return out
    if mode == "conv":
        M.PatchConv2d.forward = torch.nn.Conv2d.forward
    if mode in ("skeleton", "tiny+skeleton"):
        from atlasgen.stages.embed import DeviceWarmUp

        def warm_up() -> None:  # embed's warm-up thread, given the skeleton at once (or after tiny kernels), joined
            if mode == "tiny+skeleton":
                DeviceWarmUp.SKELETON_WAIT_S = 0.0
            warming = DeviceWarmUp(device, "bf16", batch)
            while mode == "tiny+skeleton" and not warming.steps_done and warming._thread.is_alive():
                time.sleep(0.001)
            warming.give(M.peek_model_skeleton(model_path), M.peek_preprocess_spec(model_path))
            warming.join()
            out["warm_up_steps"] = warming.steps_done

        timed("warm_up", warm_up)
    model = timed("load", lambda: M.load_embedding_model(model_path, device, "bf16"))
    pixels = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    emb = None
    for i in range(3):  # embed's own model step
        emb = torch.from_numpy(timed(f"forward{i + 1}", lambda: embed_batch(model, pixels)))
    if mode == "gemm":  # the convolution's embeddings of the same batch, after the timings
        M.PatchConv2d.forward = torch.nn.Conv2d.forward
        ref = torch.from_numpy(embed_batch(model, pixels))
        out["max_abs_diff_vs_conv"] = float((emb - ref).abs().max())
        out["min_cosine_vs_conv"] = float(F.cosine_similarity(emb, ref).min())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per mode")
    parser.add_argument("--batch", type=int, default=512, help="images per forward (embed's GPU batch: 512)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.device, args.model, args.batch)), flush=True)
        return
    from atlasgen.model import ensure_random_model, vits16_config
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model_path = ensure_random_model(Path(tmp) / "vits16", vits16_config())
        print(f"model written in {time.perf_counter() - t0:.1f} s", flush=True)
        for r in range(args.rounds):
            for mode in ("parts", "conv", "gemm", "skeleton", "tiny+skeleton"):
                run = subprocess.run([sys.executable, __file__, "--child", mode, "--device", args.device,
                                      "--model", str(model_path), "--batch", str(args.batch)],
                                     capture_output=True, text=True)
                lines = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
                if run.returncode or not lines:
                    print(f"round {r + 1} {mode}: FAILED {run.stderr.strip().splitlines()[-1:]}", flush=True)
                    continue
                print(f"round {r + 1} {lines[-1][7:]}", flush=True)


if __name__ == "__main__":
    main()
