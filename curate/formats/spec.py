"""Declarative inline formats: a trajectory layout described by data (a recipe's `input.format`, or built in).

    format:
      inline:
        layout: chat                 # chat: a list of turns; response: a question and one response string
        messages: conversations      # the turns' column (a list, or JSON / Python-literal text of one)
        role_key: from
        content_key: value
        roles: {human: user, gpt: assistant}
        calls: [{tag: code, body: python}, {tag: grounding, body: arguments, tool: crop}]
        observation: {role: user, tags: [tool_response]}
        answer_tag: answer

Calls: `body: python` is `<tag>` around fenced (or bare) python, `json` is `<tag>{"name", "arguments"}</tag>`
(`tool_names` maps the layout's tool names to canonical ones, e.g. `code: python`), `arguments` is
`<tag>{arguments}</tag>` of the one tool `tool` (JSON or a Python literal). Observations sit in the
turn after a call (`role: user`, or `tool` turns), their wrapper `tags` removed, or inline in the
assistant text (`role: assistant`: the text is cut at each tagged observation). `code_result` reads
DeepEyesV2's "Code execution result" blocks, `json_key` an observation that is a JSON object holding
its text under that key. `image_variable` / `image_first_index` name the preloaded images the code
uses (PyVision's `image_clue_0`); calls are rewritten to the sandbox's `image_1, image_2, ...`, and
back on writing. Every spec writes back what it reads (JSONL, JSON, or parquet with image bytes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from curate.errors import UserError
from curate.formats import Format, MalformedRow, check_suffix, decode_record
from curate.formats.common import (
    ImageCounter,
    ImageFolder,
    data_uri,
    decode_answer,
    decode_images,
    encode_answer,
    ordered_images,
    row_id,
    write_json_rows,
)
from curate.formats.inline import (
    CODE_RESULT_PREFIX,
    IMAGE_TOKEN,
    CallParser,
    CallSyntax,
    link_calls,
    parts_to_text,
    python_literal,
    render_code_result,
    split_observations,
    text_to_parts,
    unwrap_code_result,
    unwrap_tag,
)
from curate.formats.messages import parse_content
from curate.sample import ROLES, Image, ImagePart, Message, Sample, ToolCall

CANONICAL_IMAGE_VARIABLE = "image_"  # the sandbox preloads the input images as image_1, image_2, ...


def tag_name(tag: str) -> str:
    """Tags may be written `<code>` or `code`."""
    name = tag.strip().removeprefix("<").removesuffix(">")
    if not re.fullmatch(r"[\w.:-]+", name):
        raise ValueError(f"{tag!r} is not a tag name")
    return name


class CallSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tag: str = Field(description="the tag written around a call in assistant text: `code` for <code>...</code>")
    body: Literal["python", "json", "arguments"] = Field(
        default="python", description="python: fenced or bare code; json: {name, arguments}; arguments: one tool's")
    tool: str = Field(default="", description="with body: arguments, the canonical name of the tool it calls")

    @field_validator("tag")
    @classmethod
    def _tag_name(cls, value: str) -> str:
        return tag_name(value)

    @model_validator(mode="after")
    def _arguments_need_a_tool(self) -> CallSpec:
        if self.body == "arguments" and not self.tool:
            raise ValueError(f"call <{self.tag}> with body 'arguments' needs 'tool' (the tool it calls)")
        return self


class ObservationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["user", "tool", "assistant"] = Field(
        default="user", description="user: the turn after a call (tool turns read too); tool; assistant: inline in "
                                    "the assistant text, cut at each tagged observation")
    tags: list[str] = Field(default_factory=list, description="removed from observations on reading; the first is "
                                                              "written around them")
    code_result: bool = Field(default=False, description="read and write DeepEyesV2's 'Code execution result' blocks")
    json_key: str = Field(default="", description="an observation written as a JSON object: the key of its text")

    @field_validator("tags")
    @classmethod
    def _tag_names(cls, value: list[str]) -> list[str]:
        return [tag_name(tag) for tag in value]


class InlineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str = Field(default="inline", description="the samples' source when a row has none")
    layout: Literal["chat", "response"] = Field(
        default="chat", description="chat: a list of turns; response: a question and one response string")
    messages: str = Field(default="messages", description="the turns' column: a list, or JSON / Python-literal text")
    messages_encoding: Literal["list", "json", "python"] = Field(
        default="list", description="how the writer stores the turns")
    role_key: str = Field(default="role", description="a turn's role key")
    content_key: str = Field(default="content", description="a turn's content key: text with <image> placeholders, "
                                                             "or OpenAI part lists")
    roles: dict[str, Literal["system", "user", "assistant", "tool"]] = Field(
        default_factory=dict, description="the layout's role names -> canonical roles")
    question: str = Field(default="question", description="layout response: the question's column")
    # A dotted path reaches into an object: response.full_response.
    response: str = Field(default="response", description="layout response: the response's column (a dotted path "
                                                          "if nested)")
    images: list[str] = Field(default_factory=lambda: ["images"],
                              description="image columns tried in order ([]: images only in content parts)")
    answer: list[str] = Field(default_factory=lambda: ["answer"],
                              description="answer columns tried in order (written to the last)")
    answer_tag: str = Field(default="", description="when no answer column is present: the last "
                                                    "<answer_tag>...</answer_tag> of the assistant text")
    calls: list[CallSpec] = Field(default_factory=lambda: [CallSpec(tag="code"),
                                                           CallSpec(tag="tool_call", body="json")],
                                  description="how calls are written in assistant text (keys: tag, body, tool)")
    tool_names: dict[str, str] = Field(default_factory=dict, description="the layout's tool names -> canonical ones")
    observation: ObservationSpec = Field(default_factory=ObservationSpec,
                                         description="where tool results are (keys: role, tags, code_result, "
                                                     "json_key)")
    image_variable: str = Field(default=CANONICAL_IMAGE_VARIABLE,
                                description="how code names the preloaded images")
    image_first_index: int = Field(default=1, description="the index of the first preloaded image's variable")

    @field_validator("answer_tag")
    @classmethod
    def _answer_tag_name(cls, value: str) -> str:
        return tag_name(value) if value else ""

    @model_validator(mode="after")
    def _observations_can_be_found(self) -> InlineSpec:
        if self.observation.role == "assistant" and not self.observation.tags:
            raise ValueError("observations inline in the assistant text (role: assistant) need 'tags'")
        if self.layout == "response" and self.observation.role != "assistant":
            raise ValueError("a response layout keeps observations inline: observation role must be 'assistant'")
        if not self.calls:
            raise ValueError("'calls' needs at least one call syntax")
        return self

    def as_name(self) -> str:
        """The spec as a format name (`inline:{json}`): what travels to worker processes."""
        return "inline:" + json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


class SpecFormat(Format):
    """A format read and written as its `InlineSpec` says."""

    name = "inline"
    description = "a layout described by an inline spec in the recipe"
    spec: ClassVar[InlineSpec] = InlineSpec()
    suffixes: ClassVar[tuple[str, ...]] = (".jsonl", ".json", ".parquet")

    def __init__(self, spec: InlineSpec | None = None) -> None:
        if spec is not None:
            self.spec = spec  # type: ignore[misc]  # an instance's own spec (recipes)
        self.calls = CallParser(tuple(CallSyntax(c.tag, c.body, c.tool) for c in self.spec.calls),
                                tuple(self.spec.tool_names.items()))
        self.source_roles = {canonical: source for source, canonical in reversed(self.spec.roles.items())}

    def sniff(self, record: Any) -> bool:
        return False  # a spec given in a recipe is chosen, not guessed

    # --- reading ------------------------------------------------------------------------------

    def parse(self, record: Any, base_dir: Path) -> Sample:
        row = decode_record(record)
        if self.spec.layout == "response":
            question, response = self._question_and_response_of(row)
            images = self._images(row, base_dir)
            counter = ImageCounter(len(images))
            messages = [Message("user", text_to_parts(question, counter)), *self._assistant_turns(response, counter)]
            content, answer_text = (question, response), response
        else:
            turns = self._turns_of(row)
            images = self._images(row, base_dir)
            counter = ImageCounter(len(images))
            messages = self._read_chat(turns, counter, images, base_dir)
            content = (row[self.spec.messages],)
            answer_text = "".join(m.text for m in messages if m.role == "assistant")
        counter.attach_unused(messages)
        rename_image_variables(messages, self.spec.image_variable, self.spec.image_first_index,
                               CANONICAL_IMAGE_VARIABLE, 1)
        return Sample(
            id=row_id(row, *content, [im.data for im in images]),
            source=str(row.get("source") or self.spec.source),
            messages=link_calls(messages),
            images=images,
            answer=self._answer(row, answer_text),
        )

    def _images(self, row: dict[str, Any], base_dir: Path) -> list[Image]:
        field = next((f for f in self.spec.images if f in row), None)
        if field is None:
            return []
        value = row[field]
        if value == "":  # Skywork-R1V4 writes "" for a question without an image
            return []
        return decode_images([value] if isinstance(value, (str, bytes, dict)) else value, base_dir, field)

    def _question_and_response_of(self, row: dict[str, Any]) -> tuple[str, str]:
        question, response = row.get(self.spec.question), nested_get(row, self.spec.response)
        if not isinstance(question, str) or not isinstance(response, str):
            raise MalformedRow(f"needs string fields '{self.spec.question}' and '{self.spec.response}'")
        return question, response

    def _turns_of(self, row: dict[str, Any]) -> list[Any]:
        column = self.spec.messages
        if column not in row:
            raise MalformedRow(f"missing field '{column}'")
        turns = row[column]
        if isinstance(turns, str):
            turns = decode_turns(turns, f"'{column}'")
        if not isinstance(turns, list) or not turns:
            raise MalformedRow(f"'{column}' must be a non-empty list of turns")
        return turns

    def _read_chat(self, turns: list[Any], counter: ImageCounter, images: list[Image], base_dir: Path) -> list[Message]:
        messages: list[Message] = []
        pending: list[ToolCall] = []  # calls of the last assistant turn not yet answered
        for index, turn in enumerate(turns):
            where = f"message {index}"
            raw_role = turn.get(self.spec.role_key) if isinstance(turn, dict) else None
            role = self.spec.roles.get(raw_role, raw_role) if isinstance(raw_role, str) else None
            if role not in ROLES:
                raise MalformedRow(f"{where}: needs a known role")
            text, next_image = self._turn_text(turn.get(self.spec.content_key), where, counter, images, base_dir)
            if role == "tool" or (role == "user" and pending):
                observation = self._unwrap(text)
                messages.append(Message("tool", text_to_parts(observation, next_image)))
                pending = pending[1:]
            elif role == "assistant":
                said = self._assistant_turns(text, next_image) or [Message("assistant")]
                messages += said
                pending = list(said[-1].tool_calls) if said[-1].role == "assistant" else []
            else:
                messages.append(Message(role, text_to_parts(text, next_image)))
                pending = []
        return messages

    def _turn_text(self, content: Any, where: str, counter: ImageCounter, images: list[Image],
                   base_dir: Path) -> tuple[str, Callable[[], int]]:
        """A turn's content as text with `<image>` placeholders, and what hands out those images' indices."""
        if content is None or isinstance(content, str):
            return content or "", counter
        parts = parse_content(content, where, counter, images, base_dir)
        indices = iter([p.index for p in parts if isinstance(p, ImagePart)])

        def next_index() -> int:
            try:
                return next(indices)
            except StopIteration:
                raise MalformedRow(f"{where}: a text part holds a literal {IMAGE_TOKEN}") from None

        return parts_to_text(parts), next_index

    def _assistant_turns(self, text: str, next_image: Callable[[], int]) -> list[Message]:
        """Assistant text as assistant turns with their calls, and tool turns where observations are inline."""
        observation = self.spec.observation
        inline = observation.role == "assistant"
        pieces = split_observations(text, tuple(observation.tags)) if inline else [(text, None)]
        messages: list[Message] = []
        for piece, output in pieces:
            prose, calls = self.calls.parse(piece)
            if prose or calls:
                messages.append(Message("assistant", text_to_parts(prose, next_image), calls))
            if output is not None:
                messages.append(Message("tool", text_to_parts(self._unwrap_body(output), next_image)))
        return messages

    def _unwrap(self, text: str) -> str:
        for tag in self.spec.observation.tags:
            text = unwrap_tag(tag, text)
        return self._unwrap_body(text)

    def _unwrap_body(self, text: str) -> str:
        if self.spec.observation.code_result:
            text = unwrap_code_result(text)
        if self.spec.observation.json_key:
            text = unwrap_json(text, self.spec.observation.json_key)
        return text

    def _answer(self, row: dict[str, Any], text: str) -> str | list[str] | None:
        field = next((f for f in self.spec.answer if f in row), None)
        if field is not None:
            return decode_answer(row[field])
        if self.spec.answer_tag:
            found = _tag_bodies(self.spec.answer_tag).findall(text)
            return found[-1].strip() if found else None
        return None

    # --- writing ------------------------------------------------------------------------------

    def write(self, samples: Iterable[Sample], path: Path) -> int:
        check_suffix(path, self.name, self.suffixes)
        if path.suffix.lower() == ".parquet":
            rows = [self.to_row(sample, lambda k, im: im.data) for sample in samples]
            pq.write_table(pa.Table.from_pylist(rows, schema=self._parquet_schema()), path)
            return len(rows)
        folder = ImageFolder(path)
        return write_json_rows([self.to_row(s, lambda k, im, s=s: folder.save(s.id, k, im)) for s in samples], path)

    def to_row(self, sample: Sample, store: Callable[[int, Image], str | bytes]) -> dict[str, Any]:
        """The row of a sample in this layout; `store(k, image)` gives an image entry (a path or the bytes)."""
        spec = self.spec
        images, sample = ordered_images(sample)
        messages = _renamed_copy(sample.messages, spec)
        row: dict[str, Any] = {"id": sample.id, "source": sample.source}
        if spec.layout == "response":
            if spec.images:
                row[spec.images[0]] = [store(k, im) for k, im in enumerate(images)]
            question, response = self._question_and_response(messages, sample.id)
            row[spec.question] = question
            nested_set(row, spec.response, response)
        else:
            unplaced = iter(images)  # images in content parts, in order (when there is no image column)
            turns = [self._turn(role, text, unplaced) for role, text in self._turns(messages, sample.id)]
            row[spec.messages] = encode_turns(turns, spec.messages_encoding)
            if spec.images:
                row[spec.images[0]] = [store(k, im) for k, im in enumerate(images)]
        if spec.answer_tag or sample.answer is not None:  # a null answer stops the reader looking in the text
            row[spec.answer[-1]] = encode_answer(sample.answer)
        return row

    def _question_and_response(self, messages: list[Message], sample_id: str) -> tuple[str, str]:
        first_user = next((k for k, m in enumerate(messages) if m.role == "user"), len(messages))
        question = parts_to_text(messages[first_user].content) if first_user < len(messages) else ""
        after = messages[first_user + 1 :]
        second_user = next((k for k, m in enumerate(after) if m.role == "user"), len(after))
        return question, "".join(text for _, text in self._turns(after[:second_user], sample_id))

    def _turns(self, messages: list[Message], sample_id: str) -> list[tuple[str, str]]:
        """(canonical role, text) turns as this layout writes them: calls rendered inline, observations wrapped."""
        inline = self.spec.observation.role == "assistant"
        turns: list[list[str]] = []
        pending: list[ToolCall] = []
        continues = False  # the next assistant text goes on in the turn an inline observation extended
        for message in messages:
            text = parts_to_text(message.content)
            if message.role == "tool":
                wrapped = self._wrap(pending[0] if pending else None, text)
                pending = pending[1:]
                if inline and turns and turns[-1][0] == "assistant":
                    turns[-1][1] += wrapped
                    continues = True
                else:
                    turns.append(["tool" if self.spec.observation.role == "tool" else "user", wrapped])
                continue
            text += "".join(self._render_call(call, sample_id) for call in message.tool_calls)
            if message.role == "assistant" and continues:
                turns[-1][1] += text
            else:
                turns.append([message.role, text])
            continues = False
            pending = list(message.tool_calls)
        return [(role, text) for role, text in turns]

    def _render_call(self, call: ToolCall, sample_id: str) -> str:
        rendered = self.calls.render(call)
        if rendered is None:
            raise UserError(f"sample {sample_id}: the {self.name} layout has no syntax for a {call.name!r} call")
        return rendered

    def _wrap(self, call: ToolCall | None, text: str) -> str:
        observation = self.spec.observation
        if observation.code_result:
            if text.startswith(CODE_RESULT_PREFIX):  # kept verbatim on reading (stderr or prose after the block)
                return text
            if call is not None and call.name == "python":
                stdout, images = split_trailing_images(text)
                return render_code_result(stdout) + images
        if observation.json_key and not _json_object(text):  # an object is kept verbatim on reading
            text = json.dumps({observation.json_key: text, "type": self.calls.source_name(call)}, ensure_ascii=False)
        return f"<{observation.tags[0]}>{text}</{observation.tags[0]}>" if observation.tags else text

    def _turn(self, role: str, text: str, images: Iterator[Image]) -> dict[str, Any]:
        content: Any = text
        if not self.spec.images:  # no image column: images travel in the content, as data URIs
            content = list(_content_parts(text, images))
        return {self.spec.role_key: self.source_roles.get(role, role), self.spec.content_key: content}

    def _parquet_schema(self) -> pa.Schema | None:
        spec = self.spec
        fields: list[tuple[str, pa.DataType]] = [("id", pa.string()), ("source", pa.string())]
        if spec.layout == "chat":
            if not spec.images:
                return None  # content part lists: let pyarrow infer them
            turn = pa.struct([(spec.role_key, pa.string()), (spec.content_key, pa.string())])
            fields.append((spec.messages, pa.list_(turn) if spec.messages_encoding == "list" else pa.string()))
        fields += [(spec.images[0], pa.list_(pa.binary()))] if spec.images else []
        if spec.layout == "response":
            fields += [(spec.question, pa.string()), _nested_field(spec.response)]
        return pa.schema([*fields, (spec.answer[-1], pa.string())])


def rename_image_variables(messages: list[Message], old: str, old_first: int, new: str, new_first: int) -> None:
    """Rewrite `<old><k>` to `<new><k - old_first + new_first>` in the code of every python call."""
    if (old, old_first) == (new, new_first):
        return
    pattern = re.compile(rf"\b{re.escape(old)}(\d+)\b")
    for message in messages:
        for call in message.tool_calls:
            if call.code is not None:
                code = pattern.sub(lambda m: f"{new}{int(m.group(1)) - old_first + new_first}", call.code)
                call.arguments = {**call.arguments, "code": code}


def _renamed_copy(messages: list[Message], spec: InlineSpec) -> list[Message]:
    """Messages whose calls use the layout's image variable names (a copy: the sample is not changed)."""
    copied = [Message(m.role, m.content, [ToolCall(c.name, dict(c.arguments), c.id) for c in m.tool_calls], m.tool_call_id)
              for m in messages]
    rename_image_variables(copied, CANONICAL_IMAGE_VARIABLE, 1, spec.image_variable, spec.image_first_index)
    return copied


