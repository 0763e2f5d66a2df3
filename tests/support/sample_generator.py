"""Deterministic generator of realistic tool-use trajectories and RL prompts, with planted defects.

Images are drawn with pillow (bar charts with values, receipts, signs, shape fields, landmark
sketches). Every python call really runs here, with the inputs preloaded as `image_1, image_2, ...`
as Metis does, and the recorded observation is what it printed and saved, so good trajectories are
truly consistent. Planted defects (one per row) cover every stage of `metis_sft.yaml` and
`metis_rl.yaml`; their ids and the stage/reason expected to reject them go to `EXPECTED.json`.

    python -m curate_testkit.sample_generator --out data/sample                 # the bundled sample
    python -m curate_testkit.sample_generator --rows 10000 --kind sft --format messages --out /tmp/big
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image as PILImage
from PIL import ImageDraw, ImageOps

from curate.formats import get_format
from curate.sample import Image, ImagePart, Message, Sample, TextPart, ToolCall, text

METIS_SYSTEM_PROMPT = (
    "You are an efficient problem-solving agent. Your goal is to answer the user's question accurately while "
    "minimizing unnecessary tool usage. You may call a python tool: write <tool_call>{\"name\": \"python\", "
    "\"arguments\": {\"code\": \"...\"}}</tool_call>; the input images are preloaded as image_1, image_2, ... "
    "(PIL images). Reason inside <reason>...</reason> and give the final answer inside <answer>...</answer>."
)
# Words SmolLM2-135M-Instruct (the --local probe model) copies back reliably: measured 16/16 at temperature 0.2,
# so the planted too-easy questions are too easy for the local model too.
COPYABLE_WORDS = ["piano", "lemon"]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "rocket", "garden", "silver", "candle", "forest"]
ITEMS = ["milk", "bread", "eggs", "coffee", "rice", "tea", "soap", "jam", "salt", "oil"]
LANDMARKS = {"tower": ("Gustave Eiffel's company", "Eiffel Tower"), "arch": ("Jean Chalgrin", "Arc de Triomphe")}
# A context sentence before each question (drawn from the row's id, so the images and answers do not move) makes
# the sample's questions distinct, as real ones are: text_dedup must reject only the planted near-duplicates.
PEOPLE = ["Amira", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kofi", "Lena", "Mateo",
          "Nadia", "Oskar", "Priya", "Quinn", "Rosa", "Sami", "Tariq", "Uma", "Viktor", "Wanjiru", "Yusuf", "Zofia"]
CITIES = ["Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hanoi", "Dakar", "Oslo", "Perth", "Lima", "Accra", "Porto",
          "Kyoto", "Tunis", "Cusco", "Bergen", "Malmo", "Recife", "Izmir", "Gdansk"]
VERBS = ["photographed", "scanned", "kept", "found", "received", "copied", "saved", "posted", "printed", "borrowed"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
PLACES = ["harbour", "old mill", "bus depot", "library steps", "night market", "ferry pier", "bakery", "stadium",
          "museum cafe", "flower stall", "town hall", "ice rink", "bike shop", "hostel lobby", "chess club",
          "laundromat", "pharmacy", "tram stop", "bookshop", "swimming pool"]
WISHES = ["is curious", "wants to check", "asks carefully", "needs a quick answer", "would like help",
          "is puzzled", "double-checks", "asks a friend", "wonders", "keeps notes"]


def with_context(sample_id: str, question: str) -> str:
    """`question` after a context sentence drawn from the sample id (its own generator: the row's images and
    answers come from the main one and stay as they were)."""
    rng = random.Random(f"context:{sample_id}")
    context = (f"{rng.choice(PEOPLE)} from {rng.choice(CITIES)} {rng.choice(VERBS)} this on {rng.choice(DAYS)}"
               f" {rng.randrange(1, 29)} {rng.choice(MONTHS)} near the {rng.choice(PLACES)} and {rng.choice(WISHES)}.")
    return f"{context} {question}"


# --- images -------------------------------------------------------------------------------


def to_png(image: PILImage.Image) -> Image:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return Image(buffer.getvalue(), "png")


def to_jpeg(image: PILImage.Image, quality: int = 85) -> Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return Image(buffer.getvalue(), "jpeg")


def draw_bar_chart(rng: random.Random, values: dict[str, int]) -> PILImage.Image:
    image = PILImage.new("RGB", (220, 160), tuple(rng.randrange(235, 256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for y in range(140, 20, -rng.randrange(15, 30)):  # gridlines at a chart-specific spacing
        draw.line([(15, y), (210, y)], fill=(200, 200, 200))
    draw.line([(15, 140), (210, 140)], fill="black")
    width = 180 // len(values)
    for k, (label, value) in enumerate(values.items()):
        x = 20 + k * width
        color = tuple(rng.randrange(40, 220) for _ in range(3))
        draw.rectangle([x, 140 - value, x + width - 8, 140], fill=color)
        draw.text((x + 2, 128 - value), str(value), fill="black")
        draw.text((x + 4, 144), label, fill="black")
    return image


def draw_receipt(rng: random.Random, lines: list[tuple[str, float]]) -> PILImage.Image:
    """A photographed receipt: paper of random size and tint on a random table, text lines, a stain or two."""
    spacing = rng.randrange(13, 20)
    paper_w, paper_h = rng.randrange(130, 180), 36 + spacing * len(lines) + rng.randrange(0, 30)
    image = PILImage.new("RGB", (paper_w + 40, paper_h + 40), tuple(rng.randrange(40, 140) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    left, top = rng.randrange(5, 35), rng.randrange(5, 35)
    draw.rectangle([left, top, left + paper_w, top + paper_h], fill=tuple(rng.randrange(225, 256) for _ in range(3)))
    draw.text((left + rng.randrange(10, 50), top + 6), f"STORE #{rng.randrange(100, 999)}", fill="black")
    for k, (item, price) in enumerate(lines):
        y = top + 26 + spacing * k
        draw.text((left + 8, y), item, fill="black")
        draw.text((left + paper_w - 48, y), f"{price:.2f}", fill="black")
    for _ in range(rng.randrange(0, 3)):
        x, y = left + rng.randrange(0, paper_w - 20), top + rng.randrange(0, paper_h - 20)
        draw.ellipse([x, y, x + rng.randrange(8, 24), y + rng.randrange(8, 24)], outline=(170, 140, 90))
    return image


def draw_sign(rng: random.Random, word: str) -> PILImage.Image:
    image = PILImage.new("RGB", (240, 180), tuple(rng.randrange(90, 160) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):  # a cluttered street: facades and windows
        x, y = rng.randrange(0, 220), rng.randrange(0, 160)
        draw.rectangle([x, y, x + rng.randrange(10, 40), y + rng.randrange(10, 40)],
                       fill=tuple(rng.randrange(0, 255) for _ in range(3)))
    x, y = rng.randrange(20, 150), rng.randrange(20, 140)
    draw.rectangle([x, y, x + 60, y + 16], fill=(20, 90, 40))
    draw.text((x + 4, y + 3), word, fill="white")
    return image


def draw_shapes(rng: random.Random) -> PILImage.Image:
    image = PILImage.new("L", (128, 128), rng.randrange(200, 250))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(3, 9)):
        x, y, r = rng.randrange(10, 110), rng.randrange(10, 110), rng.randrange(4, 14)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=rng.randrange(0, 90))
    return image.convert("RGB")


def draw_landmark(rng: random.Random, kind: str) -> PILImage.Image:
    """A postcard sketch: the landmark at a random place and scale, a random sky with clouds."""
    sky = (rng.randrange(90, 200), rng.randrange(140, 220), rng.randrange(200, 255))
    image = PILImage.new("RGB", (160, 160), sky)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(2, 7)):
        x, y = rng.randrange(0, 150), rng.randrange(0, 70)
        draw.ellipse([x, y, x + rng.randrange(15, 45), y + rng.randrange(6, 16)], fill=(245, 245, 245))
    ground = rng.randrange(115, 145)
    draw.rectangle([0, ground, 160, 160], fill=(rng.randrange(60, 120), rng.randrange(110, 170), rng.randrange(40, 90)))
    cx, scale = rng.randrange(50, 110), rng.uniform(0.6, 1.0)
    top = ground - int(110 * scale)
    half = int(35 * scale)
    if kind == "tower":
        draw.polygon([(cx, top), (cx - half, ground), (cx + half, ground)], outline=(60, 50, 40), width=3)
        draw.line([(cx - half // 2, (top + ground) // 2), (cx + half // 2, (top + ground) // 2)], fill=(60, 50, 40), width=3)
    else:
        draw.rectangle([cx - half, top + 30, cx + half, ground], fill=(210, 200, 170))
        draw.ellipse([cx - half // 2, top + 60, cx + half // 2, ground + 20], fill=sky)
    draw.text((rng.randrange(2, 60), ground + 4), "postcard", fill="white")
    return image


def truncated(image: Image) -> Image:
    return Image(image.data[: len(image.data) // 2], image.format)


def bomb_png(width: int = 100_000, height: int = 100_000) -> Image:
    """A PNG whose valid header claims a gigantic canvas (a decompression bomb, never decoded)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return Image(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""), "png")


