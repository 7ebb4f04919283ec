"""Large buffers handed out again once nothing refers to them: a training stream's record reads and batches.

Fresh memory costs a page fault per 4 KiB page the first time it is written (the kernel zeroes it): up to ~2.5 us a
page here, ~55 us a 1x150x150 sample, more than copying the sample. `malloc` may return a large block to the kernel
when it is freed (glibc does above its mmap threshold), and a loop that allocates a batch per step then pays that on
every batch. A `BufferPool` keeps a few buffers
and lends one again only when no array or tensor made from it is left (numpy's base chain and `torch.from_numpy`
hold a reference to it, so a buffer a caller still holds, even through a view, is never written over).
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch

POOLED_BYTES = 1 << 18
"""Smaller requests are plain allocations: `malloc` keeps small blocks and reuses them without new pages."""


class BufferPool:
    """Up to `keep` reusable buffers; memory held: those buffers (each as large as the largest request it served)
    plus whatever callers still hold."""

    def __init__(self, keep: int):
        self.keep, self.buffers = keep, []

    def take(self, nbytes: int) -> np.ndarray:
        """`nbytes` of uninitialised uint8 memory that no one else refers to."""
        if nbytes < POOLED_BYTES:
            return np.empty(nbytes, dtype=np.uint8)
        unused = [i for i in range(len(self.buffers)) if sys.getrefcount(self.buffers[i]) <= UNUSED_REFS]
        fits = [i for i in unused if len(self.buffers[i]) >= nbytes]
        if fits:
            return self.buffers[fits[0]][:nbytes]
        buffer = np.empty(nbytes, dtype=np.uint8)
        if unused:                       # a free buffer too small for this request makes room
            self.buffers[unused[0]] = buffer
        elif len(self.buffers) < self.keep:
            self.buffers.append(buffer)
        return buffer[:nbytes]

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of `shape` and `dtype` in pooled memory."""
        nbytes = math.prod(shape) * dtype.itemsize
        return torch.from_numpy(self.take(nbytes)).view(dtype).view(shape)


UNUSED_REFS = 2
"""`sys.getrefcount` of a buffer only the pool holds, as `take` counts it: the pool's list and the call's argument."""
