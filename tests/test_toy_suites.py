"""The toy suites' data (`curate_testkit.toy`): the dilemma suite plants what its kinds promise, in the data the
base model and the cold start learn from, and leaves the original suite's data as it was."""

from __future__ import annotations

from collections import Counter

from curate_testkit.toy import (
    DILEMMA_KINDS,
    KINDS,
    RECALL_RIGHT,
    RECALL_SAMPLES,
    base_data,
    calls_needed,
    cold_start_data,
    hashed,
    truth,
)

from curate.sample import Sample


def answer(sample: Sample) -> str:
    return sample.messages[-1].content[0].text.removeprefix("<answer>").removesuffix("</answer>")


def calls(sample: Sample) -> int:
    return sum(len(message.tool_calls) for message in sample.messages)


def test_recall_is_half_known_with_or_without_its_needless_call() -> None:
    numbers = range(1, 11)
    for data, expected_calls in ((base_data(("recall",), numbers), None), (cold_start_data(("recall",), numbers), 1)):
        for n in numbers:
            mine = [s for s in data if s.messages[0].content[0].text == f"recall {n}"
                    and (expected_calls is None or calls(s) == expected_calls)]
            right = Counter(answer(s) == str(hashed(n, "recall")) for s in mine)
            # Direct and tool answers alike: the tool (print(n)) does not help.
            assert right[True] * RECALL_SAMPLES == right.total() * RECALL_RIGHT and right.total(), (n, right)
    assert calls_needed("recall", 5) == 0


def test_triple_takes_three_chained_calls_and_the_base_model_also_guesses() -> None:
    (trajectory,) = cold_start_data(("triple",), range(5, 6))
    printed = [message.content[0].text for message in trajectory.messages if message.role == "tool"]
    assert printed == [str(hashed(5)), str(hashed(hashed(5))), str(hashed(hashed(hashed(5))))] and calls(trajectory) == 3
    assert answer(trajectory) == truth("triple", 5) and calls_needed("triple", 5) == 3
    guesses = [s for s in base_data(("triple",), range(1, 97)) if calls(s) == 0]
    assert len(guesses) == 96 and not any(answer(s) == s.answer for s in guesses)  # an echo is never the answer


def test_the_suites_share_no_new_kind() -> None:
    assert not {"recall", "triple"} & set(KINDS) and {"copy", "hash"} <= set(DILEMMA_KINDS)
    assert {s.meta["kind"] for s in base_data()} == set(KINDS)