# --- running the tool for real -----------------------------------------------------------------


def run_python(code: str, images: list[Image]) -> tuple[str, list[Image]]:
    """Execute `code` with `image_1..` preloaded; return what it printed and the images it saved."""
    namespace = {f"image_{k + 1}": PILImage.open(io.BytesIO(im.data)) for k, im in enumerate(images)}
    stdout = io.StringIO()
    previous = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        try:
            with contextlib.redirect_stdout(stdout):
                exec(compile(code, "<trajectory>", "exec"), namespace)  # noqa: S102 - our own generated code
            saved = [Image(Path(name).read_bytes(), "png") for name in sorted(os.listdir(scratch)) if name.endswith(".png")]
        finally:
            os.chdir(previous)
    return stdout.getvalue(), saved


# --- trajectories -------------------------------------------------------------------------


@dataclass
class Task:
    """A question about input images, the code that answers it, and the answer."""

    question: str
    images: list[Image]
    code: str
    answer: str
    reasoning: str


def bar_task(rng: random.Random) -> Task:
    values = {label: rng.randrange(12, 100) for label in "ABCDEF"[: rng.randrange(3, 7)]}
    code = (
        "top = image_1.crop((0, 0, 220, 140)).resize((440, 280))\n"
        "top.save('bars_zoom.png')\n"
        f"values = {values!r}\n"
        "print('tallest:', max(values, key=values.get), 'shortest:', min(values, key=values.get))\n"
        "print(max(values.values()) - min(values.values()))"
    )
    return Task("What is the difference between the tallest and the shortest bar?", [to_png(draw_bar_chart(rng, values))],
                code, str(max(values.values()) - min(values.values())),
                "The bar labels are small; I will zoom in and read the values, then subtract.")


