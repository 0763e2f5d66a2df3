"""Dedup index vs all-pairs comparison, side by side in one run.

For every hash in a stream, find the earliest earlier hash within `max_distance` bits (what the
`image_dedup` stage asks). Hashes are random 64-bit values with planted near-duplicates at distances
0..max_distance. All-pairs is the fair vectorised baseline (numpy XOR + popcount of each hash against
every earlier one). Both run on a subset (default 20k) where all-pairs is affordable, and must find
identical duplicate sets; the index also runs on the full 100k, and all-pairs' cost at 100k is
extrapolated quadratically from the measured subset (printed as such).

    python benchmarks/bench_dedup.py [--hashes 100000] [--subset 20000] [--max-distance 4]
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from curate.hashindex import HashIndex


def make_hashes(count: int, max_distance: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    hashes: list[int] = []
    for _ in range(count):
        if hashes and rng.random() < 0.1:  # a near-duplicate of an earlier hash
            value = rng.choice(hashes)
            for bit in rng.sample(range(64), rng.randrange(0, max_distance + 1)):
                value ^= 1 << bit
        else:
            value = rng.getrandbits(64)
        hashes.append(value)
    return hashes


def with_index(hashes: list[int], max_distance: int) -> dict[int, int]:
    """Position -> position of its earliest near-duplicate, adding only non-duplicates (as the stage does)."""
    index = HashIndex(max_distance)
    found: dict[int, int] = {}
    for position, value in enumerate(hashes):
        match = index.nearest(value)
        if match is None:
            index.add(value, str(position))
        else:
            found[position] = int(match[0])
    return found


def all_pairs(hashes: list[int], max_distance: int) -> dict[int, int]:
    values = np.array(hashes, dtype=np.uint64)
    kept = np.zeros(len(values), dtype=bool)
    found: dict[int, int] = {}
    for position in range(len(values)):
        earlier = np.flatnonzero(kept[:position])
        if earlier.size:
            distances = np.bitwise_count(values[earlier] ^ values[position])
            hits = earlier[distances <= max_distance]
            if hits.size:
                found[position] = int(hits[0])
                continue
        kept[position] = True
    return found


def timed(fn, *args):  # noqa: ANN001, ANN202 - a two-line timing helper
    started = time.perf_counter()
    return fn(*args), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hashes", type=int, default=100_000)
    parser.add_argument("--subset", type=int, default=20_000)
    parser.add_argument("--max-distance", type=int, default=4)
    args = parser.parse_args()
    hashes = make_hashes(args.hashes, args.max_distance)
    subset = hashes[: args.subset]
    index_found, index_subset_s = timed(with_index, subset, args.max_distance)
    pairs_found, pairs_subset_s = timed(all_pairs, subset, args.max_distance)
    assert index_found == pairs_found, "the index and all-pairs disagree"
    _, index_full_s = timed(with_index, hashes, args.max_distance)
    pairs_full_s = pairs_subset_s * (args.hashes / args.subset) ** 2
    print(f"dedup {args.subset} hashes (measured): index {index_subset_s:.2f} s, all-pairs {pairs_subset_s:.2f} s, "
          f"speedup {pairs_subset_s / index_subset_s:.1f}x, identical duplicate sets ({len(index_found)} duplicates)")
    print(f"dedup {args.hashes} hashes: index {index_full_s:.2f} s (measured), all-pairs {pairs_full_s:.1f} s "
          f"(extrapolated from {args.subset}), speedup {pairs_full_s / index_full_s:.0f}x (target >= 20x)")


if __name__ == "__main__":
    main()
