"""Inline tool syntax found in trajectory text, parsed to and rendered from canonical tool calls.

- `<code>` + a fenced python block + `</code>` (DeepEyesV2, Thyme, V-Thinker; a bare `<code>...</code>`
  without the fence is read too)
- `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Metis, DeepEyesV2 search, Qwen)
- `<sandbox_output>...</sandbox_output>` (Thyme), `<tool_response>...</tool_response>`, or any other tag
  (`split_observations`, `unwrap_tag`)
- `<image>` placeholders, consumed in order from the row's image list
- DeepEyesV2's "Code execution result:\\nstdout:\\n```...```\\nstderr:\\n```...```" observations, with or
  without the blank lines and the trailing "Images:" line its evaluation template adds

`CallParser` reads and writes the calls of any layout described by `CallSyntax`es (the inline specs of
`spec.py`); `DEFAULT_CALLS` is the `<code>` / `<tool_call>` pair. Inline layouts carry no call ids:
`link_calls` gives each call `call_<k>` and points the tool turns answering it at that id, as
OpenAI-style rows would. The trainer's rollout parses model output with
the same functions (`split_assistant_text`, `parse_calls`, `render_call`).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from curate.formats import MalformedRow
from curate.sample import ImagePart, Message, Part, TextPart, ToolCall

IMAGE_TOKEN = "<image>"
CODE_RESULT_PREFIX = "Code execution result:"
_CODE_RESULT = re.compile(
    r"\ACode execution result:[ \t]*\nstdout:\n```\n(?P<stdout>.*?)\n?```[ \t]*\n\n?"
    r"stderr:\n```\n(?P<stderr>.*?)\n?```(?P<tail>.*)\Z",
    re.DOTALL,
)
_IMAGES_ONLY = re.compile(r"\A\s*(?:Images:)?(?P<images>(?:\s*<image>)*)\s*\Z")

Segment = str | ToolCall


# --- calls in assistant text ---------------------------------------------------------------


@dataclass(frozen=True)
class CallSyntax:
    """One way a layout writes a call: `<tag>` around python code (fenced or bare), around
    `{"name", "arguments"}` JSON, or around the arguments alone of one fixed tool."""

    tag: str
    body: Literal["python", "json", "arguments"]
    tool: str = ""  # the canonical tool name, for body == "arguments"


class CallParser:
    """Finds and renders the calls of one layout; `tool_names` maps the layout's tool names to canonical ones."""

    def __init__(self, syntaxes: tuple[CallSyntax, ...], tool_names: tuple[tuple[str, str], ...] = ()) -> None:
        self.syntaxes = syntaxes
        self.to_canonical = dict(tool_names)
        self.to_source = {canonical: source for source, canonical in tool_names}
        alternatives = []
        for k, syntax in enumerate(syntaxes):
            open_, close = re.escape(f"<{syntax.tag}>"), re.escape(f"</{syntax.tag}>")
            if syntax.body == "python":
                alternatives.append(rf"{open_}\s*```(?:python|py)?[ \t]*\n(?P<f{k}>.*?)\n?```\s*{close}"
                                    rf"|{open_}(?P<b{k}>(?:(?!```).)*?){close}")
            else:
                alternatives.append(rf"{open_}(?P<j{k}>.*?){close}")
        self.pattern = re.compile("|".join(alternatives), re.DOTALL)

    def split(self, text: str) -> list[Segment]:
        """Assistant text as prose strings and tool calls, in order (empty prose left out)."""
        segments: list[Segment] = []
        position = 0
        for match in self.pattern.finditer(text):
            if match.start() > position:
                segments.append(text[position : match.start()])
            segments.append(self._call(match))
            position = match.end()
        if position < len(text):
            segments.append(text[position:])
        return segments

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """An assistant text's prose (calls cut out) and the tool calls written inline in it, in order."""
        segments = self.split(text)
        prose = "".join(s for s in segments if isinstance(s, str))
        return prose, [s for s in segments if isinstance(s, ToolCall)]

    def _call(self, match: re.Match[str]) -> ToolCall:
        groups = {name: value for name, value in match.groupdict().items() if value is not None}
        (name, value), = groups.items()
        kind, syntax = name[0], self.syntaxes[int(name[1:])]  # f: fenced python, b: bare python, j: a JSON body
        if kind == "f":
            return ToolCall("python", {"code": value})
        if kind == "b":
            return ToolCall("python", {"code": value.strip("\n")})
        if syntax.body == "arguments":
            return ToolCall(syntax.tool, parse_literal_object(value, f"<{syntax.tag}>"))
        call = parse_tool_call_json(value, syntax.tag)
        call.name = self.to_canonical.get(call.name, call.name)
        return call

    def render(self, call: ToolCall) -> str | None:
        """The call as this layout writes it, or None when it has no syntax for that call.

        Code that itself contains a fence goes out as JSON: a fenced block could not be read back exactly.
        """
        code = call.code
        plain_python = call.name == "python" and set(call.arguments) == {"code"} and code is not None
        for syntax in self.syntaxes:
            if syntax.body == "python" and plain_python and "```" not in code:
                return render_code_call(code, syntax.tag)
            if syntax.body == "arguments" and call.name == syntax.tool:
                return f"<{syntax.tag}>{json.dumps(call.arguments, ensure_ascii=False)}</{syntax.tag}>"
        for syntax in self.syntaxes:
            if syntax.body == "json":
                return render_tool_call_json(ToolCall(self.source_name(call), call.arguments), syntax.tag)
        return None

    def source_name(self, call: ToolCall | None) -> str:
        return "" if call is None else self.to_source.get(call.name, call.name)


