"""Helpers every format shares: decoding image references, answers, ids, ordered images for writing."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate import storage
from curate.errors import UserError
from curate.formats import MalformedRow
from curate.sample import Image, ImagePart, Message, Sample, content_id
from curate.storage import Location

_MAGIC = [
    (b"\x89PNG", "png"),
    (b"\xff\xd8", "jpeg"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
]


def image_format(data: bytes) -> str:
    """Container format from the magic bytes (decoding is the integrity stage's job, not the reader's)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return "unknown"


def decode_image(entry: Any, base_dir: Location, label: str) -> Image:
    """An image given as bytes, {bytes, path}, a data URI, base64 text, or a path relative to the input file."""
    if isinstance(entry, dict):
        if entry.get("bytes") is not None:
            entry = entry["bytes"]
        elif entry.get("path"):
            entry = entry["path"]
        else:
            raise MalformedRow(f"{label}: neither bytes nor path")
    if isinstance(entry, bytes):
        return Image(entry, image_format(entry))
    if not isinstance(entry, str):
        raise MalformedRow(f"{label}: expected a path, data URI or base64 string, got {type(entry).__name__}")
    if entry.startswith("data:"):
        entry = entry.partition(",")[2]
    elif len(entry) < 1024 and not _looks_like_base64(entry):
        data = read_image_file(entry, base_dir, label)
        return Image(data, image_format(data))
    try:
        data = base64.b64decode(entry, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedRow(f"{label}: undecodable base64 ({exc})") from exc
    return Image(data, image_format(data))


def read_image_file(entry: str, base_dir: Location, label: str) -> bytes:
    """An image named by an absolute path, or a path relative to the input file's folder (a local folder or a
    URL: images beside a file on S3 are read from S3). URLs inside rows are not followed."""
    location = entry if Path(entry).is_absolute() else storage.join(base_dir, entry)
    try:
        if not storage.is_file(location):
            raise MalformedRow(f"{label}: file not found: {entry}")
        return storage.read_bytes(location)
    except UserError as exc:  # a store that refuses one image rejects its row, not the run
        raise MalformedRow(f"{label}: {exc}") from None


def decode_images(value: Any, base_dir: Location, field: str = "images") -> list[Image]:
    """A row's image list (absent means none)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise MalformedRow(f"'{field}' must be a list, got {type(value).__name__}")
    return [decode_image(entry, base_dir, f"image {i}") for i, entry in enumerate(value)]


def write_json_rows(rows: list[dict[str, Any]], path: Path) -> int:
    """Rows as JSONL (one per line) or, for any other suffix, one JSON array."""
    with path.open("w", encoding="utf-8") as handle:
        if path.suffix == ".jsonl":
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        else:
            json.dump(rows, handle, ensure_ascii=False, indent=1)
    return len(rows)


def _looks_like_base64(text: str) -> bool:
    # Paths have dots or slashes and are short; base64 of any real image is long and has neither dots.
    return len(text) >= 64 and "." not in text


def encode_base64(image: Image) -> str:
    return base64.b64encode(image.data).decode()


def data_uri(image: Image) -> str:
    return f"data:image/{image.format};base64,{encode_base64(image)}"


def decode_answer(value: Any) -> str | list[str] | None:
    """A ground truth stored as text, a list, or JSON text of either (writers JSON-encode lists)."""
    if value is None or isinstance(value, list):
        return None if value is None else [str(v) for v in value]
    if not isinstance(value, str):
        return str(value)
    if value[:1] in '["':
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(decoded, str):
            return decoded
        if isinstance(decoded, list) and all(isinstance(v, str) for v in decoded):
            return decoded
    return value


def encode_answer(answer: str | list[str] | None) -> str | None:
    return None if answer is None else json.dumps(answer, ensure_ascii=False)


def row_id(row: dict[str, Any], *content: Any) -> str:
    value = row.get("id")
    return str(value) if value not in (None, "") else content_id(*content)


def ordered_images(sample: Sample) -> tuple[list[Image], Sample]:
    """Images in order of appearance, and the sample re-indexed to match.

    Placeholder formats (`<image>` tokens) can only express images in the order they appear; images no
    message shows are put first in the first user turn so nothing is dropped.
    """
    order: list[int] = []
    for message in sample.messages:
        order.extend(i for i in message.image_indices if i not in order)
    unshown = [i for i in range(len(sample.images)) if i not in order]
    order = unshown + order
    new_index = {old: new for new, old in enumerate(order)}
    messages = []
    first_user_seen = False
    for message in sample.messages:
        content = [ImagePart(new_index[p.index]) if isinstance(p, ImagePart) else p for p in message.content]
        if message.role == "user" and not first_user_seen:
            content = [ImagePart(new_index[i]) for i in unshown] + content
            first_user_seen = True
        messages.append(Message(message.role, content, message.tool_calls, message.tool_call_id))
    reindexed = Sample(sample.id, sample.source, messages, [sample.images[i] for i in order], sample.answer, sample.meta)
    return reindexed.images, reindexed


class ImageCounter:
    """Hands out image indices in order and checks there are as many images as placeholders."""

    def __init__(self, available: int) -> None:
        self.available = available
        self.used = 0

    def __call__(self) -> int:
        if self.used >= self.available:
            raise MalformedRow(f"more <image> placeholders than the {self.available} images of the row")
        self.used += 1
        return self.used - 1

    def attach_unused(self, messages: list[Message]) -> None:
        """Images no placeholder consumed are shown at the start of the first user turn."""
        extra = [ImagePart(i) for i in range(self.used, self.available)]
        for message in messages:
            if message.role == "user" and extra:
                message.content = extra + message.content
                return


class ImageFolder:
    """Writes images next to a JSON/JSONL file and returns their paths relative to it."""

    def __init__(self, path: Path) -> None:
        self.base = path.parent
        self.folder = path.parent / f"{path.stem}_images"
        self.folder.mkdir(parents=True, exist_ok=True)

    def save(self, sample_id: str, index: int, image: Image) -> str:
        suffix = "jpg" if image.format == "jpeg" else image.format
        safe_id = "".join(c if c.isalnum() or c in "-_" else "_" for c in sample_id)
        target = self.folder / f"{safe_id}_{index}.{suffix}"
        target.write_bytes(image.data)
        return str(target.relative_to(self.base))


def write_parquet_rows(rows: Iterable[dict[str, Any]], schema: pa.Schema, path: Path, group_rows: int = 256) -> int:
    """Rows into a parquet file one row group at a time, so that writing a shard of any size holds one group,
    not the whole shard; the number of rows written."""
    count = 0
    with pq.ParquetWriter(path, schema) as writer:
        group: list[dict[str, Any]] = []
        for row in rows:
            group.append(row)
            if len(group) == group_rows:
                writer.write_table(pa.Table.from_pylist(group, schema=schema))
                count, group = count + len(group), []
        if group or not count:  # an empty shard still gets its schema
            writer.write_table(pa.Table.from_pylist(group, schema=schema))
            count += len(group)
    return count
