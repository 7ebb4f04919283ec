"""The training stream's shuffle, planned from the records' row counts alone, so that the rows can be written straight
into their batches.

The shuffle buffer (fill to `full` rows, permute, cut batches of `batch_size` from its end until fewer than `keep`
remain) draws only on its seeded RNG and on how many rows each record brings, never on the data. `ShufflePlan` runs
it over row numbers (the epoch's rows numbered in record order) instead of rows: every process that holds one, from
the same seed and the same row counts, knows where each row goes (batch k, position p) without seeing any image.

Batches reach back only `window` batches: a row that the buffer keeps longer than `window` batches past those cut
before its record arrived (the buffer's long tail) goes to a spill row instead, which the writer of the record its
batch is cut at copies into the batch (`Fill`), so that the training process copies no image. Spill rows are reused
in plan order; a spill row freed by the batches cut when record c arrived is given only to a record after c, whose
writer first waits until the training process is done with record c (`Placement.stamp`): c's writer has copied it
into its batch by then.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np


class Placement(NamedTuple):
    """Where the rows of one record go: `position` k x batch_size + p (batch k, position p), or -1; `spill` the spill
    row of a row that outlives the window, or -1; a row with neither is never used this epoch. `stamp`: the record
    the training process must be done with before the spill rows may be written."""
    position: np.ndarray
    spill: np.ndarray
    stamp: int


class Cut(NamedTuple):
    """Batch k as the plan cuts it: `rows` its row numbers by position."""
    k: int
    rows: np.ndarray


class Fill(NamedTuple):
    """The rows of batch k that waited in spill rows: positions `at` take spill rows `rows`, written with the record
    the batch is cut at and records up to `stamp` (the training process done with record `stamp`: they are
    written)."""
    k: int
    at: np.ndarray
    rows: np.ndarray
    stamp: int


class ShufflePlan:
    """One epoch's shuffle buffer over row numbers. `counts()`: the rows of record j = 0, 1, ... (from the manifest;
    called on first use, so that a plan not yet used pickles); a `writer` asks `place(j)` for each of its records in
    order and `fills(j)` for the spill rows it copies into the batches cut when record j arrives, the `reader` (the
    training process) `cuts(j)` for those batches (one plan is both when that process writes the records itself)."""

    def __init__(self, counts: Callable[[], Iterator[int]], rng: np.random.Generator, batch_size: int, full: int,
                 keep: int, capacity: int, batches: int, window: int, spill_rows: int, writer: bool, reader: bool):
        self.writer, self.reader = writer, reader
        self.make_counts, self.counts = counts, None
        self.rng, self.bs, self.full, self.keep = rng, batch_size, full, keep
        self.batches, self.window = batches, window
        self.pool = np.empty(capacity, dtype=np.int64)      # row numbers held, in the buffer's order
        self.limit = np.empty(capacity, dtype=np.int64)     # per held row: the first batch past its record's window
        self.n = self.t = self.rows = self.k = 0            # rows held, records put, rows put, batches cut
        # a row's position is looked up by its number in a ring: a row is placed within `window` batches of its
        # record's arrival and read when the record's window closes, by when fewer rows than this ring holds have been
        # put after it (those held, those of the window's batches and of one more cut)
        self.ring = 2 * (2 * capacity + (window + 2) * batch_size)
        self.position = np.full(self.ring, -1, dtype=np.int64)
        self.records: dict[int, list] = {}      # j -> [first row, rows, spill rows of its rows or None]
        self.open: deque = deque()              # (limit, j) of the records whose window has not closed, in order
        self.spill_of: dict[int, tuple] = {}    # row number -> (spill row, its record), while the row waits in one
        self.free = deque((-1, q) for q in range(spill_rows))   # (record whose batches freed it, spill row)
        self.pending_cuts: dict[int, list[Cut]] = {}
        self.pending_fills: deque = deque()     # the writer's: (j, Fill) of the batches cut at record j, in order
        self.extents: list[range] = []          # the reader's: each record's row numbers
        self.placed = 0                         # the next record `place` answers for
        self.taken = self.spilled = 0           # rows cut into batches, those of them that went through spill rows

    def place(self, j: int) -> Placement:
        """Record j's placement; the records before it, not yet asked for, are planned on the way."""
        while True:
            while self.t <= self.placed or (self.records[self.placed][2] is None and self.k < self.batches):
                self._put()
            first, count, spill = self.records.pop(self.placed)
            self.placed += 1
            if self.placed > j:
                break
        numbers = np.arange(first, first + count)
        position = self.position[numbers % self.ring]
        spilled = np.full(count, -1, dtype=np.int64)
        stamp = -1
        if spill is not None:
            at, rows, stamp = spill
            spilled[at - first] = rows
        return Placement(position, spilled, stamp)

    def cuts(self, j: int) -> list[Cut]:
        """The batches cut when record j arrives (in order); asked once per record, in order."""
        while self.t <= j:
            self._put()
        return self.pending_cuts.pop(j, [])

    def fills(self, j: int) -> list[Fill]:
        """The spill rows to copy into the batches cut when record j arrives (the writer of record j copies them);
        asked in order of j, for this writer's records only (those of the records before it are let go)."""
        while self.t <= j and self.k < self.batches:
            self._put()
        out = []
        while self.pending_fills and self.pending_fills[0][0] <= j:
            at, fill = self.pending_fills.popleft()
            if at == j:
                out.append(fill)
        return out

    def rows_of(self, j: int) -> range:
        """Record j's row numbers (the reader's)."""
        while self.t <= j:
            self._put()
        return self.extents[j]

    def _put(self) -> None:
        self.counts = self.counts or self.make_counts()
        count, first = next(self.counts), self.rows
        self.pool[self.n:self.n + count] = np.arange(first, first + count)
        self.limit[self.n:self.n + count] = self.k + self.window
        self.position[np.arange(first, first + count) % self.ring] = -1
        self.records[self.t] = [first, count, None]
        if self.reader:
            self.extents.append(range(first, first + count))
        self.open.append((self.k + self.window, self.t))
        self.n, self.rows, self.t = self.n + count, first + count, self.t + 1
        if self.n < self.full or self.k >= self.batches:
            return
        order = self.rng.permutation(self.n)
        self.pool[:self.n], self.limit[:self.n] = self.pool[order], self.limit[order]
        while self.n >= self.keep and self.k < self.batches:
            while self.open and self.open[0][0] <= self.k:
                self._close(self.open.popleft()[1])
            self._take()

    def _close(self, j: int) -> None:
        """Record j's window closes: its rows still held get spill rows freed before record j arrived."""
        first, count, _ = record = self.records[j] if self.writer else self.records.pop(j)
        held = self.pool[:self.n]
        at = held[(held >= first) & (held < first + count)]
        rows = np.empty(len(at), dtype=np.int64)
        stamp = -1
        for i, number in enumerate(at.tolist()):
            if not self.free or self.free[0][0] >= j:
                raise RuntimeError(f"shuffle plan: no spill row free for record {j} (the spill area is too small)")
            freed_by, rows[i] = self.free.popleft()
            stamp = max(stamp, freed_by)
            self.spill_of[number] = (int(rows[i]), j)
        record[2] = (at, rows, stamp)

    def _take(self) -> None:
        rows, limit = self.pool[self.n - self.bs:self.n].copy(), self.limit[self.n - self.bs:self.n]
        self.n -= self.bs
        placed = self.k < limit
        self.position[rows[placed] % self.ring] = self.k * self.bs + np.flatnonzero(placed)
        spill_at = np.flatnonzero(~placed)
        if len(spill_at):
            spill_rows, records = np.array([self.spill_of.pop(number) for number in rows[spill_at].tolist()]).T
            self.free.extend((self.t - 1, q) for q in spill_rows.tolist())
            if self.writer:
                stamp = int(records[records < self.t - 1].max(initial=-1))   # record t - 1: its writer copies
                self.pending_fills.append((self.t - 1, Fill(self.k, spill_at, spill_rows, stamp)))
        if self.reader:
            self.pending_cuts.setdefault(self.t - 1, []).append(Cut(self.k, rows))
        self.taken, self.spilled, self.k = self.taken + self.bs, self.spilled + len(spill_at), self.k + 1
