"""The `trl` writer: the SFT shard with each image inline in its part, as TRL's SFTTrainer needs for tool turns
that show images (scripts/check_trainers.sh runs TRL itself on it)."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import pyarrow.parquet as pq
from curate_testkit.pictures import png_bytes
from PIL import Image as PILImage
from test_formats import jpeg_bytes, read_all, trajectory

from curate.formats import get_format, sniff_format


def test_trl_rows_hold_each_image_in_its_part_and_an_empty_images_column(tmp_path: Path) -> None:
    path = tmp_path / "trl.parquet"
    assert get_format("trl").write([trajectory("a")], path) == 1
    row = pq.read_table(path).to_pylist()[0]
    assert row["images"] == []
    shown = [(m["role"], p["image"]["bytes"]) for m in row["messages"] for p in m["content"] if p["type"] == "image"]
    assert shown == [("user", png_bytes(1)), ("tool", jpeg_bytes(2))]
    call = row["messages"][1]["tool_calls"][0]
    assert call["function"]["name"] == "python" and row["messages"][2]["tool_call_id"] == "call_0"


def test_datasets_decodes_every_part_image_tool_turns_included(tmp_path: Path) -> None:
    path = tmp_path / "trl.parquet"
    get_format("trl").write([trajectory("a"), trajectory("b", answer=["3", "three"])], path)
    loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert isinstance(loaded.features["images"].feature, datasets.Image)
    parts = [(m["role"], p["image"]) for m in loaded[0]["messages"] for p in m["content"] if p["type"] == "image"]
    assert [role for role, _ in parts] == ["user", "tool"]
    assert all(isinstance(image, PILImage.Image) for _, image in parts)
    expected = PILImage.open(io.BytesIO(jpeg_bytes(2)))
    assert parts[1][1].size == expected.size and loaded[0]["images"] == []


def test_trl_round_trip_and_the_messages_reader_reads_it(tmp_path: Path) -> None:
    originals = [trajectory("t1"), trajectory("t/2", answer=["3", "three"])]
    path = tmp_path / "trl.parquet"
    get_format("trl").write(originals, path)
    assert sniff_format(path) == "messages"
    for fmt in ("trl", "messages"):
        back = read_all(fmt, path)
        assert [(s.id, s.answer, s.messages, s.images) for s in back] == \
            [(s.id, s.answer, s.messages, s.images) for s in originals]
