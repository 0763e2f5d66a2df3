"""text_dedup and decontaminate: quality and cost, as ratios measured side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_text_dedup.py                      # everything, 100K and 1M questions
    OMP_NUM_THREADS=1 python benchmarks/bench_text_dedup.py --parts sizes --sizes 100000 \
        --options '{"num_perm": 128, "bands": 32}'                                # other options, one size

Prints one JSON line per measurement:
- `library`: MinHash + LSH (sign, query, insert one question at a time) in rensa and in datasketch, on the same
  questions: throughput and peak memory (the reason text_dedup uses rensa);
- `quality`: recall of planted near-duplicates (paraphrase-level edits, as the bundled sample plants them) at the
  default threshold, and the false-positive rate on distinct questions, at the default banding and the earlier
  one (128 permutations, 32 bands);
- `scale` (part `exact`): at 10K, text_dedup against the exact all-pairs Jaccard (the definition, computed with
  sparse matrix products), with the agreement of their verdicts;
- `scale` (part `sizes`): text_dedup's throughput (overall and over each tenth of the input, as the index grows),
  peak memory and state size at each size; on the first size also at the earlier banding (`banding_ratio`);
- `decontaminate`: throughput of samples against 10K evaluation items (questions and images), and the set-up
  time with the evaluation set parsed (cold) and from the cache (warm).
Each measurement runs in its own spawned process, so its peak resident memory is its own. The `library` part needs
datasketch, which curate does not depend on: `pip install datasketch`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FRAMES = [
    "What is the total amount on the {a} receipt from {b}?", "What word is written on the small {a} sign near the {b}?",
    "What is the difference between the tallest {a} bar and the shortest {b} bar?",
    "Who designed the {a} landmark shown on this postcard from {b}?",
    "How many {a} are standing next to the {b} in the image?", "Which {a} is printed closest to the {b} corner?",
    "What colour is the {a} held by the person beside the {b}?", "Is the {a} on the left larger than the {b}?",
    "What time does the {a} clock above the {b} show?", "How far is the {a} from the {b} in metres?",
    "In the chart of {a} per month, which month has the most {b}?", "What is written under the {a} next to the {b}?",
]
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def questions(count: int, seed: int = 0) -> list[str]:
    """Distinct questions in the shape of visual QA sets: a dozen frames, each filled with two made-up words and
    a number drawn from about a million (so two questions share a frame, rarely their content)."""
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(rng.randrange(2, 4)))

    return [FRAMES[k % len(FRAMES)].format(a=f"{word()} {word()}", b=f"{word()} {rng.randrange(1000)}")
            for k in range(count)]


def samples(texts: list[str], prefix: str = "q") -> list:
    from curate.sample import Message, Sample, TextPart

    return [Sample(f"{prefix}{k}", "bench", [Message("user", [TextPart(text)])]) for k, text in enumerate(texts)]


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_child(function, *args):
    """Run `function(*args)` in a fresh spawned process; its result and that process's peak memory."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measured, (function, *args))


def _measured(function, *args):
    baseline = peak_mib()
    result = function(*args)
    return {**result, "peak_mib": round(peak_mib(), 1), "baseline_mib": round(baseline, 1)}


# --- library choice --------------------------------------------------------------------------------


def run_library(name: str, count: int) -> dict:
    from curate.textnorm import Normaliser, char_shingles

    shingles = [sorted(char_shingles(Normaliser()(text), 5)) for text in questions(count)]
    started = time.perf_counter()
    found = 0
    if name == "rensa":
        import rensa

        lsh = rensa.RMinHashLSH(threshold=0.7, num_perm=128, num_bands=32)
        for key, tokens in enumerate(shingles):
            minhash = rensa.RMinHash(num_perm=128, seed=1)
            minhash.update(tokens)
            found += bool(lsh.query(minhash))
            lsh.insert(key, minhash)
    else:
        import datasketch

        lsh = datasketch.MinHashLSH(threshold=0.7, num_perm=128, params=(32, 4))
        for key, tokens in enumerate(shingles):
            minhash = datasketch.MinHash(num_perm=128, seed=1)
            minhash.update_batch([token.encode() for token in tokens])
            found += bool(lsh.query(minhash))
            lsh.insert(key, minhash)
    seconds = time.perf_counter() - started
    return {"library": name, "questions": count, "seconds": round(seconds, 2), "per_second": round(count / seconds)}


# --- quality ----------------------------------------------------------------------------------------


