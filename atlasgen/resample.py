"""Pillow's BICUBIC resize of an RGB picture, the same bytes in under half the time, for ingests large enough to
repay the start-up; and its BILINEAR resize for embed's loader, written straight into a batch (`bilinear_into`).

Ingest's worker spends most of its time in one call: shrinking each decoded picture to the corpus side with
Pillow's bicubic filter (on our CPU box, 500×375 → 341×256: 2.9 ms of ~5.4 ms per image). Pillow filters each
output pixel in scalar C. These numba kernels compute the very same fixed-point sums (22-bit coefficients,
rounded to 8 bits between the two passes, in the same order of passes), but lay each pass out so the inner loop
runs over contiguous memory and vectorises. They work on the picture where Pillow keeps it, 4 bytes a pixel,
lent through Arrow, so there is no conversion to 3-byte pixels and back, and carve every array they make out of
one scratch buffer per thread, kept between pictures (arrays allocated per picture were handed back to the
system and faulted in again every time: ~460 page faults per photo, most of what the kernels saved). A worker's
whole step per photo (decode, resize, JPEG encode) takes 3.3 ms instead of Pillow's 4.9.

Start-up is what limits it: importing numba and its first call cost ~0.9 s per process on our CPU box, even
with the compiled code cached (the first call ever compiles, 4–6 s, and caches it beside this file). So ingest
never waits for them: its workers start with Pillow while the main process prepares the kernels in a thread,
then it forks fresh workers, which inherit the compiled code, for the rest of the corpus (`worth_loading`
says when that pays). Before use they are checked against the installed Pillow: a Pillow that resamples
differently (Pillow 13 chose, for pictures squeezed mostly in height, to run the vertical pass first; 12.0
never did) is followed, or the kernels stay off.
"""
from __future__ import annotations

import threading

import numpy as np
from PIL import Image

# While the kernels start (~0.9 s on one core) each worker handles ~180 pictures with Pillow (~5.2 ms each on our
# CPU box), then finishes the up to 64 it was already handed (ingest's window); after that ~1.5 ms is saved per
# picture, which repays the start-up's core-second from ~600 pictures on. Both with a margin, for slower starts
# on other machines.
STARTUP_IMAGES_PER_WORKER = 250
REPAY_IMAGES = 1000

_kernels = None       # the compiled resize, once prepare() succeeded
_pack_rgb = None      # the compiled 4-byte → 3-byte pixel copy, with it
_vertical_first_rule = True  # whether the installed Pillow runs the vertical pass first for tall squeezes
# Each thread's scratch memory for the kernels, kept from picture to picture up to this many pixels (16 MB; a
# corpus-sized shrink of a 500×375 picture takes 0.7 M): bigger pictures get scratch of their own.
KEEP_SCRATCH_PIXELS = 4 * 2 ** 20
_local = threading.local()


def applies(width: int, height: int, out_width: int, out_height: int) -> bool:
    """Whether `Image.resize(..., BICUBIC or BILINEAR, reducing_gap=3.0)` is a plain resize here (no `reduce()`
    step first, which Pillow takes from a 6× shrink on) that `bicubic` or `bilinear_into` reproduces."""
    return width < 6 * out_width and height < 6 * out_height


def worth_loading(n_images: int | None, n_workers: int) -> bool:
    """Whether an ingest of `n_images` (None: a streamed dataset, size unknown) on `n_workers` should load the
    kernels while its workers start with Pillow."""
    return n_images is None or n_images >= n_workers * STARTUP_IMAGES_PER_WORKER + REPAY_IMAGES


def ready() -> bool:
    """Whether `prepare()` already succeeded in this process (then the kernels cost nothing more)."""
    return _kernels is not None


def prepare() -> str | None:
    """Compile (or load) the kernels in this process and check them against the installed Pillow (bicubic
    resizes, bilinear resizes and crops). Returns None when `bicubic` and `bilinear_into` are ready, else why not
    (no numba, no place to cache, a Pillow that resamples differently)."""
    global _kernels, _pack_rgb, _vertical_first_rule
    if _kernels is not None:
        return None
    rng = np.random.default_rng(0)
    # Shapes for both pass orders (the last two squeeze mostly in height), odd sizes, a one-pixel output; for
    # bilinear also embed's shrink of a corpus copy to the model's size, whole and as a centre crop.
    cases = [((375, 500), (256, 341)), ((61, 47), (20, 33)), ((300, 40), (60, 37)), ((90, 23), (1, 11))]
    try:  # never raises: whatever goes wrong leaves Pillow doing the work (ingest calls this in a thread)
        pairs = []  # (source, what this Pillow makes of it)
        for in_hw, out_hw in cases:
            src = Image.fromarray(rng.integers(0, 256, (*in_hw, 3), dtype=np.uint8))
            pairs.append((src, np.asarray(src.resize(out_hw[::-1], Image.BICUBIC))))
        crops = []  # (source, resized size, crop box, what this Pillow makes of it)
        for in_hw, out_hw, box in [((256, 341), (224, 224), (0, 0, 224, 224)), ((60, 47), (20, 33), (0, 0, 33, 20)),
                                   ((256, 341), (224, 298), (37, 0, 261, 224)), ((300, 40), (60, 37), (2, 5, 30, 40))]:
            src = Image.fromarray(rng.integers(0, 256, (*in_hw, 3), dtype=np.uint8))
            want_hwc = np.asarray(src.resize(out_hw[::-1], Image.BILINEAR, reducing_gap=3.0).crop(box))
            crops.append((src, out_hw[::-1], box, want_hwc))
        kernels, pack_rgb = _compile()
        for vertical_first_rule in (True, False):
            if all(np.array_equal(np.asarray(_resize(kernels, src, want_hwc.shape[1::-1], vertical_first_rule)),
                                  want_hwc)
                   for src, want_hwc in pairs) and \
                    all(np.array_equal(_bilinear_into(kernels, pack_rgb, src, size, box, np.zeros_like(want_hwc),
                                                      vertical_first_rule), want_hwc)
                        for src, size, box, want_hwc in crops):
                _kernels, _pack_rgb, _vertical_first_rule = kernels, pack_rgb, vertical_first_rule
                return None
    except Exception as e:  # numba missing, or unable to compile or cache here: Pillow does the work
        return f"numba kernels unavailable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return "numba kernels differ from this Pillow's resize"


