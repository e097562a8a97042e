"""`kolm compile`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from kolm_ray.cli.app import cli
from kolm_ray.cli.progress import TeacherBar
from kolm_ray.cli.options import claim_options, fit_options, option_help, quota_claim, task_text
from kolm_ray.errors import InputError
from kolm_ray.sampling.config import SampleConfig, TeacherConfig
from kolm_ray.train.config import FitConfig


@cli.command(name="compile", short_help="Compile a task into a signed Specialist.", epilog="""\b
Examples:
  kolm compile --task-file task.txt --examples rows.jsonl --eval holdout.jsonl \\
      --base qwen-2.5-3b-instruct --gate K=88
  kolm compile "draft a 60-word TLDR of the article" --examples tldr.jsonl \\
      --eval tldr-holdout.jsonl --base ./tiny-base --name tldr --epochs 8

\b
Exit codes:
  0  signed: the artifact is in the store
  1  a runtime failure (teacher past its threshold, a budget, the fit, signing)
  2  bad input: a row (named by file:line), the base, an option, ANTHROPIC_API_KEY not set
  3  below the --gate K-score: no artifact, the report kept under ARTIFACTS/rejected/""")
@click.argument("task", required=False)
@click.option("--examples", required=True, type=click.Path(dir_okay=False), help="Rows to distill from (JSONL/Parquet).")
@click.option("--eval", "holdout", required=True, type=click.Path(dir_okay=False),
              help="Held-out rows {input, output} for the K-score.")
@click.option("--base", required=True, help="Base model: short name (qwen-2.5-3b-instruct, phi-3-mini), hub id or folder.")
@click.option("--gate", default=None, help="Minimum holdout K-score, e.g. K=88; below it: exit 3, no artifact.")
@click.option("--task-file", type=click.Path(dir_okay=False), help="Read the task instruction from this file.")
@click.option("--teacher", default=TeacherConfig.model_fields["model"].default, show_default=True,
              help=option_help(TeacherConfig, "model"))
@click.option("--k", default=4, show_default=True, type=click.IntRange(1, 64), help=option_help(SampleConfig, "k"))
@click.option("--n", default=None, type=click.IntRange(1), help=option_help(SampleConfig, "n"))
@click.option("--name", default=None, help="Specialist name [default: from the task].")
@click.option("--out", "store", default=None, type=click.Path(file_okay=False),
              help="Artifact store: a folder or s3://BUCKET/PREFIX [default: $KOLM_HOME/artifacts].")
@click.option("--work-dir", default=None, type=click.Path(file_okay=False),
              help="Working state (samples, checkpoints) [default: runs/NAME].")
@click.option("--sign", "sign_spec", default=None, help="key:PATH, or sigstore [default: kolm's own key].")
@click.option("--batch", is_flag=True, help=option_help(SampleConfig, "batch"))
@click.option("--concurrency", default=64, show_default=True, type=click.IntRange(1), help=option_help(SampleConfig, "concurrency"))
@click.option("--min-agreement", default=SampleConfig.model_fields["min_agreement"].default, show_default=True,
              type=click.FloatRange(0, 1), help=option_help(SampleConfig, "min_agreement"))
@click.option("--max-failed-fraction", default=0.05, show_default=True, type=click.FloatRange(0, 1),
              help=option_help(SampleConfig, "max_failed_fraction"))
@click.option("--prices", type=click.Path(dir_okay=False), help="JSON price table overriding the built-in one.")
@click.option("--address", default=None, help="Ray cluster address [default: RAY_ADDRESS or a local instance].")
@click.option("--new-version", is_flag=True, help="Compile again even when an artifact of identical inputs exists "
              "(by default it is reused: same version, nothing paid or trained).")
@claim_options
@fit_options
def compile_cmd(task, examples, holdout, base, gate, task_file, teacher, k, n, name, store, work_dir, sign_spec,
                batch, concurrency, min_agreement, max_failed_fraction, prices, address, new_version, tenant, max_in_flight,
                calls_per_minute, tokens_per_minute, max_cost_usd, epochs, max_steps, lr,
                lora_r, lora_alpha, target_modules, workers, cpus_per_worker, batch_size, max_length, zero_stage,
                checkpoint_every, max_failures, seed) -> Any:
    """Compile TASK into a signed Specialist: verifier, teacher, fit, eval, gate, sign."""
    from kolm_ray.compile import CompileConfig, derive_name, parse_gate, prepare, queued_compile
    from kolm_ray.home import artifacts_uri, kolm_home
    from kolm_ray.sampling.pricing import load_prices, price_for
    from kolm_ray.signing import signer_from_spec

    instruction = task_text(task, task_file)
    name = name or derive_name(instruction)
    cfg = CompileConfig(
        task=instruction, examples=Path(examples), holdout=Path(holdout), base=base, name=name,
        gate=parse_gate(gate), store=store or artifacts_uri(),  # a folder or s3://...: a str (Path mangles URIs)
        work_dir=Path(work_dir) if work_dir else Path("runs") / name,
    )
    prepared = prepare(cfg)
    price = price_for(teacher, load_prices(prices) if prices else None)
    if not (os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN")):
        raise InputError("set ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL for a proxy) for the teacher")
    fit_cfg = FitConfig(
        epochs=epochs, max_steps=max_steps, lr=lr, lora_r=lora_r, lora_alpha=lora_alpha,
        # None: from the base's architecture (the preflight resolves and checks them)
        target_modules=tuple(m.strip() for m in (target_modules or "").split(",") if m.strip()) or None,
        workers=workers, cpus_per_worker=cpus_per_worker, batch_size=batch_size, max_length=max_length,
        zero_stage=zero_stage, checkpoint_every=checkpoint_every, max_failures=max_failures, seed=seed,
    )
    claim = quota_claim(tenant, max_in_flight, calls_per_minute, tokens_per_minute, max_cost_usd)
    signer = signer_from_spec(sign_spec, say=lambda m: click.echo(m, err=True))
    total = min(prepared.rows.num_rows, n or prepared.rows.num_rows) * k
    with TeacherBar(total) as bar:
        result = queued_compile(
            prepared, state_dir=kolm_home(), teacher=TeacherConfig(model=teacher), sample=SampleConfig(
                k=k, n=n, concurrency=concurrency, min_agreement=min_agreement,
                max_failed_fraction=max_failed_fraction, batch=batch),
            quota=claim, prices=price, fit_cfg=fit_cfg, signer=signer,
            say=bar.say, teacher_progress=bar.update, new_version=new_version, address=address,
        )
    click.echo(result.student.line())
    click.echo(f"artifact    {result.artifact}")
    return result  # for callers that run the command in-process (jobs/nightly.py)


