from __future__ import annotations

from collections.abc import Callable

import pytest

from curate.errors import UserError
from curate.recipe import _validate
from curate.sample import Image, ImagePart, Message, Sample, TextPart, ToolCall, text
from curate.filters.well_formed import WellFormed


def good() -> Sample:
    """system, user (with an image), assistant with two calls, their two observations (out of order, by id),
    a second round with one call, its observation (showing a produced image), the final answer."""
    return Sample("s", "t", [
        Message("system", text("You can run python.")),
        Message("user", [ImagePart(0), TextPart("What is the total?")]),
        Message("assistant", text("Let me look."), [ToolCall("python", {"code": "print(1)"}, "a"),
                                                     ToolCall("search", {"query": "x"}, "b")]),
        Message("tool", text("x result"), tool_call_id="b"),
        Message("tool", text("1"), tool_call_id="a"),
        Message("assistant", text(""), [ToolCall("python", {"code": "crop()"}, "c")]),
        Message("tool", [ImagePart(1), TextPart("saved")], tool_call_id="c"),
        Message("assistant", text("<answer>1</answer>")),
    ], [Image(b"png"), Image(b"png")], "1")


def edited(edit: Callable[[Sample], object]) -> Sample:
    sample = good()
    edit(sample)
    return sample


def no_ids(sample: Sample) -> None:
    for message in sample.messages:
        message.tool_call_id = ""
        for call in message.tool_calls:
            call.id = ""


DEFECTS = {
    "no user turn": (lambda s: s.messages.pop(1), "empty_question", "no user turn with text"),
    "user turn without text": (lambda s: s.messages[1].content.pop(), "empty_question", "no user turn with text"),
    "assistant before user": (lambda s: s.messages.insert(1, Message("assistant", text("hi"))), "bad_roles",
                              "message 1 is a assistant turn before the first user turn"),
    "tool before user": (lambda s: s.messages.insert(0, Message("tool", text("?"))), "bad_roles",
                         "message 0 is a tool turn before the first user turn"),
    "second system turn": (lambda s: s.messages.insert(2, Message("system", text("again"))), "bad_roles",
                           "message 2 is a system turn; only the first turn may be"),
    "unknown role": (lambda s: setattr(s.messages[3], "role", "function"), "bad_roles",
                     "message 3 has unknown role 'function'"),
    "tool after assistant without calls": (lambda s: s.messages.insert(8, Message("tool", text("late"))), "bad_roles",
                                           "message 8 is a tool turn that follows no tool call"),
    "call without observation": (lambda s: s.messages.pop(4), "unanswered_tool_call",
                                 "message 2: 1 of its calls have no observation before message 4"),
    "last call without observation": (lambda s: s.messages.pop(6), "unanswered_tool_call",
                                      "message 5: 1 of its calls have no observation before message 6"),
    "ends on an unanswered call": (lambda s: s.messages[-1].tool_calls.append(ToolCall("python", {"code": "2"}, "d")),
                                   "unanswered_tool_call", "message 7: 1 of its calls have no observation"),
    "extra observation": (lambda s: s.messages.insert(5, Message("tool", text("dup"), tool_call_id="a")),
                          "orphan_observation", "message 5: every call of message 2 is already answered"),
    "observation with unknown id": (lambda s: setattr(s.messages[3], "tool_call_id", "zzz"), "orphan_observation",
                                    "message 3: tool_call_id 'zzz' matches no pending call of message 2"),
    "same call answered twice": (lambda s: setattr(s.messages[4], "tool_call_id", "b"), "orphan_observation",
                                 "message 4: tool_call_id 'b' matches no pending call of message 2"),
    "image index missing": (lambda s: s.images.pop(), "missing_image", "message 6 shows image 1; the sample has 1"),
    "call without name": (lambda s: s.messages[2].tool_calls.append(ToolCall(" ", {})), "bad_tool_call",
                          "message 2: a tool call without a name"),
    "arguments not a dict": (lambda s: setattr(s.messages[5].tool_calls[0], "arguments", "crop()"), "bad_tool_call",
                             "message 5: python arguments are a str, not a dict"),
    "ends with a tool turn": (lambda s: s.messages.pop(), "no_final_answer", "message 6 (the last) is a tool turn"),
    "final answer empty": (lambda s: s.messages[-1].content.clear(), "no_final_answer",
                           "message 7 (the last) is an assistant turn without text"),
    "ends with a user turn": (lambda s: s.messages.append(Message("user", text("thanks"))), "no_final_answer",
                              "message 8 (the last) is a user turn"),
}