def bicubic(rgb: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`rgb.resize(size, Image.BICUBIC)`, byte for byte, for an RGB picture (after `prepare()` returned None)."""
    assert _kernels is not None, "resample.bicubic before a successful resample.prepare()"
    assert rgb.mode == "RGB", rgb.mode
    return _resize(_kernels, rgb, size, _vertical_first_rule)


def bilinear_into(rgb: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int], out_hw3: np.ndarray
                  ) -> np.ndarray:
    """`np.asarray(rgb.resize(size, Image.BILINEAR, reducing_gap=3.0).crop(box))`, byte for byte, written into
    `out_hw3` (uint8 (box height, box width, 3), e.g. a slot of embed's batch) and returned, for an RGB picture
    (after `prepare()` returned None, where `applies(*rgb.size, *size)`)."""
    assert _kernels is not None, "resample.bilinear_into before a successful resample.prepare()"
    assert rgb.mode == "RGB", rgb.mode
    return _bilinear_into(_kernels, _pack_rgb, rgb, size, box, out_hw3, _vertical_first_rule)


def _bilinear_into(kernels, pack_rgb, rgb: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int],
                   out_hw3: np.ndarray, vertical_first_rule: bool) -> np.ndarray:
    left, top, right, bottom = box
    assert out_hw3.shape == (bottom - top, right - left, 3) and out_hw3.dtype == np.uint8, (out_hw3.shape, box)
    return pack_rgb(_resized(kernels, rgb, size, vertical_first_rule, bilinear=True)[top:bottom, left:right], out_hw3)


def _resize(kernels, rgb: Image.Image, size: tuple[int, int], vertical_first_rule: bool) -> Image.Image:
    out_hw = _resized(kernels, rgb, size, vertical_first_rule, bilinear=False)
    return Image.frombytes("RGB", size, out_hw, "raw", "RGBX")  # a copy: the scratch is reused


def _resized(kernels, rgb: Image.Image, size: tuple[int, int], vertical_first_rule: bool, bilinear: bool
             ) -> np.ndarray:
    """The resized picture as (height, width) 4-byte pixels, in this thread's scratch memory (valid until its next
    resize)."""
    (in_w, in_h), (out_w, out_h) = rgb.size, size
    vertical_first = vertical_first_rule and in_h - out_h > 0 and in_h - out_h > 2 * (in_w - out_w)
    return kernels(_pixels(rgb), out_w, out_h, vertical_first, _scratch(scratch_pixels(in_w, in_h, out_w, out_h)),
                   bilinear)


def scratch_pixels(in_w: int, in_h: int, out_w: int, out_h: int) -> int:
    """The most scratch memory the kernels' resize carves for a picture (its intermediate arrays and its
    result), in 4-byte pixels."""
    return 2 * max(in_h, out_h) * (max(in_w, out_w) + out_w) + out_h * out_w


def _scratch(n_pixels: int) -> np.ndarray:
    """This thread's scratch memory for the kernels, at least `n_pixels` long."""
    scratch = getattr(_local, "scratch", None)
    if scratch is None or scratch.size < n_pixels:
        scratch = np.empty(n_pixels, np.uint32)
        if n_pixels <= KEEP_SCRATCH_PIXELS:
            _local.scratch = scratch
    return scratch


def _pixels(rgb: Image.Image) -> np.ndarray:
    """The picture as a read-only (height, width) array of 4-byte pixels (R, G, B, pad), the layout Pillow keeps
    an RGB picture in: its own memory, lent through Arrow (Pillow ≥ 11.2), where it is one block, else a copy.
    Converting to 3-byte pixels and back (`np.asarray`, `Image.fromarray`) cost ~0.3 ms a picture here; 4-byte
    pixels also make the kernels' transposes whole-word moves."""
    width, height = rgb.size
    n_bytes = width * height * 4
    flat = None
    if hasattr(rgb, "__arrow_c_array__"):  # Pillow ≥ 11.2
        import pyarrow as pa  # imported where used, as in atlasgen.store (prepare() does so before any fork)
        try:
            pixels = pa.array(rgb)  # a fixed-size list of 4 bytes per pixel
            start = pixels.values.offset + 4 * pixels.offset
            # The buffer, not `.to_numpy()`: its first call imports pandas (~0.4 s and 36 MB here) to rule it out.
            flat = np.frombuffer(pixels.values.buffers()[1], np.uint8)[start:start + n_bytes]
        except ValueError:  # a big picture, kept in several blocks
            pass
    if flat is None:
        flat = np.frombuffer(rgb.tobytes("raw", "RGBX"), np.uint8)
    assert flat.size == n_bytes, (flat.size, rgb.size)
    if flat.ctypes.data % 4:
        flat = flat.copy()
        flat.flags.writeable = False
    return flat.view(np.uint32).reshape(height, width)


def _compile():
    """The compiled (resize, pack_rgb)."""
    from ._resample_kernels import pack_rgb, resize  # numba: imported only by a run that uses the kernels
    return resize, pack_rgb
