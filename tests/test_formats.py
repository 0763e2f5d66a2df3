from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import png_bytes

from curate.errors import UserError
from curate.formats import MalformedRow, get_format, records, sniff_format
from curate.sample import Image, ImagePart, Message, Sample, TextPart, ToolCall, text


def trajectory(sample_id: str = "t1") -> Sample:
    """Question with an image, a python call returning text and an image, a search call, an answer."""
    return Sample(
        id=sample_id,
        source="unit",
        messages=[
            Message("user", [ImagePart(0), TextPart("How many red pixels are in the chart?")]),
            Message("assistant", text("<think>Count them.</think>\n"),
                    [ToolCall("python", {"code": "import numpy as np\nprint(3)\nimage_1.save('a.png')"})]),
            Message("tool", [TextPart("3\n"), ImagePart(1)]),
            Message("assistant", text("Let me double-check online."), [ToolCall("search", {"query": "red pixels"})]),
            Message("tool", text("No results.")),
            Message("assistant", text("<answer>3</answer>")),
        ],
        images=[Image(png_bytes(1), "png"), Image(png_bytes(2), "png")],
        answer="3",
    )


def read_all(fmt: str, path: Path) -> list[Sample]:
    return [get_format(fmt).parse(record, path.parent) for record in records(path)]


def without_call_ids(sample: Sample) -> list[Message]:
    """Inline formats have no call ids; compare everything else."""
    return [replace(m, tool_calls=[replace(c, id="") for c in m.tool_calls], tool_call_id="") for m in sample.messages]


@pytest.mark.parametrize(
    ("fmt", "filename", "keeps_ids"),
    [
        ("messages", "x.jsonl", True),
        ("messages", "x.parquet", True),
        ("metis_coldstart", "x.parquet", False),
        ("deepeyes", "x.json", False),
        ("deepeyes", "x.jsonl", False),
        ("thyme", "x.jsonl", False),
    ],
)
def test_trajectory_round_trip_keeps_calls_observations_images(tmp_path: Path, fmt: str, filename: str,
                                                                keeps_ids: bool) -> None:
    original = trajectory()
    if keeps_ids:  # OpenAI-style formats carry call ids and link observations to them
        original.messages[1].tool_calls[0].id, original.messages[2].tool_call_id = "c1", "c1"
    path = tmp_path / filename
    assert get_format(fmt).write([original, trajectory("t2")], path) == 2
    first, second = read_all(fmt, path)
    assert first.id == "t1" and second.id == "t2"
    assert [im.data for im in first.images] == [im.data for im in original.images]
    assert first.answer == "3"
    if keeps_ids:
        assert first.messages == original.messages
    else:
        assert without_call_ids(first) == without_call_ids(original)
    # A second round trip is stable.
    get_format(fmt).write([first], tmp_path / f"again-{filename}")
    assert read_all(fmt, tmp_path / f"again-{filename}")[0].messages == first.messages


@pytest.mark.parametrize("ground_truth", ["B", ["3", "three"]])
def test_verl_round_trip_keeps_prompt_images_ground_truth(tmp_path: Path, ground_truth: str | list[str]) -> None:
    prompt = Sample("p1", "chartqa", [Message("system", text("Be efficient.")),
                                      Message("user", [ImagePart(0), TextPart("\nWhich bar is tallest?")])],
                    [Image(png_bytes(5), "png")], ground_truth,
                    {"verl": {"ability": "perception", "reward_style": "rule", "extra_info": {"index": 7, "pass8": 0.5}}})
    path = tmp_path / "rl.parquet"
    get_format("verl").write([prompt], path)
    (back,) = read_all("verl", path)
    assert back.messages == prompt.messages and back.images == prompt.images and back.answer == ground_truth
    assert back.id == "p1" and back.source == "chartqa"
    assert back.meta["verl"]["ability"] == "perception"
    assert back.meta["verl"]["extra_info"]["pass8"] == 0.5 and back.meta["verl"]["extra_info"]["index"] == 7
    loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert loaded.column_names == ["data_source", "prompt", "images", "ability", "reward_model", "extra_info"]
    assert loaded[0]["prompt"][1]["content"] == "<image>\nWhich bar is tallest?"
    assert loaded[0]["images"][0]["bytes"] == png_bytes(5)


