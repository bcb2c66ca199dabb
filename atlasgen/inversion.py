"""The inversion engine: optimise pictures so that the model's embedding of them points along target
directions (maximise cosine), as in the seed study.

A batch of B targets is optimised together; every target owns its parameters (pixel logits, a Fourier
spectrum, or the weights of its own small untrained transformer generator), its own `torch.Generator`
(seeded from the target's seed, so a target renders the same alone or in any batch), and its own loss
term (the batch loss is a sum, so targets do not share gradient scale).

Each step scores `n_views` augmented views per target that mimic DINO's training views (random resized
global and local crops, flips, colour jitter, blur, small translations), so the optimiser cannot cheat with
high-frequency noise, plus `tv_weight` × total variation of the picture.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .config import RenderConfig
from .model import EmbeddingModel

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
    n_steps: int = _DEFAULTS.n_steps
    lr: float = _DEFAULTS.lr
    tv_weight: float = _DEFAULTS.tv_weight
    size: int = _DEFAULTS.size
    # Chunking views bounds memory only: per-target gradients are independent, so the result is the same
    # beyond float rounding.
    max_views_per_pass: int = _DEFAULTS.max_views_per_pass

    def __post_init__(self):
        assert self.param in PARAMS, f"unknown parameterisation {self.param!r}"
        assert self.n_views >= 1 and self.n_steps >= 0, "n_views ≥ 1 and n_steps ≥ 0"


@dataclass
class InversionResult:
    images_b3hw: torch.Tensor      # final pictures in [0, 1], float32, on the CPU
    cosine_b: torch.Tensor         # cosine of each un-augmented final picture's embedding to its target
    embeddings_bd: torch.Tensor    # the model's (raw) embedding of each final picture
    loss_sb: torch.Tensor          # per-step, per-target training loss (augmented views), shape (n_steps, B)


# --- parameterisations -------------------------------------------------------------------------------
class PixelParam(torch.nn.Module):
    """Raw pixels: a sigmoid of free logits."""

    def __init__(self, gens: list[torch.Generator], size: int):
        super().__init__()
        self.logits_b3hw = torch.nn.Parameter(
            torch.stack([torch.randn(3, size, size, generator=g) * 0.1 for g in gens]))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logits_b3hw)


class FourierParam(torch.nn.Module):
    """Lucid-style: a spectrum scaled by 1/frequency (so low frequencies move first), colour decorrelated."""

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


# --- augmentations -----------------------------------------------------------------------------------
N_AUG = 12  # uniform numbers drawn per view


def draw_augmentations(gens: list[torch.Generator], n_views: int) -> torch.Tensor:
    """(B, n_views, N_AUG) uniforms, each target's from its own generator (independent of the batch)."""
    return torch.stack([torch.rand(n_views, N_AUG, generator=g) for g in gens])


def augment_views(images_b3hw: torch.Tensor, u_bvk: torch.Tensor, out_size: int) -> torch.Tensor:
    """DINO-like views of each picture, (B·V, 3, out, out), from uniforms (B, V, N_AUG), in one batched
    grid_sample: view 0 is the whole picture, views up to ceil(V/2) are global crops, the rest local crops; all are resized to
    `out_size`, randomly flipped and jittered, then colour-jittered and blurred."""
    b, v, _ = u_bvk.shape
    # View 0 is the whole picture, unchanged (all draws at their neutral value): without it the optimiser
    # over-fits the crops (training loss keeps falling while the whole picture's cosine drops).
    u_bvk = u_bvk.clone()
    u_bvk[:, 0] = 0.5
    u_bvk[:, 0, 0] = 1.0
    u = u_bvk.to(images_b3hw.device).reshape(b * v, N_AUG)
    n_global = math.ceil(v / 2)
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
    blurred_n = torch.nonzero(u[:, 10] < 0.5).flatten()
    if len(blurred_n) == 0:
        return views
    # Only the blurred views go through the (grouped, slowish on CPU) convolution.
    sigma = 0.1 + 1.9 * u[blurred_n, 11]
    return views.index_copy(0, blurred_n, gaussian_blur(views.index_select(0, blurred_n), sigma))


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
def target_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s) & 0x7FFF_FFFF_FFFF_FFFF) for s in seeds]


def cosine_to_targets(emb_bd: torch.Tensor, directions_bd: torch.Tensor, centres_bd: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(emb_bd - centres_bd, directions_bd, dim=-1)


def invert(model: EmbeddingModel, directions_bd: torch.Tensor, seeds: list[int], settings: InversionSettings,
           centres_bd: torch.Tensor | None = None,
           on_step: Callable[[int], None] | None = None) -> InversionResult:
    """Optimise one picture per target so that cosine(embedding − centre, direction) is maximal.

    `centres_bd`: the point the direction is measured from (the SAE's input mean for feature directions,
    zero for raw image embeddings). `seeds[b]` alone decides target b's initialisation and augmentations."""
    assert directions_bd.ndim == 2 and len(seeds) == directions_bd.shape[0], "one seed per target direction"
    device = next(model.backbone.parameters()).device
    b = directions_bd.shape[0]
    size = settings.size or model.image_size
    directions_bd = F.normalize(directions_bd.float().to(device), dim=-1)
    centres_bd = torch.zeros_like(directions_bd) if centres_bd is None else centres_bd.float().to(device)
    gens = target_generators(seeds)
    param = make_param(settings.param, gens, size).to(device)
    opt = torch.optim.Adam(param.parameters(), lr=settings.lr * LR_SCALE[settings.param])
    n_views = settings.n_views if settings.augment else 1
    chunk = max(1, settings.max_views_per_pass // n_views)
    loss_sb = torch.zeros(settings.n_steps, b)
    for step in range(settings.n_steps):
        u_bvk = draw_augmentations(gens, settings.n_views) if settings.augment else None
        opt.zero_grad(set_to_none=True)
        images = param()
        # The model runs on detached copies in chunks of targets; their pixel gradients are gathered and
        # pushed back through the parameterisation once, so memory is bounded by max_views_per_pass.
        leaf = images.detach().requires_grad_(True)
        for lo in range(0, b, chunk):
            hi = min(b, lo + chunk)
            img = leaf if hi - lo == b else leaf[lo:hi]
            if settings.augment:
                views = augment_views(img, u_bvk[lo:hi], model.image_size)
            else:
                views = img
            emb = model(views).view(hi - lo, n_views, -1)
            cos_bv = cosine_to_targets(emb, directions_bd[lo:hi, None], centres_bd[lo:hi, None])
            loss_b = -cos_bv.mean(dim=1) + settings.tv_weight * total_variation(img)
            loss_b.sum().backward()
            loss_sb[step, lo:hi] = loss_b.detach().cpu()
        images.backward(leaf.grad)
        opt.step()
        if on_step is not None:
            on_step(step)
    with torch.no_grad():
        images = param().float()
        emb_bd = torch.cat([model(images[lo:lo + settings.max_views_per_pass])
                            for lo in range(0, b, settings.max_views_per_pass)])
        cosine_b = cosine_to_targets(emb_bd, directions_bd, centres_bd)
    return InversionResult(images.cpu(), cosine_b.cpu(), emb_bd.cpu(), loss_sb)


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
