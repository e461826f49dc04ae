"""An in-memory index of PDQ hashes: which banked hash is nearest a query, within a radius.

Multi-index hashing (Norouzi et al.): each 256-bit hash is cut into 16
slices of 16 bits. Two hashes at most ``r`` bits apart agree within
``r // 16`` bits on at least one slice (pigeonhole), so looking up, in each
slice's table, the query's slice and its neighbours within that many bits
finds every candidate; only candidates are compared bit by bit. At PDQ's
radius 31 that is 17 lookups per slice, and the candidates stay a few
thousand at a million hashes (bench/bank_cost.py measures it against a scan
of every hash and faiss's binary indexes; bench/RESULTS.md, "Bank matching").

Small banks are scanned whole: below ``BUILD_AT`` hashes a scan is cheaper
than the tables. Hashes added after the tables were built are scanned until
there are enough of them to rebuild.
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
# Below this many hashes a whole scan costs as little as the tables (bench/bank_cost.py), and
# a bank spares their 4 MB.
BUILD_AT = 4_096


@dataclass(frozen=True)
class Hit:
    """The nearest live hash, and its distance from the query."""

    hash: bytes
    distance: int


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
    """

    def __init__(self) -> None:
        self._hashes = np.empty((0, HASH_BYTES), dtype=np.uint8)
        self._alive = np.empty(0, dtype=bool)
        self._size = 0
        # Slice tables over rows [0, _built): per slice, rows ordered by slice value, and where each value starts.
        self._built = 0
        self._order = np.empty((SLICES, 0), dtype=np.int32)
        self._starts = np.empty((SLICES, 0), dtype=np.int32)

    def __len__(self) -> int:
        return int(self._alive[: self._size].sum())

    @property
    def nbytes(self) -> int:
        """Memory the index holds: the hashes, their live flags and the slice tables."""
        return sum(a.nbytes for a in (self._hashes, self._alive, self._order, self._starts))

    def put(self, hash_: bytes, *, alive: bool = True) -> None:
        """Add ``hash_``, or mark it live or removed where it is here already."""
        query = np.frombuffer(hash_, dtype=np.uint8).reshape(1, HASH_BYTES)
        rows, _ = self._candidates(query, 0)
        same = rows[(self._hashes[rows] == query).all(axis=1)]
        if same.size:
            self._alive[same] = alive
            return
        if not alive:
            return
        self._grow(self._size + 1)
        self._hashes[self._size] = query[0]
        self._alive[self._size] = True
        self._size += 1
        tail = self._size - self._built
        # Rows after the tables are scanned on every search: rebuild before they cost much.
        if self._size >= BUILD_AT and tail > max(BUILD_AT, self._built // 64):
            self.build()

    def put_many(self, hashes: Sequence[bytes]) -> None:
        """Add many live hashes not here yet at once (a bank's first load), then build the tables."""
        if not hashes:
            return
        start = self._size
        self._grow(start + len(hashes))
        self._hashes[start : start + len(hashes)] = np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(-1, HASH_BYTES)
        self._alive[start : start + len(hashes)] = True
        self._size += len(hashes)
        if self._size >= BUILD_AT:
            self.build()

    def build(self) -> None:
        """(Re)build the slice tables over every row held now."""
        slices = self._slices(self._hashes[: self._size])
        order = np.argsort(slices, axis=0, kind="stable").T.astype(np.int32)
        starts = np.empty((SLICES, (1 << SLICE_BITS) + 1), dtype=np.int32)
        for table in range(SLICES):
            counts = np.bincount(slices[:, table], minlength=1 << SLICE_BITS)
            starts[table, 0] = 0
            np.cumsum(counts, out=starts[table, 1:])
        self._order, self._starts, self._built = order, starts, self._size

    def nearest(self, queries: Sequence[bytes], radius: int) -> Hit | None:
        """The live hash nearest any of ``queries`` (an image's dihedral forms), if within ``radius`` bits."""
        if not self._size or not queries:
            return None
        query = np.frombuffer(b"".join(queries), dtype=np.uint8).reshape(-1, HASH_BYTES)
        if not self._built or radius // SLICES > 2:
            # No tables yet, or a radius too wide for them to pay: every live row against every form.
            rows = np.flatnonzero(self._alive[: self._size])
            if rows.size == 0:
                return None
            words = self._hashes[rows].view(np.uint64)[:, None, :] ^ query.view(np.uint64)[None, :, :]
            distances = np.bitwise_count(words).sum(axis=2, dtype=np.int32).min(axis=1)
        else:
            rows, forms = self._candidates(query, radius)
            keep = self._alive[rows]
            rows, forms = rows[keep], forms[keep]
            if rows.size == 0:
                return None
            # Each candidate against the form that found it: XOR of 64-bit words, then population count.
            words = self._hashes[rows].view(np.uint64) ^ query.view(np.uint64)[forms]
            distances = np.bitwise_count(words).sum(axis=1, dtype=np.int32)
        best = int(np.argmin(distances))
        if int(distances[best]) > radius:
            return None
        return Hit(hash=bytes(self._hashes[rows[best]]), distance=int(distances[best]))

    def _candidates(self, query: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows that may be within ``radius`` of a query form, each with that form's index.

        From the tables, plus every row added after them; a row may come more than once.
        """
        tail = np.arange(self._built, self._size)
        if not self._built:
            return np.tile(np.arange(self._size), len(query)), np.repeat(np.arange(len(query)), self._size)
        masks = _neighbours(radius // SLICES)
        keys = self._slices(query)[:, :, None] ^ masks[None, None, :]  # forms x slices x probes
        tables = np.broadcast_to(np.arange(SLICES)[None, :, None], keys.shape)
        low = self._starts[tables, keys].ravel()
        counts = self._starts[tables, keys + 1].ravel() - low
        total = int(counts.sum())
        # Every row of every probed bucket, gathered without a Python loop.
        offsets = np.repeat(low - np.cumsum(counts) + counts, counts) + np.arange(total)
        found = self._order[np.repeat(tables.ravel(), counts), offsets]
        found_forms = np.repeat(np.arange(len(query)).repeat(keys.shape[1] * keys.shape[2]), counts)
        return (
            np.concatenate([found, np.tile(tail, len(query))]),
            np.concatenate([found_forms, np.repeat(np.arange(len(query)), tail.size)]),
        )

    @staticmethod
    def _slices(hashes: np.ndarray) -> np.ndarray:
        """Each hash as 16 slices of 16 bits (rows x slices)."""
        return hashes.view(">u2").astype(np.int64)

    def _grow(self, size: int) -> None:
        if size <= len(self._alive):
            return
        capacity = max(size, 2 * len(self._alive), 1024)
        hashes = np.zeros((capacity, HASH_BYTES), dtype=np.uint8)
        hashes[: self._size] = self._hashes[: self._size]
        self._hashes = hashes
        alive = np.zeros(capacity, dtype=bool)
        alive[: self._size] = self._alive[: self._size]
        self._alive = alive
