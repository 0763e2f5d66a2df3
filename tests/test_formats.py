from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from curate_testkit.pictures import png_bytes
from PIL import Image as PILImage

from curate.errors import UserError
from curate.formats import MalformedRow, count_records, get_format, records, sniff_format
from curate.formats.inline import (
    link_calls,
    parse_calls,
    parse_code_result,
    render_call,
    split_assistant_text,
    unwrap_observation,
)
from curate.sample import Image, ImagePart, Message, Sample, TextPart, ToolCall, text


def jpeg_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    PILImage.open(io.BytesIO(png_bytes(seed))).convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def trajectory(sample_id: str = "t1", answer: str | list[str] = "3") -> Sample:
    """Question with a PNG, a python call returning text and a JPEG, a search call, an answer (call ids as inline readers give them)."""
    return Sample(
        id=sample_id,
        source="unit",
        messages=[
            Message("user", [ImagePart(0), TextPart("How many red pixels are in the chart?")]),
            Message("assistant", text("<think>Count them.</think>\n"),
                    [ToolCall("python", {"code": "import numpy as np\nprint(3)\nimage_1.save('a.png')"}, "call_0")]),
            Message("tool", [TextPart("3\n"), ImagePart(1)], tool_call_id="call_0"),
            Message("assistant", text("Let me double-check online."), [ToolCall("search", {"query": "red pixels"}, "call_1")]),
            Message("tool", text("No results."), tool_call_id="call_1"),
            Message("assistant", text("<answer>3</answer>")),
        ],
        images=[Image(png_bytes(1), "png"), Image(jpeg_bytes(2), "jpeg")],
        answer=answer,
    )


def read_all(fmt: str, path: Path) -> list[Sample]:
    return [get_format(fmt).parse(record, path.parent) for record in records(path)]


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "filename"),
    [
        ("messages", "x.jsonl"),
        ("messages", "x.parquet"),
        ("metis_coldstart", "x.parquet"),
        ("metis_coldstart", "x.jsonl"),
        ("deepeyes", "x.json"),
        ("deepeyes", "x.jsonl"),
        ("thyme", "x.jsonl"),
        ("thyme", "x.json"),
        ("thyme", "x.parquet"),
    ],
)
def test_trajectory_round_trip_keeps_calls_observations_images_answer(tmp_path: Path, fmt: str, filename: str) -> None:
    originals = [trajectory("t1"), trajectory("t/2", answer=["3", "three"])]
    path = tmp_path / filename
    assert get_format(fmt).write(originals, path) == 2
    back = read_all(fmt, path)
    for original, read in zip(originals, back, strict=True):
        assert (read.id, read.source, read.answer) == (original.id, original.source, original.answer)
        assert read.messages == original.messages
        assert read.images == original.images  # bytes and container format
    again = tmp_path / f"again-{filename}"
    get_format(fmt).write(back, again)
    assert read_all(fmt, again) == back


def test_messages_round_trip_keeps_meta_and_openai_ids(tmp_path: Path) -> None:
    original = trajectory()
    original.messages[1].tool_calls[0].id, original.messages[2].tool_call_id = "abc", "abc"
    original.meta = {"judge": {"score": 0.5}, "input": "x"}
    for name in ("x.parquet", "x.jsonl"):
        get_format("messages").write([original], tmp_path / name)
        assert read_all("messages", tmp_path / name) == [original]


@pytest.mark.parametrize("ground_truth", ["B", ["3", "three"], '["looks", "like json"]'])
def test_verl_round_trip_keeps_prompt_images_ground_truth(tmp_path: Path, ground_truth: str | list[str]) -> None:
    prompt = Sample("p1", "chartqa", [Message("system", text("Be efficient.")),
                                      Message("user", [ImagePart(0), TextPart("\nWhich bar is tallest?")])],
                    [Image(jpeg_bytes(5), "jpeg")], ground_truth,
                    {"verl": {"ability": "perception", "reward_style": "rule",
                              "extra_info": {"index": "source_index_7", "pass8": 0.5, "question": "<image>\nWhich bar?"}},
                     "judge": {"verdict": "clear"}})
    path = tmp_path / "rl.parquet"
    get_format("verl").write([prompt], path)
    (back,) = read_all("verl", path)
    assert back.messages == prompt.messages and back.images == prompt.images and back.answer == ground_truth
    assert (back.id, back.source) == ("p1", "chartqa")
    assert back.meta["judge"] == {"verdict": "clear"}
    assert back.meta["verl"]["ability"] == "perception" and back.meta["verl"]["reward_style"] == "rule"
    assert {k: back.meta["verl"]["extra_info"][k] for k in ("index", "pass8", "question")} == \
        prompt.meta["verl"]["extra_info"]
    get_format("verl").write([back], tmp_path / "again.parquet")
    assert read_all("verl", tmp_path / "again.parquet") == [back]