def receipt_task(rng: random.Random) -> Task:
    lines = [(rng.choice(ITEMS), round(rng.uniform(0.5, 20), 2)) for _ in range(rng.randrange(3, 7))]
    prices = [price for _, price in lines]
    code = f"prices = {prices!r}\nprint(f'{{sum(prices):.2f}}')"
    return Task("What is the total amount on this receipt?", [to_jpeg(draw_receipt(rng, lines))], code,
                f"{sum(prices):.2f}", "Adding several decimal prices by hand is error-prone; I will sum them in python.")


def shapes_task(rng: random.Random) -> Task:
    image = to_png(draw_shapes(rng))
    code = "import numpy as np\narr = np.asarray(image_1.convert('L'))\nprint(round(float((arr < 128).mean()), 3))"
    answer = run_python(code, [image])[0].strip()
    return Task("What fraction of the image is covered by dark shapes? Answer with 3 decimals.", [image], code, answer,
                "Estimating an area fraction by eye is unreliable; I will threshold the pixels.")


def sign_task(rng: random.Random) -> Task:
    word = rng.choice(WORDS)
    image = draw_sign(rng, word)
    code = "w, h = image_1.size\nzoom = image_1.resize((w * 3, h * 3))\nzoom.save('sign_zoom.png')\nprint(zoom.size)"
    return Task("What word is written on the small green sign?", [to_png(image)], code, word,
                "The sign is small in a cluttered scene; I will enlarge the image to read it.")


TASKS: list[Callable[[random.Random], Task]] = [bar_task, receipt_task, shapes_task, sign_task]


