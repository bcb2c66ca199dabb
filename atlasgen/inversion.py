"""The inversion engine: optimise pictures so that the model's embedding of them points along target
directions (maximise cosine), as in the seed study.

Targets are optimised together in a fixed number of *slots* (continuous batching): every target owns its
parameters (pixel logits, a Fourier spectrum, or the weights of its own small untrained transformer
generator, stacked along a slot axis), its own `torch.Generator` (seeded from the target's seed: it draws
the initialisation and then the whole augmentation schedule), its own Adam state with its own step count
(`BatchedAdam`), and its own loss term (the batch loss is a sum, so targets do not share gradient scale).
A target stops when it has taken `n_steps` steps, or earlier when its own whole-picture cosine has stopped
improving (`min_steps`, `stop_window`, `stop_delta`, checked every `STOP_CHECK_EVERY` of its own steps); its
slot is then refilled from the queue. Nothing of a target depends on its batch, its slot or its neighbours,
so it renders the same alone, in any batch and under continuous batching (up to float rounding).

A caller may also pass `ready(embeddings, targets) → bool per target`, a test of a picture's embedding (the
render stage asks whether a feature's own SAE feature is the strongest on it). At every check the engine then
tests each target's best picture so far and keeps the best one that passed; the result is the best passing
picture (of the last, the best and the best passing one) when there is one. With `stop_own_first` a target
also stops early only once it has a passing picture.

Each step scores `n_views` augmented views per target that mimic DINO's training views (random resized
global and local crops, flips, colour jitter, blur, small translations), so the optimiser cannot cheat with
high-frequency noise, plus `tv_weight` × total variation of the picture. View 0 is the whole picture, so its
cosine is the un-augmented cosine before the step: the engine keeps each target's best picture by it, and
returns the better (by a final un-augmented embedding) of that best picture and the last one.

The step loop does not synchronise with the GPU: losses and cosines stay on the device and are read once
per check (every `STOP_CHECK_EVERY` steps) for the stopping rule, and the augmentation draws are made when a
target enters its slot. On CUDA all model passes have one fixed shape (chunks padded to `chunk_targets`),
so a compiled model (`compile=True`) compiles once.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .config import RenderConfig
from .model import EmbeddingModel
from .progress import say

PARAMS = ("transformer", "pixels", "fourier")
# Adam step sizes differ per parameterisation: `lr` is tuned for the generator's weights; a pixel logit or
# a Fourier coefficient needs a larger step to move the picture as far in the same number of steps.
LR_SCALE = {"transformer": 1.0, "pixels": 5.0, "fourier": 5.0}
# DINO's view scales: global crops cover 40–100 % of the picture, local crops 5–40 %.
GLOBAL_SCALE = (0.4, 1.0)
LOCAL_SCALE = (0.05, 0.4)
# Translation jitter as a fraction of the half-width of the picture (grid coordinates run over [-1, 1]).
JITTER = 0.06
BLUR_KERNEL = 9
# Lucid's colour-correlation square root (ImageNet), so the Fourier parameterisation decorrelates colour.
_COLOR_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
# The transformer generator: token width, layers, heads and the pixel side of the patch each token paints.
GEN_DIM, GEN_LAYERS, GEN_HEADS, GEN_PATCH = 64, 2, 4, 8


_DEFAULTS = RenderConfig()


@dataclass(frozen=True)
class InversionSettings:
    """The engine's share of `RenderConfig` (documented there; its defaults are the single source)."""

    param: str = _DEFAULTS.param
    augment: bool = _DEFAULTS.augment
    n_views: int = _DEFAULTS.n_views
    n_steps: int = _DEFAULTS.n_steps          # the most steps a target takes
    lr: float = _DEFAULTS.lr
    tv_weight: float = _DEFAULTS.tv_weight
    size: int = _DEFAULTS.size
    # Per-target stopping: from `min_steps` on, a target stops when its best whole-picture cosine rose by
    # less than `stop_delta` over its last `stop_window` steps (stop_delta 0 = always n_steps steps).
    min_steps: int = _DEFAULTS.min_steps
    stop_window: int = _DEFAULTS.stop_window
    stop_delta: float = _DEFAULTS.stop_delta
    # Side of the local (second-half) views in px; 0 = the model's input size like the global views.
    local_size: int = _DEFAULTS.local_size
    # With a `ready` test: stop early only once a picture passed it.
    stop_own_first: bool = _DEFAULTS.stop_own_first
    # Chunking views bounds memory only: per-target gradients are independent, so the result is the same
    # beyond float rounding. (The stage resolves the config's 0 = auto before it gets here.)
    max_views_per_pass: int = 64

    def __post_init__(self):
        assert self.param in PARAMS, f"unknown parameterisation {self.param!r}"
        assert self.n_views >= 1 and self.n_steps >= 0, "n_views ≥ 1 and n_steps ≥ 0"
        assert self.max_views_per_pass >= 1 and self.min_steps >= 0 and self.stop_window >= 1

    @property
    def stops_early(self) -> bool:
        return self.stop_delta > 0 and self.min_steps < self.n_steps


@dataclass
class InversionResult:
    images_b3hw: torch.Tensor | None  # final pictures in [0, 1], float32, on the CPU (None if pixels asked)
    cosine_b: torch.Tensor            # cosine of each un-augmented final picture's embedding to its target
    embeddings_bd: torch.Tensor       # the model's (raw) embedding of each final picture
    loss_sb: torch.Tensor             # per-step, per-target training loss (augmented views), (n_steps, B);
                                      # NaN after a target stopped
    steps_b: torch.Tensor             # Adam steps each target took (≤ n_steps)
    cos0_sb: torch.Tensor             # whole-picture cosine before each step (view 0), (n_steps, B); NaN after
    pixels_bhw3: np.ndarray | None = None  # uint8 pictures, when asked for instead of images_b3hw
    # Wall ms per target-step over the stretches where every slot was busy (no start-up, no tail), or None.
    steady_ms_per_target_step: float | None = None

    @property
    def n_target_steps(self) -> int:
        return int(self.steps_b.sum())


