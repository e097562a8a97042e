"""`kolm compile`."""

from __future__ import annotations

import click
from click.core import ParameterSource

from kolm_ray.cli.app import cli
from kolm_ray.cli.options import claim_options, fit_options, option_help, progress_option
from kolm_ray.cli.progress import progress_display
from kolm_ray.sampling.config import SampleConfig, TeacherConfig


class _CompileCommand(click.Command):
    """``kolm compile``: without --config, --examples, --eval and --base are required, and a run
    without one stops while its arguments are parsed (as click's own required options do), before
    anything is loaded; with --config, the file may hold them and the library checks."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, args)
        p = ctx.params
        if p.get("config_file") is None and not p.get("print_config"):
            missing = [f"--{name}" for name in ("examples", "eval", "base") if p.get(name) is None]
            if missing:
                raise click.UsageError(f"missing {', '.join(missing)}: give {'them' if len(missing) > 1 else 'it'} "
                                       "as flags or in a --config file", ctx=ctx)
        return rest


@cli.command(name="compile", cls=_CompileCommand, short_help="Compile a task into a signed Specialist.", epilog="""\b
Examples:
  kolm compile --task-file task.txt --examples rows.jsonl --eval holdout.jsonl \\
      --base qwen-2.5-3b-instruct --gate K=88
  kolm compile "draft a 60-word TLDR of the article" --examples tldr.jsonl \\
      --eval tldr-holdout.jsonl --base ./tiny-base --name tldr --epochs 8
  kolm compile --config compile.yaml --epochs 10     # a flag given here overrides the file
  kolm compile --examples rows.jsonl --eval holdout.jsonl --base ./tiny-base --print-config > compile.yaml

\b
Exit codes:
  0  signed: the artifact is in the store (or --print-config printed the config)
  1  a runtime failure (teacher past its threshold, a budget, the fit, signing)
  2  bad input: a row (named by file:line), the config file (file:line), the base, an option,
     ANTHROPIC_API_KEY not set
  3  below the --gate K-score: no artifact, the report kept under ARTIFACTS/rejected/""")
@click.argument("task", required=False)
@click.option("--examples", type=click.Path(dir_okay=False), help="Rows to distill from (JSONL/Parquet) [required, here or in --config].")
@click.option("--eval", type=click.Path(dir_okay=False),
              help="Held-out rows {input, output} for the K-score [required, here or in --config].")
@click.option("--base", help="Base model: short name (qwen-2.5-3b-instruct, phi-3-mini), hub id or folder [required, here or in --config].")
@click.option("--gate", default=None, help="Minimum holdout K-score, 0..100, e.g. K=88; below it: exit 3, no artifact.")
@click.option("--task-file", type=click.Path(dir_okay=False), help="Read the task instruction from this file.")
@click.option("--teacher", default=TeacherConfig.model_fields["model"].default, show_default=True,
              help=option_help(TeacherConfig, "model"))
@click.option("--samples-per-input", "--k", "samples_per_input", default=4, show_default=True,
              type=click.IntRange(1, 64), help=option_help(SampleConfig, "samples_per_input"))
@click.option("--n", default=None, type=click.IntRange(1), help=option_help(SampleConfig, "n"))
@click.option("--name", default=None, help="Specialist name [default: from the task].")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Artifact store: a folder or s3://BUCKET/PREFIX [default: $KOLM_HOME/artifacts].")
@click.option("--work-dir", default=None, type=click.Path(file_okay=False),
              help="Working state (samples, checkpoints) [default: runs/NAME].")
@click.option("--sign", default=None, help="key:PATH, or sigstore [default: kolm's own key].")
@click.option("--batch/--no-batch", default=False, help=option_help(SampleConfig, "batch"))
@click.option("--concurrency", default=64, show_default=True, type=click.IntRange(1), help=option_help(SampleConfig, "concurrency"))
@click.option("--min-agreement", default=SampleConfig.model_fields["min_agreement"].default, show_default=True,
              type=click.FloatRange(0, 1), help=option_help(SampleConfig, "min_agreement"))
@click.option("--max-failed-fraction", default=0.05, show_default=True, type=click.FloatRange(0, 1),
              help=option_help(SampleConfig, "max_failed_fraction"))
@click.option("--prices", type=click.Path(dir_okay=False), help="JSON price table overriding the built-in one.")
@click.option("--address", default=None, help="Ray cluster address [default: RAY_ADDRESS or a local instance].")
@click.option("--new-version/--no-new-version", default=False, help="Compile again even when an artifact of identical inputs exists "
              "(by default it is reused: same version, nothing paid or trained).")
@claim_options
@fit_options
@progress_option
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="A compile config (YAML) with these "
              "options' fields; a flag given here overrides it. `--print-config` shows every field.")
@click.option("--print-config", is_flag=True, help="Print the effective config (commented YAML) and exit.")
@click.pass_context
def compile_cmd(ctx: click.Context, config_file: str | None, print_config: bool, progress_mode: str, **flags) -> None:
    """Compile TASK into a signed Specialist: verifier, teacher, fit, eval, gate, sign.

    Every option can come from a --config file instead; one given here wins."""
    from kolm_ray.compile_config import flag_overrides, load_settings, plan_compile, run_compile, to_yaml

    defaults = (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
    given = {k: v for k, v in flags.items() if ctx.get_parameter_source(k) not in defaults}
    settings = load_settings(config_file, flag_overrides(given))
    if print_config:
        click.echo(to_yaml(settings), nl=False)
        return
    plan = plan_compile(settings, say=lambda m: click.echo(m, err=True))
    with progress_display(progress_mode) as shown:
        result = run_compile(plan, say=shown.say, progress=shown)
    click.echo(result.student.line())
    click.echo(f"artifact    {result.artifact}")