# `<code>` blocks and `<tool_call>` JSON: what DeepEyesV2, Thyme, Metis and the trainer's rollouts write.
DEFAULT_CALLS = CallParser((CallSyntax("code", "python"), CallSyntax("tool_call", "json")))
JSON_CALLS = CallParser((CallSyntax("tool_call", "json"),))


def split_assistant_text(text: str) -> list[Segment]:
    """Assistant text as prose strings and tool calls (`<code>` or `<tool_call>`), in order."""
    return DEFAULT_CALLS.split(text)


def parse_calls(text: str) -> tuple[str, list[ToolCall]]:
    """An assistant text's prose (calls cut out) and the `<code>` / `<tool_call>` calls in it, in order."""
    return DEFAULT_CALLS.parse(text)


def parse_tool_call_json(payload: str, tag: str = "tool_call") -> ToolCall:
    """The JSON inside `<tool_call>...</tool_call>` as a call, or MalformedRow naming what is wrong."""
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise MalformedRow(f"<{tag}> is not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise MalformedRow(f"<{tag}> JSON needs a string 'name'")
    return ToolCall(data["name"], parse_arguments(data.get("arguments", {}), f"<{tag}>"))


def parse_literal_object(text: str, where: str) -> dict[str, Any]:
    """An object written as JSON or as a Python literal (read with `ast.literal_eval`, never `eval`)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = python_literal(text, where)
    if not isinstance(value, dict):
        raise MalformedRow(f"{where} must hold an object, got {type(value).__name__}")
    return value


def python_literal(text: str, where: str) -> Any:
    """A Python literal (as some authors store rows and `eval` them); anything that is not one is malformed."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, SyntaxError) else type(exc).__name__
        raise MalformedRow(f"{where} is neither JSON nor a Python literal ({reason})") from None


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


def render_code_call(code: str, tag: str = "code") -> str:
    return f"<{tag}>\n```python\n{code}\n```\n</{tag}>"


def render_tool_call_json(call: ToolCall, tag: str = "tool_call") -> str:
    payload = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
    return f"<{tag}>{payload}</{tag}>"


def render_call(call: ToolCall, code_blocks: bool) -> str:
    """A call in `<code>` form (python, when the format writes code that way) or as `<tool_call>` JSON.

    Code that itself contains a fence goes out as JSON: a fenced block could not be read back exactly.
    """
    return (DEFAULT_CALLS if code_blocks else JSON_CALLS).render(call) or ""


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


def split_observations(text: str, tags: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """Text with observations inline: [(text before, observation), ..., (tail, None)], the tags removed."""
    pieces: list[tuple[str, str | None]] = []
    position = 0
    for match in _inline_observation(tags).finditer(text):
        pieces.append((text[position : match.start()], match.group("body")))
        position = match.end()
    pieces.append((text[position:], None))
    return pieces


@cache
def _inline_observation(tags: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(rf"<(?P<tag>{'|'.join(map(re.escape, tags))})>(?P<body>.*?)</(?P=tag)>", re.DOTALL)


def render_tool_response(text: str) -> str:
    return f"<tool_response>{text}</tool_response>"


def unwrap_tool_response(text: str) -> str:
    """The body of a `<tool_response>` observation (images after the closing tag kept); anything else verbatim."""
    return unwrap_tag("tool_response", text)


def unwrap_tag(tag: str, text: str) -> str:
    """The body of a `<tag>` observation (images after the closing tag kept); anything else verbatim."""
    match = _wrapped(tag).match(text)
    if not match:
        return text
    return match.group("body") + IMAGE_TOKEN * match.group("images").count(IMAGE_TOKEN)


@cache
def _wrapped(tag: str) -> re.Pattern[str]:
    """One wrapped observation, possibly followed by the images it returned."""
    open_, close = re.escape(f"<{tag}>"), re.escape(f"</{tag}>")
    return re.compile(rf"\A\s*{open_}(?P<body>.*?){close}(?P<images>(?:\s*<image>)*)\s*\Z", re.DOTALL)


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
    return unwrap_code_result(unwrap_tag("sandbox_output", unwrap_tool_response(text)))


def inline_tool_row(row: dict[str, Any]) -> bool:
    """A chat row (`messages` a list of turns) whose tool use is written inline in the text, not OpenAI-style."""
    turns = row.get("messages")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
        return False
    if any(t.get("tool_calls") for t in turns):  # OpenAI-style calls: the generic reader's job
        return False
    marks = ("<code>", "<tool_call>", "<tool_response>", "<sandbox_output>", CODE_RESULT_PREFIX)
    return any(mark in str(t.get("content")) for t in turns for mark in marks)


def turns_mention(row: dict[str, Any], mark: str, role: str | None = None, key: str = "messages") -> bool:
    """Whether a turn of the row's `key` list (of `role`, if given) has `mark` in its content."""
    turns = row.get(key)
    if not isinstance(turns, list):
        return False
    return any(isinstance(t, dict) and (role is None or t.get("role") == role) and mark in str(t.get("content"))
               for t in turns)
