"""`curate` command line: run recipes, list stages, inspect run directories."""

from __future__ import annotations

import contextlib
import importlib
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TextIO

import click

from curate import storage
from curate.bundled import resolve_recipe
from curate.cache import DEFAULT_CACHE_PATH
from curate.console import quiet
from curate.errors import UserError

if TYPE_CHECKING:
    import polars as pl


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
@click.version_option(package_name="curate-tooluse")
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
              help="local: this machine's processes; ray: a Ray cluster (pip install 'curate-tooluse[ray]').")
@click.option("--address", help="Ray cluster to join (e.g. auto, or ray://HOST:10001) [a new local Ray instance].")
@click.option("--workers", type=click.IntRange(min=1),
              help="Parallel CPU-stage workers [local: 1; ray: the cluster's CPUs].")
@click.option("--cache", "cache_path", type=click.Path(path_type=Path), default=DEFAULT_CACHE_PATH, show_default=True,
              help="SQLite cache of probe and judge results, shared across runs.")
@click.option("--force", is_flag=True,
              help="Discard the curate run directory at -o (only its own files; anything else is refused).")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs, CI).")
@click.option("-v", "--verbose", is_flag=True,
              help="Show third-party output (vLLM, Ray, transformers, warnings) live, not in RUN_DIR/logs/curate.log.")
def run(recipe: Path, inputs: tuple[str, ...], format_name: str | None, run_dir: str | None, local: bool,
        profile: str | None, executor: str, address: str | None, workers: int | None, cache_path: Path, force: bool,
        no_progress: bool, verbose: bool) -> None:
    """Run RECIPE (a YAML file, or a bundled recipe's name: starter, metis_sft, metis_rl); rerunning on the same
    run directory resumes it (with either executor)."""
    from curate.executor import LocalExecutor, StageError
    from curate.recipe import load_recipe

    if local and profile:
        raise UserError("--local is the `local` profile; pass either --local or --profile")
    if address and executor != "ray":
        raise UserError("--address names a Ray cluster; add --executor ray")
    loaded = load_recipe(resolve_recipe(recipe), profile="local" if local else profile, input_paths=list(inputs),
                         format_name=format_name)
    run_dir = run_dir or str(Path("runs") / loaded.name)
    if executor == "ray":
        from curate.ray_executor import RayExecutor

        runner = RayExecutor(loaded, run_dir, workers, cache_path, progress=not no_progress, address=address)
    else:
        runner = LocalExecutor(loaded, run_dir, workers or 1, cache_path, progress=not no_progress)
    log_path = storage.local_log(run_dir)
    with contextlib.ExitStack() as stack:
        logs: list[TextIO] = []  # the open log, once the run directory is checked (nothing is written there before)
        if not verbose:
            runner.on_open = lambda: logs.append(stack.enter_context(quiet(log_path)))
        try:
            manifest = runner.run(force)
        except StageError as exc:  # its message says what failed and that the same command resumes
            lead = "; log: "
            if not exc.one_line:  # a stage's bug or a bad row it did not expect: its traceback, in the log if quiet
                trace = "".join(traceback.format_exception(exc.__cause__ or exc))
                if logs:
                    logs[0].write(trace)
                else:
                    click.echo(trace, err=True)
                lead = ", traceback in "
            click.echo(f"error: {exc}{_see_log(logs, log_path, lead)}", err=True)
            sys.exit(2 if exc.one_line else 1)
        except UserError as exc:
            raise UserError(f"{exc}{_see_log(logs, log_path, '; log: ')}") from None
        except Exception as exc:  # a bug: its traceback in the log, one line here
            if not logs:
                raise
            logs[0].write("".join(traceback.format_exception(exc)))
            click.echo(f"error: {type(exc).__name__}: {exc}{_see_log(logs, log_path, '; traceback in ')}", err=True)
            sys.exit(1)
        finally:
            _copy_log(logs, log_path, run_dir)
        click.echo(funnel_table(manifest))
        click.echo(
            f"{manifest['input_rows']} rows in, {manifest['kept_rows']} kept ({storage.join(run_dir, 'kept')}),"
            f" {manifest['rejected_rows']} rejected ({storage.join(run_dir, 'rejected')})"
            f"{_see_log(logs, log_path, '; log: ')}"
        )


def _see_log(logs: list[TextIO], log_path: Path, lead: str) -> str:
    return f"{lead}{log_path}" if logs else ""


