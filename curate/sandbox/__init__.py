"""Run untrusted python from datasets, isolated for real, fast.

A `Sandbox` keeps `parallelism` warm workers (`zygote.py`: numpy, PIL and matplotlib imported once),
each inside the isolation; a trajectory is sent to a free worker, which forks a fresh child for it,
so isolation is per trajectory while interpreter start-up is paid once per worker.

Isolation levels (`isolation.py` picks one and checks it before anything runs):
- `bwrap` (`auto`): bubblewrap, the system's or the bundled one. Each worker lives in its own mount,
  PID, network, IPC and UTS namespaces. The file system is read-only and holds only what python needs
  (`/usr`, `/lib*`, `/bin`, the python installation and the virtual environment); `/tmp`, `/var/tmp`
  and `/dev/shm` are private tmpfs that only the worker may write, and each trajectory gets a scratch
  directory in `/tmp`, deleted afterwards. No network at all, an empty environment (no API key can
  leak in), and the trajectory runs as an unprivileged uid with limits on address space, CPU time,
  processes and file size.
- `namespace` (only when asked for): the worker makes its own mount, network and PID namespaces itself
  (it is pid 1 there, with a /proc of its own; IPC and UTS stay the host's): the host file system read-only
  (and nosuid), private tmpfs over `/tmp`, `/var/tmp` and `/dev/shm`, the same uid, environment, limits and
  scratch directories. The host's other files stay readable to whatever that uid may read (root-only files
  such as `~/.ssh` are not).
No level lets a trajectory write outside its scratch directory. Both kill every process a trajectory
leaves behind (the worker is a child subreaper).

A watchdog guards each conversation with a worker: a worker that dies, or does not answer within the
trajectory's `timeout` plus `worker_grace` seconds (wedged, stopped), is killed and replaced, and the
trajectory runs once more on the fresh worker, since a worker's fault is not the row's. When the fresh
worker fails it too, the trajectory's status is `unresponsive` or `crashed`, with a detail saying what
happened, and the run goes on.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from curate.errors import UserError
from curate.sandbox.isolation import Isolation, resolve
from curate.sandbox.zygote import PRIVATE_TMPFS, python_installation

ZYGOTE = Path(__file__).with_name("zygote.py")
SANDBOX_ZYGOTE = "/sandbox/zygote.py"
FIRST_UID = 60000
UIDS_PER_SANDBOX = 64  # a sandbox's slots get consecutive uids
SANDBOX_UIDS = range(FIRST_UID, FIRST_UID + 4096 * UIDS_PER_SANDBOX)
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class SandboxOptions:
    """A sandbox's limits and layout. The stages that execute code take them from a recipe
    (`curate.stage.sandbox.SandboxStageOptions`, which checks and documents them); the trainer builds them itself."""

    timeout: float = 20.0  # wall-clock seconds per trajectory
    cpu_seconds: int = 20  # CPU seconds per trajectory
    memory_mb: int = 4096  # address-space limit per trajectory (MiB)
    max_processes: int = 64  # processes and threads per trajectory
    max_file_mb: int = 64  # largest file a trajectory may write (MiB)
    max_output_kb: int = 1024  # most text one call may print (stdout + stderr, KiB)
    tmp_mb: int = 512  # size of each worker's private /tmp (MiB)
    parallelism: int = 2  # warm workers, i.e. trajectories run at once
    worker_grace: float = 30.0  # seconds a worker may take beyond `timeout` to answer before it is replaced
    isolation: str = "auto"  # auto (= bwrap, system or bundled, else stop) | bwrap | namespace (only when asked for)


@dataclass
class CellResult:
    stdout: str = ""
    stderr: str = ""
    error: str = ""  # "ExceptionType: message", empty when the cell ran through
    traceback: str = ""
    images: list[bytes] = field(default_factory=list)  # PNG/JPEG bytes the cell showed or saved


@dataclass
class TrajectoryResult:
    cells: list[CellResult]
    status: str  # ok | timeout | killed | crashed | setup_failed | unresponsive
    detail: str = ""


def bwrap_options(tmp_mb: int) -> list[str]:
    """bubblewrap's arguments up to the program: what the workers (and the start-up check) run inside."""
    options = ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
               "--as-pid-1", "--die-with-parent", "--new-session", "--hostname", "sandbox",
               "--proc", "/proc", "--dev", "/dev"]
    # The private tmpfs come first: binds below may live under /tmp (a venv in a temporary clone). Mode 0755:
    # the worker makes each trajectory's scratch directory there; the trajectory's uid may write nowhere else.
    for folder in PRIVATE_TMPFS:
        options += ["--size", str(tmp_mb << 20), "--perms", "0755", "--tmpfs", folder]
    python_homes = python_installation()
    # Folders above the python installation (e.g. /root for a pyenv python) are created traversable
    # and empty, so an unprivileged uid can import the standard library and sees nothing else there.
    for folder in sorted({str(parent) for home in python_homes for parent in Path(home).parents} - {"/", "/tmp"}):
        options += ["--perms", "0755", "--dir", folder]
    for path in sorted({"/usr", "/lib", "/lib64", "/bin", *python_homes}):
        if Path(path).exists():
            options += ["--ro-bind", path, path]
    options += ["--ro-bind", str(ZYGOTE), SANDBOX_ZYGOTE, "--chdir", "/tmp"]
    # Only what the worker needs to hand each trajectory to its own uid and clean up after it.
    for capability in ("CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_KILL", "CAP_DAC_OVERRIDE", "CAP_FOWNER"):
        options += ["--cap-add", capability]
    if os.getuid() != 0:  # a non-root worker mounts each trajectory's view (caps of bubblewrap's user namespace)
        options += ["--cap-add", "CAP_SYS_ADMIN"]
    return options


