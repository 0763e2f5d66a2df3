"""LLaMA-Factory registrations: a `dataset_info.json` given as an input reads every file it registers.

Verified (Visual-Agent/DeepEyesV2 `cold_start/data/dataset_info.json`, which has a trailing comma and
is read anyway): each entry names a `file_name` beside the registration, its `formatting` and its
`columns` / `tags` mappings. Entries with `sharegpt` formatting are read, in registration order, with
their mappings applied (LLaMA-Factory's defaults where one is not given: `conversations`, `from` /
`value`, `human` / `gpt` / `observation` / `function_call` / `system`; a function_call turn's JSON is
a call, an observation turn a tool turn), and the text conventions of DeepEyesV2 (`<code>` blocks, `<tool_call>` JSON, code-result and
`<tool_response>` observations). A `system` column becomes the first turn. Each row travels as
`{"llamafactory": {dataset, columns, tags}, "row": raw row}`, so a worker needs nothing else to parse
it; the sample's source is the dataset's registered name. Hub, script and `alpaca` entries stop the
run with a one-line error naming the entry.

Written back: the samples in DeepEyesV2's layout in `curate_sft.json`, registered in the
`dataset_info.json` written beside it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

from curate import storage
from curate.errors import UserError
from curate.formats import Format, MalformedRow, check_suffix, decode_record, records
from curate.formats.deepeyes import DEEPEYES_SPEC, DeepEyesFormat
from curate.formats.spec import SpecFormat
from curate.sample import Sample

REGISTRATION_KEY = "llamafactory"
DATA_FILE = "curate_sft.json"
_DEFAULT_COLUMNS = {"messages": "conversations", "images": "images", "system": "system"}
_DEFAULT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
_ROLE_OF_TAG = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "tool",
                "function_tag": "assistant", "system_tag": "system"}


def is_registration(data: Any) -> bool:
    """A decoded JSON file that is a LLaMA-Factory `dataset_info.json` (entries with a file_name)."""
    return (isinstance(data, dict) and bool(data) and all(isinstance(entry, dict) for entry in data.values())
            and any("file_name" in entry for entry in data.values()))


def registration_records(path: str, registration: dict[str, dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The rows of every file a registration names, resolved against the registration's own location (a path or URL)."""
    for dataset, entry in registration.items():
        where = f"{path}: dataset {dataset!r}"
        file_name = entry.get("file_name")
        if not isinstance(file_name, str):
            raise UserError(f"{where} has no 'file_name' (hub and script datasets are not read); "
                            "give its files as inputs")
        if entry.get("formatting", "alpaca") != "sharegpt":
            formatting = entry.get("formatting", "alpaca")
            raise UserError(f"{where} uses {formatting!r} formatting; only 'sharegpt' chats are read")
        data_path = storage.join(storage.parent(path), file_name)
        if not storage.is_file(data_path):
            raise UserError(f"{where}: file not found: {data_path}")
        mapping = {"dataset": dataset, "columns": entry.get("columns") or {}, "tags": entry.get("tags") or {}}
        for record in records(data_path):
            yield {REGISTRATION_KEY: mapping, "row": record}


@cache
def _entry_format(dataset: str, columns_json: str, tags_json: str) -> SpecFormat:
    columns = _DEFAULT_COLUMNS | json.loads(columns_json)
    tags = _DEFAULT_TAGS | json.loads(tags_json)
    roles = {tags[tag]: role for tag, role in _ROLE_OF_TAG.items()}
    spec = DEEPEYES_SPEC.model_copy(update={
        "source": dataset, "messages": columns["messages"], "images": [columns["images"]],
        "role_key": tags["role_tag"], "content_key": tags["content_tag"], "roles": roles,
    })
    return SpecFormat(spec)


class LlamaFactoryFormat(Format):
    name = "llamafactory"
    description = "a LLaMA-Factory dataset_info.json: the sharegpt files it registers, with their mappings"

    def sniff(self, record: Any) -> bool:
        return REGISTRATION_KEY in record and "row" in record

    def parse(self, record: Any, base_dir: Path) -> Sample:
        wrapper = decode_record(record)
        mapping = wrapper.get(REGISTRATION_KEY)
        if not isinstance(mapping, dict) or "row" not in wrapper:
            raise MalformedRow(f"not a row read through a dataset_info.json (needs '{REGISTRATION_KEY}' and 'row')")
        columns, tags = mapping.get("columns") or {}, mapping.get("tags") or {}
        fmt = _entry_format(str(mapping.get("dataset")), json.dumps(columns, sort_keys=True),
                            json.dumps(tags, sort_keys=True))
        row = decode_record(wrapper["row"])
        row = _with_system_turn(row, fmt, columns.get("system", _DEFAULT_COLUMNS["system"]))
        row = _with_inline_function_calls(row, fmt, (_DEFAULT_TAGS | tags)["function_tag"])
        return fmt.parse(row, base_dir)

    def write(self, samples: Iterable[Sample], path: Path) -> int:
        check_suffix(path, self.name, (".json",))
        if path.name != "dataset_info.json":
            raise UserError(f"{path}: the {self.name} format writes a registration named dataset_info.json")
        count = DeepEyesFormat().write(samples, path.parent / DATA_FILE)
        spec = DEEPEYES_SPEC
        entry = {"file_name": DATA_FILE, "formatting": "sharegpt",
                 "columns": {"messages": spec.messages, "images": spec.images[0]},
                 "tags": {"role_tag": spec.role_key, "content_tag": spec.content_key, "user_tag": "user",
                          "assistant_tag": "assistant", "system_tag": "system"}}
        path.write_text(json.dumps({Path(DATA_FILE).stem: entry}, indent=2) + "\n", encoding="utf-8")
        return count


def _with_inline_function_calls(row: dict[str, Any], fmt: SpecFormat, function_tag: str) -> dict[str, Any]:
    """LLaMA-Factory's function_call turns hold `{"name", "arguments"}` JSON: read it as an inline `<tool_call>`."""
    turns = row.get(fmt.spec.messages)
    if not isinstance(turns, list):
        return row
    role, content = fmt.spec.role_key, fmt.spec.content_key
    return {**row, fmt.spec.messages: [
        {**turn, content: f"<tool_call>{turn[content]}</tool_call>"}
        if isinstance(turn, dict) and turn.get(role) == function_tag and isinstance(turn.get(content), str) else turn
        for turn in turns]}


def _with_system_turn(row: dict[str, Any], fmt: SpecFormat, column: str) -> dict[str, Any]:
    """LLaMA-Factory's separate system prompt column, as the first turn."""
    turns = row.get(fmt.spec.messages)
    if not isinstance(row.get(column), str) or not row[column] or not isinstance(turns, list):
        return row
    system_role = next((tag for tag, role in fmt.spec.roles.items() if role == "system"), "system")
    first = {fmt.spec.role_key: system_role, fmt.spec.content_key: row[column]}
    return {**row, fmt.spec.messages: [first, *turns]}
