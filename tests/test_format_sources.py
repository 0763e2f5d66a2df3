"""Readers for the sources beyond the first five: built-in inline specs, recipe specs, LLaMA-Factory registrations."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from conftest import assert_accounting
from curate_testkit.pictures import png_bytes

from curate.cli import main
from curate.errors import UserError
from curate.executor import LocalExecutor
from curate.formats import MalformedRow, format_names, get_format, records, sniff_format
from curate.formats.examples import EXAMPLE_QUESTION, format_example
from curate.recipe import load_recipe
from curate.sample import Image, ImagePart, Message, Sample, TextPart, ToolCall, text
from curate.sandbox.trajectory import code_calls, other_tools

REAL = Path(__file__).parent / "data" / "real"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def read_all(fmt: str, path: Path) -> list[Sample]:
    return [get_format(fmt).parse(record, path.parent) for record in records(path)]


def assert_round_trip(fmt: str, samples: list[Sample], folder: Path, filename: str) -> None:
    """Samples read from the authors' layout survive write -> read in that layout."""
    path = folder / "round_trip" / filename
    path.parent.mkdir()
    get_format(fmt).write(samples, path)
    assert read_all(fmt, path) == samples


def code_trajectory(sample_id: str) -> Sample:
    """A question with an image, a python call answered with text and an image, an answer."""
    return Sample(sample_id, "unit", [
        Message("user", [ImagePart(0), TextPart("How many red pixels?")]),
        Message("assistant", text("<think>Count.</think>"), [ToolCall("python", {"code": "print(3)\nimage_1.show()"}, "call_0")]),
        Message("tool", [TextPart("3\n"), ImagePart(1)], tool_call_id="call_0"),
        Message("assistant", text("<answer>3</answer>")),
    ], [Image(png_bytes(1), "png"), Image(png_bytes(2), "png")], "3")


def search_trajectory(sample_id: str) -> Sample:
    sample = code_trajectory(sample_id)
    sample.messages[3:3] = [Message("assistant", text("Check."), [ToolCall("search", {"query": "red"}, "call_1")]),
                            Message("tool", text("No results."), tool_call_id="call_1")]
    return sample


def crop_trajectory(sample_id: str) -> Sample:
    return Sample(sample_id, "unit", [
        Message("user", [ImagePart(0), TextPart("\nWhat color is the coat?")]),
        Message("assistant", text("<think>Zoom.</think>"),
                [ToolCall("crop", {"bbox_2d": [0.1, 0.2, 0.3, 0.4], "source": "original_image"}, "call_0")]),
        Message("tool", [TextPart("Observation 1:\n"), ImagePart(1)], tool_call_id="call_0"),
        Message("assistant", text("<answer>Orange</answer>")),
    ], [Image(png_bytes(3), "png"), Image(png_bytes(4), "png")], None)


@pytest.mark.parametrize(
    ("fmt", "filename", "make"),
    [
        ("vthinker", "x.jsonl", code_trajectory),
        ("vthinker", "x.parquet", code_trajectory),
        ("pyvision", "x.json", code_trajectory),
        ("pyvision", "x.parquet", code_trajectory),
        ("skywork_r1v4", "x.jsonl", search_trajectory),
        ("skywork_r1v4", "x.parquet", search_trajectory),
        ("minio3", "x.parquet", crop_trajectory),
        ("minio3", "x.json", crop_trajectory),
        ("llamafactory", "dataset_info.json", search_trajectory),
    ],
)
def test_round_trip_keeps_calls_observations_images_answers(tmp_path: Path, fmt: str, filename: str, make: Any) -> None:
    originals = [make("t1"), make("t/2")]
    path = tmp_path / filename
    assert get_format(fmt).write(originals, path) == 2
    back = read_all(fmt, path)
    for original, read in zip(originals, back, strict=True):
        assert read.messages == original.messages
        assert read.images == original.images
        assert (read.id, read.answer) == (original.id, original.answer)
    again = tmp_path / "again" / filename
    again.parent.mkdir()
    get_format(fmt).write(back, again)
    assert read_all(fmt, again) == back


