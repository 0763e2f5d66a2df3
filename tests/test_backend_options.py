"""`backend_options` and `fallback_options` are checked at recipe load against the chosen backend's constructor,
with the one-line error and suggestion of every other option; the bundled recipes pass in every profile."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO

from curate.errors import UserError
from curate.recipe import load_recipe


def recipe_with(tmp_path: Path, messages_file: Path, stage: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "input": {"paths": [str(messages_file)]}, "stages": [stage],
                                    "output": {"kind": "sft"}}))
    return path


@pytest.mark.parametrize(("stage", "message"), [
    ({"base_model_solvable": {"backend": "vllm", "backend_options": {"tensor_paralel_size": 2}}},
     "unknown option 'backend_options.tensor_paralel_size' for backend 'vllm' (did you mean 'tensor_parallel_size'?)"),
    ({"base_model_solvable": {"backend": "vllm", "fallback_backend": "transformers",
                              "fallback_options": {"batchsize": 8}}},
     "unknown option 'fallback_options.batchsize' for backend 'transformers' (did you mean 'batch_size'?)"),
    ({"strategic_tool_judge": {"backend": "openai", "backend_options": {"base_ur": "http://127.0.0.1:1/v1"}}},
     "unknown option 'backend_options.base_ur' for backend 'openai' (did you mean 'base_url'?)"),
    # Valid for vLLM, not for the transformers backend this stage is given.
    ({"pass_rate_variance": {"backend": "transformers", "backend_options": {"enforce_eager": True}}},
     "unknown option 'backend_options.enforce_eager' for backend 'transformers'"),
])
def test_a_misspelt_backend_option_fails_at_load_in_one_line(tmp_path: Path, messages_file: Path, stage: dict,
                                                             message: str) -> None:
    with pytest.raises(UserError) as error:
        load_recipe(recipe_with(tmp_path, messages_file, stage))
    text = str(error.value)
    assert message in text and "valid options: " in text and "\n" not in text


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_bundled_recipes_have_valid_backend_options_in_every_profile(recipe: Path) -> None:
    profiles = list((yaml.safe_load(recipe.read_text()).get("profiles") or {}))
    for profile in [None, *profiles]:
        load_recipe(recipe, profile=profile)
