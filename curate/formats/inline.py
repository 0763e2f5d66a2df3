"""Inline tool syntax found in trajectory text, parsed to and rendered from canonical tool calls.

- `<code>` + a fenced python block + `</code>` (DeepEyesV2, Thyme, V-Thinker; a bare `<code>...</code>`
  without the fence is read too)
- `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Metis, DeepEyesV2 search, Qwen)
- `<sandbox_output>...</sandbox_output>` (Thyme), `<tool_response>...</tool_response>`
- `<image>` placeholders, consumed in order from the row's image list
- DeepEyesV2's "Code execution result:\\nstdout:\\n```...```\\nstderr:\\n```...```" observations, with or
  without the blank lines and the trailing "Images:" line its evaluation template adds

Inline layouts carry no call ids: `link_calls` gives each call `call_<k>` and points the tool turns
answering it at that id, as OpenAI-style rows would. The trainer's rollout parses model output with
the same functions (`split_assistant_text`, `parse_calls`, `render_call`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from curate.formats import MalformedRow
from curate.sample import ImagePart, Message, Part, TextPart, ToolCall

IMAGE_TOKEN = "<image>"
CODE_RESULT_PREFIX = "Code execution result:"
_CALL = re.compile(
    r"<code>\s*```(?:python|py)?[ \t]*\n(?P<code>.*?)\n?```\s*</code>"
    r"|<code>(?P<bare>(?:(?!```).)*?)</code>"
    r"|<tool_call>(?P<json>.*?)</tool_call>",
    re.DOTALL,
)
_SANDBOX_OUTPUT = re.compile(r"<sandbox_output>(.*?)</sandbox_output>", re.DOTALL)
# One wrapped observation, possibly followed by the images it returned.
_WRAPPED = {
    tag: re.compile(rf"\A\s*<{tag}>(?P<body>.*?)</{tag}>(?P<images>(?:\s*<image>)*)\s*\Z", re.DOTALL)
    for tag in ("tool_response", "sandbox_output")
}
_CODE_RESULT = re.compile(
    r"\ACode execution result:[ \t]*\nstdout:\n```\n(?P<stdout>.*?)\n?```[ \t]*\n\n?"
    r"stderr:\n```\n(?P<stderr>.*?)\n?```(?P<tail>.*)\Z",
    re.DOTALL,
)
_IMAGES_ONLY = re.compile(r"\A\s*(?:Images:)?(?P<images>(?:\s*<image>)*)\s*\Z")

Segment = str | ToolCall


# --- calls in assistant text ---------------------------------------------------------------


def split_assistant_text(text: str) -> list[Segment]:
    """Assistant text as prose strings and tool calls, in order (empty prose left out)."""
    segments: list[Segment] = []
    position = 0
    for match in _CALL.finditer(text):
        if match.start() > position:
            segments.append(text[position : match.start()])
        segments.append(_call_from_match(match))
        position = match.end()
    if position < len(text):
        segments.append(text[position:])
    return segments


def parse_calls(text: str) -> tuple[str, list[ToolCall]]:
    """An assistant text's prose (calls cut out) and the tool calls written inline in it, in order."""
    segments = split_assistant_text(text)
    prose = "".join(s for s in segments if isinstance(s, str))
    return prose, [s for s in segments if isinstance(s, ToolCall)]


def _call_from_match(match: re.Match[str]) -> ToolCall:
    if match.group("json") is not None:
        return parse_tool_call_json(match.group("json"))
    code = match.group("code") if match.group("code") is not None else match.group("bare").strip("\n")
    return ToolCall("python", {"code": code})