def test_sft_parquet_loads_with_datasets(tmp_path: Path) -> None:
    path = tmp_path / "sft.parquet"
    get_format("messages").write([trajectory("a"), trajectory("b")], path)
    loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert loaded.column_names == ["id", "source", "messages", "images", "answer", "meta"]
    call = loaded[0]["messages"][1]["tool_calls"][0]["function"]
    assert call["name"] == "python" and json.loads(call["arguments"])["code"].startswith("import numpy")
    assert [im["bytes"] for im in loaded[0]["images"]] == [png_bytes(1), png_bytes(2)]


def test_deepeyes_real_layout(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "q.png").write_bytes(png_bytes(3))
    (tmp_path / "imgs" / "crop.png").write_bytes(png_bytes(4))
    row = {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "<image>\nWhat is written on the sign?"},
            {"role": "assistant", "content": "<think>Zoom in.</think>\n<code>\n```python\ncrop = image_1.crop((0, 0, 8, 8))\ncrop.show()\n```\n</code>"},
            {"role": "user", "content": "Code execution result:\nstdout:\n```\n\n```\nstderr:\n```\n\n```\n<image>"},
            {"role": "assistant", "content": '<tool_call>{"name": "search", "arguments": {"query": "sign text"}}</tool_call>'},
            {"role": "user", "content": "<tool_response>A sign that says STOP.</tool_response>"},
            {"role": "assistant", "content": "<think>Done.</think>\n<answer>STOP</answer>"},
        ],
        "images": ["imgs/q.png", "imgs/crop.png"],
    }
    sample = get_format("deepeyes").parse(row, tmp_path)
    assert [m.role for m in sample.messages] == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert sample.messages[2].tool_calls == [ToolCall("python", {"code": "crop = image_1.crop((0, 0, 8, 8))\ncrop.show()"})]
    assert sample.messages[2].text == "<think>Zoom in.</think>\n"
    assert sample.messages[3].image_indices == [1] and sample.messages[3].text.startswith("\n")
    assert sample.messages[4].tool_calls == [ToolCall("search", {"query": "sign text"})]
    assert sample.messages[5].text == "A sign that says STOP."
    assert [im.data for im in sample.images] == [png_bytes(3), png_bytes(4)]


def test_thyme_real_layout() -> None:
    b64 = base64.b64encode(png_bytes(6)).decode()
    row = {
        "image": [b64, base64.b64encode(png_bytes(7)).decode()],
        "question": '<image>\nUser Image Path: "/data/a.png"\nWhat color is the car?',
        "response": "<think>Crop the car.<code>\n```python\nimg = image_1.crop((0, 0, 4, 4))\nimg.save('c.png')\nprint('c.png')\n```\n</code>"
                    "<sandbox_output>c.png\n<image></sandbox_output>It is red.</think><answer>red</answer>",
    }
    sample = get_format("thyme").parse(json.dumps(row), Path("."))
    assert [m.role for m in sample.messages] == ["user", "assistant", "tool", "assistant"]
    assert sample.messages[1].tool_calls[0].code == "img = image_1.crop((0, 0, 4, 4))\nimg.save('c.png')\nprint('c.png')"
    assert sample.messages[2].content == [TextPart("c.png\n"), ImagePart(1)]
    assert sample.answer == "red" and 'User Image Path: "/data/a.png"' in sample.question


