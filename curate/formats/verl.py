"""verl RLHFDataset parquet as Metis-RL publishes it — and the RL shard layout.

Row (verified on the Accio-Lab/Metis-RL viewer): `data_source`, `prompt` (system + user chat turns,
`<image>` placeholders in the user text), `images` (list of `{bytes}`; `{bytes, path}` reads too),
`ability`, `reward_model: {ground_truth, style: "rule"}`, `extra_info: {answer, index, pass8, question}`
(`index` is text there, e.g. "source_index_0"; `question` starts with "<image>\\n"). Canonical: the
prompt turns, `answer` = the ground truth, `source` = data_source, `id` = `extra_info.id`, else
"<data_source>-<index>", else a content hash, and `meta["verl"]` = ability, reward style and the rest
of extra_info, so writing back restores them.

Written (one schema for every shard, so `datasets` and verl load any mix of them):
- `prompt` is the sample's leading system/user turns; images only later turns show are dropped.
- `reward_model.ground_truth` is always text: a list ground truth is written as JSON text and marked
  in `extra_info.extra`, so the reader turns exactly those back into lists (a foreign row's list
  ground truth is read as the list it is).
- `extra_info` has fixed fields `answer`, `index` (text), `pass8` (float), `question`, `id`, and
  `extra`: JSON of any other keys, with the stages' annotations under `curate_meta`. Defaults when
  the sample has no verl metadata: ability "unknown", style "rule", index = the sample id, question =
  the first user turn with its `<image>` placeholders, answer = the ground truth.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from curate.formats import Format, MalformedRow, check_suffix, decode_record, json_object, json_value
from curate.formats.common import ImageCounter, decode_images, encode_answer, ordered_images, write_parquet_rows
from curate.formats.inline import parts_to_text
from curate.formats.messages import parse_content
from curate.sample import ROLES, Image, ImagePart, Message, Sample, content_id

_TEXT_FIELDS = ("answer", "index", "question", "id")
_LIST_MARK = "ground_truth_is_list"
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
                    ("index", pa.string()),
                    ("pass8", pa.float64()),
                    ("question", pa.string()),
                    ("id", pa.string()),
                    ("extra", pa.string()),
                ]
            ),
        ),
    ]
)


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
        messages = [_prompt_turn(turn, index, counter, images, base_dir) for index, turn in enumerate(prompt)]
        counter.attach_unused(messages)
        extra_info = _decode_extra_info(row.get("extra_info"))
        source = str(row.get("data_source") or self.name)
        sample_id = extra_info.pop("id", None)
        return Sample(
            id=str(sample_id) if sample_id else _fallback_id(extra_info, source, prompt, images),
            source=source,
            messages=messages,
            images=images,
            answer=_decode_ground_truth(reward["ground_truth"], bool(extra_info.pop(_LIST_MARK, False))),
            meta={
                **extra_info.pop("curate_meta", {}),
                "verl": {"ability": row.get("ability"), "reward_style": reward.get("style"), "extra_info": extra_info},
            },
        )

    def write(self, samples: Iterable[Sample], path: Path) -> int:
        check_suffix(path, self.name, (".parquet",))
        return write_parquet_rows((to_rl_row(sample) for sample in samples), RL_SCHEMA, path)


def _prompt_turn(turn: Any, index: int, counter: ImageCounter, images: list[Image], base_dir: Path) -> Message:
    where = f"prompt turn {index}"
    if not isinstance(turn, dict) or turn.get("role") not in ROLES:
        raise MalformedRow(f"{where}: needs an object with a known role ({', '.join(ROLES)})")
    return Message(turn["role"], parse_content(turn.get("content"), where, counter, images, base_dir))


def _decode_extra_info(value: Any) -> dict[str, Any]:
    """extra_info as one flat dict: fixed fields (nulls dropped) plus the keys packed in `extra`."""
    extra = dict(json_object(value, "extra_info"))
    extra.update(json_object(extra.pop("extra", None), "extra_info.extra"))
    return {key: val for key, val in extra.items() if val is not None}


def _decode_ground_truth(value: Any, is_json_list: bool) -> str | list[str] | None:
    if is_json_list:
        value = json_value(value, lambda exc: f"'reward_model.ground_truth' is marked as a list but is not JSON ({exc.msg})")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return [str(v) for v in value]
    return str(value)


def _fallback_id(extra_info: dict[str, Any], source: str, prompt: list[Any], images: list[Image]) -> str:
    if extra_info.get("index") is not None:
        return f"{source}-{extra_info['index']}"
    return content_id(prompt, [im.data for im in images])


def prompt_only(sample: Sample) -> Sample:
    """The sample cut to its leading system/user turns, without the images only later turns show."""
    cut = next((k for k, m in enumerate(sample.messages) if m.role not in ("system", "user")), len(sample.messages))
    shown_later = {i for m in sample.messages[cut:] for i in m.image_indices}
    shown_later -= {i for m in sample.messages[:cut] for i in m.image_indices}
    kept = [i for i in range(len(sample.images)) if i not in shown_later]
    new_index = {old: new for new, old in enumerate(kept)}
    messages = [
        Message(m.role, [ImagePart(new_index[p.index]) if isinstance(p, ImagePart) else p for p in m.content])
        for m in sample.messages[:cut]
    ]
    return replace(sample, messages=messages, images=[sample.images[i] for i in kept])


def to_rl_row(sample: Sample) -> dict[str, Any]:
    images, sample = ordered_images(prompt_only(sample))
    verl = sample.meta.get("verl", {})
    # verl's reward functions read one text column; a list goes in as JSON text, marked for the reader
    ground_truth = encode_answer(sample.answer) if isinstance(sample.answer, list) else sample.answer
    extra_info = {**verl.get("extra_info", {}), "id": sample.id}
    annotations = {key: value for key, value in sample.meta.items() if key != "verl"}
    if annotations:  # the verl schema has no meta column: stage annotations ride in extra_info
        extra_info["curate_meta"] = annotations
    if isinstance(sample.answer, list):
        extra_info[_LIST_MARK] = True
    first_user = next((m for m in sample.messages if m.role == "user"), None)
    extra_info.setdefault("question", parts_to_text(first_user.content) if first_user else "")
    extra_info.setdefault("answer", ground_truth)
    extra_info.setdefault("index", sample.id)
    fixed = {key: _text_or_none(extra_info.pop(key, None)) for key in _TEXT_FIELDS}
    pass8 = extra_info.get("pass8")
    if isinstance(pass8, (int, float)) and not isinstance(pass8, bool):
        fixed["pass8"] = float(extra_info.pop("pass8"))
    fixed["extra"] = json.dumps(extra_info, ensure_ascii=False, default=str) if extra_info else None
    return {
        "data_source": sample.source,
        "prompt": [{"role": m.role, "content": parts_to_text(m.content)} for m in sample.messages],
        "images": [{"bytes": im.data} for im in images],
        "ability": verl.get("ability") or "unknown",
        "reward_model": {"ground_truth": ground_truth, "style": verl.get("reward_style") or "rule"},
        "extra_info": fixed,
    }


def _text_or_none(value: Any) -> str | None:
    return None if value is None else value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
