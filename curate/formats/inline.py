"""Inline tool syntax found in trajectory text, parsed to and rendered from canonical tool calls.

- `<code>` + a fenced python block + `</code>` (DeepEyesV2, Thyme, V-Thinker)
- `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Metis, DeepEyesV2 search, Qwen)
- `<sandbox_output>...</sandbox_output>` (Thyme), `<tool_response>...</tool_response>`
- `<image>` placeholders, consumed in order from the row's image list
- DeepEyesV2's "Code execution result:\\nstdout:\\n```...```\\nstderr:\\n```...```" observations

The trainer's rollout parses model output with the same functions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from curate.formats import MalformedRow
from curate.sample import ImagePart, Part, TextPart, ToolCall

IMAGE_TOKEN = "<image>"
_CALL = re.compile(
    r"<code>\s*```(?:python|py)?[ \t]*\n(?P<code>.*?)\n?```\s*</code>|<tool_call>(?P<json>.*?)</tool_call>", re.S
)
_SANDBOX_OUTPUT = re.compile(r"<sandbox_output>(.*?)</sandbox_output>", re.S)
_TOOL_RESPONSE = re.compile(r"\A\s*<tool_response>(.*?)</tool_response>\s*\Z", re.S)


def parse_calls(text: str) -> tuple[str, list[ToolCall]]:
    """An assistant text's prose (calls cut out) and the tool calls written inline in it, in order."""
    calls: list[ToolCall] = []
    for match in _CALL.finditer(text):
        if match.group("code") is not None:
            calls.append(ToolCall("python", {"code": match.group("code")}))
        else:
            calls.append(parse_tool_call_json(match.group("json")))
    return _CALL.sub("", text), calls


def parse_tool_call_json(payload: str) -> ToolCall:
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise MalformedRow(f"<tool_call> is not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise MalformedRow("<tool_call> JSON needs a string 'name'")
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some writers double-encode the arguments
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise MalformedRow(f"<tool_call> arguments are not valid JSON ({exc.msg})") from exc
    if not isinstance(arguments, dict):
        raise MalformedRow("<tool_call> 'arguments' must be an object")
    return ToolCall(data["name"], arguments)


def render_code_call(code: str) -> str:
    return f"<code>\n```python\n{code}\n```\n</code>"


def render_tool_call_json(call: ToolCall) -> str:
    return "<tool_call>" + json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False) + "</tool_call>"


def render_call(call: ToolCall, code_blocks: bool) -> str:
    """A call in `<code>` form (python, when the format writes code that way) or as `<tool_call>` JSON."""
    if code_blocks and call.name == "python" and set(call.arguments) == {"code"}:
        return render_code_call(call.arguments["code"])
    return render_tool_call_json(call)


def text_to_parts(text: str, next_image: Callable[[], int]) -> list[Part]:
    """Text with `<image>` placeholders -> parts; `next_image` hands out the index of the next image."""
    parts: list[Part] = []
    for position, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if position:
            parts.append(ImagePart(next_image()))
        if chunk:
            parts.append(TextPart(chunk))
    return parts


def parts_to_text(parts: list[Part]) -> str:
    """Parts -> text with an `<image>` placeholder where each image stands."""
    return "".join(p.text if isinstance(p, TextPart) else IMAGE_TOKEN for p in parts)


def split_sandbox_outputs(text: str) -> list[tuple[str, str | None]]:
    """Thyme responses: [(text before, output), ..., (tail, None)], output tags removed."""
    pieces: list[tuple[str, str | None]] = []
    position = 0
    for match in _SANDBOX_OUTPUT.finditer(text):
        pieces.append((text[position : match.start()], match.group(1)))
        position = match.end()
    pieces.append((text[position:], None))
    return pieces


def render_sandbox_output(text: str) -> str:
    return f"<sandbox_output>{text}</sandbox_output>"


def unwrap_tool_response(text: str) -> str:
    match = _TOOL_RESPONSE.match(text)
    return match.group(1) if match else text


def render_tool_response(text: str) -> str:
    return f"<tool_response>{text}</tool_response>"


CODE_RESULT_PREFIX = "Code execution result:"


def render_code_result(stdout: str, stderr: str = "") -> str:
    """DeepEyesV2's observation layout for code calls."""
    return f"{CODE_RESULT_PREFIX}\nstdout:\n```\n{stdout}\n```\nstderr:\n```\n{stderr}\n```"


_CODE_RESULT = re.compile(r"\ACode execution result:\nstdout:\n```\n(?P<stdout>.*)\n```\nstderr:\n```\n\n```", re.S)


def unwrap_code_result(text: str) -> str:
    """Plain stdout of a DeepEyesV2 code observation with empty stderr; anything else verbatim.

    Unwrapping happens only when wrapping again gives back the exact text, so it never loses anything.
    """
    match = _CODE_RESULT.match(text.split(IMAGE_TOKEN, 1)[0])
    if match and render_code_result(match.group("stdout")) + text[match.end():] == text:
        return match.group("stdout") + text[match.end():]
    return text
