"""An in-memory index of PDQ hashes: which banked hash is nearest a query, within a radius.

Multi-index hashing (Norouzi et al.): each 256-bit hash is cut into 16
slices of 16 bits. Two hashes at most ``r`` bits apart agree within
``r // 16`` bits on at least one slice (pigeonhole), so looking up, in each
slice's table, the query's slice and its neighbours within that many bits
finds every candidate; only candidates are compared bit by bit. At PDQ's
radius 31 that is 17 lookups per slice, and about 4,000 candidates per
query form at a million random hashes (bench/bank_cost.py measures it against a scan
of every hash and faiss's binary indexes; bench/RESULTS.md, "Bank matching" and "Bank matching, after").

Small banks are scanned whole: below ``BUILD_AT`` hashes a scan is cheaper
than the tables. Hashes added after the tables were built are scanned until
there are enough of them to rebuild (``wants_build``).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .pdq import HASH_BYTES

SLICES = 16
SLICE_BITS = 16
BUCKETS = 1 << SLICE_BITS
WORDS = HASH_BYTES // 8
# Below this many hashes a whole scan costs as little as the tables (bench/bank_cost.py), and
# a bank spares their 4 MB.
BUILD_AT = 2_048
# Rows added after the tables are scanned by every search; rebuilding once they are this share
# of the tables keeps that scan small against the lookups (a rebuild is about 0.7 s per million hashes).
REBUILD_SHARE = 256


@dataclass(frozen=True)
class Hit:
    """The nearest live hash, and its distance from the query."""

    hash: bytes
    distance: int


@dataclass(frozen=True)
class _Tables:
    """Slice tables over the index's first ``rows`` rows.

    ``order`` holds, table after table, the rows sorted by that table's slice;
    ``starts[t * BUCKETS + v]`` is where rows with value ``v`` in slice ``t``
    begin in it (and the next entry where they end).
    """

    rows: int
    order: np.ndarray
    starts: np.ndarray


_NO_TABLES = _Tables(rows=0, order=np.empty(0, dtype=np.int32), starts=np.zeros(1, dtype=np.int32))


@functools.cache
def _neighbours(bits: int) -> np.ndarray:
    """Every 16-bit mask with at most ``bits`` bits set: the offsets a slice is probed with."""
    masks = [0]
    for count in range(1, bits + 1):
        for positions in itertools.combinations(range(SLICE_BITS), count):
            masks.append(sum(1 << p for p in positions))
    return np.array(masks, dtype=np.int64)


class HashIndex:
    """Distinct hashes, each live or removed; not thread-safe.

    A bank holds each hash once per client (``hash_bank``'s unique key), so
    the hash itself names its bank entry: the index keeps nothing else.
    Tables are built by the caller (``build``, or ``tables`` then ``install``
    so that a worker can build them while other threads search:
    worker.hashbank.Banks); ``put`` only appends.
    """

    def __init__(self) -> None:
        # Each hash as four 64-bit words: XOR and a population count compare two of them.
        self._words = np.empty((0, WORDS), dtype=np.uint64)
        self._alive = np.empty(0, dtype=bool)
        self._size = 0
        self._tables = _NO_TABLES

    def __len__(self) -> int:
        return int(np.count_nonzero(self._alive[: self._size]))

    @property
    def nbytes(self) -> int:
        """Memory the index holds: the hashes, their live flags and the slice tables."""
        return self._words.nbytes + self._alive.nbytes + self._tables.order.nbytes + self._tables.starts.nbytes

    @property
    def unbuilt(self) -> int:
        """Rows added after the tables were built: every search scans them."""
        return self._size - self._tables.rows

    @property
    def wants_build(self) -> bool:
        """Whether enough rows came after the tables that rebuilding them pays."""
        return self._size >= BUILD_AT and self.unbuilt > max(BUILD_AT, self._tables.rows // REBUILD_SHARE)

    def put(self, hash_: bytes, *, alive: bool = True) -> None:
        """Add ``hash_``, or mark it live or removed where it is here already."""
        query = _words(hash_)
        same, _ = self._within(query, 0)
        if same.size:
            self._alive[same] = alive
            return
        if not alive:
            return
        self._grow(self._size + 1)
        self._words[self._size] = query[0]
        self._alive[self._size] = True
        self._size += 1

    def put_many(self, hashes: Sequence[bytes]) -> None:
        """Add many live hashes not here yet at once (a bank's first load), then build the tables."""
        if not hashes:
            return
        start = self._size
        self._grow(start + len(hashes))
        self._words[start : start + len(hashes)] = _words(b"".join(hashes))
        self._alive[start : start + len(hashes)] = True
        self._size += len(hashes)
        if self._size >= BUILD_AT:
            self.build()

    def build(self) -> None:
        """(Re)build the slice tables over every row held now."""
        self.install(self.tables())

    def tables(self) -> _Tables:
        """Slice tables over the rows held now; reads the index and changes nothing in it."""
        rows = self._size
        slices = _slices(self._words[:rows])
        order = np.empty(SLICES * rows, dtype=np.int32)
        starts = np.zeros(SLICES * BUCKETS + 1, dtype=np.int32)
        for table in range(SLICES):
            # A stable sort of 16-bit keys is numpy's radix sort: 0.3 s for a million hashes' 16 tables.
            order[table * rows : (table + 1) * rows] = np.argsort(slices[table], kind="stable")
            counts = np.bincount(slices[table], minlength=BUCKETS)
            # Where each bucket starts in ``order``: tables follow one another.
            np.cumsum(counts, out=starts[table * BUCKETS + 1 : (table + 1) * BUCKETS + 1])
            starts[table * BUCKETS + 1 : (table + 1) * BUCKETS + 1] += table * rows
        return _Tables(rows=rows, order=order, starts=starts)

    def install(self, tables: _Tables) -> None:
        """Search with ``tables`` from now on (made by :meth:`tables` of this index)."""
        self._tables = tables

    def nearest(self, queries: Sequence[bytes], radius: int) -> Hit | None:
        """The live hash nearest any of ``queries`` (an image's dihedral forms), if within ``radius`` bits."""
        if not self._size or not queries:
            return None
        rows, distances = self._within(_words(b"".join(queries)), radius)
        # Removed rows are left out only among the few within the radius: looking every candidate
        # up first costs another read of memory per candidate.
        live = np.flatnonzero(self._alive.take(rows))
        if live.size == 0:
            return None
        best = int(live[np.argmin(distances.take(live))])
        return Hit(hash=self._words[rows[best]].tobytes(), distance=int(distances[best]))

    def _within(self, query: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows within ``radius`` of any query form, live or removed, each with its distance (a row may come twice)."""
        rows: list[np.ndarray] = []
        distances: list[np.ndarray] = []
        scanned_from = 0
        if self._tables.rows and radius // SLICES <= 2:
            # Each candidate the tables give against the form that found it.
            found, forms = self._candidates(query, radius)
            found_distances = _distances(self._words.take(found, axis=0), query.take(forms, axis=0))
            near = found_distances <= radius
            rows.append(found[near])
            distances.append(found_distances[near])
            scanned_from = self._tables.rows
        # Rows after the tables (every row, when there are none, or the radius is too wide for
        # them to pay), against every form.
        rest = self._words[scanned_from : self._size]
        for form in query:
            rest_distances = _distances(rest, form[None, :])
            near = np.flatnonzero(rest_distances <= radius)
            rows.append(near + scanned_from)
            distances.append(rest_distances[near])
        return np.concatenate(rows), np.concatenate(distances)

    def _candidates(self, query: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the tables that may be within ``radius`` of a query form, each with that form's index.

        A row may come more than once.
        """
        tables = self._tables
        masks = _neighbours(radius // SLICES)
        # forms x slices x probes: the bucket of each probe, counted across the tables.
        keys = (_slices(query).T[:, :, None] ^ masks[None, None, :]) + (np.arange(SLICES) * BUCKETS)[None, :, None]
        low = tables.starts.take(keys.ravel())
        counts = tables.starts.take(keys.ravel() + 1) - low
        total = int(counts.sum())
        # Every row of every probed bucket, gathered without a Python loop.
        positions = np.repeat(low - np.cumsum(counts) + counts, counts) + np.arange(total)
        forms = np.repeat(np.arange(len(query)).repeat(keys.shape[1] * keys.shape[2]), counts)
        return tables.order.take(positions), forms

    def _grow(self, size: int) -> None:
        if size <= len(self._alive):
            return
        capacity = max(size, 2 * len(self._alive), 1024)
        words = np.zeros((capacity, WORDS), dtype=np.uint64)
        words[: self._size] = self._words[: self._size]
        self._words = words
        alive = np.zeros(capacity, dtype=bool)
        alive[: self._size] = self._alive[: self._size]
        self._alive = alive


def _distances(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Bits apart, row by row, of two arrays of hashes as words (``right`` may be one row).

    (Adding the four columns by hand: numpy's sum over a four-long axis costs ten times as much.)
    """
    bits = np.bitwise_count(left ^ right)
    return bits[:, 0].astype(np.int32) + bits[:, 1] + bits[:, 2] + bits[:, 3]


def _words(hashes: bytes) -> np.ndarray:
    """Hashes as rows of four 64-bit words."""
    return np.frombuffer(hashes, dtype=np.uint64).reshape(-1, WORDS)


def _slices(words: np.ndarray) -> np.ndarray:
    """Each hash as 16 slices of 16 bits, slice-major (slices x rows), as 16-bit unsigned integers."""
    return np.ascontiguousarray(words.view(np.uint8).view(">u2").astype(np.uint16).T)
