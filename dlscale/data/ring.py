"""Shared memory between a training stream's DataLoader workers and its main process: the `RecordRing` the workers
write prepared records into, and the `ShuffleBuffer` that mixes their rows and gathers batches from it."""
from __future__ import annotations

import ctypes
import math
import mmap
import os
import time

import numpy as np
import torch

from dlscale.data.buffers import BufferPool


def empty_rows(t: torch.Tensor, rows: int, pin: bool) -> torch.Tensor:
    """Fresh rows shaped like `t`'s, in page-locked memory when `pin` (a GPU copies them asynchronously)."""
    return torch.empty((rows, *t.shape[1:]), dtype=t.dtype, pin_memory=pin)


def _shared_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed tensor in shared memory (made the way torch's `default_collate` makes its batches in workers, without
    `share_memory_()`'s copy). Zeroing maps every page into this process once: reading rows the workers wrote then
    costs no page faults, which made gathering batches from fresh pages ~5x slower here."""
    empty = torch.empty(0, dtype=dtype)
    return empty.new(empty._typed_storage()._new_shared(math.prod(shape), device="cpu")).view(shape).zero_()


MADV_POPULATE_WRITE = 23   # Linux >= 5.14


def _populate(t: torch.Tensor) -> None:
    """Map the pages of `t`, shared memory another process made, into this one in a single call (`madvise`): a
    worker writing a slot's pages a fault at a time spent ~5.5 ms on the faults of a record of 256 1x150x150 images,
    populating them first ~2.5 ms (measured here). Where the kernel lacks the call, the faults happen as before."""
    start = t.data_ptr() - t.data_ptr() % mmap.PAGESIZE
    _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(t.data_ptr() + t.nbytes - start), MADV_POPULATE_WRITE)


_LIBC = ctypes.CDLL(None, use_errno=True)


class RecordRing:
    """Shared-memory record slots that DataLoader workers write a training epoch's prepared records into (record j
    into slot j mod `record_slots`) and the main process's shuffle buffer draws from, plus `spill` rows where that
    buffer keeps the rows that outlive their record's slot. Made before the first epoch's workers start and
    reused by the next epochs (its pages are touched once, not once an epoch).

    A worker writes record j only once the main process has released record j - record_slots (`released`): with
    slots for every record a worker may be asked for ahead of the main process (`RECORDS_IN_FLIGHT` per worker) plus
    the buffer's own, it never waits; the check keeps a slot from being rewritten under the buffer whatever the
    DataLoader's timing."""

    def __init__(self, record_slots: int, spill_rows: int, samples_per_record: int, rows: list, shared: bool):
        self.record_slots, self.samples_per_record = record_slots, samples_per_record
        self.spill_start = record_slots * samples_per_record
        make = _shared_zeros if shared else lambda shape, dtype: torch.zeros(shape, dtype=dtype)
        self.store = [None if shape is None else make(*shape)
                      for shape in self.shapes(record_slots, spill_rows, samples_per_record, rows)]
        self.released = torch.full((1,), -1, dtype=torch.int64).share_memory_()
        self.shared, self.populated = shared, {}     # pid -> the slots whose pages that process has mapped

    @staticmethod
    def shapes(record_slots: int, spill_rows: int, samples_per_record: int, rows: list) -> list:
        """(shape, dtype) of each part's store (None for an absent part), for `rows`' (shape, dtype) per row."""
        total = record_slots * samples_per_record + spill_rows
        return [None if row is None else ((total, *row[0]), row[1]) for row in rows]

    @staticmethod
    def nbytes(*layout) -> int:
        """Bytes of a ring made with the arguments `layout` (those of the constructor, `shared` left out)."""
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in filter(None, RecordRing.shapes(*layout)))

    def first_row(self, j: int) -> int:
        return (j % self.record_slots) * self.samples_per_record

    def slot(self, j: int, rows: int) -> tuple:
        """A worker: views of the first `rows` rows of record j's slot (None for an absent part), to write the record
        into once the main process has released the record the slot held before."""
        deadline = time.monotonic() + RING_WAIT_S
        while int(self.released[0]) < j - self.record_slots:
            if time.monotonic() > deadline:
                raise RuntimeError(f"record {j}: its ring slot was not released within {RING_WAIT_S} s")
            time.sleep(0.001)
        start = self.first_row(j)
        views = tuple(None if store is None else store[start:start + rows] for store in self.store)
        populated = self.populated.setdefault(os.getpid(), set())
        if self.shared and j % self.record_slots not in populated:
            populated.add(j % self.record_slots)
            for view in views:
                if view is not None:
                    _populate(view)
        return views


RING_WAIT_S = 600


class ShuffleBuffer:
    """The main process's sample pool over a `RecordRing`: which ring rows it holds. A record's rows join when it
    arrives and leave with the batches that take them (gathered once, into fresh memory); the rows still held when
    their record's slot is due to be rewritten move to spill rows (one copy, for the few that linger)."""

    def __init__(self, ring: RecordRing, capacity: int, rng: np.random.Generator, batches: BufferPool | None = None,
                 pin: bool = False):
        self.ring, self.rng, self.batches, self.pin = ring, rng, batches, pin
        self.free = np.arange(ring.spill_start, len(ring.store[1]))[::-1].copy()   # spill rows not in use
        self.n_free = len(self.free)
        self.occupied = np.empty(capacity, dtype=np.int64)
        self.n = 0

    def put(self, j: int, count: int) -> None:
        start = self.ring.first_row(j)
        self.occupied[self.n:self.n + count] = np.arange(start, start + count)
        self.n += count

    def release(self, j: int) -> None:
        """Move the rows of record j still held to spill rows, and let the workers rewrite its slot."""
        start = self.ring.first_row(j)
        held = np.flatnonzero((self.occupied[:self.n] >= start) &
                              (self.occupied[:self.n] < start + self.ring.samples_per_record))
        if len(held):
            spill = self.free[self.n_free - len(held):self.n_free].copy()
            self.n_free -= len(held)
            source, target = torch.from_numpy(self.occupied[held]), torch.from_numpy(spill)
            for store in self.ring.store:
                if store is not None:
                    store.index_copy_(0, target, store.index_select(0, source))
            self.occupied[held] = spill
        self.ring.released[0] = j

    def shuffle(self) -> None:
        self.occupied[:self.n] = self.occupied[self.rng.permutation(self.n)]

    def take(self, k: int) -> tuple:
        """The next `k` samples, in page-locked memory when the buffer pins (torch caches it), else in memory from
        `batches` (reused once the batches made of it are gone), else fresh."""
        rows = self.occupied[self.n - k:self.n].copy()
        self.n -= k
        spilled = rows[rows >= self.ring.spill_start]
        self.free[self.n_free:self.n_free + len(spilled)] = spilled
        self.n_free += len(spilled)
        index = torch.from_numpy(rows)   # index_select: ~6x faster than store[index] here
        return tuple(None if store is None else torch.index_select(store, 0, index, out=self._rows(store, k))
                     for store in self.ring.store)

    def _rows(self, store: torch.Tensor, k: int) -> torch.Tensor:
        if self.batches is None or self.pin:
            return empty_rows(store, k, self.pin)
        return self.batches.tensor((k, *store.shape[1:]), store.dtype)