def test_a_layout_without_syntax_for_a_call_refuses_to_write_it(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="sample t1: the minio3 layout has no syntax for a 'python' call"):
        get_format("minio3").write([code_trajectory("t1")], tmp_path / "x.json")


# --- the authors' layouts ------------------------------------------------------------------------


def test_minio3_python_literal_conversations_and_grounding_crop_calls(tmp_path: Path) -> None:
    conversation = [
        {"from": "system", "value": "legacy system"},
        {"from": "human", "value": "<image>\nWhat color is the coat?"},
        {"from": "gpt", "value": "<think>Need a closer look.</think>"
                                 '<grounding>{"bbox_2d": [0.1, 0.2, 0.3, 0.4], "source": "original_image"}</grounding>'},
        {"from": "human", "value": "After the above Action 0, here is the the zoom-in image (Observation 1):\n<image>.\n"
                                   "Continue your reasoning process inside <think> and </think>."},
        {"from": "gpt", "value": "<think>Crop again.</think><grounding>{'bbox_2d': [1, 2, 3, 4], 'source': 'observation_1'}</grounding>"},
        {"from": "human", "value": "After the above Action 1, here is the the zoom-in image (Observation 2):\n<image>."},
        {"from": "gpt", "value": "<think>The crop is enough.</think><answer> Orange. </answer>"},
    ]
    path = tmp_path / "coldstart.parquet"
    pq.write_table(pa.Table.from_pylist([{
        "conversations": repr(conversation),  # a Python literal: single quotes, as the authors store it
        "images": [{"bytes": png_bytes(k), "path": f"{k}.png"} for k in range(3)],
        "image_names": ["root.png", "crop1.png", "crop2.png"], "data_source": "unit", "sample_index": 3, "rollout_index": 4,
    }]), path)
    assert sniff_format(path) == "minio3"
    (sample,) = read_all("minio3", path)
    assert [m.role for m in sample.messages] == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert sample.messages[2].tool_calls == [ToolCall("crop", {"bbox_2d": [0.1, 0.2, 0.3, 0.4], "source": "original_image"}, "call_0")]
    assert sample.messages[4].tool_calls == [ToolCall("crop", {"bbox_2d": [1, 2, 3, 4], "source": "observation_1"}, "call_1")]
    assert sample.messages[3].image_indices == [1] and sample.messages[3].tool_call_id == "call_0"
    assert sample.answer == "Orange." and sample.images[2] == Image(png_bytes(2), "png")
    # crop is not python: the sandbox stages list it and run nothing
    assert code_calls(sample) == [] and other_tools(sample) == ["crop"]
    assert_round_trip("minio3", [sample], tmp_path, "coldstart.parquet")


@pytest.mark.parametrize(
    ("conversations", "defect"),
    [
        ("__import__('pathlib').Path('PWNED').touch()", "'conversations' is neither JSON nor a Python literal"),
        ("[{'from': 'human', 'value': 'hi'", "'conversations' is neither JSON nor a Python literal"),
        ("{'from': 'human'}", "'conversations' must be a non-empty list of turns"),
        ("[{'from': 'robot', 'value': 'hi'}]", "message 0: needs a known role"),
        ("[{'from': 'gpt', 'value': '<grounding>[1, 2]</grounding>'}]", "<grounding> must hold an object, got list"),
        ("[{'from': 'gpt', 'value': '<grounding>{bbox_2d: [1]}</grounding>'}]", "<grounding> is neither JSON nor a Python literal"),
    ],
)
def test_minio3_rows_that_are_not_literals_are_malformed_and_never_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       conversations: str, defect: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MalformedRow, match=defect):
        get_format("minio3").parse({"conversations": conversations, "images": []}, tmp_path)
    assert not (tmp_path / "PWNED").exists()


