"""DINOv3 through `transformers`: loading (hub id, local path or the tiny preset's random model),
our own preprocessing as torch ops (no torchvision), and a differentiable pixels → embedding module
shared by embed, render, probe and decompose.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ModelLoadError
from .paths import atomic_dir

DEFAULT_MODEL_ID = "facebook/dinov3-vits16-pretrain-lvd1689m"
TINY_MODEL_REF = "tiny"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vits16_config():
    """The real DINOv3 ViT-S/16 shape (for benchmarks with random weights)."""
    from transformers import DINOv3ViTConfig
    return DINOv3ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                           patch_size=16, image_size=224, num_register_tokens=4)


def tiny_config(image_size: int = 112):
    """A 2-layer DINOv3 small enough that the whole tiny pipeline runs in a few minutes on 2 cores."""
    from transformers import DINOv3ViTConfig
    return DINOv3ViTConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192,
                           patch_size=16, image_size=image_size, num_register_tokens=4)


def ensure_random_model(path: Path, config, seed: int = 0) -> Path:
    """Write a random-weight DINOv3 with `save_pretrained` (once), so it loads like a real checkpoint."""
    from transformers import DINOv3ViTModel
    path = Path(path)
    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    model = DINOv3ViTModel(config)
    with atomic_dir(path) as tmp_path:
        model.save_pretrained(tmp_path)
    return path


@dataclass(frozen=True)
class PreprocessSpec:
    """How pixels are prepared for the model: square side, ImageNet mean/std, resize mode."""

    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # "resize": squash to image_size² (what DINOv3's hub processor does); "center": shorter side then crop.
    resize_mode: str = "resize"


def read_preprocess_spec(model_path: Path | None, config) -> PreprocessSpec:
    """Size from a preprocessor_config.json if the checkpoint has one, else from the model config,
    with ImageNet mean/std (`save_pretrained` writes no processor config)."""
    size = int(getattr(config, "image_size", 224) or 224)
    mean, std, mode = IMAGENET_MEAN, IMAGENET_STD, "resize"
    if model_path is not None and (Path(model_path) / "preprocessor_config.json").exists():
        pp = json.loads((Path(model_path) / "preprocessor_config.json").read_text())
        s = pp.get("size") or {}
        size = int(s.get("height") or s.get("shortest_edge") or size) if isinstance(s, dict) else int(s)
        mean = tuple(pp.get("image_mean") or mean)
        std = tuple(pp.get("image_std") or std)
        if pp.get("do_center_crop"):
            mode = "center"
    return PreprocessSpec(size, tuple(mean), tuple(std), mode)


def peek_preprocess_spec(model_ref: str, models_dir: Path | None = None) -> PreprocessSpec | None:
    """What `load_embedding_model(model_ref, ...)` will give as `model.spec`, read from the checkpoint's JSON files
    alone (no weights, no network), so data loading can start while the model loads. None when it cannot tell
    (a hub model not in the local cache, the tiny model not written yet, anything unexpected)."""
    from types import SimpleNamespace
    found = _peek(model_ref, models_dir)
    if found is None:
        return None
    path, config = found
    try:
        return read_preprocess_spec(path, SimpleNamespace(image_size=config.get("image_size") or 224))
    except Exception:  # any doubt: the caller loads the model first, as it always could
        return None


def peek_model_config(model_ref: str, models_dir: Path | None = None) -> dict | None:
    """The checkpoint's `config.json` (a DINOv3 ViT's), read as `peek_preprocess_spec` reads it; None when it
    cannot tell."""
    found = _peek(model_ref, models_dir)
    return None if found is None else found[1]


def _peek(model_ref: str, models_dir: Path | None) -> tuple[Path | None, dict] | None:
    """(the local checkpoint folder or None for a hub id, its config.json) without loading anything; None when
    it cannot tell or the model is not a DINOv3 ViT."""
    try:
        if model_ref == TINY_MODEL_REF:
            if models_dir is None:
                return None
            path: Path | None = Path(models_dir) / "tiny-dinov3"
            config_path = path / "config.json"
        elif Path(model_ref).expanduser().exists():
            path = Path(model_ref).expanduser()
            config_path = path / "config.json"
        else:
            from huggingface_hub import try_to_load_from_cache
            found = try_to_load_from_cache(model_ref, "config.json")
            if not isinstance(found, str):
                return None
            path, config_path = None, Path(found)  # a hub id: load_embedding_model reads no processor config
        config = json.loads(config_path.read_text())
        return (path, config) if config.get("model_type") == "dinov3_vit" else None
    except Exception:  # any doubt: the caller loads the model first, as it always could
        return None


def model_skeleton(config: dict, n_layers: int = 1) -> torch.nn.Module:
    """A DINOv3 ViT of a checkpoint's shape (its `config.json`, as `peek_model_config` gives it) with `n_layers`
    layers, on the meta device: no weights, nothing read from disk, built in milliseconds. A device's warm-up
    materialises it (`to_empty`) and runs it to meet the real model's kernels at the real shapes while the real
    model loads; its outputs are meaningless."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel
    # The backbone-output fields name stages of the full depth, which a shallower config refuses.
    fields = {k: v for k, v in config.items() if k not in ("out_features", "out_indices", "stage_names")}
    fields["num_hidden_layers"] = n_layers
    with torch.device("meta"):  # no weight initialisation: the values do not matter
        return DINOv3ViTModel(DINOv3ViTConfig.from_dict(fields))


