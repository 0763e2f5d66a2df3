"""The sandbox, attacked for real at both isolation levels, through the execution_failure stage."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import assert_accounting, png_bytes

from curate.executor import LocalExecutor
from curate.formats import get_format
from curate.recipe import load_recipe
from curate.sample import Image, ImagePart, Message, Sample, TextPart, ToolCall, text
from curate.sandbox import SANDBOX_UIDS, Sandbox, SandboxOptions, isolation_level

SECRET = "sk-curate-test-7f3a9e1b"
LEVELS = [
    pytest.param("bwrap", marks=pytest.mark.skipif(
        not shutil.which("bwrap") and not os.environ.get("CI"), reason="bubblewrap not installed (CI installs it)")),
    "namespace",
]


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


@pytest.mark.parametrize("level", LEVELS)
def test_attacks_are_contained_and_rejected_with_the_right_reason(tmp_path: Path, level: str, listener: socket.socket,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CURATE_TEST_SECRET", SECRET)
    private = tmp_path / "dot_ssh" / "id_rsa"  # a host file only root may read
    private.parent.mkdir()
    private.write_text(SECRET)
    private.parent.chmod(0o700)
    outside = tmp_path / "written_from_sandbox.txt"
    port = listener.getsockname()[1]
    attacks = {
        "ok": ("print(image_1.size)", "(32, 32)", None),
        "raises": ("print(1 / 0)", "", "code_error"),
        "syntax": ("print('open", "", "syntax_error"),
        "forever": ("while True:\n    pass", "", "timeout"),
        "memory": ("block = bytearray(10 * 1024 ** 3)", "", "limit_exceeded"),
        "fork_bomb": ("import os\nwhile True:\n    os.fork()", "", "limit_exceeded"),
        "fill_disk": ("with open('big.bin', 'wb') as f:\n    for _ in range(1000):\n        f.write(b'0' * 2 ** 20)", "", "limit_exceeded"),
        "socket": (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", "", "code_error"),
        "read_key": (f"print(open({str(private)!r}).read())", "", "code_error"),
        "read_env": ("import os\nprint(os.environ['CURATE_TEST_SECRET'])", "", "code_error"),
        "write_outside": (f"open({str(outside)!r}, 'w').write('pwned')", "", "code_error"),
        "orphan": ("import subprocess\nsubprocess.Popen(['sleep', '300'], start_new_session=True)\nprint('left a process')",
                   "left a process", None),
    }
    source = tmp_path / "attacks.jsonl"
    get_format("messages").write([trajectory(name, code, obs) for name, (code, obs, _) in attacks.items()], source)
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
    for name, (_, _, reason) in attacks.items():
        if reason is None:
            assert name in kept, rejected.get(name)
        else:
            assert rejected[name]["reason"] == reason, (name, rejected[name]["detail"])
    assert "<cell 0>" in rejected["raises"]["detail"] and "ZeroDivisionError" in rejected["raises"]["detail"]
    # The host is unchanged: no connection, no file written, no secret anywhere, no process left.
    with pytest.raises(socket.timeout):
        listener.accept()
    assert not outside.exists()
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    time.sleep(0.2)
    assert not [p.info for p in psutil.process_iter(["pid", "uids", "cmdline"]) if p.info["uids"].real in SANDBOX_UIDS]


@pytest.mark.parametrize("level", LEVELS)
def test_cells_share_state_see_images_and_return_shown_and_saved_images(level: str) -> None:
    with Sandbox(SandboxOptions(isolation=level, parallelism=1)) as sandbox:
        assert sandbox.level == isolation_level(level)
        result = sandbox.run(
            [
                "crop = image_1.crop((0, 0, 16, 16))\nwidth = crop.size[0]",
                "print(width * 2)\ncrop.save('crop.png')",
                "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()\nimport os\nprint(sorted(os.listdir('.')))",
            ],
            {"image_1.png": png_bytes(4), "chart.png": png_bytes(5)},
            ["image_1.png"],
        )
    assert result.status == "ok"
    assert [cell.error for cell in result.cells] == ["", "", ""]
    assert result.cells[1].stdout == "32\n" and len(result.cells[1].images) == 1
    assert result.cells[1].images[0].startswith(b"\x89PNG")
    assert len(result.cells[2].images) == 1  # the figure shown
    assert result.cells[2].stdout.strip() == "['chart.png', 'crop.png', 'image_1.png']"


@pytest.mark.parametrize("level", LEVELS)
def test_trajectories_are_isolated_from_each_other(level: str) -> None:
    with Sandbox(SandboxOptions(isolation=level, parallelism=1)) as sandbox:
        first = sandbox.run(["secret = 42\nopen('note.txt', 'w').write('x')\nprint('ok')"])
        second = sandbox.run(["import os\nprint('secret' in globals(), os.path.exists('note.txt'))"])
    assert first.cells[0].stdout == "ok\n"
    assert second.cells[0].stdout == "False False\n"


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


def test_bwrap_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="bwrap is not installed"):
        isolation_level("bwrap")
    assert isolation_level("auto") == "namespace"


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
