"""Training settings from one source: `curate train sft|hdpo` options generated from the config dataclasses (one
default and one help per field, keyword construction only), and `--config FILE` with flags that win over it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner
from conftest import cli
from curate_testkit.toy import build_toy_policy, toy_prompt

from curate.formats import get_format
from curate.train.algorithms import ALGORITHMS
from curate.train.commands import train_hdpo_command, train_sft_command
from curate.train.hdpo import HDPOConfig
from curate.train.settings import config_from, config_options
from curate.train.sft import SFTConfig


@pytest.mark.parametrize(("command", "config"), [(train_sft_command, SFTConfig), (train_hdpo_command, HDPOConfig)])
def test_the_options_are_the_config_fields_with_their_defaults(command: click.Command, config: type) -> None:
    params = {param.name: param for param in command.params}
    for field in dataclasses.fields(config):
        if not field.metadata["cli"]:
            assert field.name not in params
            continue
        param = params[field.name]
        assert (param.help if isinstance(param, click.Option) else "") or isinstance(param, click.Argument)
        if field.default is dataclasses.MISSING:
            assert not param.required  # required here or in --config: checked once both are read
        elif field.type != "bool":
            assert param.default == field.default, field.name
    if config is HDPOConfig:
        assert list(params["algo"].type.choices) == list(ALGORITHMS)  # the algorithm table's entries
    with pytest.raises(TypeError):
        config("toy", [], Path("."))  # keyword construction only


@click.command()
@config_options(HDPOConfig)
def shown(**values: object) -> None:
    """What `train hdpo` would train with, as JSON."""
    click.echo(json.dumps(dataclasses.asdict(config_from(HDPOConfig, values)), default=str))


def settings_of(*args: str) -> dict[str, object]:
    result = CliRunner().invoke(shown, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_config_file_values_are_used_and_flags_given_win(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": "m", "out": "runs/x", "shards": ["a.parquet", "b.parquet"],
                                      "algo": "otc", "w_tool": 0.3, "lr": "1e-4", "bf16": True, "rollouts": 4,
                                      "resume": False}))
    settings = settings_of("--config", str(config), "--w-tool", "0.2", "-G", "8", "--model", "flag-model")
    assert (settings["w_tool"], settings["rollouts"], settings["model"]) == (0.2, 8, "flag-model")  # flags win
    assert (settings["algo"], settings["lr"], settings["bf16"], settings["out"]) == ("otc", 1e-4, True, "runs/x")
    assert settings["shards"] == ["a.parquet", "b.parquet"] and settings["resume"] is False
    assert settings["steps"] == 100 and settings["w_acc"] == 1.0  # in neither: the field's default
    given_shards = settings_of("--config", str(config), "c.parquet")
    assert given_shards["shards"] == ["c.parquet"]
    # A flag given with its default's value still wins over the file.
    assert settings_of("--config", str(config), "--w-tool", "0.15")["w_tool"] == 0.15
    # Without --config, the options alone (the required ones given).
    plain = settings_of("s.parquet", "--model", "m", "-o", "o")
    assert plain == json.loads(json.dumps(dataclasses.asdict(HDPOConfig(model="m", shards=[Path("s.parquet")],
                                                                         out=Path("o"))), default=str))


@pytest.mark.parametrize(("content", "message"), [
    ({"model": "m", "w-tool": 0.2}, "run.yaml: unknown option 'w-tool' (did you mean 'w_tool'?); valid options: "),
    ({"model": "m", "rollouts": "many"}, "run.yaml: option 'rollouts': 'many' is not a valid integer"),
    ({"model": "m", "algo": "ppo"}, "run.yaml: option 'algo': 'ppo' is not one of 'hdpo', 'grpo', 'coupled', 'otc'"),
    (["model"], "run.yaml: a config file is a mapping of option names to values, got list"),
    ({"model": "m"}, "missing SHARDS (give it on the command line or as `shards:` in --config FILE)"),
    ({"shards": ["s.parquet"]}, "missing --model (give it on the command line or as `model:` in --config FILE)"),
])
def test_a_bad_config_file_is_one_line(tmp_path: Path, content: object, message: str) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(content))
    result = cli("train", "hdpo", "--config", str(config), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and message in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_sft_takes_a_config_file_too(tmp_path: Path) -> None:
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({"model": "m", "epochs": 3, "lr": 0.5, "bath_size": 2}))
    result = cli("train", "sft", "s.parquet", "-o", str(tmp_path / "out"), "--config", str(config))
    assert result.exit_code == 2 and "unknown option 'bath_size' (did you mean 'batch_size'?)" in result.stderr


def test_a_run_from_a_config_file(tmp_path: Path) -> None:
    """`curate train hdpo --config FILE` trains with the file's settings, a flag overriding one; the checkpoint's
    saved config says so."""
    prompts = tmp_path / "rl.parquet"
    get_format("verl").write([toy_prompt(f"p{n}", "hash", n) for n in range(1, 5)], prompts)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": str(build_toy_policy(tmp_path / "toy")), "shards": [str(prompts)],
                                      "out": str(tmp_path / "out"), "steps": 1, "prompts_per_step": 2, "rollouts": 2,
                                      "max_new_tokens": 8, "max_turns": 1, "algo": "grpo", "w_acc": 0.5}))
    result = cli("train", "hdpo", "--config", str(config), "--max-new-tokens", "6")
    assert result.exit_code == 0, result.stderr
    settings = json.loads((tmp_path / "out" / "checkpoint-000001" / "train_config.json").read_text())
    chosen = (settings["algo"], settings["w_acc"], settings["rollouts"], settings["max_new_tokens"])
    assert chosen == ("grpo", 0.5, 2, 6)  # the file's, and the flag's max_new_tokens
    (log,) = [json.loads(line) for line in (tmp_path / "out" / "hdpo_log.jsonl").read_text().splitlines()]
    assert "loss_acc" in log and "loss_tool" not in log and "clip_frac_tool" not in log
    # The checkpoint's saved config is a config file of the same settings.
    assert settings_of("--config", str(tmp_path / "out" / "checkpoint-000001" / "train_config.json")) == settings
