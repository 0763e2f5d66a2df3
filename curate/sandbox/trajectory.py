"""From a Sample to sandbox cells and back: which calls are code, what files they see, what they did.

The execution record is kept in the sample's `memo["sandbox"]` (keyed by a digest of the cells and inputs), so
a second stage that needs the same execution (consistency after execution_failure) reuses it; being run-time
memory (every cell's printed text), it never reaches a shard.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from itertools import takewhile
from typing import Any

from curate.images import image_hash
from curate.sample import Message, Sample, ToolCall
from curate.sandbox import Sandbox, TrajectoryResult

# Thyme questions name the input image's path on the machine that made the data; code opens that path.
_USER_IMAGE_PATH = re.compile(r'User Image Path:\s*"([^"]+)"')


@dataclass
class CodeCall:
    message_index: int
    call: ToolCall
    observation: Message | None  # the tool turn answering it


def code_calls(sample: Sample) -> list[CodeCall]:
    """Python calls with code, each with the tool turn that answers it (in order, or by call id)."""
    calls: list[CodeCall] = []
    for index, message in enumerate(sample.messages):
        if not message.tool_calls:
            continue
        following = list(takewhile(lambda m: m.role == "tool", sample.messages[index + 1 :]))
        for position, call in enumerate(message.tool_calls):
            if call.code is None:
                continue
            by_id = [m for m in following if call.id and m.tool_call_id == call.id]
            observation = by_id[0] if by_id else (following[position] if position < len(following) else None)
            calls.append(CodeCall(index, call, observation))
    return calls


def other_tools(sample: Sample) -> list[str]:
    """Names of the non-code tools the trajectory calls (left alone by the sandbox stages)."""
    return sorted({call.name for _, call in sample.indexed_tool_calls if call.code is None})


def sandbox_job(sample: Sample) -> tuple[list[str], dict[str, bytes], list[str]]:
    """(cells, files, preload): the input images as image_1.<ext>, ... (preloaded as PIL images), and
    under the file names the question gives for them, with those paths rewritten to the local name."""
    input_indices: list[int] = []
    for message in sample.messages:
        if message.role in ("user", "system"):
            input_indices += [i for i in message.image_indices if i not in input_indices and i < len(sample.images)]
    files: dict[str, bytes] = {}
    preload: list[str] = []
    for position, index in enumerate(input_indices, start=1):
        image = sample.images[index]
        name = f"image_{position}.{'jpg' if image.format == 'jpeg' else image.format}"
        files[name] = image.data
        preload.append(name)
    replacements: dict[str, str] = {}
    for position, path in enumerate(_USER_IMAGE_PATH.findall(sample.question)):
        if position < len(preload):
            local = path.rsplit("/", 1)[-1]
            files[local] = files[preload[position]]
            replacements[path] = local
    cells = []
    for code_call in code_calls(sample):
        code = code_call.call.code or ""
        for path, local in replacements.items():
            code = code.replace(path, local)
        cells.append(code)
    return cells, files, preload


def execute_many(sandbox: Sandbox, samples: list[Sample], fresh: bool = False) -> list[dict[str, Any]]:
    """Each sample's code calls run in the sandbox (in parallel), summarised: text, errors, image hashes.

    The record is memoised in `memo["sandbox"]`; `fresh=True` runs again regardless (and keeps the memo).
    """
    jobs = [sandbox_job(sample) for sample in samples]
    digests = [_digest(*job) for job in jobs]
    records: list[dict[str, Any] | None] = [
        None if fresh else _memo(sample, digest) for sample, digest in zip(samples, digests)
    ]
    todo = [i for i, record in enumerate(records) if record is None]
    for i, result in zip(todo, sandbox.run_many([jobs[i] for i in todo])):
        records[i] = summarize(result, digests[i])
        if not fresh:
            samples[i].memo["sandbox"] = records[i]
    return [record for record in records if record is not None]


def _digest(cells: list[str], files: dict[str, bytes], preload: list[str]) -> str:
    content = (cells, sorted((name, hashlib.sha256(data).hexdigest()) for name, data in files.items()), preload)
    return hashlib.sha256(repr(content).encode()).hexdigest()


def _memo(sample: Sample, digest: str) -> dict[str, Any] | None:
    record = sample.memo.get("sandbox")
    return record if isinstance(record, dict) and record.get("digest") == digest else None


def summarize(result: TrajectoryResult, digest: str) -> dict[str, Any]:
    return {
        "digest": digest,
        "status": result.status,
        "detail": result.detail,
        "cells": [
            {
                "stdout": cell.stdout,
                "stderr": cell.stderr[-2000:],
                "error": cell.error,
                "traceback": cell.traceback,
                "image_hashes": [image_hash(data) for data in cell.images],
            }
            for cell in result.cells
        ],
    }
