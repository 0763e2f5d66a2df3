"""Shared fixtures: small real input files and the accounting check every run must pass."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from curate.sample import Sample
from curate.stage import Stage, StageContext, Verdict

REPO = Path(__file__).resolve().parent.parent


def png_bytes(seed: int, size: int = 32) -> bytes:
    """A small distinct picture: a grid of shaded cells whose pattern depends on the seed."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    cell = size // 4
    for k in range(16):
        if (seed >> k) & 1 or (seed * 7 + k) % 5 == 0:
            x, y = (k % 4) * cell, (k // 4) * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=((seed * 37) % 256, (k * 53) % 256, 90))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def messages_row(index: int, question: str | None = None) -> dict[str, Any]:
    """A generic `messages` row: question with an image, one python call, its observation, an answer."""
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes(index)).decode()
    return {
        "id": f"row-{index:05d}",
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question or f"What is {index} + 1?"}]},
            {
                "role": "assistant",
                "content": "Let me compute.",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "python", "arguments": json.dumps({"code": f"print({index} + 1)"})}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": f"{index + 1}\n"},
            {"role": "assistant", "content": f"<answer>{index + 1}</answer>"},
        ],
        "images": [data_uri],
        "answer": str(index + 1),
    }


def write_jsonl(path: Path, rows: list[dict[str, Any] | str]) -> Path:
    with path.open("w") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture(scope="session")
def probe_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generation cache for every test that runs a recipe: the bundled sample's probe answers are
    computed once per session (content-addressed, so sharing is exactly what a user's cache does)."""
    return tmp_path_factory.mktemp("probe-cache") / "cache.sqlite"


@pytest.fixture
def messages_file(tmp_path: Path) -> Path:
    """40 good rows plus two malformed ones (bad JSON, missing messages)."""
    rows: list[dict[str, Any] | str] = [messages_row(i) for i in range(40)]
    rows.insert(7, "{not json")
    rows.insert(20, {"id": "no-messages", "answer": "1"})
    return write_jsonl(tmp_path / "input.jsonl", rows)


def shard_ids(folder: Path, column: str = "id") -> list[str]:
    ids: list[str] = []
    for shard in sorted(folder.glob("*.parquet"), key=lambda p: int(p.stem.split("-")[1])):
        ids.extend(pq.read_table(shard, columns=[column]).column(column).to_pylist())
    return ids


def assert_accounting(run_dir: Path) -> dict[str, Any]:
    """The invariant, recounted from the shards themselves rather than trusted from the manifest."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    kept = sum(pq.ParquetFile(run_dir / o["path"]).metadata.num_rows for o in manifest["outputs"])
    rejected = sum(pq.ParquetFile(run_dir / o["path"]).metadata.num_rows for o in manifest["rejected"])
    assert manifest["input_rows"] == kept + rejected == manifest["kept_rows"] + manifest["rejected_rows"]
    assert kept == manifest["kept_rows"] and rejected == manifest["rejected_rows"]
    assert sum(stage["rejected"] for stage in manifest["stages"]) == rejected
    return manifest


def processed(stage: Stage, batch: list[Sample], cache: Path) -> list[Verdict]:
    """The stage's verdicts on one batch, set up with `cache` (scratch beside it) and torn down after."""
    stage.setup(StageContext(cache, cache.parent))
    try:
        return stage.process(batch)
    finally:
        stage.teardown()
