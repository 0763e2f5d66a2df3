"""Format adapters: source datasets <-> canonical `Sample`s.

Reading is split in two so the executor can stream, skip on resume and parse
in parallel:
- `records(path)` yields raw rows in file order, cheaply (a JSONL line, an
  element of a JSON array, a parquet row as a dict);
- `Format.parse(record, base_dir)` turns one raw row into a `Sample`, or raises
  `MalformedRow` naming the defect; `base_dir` is the input file's folder (a local
  path or a URL), which relative image paths resolve against.

Each format also writes samples back in its own layout, so a
read -> write -> read round trip keeps tool calls, observations and images.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.parquet as pq

from curate import storage
from curate.errors import UserError
from curate.registry import Registry
from curate.sample import Sample
from curate.storage import Location


class MalformedRow(Exception):
    """A row that cannot become a Sample; the message names the defect."""


class Format:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def parse(self, record: Any, base_dir: Path) -> Sample:
        raise NotImplementedError

    def sniff(self, record: Any) -> bool:
        """Whether a (decoded) first record looks like this format."""
        raise NotImplementedError

    def write(self, samples: Iterable[Sample], path: Path) -> int:
        """Write samples to `path` in this format; returns the row count."""
        raise NotImplementedError


def records(path: Location, batch_rows: int = 256) -> Iterator[Any]:
    """Raw rows of a JSONL, JSON-array or parquet file (a local path or any fsspec URL), in order, streaming
    where the file type allows."""
    suffix = storage.suffix(path)
    if suffix == ".jsonl":
        with storage.open_file(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield line
    elif suffix == ".json":
        try:
            with storage.open_file(path, "rt", encoding="utf-8") as handle:
                data = loads_tolerant(handle.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not valid JSON ({exc}); fix the file or convert it to JSONL") from exc
        from curate.formats.llamafactory import is_registration, registration_records

        if is_registration(data):
            yield from registration_records(path, data)
        elif isinstance(data, list):
            yield from data
        else:
            raise UserError(f"{path}: a JSON input must be an array of rows or a LLaMA-Factory dataset_info.json")
    elif suffix == ".parquet":
        with storage.open_file(path, "rb") as handle:
            parquet = open_parquet(handle, path)
            # One reader per row group: a single `iter_batches` over the whole file keeps memory from every row
            # group it has read (pyarrow 26: about half of each row's size, measured), so the process grew with
            # the file. Per row group, memory is bounded by the largest row group.
            for group in range(parquet.num_row_groups):
                for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group]):
                    yield from batch.to_pylist()
    else:
        raise UserError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")


def input_files(path: Location) -> list[str]:
    """Every file reading `path` opens: itself, and for a LLaMA-Factory `dataset_info.json` each file it registers
    (what a resumed run fingerprints, so that a changed registered file stops the resume). Only a JSON file that
    starts as an object is decoded to tell: a JSON array of rows is never read twice."""
    if storage.suffix(path) != ".json":
        return [str(path)]
    with storage.open_file(path, "rt", encoding="utf-8") as handle:
        if not handle.read(4096).lstrip().startswith("{"):
            return [str(path)]
        handle.seek(0)
        try:
            data = loads_tolerant(handle.read())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return [str(path)]  # reading it stops the run with its own line
    from curate.formats.llamafactory import is_registration

    if not is_registration(data):
        return [str(path)]
    registered = [entry["file_name"] for entry in data.values() if isinstance(entry.get("file_name"), str)]
    return [str(path), *(storage.join(storage.parent(path), name) for name in registered)]


def open_parquet(handle: Any, path: Location) -> pq.ParquetFile:
    """A parquet file over an open handle: only the footer and the row groups read are fetched."""
    try:
        return pq.ParquetFile(handle)
    except Exception as exc:  # pyarrow raises several types for a cut or foreign file
        raise UserError(f"{path}: unreadable parquet ({exc}); check the file is complete") from exc


def count_records(path: Location) -> int | None:
    """Row count when it is cheap to know (for progress bars): a parquet footer, a local JSONL file; else None
    (a remote JSONL file would be read whole just to count it)."""
    suffix = storage.suffix(path)
    if suffix == ".parquet":
        with storage.open_file(path, "rb") as handle:
            return open_parquet(handle, path).metadata.num_rows
    if suffix == ".jsonl" and storage.is_local(path):
        with storage.open_file(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    return None


def json_value(value: Any, error: Callable[[json.JSONDecodeError], str],
               loads: Callable[[str], Any] = json.loads) -> Any:
    """A value stored as JSON text or already decoded: text is decoded, anything else is returned as it is.
    Text that is not JSON is a MalformedRow saying `error(exc)`, each caller's own words."""
    if not isinstance(value, str):
        return value
    try:
        return loads(value)
    except json.JSONDecodeError as exc:
        raise MalformedRow(error(exc)) from exc


