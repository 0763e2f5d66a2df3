"""Near-duplicate lookup of perceptual hashes without comparing all pairs.

Multi-index hashing: split each `bits`-bit hash into `max_distance + 1` disjoint bands. Two hashes
within Hamming distance d differ in at most d bits, so by pigeonhole at least one band is identical:
exact lookups in one table per band give every candidate, and only candidates get the exact
popcount. Cost per query is the size of a few buckets, not the size of the index.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any


class HashIndex:
    def __init__(self, max_distance: int, bits: int = 64) -> None:
        if not 0 <= max_distance < bits:
            raise ValueError(f"max_distance must be in [0, {bits}), got {max_distance}")
        self.max_distance = max_distance
        self.bits = bits
        count = max_distance + 1
        widths = [bits // count + (1 if i < bits % count else 0) for i in range(count)]
        starts = [sum(widths[:i]) for i in range(count)]
        self._bands = [(start, (1 << width) - 1) for start, width in zip(starts, widths)]
        self._tables: list[defaultdict[int, list[int]]] = [defaultdict(list) for _ in self._bands]
        self.hashes: list[int] = []
        self.keys: list[str] = []

    def __len__(self) -> int:
        return len(self.hashes)

    def add(self, value: int, key: str) -> None:
        position = len(self.hashes)
        self.hashes.append(value)
        self.keys.append(key)
        for table, (start, mask) in zip(self._tables, self._bands):
            table[(value >> start) & mask].append(position)

    def nearest(self, value: int) -> tuple[str, int] | None:
        """The earliest-added (key, distance) within max_distance of `value`, or None."""
        hashes, limit = self.hashes, self.max_distance
        best: int | None = None
        for table, (start, mask) in zip(self._tables, self._bands):
            for position in table.get((value >> start) & mask, ()):
                if best is not None and position >= best:
                    break  # buckets are in insertion order: nothing earlier is left in this one
                if (hashes[position] ^ value).bit_count() <= limit:
                    best = position
                    break
        if best is None:
            return None
        return self.keys[best], (hashes[best] ^ value).bit_count()

    def state_dict(self) -> dict[str, Any]:
        return {"max_distance": self.max_distance, "bits": self.bits, "hashes": list(self.hashes), "keys": list(self.keys)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> HashIndex:
        index = cls(state["max_distance"], state["bits"])
        for value, key in zip(state["hashes"], state["keys"]):
            index.add(value, key)
        return index