@pytest.mark.parametrize("edit, reason, detail", DEFECTS.values(), ids=DEFECTS.keys())
def test_each_defect_is_rejected_naming_the_message(edit: Callable[[Sample], object], reason: str, detail: str) -> None:
    verdict = WellFormed().check(edited(edit))
    assert (verdict.keep, verdict.reason, verdict.detail) == (False, reason, detail)


def test_well_formed_trajectories_are_kept() -> None:
    assert WellFormed().check(good()).keep
    assert WellFormed().check(edited(lambda s: s.messages.pop(0))).keep  # the system turn is optional
    # A later user turn (a follow-up question) is a valid order too.
    follow_up = edited(lambda s: s.messages.extend([Message("user", text("And the tax?")),
                                                    Message("assistant", text("7%"))]))
    assert WellFormed().check(follow_up).keep


def test_calls_without_ids_are_answered_in_order() -> None:
    sample = edited(no_ids)
    assert WellFormed().check(sample).keep
    sample.messages.insert(5, Message("tool", text("one too many")))
    assert WellFormed().check(sample).reason == "orphan_observation"


def test_observation_id_ignored_when_the_calls_have_none() -> None:
    # Readers of inline formats may id observations but not calls: those are matched in order.
    sample = edited(no_ids)
    sample.messages[3].tool_call_id = "call_1"
    assert WellFormed().check(sample).keep


def test_answer_pattern_is_enforced_on_the_final_text() -> None:
    strict = WellFormed(WellFormed.Options(answer_pattern=r"<answer>.+</answer>"))
    assert strict.check(good()).keep
    multiline = edited(lambda s: setattr(s.messages[-1], "content", text("<answer>\n42\n</answer>")))
    assert strict.check(multiline).keep
    verdict = strict.check(edited(lambda s: setattr(s.messages[-1], "content", text("just 1"))))
    assert verdict.reason == "no_final_answer"
    assert verdict.detail == "message 7: the final text does not match '<answer>.+</answer>': 'just 1'"


def test_bad_answer_pattern_fails_when_the_recipe_loads() -> None:
    with pytest.raises(UserError, match="answer_pattern"):
        _validate(WellFormed.Options, {"answer_pattern": "<answer>(.+"}, "recipe.yaml: stage 'format'")


def prompt(answer: object = "4", question: str = "How many cubes?") -> Sample:
    messages = [Message("system", text("Think step by step.")), Message("user", [ImagePart(0), TextPart(question)])]
    return Sample("p", "t", messages, [Image(b"png")], answer)


def test_prompt_mode_checks_question_images_and_ground_truth() -> None:
    stage = WellFormed(WellFormed.Options(require_assistant=False))
    assert stage.check(prompt()).keep
    assert stage.check(prompt(answer=["4", "four"])).keep
    for answer in (None, "", []):
        assert (stage.check(prompt(answer=answer)).reason, stage.check(prompt(answer=answer)).detail) == (
            "no_ground_truth", "the prompt has no answer")
    assert stage.check(prompt(question="  ")).reason == "empty_question"
    no_image = prompt()
    no_image.images.clear()
    assert stage.check(no_image).reason == "missing_image"


def test_prompt_is_not_a_trajectory_by_default() -> None:
    verdict = WellFormed().check(prompt())
    assert (verdict.reason, verdict.detail) == ("no_final_answer", "message 1 (the last) is a user turn")