def tool_trajectory(sample_id: str, task: Task, code: str | None = None, observation: tuple[str, list[Image]] | None = None,
                    final: str | None = None, context: bool = True) -> Sample:
    """question (after a context sentence unless `context` is False) -> reasoning + python call -> observation
    (real unless given) -> answer."""
    code = task.code if code is None else code
    question = with_context(sample_id, task.question) if context else task.question
    stdout, produced = observation if observation is not None else run_python(code, task.images)
    images = list(task.images) + produced
    shown = [ImagePart(len(task.images) + k) for k in range(len(produced))]
    messages = [
        Message("user", [ImagePart(k) for k in range(len(task.images))] + text(question)),
        Message("assistant", text(f"<think>{task.reasoning}</think>\n"), [ToolCall("python", {"code": code}, "call_0")]),
        Message("tool", text(stdout) + shown, tool_call_id="call_0"),
    ]
    if final is None:
        final = f"<think>The tool output settles it.</think>\n<answer>{task.answer}</answer>"
    if final:
        messages.append(Message("assistant", text(final)))
    return Sample(sample_id, "curate-sample", messages, images, task.answer)


def search_trajectory(sample_id: str, rng: random.Random) -> Sample:
    kind = rng.choice(list(LANDMARKS))
    designer, name = LANDMARKS[kind]
    messages = [
        Message("user", [ImagePart(0)] + text(with_context(sample_id, "Who designed the landmark on this postcard?"))),
        Message("assistant", text("<think>I recognise the shape but should confirm the designer.</think>\n"),
                [ToolCall("search", {"query": f"{name} designer"}, "call_0")]),
        Message("tool", text(f"{name}: designed and built by {designer}."), tool_call_id="call_0"),
        Message("assistant", text(f"<answer>{designer}</answer>")),
    ]
    return Sample(sample_id, "curate-sample", messages, [to_png(draw_landmark(rng, kind))], designer)


# --- planted defects: (kind, expected stage, expected reason, builder) ------------------------------

Builder = Callable[[str, random.Random, "Sample | None"], Sample]


def _with_image(sample: Sample, index: int, image: Image) -> Sample:
    sample.images[index] = image
    return sample


def _altered_number(sample_id: str, rng: random.Random, _: Sample | None) -> Sample:
    task = receipt_task(rng)
    stdout, produced = run_python(task.code, task.images)
    wrong = f"{float(stdout) + rng.choice([1, 2, 5, 10]):.2f}\n"
    return tool_trajectory(sample_id, task, observation=(wrong, produced))


def _altered_image(sample_id: str, rng: random.Random, _: Sample | None) -> Sample:
    task = sign_task(rng)
    stdout, produced = run_python(task.code, task.images)
    inverted = ImageOps.invert(PILImage.open(io.BytesIO(produced[0].data)).convert("RGB")).rotate(90, expand=True)
    return tool_trajectory(sample_id, task, observation=(stdout, [to_png(inverted)]))


def _failing(code: str, recorded: str) -> Builder:
    def build(sample_id: str, rng: random.Random, _: Sample | None) -> Sample:
        return tool_trajectory(sample_id, bar_task(rng), code=code, observation=(recorded, []))
    return build


def _trivial(sample_id: str, rng: random.Random, _: Sample | None) -> Sample:
    word = rng.choice(COPYABLE_WORDS)
    task = Task(f"Repeat the word: {word}. Answer with the word only.", [to_png(draw_shapes(rng))], f"print({word!r})", word,
                "I will print the word to be sure.")
    return tool_trajectory(sample_id, task, context=False)  # the local probe model copies this exact wording


def _pointless(sample_id: str, rng: random.Random, _: Sample | None) -> Sample:
    a, b = rng.randrange(2, 9), rng.randrange(2, 9)
    task = Task(f"The caption under the chart says the answer is {a * b}. What number does the caption give?",
                [to_png(draw_shapes(rng))], "print('hello')", str(a * b), "Let me run some code first.")
    return tool_trajectory(sample_id, task)


def _corrupt(make: Callable[[Image], Image]) -> Builder:
    def build(sample_id: str, rng: random.Random, _: Sample | None) -> Sample:
        sample = tool_trajectory(sample_id, receipt_task(rng))
        return _with_image(sample, 0, make(sample.images[0]))
    return build


