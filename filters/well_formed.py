"""format: a well-formed trajectory (roles in order, every call answered once, a final answer)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from curate.images import missing_image
from curate.sample import ROLES, Message, Sample
from curate.stage import KEEP, Stage, StageOptions, Verdict, reject


class WellFormed(Stage):
    """Rejects trajectories that are not well formed; every detail names the message index.

    Reasons:
    - `empty_question`: no user turn with text.
    - `bad_roles`: an unknown role, a system turn other than the first, an assistant or tool turn before the
      first user turn, or a tool turn that does not follow an assistant turn with tool calls (or another
      tool turn of the same batch of calls).
    - `bad_tool_call`: a tool call with an empty name or arguments that are not a dict.
    - `unanswered_tool_call`: a call without an observation before the next non-tool turn or the end.
    - `orphan_observation`: a tool turn left over once every call of its batch is answered, or whose
      `tool_call_id` matches no pending call (calls are matched by id when ids are set, else in order).
    - `missing_image`: a message shows an image index the sample lacks.
    - `no_final_answer`: the last turn is not an assistant turn with text and no pending calls, or its text
      misses `answer_pattern`.
    - `no_ground_truth` (only with `require_assistant: false`): the prompt has no `answer`.

    With `require_assistant: false` (RL prompts, e.g. verl shards: system + user turns only) it checks the
    prompt instead of a trajectory: a user question, roles in order, images present, and a ground truth.
    """

    name = "format"
    reasons = {
        "empty_question": "no user turn with text",
        "bad_roles": "an unknown role, a misplaced system turn, a turn before the first user turn, or a stray "
                     "tool turn",
        "bad_tool_call": "a tool call with an empty name or arguments that are not a dict",
        "unanswered_tool_call": "a call without an observation before the next non-tool turn or the end",
        "orphan_observation": "a tool turn that answers no pending call",
        "missing_image": "a message shows an image index the sample lacks",
        "no_final_answer": "the last turn is not a final assistant answer, or misses `answer_pattern`",
        "no_ground_truth": "with `require_assistant: false`: the prompt has no answer",
    }
    batch_size = 256

    class Options(StageOptions):
        require_assistant: bool = Field(default=True, description="a full trajectory (SFT); false for RL prompts")
        answer_pattern: str | None = Field(default=None, description="regex the final assistant text must match")

        @field_validator("answer_pattern")
        @classmethod
        def _compiles(cls, pattern: str | None) -> str | None:
            try:  # a bad pattern fails when the recipe loads, not on the first row
                re.compile(pattern or "")
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
            return pattern

    def check(self, sample: Sample) -> Verdict:
        for rule in (self._question, self._roles, missing_image, self._tool_call_shapes):
            verdict = rule(sample)
            if verdict is not None:
                return verdict
        if not self.options.require_assistant:
            if not sample.has_answer:
                return reject("no_ground_truth", "the prompt has no answer")
            return KEEP
        return self._calls_answered(sample) or self._final_answer(sample)

    @staticmethod
    def _question(sample: Sample) -> Verdict | None:
        if any(m.role == "user" and m.text.strip() for m in sample.messages):
            return None
        return reject("empty_question", "no user turn with text")

    @staticmethod
    def _roles(sample: Sample) -> Verdict | None:
        """Roles known, an optional system turn first, and nothing but it before the first user turn."""
        seen_user = False
        for index, message in enumerate(sample.messages):
            if message.role not in ROLES:
                return reject("bad_roles", f"message {index} has unknown role {message.role!r}")
            if message.role == "system" and index > 0:
                return reject("bad_roles", f"message {index} is a system turn; only the first turn may be")
            if message.role in ("assistant", "tool") and not seen_user:
                return reject("bad_roles", f"message {index} is a {message.role} turn before the first user turn")
            seen_user = seen_user or message.role == "user"
        return None

    @staticmethod
    def _tool_call_shapes(sample: Sample) -> Verdict | None:
        for index, call in sample.indexed_tool_calls:
            if not call.name.strip():
                return reject("bad_tool_call", f"message {index}: a tool call without a name")
            if not isinstance(call.arguments, dict):
                return reject("bad_tool_call", f"message {index}: {call.name} arguments are a "
                                               f"{type(call.arguments).__name__}, not a dict")
        return None

    @staticmethod
    def _calls_answered(sample: Sample) -> Verdict | None:
        """Each batch of calls is followed by exactly one tool turn per call, before any other turn."""
        pending: list[str] = []  # ids of the unanswered calls of the current batch ("" where a call has none)
        caller: int | None = None  # index of the assistant turn whose calls are being answered
        for index, message in enumerate(sample.messages):
            if message.role == "tool":
                if caller is None:
                    return reject("bad_roles", f"message {index} is a tool turn that follows no tool call")
                verdict = _answer(pending, message, index, caller)
                if verdict is not None:
                    return verdict
                continue
            if pending:
                return reject("unanswered_tool_call", f"message {caller}: {len(pending)} of its calls have no "
                                                      f"observation before message {index}")
            pending = [call.id for call in message.tool_calls]
            caller = index if pending else None
        if pending:
            return reject("unanswered_tool_call", f"message {caller}: {len(pending)} of its calls have no observation")
        return None

    def _final_answer(self, sample: Sample) -> Verdict:
        last_index = len(sample.messages) - 1
        last = sample.messages[-1]
        if last.role != "assistant" or not last.text.strip():
            what = "an assistant turn without text" if last.role == "assistant" else f"a {last.role} turn"
            return reject("no_final_answer", f"message {last_index} (the last) is {what}")
        pattern = self.options.answer_pattern
        if pattern and not re.search(pattern, last.text, re.DOTALL):
            return reject("no_final_answer", f"message {last_index}: the final text does not match {pattern!r}: "
                                             f"{last.text[-80:]!r}")
        return KEEP


def _answer(pending: list[str], observation: Message, index: int, caller: int) -> Verdict | None:
    """Mark the call `observation` answers as answered (by id when both have one, else the first pending)."""
    if not pending:
        return reject("orphan_observation", f"message {index}: every call of message {caller} is already answered")
    call_id = observation.tool_call_id
    if call_id and call_id in pending:
        pending.remove(call_id)
    elif call_id and any(pending):
        return reject("orphan_observation", f"message {index}: tool_call_id {call_id!r} matches no pending call "
                                            f"of message {caller}")
    else:
        pending.pop(0)
    return None