def decode_record(record: Any) -> dict[str, Any]:
    """A JSONL line or an already-decoded row as a dict, or MalformedRow."""
    record = json_value(record, lambda exc: f"bad JSON: {exc}", loads_tolerant)
    if not isinstance(record, dict):
        raise MalformedRow(f"row is a {type(record).__name__}, expected an object")
    return record


# A JSON string (skipped whole, so commas inside it stay) or a comma before a closing bracket.
_STRING_OR_TRAILING_COMMA = re.compile(r'"(?:[^"\\]|\\.)*"|,(?=\s*[}\]])')


def loads_tolerant(text: str) -> Any:
    """JSON, also with trailing commas (LLaMA-Factory registrations have them); the first error otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        fixed = _STRING_OR_TRAILING_COMMA.sub(lambda m: m.group(0) if m.group(0) != "," else "", text)
        if fixed == text:
            raise
        try:
            return json.loads(fixed)
        except json.JSONDecodeError:
            raise error from None


def json_object(value: Any, label: str) -> dict[str, Any]:
    """A free-form mapping stored as an object, as JSON text of one (parquet-friendly), or absent."""
    if value is None or value == "":
        return {}
    value = json_value(value, lambda exc: f"'{label}' is not valid JSON ({exc.msg})")
    if not isinstance(value, dict):
        raise MalformedRow(f"'{label}' must be an object, got {type(value).__name__}")
    return value


def check_suffix(path: Path, format_name: str, suffixes: tuple[str, ...]) -> None:
    """Writers refuse a file type they cannot write rather than put one layout under another's name."""
    if path.suffix.lower() not in suffixes:
        found = path.suffix or "no suffix"
        raise UserError(f"{path}: the {format_name} format writes {' or '.join(suffixes)} files, not {found!r}")


def raw_text(record: Any) -> str:
    """The raw row as text, kept whole with a malformed row's rejection."""
    if isinstance(record, str):
        return record
    return json.dumps(record, default=_json_default, ensure_ascii=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return repr(value)


FORMATS: Registry[Format] = Registry("format", {
    "deepeyes": "curate.formats.deepeyes:DeepEyesFormat",
    "llamafactory": "curate.formats.llamafactory:LlamaFactoryFormat",
    "messages": "curate.formats.messages:MessagesFormat",
    "metis_coldstart": "curate.formats.metis_coldstart:MetisColdStartFormat",
    "minio3": "curate.formats.minio3:MiniO3Format",
    "pyvision": "curate.formats.pyvision:PyVisionFormat",
    "skywork_r1v4": "curate.formats.skywork:SkyworkR1V4Format",
    "thyme": "curate.formats.thyme:ThymeFormat",
    "trl": "curate.formats.trl:TrlFormat",
    "verl": "curate.formats.verl:VerlFormat",
    "vthinker": "curate.formats.vthinker:VThinkerFormat",
}, "curate.formats", Format)

_instances: dict[type[Format], Format] = {}


def get_format(name: str) -> Format:
    if name.startswith(INLINE_PREFIX):
        return _inline_format(name)
    cls = FORMATS.load(name)
    if cls not in _instances:
        _instances[cls] = cls()
    return _instances[cls]


INLINE_PREFIX = "inline:"  # a format given as a spec travels as `inline:{spec JSON}` (see formats/spec.py)


@cache
def _inline_format(name: str) -> Format:
    from pydantic import ValidationError

    from curate.formats.spec import InlineSpec, SpecFormat

    try:
        return SpecFormat(InlineSpec.model_validate_json(name.removeprefix(INLINE_PREFIX)))
    except ValidationError as exc:
        raise UserError(f"invalid inline format spec: {exc.errors()[0]['msg']}") from None


def format_names() -> list[str]:
    return FORMATS.names()


def sniff_format(path: Location) -> str:
    """Pick the format whose sniffer accepts the file's first decodable row, if exactly one does."""
    for record in records(path):
        try:
            row = decode_record(record)
        except MalformedRow:
            continue
        matches = [name for name in format_names() if get_format(name).sniff(row)]
        if len(matches) == 1:
            return matches[0]
        raise UserError(
            f"{path}: cannot tell the format ({'candidates: ' + ', '.join(matches) if matches else 'no format matches'});"
            f" pass --format with one of: {', '.join(format_names())}"
        )
    raise UserError(f"{path}: no readable row to detect the format from; pass --format")