def _duplicate(sample_id: str, rng: random.Random, earlier: Sample | None) -> Sample:
    assert earlier is not None, "a duplicate needs an earlier sample"
    original = PILImage.open(io.BytesIO(earlier.images[0].data)).convert("RGB")
    near_copy = to_jpeg(original.resize((original.width - 6, original.height - 4)), quality=70)  # resized, recompressed
    sample = search_trajectory(sample_id, rng) if earlier.messages[1].tool_calls[0].name == "search" else tool_trajectory(
        sample_id, Task(earlier.question, [near_copy], "print(image_1.size)", str(earlier.answer),
                        "Let me check the size."), context=False)
    return _with_image(sample, 0, near_copy)


def _no_final_answer(sample_id: str, rng: random.Random, _: Sample | None) -> Sample:
    return tool_trajectory(sample_id, bar_task(rng), final="")


def _unanswered_call(sample_id: str, rng: random.Random, _: Sample | None) -> Sample:
    sample = tool_trajectory(sample_id, bar_task(rng))
    del sample.messages[2]  # the observation
    sample.images = sample.images[:1]
    return sample


SFT_DEFECTS: list[tuple[str, str, str, Builder]] = [
    ("truncated_image", "image_integrity", "truncated_image", _corrupt(truncated)),
    ("empty_image", "image_integrity", "empty_image", _corrupt(lambda im: Image(b"", "png"))),
    ("random_bytes", "image_integrity", "unreadable_image", _corrupt(lambda im: Image(bytes(range(256)) * 4, "png"))),
    ("bomb", "image_integrity", "decompression_bomb", _corrupt(lambda im: bomb_png())),
    ("duplicate", "image_dedup", "duplicate_image", _duplicate),
    ("no_final_answer", "format", "no_final_answer", _no_final_answer),
    ("unanswered_call", "format", "unanswered_tool_call", _unanswered_call),
    ("name_error", "execution_failure", "code_error", _failing("print(totl)", "42\n")),
    ("zero_division", "execution_failure", "code_error", _failing("rate = 10 / 0\nprint(rate)", "inf\n")),
    ("syntax_error", "execution_failure", "syntax_error", _failing("print('unclosed'", "unclosed\n")),
    ("infinite_loop", "execution_failure", "timeout", _failing("while True:\n    pass", "done\n")),
    ("altered_number", "consistency", "inconsistent_output", _altered_number),
    ("altered_image", "consistency", "inconsistent_image", _altered_image),
    ("trivial", "base_model_solvable", "solvable", _trivial),
    ("pointless_tool", "strategic_tool_judge", "not_strategic", _pointless),
]


def generate_sft(n: int, seed: int, defect_every: int = 8, defect_offset: int = 0, id_prefix: str = "sft") -> Iterator[tuple[Sample, dict | None]]:
    """n trajectories; every `defect_every`-th row carries the next planted defect, with its expectation."""
    rng = random.Random(seed)
    earlier: Sample | None = None
    planted = defect_offset
    for index in range(n):
        sample_id = f"{id_prefix}-{index:05d}"
        if defect_every and index % defect_every == defect_every - 1 and earlier is not None:
            kind, stage, reason, build = SFT_DEFECTS[planted % len(SFT_DEFECTS)]
            planted += 1
            yield build(sample_id, rng, earlier), {"kind": kind, "stage": stage, "reason": reason}
            continue
        sample = search_trajectory(sample_id, rng) if index % 7 == 3 else tool_trajectory(sample_id, rng.choice(TASKS)(rng))
        earlier = sample
        yield sample, None


# --- RL prompts ------------------------------------------------------------------------------


def rl_prompt(sample_id: str, question: str, image: Image, answer: str | None, ability: str,
              context: bool = True) -> Sample:
    question = with_context(sample_id, question) if context else question
    messages = [Message("system", text(METIS_SYSTEM_PROMPT)), Message("user", [ImagePart(0), TextPart("\n" + question)])]
    meta = {"verl": {"ability": ability, "reward_style": "rule", "extra_info": {"question": question}}}
    return Sample(sample_id, "curate-sample", messages, [image], answer, meta)


def _rl_from_task(sample_id: str, rng: random.Random) -> Sample:
    task = rng.choice(TASKS)(rng)
    return rl_prompt(sample_id, task.question, task.images[0], task.answer, "perception" if task.code else "math")


def _too_easy(sample_id: str, rng: random.Random, _: Sample) -> Sample:
    word = rng.choice(COPYABLE_WORDS)
    return rl_prompt(sample_id, f"Repeat the word: {word}. Answer with the word only.", to_png(draw_shapes(rng)), word,
                     "reasoning", context=False)  # the local probe model copies this exact wording


