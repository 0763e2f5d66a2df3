"""format: a well-formed trajectory (roles in order, every call answered, a final answer)."""

from __future__ import annotations

import re

from pydantic import Field

from curate.sample import Sample
from curate.stage import KEEP, Stage, StageOptions, Verdict, reject


class FormatCheck(Stage):
    """Rejects trajectories that are not well formed.

    Reasons: `empty_question` (no user turn with text), `bad_roles` (system not first, assistant or tool
    before the first user turn, a tool turn that answers no call), `unanswered_tool_call`,
    `bad_tool_call` (empty name), `missing_image` (a message shows an image the sample lacks),
    `no_final_answer` (the last turn is not an assistant answer, or misses `answer_pattern`),
    `no_ground_truth` (prompts only). With `require_assistant: false` (RL prompts) it checks the prompt:
    a user question and a ground truth.
    """

    name = "format"
    batch_size = 256

    class Options(StageOptions):
        require_assistant: bool = Field(default=True, description="a trajectory (SFT); false for RL prompts")
        answer_pattern: str | None = Field(default=None, description="regex the final assistant text must match")

    def check(self, sample: Sample) -> bool | Verdict:
        messages = sample.messages
        if not any(m.role == "user" and m.text.strip() for m in messages):
            return reject("empty_question", "no user turn with text")
        for index, message in enumerate(messages):
            missing = [i for i in message.image_indices if not 0 <= i < len(sample.images)]
            if missing:
                return reject("missing_image", f"message {index} shows image {missing[0]}; the sample has {len(sample.images)}")
            if any(not call.name for call in message.tool_calls):
                return reject("bad_tool_call", f"message {index}: a tool call without a name")
        first_user = next(i for i, m in enumerate(messages) if m.role == "user")
        if any(m.role == "system" for m in messages[1:]) or any(m.role in ("assistant", "tool") for m in messages[:first_user]):
            return reject("bad_roles", f"roles {[m.role for m in messages[: first_user + 1]]} before the question")
        if not self.options.require_assistant:
            return KEEP if sample.answer not in (None, "", []) else reject("no_ground_truth", "the prompt has no answer")
        return self._check_calls(sample) or self._check_final_answer(sample)

    def _check_calls(self, sample: Sample) -> Verdict | None:
        """Each tool turn answers one call of the assistant turn before it (by id when ids are set, else in order)."""
        pending: list[str] = []
        for index, message in enumerate(sample.messages):
            if message.role == "tool":
                if not pending:
                    return reject("bad_roles", f"message {index} is a tool turn that answers no call")
                if message.tool_call_id and message.tool_call_id in pending:
                    pending.remove(message.tool_call_id)
                else:
                    pending.pop(0)
                continue
            if pending:
                return reject("unanswered_tool_call", f"message {index - 1}: {len(pending)} call(s) without an observation")
            pending = [call.id for call in message.tool_calls]
        return reject("unanswered_tool_call", "the last tool call has no observation") if pending else None

    def _check_final_answer(self, sample: Sample) -> Verdict:
        last = sample.messages[-1]
        if last.role != "assistant" or not last.text.strip():
            return reject("no_final_answer", f"the trajectory ends with a {last.role} turn, not an assistant answer")
        pattern = self.options.answer_pattern
        if pattern and not re.search(pattern, last.text, re.S):
            return reject("no_final_answer", f"the final assistant turn does not match {pattern!r}: {last.text[-80:]!r}")
        return KEEP