def test_skywork_r1v4_real_inputs_with_trajectories(tmp_path: Path) -> None:
    """The authors' test cases (one without an image, a blank line at the end) with full responses added."""
    (tmp_path / "demo_image").mkdir()
    lines = (REAL / "skywork_r1v4_test_cases.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines[-1] == "" or (REAL / "skywork_r1v4_test_cases.jsonl").read_text().endswith("\n")
    cases = [json.loads(line) for line in lines if line.strip()]
    for k, case in enumerate(cases):
        if case["image"]:
            (tmp_path / case["image"]).write_bytes(png_bytes(k))
    response = ('<think>\nLook closer.\n</think>\n<tool_call>{"name": "code", "arguments": {"code": "print(\'hello\')"}}</tool_call>\n'
                '<observation>{"result": "hello", "type": "code"}</observation>\n'
                '<think>\nSearch.\n</think>\n<tool_call>{"name": "web_search", "arguments": {"query": "skirt"}}</tool_call>\n'
                '<observation>{"results": ["a red skirt"], "type": "web_search"}</observation>\n'
                "<think>\nDone.\n</think>\n<answer>\nRed.\n</answer>")
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps({**case, "response": {"full_response": response}}, ensure_ascii=False) + "\n\n"
                            for case in cases))  # blank lines between rows too
    assert sniff_format(path) == "skywork_r1v4"
    samples = read_all("skywork_r1v4", path)
    assert len(samples) == len(cases) == 6
    first, no_image = samples[0], samples[5]
    assert first.question == cases[0]["question"] and first.messages[0].image_indices == [0]
    assert no_image.images == [] and no_image.messages[0].image_indices == []
    assert [m.role for m in first.messages] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert first.messages[1].tool_calls == [ToolCall("python", {"code": "print('hello')"}, "call_0")]
    assert first.messages[2] == Message("tool", text("hello"), tool_call_id="call_0")
    assert first.messages[4].text == '{"results": ["a red skirt"], "type": "web_search"}'  # not {result, type}: verbatim
    assert first.answer == "Red."
    assert [c.call.name for c in code_calls(first)] == ["python"] and other_tools(first) == ["web_search"]
    assert_round_trip("skywork_r1v4", samples, tmp_path, "results.jsonl")


def pyvision_row(image: bytes, crop: bytes) -> dict[str, Any]:
    """A result as PyVision's `evaluate_single_data` saves it, with the authors' real prompt."""
    prompt = json.loads((REAL / "pyvision_prompt_template_vis.json").read_text())["vistool_with_img_info"]
    url = "data:image/jpeg;base64,"
    return {
        "id": 0,
        "question": "What is written on the sign?",
        "response": "<answer>\n\\boxed{'STOP'}\n</answer>",
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "<image_clue_0>"}, {"type": "image_url", "image_url": {"url": url + b64(image)}},
                {"type": "text", "text": "</image_clue_0>\n\n"},
                {"type": "text", "text": prompt.format(query="What is written on the sign?", width=8, height=8)}]},
            {"role": "assistant", "content": [{"type": "text", "text":
                "Zoom in.\n<code>\n```python\nw, h = image_clue_0.size\nplt.imshow(image_clue_0.crop((0, 0, w // 2, h)))\nplt.show()\n```\n</code>\n"}]},
            {"role": "user", "content": [
                {"type": "text", "text": "<interpreter>\nText Result:\nNone\nImage Result:\n"},
                {"type": "text", "text": "<image_clue_1>"}, {"type": "image_url", "image_url": {"url": url + b64(crop)}},
                {"type": "text", "text": "</image_clue_1>"}, {"type": "text", "text": "</interpreter>\n"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "It says STOP.\n<answer>\n\\boxed{'STOP'}\n</answer>"}]},
        ],
        "image_paths": ["/mnt/authors/sign.jpg"],
        "ground_truth": "STOP",
    }