def test_metis_coldstart_real_layout() -> None:
    turns = [
        {"role": "system", "content": "You are an efficient problem-solving agent."},
        {"role": "user", "content": "<image>What is 2+2 on the board?"},
        {"role": "assistant", "content": '<reason>Compute.</reason><tool_call>{"name": "python", "arguments": {"code": "print(2+2)"}}</tool_call>'},
        {"role": "user", "content": "<tool_response>4\n</tool_response>"},
        {"role": "assistant", "content": "<reason>It is 4.</reason><answer>4</answer>"},
    ]
    row = {"messages": json.dumps(turns), "images": [base64.b64encode(png_bytes(8)).decode()]}
    sample = get_format("metis_coldstart").parse(row, Path("."))
    assert [m.role for m in sample.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert sample.messages[2].tool_calls == [ToolCall("python", {"code": "print(2+2)"})]
    assert sample.messages[3].text == "4\n"
    assert sample.images[0].data == png_bytes(8) and sample.images[0].format == "png"


def test_messages_openai_layout_with_string_arguments_and_relative_path(tmp_path: Path) -> None:
    (tmp_path / "pic.png").write_bytes(png_bytes(9))
    row = {
        "messages": [
            {"role": "user", "content": "<image>Area?"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "x", "type": "function", "function": {"name": "python", "arguments": '{"code": "print(6)"}'}}]},
            {"role": "tool", "tool_call_id": "x", "content": [{"type": "text", "text": "6"},
                                                              {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png_bytes(10)).decode()}}]},
            {"role": "assistant", "content": "6"},
        ],
        "images": ["pic.png"],
        "answer": "6",
    }
    sample = get_format("messages").parse(json.dumps(row), tmp_path)
    assert sample.messages[1].tool_calls == [ToolCall("python", {"code": "print(6)"}, "x")]
    assert sample.messages[2].tool_call_id == "x" and sample.messages[2].image_indices == [1]
    assert [im.data for im in sample.images] == [png_bytes(9), png_bytes(10)]


@pytest.mark.parametrize(
    ("fmt", "row", "defect"),
    [
        ("messages", "{not json", "bad JSON"),
        ("messages", {"answer": "1"}, "missing field 'messages'"),
        ("messages", {"messages": "hello"}, "'messages' must be a non-empty list"),
        ("messages", {"messages": [{"role": "robot", "content": "hi"}]}, "message 0: unknown role 'robot'"),
        ("messages", {"messages": [{"role": "user", "content": "<image>hi"}], "images": ["data:image/png;base64,@@@"]},
         "image 0: undecodable base64"),
        ("messages", {"messages": [{"role": "user", "content": "<image>hi"}], "images": ["gone.png"]}, "image 0: file not found: gone.png"),
        ("messages", {"messages": [{"role": "user", "content": "<image><image>hi"}], "images": []}, "more <image> placeholders"),
        ("messages", {"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"function": {"name": "python", "arguments": "{bad"}}]}]},
         "message 0 tool call 0: arguments are not valid JSON"),
        ("metis_coldstart", {"messages": "[{broken"}, "'messages' is not valid JSON"),
        ("deepeyes", {"messages": [{"role": "assistant", "content": "<tool_call>{nope}</tool_call>"}]}, "<tool_call> is not valid JSON"),
        ("thyme", {"question": "q"}, "needs string fields 'question' and 'response'"),
        ("verl", {"prompt": [], "reward_model": {"ground_truth": "1"}}, "'prompt' must be a non-empty list"),
        ("verl", {"prompt": [{"role": "user", "content": "q"}], "reward_model": {}}, "'reward_model' must be an object with 'ground_truth'"),
        ("verl", ["not", "a", "row"], "row is a list, expected an object"),
    ],
)
def test_malformed_rows_name_their_defect(tmp_path: Path, fmt: str, row: object, defect: str) -> None:
    with pytest.raises(MalformedRow) as error:
        get_format(fmt).parse(row if isinstance(row, str) else json.loads(json.dumps(row)), tmp_path)
    assert defect in str(error.value)


def test_sniffing_picks_each_bundled_format_and_refuses_ambiguity(tmp_path: Path) -> None:
    sample_dir = Path(__file__).resolve().parent.parent / "data" / "sample"
    expected = {"sft_messages.jsonl": "messages", "sft_metis.parquet": "metis_coldstart", "sft_deepeyes.json": "deepeyes",
                "sft_thyme.jsonl": "thyme", "rl_verl.parquet": "verl"}
    for name, fmt in expected.items():
        assert sniff_format(sample_dir / name) == fmt
    plain = tmp_path / "plain.json"  # no tool use at all: generic messages and DeepEyes-without-code look alike
    plain.write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"}], "response": "x", "question": "q"}]))
    with pytest.raises(UserError, match="cannot tell the format .*pass --format"):
        sniff_format(plain)


def test_unreadable_files_stop_with_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="broken.parquet: unreadable parquet"):
        list(records(broken))
    with pytest.raises(UserError, match="unsupported file type '.csv'"):
        list(records(tmp_path / "x.csv"))
    table = pa.table({"messages": ["[]"]})
    pq.write_table(table, tmp_path / "ok.parquet")
    assert list(records(tmp_path / "ok.parquet")) == [{"messages": "[]"}]
