"""Near-duplicate lookup of perceptual hashes without comparing all pairs.

Multi-index hashing: split each `bits`-bit hash into `max_distance + 1` disjoint bands. Two hashes
within Hamming distance d differ in at most d bits, so by pigeonhole at least one band is identical:
exact lookups per band give every candidate, and only candidates get the exact popcount.

The per-band tables are one numpy structure rather than Python dicts: with 64-bit hashes and d = 4 a
band has 13 bits, so at 100k hashes a bucket already holds ~12 entries and candidates must be verified
in bulk. Every (band, band value) pair is a bucket id (band number in the high bits; hashed down to
2^16 buckets when bands are wider, which only adds candidates the popcount then drops). All buckets
share one array in which each owns a slice with room to grow (compressed rows with slack), so adding a
batch writes into free slots, and a whole batch is looked up with a few vectorised gathers. When a
bucket is full the table is rebuilt, each bucket with room for twice its entries (plus a few), so
rebuilds get rarer as the index grows.

`dedup_batch` adds a batch first and decides afterwards: a rejected group's hashes stay as dead entries
(ignored by every lookup, dropped at the next rebuild), which lets one lookup find the matches in the
index and inside the batch alike.
"""

from __future__ import annotations

from itertools import chain, compress
from typing import Any

import numpy as np

_MAX_BUCKET_BITS = 16
_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # multiplicative hashing of wide band codes into 2^16 buckets
_SLACK = 16  # free slots every bucket gets at a rebuild, on top of doubling its size