def _copy_log(logs: list[TextIO], log_path: Path, run_dir: str) -> None:
    """A run directory on an object store gets its log when the run ends (an object is written whole)."""
    if not logs or storage.is_local(run_dir):
        return
    logs[0].flush()
    fs, root = storage.filesystem(storage.join(run_dir, "logs", "curate.log"))
    with storage.errors(run_dir):
        fs.put_file(str(log_path), root)


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
    import polars as pl

    from curate.estimate import estimate as estimate_recipe
    from curate.recipe import load_recipe

    if local and profile:
        raise UserError("--local is the `local` profile; pass either --local or --profile")
    loaded = load_recipe(resolve_recipe(recipe), profile="local" if local else profile, input_paths=list(inputs),
                         format_name=format_name)
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
@click.argument("recipe", required=False, type=click.Path(path_type=Path))
@click.option("--local", is_flag=True, help="Check RECIPE's `local` profile.")
@click.option("--profile", help="Check another named profile of RECIPE.")
@click.option("--cache", "cache_path", type=click.Path(path_type=Path), default=DEFAULT_CACHE_PATH, show_default=True,
              help="The cache whose folder must be writable.")
@click.option("--no-engine", is_flag=True, help="Do not start a vLLM engine (it takes a minute on a CPU).")
@click.option("--json", "as_json", is_flag=True, help="One JSON list of checks, for scripts.")
def doctor(recipe: Path | None, local: bool, profile: str | None, cache_path: Path, no_engine: bool,
           as_json: bool) -> None:
    """Check this machine, each part tried for real: the sandbox, vLLM (an engine started on the bundled model),
    API keys (names only), the cache, Ray, torch and its devices. With RECIPE: exit 1 when it needs what is missing."""
    import json

    from curate import doctor as checks_of
    from curate.recipe import load_recipe

    if local and profile:
        raise UserError("--local is the `local` profile; pass either --local or --profile")
    loaded = load_recipe(resolve_recipe(recipe), profile="local" if local else profile) if recipe else None
    checks = checks_of.machine(cache_path, not no_engine, cache_path.parent / "logs" / "doctor.log")
    if loaded is not None:
        checks = checks_of.needs(loaded, checks)
    if as_json:
        click.echo(json.dumps(checks_of.as_json(checks), indent=1))
    else:
        for check in checks:
            click.echo(check.line())
    lacking = checks_of.missing(checks)
    if lacking:
        if not as_json:
            click.echo(f"error: {loaded.name if loaded else 'this run'} needs what is missing here: "
                       f"{', '.join(check.name for check in lacking)}", err=True)
        sys.exit(1)


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
def init(folder: Path) -> None:
    """Write FOLDER/recipe.yaml, a starter recipe, and FOLDER/sample, the bundled sample it reads, to edit."""
    from curate.bundled import init as write_starter

    recipe, sample = write_starter(folder)
    click.echo(f"wrote {recipe} and {sample}/; run it with: curate run {recipe}")


@main.command()
def stages() -> None:
    """List the registered stages and their options."""
    from curate.registry import stage_classes

    for name, cls in sorted(stage_classes().items()):
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        where = cls.default_placement()
        click.echo(f"{name}  [{where}, batch {cls.batch_size}]  {summary}")
        for option, info in cls.Options.model_fields.items():
            default = "required" if info.is_required() else f"default {info.get_default(call_default_factory=True)!r}"
            click.echo(f"    {option} ({default}): {info.description or ''}")
        if cls.reasons:
            click.echo(f"    rejects with: {', '.join(cls.reasons)}")


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
    import polars as pl

    with pl.Config(tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, tbl_rows=-1, tbl_width_chars=120,
                   fmt_str_lengths=80):
        return str(frame)


class _TrainCommands(_UserErrorsAsOneLine):
    """`curate train`: its sft and hdpo commands are generated from the trainers' config dataclasses, which import
    torch, so they load when named, not when `curate` starts."""

    lazy: ClassVar[dict[str, str]] = {"sft": "curate.train.commands:train_sft_command",
                                      "hdpo": "curate.train.commands:train_hdpo_command"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, attribute = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attribute)  # type: ignore[no-any-return]
        return super().get_command(ctx, name)


@main.group(cls=_TrainCommands)
def train() -> None:
    """Train on curated shards: SFT cold start, then HDPO."""


@train.command("export")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
def train_export_command(run: Path, out: Path) -> None:
    """Write the latest checkpoint of a training directory RUN (or the checkpoint RUN) to OUT as a plain
    save_pretrained folder, for transformers, vLLM or any other inference engine."""
    from curate.train.checkpoint import export

    click.echo(export(run, out))


@train.command("plot")
@click.argument("run", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", "png", type=click.Path(path_type=Path), help="PNG path [RUN/metrics.png].")
def train_plot_command(run: Path, png: Path | None) -> None:
    """Draw the metrics log of a training directory to a PNG."""
    from curate.train.plot import plot_metrics

    click.echo(plot_metrics(run, png or run / "metrics.png"))