def isolation_for(options: SandboxOptions) -> Isolation:
    """The isolation these options get, checked by running `python -c pass` inside it; UserError if none works."""
    trivial = [sys.executable, "-I", "-S", "-c", "pass"]
    return resolve(options.isolation, lambda bwrap: [bwrap, *bwrap_options(options.tmp_mb), "--clearenv", *trivial])


class Sandbox:
    def __init__(self, options: SandboxOptions | None = None) -> None:
        self.options = options or SandboxOptions()
        self.isolation = isolation_for(self.options)
        self.level = self.isolation.level
        self._logs = Path(tempfile.mkdtemp(prefix="curate-sandbox-"))  # the workers' stderr, nothing else
        self._free: queue.Queue[_Worker] = queue.Queue()
        self._workers: list[_Worker] = []
        try:
            for slot in range(self.options.parallelism):
                self._workers.append(_Worker(*self.isolated(self._zygote(slot)), self._logs))
        except BaseException:
            self.close()
            raise
        for worker in self._workers:
            self._free.put(worker)
        self._threads = ThreadPoolExecutor(self.options.parallelism)

    def run(self, cells: list[str], images: dict[str, bytes] | None = None, preload: list[str] | None = None) -> TrajectoryResult:
        """Run the cells of one trajectory in order, in one fresh interpreter state.

        `images` are written into the scratch directory under their names; those listed in `preload`
        are also opened as `image_1, image_2, ...`.
        """
        request = {
            "cells": cells,
            "images": {name: base64.b64encode(data).decode() for name, data in (images or {}).items()},
            "preload": preload or [],
            "timeout": self.options.timeout,
            "cpu_seconds": self.options.cpu_seconds,
            "memory_mb": self.options.memory_mb,
            "max_processes": self.options.max_processes,
            "max_file_mb": self.options.max_file_mb,
            "max_output_kb": self.options.max_output_kb,
        }
        worker = self._free.get()
        try:
            response = worker.ask(request, timeout=self.options.timeout + self.options.worker_grace)
        finally:
            self._free.put(worker)
        return TrajectoryResult(
            [CellResult(c["stdout"], c["stderr"], c["error"], c["traceback"], [base64.b64decode(i) for i in c["images"]])
             for c in response["cells"]],
            response["status"],
            response["detail"],
        )

    def run_many(self, jobs: list[tuple[list[str], dict[str, bytes], list[str]]]) -> list[TrajectoryResult]:
        """Several trajectories at once, one per warm worker."""
        return list(self._threads.map(lambda job: self.run(*job), jobs))

    def close(self) -> None:
        if hasattr(self, "_threads"):
            self._threads.shutdown()
        for worker in self._workers:
            worker.close()
        shutil.rmtree(self._logs, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def isolated(self, program: list[str]) -> tuple[list[str], dict[str, str]]:
        """(command, environment) that run `program` inside this sandbox's isolation, seeing only our environment.

        At the namespace level the program isolates itself (the zygote does), so it runs as it is."""
        if self.level == "namespace":
            return program, self._environment()
        setenv = [arg for name, value in self._environment().items() for arg in ("--setenv", name, value)]
        command = [self.isolation.bwrap, *bwrap_options(self.options.tmp_mb), "--clearenv", *setenv, *program]
        return command, {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}

    def _environment(self) -> dict[str, str]:
        """The whole environment the sandbox sees: nothing of ours, so no secret can leak in."""
        environment = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "MPLCONFIGDIR": "/tmp/.matplotlib", "LANG": "C.UTF-8"}
        return environment | {name: "1" for name in THREAD_VARIABLES}

    def _zygote(self, slot: int) -> list[str]:
        # Distinct per process and slot: the process limit counts per uid, so concurrent trajectories
        # (other slots, other executor workers) must not share one.
        uid = str(FIRST_UID + (os.getpid() % 4096) * UIDS_PER_SANDBOX + slot % UIDS_PER_SANDBOX)
        if self.level == "namespace":
            return [sys.executable, str(ZYGOTE), "--private-mounts", str(self.options.tmp_mb), "--uid", uid]
        return [sys.executable, SANDBOX_ZYGOTE, "--uid", uid]


