"""Writing a training record's images into their batch rows in one pass each: normalised and put through their
dihedral transform on the way (`place_rows`).

Why a compiled loop: numpy and torch take one pass over an image per operation (subtract, scale, gather by
transform, scatter to its row), and a flip is a view only in numpy, whose calls cost a microsecond or more each:
a 1x64x64 image took ~10 us of a worker's CPU through four such passes after its minimum and maximum, where reading
it once and writing it once is ~4 us (measured here). numba (a JIT compiler for numpy loops) compiles the loop
once per process and caches it on disk; the stream compiles it in the training process before its workers fork
(`compile_row_writer`), so no worker pays for it.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

from dlscale.data.transforms import affine_terms, chunk_rows, log_rows


@numba.njit(cache=True, nogil=True)
def _write_rows(src, offset, scale, choice, out, rows):
    """out[rows[i]] = dihedral transform choice[i] of (src[i] - offset[i]) * scale[i], in float32 (the same two
    roundings as numpy or torch taking the subtraction and the product in turn: identical results)."""
    n, channels, h, w = src.shape
    flat = src.reshape(n, -1)
    for i in range(n):
        k, a, s, image, dst = choice[i], offset[i], scale[i], flat[i], out[rows[i]]
        flip_x, flip_y, swap = k % 2 == 1, (k // 2) % 2 == 1, k >= 4
        # output row (c, oy) reads the source from `start` in steps of `step` (the inverse transform)
        step = (w if swap else 1) * (-1 if (flip_y if swap else flip_x) else 1)
        for c in range(channels):
            for oy in range(dst.shape[1]):
                if swap:
                    start = c * h * w + (w - 1 - oy if flip_x else oy) + ((h - 1) * w if flip_y else 0)
                else:
                    start = c * h * w + (h - 1 - oy if flip_y else oy) * w + (w - 1 if flip_x else 0)
                row = dst[c, oy]
                for ox in range(dst.shape[2]):
                    row[ox] = (image[start + ox * step] - a) * s


def place_rows(src: np.ndarray, offset: np.ndarray, scale: np.ndarray, choice: np.ndarray, out: np.ndarray,
               rows: np.ndarray) -> None:
    """Image i of `src` (n,C,H,W float32), normalised as (image - offset[i]) * scale[i] and put through dihedral
    transform choice[i] (as `transforms.augment` numbers them: bit 0 flips W, bit 1 flips H, 4-7 also swap H and W,
    for square images), into `out[rows[i]]`."""
    as_c = np.ascontiguousarray     # one compiled signature (C-contiguous arrays) serves every call
    _write_rows(as_c(src, np.float32), as_c(offset, np.float32), as_c(scale, np.float32), as_c(choice, np.int64), out,
                as_c(rows, np.int64))


def write_rows(images: torch.Tensor, method: str, choices: np.ndarray, out: torch.Tensor, rows: np.ndarray,
               work: torch.Tensor | None) -> None:
    """Normalise host images (B,C,H,W float32) and put image i through dihedral transform `choices[i]` (as `augment`
    draws them; all 0: none) straight into `out`'s row `rows[i]`: one compiled pass per image after its statistics
    (`place_rows`), chunk by chunk so that the pass finds the image in cache. `work`: at least
    `chunk_rows` rows of the images' shape that `log` writes its logarithms into (the other methods read the images
    where they are, never writing into them). The same values as `normalize` then `augment`, bit for bit."""
    n = chunk_rows(images[:1].nbytes)
    for start in range(0, len(images), n):
        chunk = images[start:start + n]
        if method == "log":   # into `work`: the images (a mapped shard's pages) are never written into
            chunk = log_rows(chunk.flatten(1), work[:len(chunk)].flatten(1)).view(chunk.shape)
        offset, scale = affine_terms(chunk.flatten(1), method)
        place_rows(chunk.numpy(), offset.numpy()[:, 0], scale.numpy()[:, 0], choices[start:start + n], out.numpy(),
                   rows[start:start + n])


def compile_row_writer() -> None:
    """Compile (or load from numba's cache) the row writer in this process, for the float32 arrays it is given."""
    image = np.zeros((1, 1, 2, 2), dtype=np.float32)
    place_rows(image, np.zeros(1, np.float32), np.ones(1, np.float32), np.zeros(1, np.int64), image.copy(),
               np.zeros(1, np.int64))
