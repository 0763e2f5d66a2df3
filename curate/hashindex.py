"""Near-duplicate lookup of perceptual hashes without comparing all pairs.

Multi-index hashing: split each `bits`-bit hash into `max_distance + 1` disjoint bands. Two hashes
within Hamming distance d differ in at most d bits, so by pigeonhole at least one band is identical:
exact lookups per band give every candidate, and only candidates get the exact popcount.

Per band the keys are kept sorted in numpy arrays, so a whole batch of queries is answered with
`searchsorted` (or, for bands of at most 22 bits, a direct lookup in a table of bucket offsets) and
one vectorised popcount. New hashes go to a small second level (merged with `insert`, cheap while
it is small) that is folded into the large level once it holds `merge_every` hashes, so adding
stays far from quadratic. Within a batch, queries are compared with
each other directly (a batch is small), which keeps first-come-first-kept order exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_NO_MATCH = np.iinfo(np.int64).max


class _SortedBand:
    """One band of one level: band keys sorted (ties in insertion order) and their positions."""

    def __init__(self, width: int, keys: np.ndarray | None = None, positions: np.ndarray | None = None,
                 with_offsets: bool = False) -> None:
        self.width = width
        self.keys = np.zeros(0, dtype=np.uint64) if keys is None else keys
        self.positions = np.zeros(0, dtype=np.int64) if positions is None else positions
        # Bucket offsets per possible key turn two binary searches per query into two lookups.
        self.offsets = (
            np.searchsorted(self.keys, np.arange((1 << width) + 1, dtype=np.uint64), side="left")
            if with_offsets and width <= 22 else None
        )

    def __len__(self) -> int:
        return len(self.keys)

    def inserted(self, keys: np.ndarray, positions: np.ndarray, with_offsets: bool = False) -> _SortedBand:
        """A copy with (keys, positions) added after equal keys, so buckets stay in insertion order."""
        order = np.argsort(keys, kind="stable")
        at = np.searchsorted(self.keys, keys[order], side="right")
        return _SortedBand(self.width, np.insert(self.keys, at, keys[order]), np.insert(self.positions, at, positions[order]),
                           with_offsets)

    def ranges(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[low, high) of each query's bucket."""
        if self.offsets is not None:
            index = queries.astype(np.int64)
            return self.offsets[index], self.offsets[index + 1]
        order = np.argsort(queries)  # sorted needles let searchsorted walk the keys instead of jumping
        low, high = np.empty_like(order), np.empty_like(order)
        low[order] = np.searchsorted(self.keys, queries[order], side="left")
        high[order] = np.searchsorted(self.keys, queries[order], side="right")
        return low, high


