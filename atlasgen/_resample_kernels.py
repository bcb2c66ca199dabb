"""The numba kernels behind `atlasgen.resample` (a module of their own so that numba is imported, and the
kernels compiled or loaded from numba's cache beside this file, only when a run uses them). They release the
GIL, as Pillow's resize does, for where the workers are threads (no fork)."""
from __future__ import annotations

import numba
import numpy as np

BITS = 22  # coefficient scale 2**BITS: 8 bits of pixel + 2 bits of overshoot fit in an int32 sum


@numba.njit(cache=True, nogil=True)
def coefficients(in_size, out_size, bilinear):
    """Per output index: the first input index, the number of taps, and the taps as fixed-point ints
    (Pillow's filter, widened by the shrink factor, normalised to sum 1: the bicubic kernel with a = -0.5, or with
    `bilinear` the triangle)."""
    scale = np.float64(np.float32(in_size)) / out_size  # Pillow takes the box edges as floats
    filter_scale = max(scale, 1.0)
    support = (1.0 if bilinear else 2.0) * filter_scale
    n_taps_max = int(np.ceil(support)) * 2 + 1
    taps = np.zeros((out_size, n_taps_max), np.int32)
    bounds = np.zeros((out_size, 2), np.int32)
    weights = np.zeros(n_taps_max, np.float64)
    inv_scale = 1.0 / filter_scale
    for o in range(out_size):
        center = 0.0 + (o + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        n_taps = min(int(center + support + 0.5), in_size) - first
        total = 0.0
        for t in range(n_taps):
            x = abs(((t + first) - center + 0.5) * inv_scale)
            if bilinear:
                w = 1.0 - x if x < 1.0 else 0.0
            elif x < 1.0:
                w = (1.5 * x - 2.5) * x * x + 1
            elif x < 2.0:
                w = (((x - 5) * x + 8) * x - 4) * -0.5
            else:
                w = 0.0
            weights[t] = w
            total += w
        for t in range(n_taps):
            w = weights[t] / total if total != 0.0 else weights[t]
            taps[o, t] = int(w * (1 << BITS) - 0.5) if w < 0 else int(w * (1 << BITS) + 0.5)
        bounds[o, 0] = first
        bounds[o, 1] = n_taps
    return taps, bounds


@numba.njit(cache=True, nogil=True)
def filter_rows(src, taps, bounds, row_offset, out):
    """Filter along axis 0 of a (rows, cols) array of 4-byte pixels (R, G, B and Pillow's pad byte) into `out`
    (out rows, cols): each output row is a weighted sum of whole input rows, byte by byte, so the inner loop runs
    over contiguous memory."""
    src8 = src.view(np.uint8)  # (rows, cols * 4)
    out8 = out.view(np.uint8)
    n_bytes = src8.shape[1]
    acc = np.empty(n_bytes, np.int32)
    for o in range(taps.shape[0]):
        acc[:] = np.int32(1 << (BITS - 1))  # rounds the final shift to nearest
        first = bounds[o, 0] - row_offset
        for t in range(bounds[o, 1]):
            w = taps[o, t]
            row = src8[first + t]
            for i in range(n_bytes):
                acc[i] += np.int32(row[i]) * w
        for i in range(n_bytes):
            v = acc[i] >> BITS
            out8[o, i] = 0 if v < 0 else (255 if v > 255 else v)
    return out


TILE = 16  # transpose tile side: a compile-time constant, so numba unrolls the tile's loops


@numba.njit(cache=True, nogil=True)
def transpose(src, out):
    """(rows, cols) → `out` (cols, rows) of 4-byte pixels, in TILE×TILE tiles of fixed size (unrolled: half the
    time of a loop with variable bounds), then the ragged edges."""
    n_rows, n_cols = src.shape
    full_rows, full_cols = n_rows - n_rows % TILE, n_cols - n_cols % TILE
    for r0 in range(0, full_rows, TILE):
        for c0 in range(0, full_cols, TILE):
            for c in range(TILE):
                for r in range(TILE):
                    out[c0 + c, r0 + r] = src[r0 + r, c0 + c]
    for r in range(full_rows):
        for c in range(full_cols, n_cols):
            out[c, r] = src[r, c]
    for r in range(full_rows, n_rows):
        for c in range(n_cols):
            out[c, r] = src[r, c]
    return out


@numba.njit(cache=True, nogil=True)
def _take(scratch, start, n_rows, n_cols):
    """The next (n_rows, n_cols) array of `scratch` from pixel `start`, and where the one after it starts."""
    end = start + n_rows * n_cols
    return scratch[start:end].reshape((n_rows, n_cols)), end


@numba.njit(cache=True, nogil=True)
def _filter_width(src, taps, bounds, out_w, scratch, at):
    """The width pass over (rows, cols) `src`, transposed there and back so that it filters whole rows; its three
    arrays from `scratch` at pixel `at`. Returns the (rows, out_w) result and where the scratch's free part starts."""
    n_rows, in_w = src.shape
    cols, at = _take(scratch, at, in_w, n_rows)
    filtered, at = _take(scratch, at, out_w, n_rows)
    out, at = _take(scratch, at, n_rows, out_w)
    return transpose(filter_rows(transpose(src, cols), taps, bounds, 0, filtered), out), at


@numba.njit(cache=True, nogil=True)
def resize(src, out_w, out_h, vertical_first, scratch, bilinear):
    """Resize a (rows, cols) array of 4-byte pixels to (out_h, out_w), with the bicubic filter or with `bilinear`
    the triangle. Every array it makes, the result too, is
    carved out of `scratch` (at least `resample.scratch_pixels` long): allocated afresh for every picture, they
    made the allocator hand memory back to the system and fault it in again each time (~460 page faults and
    ~0.75 ms of system time per 500×375 photo on our CPU box, most of what the kernels save)."""
    in_h, in_w = src.shape
    taps_v, bounds_v = coefficients(in_h, out_h, bilinear)
    taps_h, bounds_h = coefficients(in_w, out_w, bilinear)
    at = 0
    if vertical_first:
        if out_h == in_h:
            out, at = _take(scratch, at, in_h, in_w)
            out[:, :] = src
        else:
            out, at = _take(scratch, at, out_h, in_w)
            filter_rows(src, taps_v, bounds_v, 0, out)
        if out_w != in_w:
            out, at = _filter_width(out, taps_h, bounds_h, out_w, scratch, at)
        return out
    # Width first, over only the rows the height pass reads.
    first_row, end_row = 0, in_h
    if out_h != in_h and out_w != in_w:
        first_row, end_row = bounds_v[0, 0], bounds_v[out_h - 1, 0] + bounds_v[out_h - 1, 1]
    n_rows = end_row - first_row
    if out_w == in_w:
        out, at = _take(scratch, at, n_rows, in_w)
        out[:, :] = src[first_row:end_row]
    else:
        out, at = _filter_width(src[first_row:end_row], taps_h, bounds_h, out_w, scratch, at)
    if out_h != in_h:
        result, at = _take(scratch, at, out_h, out_w)
        out = filter_rows(out, taps_v, bounds_v, first_row, result)
    return out


@numba.njit(cache=True, nogil=True)
def pack_rgb(src, out):
    """(rows, cols) 4-byte pixels (a view, maybe a crop) → `out` (rows, cols, 3) bytes, dropping Pillow's pad byte.
    numpy's strided copy of the same took as long as the resize itself (0.18 ms for 224×224 on our CPU box).
    A pixel's bytes in memory are R, G, B, pad: on a little-endian machine (checked by `resample.prepare`), its
    low byte is R."""
    n_rows, n_cols = src.shape
    for r in range(n_rows):
        for c in range(n_cols):
            pixel = src[r, c]
            out[r, c, 0] = pixel & 0xFF
            out[r, c, 1] = (pixel >> 8) & 0xFF
            out[r, c, 2] = (pixel >> 16) & 0xFF
    return out