def test_rl_writer_keeps_only_the_prompt_and_its_images(tmp_path: Path) -> None:
    path = tmp_path / "rl.parquet"
    get_format("verl").write([trajectory("t1")], path)
    (row,) = records(path)
    assert [turn["role"] for turn in row["prompt"]] == ["user"]
    assert row["prompt"][0]["content"] == "<image>How many red pixels are in the chart?"
    assert [im["bytes"] for im in row["images"]] == [png_bytes(1)]  # the tool's output image is not a prompt image
    assert row["ability"] == "unknown" and row["reward_model"] == {"ground_truth": "3", "style": "rule"}
    assert row["extra_info"]["question"] == "<image>How many red pixels are in the chart?"
    assert (row["extra_info"]["answer"], row["extra_info"]["index"], row["extra_info"]["id"]) == ("3", "t1", "t1")


# --- shards load with datasets ---------------------------------------------------------------------


def test_sft_parquet_loads_with_datasets(tmp_path: Path) -> None:
    path = tmp_path / "sft.parquet"
    get_format("messages").write([trajectory("a"), trajectory("b", answer=["3", "three"])], path)
    loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert loaded.column_names == ["id", "source", "messages", "images", "answer", "meta"]
    message = loaded.features["messages"].feature
    assert set(message) == {"role", "content", "tool_calls", "tool_call_id"}
    assert set(message["tool_calls"].feature["function"]) == {"name", "arguments"}
    first = loaded[0]
    call = first["messages"][1]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "python"
    assert json.loads(call["function"]["arguments"])["code"].startswith("import numpy")
    assert first["messages"][2]["tool_call_id"] == "call_0"
    assert first["messages"][0]["content"][0] == {"type": "image", "text": None}
    assert [im["bytes"] for im in first["images"]] == [png_bytes(1), jpeg_bytes(2)]
    assert json.loads(loaded[1]["answer"]) == ["3", "three"] and json.loads(first["meta"]) == {}


def test_rl_parquet_loads_with_datasets(tmp_path: Path) -> None:
    path = tmp_path / "rl.parquet"
    samples = [trajectory("a"), trajectory("b", answer=["3", "three"])]
    get_format("verl").write(samples, path)
    loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert loaded.column_names == ["data_source", "prompt", "images", "ability", "reward_model", "extra_info"]
    assert set(loaded.features["extra_info"]) == {"answer", "index", "pass8", "question", "id", "extra"}
    assert loaded[0]["images"][0]["bytes"] == png_bytes(1)
    assert [row["reward_model"]["ground_truth"] for row in loaded] == ["3", '["3", "three"]']


# --- the layouts found in the wild -----------------------------------------------------------------


