"""Dedup index (`curate.hashindex.HashIndex`) vs all-pairs comparison.

For every hash of a stream, find the earliest earlier *kept* hash within `max_distance` bits, which is
what the `image_dedup` stage asks. Hashes are random 64-bit values; 10% are planted near-duplicates of
earlier ones at every distance 0..max_distance. The index gets them in batches of 256, as the stage
does. The baseline is vectorised numpy all-pairs: each hash XOR + popcount against a contiguous array
of every earlier kept hash (the fastest all-pairs we found: gathering the kept hashes per query, or a
blocked 256 x kept matrix, are slower).

All-pairs is quadratic, so it is measured on subsets (5k, 10k, 15k, 20k); at 20k the index is measured
too and both must find identical duplicate sets. Its cost at the full size is extrapolated from a
least-squares fit a*n + b*n^2 over the subsets (scaling the 20k time by 25 would also multiply its linear
per-hash overhead by 25 and flatter the index). At 100k it is still affordable (a few seconds), so it is then
measured there as well, to check the extrapolation; `--skip-full` leaves that out.

    python benchmarks/bench_dedup.py [--hashes 100000] [--subset 20000] [--max-distance 4] [--skip-full]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from curate.hashindex import HashIndex

BATCH = 256  # rows per batch the image_dedup stage sees (the recipe's batch_size)
T = TypeVar("T")


def make_hashes(count: int, max_distance: int, seed: int = 0) -> np.ndarray:
    """Random hashes; 10% are copies of an earlier hash with 0..max_distance bits flipped."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=count, dtype=np.uint64, endpoint=False)
    for position in np.flatnonzero(rng.random(count) < 0.1)[1:].tolist():
        value = int(hashes[rng.integers(position)])
        for bit in rng.choice(64, size=rng.integers(max_distance + 1), replace=False).tolist():
            value ^= 1 << bit
        hashes[position] = value
    return hashes


Batches = list[tuple[list[list[int]], list[list[str]]]]  # (groups of hashes, their keys) per batch


def with_index(batches: Batches, max_distance: int) -> list[tuple[int, str, int] | None]:
    """Each sample's match (or None), batch after batch as the image_dedup stage runs the index."""
    index = HashIndex(max_distance)
    return [match for groups, keys in batches for match in index.dedup_batch(groups, keys)]


def as_found(matches: list[tuple[int, str, int] | None]) -> dict[int, int]:
    """Position -> position of its earliest near-duplicate, from the index's matches (keys are positions)."""
    return {position: int(match[1]) for position, match in enumerate(matches) if match is not None}


def as_batches(hashes: np.ndarray) -> Batches:
    """The stage's input shape, one hash per sample, built before the clock starts."""
    values = hashes.tolist()
    return [([[v] for v in values[s : s + BATCH]], [[str(s + k)] for k in range(len(values[s : s + BATCH]))])
            for s in range(0, len(values), BATCH)]


def all_pairs(hashes: np.ndarray, max_distance: int) -> dict[int, int]:
    """Position -> position of its earliest near-duplicate: each hash against every earlier kept one."""
    kept = np.empty_like(hashes)  # contiguous, so each comparison streams through memory
    kept_position = np.empty(len(hashes), dtype=np.int64)
    count = 0
    found: dict[int, int] = {}
    for position, value in enumerate(hashes):
        close = np.flatnonzero(np.bitwise_count(kept[:count] ^ value) <= max_distance)
        if close.size:
            found[position] = int(kept_position[close[0]])
        else:
            kept[count], kept_position[count] = value, position
            count += 1
    return found


def timed(function: Callable[..., T], *args: object, repeat: int = 1) -> tuple[T, float]:
    """The result and the best wall time of `repeat` runs (this is a shared, noisy machine)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        result = function(*args)
        best = min(best, time.perf_counter() - started)
    return result, best


def quadratic_fit(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares (a, b) of T(n) = a*n + b*n^2 (several sizes: one noisy timing cannot swing it)."""
    n = np.array(sizes, dtype=float)
    (a, b), *_ = np.linalg.lstsq(np.stack([n, n**2], axis=1), np.array(seconds), rcond=None)
    return float(a), float(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hashes", type=int, default=100_000)
    parser.add_argument("--subset", type=int, default=20_000)
    parser.add_argument("--max-distance", type=int, default=4)
    parser.add_argument("--skip-full", action="store_true", help="do not also measure all-pairs at --hashes")
    args = parser.parse_args()
    full, subset, d = args.hashes, args.subset, args.max_distance
    hashes = make_hashes(full, d)

    index_matches, index_sub_s = timed(with_index, as_batches(hashes[:subset]), d, repeat=3)
    pairs_found, pairs_sub_s = timed(all_pairs, hashes[:subset], d, repeat=3)
    assert as_found(index_matches) == pairs_found, "the index and all-pairs disagree"
    print(f"dedup {subset // 1000}k: index {index_sub_s:.3f} s, all-pairs {pairs_sub_s:.3f} s (both measured), "
          f"speedup {pairs_sub_s / index_sub_s:.1f}x; identical duplicate sets ({len(pairs_found)} duplicates)")

    sizes = [subset * k // 4 for k in (1, 2, 3)]
    a, b = quadratic_fit([*sizes, subset], [*(timed(all_pairs, hashes[:n], d, repeat=3)[1] for n in sizes), pairs_sub_s])
    pairs_full_s = a * full + b * full**2
    index_matches, index_full_s = timed(with_index, as_batches(hashes), d, repeat=3)
    print(f"dedup {full // 1000}k: index {index_full_s:.3f} s (measured), all-pairs {pairs_full_s:.2f} s (extrapolated "
          f"from {sizes[0] // 1000}k..{subset // 1000}k as {a * 1e6:.2f} us*n + {b * 1e9:.3f} ns*n^2), "
          f"speedup {pairs_full_s / index_full_s:.1f}x (target >= 20x)")

    if not args.skip_full:
        pairs_found, pairs_full_measured_s = timed(all_pairs, hashes, d)
        assert as_found(index_matches) == pairs_found, "the index and all-pairs disagree"
        print(f"dedup {full // 1000}k: all-pairs {pairs_full_measured_s:.2f} s (measured), "
              f"speedup {pairs_full_measured_s / index_full_s:.1f}x; "
              f"identical duplicate sets ({len(pairs_found)} duplicates)")


if __name__ == "__main__":
    main()
