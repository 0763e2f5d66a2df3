"""Read throughput per format: the same generated trajectories written in every format, then read back.

Distinct trajectories come from the sample generator (`curate_testkit.sample_generator`, python calls really
run); they are repeated under new ids up to `--rows`. Each format writes them in its first file type
(a layout with no syntax for a call gets a call it can write instead: Mini-o3 a crop, code-only
layouts a print), then the rows are read as the executors read them (`records` + `parse`), timed.
Prints rows/s per format and each one's ratio to the `messages` reader, measured in the same run.

    python benchmarks/bench_formats.py [--rows 10000] [--distinct 500]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from curate_testkit.sample_generator import generate_sft

from curate.formats import format_names, get_format, records
from curate.formats.spec import SpecFormat
from curate.sample import Message, Sample, ToolCall

FILE_NAMES = ("rows.jsonl", "dataset_info.json", "rows.parquet")  # the first each writer accepts


def writable(sample: Sample, fmt: object) -> Sample:
    """The sample with each call the layout cannot write replaced by one it can (same place, similar size)."""
    if not isinstance(fmt, SpecFormat):
        return sample
    first = fmt.calls.syntaxes[0]

    def fit(call: ToolCall) -> ToolCall:
        if fmt.calls.render(call) is not None:
            return call
        if first.body == "arguments":
            return ToolCall(first.tool, call.arguments, call.id)
        return ToolCall("python", {"code": f"print({str(call.arguments)!r})"}, call.id)

    messages = [Message(m.role, m.content, [fit(c) for c in m.tool_calls], m.tool_call_id) for m in sample.messages]
    return replace(sample, messages=messages)


def write_rows(name: str, samples: list[Sample], rows: int, folder: Path) -> Path:
    fmt = get_format(name)
    repeated = (replace(writable(samples[k % len(samples)], fmt), id=f"row-{k:06d}") for k in range(rows))
    for file_name in FILE_NAMES:
        path = folder / file_name
        try:
            fmt.write(repeated, path)
            return path
        except Exception as exc:  # a writer refusing the file type before it consumed any row
            if "writes" not in str(exc):
                raise
    raise RuntimeError(f"{name} writes none of {FILE_NAMES}")


def read_seconds(name: str, path: Path) -> tuple[float, int]:
    fmt = get_format(name)
    started = time.perf_counter()
    count = sum(1 for record in records(path) if fmt.parse(record, path.parent))
    return time.perf_counter() - started, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--distinct", type=int, default=500)
    args = parser.parse_args()
    samples = [sample for sample, defect in generate_sft(args.distinct, seed=0, defect_every=0)]
    results: dict[str, tuple[float, int, str]] = {}
    for name in format_names():
        folder = Path(tempfile.mkdtemp(prefix=f"bench_{name}_"))
        try:
            path = write_rows(name, samples, args.rows, folder)
            seconds, count = read_seconds(name, path)
            results[name] = (seconds, count, path.suffix)
        finally:
            shutil.rmtree(folder)
        print(f"{name:16s} {path.suffix:9s} {count} rows in {seconds:6.2f} s: {count / seconds:8.0f} rows/s",
              flush=True)
    base = results["messages"][1] / results["messages"][0]
    print(f"\nratio to the messages reader ({base:.0f} rows/s), same run:")
    for name, (seconds, count, _) in results.items():
        print(f"  {name:16s} {count / seconds / base:5.2f}")


if __name__ == "__main__":
    main()