def test_deepeyes_real_layout(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "q.png").write_bytes(png_bytes(3))
    (tmp_path / "imgs" / "crop.jpg").write_bytes(jpeg_bytes(4))
    (tmp_path / "imgs" / "plot.png").write_bytes(png_bytes(5))
    row = {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "<image>\nWhat is written on the sign?"},
            {"role": "assistant", "content": "<think>Zoom in.</think>\n<code>\n```python\ncrop = image_1.crop((0, 0, 8, 8))\ncrop.show()\n```\n</code>"},
            {"role": "user", "content": "Code execution result:\nstdout:\n```\n\n```\nstderr:\n```\n\n```\n<image>"},
            {"role": "assistant", "content": '<think>Search.</think><tool_call>{"name": "search", "arguments": {"query": "sign text"}}</tool_call>'},
            {"role": "user", "content": "<tool_response>A sign that says STOP.</tool_response>"},
            # the evaluation loop's layout: blank lines and an "Images:" line
            {"role": "assistant", "content": "<code>\n```python\nprint(len('STOP'))\nplt.show()\n```\n</code>"},
            {"role": "user", "content": "Code execution result:\nstdout:\n```\n4\n\n```\n\nstderr:\n```\n\n```\n\nImages:\n<image>"},
            {"role": "assistant", "content": "<code>\n```python\n1/0\n```\n</code>"},
            {"role": "user", "content": "Code execution result:\nstdout:\n```\n\n```\nstderr:\n```\nZeroDivisionError\n```"},
            {"role": "assistant", "content": "<think>Done.</think>\n<answer>STOP</answer>"},
        ],
        "images": ["imgs/q.png", "imgs/crop.jpg", "imgs/plot.png"],
    }
    sample = get_format("deepeyes").parse(row, tmp_path)
    assert [m.role for m in sample.messages] == ["system", "user", "assistant", "tool", "assistant", "tool",
                                                 "assistant", "tool", "assistant", "tool", "assistant"]
    assert sample.messages[2].tool_calls == [ToolCall("python", {"code": "crop = image_1.crop((0, 0, 8, 8))\ncrop.show()"}, "call_0")]
    assert sample.messages[2].text == "<think>Zoom in.</think>\n"
    assert sample.messages[3] == Message("tool", [ImagePart(1)], tool_call_id="call_0")
    assert sample.messages[4].tool_calls == [ToolCall("search", {"query": "sign text"}, "call_1")]
    assert sample.messages[5] == Message("tool", text("A sign that says STOP."), tool_call_id="call_1")
    assert sample.messages[7] == Message("tool", [TextPart("4\n"), ImagePart(2)], tool_call_id="call_2")
    assert sample.messages[9].text.endswith("stderr:\n```\nZeroDivisionError\n```")  # stderr kept whole
    assert sample.images == [Image(png_bytes(3), "png"), Image(jpeg_bytes(4), "jpeg"), Image(png_bytes(5), "png")]
    assert sample.source == "deepeyes" and len(sample.id) == 16


def test_thyme_real_layout() -> None:
    row = {
        "image": [b64(png_bytes(6)), b64(png_bytes(7))],
        "question": '<image>\nUser Image Path: "/data/a.png"\nWhat color is the car?',
        "response": "<think>Crop the car.<code>\n```python\nimg = image_1.crop((0, 0, 4, 4))\nimg.save('c.png')\nprint('c.png')\n```\n</code>"
                    "<sandbox_output>c.png\n<image></sandbox_output>Check the size.<code>\n```python\nprint(img.size)\n```\n</code>"
                    "<sandbox_output>(4, 4)</sandbox_output>It is red.</think><answer>red</answer>",
    }
    sample = get_format("thyme").parse(json.dumps(row), Path("."))
    assert [m.role for m in sample.messages] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert sample.messages[1].text == "<think>Crop the car."
    assert sample.messages[1].tool_calls == [ToolCall("python", {"code": "img = image_1.crop((0, 0, 4, 4))\nimg.save('c.png')\nprint('c.png')"}, "call_0")]
    assert sample.messages[2] == Message("tool", [TextPart("c.png\n"), ImagePart(1)], tool_call_id="call_0")
    assert sample.messages[4] == Message("tool", text("(4, 4)"), tool_call_id="call_1")
    assert sample.messages[5].text == "It is red.</think><answer>red</answer>"
    assert sample.answer == "red" and 'User Image Path: "/data/a.png"' in sample.question
    with_solution = get_format("thyme").parse({**row, "solution": "crimson"}, Path("."))
    assert with_solution.answer == "crimson"


