"""The warm sandbox worker: runs inside the isolation, pre-imports, forks one child per trajectory.

Self-contained on purpose (standard library + numpy / PIL / matplotlib only): it is the one file of
curate that the sandbox can see. Protocol over stdin / stdout, one JSON object per line:

    request:  {"cells": [code, ...], "images": {name: base64}, "preload": [name, ...],
               "timeout": s, "memory_mb": n, "cpu_seconds": n, "max_processes": n, "max_file_mb": n}
    response: {"cells": [{"stdout", "stderr", "error", "traceback", "images": [base64 png, ...]}, ...],
               "status": "ok" | "timeout" | "killed" | "crashed" | "setup_failed", "detail": str}

The child runs as an unprivileged user (when the worker is root) with resource limits, in a fresh
scratch directory that is deleted afterwards; the worker is a child subreaper and kills every
process the trajectory left behind. Results travel back as JSON, never pickle: the child is untrusted.
"""

from __future__ import annotations

import base64
import ctypes
import io
import json
import os
import resource
import select
import shutil
import signal
import sys
import tempfile
import time
import traceback

import matplotlib

matplotlib.use("Agg")
# Imported once here so every child starts warm, and so a child running as an unprivileged uid does not
# need to read the python installation for the common modules.
import collections  # noqa: E401, E402, F401

import matplotlib.pyplot as plt  # noqa: E402
import numpy  # noqa: E402, F401
from PIL import Image  # noqa: E402

Image.init()  # every image plugin, now rather than on first use inside a child
PR_SET_CHILD_SUBREAPER = 36
RUN_AS = 65534  # nobody, unless --uid says otherwise
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp")


def main() -> None:
    global RUN_AS
    if "--unshare-net" in sys.argv:
        unshare_network()
    # Each worker slot runs its trajectories under its own uid, so process limits (counted per uid) do not mix.
    RUN_AS = int(sys.argv[sys.argv.index("--uid") + 1])
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        response = run_trajectory(request)
        kill_leftovers()
        print(json.dumps(response), flush=True)


def unshare_network() -> None:
    """Fallback isolation: a network namespace of our own (only loopback, down)."""
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newnet, clone_newuser = 0x40000000, 0x10000000
    if libc.unshare(clone_newnet) != 0 and libc.unshare(clone_newuser | clone_newnet) != 0:
        raise SystemExit(f"cannot create a network namespace: {os.strerror(ctypes.get_errno())}")


def run_trajectory(request: dict) -> dict:
    scratch = tempfile.mkdtemp(prefix="traj-", dir=request.get("scratch_root") or None)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_fd)
        child(request, scratch, write_fd)
    os.close(write_fd)
    cells, status, detail = collect(pid, read_fd, request["timeout"])
    shutil.rmtree(scratch, ignore_errors=True)
    return {"cells": cells, "status": status, "detail": detail}


def collect(pid: int, read_fd: int, timeout: float) -> tuple[list[dict], str, str]:
    """Read the child's per-cell results until it exits or the wall-clock limit passes."""
    deadline = time.monotonic() + timeout
    buffer = b""
    status, detail = "ok", ""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            status, detail = "timeout", f"wall time over {timeout:g} s"
            break
        ready, _, _ = select.select([read_fd], [], [], remaining)
        if ready:
            chunk = os.read(read_fd, 1 << 20)
            if not chunk:
                break
            buffer += chunk
    os.close(read_fd)
    if status == "timeout":
        kill_tree(pid)
    _, wait_status = os.waitpid(pid, 0)
    if status == "ok" and os.WIFSIGNALED(wait_status):
        signal_name = signal.Signals(os.WTERMSIG(wait_status)).name
        status, detail = "killed", f"killed by {signal_name}" + (" (CPU time limit)" if signal_name == "SIGXCPU" else "")
    elif status == "ok" and os.WEXITSTATUS(wait_status) != 0:
        status, detail = "crashed", f"the trajectory's process exited with status {os.WEXITSTATUS(wait_status)}"
    cells = []
    for line in buffer.splitlines():
        try:
            cell = json.loads(line)
        except json.JSONDecodeError:
            status, detail = "crashed", "unreadable result from the child"
            continue
        if "setup_error" in cell:
            status, detail = "setup_failed", cell["setup_error"]
        else:
            cells.append(cell)
    return cells, status, detail