# --- parameterisations -------------------------------------------------------------------------------
class PixelParam(torch.nn.Module):
    """Raw pixels: a sigmoid of free logits."""

    TARGET_BUFFERS: tuple[str, ...] = ()  # buffers with a leading target axis (refilled per slot)

    def __init__(self, gens: list[torch.Generator], size: int):
        super().__init__()
        self.logits_b3hw = torch.nn.Parameter(
            torch.stack([torch.randn(3, size, size, generator=g) * 0.1 for g in gens]))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logits_b3hw)


class FourierParam(torch.nn.Module):
    """Lucid-style: a spectrum scaled by 1/frequency (so low frequencies move first), colour decorrelated."""

    TARGET_BUFFERS: tuple[str, ...] = ()

    def __init__(self, gens: list[torch.Generator], size: int):
        super().__init__()
        self.size = size
        n_fx = size // 2 + 1
        self.spectrum_b3hw2 = torch.nn.Parameter(
            torch.stack([torch.randn(3, size, n_fx, 2, generator=g) * 0.01 for g in gens]))
        fy = torch.fft.fftfreq(size).view(-1, 1)
        fx = torch.fft.rfftfreq(size).view(1, -1)
        scale_hw = 1.0 / torch.sqrt(fy ** 2 + fx ** 2).clamp_min(1.0 / size)
        self.register_buffer("scale_hw", scale_hw * size, persistent=False)
        color = torch.tensor(_COLOR_SQRT)
        self.register_buffer("color_33", color / color.norm(dim=0).max(), persistent=False)

    def forward(self) -> torch.Tensor:
        spec = torch.view_as_complex(self.spectrum_b3hw2.contiguous()) * self.scale_hw
        x_b3hw = torch.fft.irfft2(spec, s=(self.size, self.size), norm="ortho") / 4.0
        x_b3hw = torch.einsum("bchw,dc->bdhw", x_b3hw, self.color_33)
        return torch.sigmoid(x_b3hw)


class TransformerParam(torch.nn.Module):
    """B untrained transformer generators (Deep-Image-Prior in spirit), one per target, run as one batch.

    Fixed random input tokens (one per output patch) + a learned positional embedding → GEN_LAYERS
    pre-norm transformer layers → a linear map to the patch's pixels → fold into a picture → sigmoid.
    Every weight has a leading target axis and the layers use batched matmuls, so B generators cost one
    call each; only the weights are optimised."""

    TARGET_BUFFERS: tuple[str, ...] = ("tokens_btd",)

    def __init__(self, gens: list[torch.Generator], size: int):
        super().__init__()
        self.size = size
        self.grid = math.ceil(size / GEN_PATCH)
        n_tokens, d, p = self.grid * self.grid, GEN_DIM, GEN_PATCH

        def draw(*shape, std=1.0):
            return torch.stack([torch.randn(*shape, generator=g) * std for g in gens])

        # Draw in a fixed order per target, so a target's generator does not depend on the batch.
        self.register_buffer("tokens_btd", draw(n_tokens, d), persistent=False)
        self.pos_btd = torch.nn.Parameter(draw(n_tokens, d, std=0.1))
        self.w_qkv = torch.nn.ParameterList()
        self.w_out = torch.nn.ParameterList()
        self.w_up = torch.nn.ParameterList()
        self.w_down = torch.nn.ParameterList()
        for _ in range(GEN_LAYERS):
            self.w_qkv.append(torch.nn.Parameter(draw(d, 3 * d, std=d ** -0.5)))
            self.w_out.append(torch.nn.Parameter(draw(d, d, std=d ** -0.5 / GEN_LAYERS)))
            self.w_up.append(torch.nn.Parameter(draw(d, 2 * d, std=d ** -0.5)))
            self.w_down.append(torch.nn.Parameter(draw(2 * d, d, std=(2 * d) ** -0.5 / GEN_LAYERS)))
        # No pixel bias: a bias shared by every patch is a direct route to a tiled picture.
        self.w_pix = torch.nn.Parameter(draw(d, 3 * p * p, std=0.5 * d ** -0.5))

    def forward(self) -> torch.Tensor:
        x_btd = self.tokens_btd + self.pos_btd
        b, t, d = x_btd.shape
        h = GEN_HEADS
        for w_qkv, w_out, w_up, w_down in zip(self.w_qkv, self.w_out, self.w_up, self.w_down):
            qkv = torch.bmm(F.layer_norm(x_btd, (d,)), w_qkv).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
            att = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
            x_btd = x_btd + torch.bmm(att.transpose(1, 2).reshape(b, t, d), w_out)
            x_btd = x_btd + torch.bmm(F.gelu(torch.bmm(F.layer_norm(x_btd, (d,)), w_up)), w_down)
        pix_btq = torch.bmm(F.layer_norm(x_btd, (d,)), self.w_pix)
        side = self.grid * GEN_PATCH
        img = F.fold(pix_btq.transpose(1, 2), (side, side), GEN_PATCH, stride=GEN_PATCH)
        return torch.sigmoid(img[..., :self.size, :self.size])


def make_param(kind: str, gens: list[torch.Generator], size: int) -> torch.nn.Module:
    return {"transformer": TransformerParam, "pixels": PixelParam, "fourier": FourierParam}[kind](gens, size)