def _too_hard(sample_id: str, rng: random.Random, _: Sample) -> Sample:
    a, b, c = rng.randrange(1000, 9999), rng.randrange(10000, 99999), rng.randrange(10**8, 10**9)
    return rl_prompt(sample_id, f"What is {a} * {b} - {c}? Give the exact integer.", to_png(draw_shapes(rng)), str(a * b - c), "math")


def _rl_duplicate(sample_id: str, rng: random.Random, earlier: Sample) -> Sample:
    copy = to_jpeg(PILImage.open(io.BytesIO(earlier.images[0].data)), 75)
    return rl_prompt(sample_id, "Describe the most prominent value in the image.", copy, str(earlier.answer), "perception")


RL_DEFECTS: list[tuple[str, str, str, Callable[[str, random.Random, Sample], Sample]]] = [
    ("corrupt_image", "image_integrity", "truncated_image",
     lambda i, rng, e: _with_image(_rl_from_task(i, rng), 0, truncated(e.images[0]))),
    ("duplicate", "image_dedup", "duplicate_image", _rl_duplicate),
    ("no_ground_truth", "format", "no_ground_truth",
     lambda i, rng, e: rl_prompt(i, "What is the total amount on this receipt?", to_jpeg(draw_receipt(rng, [("tea", 2.5)])), None, "perception")),
    ("ambiguous", "ambiguity_judge", "ambiguous",
     lambda i, rng, e: rl_prompt(i, "What is the number?", to_png(draw_bar_chart(rng, {"A": 30, "B": 60, "C": 45})), "60", "perception")),
    ("too_easy", "pass_rate_variance", "too_easy", _too_easy),
    ("too_hard", "pass_rate_variance", "too_hard", _too_hard),
]


def generate_rl(n: int, seed: int, defect_every: int = 6) -> Iterator[tuple[Sample, dict | None]]:
    rng = random.Random(seed)
    earlier: Sample | None = None
    planted = 0
    for index in range(n):
        sample_id = f"rl-{index:05d}"
        if index % defect_every == defect_every - 1 and earlier is not None:
            kind, stage, reason, build = RL_DEFECTS[planted % len(RL_DEFECTS)]
            planted += 1
            yield build(sample_id, rng, earlier), {"kind": kind, "stage": stage, "reason": reason}
            continue
        earlier = _rl_from_task(sample_id, rng)
        yield earlier, None


# --- planted near-duplicate questions and evaluation-set contamination --------------------------

SYNONYMS = {"total": "overall", "amount": "sum", "difference": "gap", "image": "picture", "shortest": "lowest",
            "tallest": "highest", "written": "printed", "fraction": "share", "designed": "created", "word": "text",
            "question": "query", "wants": "would like", "careful": "precise", "quick": "fast", "help": "advice"}
PARAPHRASES: list[Callable[[str], str]] = [
    lambda q: q.replace("What is", "What's").replace("what is", "what's"),
    lambda q: q.lower(),
    lambda q: q.rstrip("?.") + " ?",
    lambda q: "Question: " + q,
    lambda q: q.replace(" the ", " the  ", 1).replace(". ", ".\n", 1),
    lambda q: q.replace(" this ", " the ", 1),
    lambda q: q.replace("?", "? Please answer.", 1) if "?" in q else q + " Please answer.",
    lambda q: next((q.replace(word, other, 1) for word, other in SYNONYMS.items() if word in q), q + " Thanks."),
]


def paraphrase(question: str, rng: random.Random, edits: int = 2) -> str:
    """`question` with `edits` paraphrase-level edits (a synonym, a contraction, case, punctuation, a filler)."""
    for edit in rng.sample(PARAPHRASES, edits):
        question = edit(question)
    return question


EVAL_FILE = "eval/mini_bench.parquet"
EVAL_TOPICS = ["bar chart of monthly rainfall", "receipt from a hardware store", "street photo with a green sign",
               "scatter of dark circles", "bar chart of exam scores", "receipt from a late night diner",
               "postcard of a famous monument", "photo of a cluttered shop front", "line plot of ticket sales"]
