"""The answer verifier on a table of completions and ground truths covering every rule."""

from __future__ import annotations

import pytest

from curate.verify import AnswerVerifier, extract_answer

# (completion, ground truth, correct, rule)
TABLE = [
    # extraction: <answer>, \boxed{}, "answer is", last line
    ("<reason>count</reason><answer>42</answer>", "42", True, "exact"),
    ("<answer>41</answer> then <answer>42</answer>", "42", True, "exact"),
    ("so the result is \\boxed{42}.", "42", True, "exact"),
    ("\\boxed{\\frac{1}{2}}", "0.5", True, "numeric"),
    ("\\boxed{x^{2}+1}", "x^{2}+1", True, "exact"),
    ("The answer is: piano", "piano", True, "exact"),
    ("Thinking...\nThe final answer is 7.", "7", True, "exact"),
    ("Answer: Paris", "paris", True, "exact"),
    ("lots of text\n\nParis\n", "Paris", True, "exact"),
    ("", "Paris", False, "no_answer"),
    ("   \n  ", "Paris", False, "no_answer"),
    # exact after normalisation
    ("<answer>  Eiffel   Tower. </answer>", "eiffel tower", True, "exact"),
    ("<answer>**Lemon**</answer>", "lemon", True, "exact"),
    ("<answer>\"lemon\"</answer>", "lemon", True, "exact"),
    ("<answer>$x+1$</answer>", "x+1", True, "exact"),
    ("<answer>\\text{blue}</answer>", "blue", True, "exact"),
    ("<answer>`yes`</answer>", "Yes", True, "exact"),
    # multiple choice
    ("<answer>B</answer>", "B", True, "exact"),
    ("<answer>(B)</answer>", "B", True, "choice"),
    ("<answer>B. red</answer>", "B", True, "choice"),
    ("<answer>Option C</answer>", "C", True, "choice"),
    ("<answer>b</answer>", "(B)", True, "choice"),
    ("<answer>C</answer>", "B", False, "choice"),
    ("<answer>blue</answer>", "B", False, "choice"),
    ("<answer>D) 12</answer>", "D", True, "choice"),
    # numeric
    ("<answer>3.0</answer>", "3", True, "numeric"),
    ("<answer>1,234</answer>", "1234", True, "numeric"),
    ("<answer>$12.50</answer>", "12.5", True, "numeric"),
    ("<answer>12.5 dollars</answer>", "12.50", True, "numeric"),
    ("<answer>3/4</answer>", "0.75", True, "numeric"),
    ("<answer>\\frac{3}{4}</answer>", "3/4", True, "exact"),
    ("<answer>\\dfrac{1}{3}</answer>", "0.333333", True, "numeric"),
    ("<answer>50%</answer>", "0.5", True, "numeric"),
    ("<answer>0.5</answer>", "50%", True, "numeric"),
    ("<answer>50\\%</answer>", "50", True, "numeric"),
    ("<answer>1e3</answer>", "1000", True, "numeric"),
    ("<answer>-7</answer>", "-7.0", True, "numeric"),
    ("<answer>0.33</answer>", "1/3", False, "numeric"),
    ("<answer>43</answer>", "42", False, "numeric"),
    ("<answer>forty-two</answer>", "42", False, "numeric"),
    ("<answer>1,000,000</answer>", "1e6", True, "numeric"),
    ("<answer>2/0</answer>", "2", False, "numeric"),
    # lists, any order
    ("<answer>red, green and blue</answer>", "blue, green, red", True, "list"),
    ("<answer>[1, 2, 3]</answer>", "3; 2; 1", True, "list"),
    ("<answer>1, 2</answer>", "1, 2, 3", False, "list"),
    ("<answer>red, green, blue, pink</answer>", "red, green, blue", False, "list"),
    ("<answer>0.5, 3/4</answer>", "1/2, 0.75", True, "list"),
    ("<answer>red</answer>", "red, blue", False, "list"),
    # free text the rules cannot decide
    ("<answer>The Eiffel Tower in Paris</answer>", "Eiffel Tower", False, "undecided"),
    ("<answer>Gustave Eiffel's company</answer>", "Gustave Eiffel", False, "undecided"),
]


@pytest.mark.parametrize(("completion", "truth", "correct", "rule"), TABLE)
def test_rules(completion: str, truth: str, correct: bool, rule: str) -> None:
    verification = AnswerVerifier()(completion, truth)
    assert (verification.correct, verification.rule) == (correct, rule)


def test_table_covers_every_rule_with_fifty_pairs() -> None:
    assert len(TABLE) >= 50
    assert {rule for *_, rule in TABLE} == {"exact", "choice", "numeric", "list", "undecided", "no_answer"}
    assert {correct for _, _, correct, _ in TABLE} == {True, False}


def test_extraction_order() -> None:
    assert extract_answer("The answer is 3. <answer>4</answer>") == "4"  # the tag wins over a phrase
    assert extract_answer("\\boxed{a{b}c} and more") == "a{b}c"  # braces balanced
    assert extract_answer("\\boxed{unclosed") == "\\boxed{unclosed"  # no box: the last line
    assert extract_answer("Answer: x\nanswer is y") == "y"  # the last phrase


def test_list_ground_truth_holds_alternatives() -> None:
    verify = AnswerVerifier()
    assert verify("<answer>NYC</answer>", ["New York City", "NYC"]).correct
    assert not verify("<answer>Boston</answer>", ["New York City", "NYC"]).correct


def test_judge_decides_only_what_rules_cannot() -> None:
    asked: list[tuple[str, str, str]] = []

    def judge(question: str, prediction: str, truth: str) -> bool:
        asked.append((question, prediction, truth))
        return "eiffel" in prediction.lower()

    verify = AnswerVerifier(judge=judge)
    result = verify("<answer>The Eiffel Tower in Paris</answer>", "Eiffel Tower", question="Which landmark?")
    assert (result.correct, result.rule) == (True, "judge")
    assert asked == [("Which landmark?", "The Eiffel Tower in Paris", "Eiffel Tower")]
    assert verify("<answer>43</answer>", "42").rule == "numeric"  # decided by a rule: the judge is not asked
    assert len(asked) == 1
