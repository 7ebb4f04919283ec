"""Writing a training record's images into their batch rows in one pass each: normalised and put through their
dihedral transform on the way (`place_rows`), `minmax` (the default) with each image's minimum and maximum computed
in the same compiled call, just before its pass, while the image is in cache.

Why a compiled loop: numpy and torch take one pass over an image per operation (subtract, scale, gather by
transform, scatter to its row), and a flip is a view only in numpy, whose calls cost a microsecond or more each:
a 1x64x64 image took ~10 us of a worker's CPU through four such passes after its minimum and maximum, where reading
it once and writing it once is ~4 us (measured here). The loops are written so that the compiler vectorises them:
unsigned indices (a signed index is checked for wrapping around, which keeps a loop scalar: ~2.2 us an in-cache
1x64x64 image, ~0.5 us without), one loop per direction of a row, and the minimum and maximum taken over integer keys
that order as the floats do (`_key`; a float minimum in a loop stays scalar unless NaN is ruled out). numba (a JIT
compiler for numpy loops) compiles the loop once per process and caches it on disk; the stream compiles it in the
training process before its workers fork (`compile_row_writer`), so no worker pays for it.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

from dlscale.data.transforms import EPS, affine_terms, chunk_rows, log_rows

SIGN_BIT_OFF, SIGN_SHIFT = np.int32(0x7FFFFFFF), np.int32(31)   # int32 constants: keys stay int32, 16 to a vector


@numba.njit(inline="always")
def _key(bits):
    """An int32 key of a float32's bits that orders as the floats do (negative floats' magnitude bits flipped); its
    own inverse. A NaN's key lies beyond those of +-inf."""
    return np.int32(bits ^ ((bits >> SIGN_SHIFT) & SIGN_BIT_OFF))


@numba.njit(nogil=True)
def _minmax_terms(image, scratch):
    """(offset, scale) of `minmax` for one flat float32 image: its minimum and 1 / (maximum - minimum + EPS), in
    float32 as torch computes them (a minimum and a maximum are exact in any order); NaN if the image holds a NaN (its
    key is the minimum or the maximum)."""
    keys = image.view(np.int32)
    lo = hi = _key(keys[0])
    for t in range(keys.shape[0]):
        k = _key(keys[t])
        lo = k if k < lo else lo     # (`min` and `max` compile to slower code here)
        hi = k if k > hi else hi
    scratch[0], scratch[1] = _key(lo), _key(hi)
    low, high = scratch.view(np.float32)
    return low, np.float32(1.0) / (high - low + np.float32(EPS))


