"""Shards in, samples out: a run directory's kept shards, or shard files named directly."""

from __future__ import annotations

from pathlib import Path

from curate.errors import UserError
from curate.formats import get_format, records, sniff_format
from curate.sample import Sample


def shard_files(sources: list[Path]) -> list[Path]:
    """The parquet shards of run directories (their `kept/`) and shard files, in order."""
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            found = sorted((source / "kept").glob("*.parquet")) or sorted(source.glob("*.parquet"))
            if not found:
                raise UserError(f"{source}: no shards (no kept/*.parquet): give a run directory of `curate run` or shard files")
            files += found
        elif source.is_file():
            files.append(source)
        else:
            raise UserError(f"{source} not found: give a run directory or shard files")
    return files


def load_samples(sources: list[Path]) -> list[Sample]:
    """Every sample of the shards, read with the format their layout shows (SFT messages or verl RL)."""
    samples = []
    for path in shard_files(sources):
        fmt = get_format(sniff_format(path))
        samples += [fmt.parse(row, path.parent) for row in records(path)]
    if not samples:
        raise UserError(f"no samples in {', '.join(map(str, sources))}")
    return samples
