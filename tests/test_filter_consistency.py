"""consistency on real re-execution: hallucinated outputs caught, honest variation tolerated."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from curate_testkit.pictures import png_bytes
from PIL import Image as PILImage
from PIL import ImageOps

from curate.sample import Image, ImagePart, Message, Sample, TextPart, ToolCall, text
from curate.sandbox.compare import same_output, tokens
from curate.stage import StageContext
from curate.filters.consistency import Consistency
from curate.filters.execution_failure import ExecutionFailure


def sample(code: str, observation: str, observation_images: list[bytes] | None = None, tool: str = "python") -> Sample:
    images = [Image(png_bytes(9))] + [Image(data) for data in observation_images or []]
    arguments = {"code": code} if tool == "python" else {"query": code}
    return Sample("s", "t", [
        Message("user", [ImagePart(0), TextPart("q")]),
        Message("assistant", text("run"), [ToolCall(tool, arguments, "c")]),
        Message("tool", text(observation) + [ImagePart(1 + k) for k in range(len(observation_images or []))], tool_call_id="c"),
        Message("assistant", text("<answer>x</answer>")),
    ], images)


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Consistency:
    consistency = Consistency(Consistency.Options(parallelism=2, timeout=10, cpu_seconds=5))
    consistency.setup(StageContext(Path("unused"), tmp_path_factory.mktemp("scratch")))
    yield consistency
    consistency.teardown()


def crop_png() -> bytes:
    image = PILImage.open(io.BytesIO(png_bytes(9))).crop((0, 0, 16, 16))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("code", "recorded"),
    [
        ("print(2 + 3)", "5\n"),
        ("print(2.5)", "2.50"),  # trailing zeros
        ("print(0.1 + 0.2)", "0.3"),  # float noise
        ("import numpy as np\nprint(np.array([1.0, 2.0]))", "array([1., 2.])"),  # numpy reprs
        ("print('a   b\\n\\n c')", "a b c"),  # whitespace
        ("print(object())", "<object object at 0x7f0123456789>"),  # memory addresses
        ("import datetime\nprint(datetime.datetime.now())", "2024-01-01 10:00:00.123456"),  # timestamps
        ("print(3)", "Code execution result:\nstdout:\n```\n3\n```\nstderr:\n```\nwarning\n```"),  # DeepEyesV2 layout
    ],
)
def test_faithful_observations_are_kept(stage: Consistency, code: str, recorded: str) -> None:
    (verdict,) = stage.process([sample(code, recorded)])
    assert verdict.keep, verdict.detail


def test_altered_number_is_rejected_with_a_diff(stage: Consistency) -> None:
    hallucinated = sample("prices = [2.5, 3.25]\nprint(sum(prices))", "6.75\n")
    (verdict,) = stage.process([hallucinated])
    assert (verdict.keep, verdict.reason) == (False, "inconsistent_output")
    assert "- 6.75" in verdict.detail and "+ 5.75" in verdict.detail and verdict.detail.startswith("call 0 (message 1)")
    comparison = hallucinated.meta["consistency"]["comparisons"][0]
    assert (comparison["recorded"], comparison["actual"]) == ("6.75\n", "5.75\n")


def test_images_compared_by_perceptual_hash(stage: Consistency) -> None:
    code = "crop = image_1.crop((0, 0, 16, 16))\ncrop.save('crop.png')"
    faithful = sample(code, "", [crop_png()])
    inverted = io.BytesIO()
    ImageOps.invert(PILImage.open(io.BytesIO(crop_png())).convert("RGB")).save(inverted, format="PNG")
    altered = sample(code, "", [inverted.getvalue()])
    missing = sample(code, "")
    kept, rejected, no_image = stage.process([faithful, altered, missing])
    assert kept.keep, kept.detail
    assert (rejected.keep, rejected.reason) == (False, "inconsistent_image") and "phash distances" in rejected.detail
    assert (no_image.keep, no_image.reason) == (False, "inconsistent_image") and "0 recorded image(s) vs 1 produced" in no_image.detail


def test_unseeded_randomness_is_recognised_not_counted(stage: Consistency) -> None:
    random_output = sample("import random\nprint(random.random())", "0.123456")
    seeded_but_wrong = sample("import random\nrandom.seed(0)\nprint(random.random())", "0.123456")
    kept, rejected = stage.process([random_output, seeded_but_wrong])
    assert kept.keep and random_output.meta["consistency"]["nondeterministic"] == [0]
    assert not rejected.keep and seeded_but_wrong.meta["consistency"]["nondeterministic"] == []


def test_non_code_tools_are_left_alone() -> None:
    search = sample("weather in Paris", "sunny", tool="search")
    failure = ExecutionFailure(ExecutionFailure.Options(parallelism=1))
    failure.setup(StageContext(Path("unused"), Path("unused")))
    try:
        (verdict,) = failure.process([search])
    finally:
        failure.teardown()
    assert verdict.keep
    assert search.meta["execution_failure"]["other_tools"] == ["search"] and search.meta["execution_failure"]["code_calls"] == 0


def test_execution_is_reused_between_the_two_stages(stage: Consistency) -> None:
    trajectory = sample("print(7)", "7")
    failure = ExecutionFailure(ExecutionFailure.Options(parallelism=1))
    failure.setup(StageContext(Path("unused"), Path("unused")))
    try:
        assert failure.process([trajectory])[0].keep
    finally:
        failure.teardown()
    record = trajectory.memo["sandbox"]
    record["cells"][0]["stdout"] = "7\n"  # a marker: a fresh execution would not carry it over
    record["cells"][0]["marker"] = True
    assert stage.process([trajectory])[0].keep
    assert trajectory.memo["sandbox"]["cells"][0].get("marker") is True
    # Run-time memory, not data: what a shard gets of the sample carries none of it.
    assert "sandbox" not in trajectory.meta and "marker" not in json.dumps(trajectory.to_row()["meta"])


def test_tokens_and_tolerance() -> None:
    assert tokens("array([1., 2.], dtype=float32)") == ["1.", "2."]
    assert same_output("x = 1.0000001", "x = 1.0", rel_tol=1e-6)
    assert not same_output("x = 1.001", "x = 1.0", rel_tol=1e-6)
    assert not same_output("total: 5", "total: 5 6")
    assert not same_output("apple", "pear")