EVAL_ASKS = ["which value is the largest and by how much does it exceed the smallest one shown",
             "what is the exact sum of every number that appears anywhere in the figure",
             "how many distinct coloured regions can be counted without including the background",
             "which label is printed closest to the top left corner of the whole image"]


def eval_items(count: int = 16, seed: int = 1000) -> list[dict]:
    """A small evaluation set in the layout of the Hub's visual benchmarks: id, question, image {bytes, path},
    answer. The recipes decontaminate against it; the sample carries rows copied from it."""
    rng = random.Random(seed)
    # Charts and street signs: receipts and shape fields look alike to a perceptual hash at small sizes.
    drawers = [lambda: draw_bar_chart(rng, {k: rng.randrange(12, 100) for k in "ABCD"}),
               lambda: draw_sign(rng, rng.choice(WORDS))]
    items = []
    for k in range(count):
        image = to_png(drawers[k % len(drawers)]())
        question = (f"Looking carefully at the {EVAL_TOPICS[k % len(EVAL_TOPICS)]} in item {k}, "
                    f"{EVAL_ASKS[k % len(EVAL_ASKS)]}?")
        items.append({"id": f"mb-{k:03d}", "question": question,
                      "image": {"bytes": image.data, "path": f"mb-{k:03d}.png"}, "answer": str(rng.randrange(100))})
    return items


def _fresh_task(rng: random.Random) -> Task:
    return rng.choice([bar_task, receipt_task, sign_task])(rng)


def planted_near_duplicate(sample_id: str, rng: random.Random, earlier: Sample, kind: str) -> Sample:
    """`earlier`'s question, paraphrased, about a new picture: only text_dedup sees the copy."""
    task = _fresh_task(rng)
    question = paraphrase(earlier.question, rng)
    if kind == "rl":
        return rl_prompt(sample_id, question, task.images[0], task.answer, "perception", context=False)
    return tool_trajectory(sample_id, Task(question, task.images, task.code, task.answer, task.reasoning),
                           context=False)


def planted_contamination(sample_id: str, rng: random.Random, item: dict, by: str, kind: str) -> Sample:
    """A row copied from the evaluation set: its question (after a context sentence) with a new picture, or its
    picture (recompressed) with a new question."""
    task = _fresh_task(rng)
    if by == "question":
        question, image = item["question"], task.images[0]
    else:
        question = task.question
        image = to_jpeg(PILImage.open(io.BytesIO(item["image"]["bytes"])), 85)
    if kind == "rl":
        return rl_prompt(sample_id, question, image, task.answer, "perception")
    return tool_trajectory(sample_id, Task(question, [image], "print(image_1.size)", task.answer, "Let me look."))


NEAR_DUPLICATE = {"kind": "near_duplicate_question", "stage": "text_dedup", "reason": "near_duplicate_text"}
CONTAMINATED = {"stage": "decontaminate", "reason": "contaminated"}


def _planted_rows(prefix: str, first_index: int, originals: list[Sample], items: list[dict], near: int,
                  contaminated: list[tuple[int, str]], kind: str, seed: int) -> list[tuple[Sample, dict]]:
    """Near-duplicates of `originals` (one each, up to `near`) and copies of evaluation items (index, by)."""
    rng = random.Random(seed)
    rows: list[tuple[Sample, dict]] = []
    for original in originals[:near]:
        sample_id = f"{prefix}-{first_index + len(rows):05d}"
        rows.append((planted_near_duplicate(sample_id, rng, original, kind), dict(NEAR_DUPLICATE)))
    for item, by in contaminated:
        sample_id = f"{prefix}-{first_index + len(rows):05d}"
        rows.append((planted_contamination(sample_id, rng, items[item], by, kind),
                     {"kind": f"eval_{by}", **CONTAMINATED}))
    return rows


# --- files ---------------------------------------------------------------------------------

SFT_FILES = [("sft_messages.jsonl", "messages", 64), ("sft_metis.parquet", "metis_coldstart", 48),
             ("sft_deepeyes.json", "deepeyes", 48), ("sft_thyme.jsonl", "thyme", 48)]
RL_FILE = ("rl_verl.parquet", "verl", 84)


