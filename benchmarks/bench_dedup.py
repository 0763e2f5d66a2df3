"""Dedup index vs all-pairs comparison, side by side in one run.

For every hash in a stream, find the earliest earlier kept hash within `max_distance` bits (what the
`image_dedup` stage asks), in batches of 256 as the stage runs. Hashes are random 64-bit values, 10%
of them planted near-duplicates at distances 0..max_distance. All-pairs is the fair vectorised
baseline (numpy XOR + popcount of each hash against every earlier kept one). Both run on the same
100k hashes, measured (no extrapolation), and must find identical duplicate sets.

    python benchmarks/bench_dedup.py [--hashes 100000] [--max-distance 4]
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


def with_index(hashes: list[int], max_distance: int, batch: int = 256) -> dict[int, int]:
    """Position -> position of its earliest near-duplicate, in batches as the image_dedup stage runs it."""
    index = HashIndex(max_distance)
    found: dict[int, int] = {}
    for start in range(0, len(hashes), batch):
        chunk = hashes[start : start + batch]
        matches = index.dedup_batch([[value] for value in chunk], [[str(start + k)] for k in range(len(chunk))])
        found.update({start + k: int(match[1]) for k, match in enumerate(matches) if match is not None})
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
    parser.add_argument("--max-distance", type=int, default=4)
    args = parser.parse_args()
    hashes = make_hashes(args.hashes, args.max_distance)
    index_found, index_s = timed(with_index, hashes, args.max_distance)
    pairs_found, pairs_s = timed(all_pairs, hashes, args.max_distance)
    assert index_found == pairs_found, "the index and all-pairs disagree"
    print(f"dedup {args.hashes} hashes, max distance {args.max_distance}: index {index_s:.2f} s, all-pairs {pairs_s:.2f} s, "
          f"speedup {pairs_s / index_s:.1f}x (target >= 20x); identical duplicate sets ({len(index_found)} duplicates)")

if __name__ == "__main__":
    main()