def peek_model_skeleton(model_ref: str, models_dir: Path | None = None) -> torch.nn.Module | None:
    """`model_skeleton` of the checkpoint `load_embedding_model(model_ref, ...)` will load, from its config alone;
    None when the config cannot be read before the load or does not build."""
    config = peek_model_config(model_ref, models_dir)
    if config is None:
        return None
    try:
        return model_skeleton(config)
    except Exception:  # a config this transformers reads differently: the warm-up falls back to tiny kernels
        return None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA GPU is visible", "use --device cpu or auto")
    return torch.device(device)


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 pays off on GPUs and on CPUs with AVX-512 bf16 / AMX; elsewhere it is emulated and slow."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """precision: auto (bf16 where the hardware is fast at it, else fp32) | fp32 | bf16."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    assert precision == "auto", f"unknown precision {precision!r}"
    return torch.bfloat16 if bf16_is_fast(device) else torch.float32


class EmbeddingModel(torch.nn.Module):
    """pixels in [0, 1], shape (B, 3, H, W) → CLS `pooler_output` (B, D) in float32. Differentiable;
    the backbone's weights are frozen."""

    def __init__(self, backbone: torch.nn.Module, spec: PreprocessSpec, dtype: torch.dtype):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False).to(dtype)
        patchify_as_gemm(self.backbone)
        self.spec = spec
        self.dtype = dtype
        self.register_buffer("mean_c11", torch.tensor(spec.mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std_c11", torch.tensor(spec.std).view(3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    def prepare(self, pixels_b3hw: torch.Tensor, resize: bool = True) -> torch.Tensor:
        size = self.spec.image_size
        if resize and pixels_b3hw.shape[-2:] != (size, size):
            pixels_b3hw = resize_tensor(pixels_b3hw, size, self.spec.resize_mode)
        return (pixels_b3hw - self.mean_c11) / self.std_c11

    def forward(self, pixels_b3hw: torch.Tensor, resize: bool = True) -> torch.Tensor:
        """`resize=False` embeds pictures at their own size (a multiple of the patch size; the rotary
        position embedding adapts), e.g. the render stage's small local views."""
        x = self.prepare(pixels_b3hw.float(), resize).to(self.dtype)
        return self.backbone(pixel_values=x).pooler_output.float()


class PatchConv2d(torch.nn.Conv2d):
    """A ViT's patch embedding (a convolution whose stride is its kernel, no padding) computed as one GEMM over
    the non-overlapping patches: the same sums. The parameters, and so the state dict, are the convolution's.

    - On a CPU always: 3.6–9.4× faster forward + backward than oneDNN's strided convolution there
      (`benchmarks/patch_embed.py` on our 2-core AVX-512 box; its backward was ~30 % of the tiny render).
    - On a GPU without gradients (embed): no cuDNN convolution, whose first call at a batch's shape is start-up
      that every fresh `atlasgen embed` pays. On an NVIDIA H200, a fresh process's first forward of 512 images
      took 319–418 ms this way against 576–722 ms with the convolution, later forwards the same 52–57 ms
      (`benchmarks/cuda_first_calls.py`). Embeddings within bf16 rounding of the convolution's (min cosine
      0.99990 there).
    - On a GPU with gradients (render) it stays the convolution that render's speed was measured with."""

    def forward(self, x_bchw: torch.Tensor) -> torch.Tensor:
        if x_bchw.device.type != "cpu" and torch.is_grad_enabled():
            return super().forward(x_bchw)
        p = self.kernel_size[0]
        b, c, h, w = x_bchw.shape
        nh, nw = h // p, w // p
        # The convolution ignores the rows and columns past the last whole patch; so does this.
        x_bchw = x_bchw[..., :nh * p, :nw * p]
        patches_bnk = x_bchw.reshape(b, c, nh, p, nw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, nh * nw, c * p * p)
        out_bnd = patches_bnk @ self.weight.reshape(self.out_channels, -1).t()
        if self.bias is not None:
            out_bnd = out_bnd + self.bias
        return out_bnd.transpose(1, 2).reshape(b, self.out_channels, nh, nw)


def patchify_as_gemm(backbone: torch.nn.Module) -> None:
    """Turn the backbone's patch-embedding convolution into a `PatchConv2d` (in place; same parameters)."""
    conv = getattr(getattr(backbone, "embeddings", None), "patch_embeddings", None)
    if (type(conv) is torch.nn.Conv2d and conv.kernel_size == conv.stride and conv.kernel_size[0] == conv.kernel_size[1]
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1):
        conv.__class__ = PatchConv2d


def resize_tensor(pixels_b3hw: torch.Tensor, size: int, mode: str = "resize") -> torch.Tensor:
    """Differentiable resize: squash to size² or shorter side to `size` then centre crop."""
    if mode == "center":
        h, w = pixels_b3hw.shape[-2:]
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        pixels_b3hw = F.interpolate(pixels_b3hw, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        return pixels_b3hw[..., top:top + size, left:left + size]
    return F.interpolate(pixels_b3hw, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def pil_to_array(image: Image.Image, size: int, mode: str = "resize") -> np.ndarray:
    """Our CPU-side preprocessing for data loading: RGB PIL image → uint8 (size, size, 3)."""
    image = image.convert("RGB")
    resized_wh, box = resize_plan(*image.size, size, mode)
    image = image.resize(resized_wh, Image.BILINEAR, reducing_gap=3.0)
    if box != (0, 0, *resized_wh):
        image = image.crop(box)
    return np.asarray(image, dtype=np.uint8)


def resize_plan(width: int, height: int, size: int, mode: str = "resize"
                ) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """How `pil_to_array` makes a width × height picture size²: the (width, height) it resizes to, then the crop
    box (left, top, right, bottom) it keeps of that (all of it, unless `mode` is "center")."""
    if mode == "center":
        scale = size / min(width, height)
        nw, nh = max(size, round(width * scale)), max(size, round(height * scale))
        left, top = (nw - size) // 2, (nh - size) // 2
        return (nw, nh), (left, top, left + size, top + size)
    return (size, size), (0, 0, size, size)


def arrays_to_batch(arrays_bhw3: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arrays_bhw3)).permute(0, 3, 1, 2).float().div_(255.0)


def load_embedding_model(model_ref: str, device: str | torch.device = "cpu", precision: str = "auto",
                         models_dir: Path | None = None) -> EmbeddingModel:
    """Load DINOv3 from a hub id or local folder (or `tiny`: a random 2-layer model written once under
    `models_dir`) and wrap it as a differentiable EmbeddingModel on `device`."""
    from transformers import AutoModel
    device = resolve_device(device) if isinstance(device, str) else device
    path: Path | None = None
    if model_ref == TINY_MODEL_REF:
        assert models_dir is not None, "the tiny model needs a models_dir to live in"
        path = ensure_random_model(Path(models_dir) / "tiny-dinov3", tiny_config())
        ref = str(path)
    else:
        ref = model_ref
        if Path(model_ref).expanduser().exists():
            path = Path(model_ref).expanduser()
            ref = str(path)
            if not (path / "config.json").exists():
                raise ModelLoadError(f"{path} has no config.json, so it is not a transformers checkpoint",
                                     "pass a folder written by save_pretrained, or a hub id")
    try:
        backbone = _from_pretrained(AutoModel, ref, is_hub_id=path is None)
    except ModelLoadError:
        raise
    except Exception as e:  # transformers raises OSError/HTTP/gated errors of many kinds
        raise _model_error(model_ref, e) from None
    if not hasattr(backbone, "config") or getattr(backbone.config, "model_type", "") not in ("dinov3_vit",):
        raise ModelLoadError(f"{model_ref} is a {getattr(backbone.config, 'model_type', '?')} model, not DINOv3 ViT",
                             "pass a DINOv3 ViT checkpoint, e.g. facebook/dinov3-vits16-pretrain-lvd1689m")
    spec = read_preprocess_spec(path, backbone.config)
    dtype = resolve_dtype(precision, device)
    return EmbeddingModel(backbone, spec, dtype).to(device)


def _from_pretrained(auto_cls, ref: str, is_hub_id: bool):
    """A hub id is read from the local cache when it is there; otherwise the hub is probed first, so an
    unreachable hub or the gated DINOv3 without a token is one clear line within seconds."""
    if not is_hub_id:
        return auto_cls.from_pretrained(ref)
    try:
        return auto_cls.from_pretrained(ref, local_files_only=True)
    except Exception:  # not cached (or incompletely): fetch it
        pass
    from . import hub
    offline_hint = ("pass --model PATH to a downloaded checkpoint (the DINOv3 weights are gated: accept the "
                    "licence on the hub and set HF_TOKEN to download them), or use --preset tiny")
    if hub.offline_mode():
        raise ModelLoadError(f"could not fetch the model {ref}: offline mode (HF_HUB_OFFLINE) and it is not in the "
                             "local cache", offline_hint)
    hub.probe("models", ref, "model", ModelLoadError, unreachable_hint=offline_hint,
              missing_hint="check the model id, or pass --model PATH to a local checkpoint",
              gated_hint="accept the model's licence on the hub and set HF_TOKEN, or pass --model PATH, "
                         "or use --preset tiny")
    return auto_cls.from_pretrained(ref)


def _model_error(model_ref: str, e: Exception) -> ModelLoadError:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    low = str(e).lower()
    if "gated" in low or "401" in low or "403" in low or "access" in low and "restricted" in low:
        return ModelLoadError(f"could not fetch the model {model_ref}: it is gated on the Hugging Face hub ({text})",
                              "accept its licence on the hub and set HF_TOKEN, or pass --model PATH to a local copy, "
                              "or try --preset tiny")
    return ModelLoadError(f"could not load the model {model_ref}: {text}",
                          "check the id or path; offline, pass --model PATH to a downloaded checkpoint "
                          "(with HF_TOKEN for the gated DINOv3 weights when online), or use --preset tiny")
