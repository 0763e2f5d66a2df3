"""The warm sandbox worker: runs inside the isolation, pre-imports, forks one child per trajectory.

Self-contained on purpose (standard library + numpy / PIL / matplotlib only): it is the one file of
curate that the sandbox can see. Protocol over stdin / stdout, one JSON object per line:

    request:  {"cells": [code, ...], "images": {name: base64}, "preload": [name, ...], "timeout": s,
               "memory_mb": n, "cpu_seconds": n, "max_processes": n, "max_file_mb": n, "max_output_kb": n}
    response: {"cells": [{"stdout", "stderr", "error", "traceback", "images": [base64 png, ...]}, ...],
               "status": "ok" | "timeout" | "killed" | "crashed" | "setup_failed", "detail": str}

At the namespace level (`--private-mounts TMP_MB`) the worker isolates itself first: its own mount,
network and pid namespaces (the worker is pid 1, with a /proc of its own), the host file system read-only,
private tmpfs over /tmp, /var/tmp and /dev/shm.
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
import stat
import sys
import tempfile
import time
import traceback
import warnings

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x1000, 0x4000, 1 << 18
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, AT_RECURSIVE, AT_FDCWD, SYS_MOUNT_SETATTR = 0x1, 0x2, 0x8000, -100, 442
# Defined here, not in the sandbox package, because this file runs alone inside the isolation; the package imports them.
PRIVATE_TMPFS = ("/tmp", "/var/tmp", "/dev/shm")  # writable by the worker only, at every level
RUN_AS: int  # the uid trajectories run as: main() sets it from --uid
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp")
TEXT_KEPT = {"stdout": 100_000, "stderr": 20_000}  # characters of each stream a cell result carries (the end)
libc = ctypes.CDLL(None, use_errno=True)


def main() -> None:
    global RUN_AS
    if "--private-mounts" in sys.argv:
        private_mounts(int(sys.argv[sys.argv.index("--private-mounts") + 1]))
    # Each worker slot runs its trajectories under its own uid, so process limits (counted per uid) do not mix.
    RUN_AS = int(sys.argv[sys.argv.index("--uid") + 1])
    warm_imports()  # after the isolation: matplotlib writes its cache under HOME (/tmp)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # Where the trajectories keep the worker's uid (a non-root user), these alone keep them off the worker:
    # as pid 1 of its pid namespace it gets no signal it does not handle, and a non-dumpable process can be
    # neither traced nor read through /proc.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(run_trajectory(json.loads(line))), flush=True)


def warm_imports() -> None:
    """Imported once here so every child starts warm, and so a child running as an unprivileged uid does not
    need to read the python installation for the common modules."""
    global plt, Image
    import collections  # noqa: F401

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy  # noqa: F401
    from PIL import Image

    Image.init()  # every image plugin, now rather than on first use inside a child


def private_mounts(tmp_mb: int) -> None:
    """The namespace level: this process gets mount, network and pid namespaces of its own (and a user namespace
    first when it is not root), makes every mount read-only and nosuid, puts private tmpfs over the folders
    everybody may write, and carries on as pid 1 with a /proc of its own. Any failure stops the worker: it never
    runs code half isolated."""
    if os.getuid() != 0:  # the user namespace lends the rights to make the others; the uid stays ours
        uid, gid = os.getuid(), os.getgid()
        check(libc.unshare(CLONE_NEWUSER), "a user namespace")
        for name, content in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as handle:
                handle.write(content)
    check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "mount, network and pid namespaces")
    read_only("/")
    # A non-root user's trajectories keep that user's uid: its home (keys, tokens) is hidden from them too.
    private = [*PRIVATE_TMPFS, *([os.path.expanduser("~")] if os.getuid() != 0 else [])]
    # A python installation under a folder about to be hidden (a venv in a clone under /tmp) is held open
    # now and bound back, read-only, once the private tmpfs is over it, as the bubblewrap level does.
    hidden = {home: os.open(home, os.O_PATH) for home in python_homes()
              if any(home.startswith(folder + "/") for folder in private)}
    for folder in private:
        if os.path.isdir(folder) and folder != "/":
            check(libc.mount(b"tmpfs", folder.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                             f"size={tmp_mb}m,mode=0755".encode()), f"a private {folder}")
    for home, handle in hidden.items():
        os.makedirs(home, mode=0o755, exist_ok=True)
        check(libc.mount(f"/proc/self/fd/{handle}".encode(), home.encode(), None, MS_BIND | MS_REC, None),
              f"the python installation {home} visible")
        read_only(home)
        os.close(handle)
    become_pid_one()
    # A /proc of the new pid namespace: no host process is in sight. Where the kernel allows (5.8+), processes
    # of other uids vanish from it too.
    proc_flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if libc.mount(b"proc", b"/proc", b"proc", proc_flags, b"hidepid=invisible") != 0:
        check(libc.mount(b"proc", b"/proc", b"proc", proc_flags, None), "a /proc of its own")


def become_pid_one() -> None:
    """Fork into the new pid namespace; the first process only waits, and its child carries on as the worker.

    Killing the first process (as the sandbox does to a worker) kills the worker with it, and every process
    of the namespace with the worker."""
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def read_only(path: str, recursive: bool = True) -> None:
    attributes = MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, MS_PRIVATE, 0)
    check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE if recursive else 0,
                       ctypes.byref(attributes), ctypes.sizeof(attributes)),
          f"{path} read-only (mount_setattr, Linux 5.12+)")


def python_installation() -> set[str]:
    """The running python's folders: its prefix, the base installation's (under a virtual environment) and the
    interpreter's home (the real one, past any symbolic link)."""
    return {sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}