@numba.njit(nogil=True)
def _write_row(image, a, s, k, dst, h, w):
    """dst (C, H, W; W, H when k swaps them) = dihedral transform k of (image - a) * s, `image` a flat C x H x W
    float32 image, in float32 (the same two roundings as numpy or torch taking the subtraction and the product in
    turn: identical results). Output row oy reads a source row, reversed or not (k < 4), or a source column."""
    uh, uw, one = np.uint64(h), np.uint64(w), np.uint64(1)
    flip_x, flip_y = k % 2 == 1, (k // 2) % 2 == 1
    for c in range(dst.shape[0]):
        base, plane = np.uint64(c * h * w), dst[c]
        if k < 4:
            for oy in range(h):
                start = base + (uh - one - np.uint64(oy) if flip_y else np.uint64(oy)) * uw
                row = plane[oy]
                if flip_x:
                    last = start + uw - one
                    for ox in range(w):
                        row[ox] = (image[last - np.uint64(ox)] - a) * s
                else:
                    for ox in range(w):
                        row[ox] = (image[start + np.uint64(ox)] - a) * s
        else:
            for oy in range(w):
                column = base + (uw - one - np.uint64(oy) if flip_x else np.uint64(oy))
                row = plane[oy]
                if flip_y:
                    last = column + (uh - one) * uw
                    for ox in range(h):
                        row[ox] = (image[last - np.uint64(ox) * uw] - a) * s
                else:
                    for ox in range(h):
                        row[ox] = (image[column + np.uint64(ox) * uw] - a) * s


@numba.njit(cache=True, nogil=True)
def _write_rows(src, offset, scale, minmax, choice, out, rows):
    """out[rows[i]] = dihedral transform choice[i] of (src[i] - offset[i]) * scale[i]; `minmax`: with each image's
    own `minmax` terms instead (`offset` and `scale` unused)."""
    n, channels, h, w = src.shape
    flat = src.reshape(n, channels * h * w)
    scratch = np.empty(2, np.int32)
    for i in range(n):
        a, s = _minmax_terms(flat[i], scratch) if minmax else (offset[i], scale[i])
        _write_row(flat[i], a, s, choice[i], out[rows[i]], h, w)


def place_rows(src: np.ndarray, offset: np.ndarray | None, scale: np.ndarray | None, choice: np.ndarray,
               out: np.ndarray, rows: np.ndarray) -> None:
    """Image i of `src` (n,C,H,W float32), normalised as (image - offset[i]) * scale[i] (offset and scale None: with
    its `minmax` terms) and put through dihedral transform choice[i] (as `transforms.augment` numbers them: bit 0
    flips W, bit 1 flips H, 4-7 also swap H and W, for square images), into `out[rows[i]]`."""
    as_c = np.ascontiguousarray     # one compiled signature (C-contiguous arrays) serves every call
    minmax = offset is None
    terms = np.zeros(0 if minmax else len(src), np.float32)
    _write_rows(as_c(src, np.float32), terms if minmax else as_c(offset, np.float32),
                terms if minmax else as_c(scale, np.float32), minmax, as_c(choice, np.int64), out, as_c(rows, np.int64))


TERMS_IN_PASS = {"minmax", "log"}
"""The normalisations whose terms the compiled pass computes (the minimum and the maximum of the image, of its
logarithms for `log`); torch computes the others' (`standardize`'s mean and deviation are sums, whose value depends
on their order; `none`'s are 0 and 1)."""
TORCH_FIRST = {"log", "standardize"}
"""The normalisations that take a pass of torch's over the images first (the logarithms, the mean and deviation):
chunk by chunk, so that the compiled pass finds the images in cache."""


def write_rows(images: torch.Tensor, method: str, choices: np.ndarray, out: torch.Tensor, rows: np.ndarray,
               work: torch.Tensor | None) -> None:
    """Normalise host images (B,C,H,W float32) and put image i through dihedral transform `choices[i]` (as `augment`
    draws them; all 0: none) straight into `out`'s row `rows[i]`: one compiled pass per image after its statistics
    (`place_rows`). `minmax` and `none` take the record in one call; `standardize` and `log` chunk by chunk, so that
    the pass finds the images in cache after torch's statistics or logarithms. `work`: at least `chunk_rows` rows of
    the images' shape that `log` writes its logarithms into (the other methods read the images where they are, never
    writing into them). The same values as `normalize` then `augment`, bit for bit."""
    n = chunk_rows(images[:1].nbytes) if method in TORCH_FIRST else len(images)
    for start in range(0, len(images), n):
        chunk = images[start:start + n]
        if method == "log":   # into `work`: the images (a mapped shard's pages) are never written into
            chunk = log_rows(chunk.flatten(1), work[:len(chunk)].flatten(1)).view(chunk.shape)
        offset = scale = None
        if method not in TERMS_IN_PASS:
            offset, scale = (t.numpy()[:, 0] for t in affine_terms(chunk.flatten(1), method))
        place_rows(chunk.numpy(), offset, scale, choices[start:start + n], out.numpy(), rows[start:start + n])


def compile_row_writer() -> None:
    """Compile (or load from numba's cache) the row writer in this process, for the float32 arrays it is given."""
    image = np.zeros((1, 1, 2, 2), dtype=np.float32)
    place_rows(image, np.zeros(1, np.float32), np.ones(1, np.float32), np.zeros(1, np.int64), image.copy(),
               np.zeros(1, np.int64))