def test_pyvision_parts_interpreter_turns_and_image_clue_variables(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps([pyvision_row(png_bytes(5), png_bytes(6))]))
    assert sniff_format(path) == "pyvision"  # its prompt quotes <code> blocks, yet it is not read as DeepEyesV2
    (sample,) = read_all("pyvision", path)
    assert [m.role for m in sample.messages] == ["user", "assistant", "tool", "assistant"]
    (call,) = sample.messages[1].tool_calls
    assert call.code == "w, h = image_1.size\nplt.imshow(image_1.crop((0, 0, w // 2, h)))\nplt.show()"  # the sandbox's names
    assert sample.messages[2].content == [TextPart("\nText Result:\nNone\nImage Result:\n<image_clue_1>"), ImagePart(1),
                                          TextPart("</image_clue_1>")]
    assert sample.images == [Image(png_bytes(5), "png"), Image(png_bytes(6), "png")]
    assert sample.answer == "STOP" and sample.id == "0"
    assert_round_trip("pyvision", [sample], tmp_path, "results.json")
    get_format("pyvision").write([sample], tmp_path / "back.json")
    written = json.loads((tmp_path / "back.json").read_text())[0]["messages"][1]["content"]
    assert "image_clue_0.crop" in "".join(part.get("text", "") for part in written)  # the authors' names again


def test_vthinker_inline_sandbox_outputs_with_the_real_prompt(tmp_path: Path) -> None:
    (tmp_path / "q.png").write_bytes(png_bytes(7))
    (tmp_path / "aux.png").write_bytes(png_bytes(8))
    row = {"messages": [
        {"role": "system", "content": (REAL / "vthinker_prompt.txt").read_text()},
        {"role": "user", "content": "<image>Find the angle."},
        {"role": "assistant", "content": "<think>Draw a line.<code>\n```python\nimport matplotlib.pyplot as plt\nprint('aux.png')\n```\n</code>"
                                         "<sandbox_output>aux.png<image></sandbox_output>Now it is clear.</think><answer>30</answer>"},
    ], "images": ["q.png", "aux.png"]}
    path = tmp_path / "vthinker.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assert sniff_format(path) == "vthinker"  # its system prompt quotes <code> and <sandbox_output>
    (sample,) = read_all("vthinker", path)
    assert [m.role for m in sample.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert sample.messages[0].tool_calls == [] and "<code>" in sample.messages[0].text
    assert sample.messages[3] == Message("tool", [TextPart("aux.png"), ImagePart(1)], tool_call_id="call_0")
    assert sample.messages[4].text == "Now it is clear.</think><answer>30</answer>" and sample.answer == "30"
    assert_round_trip("vthinker", [sample], tmp_path, "vthinker.jsonl")


# --- LLaMA-Factory registrations ---------------------------------------------------------------------


def test_deepeyesv2_registration_with_a_trailing_comma_reads_every_registered_file(tmp_path: Path) -> None:
    shutil.copy(REAL / "deepeyesv2_dataset_info.json", tmp_path / "dataset_info.json")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "q.png").write_bytes(png_bytes(9))
    for part in range(5):
        rows = [{"messages": [
            {"role": "user", "content": f"<image>Question {part}.{k}?"},
            {"role": "assistant", "content": "<code>\n```python\nprint(1)\n```\n</code>"},
            {"role": "user", "content": "Code execution result:\nstdout:\n```\n1\n```\nstderr:\n```\n\n```"},
            {"role": "assistant", "content": "<answer>1</answer>"}], "images": ["imgs/q.png"]} for k in range(2)]
        (tmp_path / f"sft_part_{part}.json").write_text(json.dumps(rows))
    path = tmp_path / "dataset_info.json"
    assert sniff_format(path) == "llamafactory"
    samples = read_all("llamafactory", path)
    assert [s.source for s in samples] == [f"deepeyesv2_p{p}" for p in range(1, 6) for _ in range(2)]
    assert [s.question for s in samples][:3] == ["Question 0.0?", "Question 0.1?", "Question 1.0?"]
    first = samples[0]
    assert first.messages[1].tool_calls == [ToolCall("python", {"code": "print(1)"}, "call_0")]
    assert first.messages[2] == Message("tool", text("1"), tool_call_id="call_0")
    assert first.images == [Image(png_bytes(9), "png")]
    assert_round_trip("llamafactory", samples, tmp_path, "dataset_info.json")