class _Buckets:
    """Bucket id -> index positions. Bucket b owns `room[b]` slots from start[b], the first fill[b] of them used."""

    def __init__(self, ids: np.ndarray, positions: np.ndarray, count: int) -> None:
        sizes = np.bincount(ids, minlength=count)
        self.room = 2 * sizes + _SLACK
        self.start = np.concatenate([[0], np.cumsum(self.room)])
        self.fill = sizes
        self.positions = np.empty(int(self.start[-1]), dtype=np.int64)
        order = self._stable_order(ids)
        ids = ids[order]
        self.positions[self.start[ids] + np.arange(len(ids)) - (np.cumsum(sizes) - sizes)[ids]] = positions[order]

    def add(self, ids: np.ndarray, positions: np.ndarray) -> bool:
        """Write the entries into free slots; False, with nothing written, if a bucket has no room left."""
        order = self._stable_order(ids)
        ids = ids[order]
        used = self.fill[ids] + np.arange(len(ids)) - np.searchsorted(ids, ids)  # after the batch's earlier equal ids
        if np.any(used >= self.room[ids]):
            return False
        self.positions[self.start[ids] + used] = positions[order]
        np.add.at(self.fill, ids, 1)
        return True

    def slots(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The used slots of the buckets `ids`, bucket after bucket, and how many each bucket has."""
        counts = self.fill[ids]
        ends = np.cumsum(counts)
        # Expand each bucket's run of slots without a Python loop.
        slots = np.repeat(self.start[ids] - (ends - counts), counts) + np.arange(int(ends[-1]) if len(ends) else 0)
        return slots, counts

    @staticmethod
    def _stable_order(ids: np.ndarray) -> np.ndarray:
        # Bucket ids fit in 16 bits, for which numpy's stable sort is a radix sort: linear time.
        return np.argsort(ids.astype(np.uint16), kind="stable")


class HashIndex:
    """Hashes (ints of `bits` bits) with a key each; finds the stored hashes within max_distance bits."""

    def __init__(self, max_distance: int, bits: int = 64) -> None:
        if not 0 <= max_distance < bits <= 64:
            raise ValueError(f"need 0 <= max_distance < bits <= 64, got {max_distance} and {bits}")
        self.max_distance = max_distance
        self.bits = bits
        bands = max_distance + 1
        widths = [bits // bands + (i < bits % bands) for i in range(bands)]
        self._shifts = np.cumsum([0, *widths[:-1]]).astype(np.uint64)
        self._masks = np.array([(1 << w) - 1 for w in widths], dtype=np.uint64)
        self._tags = np.array([band << max(widths) for band in range(bands)], dtype=np.uint64)  # band 0 needs no tag
        self._hashed = bands << max(widths) > 1 << _MAX_BUCKET_BITS
        self._bucket_count = 1 << _MAX_BUCKET_BITS if self._hashed else bands << max(widths)
        self._values = np.zeros(1024, dtype=np.uint64)  # capacity doubles: appending stays amortised O(1)
        self._alive = np.zeros(1024, dtype=bool)
        self._keys: list[str] = []
        self._live = 0
        self._buckets = self._rebuilt()

    def __len__(self) -> int:
        return self._live

    def add_many(self, values: list[int] | np.ndarray, keys: list[str]) -> None:
        """Add hashes unconditionally (no deduplication)."""
        values = np.asarray(values, dtype=np.uint64)
        self._append(values, keys, self._bucket_ids(values))

    def nearest(self, value: int) -> tuple[str, int] | None:
        """The earliest-added live (key, distance) within max_distance of `value`, or None."""
        query = np.array([value], dtype=np.uint64)
        _, positions, distances = self._close_pairs(query, self._bucket_ids(query))
        if not len(positions):
            return None
        first = int(np.argmin(positions))
        return self._keys[positions[first]], int(distances[first])

    def dedup_batch(self, groups: list[list[int]], keys: list[list[str]]) -> list[tuple[int, str, int] | None]:
        """Keep-first deduplication of one batch of groups (the hashes of one sample each), in order.

        Per group: its first member within max_distance of an earlier live hash (in the index, or in an
        earlier kept group of this batch) as (member, that hash's key, distance); or None, and the group's
        hashes stay in the index. Members of one group are never compared with each other.
        """
        sizes = list(map(len, groups))
        if list(map(len, keys)) != sizes:
            raise ValueError("keys must have the shape of groups: one key per hash")
        starts = np.cumsum([0, *sizes])
        flat = np.array(list(chain.from_iterable(groups)), dtype=np.uint64)
        ids = self._bucket_ids(flat)
        base = len(self._keys)
        self._append(flat, list(chain.from_iterable(keys)), ids)
        group_of = np.repeat(np.arange(len(groups)), sizes)
        query, position, distance = self._close_pairs(flat, ids)
        # Only hashes of earlier groups count: here a hash also meets itself and the rest of its group.
        earlier = position < base + starts[group_of[query]]
        columns = np.stack([query, position, distance])[:, earlier]
        # By hash, then earliest candidate first (positions stay far below 2^40).
        columns = columns[:, np.argsort((columns[0] << 40) | columns[1])]
        results: list[tuple[int, str, int] | None] = [None] * len(groups)
        group_list, start_list = group_of.tolist(), starts.tolist()
        # Groups are decided in order: a candidate of this batch counts only if its group is still kept.
        for q, p, dist in columns.T.tolist():
            g = group_list[q]
            if results[g] is None and (p < base or results[group_list[p - base]] is None):
                results[g] = (q - start_list[g], self._keys[p], dist)
                self._alive[base + start_list[g] : base + start_list[g + 1]] = False
                self._live -= sizes[g]
        return results

    def _append(self, values: np.ndarray, keys: list[str], ids: np.ndarray) -> None:
        """Store hashes as live entries and put them in the buckets `ids` (one per band of each)."""
        if len(values) != len(keys):
            raise ValueError(f"{len(values)} hashes but {len(keys)} keys")
        first, stop = len(self._keys), len(self._keys) + len(values)
        if stop > len(self._values):
            capacity = max(2 * len(self._values), stop)
            self._values, self._alive = np.resize(self._values, capacity), np.resize(self._alive, capacity)
        self._values[first:stop], self._alive[first:stop] = values, True
        self._keys.extend(keys)
        self._live += len(values)
        if not self._buckets.add(ids, np.repeat(np.arange(first, stop, dtype=np.int64), len(self._tags))):
            self._buckets = self._rebuilt()

    def _rebuilt(self) -> _Buckets:
        """A table of the live hashes with room to grow; dead entries are left out."""
        live = np.flatnonzero(self._alive[: len(self._keys)])
        return _Buckets(self._bucket_ids(self._values[live]), np.repeat(live, len(self._tags)), self._bucket_count)

    def _bucket_ids(self, values: np.ndarray) -> np.ndarray:
        """Row-major (value, band) bucket ids: entry i * bands + b is for band b of values[i]."""
        codes = (((values[:, None] >> self._shifts) & self._masks) | self._tags).ravel()
        if self._hashed:
            codes = (codes * _FIBONACCI) >> np.uint64(64 - _MAX_BUCKET_BITS)
        return codes.astype(np.int64)

    def _close_pairs(self, queries: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query, position, distance) of live stored hashes within max_distance of the queries (whose
        bucket ids are `ids`); a pair sharing several bands appears once per shared band."""
        bands = len(self._tags)
        slot, counts = self._buckets.slots(ids)
        position = self._buckets.positions[slot]
        distance = np.bitwise_count(self._values[position] ^ np.repeat(np.repeat(queries, bands), counts))
        close = np.flatnonzero((distance <= self.max_distance) & self._alive[position])
        query = np.searchsorted(np.cumsum(counts), close, "right") // bands
        return query, position[close], distance[close]

    def state_dict(self) -> dict[str, Any]:
        """A snapshot that pickles fast: arrays and one list copy, no per-hash Python work."""
        count = len(self._keys)
        return {"max_distance": self.max_distance, "bits": self.bits, "hashes": self._values[:count].copy(),
                "alive": self._alive[:count].copy(), "keys": list(self._keys)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> HashIndex:
        index = cls(state["max_distance"], state["bits"])
        alive = state["alive"]
        index.add_many(state["hashes"][alive], list(compress(state["keys"], alive.tolist())))
        return index