def kill_tree(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_leftovers() -> None:
    """Kill every process the trajectory left (orphans are re-parented to us, the subreaper)."""
    me = os.getpid()
    while True:
        children = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as handle:
                        fields = handle.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == me:
                    children.append(int(entry))
        if not children:
            return
        for child_pid in children:
            try:
                os.kill(child_pid, signal.SIGKILL)
                os.waitpid(child_pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def child(request: dict, scratch: str, write_fd: int) -> None:
    try:
        os.setsid()
        prepare_scratch(request, scratch)
        drop_privileges(scratch)
        apply_limits(request)
        os.chdir(scratch)
        owner = os.getpid()
        with os.fdopen(write_fd, "w") as out:
            try:
                namespace = preloaded(request)
            except Exception as exc:  # a corrupt input image: the trajectory cannot even start
                out.write(json.dumps({"setup_error": f"cannot open the input images: {type(exc).__name__}: {exc}"}) + "\n")
                out.flush()
                os._exit(0)
            for index, code in enumerate(request["cells"]):
                result = run_cell(code, index, namespace, scratch)
                if os.getpid() != owner:  # a process the code forked: only the trajectory itself reports
                    os._exit(0)
                out.write(json.dumps(result) + "\n")
                out.flush()
    except BaseException:  # the child must never fall back into the worker's loop
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def prepare_scratch(request: dict, scratch: str) -> None:
    for name, data in request["images"].items():
        with open(os.path.join(scratch, os.path.basename(name)), "wb") as handle:
            handle.write(base64.b64decode(data))


def drop_privileges(scratch: str) -> None:
    if os.getuid() == 0:
        os.chown(scratch, RUN_AS, RUN_AS)
        for name in os.listdir(scratch):
            os.chown(os.path.join(scratch, name), RUN_AS, RUN_AS)
        os.setgroups([])
        os.setgid(RUN_AS)
        os.setuid(RUN_AS)


def apply_limits(request: dict) -> None:
    megabyte = 1 << 20
    limits = {
        resource.RLIMIT_AS: request["memory_mb"] * megabyte,
        resource.RLIMIT_CPU: request["cpu_seconds"],  # soft: SIGXCPU, reported; the hard limit is one second later
        resource.RLIMIT_NPROC: request["max_processes"],
        resource.RLIMIT_FSIZE: request["max_file_mb"] * megabyte,
        resource.RLIMIT_CORE: 0,
    }
    for limit, value in limits.items():
        resource.setrlimit(limit, (value, value + 1 if limit == resource.RLIMIT_CPU else value))
    # Over the file-size limit a write raises instead of killing the process, so it is reported per cell.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def preloaded(request: dict) -> dict:
    """The cells' globals: `image_1, image_2, ...` as PIL images, and show() that returns the image."""
    namespace: dict = {"__name__": "__main__"}
    for position, name in enumerate(request["preload"], start=1):
        namespace[f"image_{position}"] = Image.open(os.path.basename(name))
    return namespace


class Shown:
    """Collects images the code displays: plt.show() and PIL's Image.show()."""

    def __init__(self) -> None:
        self.images: list[bytes] = []

    def figure(self) -> None:
        for number in plt.get_fignums():
            buffer = io.BytesIO()
            plt.figure(number).savefig(buffer, format="png")
            self.images.append(buffer.getvalue())
        plt.close("all")

    def pil(self, image: Image.Image) -> None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        self.images.append(buffer.getvalue())


def run_cell(code: str, index: int, namespace: dict, scratch: str) -> dict:
    before = {name: os.stat(name).st_mtime_ns for name in os.listdir(scratch)}
    shown = Shown()
    # Plain functions, not bound methods: pyplot sets attributes on its show().
    plt.show = lambda *args, **kwargs: shown.figure()  # type: ignore[assignment]
    Image.Image.show = lambda image, *args, **kwargs: shown.pil(image)  # type: ignore[method-assign]
    stdout, stderr = io.StringIO(), io.StringIO()
    error, trace = "", ""
    real_stdout, real_stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = stdout, stderr
    try:
        exec(compile(code, f"<cell {index}>", "exec"), namespace)  # noqa: S102 - isolated, that is the point
    except BaseException as exc:  # SystemExit and KeyboardInterrupt from the code are its errors too
        error = f"{type(exc).__name__}: {exc}"
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))  # from the cell on
    finally:
        sys.stdout, sys.stderr = real_stdout, real_stderr
    saved = sorted(
        name for name in os.listdir(scratch)
        if name.lower().endswith(IMAGE_SUFFIXES) and before.get(name) != os.stat(name).st_mtime_ns
    )
    images = shown.images + [open(name, "rb").read() for name in saved]
    return {
        "stdout": stdout.getvalue()[-100_000:],
        "stderr": stderr.getvalue()[-20_000:],
        "error": error,
        "traceback": trace,
        "images": [base64.b64encode(data).decode() for data in images],
    }


if __name__ == "__main__":
    main()