def test_registration_mappings_default_sharegpt_tags_and_system_column(tmp_path: Path) -> None:
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "agent": {"file_name": "agent.jsonl", "formatting": "sharegpt",
                  "columns": {"messages": "conversations", "system": "system", "images": "pics"}},
        "custom": {"file_name": "custom.json", "formatting": "sharegpt",
                   "columns": {"messages": "chat"}, "tags": {"role_tag": "who", "content_tag": "said", "user_tag": "me", "assistant_tag": "bot"}},
    }))
    (tmp_path / "agent.jsonl").write_text(json.dumps({"system": "Be brief.", "pics": [b64(png_bytes(1))], "conversations": [
        {"from": "human", "value": "<image>Sum?"},
        {"from": "gpt", "value": '<tool_call>{"name": "calculator", "arguments": {"expr": "1+1"}}</tool_call>'},
        {"from": "observation", "value": "2"},
        {"from": "function_call", "value": '{"name": "calculator", "arguments": {"expr": "2*2"}}'},
        {"from": "observation", "value": "4"},
        {"from": "gpt", "value": "2"}]}) + "\n\n")
    (tmp_path / "custom.json").write_text(json.dumps([{"chat": [{"who": "me", "said": "hi"}, {"who": "bot", "said": "hello"}]}]))
    agent, custom = read_all("llamafactory", tmp_path / "dataset_info.json")
    assert [m.role for m in agent.messages] == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert agent.messages[4].tool_calls == [ToolCall("calculator", {"expr": "2*2"}, "call_1")]
    assert agent.messages[0].text == "Be brief." and agent.messages[1].image_indices == [0]
    assert agent.messages[3] == Message("tool", text("2"), tool_call_id="call_0")
    assert other_tools(agent) == ["calculator"]
    assert [(m.role, m.text) for m in custom.messages] == [("user", "hi"), ("assistant", "hello")]
    assert (agent.source, custom.source) == ("agent", "custom")


@pytest.mark.parametrize(
    ("registration", "message"),
    [
        ({"hub": {"hf_hub_url": "org/data"}, "x": {"file_name": "a.json"}}, "dataset 'hub' has no 'file_name'"),
        ({"a": {"file_name": "a.json"}}, "dataset 'a' uses 'alpaca' formatting; only 'sharegpt'"),
        ({"a": {"file_name": "gone.json", "formatting": "sharegpt"}}, "dataset 'a': file not found"),
    ],
)
def test_registrations_that_cannot_be_read_stop_with_one_line(tmp_path: Path, registration: dict, message: str) -> None:
    (tmp_path / "dataset_info.json").write_text(json.dumps(registration))
    with pytest.raises(UserError, match=message):
        list(records(tmp_path / "dataset_info.json"))


# --- tolerant parsing -------------------------------------------------------------------------------


def test_trailing_commas_and_blank_lines_are_read_other_defects_are_malformed(tmp_path: Path) -> None:
    row = '{"messages": [{"role": "user", "content": "a, b ,]"}, {"role": "assistant", "content": "x"},],}'
    (tmp_path / "rows.json").write_text(f"[\n{row},\n]\n")
    (tmp_path / "rows.jsonl").write_text(f"\n{row}\n\n  \n{row}\n")
    for name in ("rows.json", "rows.jsonl"):
        samples = read_all("messages", tmp_path / name)
        assert [s.messages[0].text for s in samples] == ["a, b ,]"] * (1 if name == "rows.json" else 2)  # commas in strings kept
    with pytest.raises(MalformedRow, match="bad JSON: Expecting property name"):
        get_format("messages").parse('{"messages": [], oops}', tmp_path)
    (tmp_path / "broken.json").write_text('[{"a": 1},, ]')
    with pytest.raises(UserError, match="broken.json: not valid JSON"):
        list(records(tmp_path / "broken.json"))