def per_target_tensors(param: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a parameterisation that has a leading target axis: its parameters and per-target
    buffers, by name (the same names and order for any number of targets)."""
    out = dict(param.named_parameters())
    out.update({name: getattr(param, name) for name in param.TARGET_BUFFERS})
    return out


# --- augmentations -----------------------------------------------------------------------------------
N_AUG = 12  # uniform numbers drawn per view


def draw_augmentations(gens: list[torch.Generator], n_views: int) -> torch.Tensor:
    """(B, n_views, N_AUG) uniforms, each target's from its own generator (independent of the batch)."""
    return torch.stack([torch.rand(n_views, N_AUG, generator=g) for g in gens])


def augment_views(images_b3hw: torch.Tensor, u_bvk: torch.Tensor, out_size: int) -> torch.Tensor:
    """DINO-like views of each picture, (B·V, 3, out, out), from uniforms (B, V, N_AUG), in one batched
    grid_sample: view 0 is the whole picture, views up to ceil(V/2) are global crops, the rest local crops; all are resized to
    `out_size`, randomly flipped and jittered, then colour-jittered and blurred."""
    u_bvk = _neutral_first_view(u_bvk.to(images_b3hw.device))
    return _crop_views(images_b3hw, u_bvk, math.ceil(u_bvk.shape[1] / 2), out_size)


def augment_views_split(images_b3hw: torch.Tensor, u_bvk: torch.Tensor, out_size: int,
                        local_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same views as `augment_views`, but the local crops (second half) at `local_size` px, as DINO
    trains them (96 px): (global views (B·G, 3, out, out), local views (B·(V−G), 3, local, local) or None)."""
    u_bvk = _neutral_first_view(u_bvk.to(images_b3hw.device))
    n_global = math.ceil(u_bvk.shape[1] / 2)
    global_views = _crop_views(images_b3hw, u_bvk[:, :n_global], n_global, out_size)
    if n_global == u_bvk.shape[1]:
        return global_views, None
    return global_views, _crop_views(images_b3hw, u_bvk[:, n_global:], 0, local_size)


def _neutral_first_view(u_bvk: torch.Tensor) -> torch.Tensor:
    # View 0 is the whole picture, unchanged (all draws at their neutral value): without it the optimiser
    # over-fits the crops (training loss keeps falling while the whole picture's cosine drops).
    u_bvk = u_bvk.clone()
    u_bvk[:, 0] = 0.5
    u_bvk[:, 0, 0] = 1.0
    return u_bvk


def _crop_views(images_b3hw: torch.Tensor, u_bvk: torch.Tensor, n_global: int, out_size: int) -> torch.Tensor:
    """Views (B·V, 3, out, out) from uniforms (B, V, N_AUG); the first `n_global` views of each picture are
    global crops, the others local crops."""
    b, v, _ = u_bvk.shape
    u = u_bvk.reshape(b * v, N_AUG)
    is_global = (torch.arange(v, device=u.device) < n_global).repeat(b)
    lo = torch.where(is_global, GLOBAL_SCALE[0], LOCAL_SCALE[0])
    hi = torch.where(is_global, GLOBAL_SCALE[1], LOCAL_SCALE[1])
    area = lo + (hi - lo) * u[:, 0]
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1]
    half_w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    half_h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    cx = (1 - half_w) * (2 * u[:, 2] - 1) + JITTER * (2 * u[:, 4] - 1)
    cy = (1 - half_h) * (2 * u[:, 3] - 1) + JITTER * (2 * u[:, 5] - 1)
    flip = torch.where(u[:, 6] < 0.5, -1.0, 1.0)
    theta = torch.zeros(b * v, 2, 3, device=u.device)
    theta[:, 0, 0] = half_w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = half_h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, (b * v, 3, out_size, out_size), align_corners=False)
    src = images_b3hw.repeat_interleave(v, dim=0)
    views = F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # Colour jitter (brightness, contrast, saturation in [0.7, 1.3]) about each view's grey level.
    bright, contrast, sat = (0.7 + 0.6 * u[:, k].view(-1, 1, 1, 1) for k in (7, 8, 9))
    views = views * bright
    grey = (0.299 * views[:, 0:1] + 0.587 * views[:, 1:2] + 0.114 * views[:, 2:3])
    views = (views - grey.mean(dim=(2, 3), keepdim=True)) * contrast + grey.mean(dim=(2, 3), keepdim=True)
    grey = (0.299 * views[:, 0:1] + 0.587 * views[:, 1:2] + 0.114 * views[:, 2:3])
    views = grey + (views - grey) * sat
    # Gaussian blur on half of the views (sigma 0.1–2 px).
    is_blurred = u[:, 10] < 0.5
    sigma = 0.1 + 1.9 * u[:, 11]
    if views.is_cuda:
        # On a GPU: blur every view, the others with sigma 0 (an exact identity kernel), so there is no
        # data-dependent shape (torch.nonzero would wait for the GPU, and a compiled graph would break).
        return gaussian_blur(views, torch.where(is_blurred, sigma, 0.0))
    # On a CPU only the blurred views go through the (grouped, slowish) convolution; the same result.
    blurred_n = torch.nonzero(is_blurred).flatten()
    if len(blurred_n) == 0:
        return views
    return views.index_copy(0, blurred_n, gaussian_blur(views.index_select(0, blurred_n), sigma[blurred_n]))


def gaussian_blur(x_n3hw: torch.Tensor, sigma_n: torch.Tensor) -> torch.Tensor:
    """Separable blur with a different sigma per image (sigma 0 = identity), as grouped convolutions."""
    n, c, h, w = x_n3hw.shape
    r = BLUR_KERNEL // 2
    offs = torch.arange(-r, r + 1, device=x_n3hw.device, dtype=x_n3hw.dtype)
    s = sigma_n.to(x_n3hw.dtype).clamp_min(1e-3).view(-1, 1)
    k_nk = torch.exp(-0.5 * (offs.view(1, -1) / s) ** 2)
    k_nk = k_nk / k_nk.sum(dim=1, keepdim=True)
    k = k_nk.repeat_interleave(c, dim=0)
    x = x_n3hw.reshape(1, n * c, h, w)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(n * c, 1, 1, -1), groups=n * c)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(n * c, 1, -1, 1), groups=n * c)
    return x.view(n, c, h, w)


def total_variation(images_b3hw: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels, per picture (B,)."""
    dx = (images_b3hw[..., :, 1:] - images_b3hw[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    dy = (images_b3hw[..., 1:, :] - images_b3hw[..., :-1, :]).abs().mean(dim=(1, 2, 3))
    return dx + dy


# --- the optimisation ---------------------------------------------------------------------------------
# A target's stopping rule is checked, and freed slots are refilled, every this many steps. Targets enter
# their slots only at these checkpoints, so every target is checked at the same own step counts (10, 20, ...)
# whatever its batch; the check is the one moment the host waits for the GPU.
STOP_CHECK_EVERY = 10
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def target_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s) & 0x7FFF_FFFF_FFFF_FFFF) for s in seeds]


def cosine_to_targets(emb_bd: torch.Tensor, directions_bd: torch.Tensor, centres_bd: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(emb_bd - centres_bd, directions_bd, dim=-1)


class BatchedAdam:
    """Adam over tensors whose first axis is the slot, with one step count per slot.

    torch.optim.Adam keeps one step count per parameter tensor, so with per-target weights stacked in one
    tensor a refilled slot would inherit the bias correction of the target before it. Here each slot has
    its own count (reset with its moments by `reset`), and `step(active_s)` moves only the active slots.
    Otherwise the same update as torch.optim.Adam (no weight decay, no amsgrad)."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas: tuple[float, float] = ADAM_BETAS,
                 eps: float = ADAM_EPS):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.steps_s = torch.zeros(params[0].shape[0], device=params[0].device)

    @torch.no_grad()
    def reset(self, slots: torch.Tensor) -> None:
        for m, v in zip(self.m, self.v):
            m.index_fill_(0, slots, 0.0)
            v.index_fill_(0, slots, 0.0)
        self.steps_s.index_fill_(0, slots, 0.0)

    @torch.no_grad()
    def step(self, active_s: torch.Tensor, all_active: bool = False) -> None:
        """One Adam step for the slots where active_s (float 0/1) is 1; the others keep their weights and
        moments. `all_active` (the caller knows it without looking at the GPU) skips the masking."""
        b1, b2 = self.betas
        self.steps_s += active_s
        t_s = self.steps_s.clamp_min(1.0)
        step_size_s = self.lr / (1 - torch.pow(b1, t_s)) * active_s
        bc2_sqrt_s = torch.sqrt(1 - torch.pow(b2, t_s))
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.ndim - 1)
            g = p.grad
            if all_active:
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
            else:
                a = active_s.view(shape)
                m.lerp_(g, (1 - b1) * a)
                v.mul_(1 - (1 - b2) * a).addcmul_(g, g * ((1 - b2) * a))
            denom = v.sqrt().div_(bc2_sqrt_s.view(shape)).add_(self.eps)
            p.addcdiv_(m * step_size_s.view(shape), denom, value=-1.0)


def make_chunk_loss(model: EmbeddingModel, settings: InversionSettings) -> Callable:
    """loss(pictures (C,3,H,W), uniforms (C,V,N_AUG), directions (C,D), centres (C,D)) → (per-target loss
    (C,), whole-picture cosine (C,)): the part of a step that `torch.compile` can take as one graph."""
    size = model.image_size
    split = settings.augment and settings.n_views > 1 and local_side(settings.local_size, size) != size

    def chunk_loss(img_c3hw, u_cvk, dirs_cd, centres_cd):
        c = img_c3hw.shape[0]
        if not settings.augment:
            emb_cvd = model(img_c3hw).view(c, 1, -1)
        elif split:
            global_views, local_views = augment_views_split(img_c3hw, u_cvk, size, settings.local_size)
            emb_cvd = torch.cat([model(global_views).view(c, -1, model.dim),
                                 model(local_views, resize=False).view(c, -1, model.dim)], dim=1)
        else:
            emb_cvd = model(augment_views(img_c3hw, u_cvk, size)).view(c, settings.n_views, -1)
        cos_cv = cosine_to_targets(emb_cvd, dirs_cd[:, None], centres_cd[:, None])
        loss_c = -cos_cv.mean(dim=1) + settings.tv_weight * total_variation(img_c3hw)
        return loss_c, cos_cv[:, 0]

    return chunk_loss


def compile_chunk_loss(fn: Callable) -> Callable | None:
    """torch.compile'd `fn` (static shapes), or None when this torch cannot compile at all."""
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as e:  # no compiler backend, unsupported platform, ...
        say(f"render: torch.compile is not available ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "running eager")
        return None


def _device_index(values: list[int], device: torch.device) -> torch.Tensor:
    """A small index tensor on `device` without making the host wait for the GPU (pinned, non-blocking)."""
    t = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


# A picture test for early stopping: (embeddings (k, D) on the device, target indices) → bool (k,).
Ready = Callable[[torch.Tensor, list[int]], torch.Tensor]


class Inverter:
    """Renders a list of targets with `n_slots` slots (continuous batching; see the module docstring).

    `compile`: run the chunk loss (augmentations, model, cosine) through torch.compile; if compiling or the
    first compiled steps fail, one line says so and the engine goes on eager. `static_shapes` (default: when
    compiling on CUDA) pads every model pass to `chunk_targets` targets so the compiled graph never recompiles; on a CPU
    the passes hold only the active targets (nothing is computed for empty slots)."""

    def __init__(self, model: EmbeddingModel, settings: InversionSettings, n_slots: int, compile: bool = False,
                 static_shapes: bool | None = None):
        self.model, self.settings = model, settings
        self.device = next(model.backbone.parameters()).device
        self.n_slots = max(1, int(n_slots))
        # Padding every pass to one shape is what keeps a compiled graph from recompiling; eager, it would only
        # waste work (a 1-target unit of the ablation padded to a whole pass).
        self.static_shapes = (compile and self.device.type == "cuda") if static_shapes is None else static_shapes
        self.n_views = settings.n_views if settings.augment else 1
        self.chunk_targets = max(1, settings.max_views_per_pass // self.n_views)
        self.eager_loss = make_chunk_loss(model, settings)
        self.compiled_loss = compile_chunk_loss(self.eager_loss) if compile else None
        self.n_compiled_ok = 0  # compiled steps that went through (the first ones may still fail)

    @property
    def compiled(self) -> bool:
        return self.compiled_loss is not None

    def run(self, directions_nd: torch.Tensor, seeds: list[int], centres_nd: torch.Tensor | None = None,
            on_step: Callable[[int], None] | None = None, on_done: Callable[[int], None] | None = None,
            pixels: bool = False, ready: Ready | None = None) -> InversionResult:
        """Optimise one picture per target so that cosine(embedding − centre, direction) is maximal.

        `centres_nd`: the point each direction is measured from (the SAE's input mean for feature
        directions, zero for raw image embeddings). `seeds[i]` alone decides target i's initialisation and
        augmentations. `on_step(n_active)` after every step; `on_done(n)` when n targets have finished.
        `pixels`: return uint8 pictures (`pixels_bhw3`) instead of float ones (less host memory).
        `ready(embeddings (k, D) on the device, target indices)` → bool (k,): the test a picture should pass
        (see the module docstring); it must depend only on each target's own embedding, so a target still
        renders the same in any batch."""
        assert directions_nd.ndim == 2 and len(seeds) == directions_nd.shape[0], "one seed per target direction"
        run = _Run(self, directions_nd, seeds, centres_nd, on_step, on_done, pixels, ready)
        return run.go()


class _Run:
    """The state of one `Inverter.run`: slots, their targets, the stacked weights and the queue."""

    def __init__(self, inv: Inverter, directions_nd, seeds, centres_nd, on_step, on_done, pixels: bool,
                 ready: "Ready | None" = None):
        st = inv.settings
        self.inv, self.st, self.dev, self.ready = inv, st, inv.device, ready
        self.on_step, self.on_done, self.pixels = on_step, on_done, pixels
        self.n = len(seeds)
        self.seeds = [int(x) for x in seeds]
        self.size = st.size or inv.model.image_size
        self.dirs_nd = F.normalize(directions_nd.detach().float().cpu(), dim=-1)
        self.centres_nd = (torch.zeros_like(self.dirs_nd) if centres_nd is None
                           else centres_nd.detach().float().cpu().expand_as(self.dirs_nd))
        self.n_max = st.n_steps
        self.n_slots = min(inv.n_slots, max(self.n, 1))
        # Results, filled as targets finish.
        d = inv.model.dim
        self.out_cos = torch.full((self.n,), float("nan"))
        self.out_emb = torch.zeros(self.n, d)
        self.out_steps = torch.zeros(self.n, dtype=torch.long)
        self.out_loss = torch.full((self.n_max, self.n), float("nan"))
        self.out_cos0 = torch.full((self.n_max, self.n), float("nan"))
        self.out_images = None if pixels else torch.zeros(self.n, 3, self.size, self.size)
        self.out_pixels = np.zeros((self.n, self.size, self.size, 3), np.uint8) if pixels else None

    # --- slots ---------------------------------------------------------------------------------------
    def _setup(self) -> None:
        st, s, dev = self.st, self.n_slots, self.dev
        self.queue = deque(range(self.n))
        self.slot_target = [-1] * s   # target index per slot (-1: empty)
        self.slot_steps = [0] * s     # steps the slot's target has taken (host copy; no sync needed)
        self.slot_live = [False] * s  # still optimising (False once finished, until refilled)
        first = [self.queue.popleft() for _ in range(s)]
        gens = target_generators([self.seeds[i] for i in first])
        self.param = make_param(st.param, gens, self.size).to(dev)
        self.tensors = per_target_tensors(self.param)
        u_svk = self._draw_schedules(gens)
        self.u_all = u_svk.to(dev) if u_svk is not None else None
        self.dirs = self.dirs_nd[first].to(dev)
        self.centres = self.centres_nd[first].to(dev)
        self.adam = BatchedAdam(list(self.param.parameters()), st.lr * LR_SCALE[st.param])
        hist = max(self.n_max, 1)
        self.loss_hist = torch.full((s, hist), float("nan"), device=dev)
        self.cos0_hist = torch.full((s, hist), float("nan"), device=dev)
        self.best_cos = torch.full((s,), float("-inf"), device=dev)
        self.best_img = torch.zeros(s, 3, self.size, self.size, device=dev)
        if self.ready is not None:
            # The best picture so far that passed `ready` (tested at the checks), by whole-picture cosine.
            self.pass_cos = torch.full((s,), float("-inf"), device=dev)
            self.pass_img = torch.zeros(s, 3, self.size, self.size, device=dev)
        for k, i in enumerate(first):
            self.slot_target[k], self.slot_live[k] = i, True
        self._active_key = None

    def _draw_schedules(self, gens: list[torch.Generator]) -> torch.Tensor | None:
        """Each target's augmentation draws for all its steps, (len(gens), n_steps, n_views, N_AUG), drawn
        right after its initialisation from its own generator (the same numbers as one draw per step)."""
        if not self.st.augment or self.n_max == 0:
            return None
        return torch.stack([torch.rand(self.n_max, self.st.n_views, N_AUG, generator=g) for g in gens])

    def _refill(self, slots: list[int]) -> None:
        """Put the next queued targets into `slots` (freshly initialised weights, schedule, Adam state)."""
        slots = slots[:len(self.queue)]
        if not slots:
            return
        targets = [self.queue.popleft() for _ in slots]
        gens = target_generators([self.seeds[i] for i in targets])
        fresh = [per_target_tensors(make_param(self.st.param, [g], self.size)) for g in gens]
        idx = torch.tensor(slots, dtype=torch.long, device=self.dev)
        with torch.no_grad():
            for name, stacked in self.tensors.items():
                stacked.index_copy_(0, idx, torch.cat([f[name] for f in fresh]).to(self.dev))
            u_svk = self._draw_schedules(gens)
            if u_svk is not None:
                self.u_all.index_copy_(0, idx, u_svk.to(self.dev))
            self.dirs.index_copy_(0, idx, self.dirs_nd[targets].to(self.dev))
            self.centres.index_copy_(0, idx, self.centres_nd[targets].to(self.dev))
            self.adam.reset(idx)
            self.loss_hist.index_fill_(0, idx, float("nan"))
            self.cos0_hist.index_fill_(0, idx, float("nan"))
            self.best_cos.index_fill_(0, idx, float("-inf"))
            if self.ready is not None:
                self.pass_cos.index_fill_(0, idx, float("-inf"))
        for k, i in zip(slots, targets):
            self.slot_target[k], self.slot_steps[k], self.slot_live[k] = i, 0, True

    # --- the loop ------------------------------------------------------------------------------------
    def go(self) -> InversionResult:
        full_s = full_steps = 0.0
        if self.n:
            self._setup()
            while True:
                # Wall time of a window (checkpoint + steps) where every slot was busy: the steady speed.
                t0 = self._clock()
                self._checkpoint()
                if not any(self.slot_live):
                    break
                full, n_target_steps = all(self.slot_live), 0
                # Run to the next checkpoint (fewer steps when every live target reaches n_steps first).
                for _ in range(STOP_CHECK_EVERY):
                    active = [k for k in range(self.n_slots) if self.slot_live[k] and self.slot_steps[k] < self.n_max]
                    if not active:
                        break
                    full &= len(active) == self.n_slots
                    self._step(active)
                    n_target_steps += len(active)
                if full and n_target_steps:
                    full_s += self._clock() - t0
                    full_steps += n_target_steps
        steady = 1000 * full_s / full_steps if full_steps else None
        return InversionResult(self.out_images, self.out_cos, self.out_emb, self.out_loss, self.out_steps,
                               self.out_cos0, self.out_pixels, steady)

    def _clock(self) -> float:
        # Once per checkpoint: bounds how far the host runs ahead of the GPU, and makes the time true.
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        return time.perf_counter()

    def _checkpoint(self) -> None:
        """Finish targets that reached n_steps or whose cosine stopped improving; refill their slots."""
        st = self.st
        live = [k for k in range(self.n_slots) if self.slot_live[k]]
        if self.ready is not None:
            # Only a best picture that beats the kept passing one can change it (this also skips slots whose
            # best has not moved since it passed).
            improved = (self.best_cos > self.pass_cos).cpu()
            self._keep_passing([k for k in live if self.slot_steps[k] > 0 and improved[k]])
        done = [k for k in live if self.slot_steps[k] >= self.n_max]
        if st.stops_early:
            check = [k for k in live if k not in done and self.slot_steps[k] >= st.min_steps]
            if check:
                cos0_sh = self.cos0_hist.cpu().numpy()  # the one wait for the GPU per checkpoint
                stop = [k for k in check if converged(cos0_sh[k, :self.slot_steps[k]], st.stop_window, st.stop_delta)]
                if stop and self.ready is not None and st.stop_own_first:
                    has_pass = (self.pass_cos > float("-inf")).cpu()
                    stop = [k for k in stop if has_pass[k]]
                done += stop
        if done:
            self._finish(sorted(done))
            for k in done:
                self.slot_live[k] = False
            self._refill(done)
            if self.on_done is not None:
                self.on_done(len(done))

    def _embed(self, pictures_n3hw: torch.Tensor) -> torch.Tensor:
        chunk = max(1, self.st.max_views_per_pass)
        return torch.cat([self.inv.model(pictures_n3hw[lo:lo + chunk]) for lo in range(0, len(pictures_n3hw), chunk)])

    @torch.no_grad()
    def _keep_passing(self, slots: list[int]) -> None:
        """Test the best picture so far of `slots` (each better than its kept passing picture) with `ready`,
        and keep those that pass as the slots' best passing pictures (at most one model pass over the slots
        per check: ~1 % of the steps)."""
        if not slots:
            return
        idx = torch.tensor(slots, dtype=torch.long, device=self.dev)
        best_img = self.best_img.index_select(0, idx)
        ok = self.ready(self._embed(best_img), [self.slot_target[k] for k in slots]).to(self.dev)
        self.pass_cos.index_copy_(0, idx, torch.where(ok, self.best_cos.index_select(0, idx),
                                                      self.pass_cos.index_select(0, idx)))
        self.pass_img.index_copy_(0, idx, torch.where(ok.view(-1, 1, 1, 1), best_img, self.pass_img.index_select(0, idx)))

    @torch.no_grad()
    def _finish(self, slots: list[int]) -> None:
        """Record the results of the targets in `slots`: the better (un-augmented cosine) of their best
        picture during the optimisation and their last picture; with `ready`, the best of those two and the
        best passing picture among the ones that pass it, when one does."""
        dev = self.dev
        idx = torch.tensor(slots, dtype=torch.long, device=dev)
        m = len(slots)
        cands = [self.param().float().index_select(0, idx), self.best_img.index_select(0, idx)]
        valid = [torch.ones(m, dtype=torch.bool, device=dev), self.best_cos.index_select(0, idx) > float("-inf")]
        if self.ready is not None:
            cands.append(self.pass_img.index_select(0, idx))
            valid.append(self.pass_cos.index_select(0, idx) > float("-inf"))
        n_c = len(cands)
        emb_cmd = self._embed(torch.cat(cands)).view(n_c, m, -1)
        dirs, centres = self.dirs.index_select(0, idx), self.centres.index_select(0, idx)
        cos_cm = cosine_to_targets(emb_cmd, dirs.expand(n_c, -1, -1), centres.expand(n_c, -1, -1))
        # Score: the cosine, +2 for passing `ready` (cosines are ≤ 1), −inf for a candidate that does not exist.
        score_cm = cos_cm.float().clone()
        if self.ready is not None:
            targets = [self.slot_target[k] for k in slots]
            ok_cm = self.ready(emb_cmd.reshape(n_c * m, -1), targets * n_c).to(dev).view(n_c, m)
            score_cm += 2.0 * ok_cm.float()
        score_cm = torch.where(torch.stack(valid), score_cm, torch.full_like(score_cm, float("-inf")))
        pick_m = score_cm.argmax(dim=0)
        ar = torch.arange(m, device=dev)
        images = torch.stack(cands)[pick_m, ar]
        emb = emb_cmd[pick_m, ar].cpu()
        cos = cos_cm[pick_m, ar].cpu()
        loss_sh = self.loss_hist.index_select(0, idx).cpu()
        cos0_sh = self.cos0_hist.index_select(0, idx).cpu()
        images = images.cpu()
        pixels = to_uint8(images) if self.pixels else None
        for j, k in enumerate(slots):
            i, n_steps = self.slot_target[k], self.slot_steps[k]
            self.out_cos[i], self.out_emb[i], self.out_steps[i] = cos[j], emb[j], n_steps
            self.out_loss[:n_steps, i] = loss_sh[j, :n_steps]
            self.out_cos0[:n_steps, i] = cos0_sh[j, :n_steps]
            if self.pixels:
                self.out_pixels[i] = pixels[j]
            else:
                self.out_images[i] = images[j]

    def _chunks(self, active: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(picture index, write index, weight) per model pass over the active slots; with static shapes
        every pass has chunk_targets entries, the padding repeating a slot with weight 0 and written to the
        spare row n_slots."""
        ct, dev, out = self.inv.chunk_targets, self.dev, []
        for lo in range(0, len(active), ct):
            part = active[lo:lo + ct]
            n_pad = ct - len(part) if self.inv.static_shapes else 0
            weight = torch.tensor([1.0] * len(part) + [0.0] * n_pad)
            out.append((_device_index(part + [part[0]] * n_pad, dev),
                        _device_index(part + [self.n_slots] * n_pad, dev),
                        weight.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else weight))
        return out

    def _prepare_active(self, active: list[int]) -> None:
        key = tuple(active)
        if key == self._active_key:
            return
        self._active_key = key
        self.chunks = self._chunks(active)
        self.active_idx = _device_index(active, self.dev)
        mask = torch.zeros(self.n_slots)
        mask[active] = 1.0
        self.active_s = mask.pin_memory().to(self.dev, non_blocking=True) if self.dev.type == "cuda" else mask

    def _step(self, active: list[int]) -> None:
        inv = self.inv
        while True:
            self._prepare_active(active)
            use_compiled = inv.compiled_loss is not None
            try:
                images, loss_s, cos0_s = self._forward_backward(inv.compiled_loss if use_compiled else inv.eager_loss)
                if use_compiled:
                    inv.n_compiled_ok += 1
                break
            except torch.cuda.OutOfMemoryError:
                if inv.chunk_targets == 1:
                    raise
                self._drop_grads()
                torch.cuda.empty_cache()
                inv.chunk_targets //= 2
                self._active_key = None
                say(f"render: out of GPU memory; retrying with {inv.chunk_targets * inv.n_views} views per pass")
            except Exception as e:
                if not use_compiled or inv.n_compiled_ok >= 2:
                    raise
                # A compile (or compiled-kernel) failure in the first steps: fall back to eager, once.
                self._drop_grads()
                inv.compiled_loss = None
                say(f"render: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                    "running eager")
        with torch.no_grad():
            rows = self.active_idx
            cols = self.adam.steps_s.index_select(0, rows).long()
            self.loss_hist.index_put_((rows, cols), loss_s.index_select(0, rows))
            self.cos0_hist.index_put_((rows, cols), cos0_s.index_select(0, rows))
            cos0_s = cos0_s[:self.n_slots]
            better_s = cos0_s > self.best_cos
            self.best_cos = torch.where(better_s, cos0_s, self.best_cos)
            self.best_img = torch.where(better_s.view(-1, 1, 1, 1), images, self.best_img)
        self.adam.step(self.active_s, all_active=len(active) == self.n_slots)
        for k in active:
            self.slot_steps[k] += 1
        if self.on_step is not None:
            self.on_step(len(active))

    def _drop_grads(self) -> None:
        for p in self.param.parameters():
            p.grad = None

    def _forward_backward(self, loss_fn: Callable):
        """Gradients of every active target's loss into its weights; returns the pictures before the step
        and the per-slot loss and whole-picture cosine (rows of inactive slots: 0 and −inf)."""
        self._drop_grads()
        s = self.n_slots
        images = self.param()
        # The model runs on detached copies in chunks of targets; their pixel gradients are gathered and
        # pushed back through the parameterisation once, so memory is bounded by max_views_per_pass.
        leaf = images.detach().requires_grad_(True)
        loss_s = torch.zeros(s + 1, device=self.dev)
        cos0_s = torch.full((s + 1,), float("-inf"), device=self.dev)
        steps_s = self.adam.steps_s.long()
        for img_idx, write_idx, weight in self.chunks:
            img = leaf.index_select(0, img_idx)
            u = self.u_all[img_idx, steps_s.index_select(0, img_idx)] if self.u_all is not None else None
            loss_c, cos0_c = loss_fn(img, u, self.dirs.index_select(0, img_idx), self.centres.index_select(0, img_idx))
            (loss_c * weight).sum().backward()
            loss_s.index_copy_(0, write_idx, loss_c.detach().float())
            cos0_s.index_copy_(0, write_idx, cos0_c.detach().float())
        images.backward(leaf.grad)
        return images.detach().float(), loss_s, cos0_s


def converged(cos0_s: np.ndarray, window: int, delta: float) -> bool:
    """The stopping rule on one target's own history of whole-picture cosines (one per step so far): its
    best rose by less than `delta` over the last `window` steps."""
    n = len(cos0_s)
    if n <= window:
        return False
    best_now = float(np.nanmax(cos0_s))
    best_before = float(np.nanmax(cos0_s[:n - window]))
    return best_now - best_before < delta


def invert(model: EmbeddingModel, directions_bd: torch.Tensor, seeds: list[int], settings: InversionSettings,
           centres_bd: torch.Tensor | None = None, on_step: Callable[[int], None] | None = None,
           n_slots: int | None = None, compile: bool = False, ready: Ready | None = None) -> InversionResult:
    """Render every target (see `Inverter.run`) with `n_slots` slots (default: all targets at once)."""
    return Inverter(model, settings, n_slots or len(seeds), compile=compile).run(
        directions_bd, seeds, centres_bd, on_step=on_step, ready=ready)


# --- sizing (how many targets and views a GPU holds) ----------------------------------------------------
# Auto sizing on a GPU: model passes of this many views (measured on an H100 with ViT-S/16: 512 views per pass
# run at 2.09 ms per target-step, 1,024 at 2.01, 64 at 5.48), and this many passes per step, so a step is
# long enough that the generator, the optimiser and Python add little, and the tail of a unit (slots
# emptying) wastes at most one pass per step.
AUTO_VIEWS_PER_PASS = 512
AUTO_PASSES_PER_STEP = 2
# Share of the free GPU memory the estimate may fill (the estimate is rough; an out-of-memory step halves
# the views per pass and retries).
AUTO_MEMORY_FRACTION = 0.6
# Today's values, kept on a CPU (where a step is slow anyway and memory is the machine's).
CPU_SLOTS, CPU_VIEWS_PER_PASS = 16, 64


@dataclass(frozen=True)
class ModelShape:
    """What the cost of a ViT pass depends on."""

    hidden: int
    n_layers: int
    intermediate: int
    patch: int
    n_extra_tokens: int   # CLS + register tokens
    image_size: int
    dtype_bytes: int

    @classmethod
    def of(cls, model: EmbeddingModel) -> "ModelShape":
        c = model.backbone.config
        return cls(int(c.hidden_size), int(c.num_hidden_layers), int(c.intermediate_size), int(c.patch_size),
                   1 + int(getattr(c, "num_register_tokens", 0) or 0), model.image_size,
                   torch.finfo(model.dtype).bits // 8)

    def tokens(self, side: int) -> int:
        return (side // self.patch) ** 2 + self.n_extra_tokens


def forward_flops(shape: ModelShape, side: int) -> float:
    """Model FLOPs of one forward pass of one side×side picture (matmuls and attention; ~9.4 G for
    ViT-S/16 at 224). A backward pass to the pixels costs about twice that."""
    t = shape.tokens(side)
    h, i = shape.hidden, shape.intermediate
    per_layer = 2 * t * (4 * h * h + 2 * h * i) + 4 * t * t * h
    patch_embed = 2 * (t - shape.n_extra_tokens) * 3 * shape.patch ** 2 * h
    return float(shape.n_layers * per_layer + patch_embed)


def view_bytes(shape: ModelShape, side: int) -> float:
    """Memory one view holds through a forward+backward pass: the model's saved activations (per token and
    layer ~16 hidden-sized and 2 MLP-sized tensors, with flash attention) and the augmentation's
    float32 copies of the view, with 25 % for the transient peak of the backward."""
    model = shape.n_layers * shape.tokens(side) * (16 * shape.hidden + 2 * shape.intermediate) * shape.dtype_bytes
    pixels = 12 * 3 * side * side * 4
    return 1.25 * (model + pixels)


def local_side(local_size: int, image_size: int) -> int:
    """The side the local views are rendered at: `local_size` when set and smaller than the model's input
    size (a larger one would cost more than a global view for no gain), else the input size."""
    return local_size if 0 < local_size < image_size else image_size


def slot_bytes(picture_side: int, n_steps: int, n_views: int) -> float:
    """Memory one slot holds: the transformer generator's activations and weights (with gradient and two
    Adam moments), the picture (and its gradient and best copy) and the augmentation schedule."""
    grid = math.ceil(picture_side / GEN_PATCH)
    n_tokens = grid * grid
    activations = GEN_LAYERS * n_tokens * 16 * GEN_DIM * 4 + n_tokens * 3 * GEN_PATCH ** 2 * 4 * 3
    n_weights = n_tokens * GEN_DIM + GEN_LAYERS * 9 * GEN_DIM * GEN_DIM + GEN_DIM * 3 * GEN_PATCH ** 2
    pictures = 5 * 3 * picture_side * picture_side * 4
    return 1.25 * (activations + 4 * n_weights * 4 + pictures + n_steps * n_views * N_AUG * 4)


def step_bytes(shape: ModelShape, n_slots: int, views_per_pass: int, n_views: int, picture_side: int,
               n_steps: int, local_size: int = 0) -> float:
    """Estimated GPU memory of a render step (what `auto_batch` keeps under its budget)."""
    n_global = math.ceil(n_views / 2)
    local = local_side(local_size, shape.image_size)
    per_view = (n_global * view_bytes(shape, shape.image_size) + (n_views - n_global) * view_bytes(shape, local)) / n_views
    return n_slots * slot_bytes(picture_side, n_steps, n_views) + views_per_pass * per_view


def auto_batch(free_bytes: float, shape: ModelShape, n_views: int, picture_side: int, n_steps: int,
               local_size: int = 0, max_views_per_pass: int = AUTO_VIEWS_PER_PASS,
               passes_per_step: int = AUTO_PASSES_PER_STEP,
               memory_fraction: float = AUTO_MEMORY_FRACTION) -> tuple[int, int]:
    """(slots, views per pass) for a GPU with `free_bytes` free: passes of a power-of-two number of targets
    (so the sizes, and a compiled graph, do not change with small changes in free memory), up to
    `max_views_per_pass` views, `passes_per_step` passes per step, all within memory_fraction × free_bytes
    by `step_bytes`. At least one target of n_views views."""
    budget = free_bytes * memory_fraction

    def fits(slots: int, chunk: int) -> bool:
        return step_bytes(shape, slots, chunk * n_views, n_views, picture_side, n_steps, local_size) <= budget

    chunk = 1 << max(0, (max(1, max_views_per_pass // n_views)).bit_length() - 1)
    while chunk > 1 and not fits(chunk, chunk):
        chunk //= 2
    slots = chunk * passes_per_step
    while slots > chunk and not fits(slots, chunk):
        slots -= chunk
    return slots, chunk * n_views


def slerp(a_d: torch.Tensor, b_d: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between the unit directions of a and b; t=0 gives a, t=1 gives b exactly."""
    a_d, b_d = F.normalize(a_d.double(), dim=-1), F.normalize(b_d.double(), dim=-1)
    if t == 0:
        return a_d.float()
    if t == 1:
        return b_d.float()
    omega = torch.arccos((a_d @ b_d).clamp(-1.0, 1.0))
    if omega.abs() < 1e-6:
        return F.normalize((1 - t) * a_d + t * b_d, dim=-1).float()
    out = (torch.sin((1 - t) * omega) * a_d + torch.sin(t * omega) * b_d) / torch.sin(omega)
    return F.normalize(out, dim=-1).float()


def orthogonalize(a_d: torch.Tensor, b_d: torch.Tensor) -> torch.Tensor:
    """a with its component along b removed (Gram–Schmidt), normalised to unit length."""
    a_d, b_d = a_d.double(), F.normalize(b_d.double(), dim=-1)
    out = a_d - (a_d @ b_d) * b_d
    assert out.norm() > 1e-8, "cannot orthogonalise a direction against itself"
    return F.normalize(out, dim=-1).float()


def pair_sum(a_d: torch.Tensor, b_d: torch.Tensor) -> torch.Tensor:
    """The normalised sum of the two unit directions."""
    return F.normalize(F.normalize(a_d.double(), dim=-1) + F.normalize(b_d.double(), dim=-1), dim=-1).float()


def to_uint8(images_b3hw: torch.Tensor):
    """[0, 1] float pictures → uint8 (B, H, W, 3) numpy arrays for saving."""
    return (images_b3hw.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