def python_homes() -> list[str]:
    """The python installation the worker and its children import from (with every folder on its path, which a
    `.pth` file may add from elsewhere), outermost folders only."""
    folders = [*python_installation(), *(path for path in sys.path if os.path.isdir(path))]
    homes = sorted({os.path.realpath(folder) for folder in folders} - {"/", *PRIVATE_TMPFS})
    return [home for home in homes if not any(home.startswith(other + "/") for other in homes)]


def check(result: int, what: str) -> None:
    if result != 0:
        raise SystemExit(f"the namespace sandbox cannot make {what}: {os.strerror(ctypes.get_errno())}")


def run_trajectory(request: dict) -> dict:
    scratch = tempfile.mkdtemp(prefix="traj-", dir="/tmp")  # the private /tmp, at every level
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_fd)
        child(request, scratch, write_fd)
    os.close(write_fd)
    megabyte = 1 << 20
    # A cell's result carries at most max_file_mb of images (base64) and a bounded text: more is an attack.
    most = len(request["cells"]) * (2 * request["max_file_mb"] + 1) * megabyte
    cells, status, detail = collect(pid, read_fd, request["timeout"], most)
    kill_leftovers()  # before the clean-up, so nothing of the trajectory races it
    shutil.rmtree(scratch, ignore_errors=True)
    return {"cells": cells, "status": status, "detail": detail}


def collect(pid: int, read_fd: int, timeout: float, most: int) -> tuple[list[dict], str, str]:
    """Read the child's per-cell results until it exits, the wall-clock limit passes or it sends over `most` bytes."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    received = 0
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
            received += len(chunk)
            if received > most:
                status, detail = "killed", f"killed: its results went over {most >> 20} MiB"
                break
            chunks.append(chunk)
    os.close(read_fd)
    if status != "ok":
        kill_tree(pid)
    _, wait_status = os.waitpid(pid, 0)
    if status == "ok" and os.WIFSIGNALED(wait_status):
        signal_name = signal.Signals(os.WTERMSIG(wait_status)).name
        status, detail = "killed", f"killed by {signal_name}" + (" (CPU time limit)" if signal_name == "SIGXCPU" else "")
    elif status == "ok" and os.WEXITSTATUS(wait_status) != 0:
        status, detail = "crashed", f"the trajectory's process exited with status {os.WEXITSTATUS(wait_status)}"
    cells = []
    for line in b"".join(chunks).splitlines():
        try:
            cell = json.loads(line)
        except json.JSONDecodeError:  # cut short by a kill, or written by the code itself
            if status == "ok":
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
        # Dumpable again, unlike the worker: a non-root worker must still see (in /proc) and kill what it leaves.
        libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
        prepare_scratch(request, scratch)
        private_scratch(scratch)
        drop_privileges(scratch)
        drop_capabilities()
        detach_descriptors(write_fd)
        apply_limits(request)
        os.chdir(scratch)
        os.environ["TMPDIR"] = tempfile.tempdir = scratch  # the one place the code may write
        owner = os.getpid()
        with os.fdopen(write_fd, "w") as out:
            try:
                namespace = preloaded(request)
            except Exception as exc:  # a corrupt input image: the trajectory cannot even start
                out.write(json.dumps({"setup_error": f"cannot open the input images: {type(exc).__name__}: {exc}"}) + "\n")
                out.flush()
                os._exit(0)
            for index, code in enumerate(request["cells"]):
                result = run_cell(code, index, namespace, scratch, request)
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


def private_scratch(scratch: str) -> None:
    """A non-root worker cannot hand the trajectory another uid, and its own uid owns the private folders: the
    trajectory gets a mount namespace in which they are read-only, all but its scratch directory."""
    if os.getuid() == 0:  # the trajectory will run as another uid, which file modes already keep out
        return
    check(libc.unshare(CLONE_NEWNS), "a mount namespace for the trajectory")
    check(libc.mount(scratch.encode(), scratch.encode(), None, MS_BIND, None), "the scratch directory a mount")
    for folder in PRIVATE_TMPFS:
        if os.path.isdir(folder):
            read_only(folder, recursive=False)


def drop_privileges(scratch: str) -> None:
    if os.getuid() == 0:
        os.chown(scratch, RUN_AS, RUN_AS)
        for name in os.listdir(scratch):
            os.chown(os.path.join(scratch, name), RUN_AS, RUN_AS)
        os.setgroups([])
        os.setgid(RUN_AS)
        os.setuid(RUN_AS)


def drop_capabilities() -> None:
    """No capability left (a worker in a user namespace keeps its uid, so setuid did not clear them), and none
    to regain: no setuid program may raise the rights again."""

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    if libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) != 0:  # version 3: two 32-bit words
        raise OSError(ctypes.get_errno(), "capset")
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")


def detach_descriptors(write_fd: int) -> None:
    """The worker's protocol pipes and log are not the code's: its fds 0-2 become /dev/null, the rest close."""
    null = os.open(os.devnull, os.O_RDWR)
    for descriptor in (0, 1, 2):
        os.dup2(null, descriptor)
    os.closerange(3, write_fd)
    os.closerange(write_fd + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


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


class OutputLimitExceeded(Exception):
    """The cell printed, or returned in images, more than its limits allow."""


class OutputRejected(Exception):
    """The cell's output is not a file it wrote (a link out of the scratch directory)."""


