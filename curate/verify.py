"""Answer verification: is a model's final answer the ground truth?

Shared by the probe stages and the trainer's reward. Two steps:

1. `extract_answer(completion)`: the last `<answer>...</answer>`, else the last `\\boxed{...}`, else what
   follows the last "answer is" / "answer:", else the last non-empty line.
2. `match(prediction, truth)`, rules in order:
   - `exact`: equal after normalisation (case, whitespace, surrounding quotes/markdown, LaTeX wrappers such as
     `$...$`, `\\text{}`, a trailing period);
   - `choice`: the truth is a letter A-J and the prediction names that letter ("B", "(B)", "B. red", "option B");
   - `numeric`: both are numbers (thousands separators, currency, %, fractions `3/4`, `\\frac{3}{4}`, scientific
     notation) equal within `rel_tol` (a percentage also matches its fraction: 50% = 0.5);
   - `list`: both are lists ("a, b and c", "[1, 2]", ";"-separated) whose items match one to one, in any order;
   - anything else: `undecided` (free text that differs). The verifier then asks its `judge`, if it has
     one (an LLM saying CORRECT / INCORRECT), else counts it wrong.
A ground truth given as a list holds acceptable alternatives: matching any one is correct.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

Judge = Callable[[str, str, str], bool]  # (question, prediction, truth) -> correct


@dataclass(frozen=True)
class Verification:
    correct: bool
    prediction: str | None  # the extracted answer, None when the completion has none
    rule: str  # exact | choice | numeric | list | judge | undecided | no_answer


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_PHRASE = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)
_CHOICE = re.compile(r"^(?:option|choice|answer)?\s*[(\[]?([A-J])[)\].:]?(?:\s|$)", re.IGNORECASE)
_NUMBER = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?$", re.IGNORECASE)
_LATEX_WRAPPERS = re.compile(r"\\(?:text|mathrm|textbf|mathbf|operatorname)\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")


def extract_answer(completion: str) -> str | None:
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        return tags[-1].strip()
    boxed = _last_boxed(completion)
    if boxed is not None:
        return boxed.strip()
    phrases = _ANSWER_PHRASE.findall(completion)
    if phrases:
        return phrases[-1].strip()
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def _last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}`, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for position in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[begin:position]
    return None


def normalize(text: str) -> str:
    text = _FRAC.sub(r"\1/\2", text)
    text = _LATEX_WRAPPERS.sub(r"\1", text)
    text = text.replace("\\left", "").replace("\\right", "").replace("\\%", "%").replace("\\,", "")
    text = text.strip().strip("$").strip()
    text = re.sub(r"^[*_`\"'“”‘’]+|[*_`\"'“”‘’]+$", "", text)
    text = re.sub(r"\s+", " ", text).strip().rstrip(".").strip()
    return text.lower()


def parse_number(text: str) -> float | None:
    """A number written as a decimal, fraction, percentage or with thousands separators / currency."""
    text = normalize(text).replace(" ", "")
    text = re.sub(r"^[$€£¥]|(?:usd|dollars?|eur)$", "", text)
    scale = 1.0
    if text.endswith("%"):
        text, scale = text[:-1], 0.01
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):
        text = text.replace(",", "")
    if _NUMBER.match(text):
        return float(text) * scale
    fraction = re.fullmatch(r"([-+]?\d+)/(\d+)", text)
    if fraction and int(fraction.group(2)) != 0:
        return float(Fraction(int(fraction.group(1)), int(fraction.group(2)))) * scale
    return None


def split_list(text: str) -> list[str] | None:
    """Items of a list answer ("a, b and c", "[1, 2]", "x; y"), None for a single item."""
    text = normalize(text).strip("[](){}")
    items = [item.strip() for item in re.split(r"\s*(?:,|;|\band\b)\s*", text) if item.strip()]
    return items if len(items) > 1 else None


def match(prediction: str, truth: str, rel_tol: float = 1e-4) -> tuple[bool | None, str]:
    """(correct, rule), correct None when no rule can decide."""
    if normalize(prediction) == normalize(truth):
        return True, "exact"
    if re.fullmatch(r"[(\[]?[A-J][)\]]?", truth.strip(), re.IGNORECASE):
        chosen = _CHOICE.match(normalize(prediction).strip())
        letter = truth.strip().strip("()[]").upper()
        return bool(chosen and chosen.group(1).upper() == letter), "choice"
    predicted_number, true_number = parse_number(prediction), parse_number(truth)
    if true_number is not None:
        if predicted_number is None:
            return False, "numeric"
        candidates = [predicted_number, predicted_number * 100, predicted_number / 100] if "%" in prediction + truth \
            else [predicted_number]
        return any(math.isclose(c, true_number, rel_tol=rel_tol, abs_tol=1e-9) for c in candidates), "numeric"
    predicted_items, true_items = split_list(prediction), split_list(truth)
    if true_items is not None:
        return _items_match(predicted_items or [normalize(prediction)], true_items, rel_tol), "list"
    return None, "undecided"


def _items_match(predicted: list[str], truth: list[str], rel_tol: float) -> bool:
    """Each true item matched by a distinct predicted item, and nothing extra."""
    if len(predicted) != len(truth):
        return False
    remaining = list(predicted)
    for item in truth:
        found = next((p for p in remaining if match(p, item, rel_tol)[0]), None)
        if found is None:
            return False
        remaining.remove(found)
    return True


@dataclass
class AnswerVerifier:
    """Rules first; `judge` (e.g. an LLM judge from `judges/`) decides only what the rules cannot."""

    judge: Judge | None = None
    rel_tol: float = 1e-4

    def __call__(self, completion: str, truth: str | Sequence[str], question: str = "") -> Verification:
        prediction = extract_answer(completion)
        if prediction is None:
            return Verification(False, None, "no_answer")
        alternatives = [truth] if isinstance(truth, str) else [str(t) for t in truth]
        undecided = False
        for alternative in alternatives:
            correct, rule = match(prediction, str(alternative), self.rel_tol)
            if correct:
                return Verification(True, prediction, rule)
            undecided = undecided or correct is None
        if undecided and self.judge is not None:
            return Verification(any(self.judge(question, prediction, a) for a in alternatives), prediction, "judge")
        return Verification(False, prediction, "undecided" if undecided else rule)