def test_metis_coldstart_inline_layout() -> None:
    turns = [
        {"role": "system", "content": "You are an efficient problem-solving agent."},
        {"role": "user", "content": "<image>What is 2+2 on the board?"},
        {"role": "assistant", "content": '<reason>Compute.</reason><tool_call>{"name": "python", "arguments": {"code": "print(2+2)"}}</tool_call>'},
        {"role": "user", "content": "<tool_response>4\n</tool_response><image>"},
        {"role": "assistant", "content": "<reason>It is 4.</reason><answer>4</answer>"},
    ]
    row = {"messages": json.dumps(turns), "images": [b64(png_bytes(8)), b64(jpeg_bytes(9))]}
    sample = get_format("metis_coldstart").parse(row, Path("."))
    assert [m.role for m in sample.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert sample.messages[2] == Message("assistant", text("<reason>Compute.</reason>"),
                                         [ToolCall("python", {"code": "print(2+2)"}, "call_0")])
    assert sample.messages[3] == Message("tool", [TextPart("4\n"), ImagePart(1)], tool_call_id="call_0")
    assert sample.images == [Image(png_bytes(8), "png"), Image(jpeg_bytes(9), "jpeg")]
    assert sample.source == "metis_coldstart"


def test_metis_coldstart_openai_layout() -> None:
    turns = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is 2+2?"}]},
        {"role": "assistant", "content": "<reason>Compute.</reason>",
         "tool_calls": [{"id": "x1", "type": "function", "function": {"name": "python", "arguments": '{"code": "print(2+2)"}'}}]},
        {"role": "tool", "tool_call_id": "x1", "content": "4\n"},
        {"role": "assistant", "content": "<answer>4</answer>"},
    ]
    sample = get_format("metis_coldstart").parse({"messages": json.dumps(turns), "images": [b64(png_bytes(8))]}, Path("."))
    assert sample.messages[1].tool_calls == [ToolCall("python", {"code": "print(2+2)"}, "call_0")]
    assert sample.messages[2] == Message("tool", text("4\n"), tool_call_id="call_0")
    assert sample.messages[0].content == [ImagePart(0), TextPart("What is 2+2?")]


def test_messages_openai_layout_with_string_arguments_and_relative_path(tmp_path: Path) -> None:
    (tmp_path / "pic.png").write_bytes(png_bytes(9))
    row = {
        "messages": [
            {"role": "user", "content": "<image>Area?"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "x", "type": "function", "function": {"name": "python", "arguments": '{"code": "print(6)"}'}}]},
            {"role": "tool", "tool_call_id": "x", "content": [{"type": "text", "text": "6"},
                                                              {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64(jpeg_bytes(10))}}]},
            {"role": "assistant", "content": "6"},
        ],
        "images": ["pic.png"],
        "answer": "6",
        "source": "geo",
    }
    sample = get_format("messages").parse(json.dumps(row), tmp_path)
    assert sample.messages[1].tool_calls == [ToolCall("python", {"code": "print(6)"}, "x")]
    assert sample.messages[2].tool_call_id == "x" and sample.messages[2].image_indices == [1]
    assert sample.images == [Image(png_bytes(9), "png"), Image(jpeg_bytes(10), "jpeg")]
    assert (sample.answer, sample.source) == ("6", "geo")


def test_messages_reads_hf_image_structs_and_openmmreasoner_parts(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "hf.parquet", [{
        "id": "o1",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png_bytes(1))}},
                                                  {"type": "text", "text": "Q?"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "A"}]}],
        "images": [{"bytes": png_bytes(2), "path": "ignored.png"}],
    }])
    (sample,) = read_all("messages", path)
    assert sample.id == "o1" and sample.messages[0].content == [ImagePart(0), ImagePart(1), TextPart("Q?")]
    assert [im.data for im in sample.images] == [png_bytes(2), png_bytes(1)]  # unplaced row image shown first


def test_verl_metis_rl_layout(tmp_path: Path) -> None:
    system = "You are an efficient problem-solving agent. Your goal is to answer the user's question accurately."
    row = {
        "data_source": "vthinker-sft",
        "prompt": [{"role": "system", "content": system}, {"role": "user", "content": "<image>\nFind x."}],
        "images": [{"bytes": png_bytes(11)}],
        "ability": "math",
        "reward_model": {"ground_truth": ["17/264", "0.0644"], "style": "rule"},
        "extra_info": {"answer": "17/264", "index": "source_index_0", "pass8": 0, "question": "<image>\nFind x."},
    }
    (sample,) = read_all("verl", write_parquet(tmp_path / "metis_rl.parquet", [row]))
    assert (sample.id, sample.source, sample.answer) == ("vthinker-sft-source_index_0", "vthinker-sft", ["17/264", "0.0644"])
    assert sample.messages == [Message("system", text(system)), Message("user", [ImagePart(0), TextPart("\nFind x.")])]
    assert sample.images == [Image(png_bytes(11), "png")]
    assert sample.meta == {"verl": {"ability": "math", "reward_style": "rule", "extra_info": {
        "answer": "17/264", "index": "source_index_0", "pass8": 0, "question": "<image>\nFind x."}}}


