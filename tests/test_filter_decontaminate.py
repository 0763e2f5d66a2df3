"""decontaminate: questions and images from evaluation sets named in the recipe; sets read once, cached by content."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import curate.filters.decontaminate as decontaminate_module
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO
from curate.filters.decontaminate import Decontaminate
from curate_testkit.harness import run_curate
from curate_testkit.pictures import png_bytes
from PIL import Image as PILImage

from curate.cache import Cache
from curate.errors import UserError
from curate.recipe import _validate, load_recipe
from curate.sample import Image, ImagePart, Message, Sample, TextPart
from curate.stage import StageContext
from curate.textnorm import Normaliser

LONG = [
    "In the bar chart of average rainfall per month, which month receives more rain than every other month of the year",
    "Using the table printed under the photograph, compute the total cost of all items bought on the second day",
    "How far is the red marker from the blue marker if each grid square of the map stands for two kilometres",
]
SHORT = "Which animal sits on the old wooden bench"  # 8 words: shorter than an n-gram, long enough to count whole
TINY = "What colour is the car"  # 5 words: too generic to match by text


def eval_rows() -> list[dict]:
    questions = [*LONG, SHORT, TINY]
    return [{"qid": f"item-{k}", "question": text, "image": {"bytes": png_bytes(1000 + k, 64), "path": None}}
            for k, text in enumerate(questions)]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    return write_parquet(tmp_path / "bench.parquet", eval_rows())


def stage(tmp_path: Path, benchmarks: dict, **options: object) -> Decontaminate:
    built = Decontaminate(Decontaminate.Options(benchmarks=benchmarks, **options))
    built.preflight()
    built.setup(StageContext(tmp_path / "cache.sqlite", tmp_path))
    return built


def sample(sample_id: str, question: str, *images: bytes) -> Sample:
    content = [ImagePart(k) for k in range(len(images))] + [TextPart(question)]
    return Sample(sample_id, "t", [Message("user", content)], [Image(data) for data in images])


def recompressed(data: bytes) -> bytes:
    buffer = io.BytesIO()
    PILImage.open(io.BytesIO(data)).convert("RGB").resize((60, 60)).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def test_copied_questions_and_images_are_rejected_naming_benchmark_item_and_match(tmp_path: Path, bench: Path) -> None:
    dedup = stage(tmp_path, {"vstar": {"paths": [str(bench)], "image": "image", "id": "qid"}})
    rows = [
        sample("clean", "Which of the two towers in the postcard is taller, the left one or the right one?",
               png_bytes(7, 64)),
        sample("text", "Please answer: " + LONG[0].upper() + "?", png_bytes(8, 64)),
        sample("inside", f"<image>\nLook closely. {LONG[1]}. Reply with a number only.", png_bytes(9, 64)),
        sample("image", "A brand new question about this picture and nothing else at all", png_bytes(10, 64),
               recompressed(png_bytes(1002, 64))),
        sample("short", f"Tell me: {SHORT.lower()}?", png_bytes(11, 64)),
        sample("tiny", TINY, png_bytes(12, 64)),
    ]
    verdicts = dedup.process(rows)
    assert [v.keep for v in verdicts] == [True, False, False, False, False, True]
    assert {v.reason for v in verdicts if not v.keep} == {"contaminated"}
    ngram = " ".join(Normaliser()(LONG[0]).split()[:13])
    assert verdicts[1].detail == f'vstar item item-0: question shares "{ngram}"'
    assert rows[1].meta["decontaminate"] == {"benchmark": "vstar", "item": "item-0", "match": "text", "ngram": ngram}
    assert verdicts[2].detail.startswith("vstar item item-1: question shares ")
    distance = rows[3].meta["decontaminate"]["distance"]
    assert verdicts[3].detail == f"vstar item item-2: image 1 is {distance} bits from its image" and distance <= 4
    assert verdicts[4].detail == f'vstar item item-3: question shares "{SHORT.lower()}"'
    assert all("decontaminate" not in row.meta for row in (rows[0], rows[5]))


def test_several_benchmarks_jsonl_with_base64_images_and_row_numbers_as_ids(tmp_path: Path, bench: Path) -> None:
    rows = [{"problem": f"Solve the puzzle number {k} shown in the figure by counting every small square inside it",
             "picture": "data:image/png;base64," + base64.b64encode(png_bytes(2000 + k, 64)).decode()}
            for k in range(3)]
    jsonl = write_jsonl(tmp_path / "wemath.jsonl", rows)
    dedup = stage(tmp_path, {"vstar": {"paths": [str(bench)], "image": "image", "id": "qid"},
                             "wemath": {"paths": [str(jsonl)], "question": "problem", "image": "picture"}})
    verdicts = dedup.process([sample("a", rows[2]["problem"]), sample("b", "Anything at all", png_bytes(2001, 64)),
                              sample("c", LONG[2])])
    assert [v.detail.split(":")[0] for v in verdicts] == ["wemath item 2", "wemath item 1", "vstar item item-2"]


def test_text_only_checks_when_images_are_off_or_absent(tmp_path: Path, bench: Path) -> None:
    copy = sample("image", "A new question", png_bytes(1000, 64))
    assert stage(tmp_path, {"b": {"paths": [str(bench)], "image": "image"}}, check_images=False).process([copy])[0].keep
    assert stage(tmp_path, {"b": {"paths": [str(bench)]}}).process([copy])[0].keep  # no image column named
    assert not stage(tmp_path, {"b": {"paths": [str(bench)], "image": "image"}}).process([copy])[0].keep


def test_ngram_size_is_configurable(tmp_path: Path, bench: Path) -> None:
    seven = " ".join(LONG[0].split()[3:10])
    row = [sample("s", f"Nothing to do with it, but {seven} is a phrase I like")]
    assert stage(tmp_path, {"b": {"paths": [str(bench)]}}).process(row)[0].keep
    verdict = stage(tmp_path, {"b": {"paths": [str(bench)]}}, ngram=7).process(row)[0]
    assert verdict.detail == f'b item 0: question shares "{Normaliser()(seven)}"'


def test_prepared_hashes_give_the_same_verdicts(tmp_path: Path, bench: Path) -> None:
    benchmarks = {"b": {"paths": [str(bench)], "image": "image"}}
    rows = [sample(f"s{k}", f"question {k}", recompressed(png_bytes(1000 + k % 6, 64))) for k in range(8)]
    direct = stage(tmp_path, benchmarks).process(rows)
    prepared = [sample(s.id, s.question, *(im.data for im in s.images)) for s in rows]
    Decontaminate(Decontaminate.Options(benchmarks=benchmarks)).prepare(prepared)  # as in a worker: never set up
    assert "hashes" in prepared[0].meta["decontaminate"]
    assert stage(tmp_path, benchmarks).process(prepared) == direct
    assert sum(not v.keep for v in direct) >= 3


def test_evaluation_sets_are_cached_by_content(tmp_path: Path, bench: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[int] = []
    original = decontaminate_module.perceptual_hash
    monkeypatch.setattr(decontaminate_module, "perceptual_hash",
                        lambda *args: hashed.append(1) or original(*args))
    benchmarks = {"b": {"paths": [str(bench)], "image": "image"}}
    stage(tmp_path, benchmarks)
    assert len(hashed) == 5
    again = stage(tmp_path, benchmarks)  # another run, the same content: nothing parsed or hashed again
    assert len(hashed) == 5 and not again.process([sample("s", LONG[1])])[0].keep
    write_parquet(bench, eval_rows()[:2])  # new content under the same name: read afresh
    changed = stage(tmp_path, benchmarks)
    assert len(hashed) == 7 and changed.process([sample("s", LONG[2])])[0].keep
    with Cache(tmp_path / "cache.sqlite") as cache:
        assert len(cache) == 2


def test_a_missing_or_unreadable_set_stops_before_any_row(tmp_path: Path, bench: Path) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    cases = {
        str(tmp_path / "nope.parquet"): "decontaminate: benchmark 'b': input file not found: ",
        str(tmp_path / "none-*.parquet"): "decontaminate: benchmark 'b': input file not found: no file matches",
        str(broken): f"decontaminate: benchmark 'b': cannot read {broken}: ",
        str(write_jsonl(tmp_path / "csv.txt", [])): "is neither parquet nor JSONL",
    }
    for path, message in cases.items():
        with pytest.raises(UserError, match=message.replace("*", r"\*")) as error:
            Decontaminate(Decontaminate.Options(benchmarks={"b": {"paths": [path]}})).preflight()
        assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=r"benchmark 'b': .*bench.parquet has no column 'prompt' \(it has: qid, "):
        wrong_column = {"b": {"paths": [str(bench)], "question": "prompt"}}
        Decontaminate(Decontaminate.Options(benchmarks=wrong_column)).preflight()


def test_cli_stops_in_one_line_without_touching_the_run(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "input": {"paths": [str(REPO / "data" / "sample" / "rl_verl.parquet")], "format": "verl"},
        "stages": [{"decontaminate": {"benchmarks": {"mathvista": {"paths": ["evals/missing.parquet"]}}}}],
        "output": {"kind": "rl"}}))
    result = run_curate("run", str(recipe), "-o", str(tmp_path / "run"), "--cache", str(tmp_path / "c.sqlite"),
                        "--no-progress", check=False)
    assert result.returncode != 0
    assert result.stderr.strip() == (f"error: decontaminate: benchmark 'mathvista': input file not found: "
                                     f"{tmp_path / 'evals' / 'missing.parquet'}")
    assert not (tmp_path / "run").exists()


def test_relative_paths_resolve_against_the_recipe_and_urls_go_through_fsspec(tmp_path: Path, bench: Path) -> None:
    (tmp_path / "recipes").mkdir()
    with fsspec.open("memory://evals/bench.parquet", "wb") as handle:
        handle.write(bench.read_bytes())
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "input": {"paths": [str(REPO / "data" / "sample" / "rl_verl.parquet")], "format": "verl"},
        "stages": [{"decontaminate": {"benchmarks": {"local": {"paths": ["../bench.parquet"]},
                                                     "remote": {"paths": ["memory://evals/*.parquet"]}}}}],
        "output": {"kind": "rl"}}))
    (spec,) = load_recipe(recipe).stages
    assert spec.options.benchmarks["local"].paths == [str(tmp_path / "recipes" / ".." / "bench.parquet")]
    built = spec.build()
    built.preflight()
    built.setup(StageContext(tmp_path / "c.sqlite", tmp_path))
    verdict = built.process([sample("s", LONG[0])])[0]
    assert verdict.detail.startswith("local item 0: question shares ")
    assert [item for item in built.index.items if item[0] == "remote"] == [("remote", str(k)) for k in range(5)]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "missing required field 'benchmarks'"),
        ({"benchmarks": {}}, "at least 1 item"),
        ({"benchmarks": {"b": {"paths": []}}}, "at least 1 item"),
        ({"benchmarks": {"b": {"paths": ["x.parquet"], "questoin": "q"}}}, r"did you mean 'question'"),
        ({"benchmarks": {"b": {"paths": ["x.parquet"]}}, "ngram": 0}, "greater than or equal to 1"),
        ({"benchmarks": {"b": {"paths": ["x.parquet"]}}, "max_distance": 64}, "must be below the hash's 64 bits"),
        ({"benchmarks": {"b": {"paths": ["x.parquet"]}}, "text": "answer"}, "'question' or 'trajectory'"),
    ],
)
def test_bad_options_fail_when_the_recipe_loads(options: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        _validate(Decontaminate.Options, options, "recipe.yaml: stage 'decontaminate'")