def parse_tool_call_json(payload: str) -> ToolCall:
    """The JSON inside `<tool_call>...</tool_call>` as a call, or MalformedRow naming what is wrong."""
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise MalformedRow(f"<tool_call> is not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise MalformedRow("<tool_call> JSON needs a string 'name'")
    return ToolCall(data["name"], parse_arguments(data.get("arguments", {}), "<tool_call>"))


def parse_arguments(arguments: Any, where: str) -> dict[str, Any]:
    """Call arguments given as an object or as JSON text of one (OpenAI rows and some writers double-encode)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise MalformedRow(f"{where} arguments are not valid JSON ({exc.msg})") from exc
    if not isinstance(arguments, dict):
        raise MalformedRow(f"{where} 'arguments' must be an object, got {type(arguments).__name__}")
    return arguments


def render_code_call(code: str) -> str:
    return f"<code>\n```python\n{code}\n```\n</code>"


def render_tool_call_json(call: ToolCall) -> str:
    payload = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
    return f"<tool_call>{payload}</tool_call>"


def render_call(call: ToolCall, code_blocks: bool) -> str:
    """A call in `<code>` form (python, when the format writes code that way) or as `<tool_call>` JSON.

    Code that itself contains a fence goes out as JSON: a fenced block could not be read back exactly.
    """
    code = call.code
    plain_python = call.name == "python" and set(call.arguments) == {"code"} and code is not None
    if code_blocks and plain_python and "```" not in code:
        return render_code_call(code)
    return render_tool_call_json(call)


def link_calls(messages: list[Message]) -> list[Message]:
    """Give id-less calls `call_<k>` (k counts the sample's calls) and point each tool turn at the call it answers.

    Tool turns answer the calls of the assistant turn before them in order, the inline layouts' rule.
    """
    count = 0
    pending: list[str] = []
    for message in messages:
        if message.role == "tool":
            if pending and not message.tool_call_id:
                message.tool_call_id = pending[0]
            pending = pending[1:]
            continue
        for call in message.tool_calls:
            call.id = call.id or f"call_{count}"
            count += 1
        pending = [call.id for call in message.tool_calls]
    return messages


# --- text with <image> placeholders --------------------------------------------------------


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


# --- observations ---------------------------------------------------------------------------


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


def render_tool_response(text: str) -> str:
    return f"<tool_response>{text}</tool_response>"


def unwrap_tool_response(text: str) -> str:
    """The body of a `<tool_response>` observation (images after the closing tag kept); anything else verbatim."""
    return _unwrap("tool_response", text)


def _unwrap(tag: str, text: str) -> str:
    match = _WRAPPED[tag].match(text)
    if not match:
        return text
    return match.group("body") + IMAGE_TOKEN * match.group("images").count(IMAGE_TOKEN)


def render_code_result(stdout: str, stderr: str = "") -> str:
    """DeepEyesV2's observation layout for code calls (the images follow as placeholders)."""
    return f"{CODE_RESULT_PREFIX}\nstdout:\n```\n{stdout}\n```\nstderr:\n```\n{stderr}\n```"


def parse_code_result(text: str) -> tuple[str, str, str] | None:
    """(stdout, stderr, what follows the stderr block) of a DeepEyesV2 code observation, else None."""
    match = _CODE_RESULT.match(text)
    return (match.group("stdout"), match.group("stderr"), match.group("tail")) if match else None


def unwrap_code_result(text: str) -> str:
    """A DeepEyesV2 code observation as its stdout and images when stderr is empty; anything else verbatim.

    The canonical tool turn then holds what the code printed, as every other format's does; text with a
    non-empty stderr, or prose after the block, stays whole so nothing is lost.
    """
    parsed = parse_code_result(text)
    if parsed is None or parsed[1]:
        return text
    images = _IMAGES_ONLY.match(parsed[2])
    return parsed[0] + images.group("images").count(IMAGE_TOKEN) * IMAGE_TOKEN if images else text


def unwrap_observation(text: str) -> str:
    """An observation sent back in a user turn, without its wrapper (tool response, sandbox output, code result)."""
    return unwrap_code_result(_unwrap("sandbox_output", unwrap_tool_response(text)))


def inline_tool_row(row: dict[str, Any]) -> bool:
    """A chat row (`messages` a list of turns) whose tool use is written inline in the text, not OpenAI-style."""
    turns = row.get("messages")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
        return False
    if any(t.get("tool_calls") for t in turns):  # OpenAI-style calls: the generic reader's job
        return False
    marks = ("<code>", "<tool_call>", "<tool_response>", "<sandbox_output>", CODE_RESULT_PREFIX)
    return any(mark in str(t.get("content")) for t in turns for mark in marks)