def write_sample_data(out_dir: Path, seed: int = 0) -> dict:
    """The bundled sample: four SFT files in four source formats, one RL file, malformed rows, EXPECTED.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    expected: dict = {"defects": {}, "malformed": {}}
    items = eval_items(seed=seed + 1000)
    (out_dir / EVAL_FILE).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(items), out_dir / EVAL_FILE)
    offset = 0
    clean: list[Sample] = []  # rows without a planted defect, which the planted near-duplicates copy
    for file_index, (name, fmt, rows) in enumerate(SFT_FILES):
        pairs = list(generate_sft(rows, seed + file_index, defect_offset=offset, id_prefix=f"sft{file_index}"))
        offset += sum(1 for _, e in pairs if e)
        clean += [s for s, e in pairs if e is None]
        if file_index == 0:  # two near-duplicates within the file, two rows copied from the evaluation set
            pairs += _planted_rows(f"sft{file_index}", rows, clean[3:20:8], items, 2, [(0, "question"), (5, "image")],
                                   "sft", seed + 2000)
        if name == "sft_thyme.jsonl":  # a near-duplicate of a question in another file
            pairs += _planted_rows(f"sft{file_index}", rows, clean[30:31], items, 1, [], "sft", seed + 2001)
        get_format(fmt).write((s for s, _ in pairs), out_dir / name)
        expected["defects"].update({s.id: {**e, "file": name} for s, e in pairs if e})
    rl_name, rl_fmt, rl_rows = RL_FILE
    pairs = list(generate_rl(rl_rows, seed + 10))
    pairs += _planted_rows("rl", rl_rows, [s for s, e in pairs if e is None][2:40:12], items, 3,
                           [(1, "question"), (6, "image")], "rl", seed + 2010)
    get_format(rl_fmt).write((s for s, _ in pairs), out_dir / rl_name)
    expected["defects"].update({s.id: {**e, "file": rl_name} for s, e in pairs if e})
    expected["malformed"][SFT_FILES[0][0]] = _inject_malformed_jsonl(out_dir / SFT_FILES[0][0])
    expected["malformed"][SFT_FILES[1][0]] = _inject_malformed_parquet(out_dir / SFT_FILES[1][0], "messages", "{broken json")
    expected["malformed"][rl_name] = _inject_malformed_parquet(out_dir / rl_name, "prompt", [])
    (out_dir / "EXPECTED.json").write_text(json.dumps(expected, indent=1, sort_keys=True))
    return expected


def _inject_malformed_jsonl(path: Path) -> list[int]:
    """Bad JSON, a row without messages, an undecodable base64 image, messages of the wrong type."""
    lines = path.read_text().splitlines()
    bad = {
        5: '{"id": "bad-json", "messages": [',
        17: json.dumps({"id": "no-messages", "answer": "3"}),
        29: json.dumps({"id": "bad-base64", "messages": [{"role": "user", "content": "<image>What?"}], "images": ["data:image/png;base64,@@@notbase64@@@"]}),
        41: json.dumps({"id": "wrong-type", "messages": {"role": "user", "content": "hi"}}),
    }
    for position in sorted(bad):
        lines.insert(position, bad[position])
    path.write_text("\n".join(lines) + "\n")
    return sorted(bad)


def _inject_malformed_parquet(path: Path, column: str, value: object) -> list[int]:
    """One row whose `column` is broken, inserted at position 3."""
    table = pq.read_table(path)
    rows = table.to_pylist()
    broken = dict(rows[0], **{column: value})
    rows.insert(3, broken)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    return [3]


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate curate's sample data (default) or a large benchmark set.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, help="generate this many rows of one kind instead of the bundled sample")
    parser.add_argument("--kind", choices=["sft", "rl"], default="sft")
    parser.add_argument("--format", default="messages", help="format to write the rows in (with --rows)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.rows is None:
        expected = write_sample_data(args.out, args.seed)
        print(f"wrote the bundled sample to {args.out}: {len(expected['defects'])} planted defects")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    generator = generate_sft(args.rows, args.seed) if args.kind == "sft" else generate_rl(args.rows, args.seed)
    suffix = {"messages": "jsonl", "verl": "parquet", "metis_coldstart": "parquet", "deepeyes": "json", "thyme": "jsonl"}[args.format]
    path = args.out / f"{args.kind}_{args.format}_{args.rows}.{suffix}"
    count = get_format(args.format).write((sample for sample, _ in generator), path)
    print(f"wrote {count} rows to {path}")


if __name__ == "__main__":
    main()