# --- sniffing --------------------------------------------------------------------------------------


def test_sniffing_tells_the_new_layouts_apart_and_asks_when_two_match(tmp_path: Path) -> None:
    files = {"vthinker": "v.jsonl", "pyvision": "p.json", "skywork_r1v4": "s.jsonl", "minio3": "m.json", "thyme": "t.jsonl",
             "deepeyes": "d.json"}
    for fmt, name in files.items():
        sample = crop_trajectory("c") if fmt == "minio3" else search_trajectory("s") if fmt in ("skywork_r1v4", "deepeyes") \
            else code_trajectory("c")
        get_format(fmt).write([sample], tmp_path / name)
        assert sniff_format(tmp_path / name) == fmt, name
    both = {"messages": [{"role": "user", "content": "<interpreter>x</interpreter>"},
                         {"role": "assistant", "content": "<sandbox_output>y</sandbox_output>"}]}
    (tmp_path / "both.jsonl").write_text(json.dumps(both) + "\n")
    with pytest.raises(UserError, match=r"candidates: pyvision, vthinker\); pass --format"):
        sniff_format(tmp_path / "both.jsonl")


# --- specs in recipes --------------------------------------------------------------------------------


def write_recipe(folder: Path, fmt: Any) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"input": {"paths": ["rows.jsonl"], "format": fmt},
                                    "stages": [{"format": {}}], "output": {"kind": "sft"}}))
    return path


TOOLRL_SPEC = {"inline": {
    "source": "toolrl", "messages": "dialog", "role_key": "speaker", "content_key": "text",
    "roles": {"Q": "user", "A": "assistant", "T": "tool"},
    "calls": [{"tag": "<run>", "body": "python"}, {"tag": "api", "body": "json"}],
    "tool_names": {"run_python": "python"}, "answer_tag": "final",
}}