# --- inline syntax ------------------------------------------------------------------------------------


def test_split_assistant_text_keeps_prose_and_calls_in_order() -> None:
    generated = ('<reason>a</reason><tool_call>{"name": "python", "arguments": "{\\"code\\": \\"print(1)\\"}"}</tool_call>'
                 "then<code>x = 1</code>end")
    assert split_assistant_text(generated) == [
        "<reason>a</reason>", ToolCall("python", {"code": "print(1)"}), "then", ToolCall("python", {"code": "x = 1"}), "end",
    ]
    assert parse_calls(generated)[0] == "<reason>a</reason>thenend"


@pytest.mark.parametrize("code", ["print(1)\n", "\nx = 1", "", "s = '```'\nprint(s)"])
def test_rendered_calls_parse_back_exactly(code: str) -> None:
    call = ToolCall("python", {"code": code})
    for code_blocks in (True, False):
        assert parse_calls("before" + render_call(call, code_blocks)) == ("before", [call])


def test_code_results_unwrap_to_stdout_only_when_nothing_is_lost() -> None:
    assert parse_code_result("Code execution result:\nstdout:\n```\nhi\n```\nstderr:\n```\n\n```") == ("hi", "", "")
    assert unwrap_observation("Code execution result:\nstdout:\n```\nhi\n\n```\n\nstderr:\n```\n\n```\n\nImages:\n<image><image>") == "hi\n<image><image>"
    with_prose = "Code execution result:\nstdout:\n```\nhi\n```\nstderr:\n```\n\n```\nNote: truncated"
    assert unwrap_observation(with_prose) == with_prose
    assert unwrap_observation("<sandbox_output>7</sandbox_output>") == "7"
    assert unwrap_observation("plain text") == "plain text"


def test_link_calls_numbers_calls_and_keeps_given_ids() -> None:
    messages = [Message("assistant", tool_calls=[ToolCall("a", {}), ToolCall("b", {}, "given")]),
                Message("tool", text("1")), Message("tool", text("2")),
                Message("assistant", tool_calls=[ToolCall("c", {})]), Message("tool", text("3"))]
    link_calls(messages)
    assert [c.id for m in messages for c in m.tool_calls] == ["call_0", "given", "call_2"]
    assert [m.tool_call_id for m in messages if m.role == "tool"] == ["call_0", "given", "call_2"]


# --- bad rows and files ---------------------------------------------------------------------------------

_BAD_B64 = "@" * 80
_ONE_TURN = [{"role": "user", "content": "<image>hi"}]
_PROMPT = [{"role": "user", "content": "q"}]