def run_quality(distinct: int, planted: int, options: dict | None = None) -> dict:
    from curate.filters.text_dedup import TextDedup
    from curate_testkit.sample_generator import paraphrase

    from curate.stage import StageContext

    rng = random.Random(1)
    texts = questions(distinct, seed=1)
    originals = rng.sample(range(distinct), planted)
    copies = [(paraphrase(texts[k], rng, edits=rng.choice([1, 2])), k) for k in originals]  # as the sample plants
    stream = [(text, None) for text in texts] + copies
    rng.shuffle(stream)
    where = {text: i for i, (text, origin) in enumerate(stream) if origin is None}
    dedup = TextDedup(TextDedup.Options(**(options or {})))
    dedup.setup(StageContext(Path("/dev/null"), Path(tempfile.gettempdir())))
    rows = samples([text for text, _ in stream])
    verdicts = [v for start in range(0, len(rows), 1024) for v in dedup.process(rows[start : start + 1024])]
    caught = missed = 0
    copy_first: set[str] = set()  # originals that come after their copy: the copy is then the first occurrence
    for i, ((_, origin), verdict) in enumerate(zip(stream, verdicts)):
        if origin is None:
            continue
        if where[texts[origin]] < i:
            caught += not verdict.keep
            missed += verdict.keep
        else:
            copy_first.add(texts[origin])
    distinct_rows = [(text, v) for (text, origin), v in zip(stream, verdicts) if origin is None]
    false_positive = sum(not v.keep for text, v in distinct_rows if text not in copy_first)
    return {"planted": caught + missed, "recall": round(caught / max(1, caught + missed), 4),
            "distinct": len(distinct_rows) - len(copy_first),
            "false_positive_rate": round(false_positive / max(1, len(distinct_rows) - len(copy_first)), 5),
            **dedup.options.model_dump(include={"threshold", "num_perm", "bands"})}


# --- scale -------------------------------------------------------------------------------------------


def run_text_dedup(count: int, options: dict | None = None) -> dict:
    from curate.filters.text_dedup import TextDedup

    from curate.stage import StageContext

    rows = samples(questions(count, seed=2))
    dedup = TextDedup(TextDedup.Options(**(options or {})))
    dedup.setup(StageContext(Path("/dev/null"), Path(tempfile.gettempdir())))
    started = time.perf_counter()
    rejected = 0
    tenths = []  # questions/s over each tenth of the input: how throughput falls as the index grows
    tenth_started, tenth_rows = started, 0
    for start in range(0, count, 1024):
        batch = rows[start : start + 1024]
        rejected += sum(not v.keep for v in dedup.process(batch))
        tenth_rows += len(batch)
        if tenth_rows >= count / 10 or start + 1024 >= count:
            now = time.perf_counter()
            tenths.append(round(tenth_rows / (now - tenth_started)))
            tenth_started, tenth_rows = now, 0
    seconds = time.perf_counter() - started
    import pickle

    state_bytes = len(pickle.dumps(dedup.state_dict()))
    return {"method": "text_dedup", "questions": count, "seconds": round(seconds, 2),
            "per_second": round(count / seconds), "per_second_by_tenth": tenths, "rejected": rejected,
            "state_bytes_per_kept_row": round(state_bytes / max(1, len(dedup.ids)), 1),
            **dedup.options.model_dump(include={"num_perm", "bands"})}


def run_exact(count: int) -> dict:
    """The definition, all pairs: keep-first at true Jaccard >= 0.7 of character 5-gram sets."""
    import numpy as np
    from scipy import sparse

    from curate.textnorm import Normaliser, char_shingles

    texts = questions(count, seed=2)
    started = time.perf_counter()
    vocabulary: dict[str, int] = {}
    rows, columns = [], []
    for k, text in enumerate(texts):
        for shingle in char_shingles(Normaliser()(text), 5):
            rows.append(k)
            columns.append(vocabulary.setdefault(shingle, len(vocabulary)))
    matrix = sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, columns)), shape=(count, len(vocabulary)))
    sizes = np.asarray(matrix.sum(axis=1)).ravel()
    kept = np.zeros(count, dtype=bool)
    rejected = []
    for start in range(0, count, 1000):  # rows against every earlier row, a block at a time
        block = (matrix[start : start + 1000] @ matrix[: start + 1000].T).toarray()
        union = sizes[start : start + 1000, None] + sizes[None, : start + 1000] - block
        similar = block / union >= 0.7
        for offset in range(block.shape[0]):
            k = start + offset
            earlier = np.flatnonzero(similar[offset, :k] & kept[:k])
            kept[k] = not len(earlier)
            if len(earlier):
                rejected.append(k)
    seconds = time.perf_counter() - started
    return {"method": "exact_all_pairs", "questions": count, "seconds": round(seconds, 2),
            "per_second": round(count / seconds), "rejected": len(rejected), "rejected_rows": rejected}


def run_text_dedup_rows(count: int, options: dict | None = None) -> dict:
    from curate.filters.text_dedup import TextDedup

    from curate.stage import StageContext

    rows = samples(questions(count, seed=2))
    dedup = TextDedup(TextDedup.Options(**(options or {})))
    dedup.setup(StageContext(Path("/dev/null"), Path(tempfile.gettempdir())))
    verdicts = [v for start in range(0, count, 1024) for v in dedup.process(rows[start : start + 1024])]
    return {"rejected_rows": [k for k, v in enumerate(verdicts) if not v.keep]}


# --- decontaminate -----------------------------------------------------------------------------------


def png(seed: int) -> bytes:
    from curate_testkit.pictures import png_bytes

    return png_bytes(seed, 64)