class _Worker:
    """One warm zygote process and the lock-step JSON conversation with it."""

    def __init__(self, command: list[str], environment: dict[str, str], logs: Path) -> None:
        self.command, self.environment, self.logs = command, environment, logs
        self.lock = threading.Lock()
        self.process = self._start()

    def _start(self) -> subprocess.Popen[str]:
        # stderr goes to a file: a pipe nobody reads would block a chatty worker. Its own session, so that the
        # watchdog can kill the worker with everything it started.
        log = tempfile.NamedTemporaryFile(prefix="worker-", suffix=".log", dir=self.logs, delete=False)
        process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                   env=self.environment, cwd="/", start_new_session=True)
        ready = process.stdout.readline() if process.stdout else ""
        if not ready.startswith('{"ready"'):
            _kill(process)
            why = (Path(log.name).read_text().strip().splitlines() or [ready.strip() or "no output"])[-1]
            raise UserError(f"the sandbox worker did not start ({why}); `curate doctor` checks the sandbox")
        return process

    def ask(self, request: dict, timeout: float) -> dict:
        """The worker's answer to `request`; a worker that dies or does not answer within `timeout` seconds is
        killed and replaced, and the request asked once more of the fresh worker."""
        with self.lock:
            for _ in range(2):
                answer, lost = self._exchange(request, timeout)
                if answer is not None:
                    return answer
                self.process = self._start()
        status = "unresponsive" if "did not answer" in lost else "crashed"
        return {"cells": [], "status": status, "detail": f"{lost}, twice: each worker was killed and replaced"}

    def _exchange(self, request: dict, timeout: float) -> tuple[dict | None, str]:
        """(the answer, "") or (None, what went wrong): the worker is then killed, for the caller to replace."""
        process = self.process
        assert process.stdin and process.stdout
        if process.poll() is not None:  # died since its last answer: replaced, not trusted
            self.process = process = self._start()
            assert process.stdin and process.stdout
        try:
            process.stdin.write(json.dumps(request) + "\n")
            process.stdin.flush()
        except (BrokenPipeError, OSError):
            _kill(process)
            return None, "the sandbox worker died"
        lines: list[str] = []
        # A thread reads, so that a worker that never writes (stopped, wedged) cannot block us past the deadline.
        reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if reader.is_alive():
            _kill(process)  # closes its end of the pipe: the reader returns
            reader.join()
            return None, f"the sandbox worker did not answer within {timeout:g} s"
        if not lines or not lines[0]:
            _kill(process)
            return None, "the sandbox worker died"
        return json.loads(lines[0]), ""

    def close(self) -> None:
        _kill(self.process)


def _kill(process: subprocess.Popen[str]) -> None:
    """The worker and every process of its session, stopped ones too (SIGKILL needs no cooperation)."""
    if process.returncode is None:  # not reaped yet, so its pid (and session) cannot have been reused
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if process.poll() is None:
        process.kill()
    process.wait()
