"""Is a recorded tool observation what the code really prints? Tolerant text comparison.

Both texts are cut into tokens after masking what cannot be reproduced by nature (memory addresses
`0x7f...`, timestamps and dates); numbers compare with a relative tolerance (so `2.50` equals `2.5`
and float noise does not count), and the wrappers numpy puts around arrays (`array(`, `dtype=...`,
commas, brackets) are ignored, so `array([1., 2.])` equals `[1. 2.]`. Whitespace never matters.
"""

from __future__ import annotations

import difflib
import math
import re

from curate.formats.inline import parse_code_result

_VOLATILE = [
    (re.compile(r"0x[0-9a-fA-F]{4,}"), " ADDRESS "),
    (re.compile(r"\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?([+-]\d{2}:?\d{2}|Z)?"), " TIMESTAMP "),
    (re.compile(r"\b\d{1,2}:\d{2}:\d{2}(\.\d+)?\b"), " TIMESTAMP "),
]
_TOKEN = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|nan|inf|[A-Za-z_][A-Za-z_0-9]*|\S")
_IGNORED = {"array", "dtype", "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "object",
            ",", "(", ")", "[", "]", "=", "'", '"', "`"}
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|nan|inf")


def recorded_stdout(text: str) -> str:
    """The stdout part of a recorded observation (DeepEyesV2 wraps it with stderr in one block)."""
    parsed = parse_code_result(text)
    return parsed[0] if parsed else text


def tokens(text: str) -> list[str]:
    for pattern, mask in _VOLATILE:
        text = pattern.sub(mask, text)
    return [token for token in _TOKEN.findall(text) if token not in _IGNORED]


def same_output(recorded: str, actual: str, rel_tol: float = 1e-6) -> bool:
    left, right = tokens(recorded), tokens(actual)
    return len(left) == len(right) and all(_same_token(a, b, rel_tol) for a, b in zip(left, right))


def _same_token(a: str, b: str, rel_tol: float) -> bool:
    if a == b:
        return True
    if _NUMBER.fullmatch(a) and _NUMBER.fullmatch(b):
        x, y = float(a), float(b)
        return (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=rel_tol, abs_tol=1e-12)
    return False


def short_diff(recorded: str, actual: str, width: int = 400) -> str:
    """The differing lines, recorded (-) vs actual (+), cut to `width` characters."""
    lines = [line for line in difflib.ndiff(recorded.splitlines(), actual.splitlines()) if line[:1] in "-+"]
    return "\n".join(lines)[:width]