class BoundedText(io.StringIO):
    """stdout / stderr that stops the code once it printed over the limit, so a flood never fills memory."""

    def __init__(self, stream: str, limit: int) -> None:
        super().__init__()
        self.stream, self.limit, self.overflowed = stream, limit, False

    def write(self, text: str) -> int:
        if self.tell() + len(text) > self.limit:
            self.overflowed = True
            raise OutputLimitExceeded(self.problem())
        return super().write(text)

    def problem(self) -> str:
        return f"{self.stream} over {self.limit >> 10} KiB (max_output_kb)"


def run_cell(code: str, index: int, namespace: dict, scratch: str, request: dict) -> dict:
    before = {name: os.lstat(name).st_mtime_ns for name in os.listdir(scratch)}
    shown = Shown()
    # Plain functions, not bound methods: pyplot sets attributes on its show().
    plt.show = lambda *args, **kwargs: shown.figure()  # type: ignore[assignment]
    Image.Image.show = lambda image, *args, **kwargs: shown.pil(image)  # type: ignore[method-assign]
    streams = {name: BoundedText(name, request["max_output_kb"] << 10) for name in ("stdout", "stderr")}
    error, trace = "", ""
    real_stdout, real_stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = streams["stdout"], streams["stderr"]
    try:
        exec(compile(code, f"<cell {index}>", "exec"), namespace)  # noqa: S102 - isolated, that is the point
    except BaseException as exc:  # SystemExit and KeyboardInterrupt from the code are its errors too
        error = f"{type(exc).__name__}: {exc}"
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))  # from the cell on
    finally:
        sys.stdout, sys.stderr = real_stdout, real_stderr
    overflowed = [stream for stream in streams.values() if stream.overflowed]
    if overflowed and not error:  # the code caught the error and went on
        error = f"OutputLimitExceeded: {overflowed[0].problem()}"
    images: list[bytes] = []
    try:
        images = output_images(shown, scratch, before, request["max_file_mb"] << 20)
    except (OutputLimitExceeded, OutputRejected) as exc:
        error = error or f"{type(exc).__name__}: {exc}"
    return {
        "stdout": streams["stdout"].getvalue()[-TEXT_KEPT["stdout"]:],
        "stderr": streams["stderr"].getvalue()[-TEXT_KEPT["stderr"]:],
        "error": error,
        "traceback": trace,
        "images": [base64.b64encode(data).decode() for data in images],
    }


def output_images(shown: Shown, scratch: str, before: dict[str, int], most_bytes: int) -> list[bytes]:
    """The images the cell showed, then those it saved (new or changed files); each a plain file of the scratch
    directory, within PIL's decompression-bomb pixel limit, all together within `most_bytes`."""
    images = list(shown.images)
    for name in sorted(os.listdir(scratch)):
        if not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        status = os.lstat(name)
        if stat.S_ISLNK(status.st_mode):
            raise OutputRejected(f"{name} is a link to {os.readlink(name)!r}, not an image the code wrote")
        if stat.S_ISREG(status.st_mode) and before.get(name) != status.st_mtime_ns:
            with open(os.open(name, os.O_RDONLY | os.O_NOFOLLOW), "rb") as handle:
                images.append(handle.read(most_bytes + 1))
    if sum(map(len, images)) > most_bytes:
        raise OutputLimitExceeded(f"images over {most_bytes >> 20} MiB (max_file_mb)")
    for data in images:
        check_pixels(data)
    return images


def check_pixels(data: bytes) -> None:
    """A decompression bomb (a small file of a huge image) must not reach whoever decodes the output."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            Image.open(io.BytesIO(data)).close()  # reads the header only; PIL checks the size there
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise OutputLimitExceeded(f"an image is a decompression bomb: {exc}") from None
        except Exception:  # not an image: consistency compares it as such
            pass


if __name__ == "__main__":
    main()
