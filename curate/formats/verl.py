"""verl RLHFDataset parquet as Metis-RL publishes it — and the RL shard layout.

Row: `data_source`, `prompt` (system + user chat turns, `<image>` placeholders in the user text),
`images` (list of `{bytes}`), `ability`, `reward_model: {ground_truth, style}`, `extra_info`
(`{answer, index, question, ...}`). Canonical: the prompt turns, `answer` = the ground truth,
`source` = data_source, and `meta["verl"]` = ability, reward style and extra_info, so writing back
restores them.

Written, `reward_model.ground_truth` is always text (a list ground truth as JSON text, which the
reader turns back into a list) and `extra_info` has fixed fields (`answer`, `index`, `question`,
`id`, `pass_rate`, and `extra`: JSON of any other keys, including the stages' annotations under
`curate_meta`), so every shard has one schema.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.formats import Format, MalformedRow, decode_record, register_format
from curate.formats.common import (
    ImageCounter,
    decode_answer,
    decode_images,
    encode_answer,
    ordered_images,
)
from curate.formats.inline import parts_to_text, text_to_parts
from curate.sample import ROLES, Message, Sample, content_id

_EXTRA_FIELDS = ("answer", "index", "question", "id", "pass_rate")
RL_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", pa.list_(pa.struct([("bytes", pa.binary())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        (
            "extra_info",
            pa.struct(
                [
                    ("answer", pa.string()),
                    ("index", pa.int64()),
                    ("question", pa.string()),
                    ("id", pa.string()),
                    ("pass_rate", pa.float64()),
                    ("extra", pa.string()),
                ]
            ),
        ),
    ]
)


@register_format
class VerlFormat(Format):
    name = "verl"
    description = "verl RL parquet (Metis-RL schema); the RL shard layout"

    def sniff(self, record: Any) -> bool:
        return isinstance(record.get("prompt"), list) and isinstance(record.get("reward_model"), dict)

    def parse(self, record: Any, base_dir: Path) -> Sample:
        row = decode_record(record)
        prompt, reward = row.get("prompt"), row.get("reward_model")
        if not isinstance(prompt, list) or not prompt:
            raise MalformedRow("'prompt' must be a non-empty list of chat turns")
        if not isinstance(reward, dict) or "ground_truth" not in reward:
            raise MalformedRow("'reward_model' must be an object with 'ground_truth'")
        images = decode_images(row.get("images"), base_dir)
        counter = ImageCounter(len(images))
        messages = []
        for index, turn in enumerate(prompt):
            if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
                raise MalformedRow(f"prompt turn {index}: needs a known role and text content")
            messages.append(Message(turn["role"], text_to_parts(turn["content"], counter)))
        counter.attach_unused(messages)
        extra_info = _decode_extra_info(row.get("extra_info"))
        source = str(row.get("data_source") or self.name)
        return Sample(
            id=_verl_id(extra_info, source, prompt, images),
            source=source,
            messages=messages,
            images=images,
            answer=decode_answer(reward["ground_truth"]),
            meta={**extra_info.pop("curate_meta", {}),
                  "verl": {"ability": row.get("ability"), "reward_style": reward.get("style"), "extra_info": extra_info}},
        )

    def write(self, samples: Iterable[Sample], path: Path) -> int:
        rows = [to_rl_row(sample) for sample in samples]
        pq.write_table(pa.Table.from_pylist(rows, schema=RL_SCHEMA), path)
        return len(rows)


def _decode_extra_info(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedRow(f"'extra_info' must be an object, got {type(value).__name__}")
    extra = dict(value)
    packed = extra.pop("extra", None)
    if isinstance(packed, str):
        extra.update(json.loads(packed))
    return {key: val for key, val in extra.items() if val is not None}


def _verl_id(extra_info: dict[str, Any], source: str, prompt: list, images: list) -> str:
    if extra_info.get("id"):
        return str(extra_info["id"])
    if extra_info.get("index") is not None:
        return f"{source}-{extra_info['index']}"
    return content_id(prompt, [im.data for im in images])


def to_rl_row(sample: Sample) -> dict[str, Any]:
    images, sample = ordered_images(sample)
    verl = sample.meta.get("verl", {})
    extra_info = {**verl.get("extra_info", {}), "id": sample.id}
    annotations = {key: value for key, value in sample.meta.items() if key != "verl"}
    if annotations:  # the verl schema has no meta column: stage annotations ride in extra_info
        extra_info["curate_meta"] = annotations
    extra_info.setdefault("question", sample.question.replace("<image>", "").strip())
    extra_info.setdefault("answer", sample.answer if isinstance(sample.answer, str) else encode_answer(sample.answer))
    fixed = {key: extra_info.pop(key, None) for key in _EXTRA_FIELDS}
    fixed["answer"] = None if fixed["answer"] is None else str(fixed["answer"])
    fixed["extra"] = json.dumps(extra_info, ensure_ascii=False, default=str) if extra_info else None
    ground_truth = sample.answer if isinstance(sample.answer, str) else encode_answer(sample.answer)
    return {
        "data_source": sample.source,
        "prompt": [{"role": m.role, "content": parts_to_text(m.content)} for m in sample.messages],
        "images": [{"bytes": im.data} for im in images],
        "ability": verl.get("ability") or "unknown",
        "reward_model": {"ground_truth": ground_truth, "style": verl.get("reward_style") or "rule"},
        "extra_info": fixed,
    }