def run_decontaminate(items: int, count: int, folder: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from curate.filters.decontaminate import Decontaminate

    from curate.sample import Image, ImagePart, Message, Sample, TextPart
    from curate.stage import StageContext

    rng = random.Random(3)
    eval_questions = [f"{text} Consider item {k} of the set and explain which of the options A to D is right."
                      for k, text in enumerate(questions(items, seed=3))]
    path = Path(folder) / "eval.parquet"
    if not path.exists():
        pq.write_table(pa.Table.from_pylist([{"id": f"e{k}", "question": q, "image": {"bytes": png(k), "path": None}}
                                             for k, q in enumerate(eval_questions)]), path)
    options = Decontaminate.Options(benchmarks={"bench": {"paths": [str(path)], "image": "image", "id": "id"}})
    timings = {}
    for label in ("cold", "warm"):
        stage = Decontaminate(options)
        started = time.perf_counter()
        stage.preflight()
        stage.setup(StageContext(Path(folder) / "cache.sqlite", Path(folder)))
        timings[label] = time.perf_counter() - started
    texts = questions(count, seed=4)
    rows = []
    for k, text in enumerate(texts):  # one in ten copies an evaluation question, one in ten its image
        question = eval_questions[rng.randrange(items)] if k % 10 == 0 else text
        image = png(rng.randrange(items)) if k % 10 == 5 else png(100_000 + k)
        rows.append(Sample(f"s{k}", "bench", [Message("user", [ImagePart(0), TextPart(question)])], [Image(image)]))
    started = time.perf_counter()
    rejected = sum(not v.keep for start in range(0, count, 256) for v in stage.process(rows[start : start + 256]))
    seconds = time.perf_counter() - started
    return {"eval_items": items, "samples": count, "seconds": round(seconds, 2), "per_second": round(count / seconds),
            "rejected": rejected, "setup_cold_s": round(timings["cold"], 2), "setup_warm_s": round(timings["warm"], 2)}


PARTS = ("library", "quality", "exact", "sizes", "decontaminate")
EARLIER_BANDING = {"num_perm": 128, "bands": 32}  # text_dedup's defaults before 36 bands of 7 values


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--library-questions", type=int, default=5_000)
    parser.add_argument("--exact", type=int, default=10_000)
    parser.add_argument("--eval-items", type=int, default=10_000)
    parser.add_argument("--decontaminate-samples", type=int, default=5_000)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="what to measure (default: all); `--parts sizes --sizes 1000000` measures 1M alone")
    parser.add_argument("--options", type=json.loads, default=None,
                        help="text_dedup options for the sizes, as JSON (default: the stage's)")
    args = parser.parse_args()

    def emit(kind: str, result: dict) -> None:
        print(json.dumps({"kind": kind, **result}), flush=True)

    if "library" in args.parts:
        try:
            import datasketch
        except ImportError:
            sys.exit("the library part compares rensa with datasketch: `pip install datasketch`, or leave it out "
                     "(--parts quality exact sizes decontaminate)")
        libraries = {name: in_child(run_library, name, args.library_questions) for name in ("rensa", "datasketch")}
        for result in libraries.values():
            emit("library", result)
        rensa, datasketch = libraries["rensa"], libraries["datasketch"]
        emit("library_ratio", {"rensa_speedup": round(datasketch["seconds"] / rensa["seconds"], 1),
                               "memory_ratio_datasketch_over_rensa": round(
                                   (datasketch["peak_mib"] - datasketch["baseline_mib"])
                                   / max(1.0, rensa["peak_mib"] - rensa["baseline_mib"]), 2)})
    if "quality" in args.parts:
        emit("quality", in_child(run_quality, 20_000, 2_000))
        emit("quality", in_child(run_quality, 20_000, 2_000, EARLIER_BANDING))
    if "exact" in args.parts:
        exact = in_child(run_exact, args.exact)
        approximate = in_child(run_text_dedup, args.exact)
        approximate_rows = in_child(run_text_dedup_rows, args.exact)["rejected_rows"]
        agreement = 1 - len(set(exact.pop("rejected_rows")) ^ set(approximate_rows)) / args.exact
        emit("scale", exact)
        emit("scale", approximate)
        emit("scale_ratio", {"questions": args.exact,
                             "speedup_over_exact": round(exact["seconds"] / approximate["seconds"], 1),
                             "verdict_agreement": round(agreement, 5)})
    if "sizes" in args.parts:
        results = [in_child(run_text_dedup, size, args.options) for size in args.sizes[:1]]
        emit("scale", results[0])
        if args.options is None:  # the default banding against the earlier one, on the first size
            earlier = in_child(run_text_dedup, args.sizes[0], EARLIER_BANDING)
            emit("scale", earlier)
            emit("banding_ratio", {"questions": args.sizes[0],
                                   "speedup_over_128_32": round(earlier["seconds"] / results[0]["seconds"], 2)})
        for size in args.sizes[1:]:
            emit("scale", in_child(run_text_dedup, size, args.options))
    if "decontaminate" in args.parts:
        with tempfile.TemporaryDirectory() as folder:
            emit("decontaminate", in_child(run_decontaminate, args.eval_items, args.decontaminate_samples, folder))


if __name__ == "__main__":
    main()
