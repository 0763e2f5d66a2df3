from __future__ import annotations

import pytest

from curate.sample import Image, ImagePart, Message, Sample, TextPart, ToolCall, text
from filters.format_check import FormatCheck


def good() -> Sample:
    return Sample("s", "t", [
        Message("system", text("sys")),
        Message("user", [ImagePart(0), TextPart("q")]),
        Message("assistant", text("think"), [ToolCall("python", {"code": "print(1)"}, "a"), ToolCall("search", {"query": "x"}, "b")]),
        Message("tool", text("x result"), tool_call_id="b"),
        Message("tool", text("1"), tool_call_id="a"),
        Message("assistant", text("<answer>1</answer>")),
    ], [Image(b"png")], "1")


def broken(edit) -> Sample:
    sample = good()
    edit(sample)
    return sample


@pytest.mark.parametrize(
    ("sample", "reason", "detail"),
    [
        (broken(lambda s: s.messages.pop(4)), "unanswered_tool_call", "1 call(s) without an observation"),
        (broken(lambda s: s.messages.insert(1, Message("assistant", text("hi")))), "bad_roles", "before the question"),
        (broken(lambda s: s.messages.insert(2, Message("tool", text("?")))), "bad_roles", "message 2 is a tool turn"),
        (broken(lambda s: s.messages.pop()), "no_final_answer", "ends with a tool turn"),
        (broken(lambda s: s.messages[-1].content.clear()), "no_final_answer", "ends with a assistant turn"),
        (broken(lambda s: setattr(s, "images", [])), "missing_image", "message 1 shows image 0"),
        (broken(lambda s: s.messages[2].tool_calls.append(ToolCall("", {}))), "bad_tool_call", "message 2"),
        (broken(lambda s: s.messages[1].content.pop()), "empty_question", "no user turn with text"),
        (broken(lambda s: s.messages.append(Message("system", text("again")))), "bad_roles", "before the question"),
    ],
)
def test_defects(sample: Sample, reason: str, detail: str) -> None:
    verdict = FormatCheck().check(sample)
    assert (verdict.keep, verdict.reason) == (False, reason)
    assert detail in verdict.detail


def test_well_formed_trajectory_kept_and_answer_pattern_enforced() -> None:
    assert FormatCheck().check(good()).keep
    strict = FormatCheck(FormatCheck.Options(answer_pattern=r"<answer>\d+</answer>"))
    assert strict.check(good()).keep
    sample = broken(lambda s: setattr(s.messages[-1], "content", text("just 1")))
    verdict = strict.check(sample)
    assert (verdict.keep, verdict.reason) == (False, "no_final_answer")


def test_calls_without_ids_are_answered_in_order() -> None:
    sample = Sample("s", "t", [Message("user", text("q")), Message("assistant", text(""), [ToolCall("python", {"code": "1"})]),
                               Message("tool", text("1")), Message("assistant", text("done"))])
    assert FormatCheck().check(sample).keep


def test_prompt_mode_for_rl() -> None:
    stage = FormatCheck(FormatCheck.Options(require_assistant=False))
    prompt = Sample("p", "t", [Message("system", text("s")), Message("user", text("q"))], answer="4")
    assert stage.check(prompt).keep
    prompt.answer = None
    verdict = stage.check(prompt)
    assert (verdict.keep, verdict.reason) == (False, "no_ground_truth")
    assert not FormatCheck().check(Sample("p", "t", [Message("user", text("q"))], answer="4")).keep