def _content_parts(text: str, images: Iterator[Image]) -> Iterator[dict[str, Any]]:
    for position, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if position:
            yield {"type": "image_url", "image_url": {"url": data_uri(next(images))}}
        if chunk:
            yield {"type": "text", "text": chunk}


def _nested_field(path: str) -> tuple[str, pa.DataType]:
    head, _, rest = path.partition(".")
    return (head, pa.string()) if not rest else (head, pa.struct([_nested_field(rest)]))


def nested_get(row: dict[str, Any], path: str) -> Any:
    value: Any = row
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def nested_set(row: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        row = row.setdefault(key, {})
    row[last] = value


def decode_turns(text: str, where: str) -> Any:
    """Turns stored as JSON text, or as a Python literal (Mini-o3's authors `eval` theirs; this never does)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return python_literal(text, where)


def encode_turns(turns: list[dict[str, Any]], encoding: str) -> Any:
    if encoding == "json":
        return json.dumps(turns, ensure_ascii=False)
    return repr(turns) if encoding == "python" else turns


def unwrap_json(text: str, key: str) -> str:
    """The text under `key` of an observation written as a JSON object (`{key, type}` only); anything else verbatim."""
    value = _json_object(text)
    if value is not None and isinstance(value.get(key), str) and set(value) <= {key, "type"}:
        return value[key]
    return text


def _json_object(text: str) -> dict[str, Any] | None:
    if not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def split_trailing_images(text: str) -> tuple[str, str]:
    """DeepEyesV2 puts a code result's images after the stdout/stderr block."""
    stdout = text
    while stdout.endswith(IMAGE_TOKEN):
        stdout = stdout[: -len(IMAGE_TOKEN)]
    return stdout, text[len(stdout):]


@cache
def _tag_bodies(tag: str) -> re.Pattern[str]:
    return re.compile(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", re.DOTALL)