def test_a_recipe_spec_reads_a_new_layout_without_code(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text(json.dumps({"dialog": [
        {"speaker": "Q", "text": "2+2?"},
        {"speaker": "A", "text": 'Compute.<run>print(2+2)</run><api>{"name": "weather", "arguments": {"city": "Oslo"}}</api>'},
        {"speaker": "T", "text": "4"}, {"speaker": "T", "text": "sunny"},
        {"speaker": "A", "text": "<final>4</final>"}]}) + "\n")
    recipe = load_recipe(write_recipe(tmp_path, TOOLRL_SPEC))
    fmt = get_format(recipe.inputs[0].format)  # what a worker process gets: the spec travels as a name
    (sample,) = read_all(recipe.inputs[0].format, tmp_path / "rows.jsonl")
    assert sample.source == "toolrl" and sample.answer == "4"
    assert sample.messages[1].tool_calls == [ToolCall("python", {"code": "print(2+2)"}, "call_0"),
                                             ToolCall("weather", {"city": "Oslo"}, "call_1")]
    assert [m.tool_call_id for m in sample.messages if m.role == "tool"] == ["call_0", "call_1"]
    get_format(recipe.inputs[0].format).write([sample], tmp_path / "back.jsonl")
    assert read_all(recipe.inputs[0].format, tmp_path / "back.jsonl") == [sample]
    assert fmt is get_format(recipe.inputs[0].format)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"inline": {"cals": []}}, "unknown option 'inline.cals' (did you mean 'calls'?)"),
        ({"inline": {"calls": [{"tagg": "code"}]}}, "unknown option 'inline.calls.0.tagg' (did you mean 'tag'?)"),
        ({"inline": {"observation": {"rol": "user"}}}, "unknown option 'inline.observation.rol' (did you mean 'role'?)"),
        ({"inlin": {}}, "unknown option 'inlin' (did you mean 'inline'?)"),
        ({"inline": {"layout": "tree"}}, "field 'inline.layout'"),
        ({"inline": {"calls": [{"tag": "crop", "body": "arguments"}]}}, "needs 'tool'"),
        ({"inline": {"layout": "response"}}, "observation role must be 'assistant'"),
        ({"inline": {"calls": [{"tag": "<a b>"}]}}, "is not a tag name"),
    ],
)
def test_recipe_specs_are_validated_like_stage_options(tmp_path: Path, spec: dict, message: str) -> None:
    (tmp_path / "rows.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match=f"recipe.yaml: input format: .*{re.escape(message)}"):
        load_recipe(write_recipe(tmp_path, spec))




def test_a_run_reads_a_spec_file_and_a_registration_through_the_workers(tmp_path: Path) -> None:
    """Two workers parse the rows: the spec travels to them as a format name; bad rows are rejected as malformed."""
    good = {"dialog": [{"speaker": "Q", "text": "2+2?"}, {"speaker": "A", "text": "<run>print(2+2)</run>"},
                       {"speaker": "T", "text": "4"}, {"speaker": "A", "text": "<final>4</final>"}]}
    (tmp_path / "rows.jsonl").write_text("\n".join([json.dumps(good), "", '{"dialog": "[oops"}', json.dumps(good)]) + "\n")
    (tmp_path / "dataset_info.json").write_text('{"a": {"file_name": "a.jsonl", "formatting": "sharegpt",},}')
    (tmp_path / "a.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"},
                                                                     {"from": "gpt", "value": "<answer>hello</answer>"}]}) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"input": {"paths": [{"path": "rows.jsonl", "format": TOOLRL_SPEC}, "dataset_info.json"]},
                                      "stages": [{"format": {}}], "output": {"kind": "sft"}, "batch_size": 1}))
    manifest = LocalExecutor(load_recipe(recipe), tmp_path / "run", workers=2, cache_path=tmp_path / "cache.sqlite",
                             progress=False).run()
    assert_accounting(tmp_path / "run")
    assert (manifest["input_rows"], manifest["kept_rows"]) == (4, 3)
    (bad,) = pq.read_table(tmp_path / "run" / "rejected").to_pylist()
    assert (bad["stage"], bad["reason"]) == ("read", "malformed")
    assert bad["detail"].startswith("rows.jsonl row 1: 'dialog' is neither JSON nor a Python literal")
    kept = [get_format("messages").parse(row, tmp_path) for row in records(next((tmp_path / "run" / "kept").glob("*.parquet")))]
    assert sorted(s.source for s in kept) == ["a", "toolrl", "toolrl"]
    assert [c.name for s in kept if s.source == "toolrl" for _, c in s.indexed_tool_calls] == ["python", "python"]


# --- curate formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", format_names())
def test_each_formats_example_row_reads_back_with_its_call(tmp_path: Path, fmt: str) -> None:
    example = format_example(fmt, tmp_path)
    (sample,) = read_all(fmt, example.path)
    assert sample.question == EXAMPLE_QUESTION and sample.images
    if fmt != "verl":  # an RL prompt has no trajectory
        assert [call.name for _, call in sample.indexed_tool_calls] in (["python"], ["crop"])


def test_formats_command_lists_every_format_and_spec_with_an_example() -> None:
    result = CliRunner().invoke(main, ["formats"])
    assert result.exit_code == 0, result.output
    listed = [line.split()[0] for line in result.output.splitlines() if line and not line.startswith(" ")]
    assert listed == format_names()
    assert result.output.count("  example") == len(format_names())
    assert result.output.count("  spec: {inline: ") == 6  # every spec-based reader shows its spec, ready for a recipe
    assert "image_clue_" in result.output and "\"conversations\": \"[{'from'" in result.output
