"""execution_failure: every code call of the trajectory runs in the sandbox without failing."""

from __future__ import annotations

from curate.sample import Sample
from curate.sandbox.trajectory import code_calls, other_tools
from curate.stage import KEEP, Verdict, reject
from curate.stage.sandbox import SandboxStage


class ExecutionFailure(SandboxStage):
    """Re-executes the trajectory's code calls in order, in one interpreter state, and rejects it when one fails.

    Reasons: `syntax_error` (the code cannot be parsed), `code_error` (it raises, e.g. when it tries to write
    outside its scratch directory), `timeout` (wall-clock or CPU time limit), `limit_exceeded` (memory,
    processes and threads, file size, printed text, image bytes, a decompression-bomb image), `bad_output` (a
    saved image that is a link out of the scratch directory), `bad_input` (an input image cannot be opened as
    `image_N`), `sandbox_crash` (the worker died twice), `sandbox_unresponsive` (two workers in turn did not answer
    within `timeout` + `worker_grace` and were killed and replaced). The detail names the
    call and its message, the error, and the last lines of the traceback. Non-code tools (search) are left
    alone and listed in `meta.execution_failure.other_tools`.
    """

    name = "execution_failure"
    reasons = {
        "syntax_error": "a code call cannot be parsed",
        "code_error": "a code call raises (e.g. on a write outside its scratch directory)",
        "timeout": "the wall-clock `timeout` or the `cpu_seconds` limit",
        "limit_exceeded": "memory, processes and threads, file size, printed text, image bytes or a bomb image",
        "bad_output": "a saved image that is a link out of the scratch directory",
        "bad_input": "an input image cannot be opened as `image_N`",
        "sandbox_crash": "the sandbox worker died on this trajectory twice (replaced both times)",
        "sandbox_unresponsive": "the sandbox worker missed its deadline twice (killed and replaced both times)",
    }

    def process(self, batch: list[Sample]) -> list[Verdict]:
        records = self.executed(batch)
        return [self._verdict(sample, records.get(id(sample))) for sample in batch]

    def _verdict(self, sample: Sample, record: dict | None) -> Verdict:
        calls = code_calls(sample)
        sample.meta[self.name] = {"code_calls": len(calls), "other_tools": other_tools(sample),
                                  "isolation": self.sandbox.level}
        if record is None:
            return KEEP
        for index, cell in enumerate(record["cells"]):
            if cell["error"]:
                traceback_tail = "\n".join(cell["traceback"].strip().splitlines()[-3:])
                return reject(_error_reason(cell["error"]),
                              f"call {index} (message {calls[index].message_index}): {cell['error']}\n{traceback_tail}")
        if record["status"] != "ok":
            index = len(record["cells"])
            where = f"call {index} (message {calls[index].message_index})" if index < len(calls) else "after the last call"
            return reject(_status_reason(record["status"], record["detail"]), f"{where}: {record['detail']}")
        return KEEP


# Raised by the sandbox itself (OutputLimitExceeded) or by python at a limit of the sandbox.
_LIMIT_ERRORS = ("MemoryError", "OutputLimitExceeded", "RuntimeError: can't start new thread")


def _error_reason(error: str) -> str:
    if error.startswith(("SyntaxError", "IndentationError", "TabError")):
        return "syntax_error"
    if error.startswith(_LIMIT_ERRORS) or "[Errno 27]" in error or (error.startswith("BlockingIOError") and "[Errno 11]" in error):
        return "limit_exceeded"  # address space, output size, threads; file size (EFBIG); process count (EAGAIN)
    if error.startswith("OutputRejected"):
        return "bad_output"
    return "code_error"


def _status_reason(status: str, detail: str) -> str:
    if status == "timeout" or "SIGXCPU" in detail:
        return "timeout"
    return {"killed": "limit_exceeded", "setup_failed": "bad_input",
            "unresponsive": "sandbox_unresponsive"}.get(status, "sandbox_crash")