@pytest.mark.parametrize(
    ("fmt", "row", "defect"),
    [
        ("messages", "{not json", "bad JSON"),
        ("messages", {"answer": "1"}, "missing field 'messages'"),
        ("messages", {"messages": "hello"}, "'messages' must be a non-empty list"),
        ("messages", {"messages": [{"role": "robot", "content": "hi"}]}, "message 0: unknown role 'robot'"),
        ("messages", {"messages": [{"role": "user", "content": 5}]}, "message 0: content must be a string or a list of parts"),
        ("messages", {"messages": _ONE_TURN, "images": ["data:image/png;base64,@@@"]}, "image 0: undecodable base64"),
        ("messages", {"messages": _ONE_TURN, "images": ["gone.png"]}, "image 0: file not found: gone.png"),
        ("messages", {"messages": _ONE_TURN, "images": "a.png"}, "'images' must be a list"),
        ("messages", {"messages": [{"role": "user", "content": "<image><image>hi"}], "images": []}, "more <image> placeholders"),
        ("messages", {"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"function": {"name": "python", "arguments": "{bad"}}]}]},
         "message 0 tool call 0: arguments are not valid JSON"),
        ("messages", {"messages": [{"role": "assistant", "tool_calls": {"name": "python"}}]}, "message 0: 'tool_calls' must be a list"),
        ("messages", {"messages": [{"role": "assistant", "tool_calls": [{"function": "python"}]}]}, "needs a function with a string name"),
        ("messages", {"messages": [{"role": "user", "content": "hi"}], "meta": "{oops"}, "'meta' is not valid JSON"),
        ("metis_coldstart", "{not json", "bad JSON"),
        ("metis_coldstart", {"images": []}, "missing field 'messages'"),
        ("metis_coldstart", {"messages": "[{broken"}, "'messages' is not valid JSON"),
        ("metis_coldstart", {"messages": json.dumps({"role": "user"})}, "'messages' must be a non-empty list of turns"),
        ("metis_coldstart", {"messages": json.dumps(_ONE_TURN), "images": [_BAD_B64]}, "image 0: undecodable base64"),
        ("metis_coldstart", {"messages": json.dumps(_ONE_TURN), "images": [42]}, "image 0: expected a path, data URI or base64 string"),
        ("metis_coldstart", {"messages": json.dumps([{"role": "assistant", "tool_calls": [{"function": {"name": 1}}]}])},
         "message 0 tool call 0: needs a function with a string name"),
        ("deepeyes", "[1, 2", "bad JSON"),
        ("deepeyes", {"images": ["a.png"]}, "missing field 'messages'"),
        ("deepeyes", {"messages": [{"role": "assistant", "content": "<tool_call>{nope}</tool_call>"}]}, "<tool_call> is not valid JSON"),
        ("deepeyes", {"messages": [{"role": "assistant", "content": '<tool_call>{"name": "search", "arguments": [1]}</tool_call>'}]},
         "<tool_call> 'arguments' must be an object"),
        ("deepeyes", {"messages": [{"role": "wizard", "content": "x"}]}, "message 0: needs a known role"),
        ("deepeyes", {"messages": _ONE_TURN, "images": ["imgs/missing.png"]}, "image 0: file not found: imgs/missing.png"),
        ("thyme", "not json at all", "bad JSON"),
        ("thyme", {"question": "q"}, "needs string fields 'question' and 'response'"),
        ("thyme", {"question": "q", "response": ["a"]}, "needs string fields 'question' and 'response'"),
        ("thyme", {"question": "<image>q", "response": "r", "image": ["missing.jpg"]}, "image 0: file not found: missing.jpg"),
        ("thyme", {"question": "<image>q", "response": "r", "image": [_BAD_B64]}, "image 0: undecodable base64"),
        ("thyme", {"question": "<image><image>q", "response": "r", "image": [b64(png_bytes(1))]}, "more <image> placeholders"),
        ("verl", "{", "bad JSON"),
        ("verl", {"reward_model": {"ground_truth": "1"}}, "'prompt' must be a non-empty list"),
        ("verl", {"prompt": [], "reward_model": {"ground_truth": "1"}}, "'prompt' must be a non-empty list"),
        ("verl", {"prompt": _PROMPT, "reward_model": {}}, "'reward_model' must be an object with 'ground_truth'"),
        ("verl", {"prompt": [{"role": "judge", "content": "q"}], "reward_model": {"ground_truth": "1"}}, "prompt turn 0: needs an object with a known role"),
        ("verl", {"prompt": _PROMPT, "reward_model": {"ground_truth": "1"}, "images": [{"bytes": None}]}, "image 0: neither bytes nor path"),
        ("verl", {"prompt": _PROMPT, "reward_model": {"ground_truth": "1"}, "images": [{"path": "nope.png"}]}, "image 0: file not found: nope.png"),
        ("verl", {"prompt": _PROMPT, "reward_model": {"ground_truth": "1"}, "extra_info": "x"}, "'extra_info' is not valid JSON"),
        ("verl", ["not", "a", "row"], "row is a list, expected an object"),
    ],
)
def test_malformed_rows_name_their_defect(tmp_path: Path, fmt: str, row: object, defect: str) -> None:
    with pytest.raises(MalformedRow) as error:
        get_format(fmt).parse(row if isinstance(row, str) else json.loads(json.dumps(row)), tmp_path)
    assert defect in str(error.value)
    assert "\n" not in str(error.value)


def typical_files(folder: Path) -> dict[str, Path]:
    """One small file per format, in the layout its source publishes."""
    (folder / "imgs").mkdir()
    (folder / "imgs" / "a.png").write_bytes(png_bytes(1))
    files = {
        "messages": folder / "openai.jsonl",
        "metis_coldstart": folder / "metis.parquet",
        "deepeyes": folder / "sft_part_0.json",
        "thyme": folder / "thyme.jsonl",
        "verl": folder / "metis_rl.parquet",
    }
    files["messages"].write_text(json.dumps({"messages": [
        {"role": "user", "content": "<image>q"},
        {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "python", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "<code> is fine here"}], "images": ["imgs/a.png"]}) + "\n")
    write_parquet(files["metis_coldstart"], [{"messages": json.dumps([{"role": "user", "content": "q"}]), "images": [b64(png_bytes(1))]}])
    files["deepeyes"].write_text(json.dumps([{"messages": [
        {"role": "user", "content": "<image>q"},
        {"role": "assistant", "content": '<tool_call>{"name": "image_search", "arguments": {}}</tool_call>'},
        {"role": "user", "content": "<tool_response>none</tool_response>"}], "images": ["imgs/a.png"]}]))
    files["thyme"].write_text(json.dumps({"image": ["imgs/a.png"], "question": "<image>q", "response": "<answer>1</answer>"}) + "\n")
    write_parquet(files["verl"], [{"data_source": "s", "prompt": [{"role": "user", "content": "q"}], "images": [{"bytes": png_bytes(1)}],
                                   "ability": "math", "reward_model": {"ground_truth": "1", "style": "rule"},
                                   "extra_info": {"index": "0"}}])
    return files


def test_sniffing_picks_each_format_and_refuses_ambiguity(tmp_path: Path) -> None:
    for fmt, path in typical_files(tmp_path).items():
        assert sniff_format(path) == fmt, path.name
        assert len(read_all(fmt, path)) == 1
    plain = tmp_path / "plain.json"  # a chat that also carries Thyme's fields
    plain.write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"}], "response": "x", "question": "q"}]))
    with pytest.raises(UserError, match="cannot tell the format .*pass --format"):
        sniff_format(plain)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"conversations": []}\n')
    with pytest.raises(UserError, match="no format matches"):
        sniff_format(unknown)


@pytest.mark.parametrize(("fmt", "filename"), [("messages", "x.json"), ("verl", "x.jsonl"), ("deepeyes", "x.parquet"),
                                               ("metis_coldstart", "x.json"), ("thyme", "x.csv")])
def test_writers_refuse_file_types_they_do_not_write(tmp_path: Path, fmt: str, filename: str) -> None:
    with pytest.raises(UserError, match=f"the {fmt} format writes"):
        get_format(fmt).write([trajectory()], tmp_path / filename)


def test_unreadable_files_stop_with_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="broken.parquet: unreadable parquet"):
        list(records(broken))
    pq.write_table(pa.table({"messages": ["[]"] * 100}), tmp_path / "whole.parquet")
    cut = tmp_path / "cut.parquet"
    cut.write_bytes((tmp_path / "whole.parquet").read_bytes()[:-40])  # a copy stopped before its footer ended
    with pytest.raises(UserError, match="cut.parquet: unreadable parquet.*check the file is complete"):
        count_records(cut)  # what the executors call first, for the progress bars
    with pytest.raises(UserError, match="unsupported file type '.csv'"):
        list(records(tmp_path / "x.csv"))
    table = pa.table({"messages": ["[]"]})
    pq.write_table(table, tmp_path / "ok.parquet")
    assert list(records(tmp_path / "ok.parquet")) == [{"messages": "[]"}]


def test_a_malformed_rows_raw_text_keeps_its_bytes_as_base64_and_its_size_counts_every_field() -> None:
    """A rejected malformed row is kept whole as JSON: a parquet row's image bytes come back from its base64; the
    executor's size estimate counts strings and bytes by length and any other value as 8 bytes."""
    from curate.executor import record_bytes
    from curate.formats import raw_text

    row = {"id": "r1", "image": b"\x89PNG\r\n", "turns": [{"n": 3}], "score": 0.5}
    kept = json.loads(raw_text(row))
    assert base64.b64decode(kept["image"]) == row["image"] and kept["turns"] == [{"n": 3}] and kept["score"] == 0.5
    assert record_bytes(row) == len("r1") + len(row["image"]) + 8 + 8
