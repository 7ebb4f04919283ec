"""Shared memory between a training stream's DataLoader workers and its main process: the `BatchRing`, whose batch
slots the workers write each prepared row straight into, at the place the shuffle plan (`dlscale.data.plan`) gives
it, and which the main process hands on batch by batch without copying the rows."""
from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
import time
from collections import deque

import numpy as np
import torch

from dlscale.data.buffers import UNUSED_REFS, BufferPool
from dlscale.data.plan import Cut, Fill, Placement
from dlscale.data.records import worker_share


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


def _populate(address: int, nbytes: int) -> None:
    """Map the pages of `nbytes` at `address`, shared memory another process made, into this one in a single call
    (`madvise`). A forked process inherits no page table entries of a shared mapping: each page it touches costs a
    fault (~1 us here), or, populated, 0.21 us in one call for a whole 1.7 GB ring, 0.28 us in one call per
    1x150x150 row (~2 us a call on top; measured here). Where the kernel lacks the call, the faults happen as
    before."""
    start = address - address % mmap.PAGESIZE
    _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(address + nbytes - start), MADV_POPULATE_WRITE)


_LIBC = ctypes.CDLL(None, use_errno=True)


class BatchRing:
    """`slots` batch slots of `batch_size` rows, `spill_rows` rows for the rows that outlive the shuffle plan's window
    and one row for the rows no batch of the epoch uses, per part of a batch (images, labels, ids, targets), in shared
    memory when workers write into it. Made before the first epoch's workers start and reused by the next epochs (its
    pages are touched once, not once an epoch).

    The main process gives each upcoming batch a free slot, in batch order (`table`: batch k's slot, tagged with k and
    the epoch's generation), and hands a complete batch's images on as a view of its slot: the slot is free again once
    nothing made from that view is left, so a batch the consumer keeps is never written over. Past `LENT` batches
    held at once, it hands on a copy and frees the slot at once, so the workers always find slots; labels, ids and
    targets (a few bytes a sample) are always copies. A worker writes a row into batch k's slot once the slot is
    given, into a spill row once the main process is done with the record the plan names (`state`), and copies the
    spill rows of the batches cut at its record into their places (`fill`): the main process copies no image.
    A worker maps the whole ring the first time it writes (`_map`): a record's rows land in any slot, so over a run
    every worker writes nearly every row, and one call for all of them costs the least per page."""

    def __init__(self, slots: int, batch_size: int, spill_rows: int, work: tuple[int, int], rows: list,
                 shared: bool):
        self.slots, self.bs, self.layout = slots, batch_size, (slots, batch_size, spill_rows, work)
        self.spill_start, self.trash = slots * batch_size, slots * batch_size + spill_rows
        self.work_rows = work[1]
        make = _shared_zeros if shared else lambda shape, dtype: torch.zeros(shape, dtype=dtype)
        *self.store, self.work_store = [None if shape is None else make(*shape)
                                        for shape in self.shapes(*self.layout, rows)]
        share = (lambda t: t.share_memory_()) if shared else (lambda t: t)
        self.table = share(torch.full((2 * slots,), -1, dtype=torch.int64))   # at k mod 2 x slots: tag, slot
        self.table_slot = share(torch.full((2 * slots,), -1, dtype=torch.int64))
        self.state = share(torch.zeros(2, dtype=torch.int64))   # the epoch's generation, the last record done
        self.shared, self.mapped_by = shared, set()   # the processes that have mapped the ring (`_map`)
        self.free, self.lent, self.given, self.next_batch = deque(range(slots)), [], {}, 0
        self.copies = BufferPool(LENT)

    @staticmethod
    def shapes(slots: int, batch_size: int, spill_rows: int, work: tuple[int, int], rows: list) -> list:
        """(shape, dtype) of each part's store (None for an absent part), for `rows`' (shape, dtype) per row (batch
        slots, spill rows, a row for the unused rows), and of the images' work rows: `work` = (writers, rows each)
        where each writer puts what it computes before writing into the ring (the logarithms of `log`: memory a
        worker maps in one call, where memory of its own would cost a fault and a zeroed page per page, every
        epoch)."""
        total = slots * batch_size + spill_rows + 1
        return [None if row is None else ((total, *row[0]), row[1]) for row in rows] + \
            [((work[0] * work[1], *rows[0][0]), rows[0][1]) if work[1] else None]

    @staticmethod
    def nbytes(*layout) -> int:
        """Bytes of a ring made with the arguments `layout` (those of the constructor, `shared` left out)."""
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in filter(None, BatchRing.shapes(*layout)))

    def parts(self) -> list[torch.Tensor]:
        return [store for store in self.store if store is not None]

    # ---- the main process --------------------------------------------------------------------------------------

    def begin_epoch(self) -> None:
        """A new epoch: no batch has a slot yet; slots the consumer still holds stay out of use."""
        self.state[0] += 1
        self.state[1] = -1
        self.table.fill_(-1)
        self._reclaim()
        self.free.extend(self.given.values())
        self.given, self.next_batch = {}, 0
        self._give()

    def done(self, j: int) -> None:
        """Every batch cut when record j arrived is handed on: the spill rows they used may be written again."""
        self.state.numpy()[1] = j

    def batch(self, cut: Cut, lost: np.ndarray | None, pin: bool) -> tuple:
        """Batch `cut.k`'s parts; `lost`: its positions whose record was lost (left out)."""
        s = self.given.pop(cut.k)
        first = s * self.bs
        self._reclaim()
        keep = None if lost is None or not lost.any() else torch.from_numpy(first + np.flatnonzero(~lost))
        parts = tuple(None if store is None else
                      store[first:first + self.bs].clone() if keep is None else store.index_select(0, keep)
                      for store in self.store[1:])
        images = self.store[0][first:first + self.bs]
        if keep is not None:
            images = torch.index_select(self.store[0], 0, keep)
        elif pin:   # the host-to-device copy runs asynchronously from page-locked memory torch keeps until it is done
            images = empty_rows(images, self.bs, True).copy_(images)
        elif len(self.lent) < LENT:
            view = images.numpy()
            self.lent.append((s, view))
            images = torch.from_numpy(view)
            s = None
        else:
            images = self.copies.tensor(tuple(images.shape), images.dtype).copy_(images)
        if s is not None:
            self.free.append(s)
        self._give()
        return (images, *parts)

    def _reclaim(self) -> None:
        """Free the slots of lent batches that nothing refers to any more."""
        held = []
        for s, view in self.lent:    # the loop's name for the view is one reference more
            if sys.getrefcount(view) > UNUSED_REFS + 1:
                held.append((s, view))
            else:
                self.free.append(s)
        self.lent = held

    def _give(self) -> None:
        """Give the free slots to the next batches, in order."""
        table, table_slot = self.table.numpy(), self.table_slot.numpy()
        generation = int(self.state.numpy()[0]) << TAG_BITS
        while self.free:
            s, k = self.free.popleft(), self.next_batch
            self.given[k] = s
            table_slot[k % len(table)] = s
            table[k % len(table)] = generation + k
            self.next_batch += 1

    # ---- a writer (a worker, or the main process without workers) ------------------------------------------------

    def rows(self, place: Placement) -> torch.Tensor:
        """The store rows for a record's rows, once they may be written (waits for slots and spill rows)."""
        self._map()
        generation = int(self.state[0])
        rows = np.full(len(place.position), self.trash, dtype=np.int64)
        placed = place.position >= 0
        if placed.any():
            batches = place.position[placed] // self.bs
            rows[placed] = self._slots(batches, generation) * self.bs + place.position[placed] % self.bs
        spilled = place.spill >= 0
        if spilled.any():
            self._wait(lambda: int(self.state[1]) >= place.stamp, generation, f"record {place.stamp}")
            rows[spilled] = self.spill_start + place.spill[spilled]
        return torch.from_numpy(rows)

    def fill(self, fills: list[Fill]) -> None:
        """Copy the spill rows of the batches cut at this writer's record into their places, once the records that
        wrote them are done (the record's own rows are written: this writer wrote them)."""
        if not fills:     # most records
            return
        generation = int(self.state[0])
        arrays = [store.numpy() for store in self.parts()]
        for fill in fills:
            self._wait(lambda: int(self.state[1]) >= fill.stamp, generation, f"record {fill.stamp}")
            first = int(self._slots(np.array([fill.k]), generation)[0]) * self.bs
            for to, source in zip((first + fill.at).tolist(), (self.spill_start + fill.rows).tolist()):
                for array in arrays:
                    array[to] = array[source]

    def work(self) -> torch.Tensor | None:
        """This writer's work rows (None: the ring has none)."""
        if self.work_store is None:
            return None
        self._map()
        first = worker_share()[0] * self.work_rows
        return self.work_store[first:first + self.work_rows]

    def _slots(self, batches: np.ndarray, generation: int) -> np.ndarray:
        """The slots given to `batches`, once each is given (the main process writes a slot before its tag)."""
        entries, tags = batches % len(self.table), (generation << TAG_BITS) + batches
        table = self.table.numpy()
        self._wait(lambda: bool((table[entries] == tags).all()), generation, f"slots for batches to {batches.max()}")
        return self.table_slot.numpy()[entries]

    def _wait(self, ready, generation: int, what: str) -> None:
        deadline = time.monotonic() + RING_WAIT_S
        while not ready():
            if int(self.state[0]) != generation:
                raise RuntimeError(f"waiting for {what}: the epoch is over")
            if time.monotonic() > deadline:
                raise RuntimeError(f"waited {RING_WAIT_S} s for {what} in the batch ring")
            time.sleep(0.0005)

    def _map(self) -> None:
        """Map the whole ring into this writer, once (a worker; the main process mapped it when it zeroed it)."""
        if self.shared and os.getpid() not in self.mapped_by:
            self.mapped_by.add(os.getpid())
            for store in [t for t in (*self.store, self.work_store) if t is not None]:
                _populate(store.data_ptr(), store.nbytes)


LENT = 4
"""Batches the consumer may hold as views of the ring at once; past that, it gets copies."""
TAG_BITS = 40
RING_WAIT_S = 600
