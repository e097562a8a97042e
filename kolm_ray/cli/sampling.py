"""`kolm sample` and `kolm score`: parse, call ``kolm_ray.sampling.standalone`` / ``kscore``, print."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import click

from kolm_ray.artifact import CONTENT_DIR, read_verified_text
from kolm_ray.cli.app import cli
from kolm_ray.cli.options import (
    address_option,
    claim_options,
    epilog,
    option_help,
    progress_option,
    quota_claim,
    task_text,
    teacher_options,
    trust_options,
    trust_or_default,
)
from kolm_ray.cli.progress import progress_display
from kolm_ray.errors import InputError
from kolm_ray.kscore import score_rows
from kolm_ray.sampling.config import SampleConfig, TeacherConfig
from kolm_ray.verifier import Verifier, synthesize


@cli.command(short_help="Sample the teacher k times per row; keep the best.", epilog=epilog(
    'kolm sample "Route the message to billing, sales or support" --examples rows.jsonl --k 4',
    "kolm sample --task-file task.txt --examples rows.jsonl --n 20 --out runs/try/samples --json",
    codes={0: "sampled and written", 1: "the teacher failed past --max-failed-fraction, or a budget would be passed",
           2: "bad input: the task, a row (named by file:line), an option, or ANTHROPIC_API_KEY not set"}))
@click.argument("task", required=False)
@click.option("--examples", "examples", required=True, type=click.Path(dir_okay=False),
              help="JSONL or Parquet rows {id?, input, output?}.")
@click.option("--task-file", type=click.Path(dir_okay=False), help="Read the task instruction from this file.")
@teacher_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output folder [default: runs/<task>/samples].")
@click.option("--batch-poll", "batch_poll_s", default=30.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help=option_help(SampleConfig, "batch_poll_s"))
@click.option("--actors", default=2, show_default=True, type=click.IntRange(1), help=option_help(SampleConfig, "actors"))
@click.option("--max-tokens", default=1024, show_default=True, type=click.IntRange(1), help=option_help(TeacherConfig, "max_tokens"))
@click.option("--timeout", "timeout_s", default=120.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help=option_help(TeacherConfig, "timeout_s"))
@click.option("--max-attempts", default=TeacherConfig.model_fields["max_attempts"].default, show_default=True,
              type=click.IntRange(1), help=option_help(TeacherConfig, "max_attempts"))
@claim_options
@address_option
@progress_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def sample(task: str | None, examples: str, task_file: str | None, teacher: str, samples_per_input: int, n: int | None, batch: bool,
           concurrency: int, min_agreement: float, max_failed_fraction: float, prices: str | None, out_dir: str | None,
           batch_poll_s: float, actors: int, max_tokens: int, timeout_s: float, max_attempts: int, tenant: str | None,
           max_in_flight: int | None, calls_per_minute: int | None, tokens_per_minute: int | None,
           max_cost_usd: float | None, address: str | None, progress_mode: str, as_json: bool) -> None:
    """Sample the teacher k times per example row and keep the best sample per row."""
    # Imports Ray (the fan-out runs on Ray Data): loaded when a sample runs, not for `kolm --help`.
    from kolm_ray.sampling.standalone import prepare_sampling, run_sampling

    run = prepare_sampling(  # everything the user gave is checked before Ray starts or a call is paid for
        task_text(task, task_file), examples, prices_file=prices, out_dir=out_dir,
        teacher=TeacherConfig(model=teacher, max_tokens=max_tokens, timeout_s=timeout_s, max_attempts=max_attempts),
        sample=SampleConfig(samples_per_input=samples_per_input, n=n, concurrency=concurrency, actors=actors, min_agreement=min_agreement,
                            max_failed_fraction=max_failed_fraction, batch=batch, batch_poll_s=batch_poll_s),
        quota=quota_claim(tenant, max_in_flight, calls_per_minute, tokens_per_minute, max_cost_usd))
    with progress_display(progress_mode) as shown:
        outcome, written = run_sampling(run, address, progress=shown,
                                        on_budget=lambda check: [click.echo(line, err=True) for line in check.lines()])
    if as_json:
        click.echo(json.dumps({**outcome.summary.model_dump(), "out": str(written)}, indent=2))
        return
    click.echo("verifier    " + " · ".join(outcome.verifier.learned()))
    for note in outcome.verifier.notes:
        click.echo(f"            {note}")
    for line in outcome.summary.lines():
        click.echo(line)
    click.echo(f"wrote       {written}/samples.parquet")


@cli.command(short_help="Score outputs into K, T, C, L with a verifier.", epilog=epilog(
    "kolm score outputs.jsonl --verifier ~/.kolm/artifacts/routing-1.0.kolm   # its signed verifier",
    "kolm score outputs.jsonl --verifier runs/routing/samples/verifier.json --json",
    'kolm score outputs.jsonl --examples rows.jsonl --task "Route the message to billing or sales"',
    codes={0: "scored, whatever the K", 1: "the artifact's signature does not verify",
           2: "bad input: a row (named by file:line), a verifier that is not one, an unusable key"}))
@click.argument("outputs", type=click.Path(dir_okay=False))
@click.option("--verifier", "verifier_path", type=click.Path(dir_okay=False),
              help="verifier.json from `kolm sample`, or a .kolm artifact: its verifier, once its signature "
                   "verifies (--key, --identity, else kolm's own key).")
@click.option("--examples", type=click.Path(dir_okay=False), help="Synthesize the verifier from these rows instead.")
@click.option("--task", default=None, help="Task instruction (with --examples).")
@click.option("--json", "as_json", is_flag=True, help="Print per-row scores as JSON.")
@trust_options("a --verifier artifact")
def score(outputs: str, verifier_path: str | None, examples: str | None, task: str | None, as_json: bool,
          key: str | None, identity: str | None, issuer: str | None) -> None:
    """Score OUTPUTS (JSONL/Parquet rows {id?, input, output, reference?}) into K, T, C, L."""
    # Imports pyarrow: loaded when rows are read, not for every `kolm` command.
    from kolm_ray.rows import read_rows

    if bool(verifier_path) == bool(examples):
        raise InputError("give exactly one of --verifier FILE or --examples FILE (with --task)")
    if examples and not (task and task.strip()):
        raise InputError("--examples needs --task: the task instruction the verifier is synthesized for")
    if (key or identity or issuer) and not (verifier_path and _is_artifact(verifier_path)):
        raise InputError("--key, --identity and --issuer check a --verifier artifact (.kolm): give one")
    if verifier_path:
        verifier = _verifier_from(verifier_path, key, identity, issuer)
    else:
        ex = read_rows(examples, require_output=True)
        verifier = synthesize(task_text(task, None), ex.column("output").to_pylist(), ex.column("input").to_pylist())
    rows = read_rows(outputs)
    ks = score_rows(verifier, rows.column("id").to_pylist(), rows.column("output").to_pylist(),
                    rows.column("input").to_pylist(), rows.column("reference").to_pylist())
    if as_json:
        click.echo(ks.model_dump_json(indent=2))
        return
    click.echo(ks.line())
    click.echo(f"passed {ks.passed}/{ks.n} rows")


def _is_artifact(path: str) -> bool:
    if path.endswith(".kolm"):
        return True
    p = Path(path)
    return p.is_file() and tarfile.is_tarfile(p)


def _verifier_from(path: str, key: str | None, identity: str | None, issuer: str | None):
    """A verifier JSON file, or an artifact's signed one (verified under the flags' trust, else
    kolm's own key: the rules a Specialist was scored by are only worth its signature).

    Raises: InputError (not a verifier, unreadable), ArtifactRejected (signature)."""
    if _is_artifact(path):
        text, manifest = read_verified_text(path, trust_or_default(key, identity, issuer), "verifier.json")
        click.echo(f"verifier    of {manifest.get('name')} {manifest.get('version')}, from {path} (signature verified)",
                   err=True)
        return Verifier.from_json(text, source=f"{path}:{CONTENT_DIR}/verifier.json")
    p = Path(path)
    if not p.is_file():
        raise InputError("verifier file not found", path=path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError("not a verifier: give verifier.json (from `kolm sample`) or a .kolm artifact; "
                         "this is a binary file", path=path) from None
    return Verifier.from_json(text, source=path)
