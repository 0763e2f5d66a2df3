from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from curate_testkit.stage_fixtures import FirstN, HashBucket

from curate.errors import UserError
from curate.recipe import load_recipe
from curate.registry import register_stage

register_stage(HashBucket)
register_stage(FirstN)


def write_recipe(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.fixture
def recipe_data(messages_file: Path) -> dict:
    return {
        "name": "t",
        "input": {"paths": [messages_file.name], "format": "messages"},
        "stages": [{"hash_bucket": {"buckets": 4}}, {"first_n": None}],
        "output": {"kind": "sft", "shard_rows": 10},
        "profiles": {"local": {"stages": {"hash_bucket": {"buckets": 2}}, "batch_size": 8}},
    }


def test_loads_resolves_paths_and_applies_profile(tmp_path: Path, recipe_data: dict, messages_file: Path) -> None:
    plain = load_recipe(write_recipe(tmp_path, recipe_data))
    assert plain.inputs[0].path == str(messages_file.resolve())
    assert [s.label for s in plain.stages] == ["hash_bucket", "first_n"]
    assert plain.stages[0].options.buckets == 4 and plain.batch_size == 256
    local = load_recipe(write_recipe(tmp_path, recipe_data), profile="local")
    assert local.stages[0].options.buckets == 2 and local.batch_size == 8
    assert local.sha256 != plain.sha256


def test_repeated_stage_gets_unique_label(tmp_path: Path, recipe_data: dict) -> None:
    recipe_data["stages"].append({"hash_bucket": {"buckets": 5}})
    recipe = load_recipe(write_recipe(tmp_path, recipe_data))
    assert [s.label for s in recipe.stages] == ["hash_bucket", "first_n", "hash_bucket#2"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r["stages"].append({"hash_buckt": {}}), "unknown stage 'hash_buckt' (did you mean 'hash_bucket'?)"),
        (lambda r: r["stages"][0]["hash_bucket"].update(bucket=3), "unknown option 'bucket' (did you mean 'buckets'?)"),
        (lambda r: r["stages"][0]["hash_bucket"].update(buckets="many"), "field 'buckets'"),
        (lambda r: r["stages"][0]["hash_bucket"].update(buckets=0), "field 'buckets'"),
        (lambda r: r.update(stagse=[]), "unknown option 'stagse' (did you mean 'stages'?)"),
        (lambda r: r["output"].update(knd="sft"), "unknown option 'output.knd' (did you mean 'kind'?)"),
        (lambda r: r["output"].update(kind="dpo"), "field 'output.kind'"),
        (lambda r: r["input"].update(format="thymme"), "unknown format 'thymme' (did you mean 'thyme'?)"),
        (lambda r: r["input"].update(paths=["missing.jsonl"]), "input file not found"),
        (lambda r: r.pop("output"), "missing required field 'output'"),
    ],
)
def test_bad_recipes_fail_with_one_line_naming_the_problem(
    tmp_path: Path, recipe_data: dict, mutate, message: str
) -> None:
    mutate(recipe_data)
    with pytest.raises(UserError) as error:
        load_recipe(write_recipe(tmp_path, recipe_data))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, "input:\n  paths: [a.jsonl\nstages: {")
    with pytest.raises(UserError, match=r"recipe.yaml: line \d+, column \d+: invalid YAML"):
        load_recipe(path)


def test_unknown_profile_and_profile_overriding_absent_stage(tmp_path: Path, recipe_data: dict) -> None:
    path = write_recipe(tmp_path, recipe_data)
    with pytest.raises(UserError, match="no profile 'lokal' .*did you mean 'local'"):
        load_recipe(path, profile="lokal")
    recipe_data["profiles"]["local"]["stages"]["judge"] = {}
    with pytest.raises(UserError, match="overrides stage 'judge', which the recipe does not run"):
        load_recipe(write_recipe(tmp_path, recipe_data), profile="local")


def test_command_line_inputs_replace_recipe_inputs(tmp_path: Path, recipe_data: dict, messages_file: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(messages_file.parent)
    recipe = load_recipe(write_recipe(tmp_path, recipe_data), input_paths=[messages_file.name], format_name="thyme")
    assert [(s.path, s.format) for s in recipe.inputs] == [(str(messages_file.resolve()), "thyme")]
