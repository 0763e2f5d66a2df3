"""Text normalisation and shingling shared by the text stages (text_dedup, decontaminate).

Normalisation, in this order:
1. image placeholders (`<image>`, as Metis-RL and LLaMA-Factory write them) are removed;
2. Unicode NFKC (full-width letters and ligatures become plain ones);
3. case folded (`ignore_case`);
4. every run of numbers becomes `0` (`ignore_numbers`, off by default: in a math question the numbers are
   the question);
5. punctuation and symbols become spaces (`ignore_punctuation`);
6. whitespace runs become one space, ends stripped.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

_PLACEHOLDER = re.compile(r"<image>", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_PUNCTUATION = re.compile(r"[^\w\s]|_")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Normaliser:
    ignore_case: bool = True
    ignore_punctuation: bool = True
    ignore_numbers: bool = False

    def __call__(self, text: str) -> str:
        text = unicodedata.normalize("NFKC", _PLACEHOLDER.sub(" ", text))
        if self.ignore_case:
            text = text.casefold()
        if self.ignore_numbers:
            text = _NUMBER.sub("0", text)
        if self.ignore_punctuation:
            text = _PUNCTUATION.sub(" ", text)
        return _SPACE.sub(" ", text).strip()


def char_shingles(text: str, size: int) -> set[str]:
    """Overlapping character n-grams; a text shorter than `size` is its own single shingle."""
    if len(text) <= size:
        return {text} if text else set()
    return {text[i : i + size] for i in range(len(text) - size + 1)}


def word_ngrams(words: list[str], size: int) -> set[str]:
    """Overlapping word n-grams joined by single spaces; fewer words than `size` give one n-gram of them all."""
    if len(words) <= size:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}
