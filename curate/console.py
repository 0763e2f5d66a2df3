"""A quiet console: what curate itself writes (progress bars, one-line notices, the funnel) stays on the terminal;
everything else — third-party logging (vLLM, Ray, transformers), warnings, C-level prints, child processes'
output — goes to a log file.

Two levels, because libraries reach the terminal both ways:
- file descriptors 1 and 2 point at the log, so native code and child processes write there;
- `sys.stdout` and `sys.stderr` become streams that pass a write to the terminal only when the code calling them
  is curate's own (through tqdm and click too: curate's bars and lines, not vLLM's loading bars), and to the log
  otherwise. Which code writes is decided per write, so a logging handler a library creates later (bound to
  `sys.stderr` then) is caught too.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TextIO

# Writes from curate reach the terminal; tqdm and click draw for whoever calls them (vLLM's and transformers'
# loading bars too), so the first caller outside them decides.
OWN = "curate"
DRAWING = frozenset({"tqdm", "click"})


def _from_curate(frame: FrameType | None) -> bool:
    while frame is not None:
        package = frame.f_globals.get("__name__", "").partition(".")[0]
        if package not in DRAWING:
            return package == OWN
        frame = frame.f_back
    return False


class _Routed(io.TextIOBase):
    """A text stream that sends curate's writes to the terminal and every other writer's to the log."""

    def __init__(self, terminal: TextIO, log: TextIO) -> None:
        self.terminal, self.log = terminal, log

    def write(self, text: str) -> int:
        return (self.terminal if _from_curate(sys._getframe(1)) else self.log).write(text)

    def flush(self) -> None:
        self.terminal.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.terminal.isatty()

    def fileno(self) -> int:  # tqdm sizes its bars from the terminal's
        return self.terminal.fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.terminal.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self.terminal.errors


@contextlib.contextmanager
def quiet(log_path: Path) -> Iterator[TextIO]:
    """Everything but curate's own output goes to `log_path` (appended) until the block ends; yields the log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_streams = sys.stdout, sys.stderr
    saved_fds = os.dup(1), os.dup(2)
    log = log_path.open("a", buffering=1, encoding="utf-8", errors="backslashreplace")
    terminals = [os.fdopen(os.dup(fd), "w", buffering=1, encoding=stream.encoding or "utf-8",
                           errors="backslashreplace") for fd, stream in zip(saved_fds, saved_streams, strict=True)]
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout, sys.stderr = (_Routed(terminal, log) for terminal in terminals)
    try:
        yield log
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved_streams
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        # The terminal and log streams stay open: a handler a library made meanwhile still writes through them.


def to_terminal(text: str) -> None:
    """A line for the user whatever the console's state (used for errors, which name the log)."""
    print(text, file=sys.stderr, flush=True)