class HashIndex:
    def __init__(self, max_distance: int, bits: int = 64, merge_every: int = 8192) -> None:
        if not 0 <= max_distance < bits <= 64:
            raise ValueError(f"need 0 <= max_distance < bits <= 64, got {max_distance} and {bits}")
        self.max_distance = max_distance
        self.bits = bits
        count = max_distance + 1
        widths = [bits // count + (1 if i < bits % count else 0) for i in range(count)]
        self._bands = [(np.uint64(sum(widths[:i])), np.uint64((1 << w) - 1)) for i, w in enumerate(widths)]
        self._widths = widths
        self.merge_every = merge_every
        self.keys: list[str] = []
        self._buffer = np.zeros(1024, dtype=np.uint64)  # grows by doubling: appending stays amortised O(1)
        # Two levels, large and small, each a _SortedBand per band.
        self._levels = [self._empty_level(), self._empty_level()]

    def _empty_level(self) -> list[_SortedBand]:
        return [_SortedBand(width) for width in self._widths]

    @property
    def _values(self) -> np.ndarray:
        return self._buffer[: len(self.keys)]

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def hashes(self) -> list[int]:
        return [int(v) for v in self._values]

    def add_many(self, values: list[int] | np.ndarray, keys: list[str]) -> None:
        if not len(values):
            return
        new = np.asarray(values, dtype=np.uint64)
        first = len(self.keys)
        if first + len(new) > len(self._buffer):
            self._buffer = np.concatenate([self._buffer, np.zeros(max(len(self._buffer), len(new)), dtype=np.uint64)])
        self._buffer[first : first + len(new)] = new
        self.keys.extend(keys)
        positions = np.arange(first, first + len(new), dtype=np.int64)
        large, small = self._levels
        small = [band.inserted((new >> start) & mask, positions) for band, (start, mask) in zip(small, self._bands)]
        if len(small[0]) >= self.merge_every:
            large = [big.inserted(little.keys, little.positions, with_offsets=True) for big, little in zip(large, small)]
            small = self._empty_level()
        self._levels = [large, small]

    def nearest(self, value: int) -> tuple[str, int] | None:
        """The earliest-added (key, distance) within max_distance of `value`, or None."""
        position = int(self._nearest(np.array([value], dtype=np.uint64))[0])
        if position == _NO_MATCH:
            return None
        return self.keys[position], int(self._values[position] ^ np.uint64(value)).bit_count()

    def dedup_batch(self, groups: list[list[int]], keys: list[list[str]]) -> list[tuple[int, str, int] | None]:
        """Keep-first deduplication of one batch of groups (the hashes of one sample each), in order.

        Per group: its first member within max_distance of an earlier hash (in the index or in an earlier
        kept group of this batch) as (member, that hash's key, distance), or None, in which case the group's
        hashes join the index.
        """
        flat = np.array([value for group in groups for value in group], dtype=np.uint64)
        flat_keys = [key for group_keys in keys for key in group_keys]
        group_of = np.repeat(np.arange(len(groups)), [len(group) for group in groups])
        in_index = self._nearest(flat)
        # Within the batch: distance of every hash to every hash of an earlier group.
        distances = np.bitwise_count(flat[:, None] ^ flat[None, :]) if len(flat) else np.zeros((0, 0), np.uint8)
        earlier = (distances <= self.max_distance) & (group_of[None, :] < group_of[:, None])
        has_earlier = earlier.any(axis=1)
        flagged = (in_index != _NO_MATCH) | has_earlier
        flagged_groups = set(group_of[flagged].tolist())
        # Groups with no candidate at all are kept whatever happens; only flagged ones need the ordered walk.
        kept_flat = ~np.isin(group_of, list(flagged_groups))
        results: list[tuple[int, str, int] | None] = [None] * len(groups)
        starts = np.concatenate([[0], np.cumsum([len(group) for group in groups])]).astype(int).tolist()
        in_index_list, has_earlier_list = in_index.tolist(), has_earlier.tolist()  # Python scalars: cheap in the loop
        for g in sorted(flagged_groups):
            match = None
            for member, value in enumerate(groups[g]):
                index = starts[g] + member
                if in_index_list[index] != _NO_MATCH:
                    position = in_index_list[index]
                    match = (member, self.keys[position], (int(self._buffer[position]) ^ value).bit_count())
                elif has_earlier_list[index]:
                    candidates = np.flatnonzero(earlier[index] & kept_flat)
                    if candidates.size:
                        first = int(candidates[0])
                        match = (member, flat_keys[first], int(distances[index, first]))
                if match is not None:
                    break
            if match is None:
                kept_flat[starts[g] : starts[g + 1]] = True
            results[g] = match
        self.add_many(flat[kept_flat], [k for k, kept in zip(flat_keys, kept_flat.tolist()) if kept])
        return results

    def _nearest(self, queries: np.ndarray) -> np.ndarray:
        """Earliest indexed position within max_distance of each query (vectorised), or _NO_MATCH."""
        best = np.full(len(queries), _NO_MATCH, dtype=np.int64)
        if not len(self.keys) or not len(queries):
            return best
        values = self._values
        for level in self._levels:
            for (start, mask), band in zip(self._bands, level):
                if not len(band):
                    continue
                low, high = band.ranges((queries >> start) & mask)
                counts = high - low
                total = int(counts.sum())
                if not total:
                    continue
                query_of = np.repeat(np.arange(len(queries)), counts)
                within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
                candidates = band.positions[np.repeat(low, counts) + within]
                close = np.bitwise_count(values[candidates] ^ queries[query_of]) <= self.max_distance
                np.minimum.at(best, query_of[close], candidates[close])
        return best

    def state_dict(self) -> dict[str, Any]:
        return {"max_distance": self.max_distance, "bits": self.bits, "hashes": self.hashes, "keys": list(self.keys)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> HashIndex:
        index = cls(state["max_distance"], state["bits"])
        index.add_many(state["hashes"], state["keys"])
        return index
