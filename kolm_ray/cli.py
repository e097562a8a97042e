"""The ``kolm`` command line: parses, validates at the edge, calls the library, prints.

No logic of its own. Errors from ``kolm_ray.errors`` become exit codes here and only here:
2 for bad arguments or input, 1 for runtime failures, 3 for a failed K-score gate.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import click

from kolm_ray.errors import InputError, KolmError


class _KolmGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KolmError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)


def _help(model: type, field: str) -> str:
    return model.model_fields[field].description or ""


def _task_text(task: str | None, task_file: str | None) -> str:
    if task_file:
        p = Path(task_file)
        if not p.is_file():
            raise InputError("task file not found", path=task_file)
        task = p.read_text(encoding="utf-8")
    if not task or not task.strip():
        raise InputError("give the task instruction as TASK or --task-file F")
    return task.strip()


def _slug(task: str) -> str:
    words = re.findall(r"[a-z0-9]+", task.lower())
    return "-".join(words[:5]) or "task"


@click.group(cls=_KolmGroup)
@click.version_option(package_name="kolm_ray")
def cli() -> None:
    """kolm: compile a frontier-model task into a small, signed, self-hosted Specialist."""


from kolm_ray.admission import QueuePolicy  # noqa: E402
from kolm_ray.publish.release import AuditSettings  # noqa: E402
from kolm_ray.sampling.config import QuotaConfig, SampleConfig, TeacherConfig  # noqa: E402
from kolm_ray.sampling.limits import RateLimits  # noqa: E402
from kolm_ray.serve.audit import AuditOptions  # noqa: E402
from kolm_ray.serve.config import ModelDeploymentOptions  # noqa: E402


def _claim_options(f):
    """One compile's (or sampling run's) claim on the organization's teacher quota."""
    for opt in reversed([
        click.option("--tenant", default=None, help="Who the run is for: the queue's fairness and limits, and the "
                     "teacher budget it spends [default: KOLM_TENANT, else the login name]."),
        click.option("--max-in-flight", default=None, type=click.IntRange(1), help=_help(QuotaConfig, "max_in_flight")),
        click.option("--calls-per-minute", default=None, type=click.IntRange(1), help=_help(QuotaConfig, "calls_per_minute")),
        click.option("--tokens-per-minute", default=None, type=click.IntRange(1),
                     help=_help(QuotaConfig, "tokens_per_minute")),
        click.option("--max-cost", "max_cost_usd", default=None, type=click.FloatRange(min=0),
                     help=_help(QuotaConfig, "max_cost_usd")),
    ]):
        f = opt(f)
    return f


def _claim(tenant: str | None, max_in_flight: int | None, calls_per_minute: int | None, tokens_per_minute: int | None,
           max_cost_usd: float | None) -> QuotaConfig:
    from kolm_ray.admission import check_tenant, default_tenant

    return QuotaConfig(tenant=check_tenant(tenant or default_tenant()), max_in_flight=max_in_flight,
                       calls_per_minute=calls_per_minute, tokens_per_minute=tokens_per_minute, max_cost_usd=max_cost_usd)


@cli.command()
@click.argument("task", required=False)
@click.option("--examples", "examples", required=True, type=click.Path(dir_okay=False),
              help="JSONL or Parquet rows {id?, input, output?}.")
@click.option("--task-file", type=click.Path(dir_okay=False), help="Read the task instruction from this file.")
@click.option("--teacher", default=TeacherConfig.model_fields["model"].default, show_default=True,
              help=_help(TeacherConfig, "model"))
@click.option("--k", default=4, show_default=True, type=click.IntRange(1, 64), help=_help(SampleConfig, "k"))
@click.option("--n", default=None, type=click.IntRange(1), help=_help(SampleConfig, "n"))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output folder [default: runs/<task>/samples].")
@click.option("--batch", is_flag=True, help=_help(SampleConfig, "batch"))
@click.option("--batch-poll", "batch_poll_s", default=30.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help=_help(SampleConfig, "batch_poll_s"))
@click.option("--concurrency", default=64, show_default=True, type=click.IntRange(1), help=_help(SampleConfig, "concurrency"))
@click.option("--actors", default=2, show_default=True, type=click.IntRange(1), help=_help(SampleConfig, "actors"))
@click.option("--min-agreement", default=SampleConfig.model_fields["min_agreement"].default, show_default=True,
              type=click.FloatRange(0, 1), help=_help(SampleConfig, "min_agreement"))
@click.option("--max-failed-fraction", default=0.05, show_default=True, type=click.FloatRange(0, 1),
              help=_help(SampleConfig, "max_failed_fraction"))
@click.option("--max-tokens", default=1024, show_default=True, type=click.IntRange(1), help=_help(TeacherConfig, "max_tokens"))
@click.option("--timeout", "timeout_s", default=120.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help=_help(TeacherConfig, "timeout_s"))
@click.option("--max-attempts", default=6, show_default=True, type=click.IntRange(1), help=_help(TeacherConfig, "max_attempts"))
@_claim_options
@click.option("--prices", type=click.Path(dir_okay=False), help="JSON price table overriding the built-in one.")
@click.option("--address", default=None, help="Ray cluster address [default: RAY_ADDRESS or a local instance].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def sample(task: str | None, examples: str, task_file: str | None, teacher: str, k: int, n: int | None,
           out_dir: str | None, batch: bool, batch_poll_s: float, concurrency: int, actors: int, min_agreement: float,
           max_failed_fraction: float, max_tokens: int, timeout_s: float, max_attempts: int, tenant: str | None,
           max_in_flight: int | None, calls_per_minute: int | None, tokens_per_minute: int | None,
           max_cost_usd: float | None, prices: str | None, address: str | None, as_json: bool) -> None:
    """Sample the teacher k times per example row and keep the best sample per row."""
    from kolm_ray.cluster import connect
    from kolm_ray.home import teacher_cache_dir
    from kolm_ray.rows import read_rows
    from kolm_ray.sampling.fanout import sample_rows, write_samples
    from kolm_ray.sampling.pricing import load_prices, price_for

    # Everything the user gave is checked before Ray starts or a call is paid for.
    instruction = _task_text(task, task_file)
    rows = read_rows(examples)
    price = price_for(teacher, load_prices(prices) if prices else None)
    if not (os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN")):
        raise InputError("set ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL for a proxy) for the teacher")
    teacher_cfg = TeacherConfig(model=teacher, max_tokens=max_tokens, timeout_s=timeout_s, max_attempts=max_attempts)
    sample_cfg = SampleConfig(k=k, n=n, concurrency=concurrency, actors=actors, min_agreement=min_agreement,
                              max_failed_fraction=max_failed_fraction, batch=batch, batch_poll_s=batch_poll_s)
    quota_cfg = _claim(tenant, max_in_flight, calls_per_minute, tokens_per_minute, max_cost_usd)
    out = out_dir or str(Path("runs") / _slug(instruction) / "samples")  # a folder or s3://bucket/prefix

    connect(address)
    total = min(rows.num_rows, n or rows.num_rows) * k
    with click.progressbar(length=total, label="teacher", file=sys.stderr, show_pos=True) as bar:
        outcome = sample_rows(instruction, rows, teacher=teacher_cfg, sample=sample_cfg, quota=quota_cfg,
                              prices=price, cache_dir=teacher_cache_dir(), progress=bar.update,
                              on_budget=lambda check: [click.echo(line, err=True) for line in check.lines()])
    written = write_samples(out, outcome)
    if as_json:
        click.echo(json.dumps({**outcome.summary.model_dump(), "out": str(written)}, indent=2))
        return
    click.echo("verifier    " + " · ".join(outcome.verifier.learned()))
    for note in outcome.verifier.notes:
        click.echo(f"            {note}")
    for line in outcome.summary.lines():
        click.echo(line)
    click.echo(f"wrote       {written}/samples.parquet")


@cli.command()
@click.argument("outputs", type=click.Path(dir_okay=False))
@click.option("--verifier", "verifier_path", type=click.Path(dir_okay=False),
              help="verifier.json from `kolm sample` or an artifact.")
@click.option("--examples", type=click.Path(dir_okay=False), help="Synthesize the verifier from these rows instead.")
@click.option("--task", default=None, help="Task instruction (with --examples).")
@click.option("--json", "as_json", is_flag=True, help="Print per-row scores as JSON.")
def score(outputs: str, verifier_path: str | None, examples: str | None, task: str | None, as_json: bool) -> None:
    """Score OUTPUTS (JSONL/Parquet rows {id?, input, output, reference?}) into K, T, C, L."""
    from kolm_ray.kscore import score_rows
    from kolm_ray.rows import read_rows
    from kolm_ray.verifier import Verifier, synthesize

    if bool(verifier_path) == bool(examples):
        raise InputError("give exactly one of --verifier FILE or --examples FILE (with --task)")
    if verifier_path:
        p = Path(verifier_path)
        if not p.is_file():
            raise InputError("verifier file not found", path=verifier_path)
        verifier = Verifier.from_json(p.read_text(), source=verifier_path)
    else:
        ex = read_rows(examples, require_output=True)
        verifier = synthesize(_task_text(task, None), ex.column("output").to_pylist(), ex.column("input").to_pylist())
    rows = read_rows(outputs)
    ks = score_rows(verifier, rows.column("id").to_pylist(), rows.column("output").to_pylist(),
                    rows.column("input").to_pylist(), rows.column("reference").to_pylist())
    if as_json:
        click.echo(ks.model_dump_json(indent=2))
        return
    click.echo(ks.line())
    click.echo(f"passed {ks.passed}/{ks.n} rows")


from kolm_ray.train.config import FitConfig  # noqa: E402


def _fit_options(f):
    for opt in reversed([
        click.option("--epochs", default=FitConfig.model_fields["epochs"].default, show_default=True,
                     type=click.IntRange(1), help=_help(FitConfig, "epochs")),
        click.option("--max-steps", default=None, type=click.IntRange(0), help=_help(FitConfig, "max_steps")),
        click.option("--lr", default=FitConfig.model_fields["lr"].default, show_default=True,
                     type=click.FloatRange(min=0, min_open=True), help=_help(FitConfig, "lr")),
        click.option("--lora-r", default=16, show_default=True, type=click.IntRange(1), help=_help(FitConfig, "lora_r")),
        click.option("--lora-alpha", default=32, show_default=True, type=click.IntRange(1), help=_help(FitConfig, "lora_alpha")),
        click.option("--target-modules", default="q_proj,k_proj,v_proj,o_proj", show_default=True,
                     help=_help(FitConfig, "target_modules") + " Comma-separated."),
        click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help=_help(FitConfig, "workers")),
        click.option("--cpus-per-worker", default=None, type=click.FloatRange(min=0, min_open=True),
                     help=_help(FitConfig, "cpus_per_worker")),
        click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1), help=_help(FitConfig, "batch_size")),
        click.option("--max-length", default=1024, show_default=True, type=click.IntRange(16), help=_help(FitConfig, "max_length")),
        click.option("--zero-stage", default=2, show_default=True, type=click.IntRange(0, 3), help=_help(FitConfig, "zero_stage")),
        click.option("--checkpoint-every", default=50, show_default=True, type=click.IntRange(1),
                     help=_help(FitConfig, "checkpoint_every")),
        click.option("--max-failures", default=2, show_default=True, type=click.IntRange(0), help=_help(FitConfig, "max_failures")),
        click.option("--seed", default=0, show_default=True, type=int, help=_help(FitConfig, "seed")),
    ]):
        f = opt(f)
    return f


@cli.command(name="compile")
@click.argument("task", required=False)
@click.option("--examples", required=True, type=click.Path(dir_okay=False), help="Rows to distill from (JSONL/Parquet).")
@click.option("--eval", "holdout", required=True, type=click.Path(dir_okay=False),
              help="Held-out rows {input, output} for the K-score.")
@click.option("--base", required=True, help="Base model: short name (qwen-2.5-3b-instruct, phi-3-mini), hub id or folder.")
@click.option("--gate", default=None, help="Minimum holdout K-score, e.g. K=88; below it: exit 3, no artifact.")
@click.option("--task-file", type=click.Path(dir_okay=False), help="Read the task instruction from this file.")
@click.option("--teacher", default=TeacherConfig.model_fields["model"].default, show_default=True,
              help=_help(TeacherConfig, "model"))
@click.option("--k", default=4, show_default=True, type=click.IntRange(1, 64), help=_help(SampleConfig, "k"))
@click.option("--n", default=None, type=click.IntRange(1), help=_help(SampleConfig, "n"))
@click.option("--name", default=None, help="Specialist name [default: from the task].")
@click.option("--out", "store", default=None, type=click.Path(file_okay=False),
              help="Artifact store: a folder or s3://BUCKET/PREFIX [default: $KOLM_HOME/artifacts].")
@click.option("--work-dir", default=None, type=click.Path(file_okay=False),
              help="Working state (samples, checkpoints) [default: runs/NAME].")
@click.option("--sign", "sign_spec", default=None, help="key:PATH, or sigstore [default: kolm's own key].")
@click.option("--batch", is_flag=True, help=_help(SampleConfig, "batch"))
@click.option("--concurrency", default=64, show_default=True, type=click.IntRange(1), help=_help(SampleConfig, "concurrency"))
@click.option("--min-agreement", default=SampleConfig.model_fields["min_agreement"].default, show_default=True,
              type=click.FloatRange(0, 1), help=_help(SampleConfig, "min_agreement"))
@click.option("--max-failed-fraction", default=0.05, show_default=True, type=click.FloatRange(0, 1),
              help=_help(SampleConfig, "max_failed_fraction"))
@click.option("--prices", type=click.Path(dir_okay=False), help="JSON price table overriding the built-in one.")
@click.option("--address", default=None, help="Ray cluster address [default: RAY_ADDRESS or a local instance].")
@_claim_options
@_fit_options
def compile_cmd(task, examples, holdout, base, gate, task_file, teacher, k, n, name, store, work_dir, sign_spec,
                batch, concurrency, min_agreement, max_failed_fraction, prices, address, tenant, max_in_flight,
                calls_per_minute, tokens_per_minute, max_cost_usd, epochs, max_steps, lr,
                lora_r, lora_alpha, target_modules, workers, cpus_per_worker, batch_size, max_length, zero_stage,
                checkpoint_every, max_failures, seed) -> Any:
    """Compile TASK into a signed Specialist: verifier, teacher, fit, eval, gate, sign."""
    from kolm_ray.cluster import connect
    from kolm_ray.compile import CompileConfig, derive_name, parse_gate, prepare, queued_compile
    from kolm_ray.home import artifacts_uri, kolm_home
    from kolm_ray.sampling.pricing import load_prices, price_for
    from kolm_ray.signing import signer_from_spec

    instruction = _task_text(task, task_file)
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
        target_modules=tuple(m.strip() for m in target_modules.split(",") if m.strip()),
        workers=workers, cpus_per_worker=cpus_per_worker, batch_size=batch_size, max_length=max_length,
        zero_stage=zero_stage, checkpoint_every=checkpoint_every, max_failures=max_failures, seed=seed,
    )
    claim = _claim(tenant, max_in_flight, calls_per_minute, tokens_per_minute, max_cost_usd)
    signer = signer_from_spec(sign_spec, say=lambda m: click.echo(m, err=True))
    connect(address)
    total = min(prepared.rows.num_rows, n or prepared.rows.num_rows) * k
    with click.progressbar(length=total, label="teacher", file=sys.stderr, show_pos=True) as bar:
        result = queued_compile(
            prepared, state_dir=kolm_home(), teacher=TeacherConfig(model=teacher), sample=SampleConfig(
                k=k, n=n, concurrency=concurrency, min_agreement=min_agreement,
                max_failed_fraction=max_failed_fraction, batch=batch),
            quota=claim, prices=price, fit_cfg=fit_cfg, signer=signer,
            say=lambda line: click.echo("\n" + line if bar.pos and bar.pos < total else line),
            teacher_progress=bar.update,
        )
    click.echo(result.student.line())
    click.echo(f"artifact    {result.artifact}")
    return result  # for callers that run the command in-process (jobs/nightly.py)


@cli.group(name="queue", invoke_without_command=True)
@click.option("--address", default=None, help="Ray cluster address [default: RAY_ADDRESS or a local instance].")
@click.option("--all", "show_all", is_flag=True, help="Also the compiles that ended in the last day.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def queue_cmd(ctx: click.Context, address: str | None, show_all: bool, as_json: bool) -> None:
    """The cluster's compiles: waiting (in admission order) and running, per tenant."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = address
        return
    from kolm_ray.admission import list_tickets
    from kolm_ray.cluster import connect
    from kolm_ray.home import kolm_home

    connect(address)
    order = {"running": 0, "waiting": 1}
    tickets = sorted((t for t in list_tickets(kolm_home()) if show_all or t["state"] in order),
                     key=lambda t: (order.get(t["state"], 2), t["position"] or 0, t["submitted_at"]))
    if as_json:
        click.echo(json.dumps(tickets, indent=2))
        return
    if not tickets:
        click.echo("no compiles" + ("" if show_all else " waiting or running"))
        return
    import time as _time

    click.echo(f"{'ID':<34} {'TENANT':<14} {'STATE':<9} {'POS':>3} {'STAGE':<9} {'PROGRESS':>9} {'SPEND':>9} {'AGE':>7}")
    for t in tickets:
        prog = f"{t['done']}/{t['total']}" if t["total"] else ""
        age = _time.time() - t["submitted_at"]
        click.echo(f"{t['id']:<34} {t['tenant']:<14} {t['state']:<9} {t['position'] or '':>3} "
                   f"{t['stage'] if t['state'] == 'running' else '':<9} {prog:>9} ${t['spend_usd']:>8.4f} "
                   f"{age / 60:>6.1f}m" + (f"  {t['message']}" if t.get("message") and (show_all or t["state"] == "waiting") else ""))


@queue_cmd.command(name="limits")
@click.option("--max-running", default=None, type=click.IntRange(1), help=_help(QueuePolicy, "max_running"))
@click.option("--per-tenant", default=None, type=click.IntRange(1), help=_help(QueuePolicy, "per_tenant"))
@click.option("--tenant-limit", "tenant_limits", multiple=True, help="TENANT=N: this tenant's limit (repeatable).")
@click.option("--lease", "lease_s", default=None, type=click.FloatRange(min=1), help=_help(QueuePolicy, "lease_s"))
@click.option("--pause/--resume", "paused", default=None, help=_help(QueuePolicy, "paused"))
@click.option("--clear", is_flag=True, help="Back to the defaults before applying the other options.")
def queue_limits(max_running: int | None, per_tenant: int | None, tenant_limits: tuple[str, ...],
                 lease_s: float | None, paused: bool | None, clear: bool) -> None:
    """Show or set the queue's admission limits (kept in KOLM_HOME, read at every tick)."""
    from kolm_ray.admission import load_policy, save_policy
    from kolm_ray.home import kolm_home

    policy = QueuePolicy() if clear else load_policy(kolm_home())
    update: dict[str, Any] = {}
    if max_running is not None:
        update["max_running"] = max_running
    if per_tenant is not None:
        update["per_tenant"] = per_tenant
    if lease_s is not None:
        update["lease_s"] = lease_s
    if paused is not None:
        update["paused"] = paused
    if tenant_limits:
        limits = dict(policy.tenant_limits)
        for tenant, n in _pairs(tenant_limits, "--tenant-limit").items():
            if not n.isdigit() or int(n) < 1:
                raise InputError(f"--tenant-limit {tenant}={n}: the limit is a whole number of compiles, at least 1")
            limits[tenant] = int(n)
        update["tenant_limits"] = limits
    if update or clear:
        policy = QueuePolicy.model_validate({**policy.model_dump(), **update})
        save_policy(kolm_home(), policy)
    click.echo(policy.model_dump_json(indent=2))


@cli.command(name="cancel")
@click.argument("ticket")
@click.option("--address", default=None, help="Ray cluster address [default: RAY_ADDRESS or a local instance].")
def cancel_cmd(ticket: str, address: str | None) -> None:
    """Cancel a waiting or running compile (ID from `kolm queue`); what it held is freed."""
    from kolm_ray.admission import cancel
    from kolm_ray.cluster import connect
    from kolm_ray.home import kolm_home

    connect(address)
    res = cancel(kolm_home(), ticket)
    if res["was"] == "running" and (os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_BASE_URL")):
        from kolm_ray.sampling.quota import release_holder

        # Its teacher slots now, not at its driver's exit or its leases' expiry (the ticket is the holder).
        release_holder(os.environ.get("ANTHROPIC_API_KEY"), os.environ.get("ANTHROPIC_BASE_URL"), ticket)
    if res["was"] in ("waiting", "running"):
        click.echo(f"cancelled {ticket} (was {res['was']})")
    else:
        click.echo(f"{ticket} had already ended ({res['was']})")


def _trust(key: str | None, identity: str | None, issuer: str | None):
    from kolm_ray.signing import Trust

    return Trust(public_key=Path(key) if key else None, identity=identity, issuer=issuer)


def _trust_or_default(key: str | None, identity: str | None, issuer: str | None):
    """The trust the flags name, else kolm's own default key (said on stderr)."""
    from kolm_ray.signing import default_trust

    if key or identity or issuer:
        return _trust(key, identity, issuer)
    trust = default_trust()
    click.echo(f"trusting the default key {trust.public_key}", err=True)
    return trust


@cli.command()
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--key", type=click.Path(dir_okay=False), help="Public key (PEM) the artifact must be signed with.")
@click.option("--identity", help="Sigstore signer identity (e.g. an e-mail or workflow URI).")
@click.option("--issuer", help="Sigstore OIDC issuer URL of that identity.")
def verify(artifact: str, key: str | None, identity: str | None, issuer: str | None) -> None:
    """Verify ARTIFACT's signature: exits non-zero on any change, addition or removal, or another signer."""
    from kolm_ray.artifact import open_verified

    with open_verified(artifact, _trust(key, identity, issuer)) as (_, manifest):
        click.echo(f"verified    {artifact}: {manifest['name']} {manifest['version']}, "
                   f"K {manifest['kscore']['student']['k']}")


@cli.command()
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(artifact: str, as_json: bool) -> None:
    """Show ARTIFACT's manifest (unverified: use `kolm verify` to check the signature)."""
    from kolm_ray.artifact import CONTENT_DIR, read_manifest, unpacked

    with unpacked(artifact) as root:
        m = read_manifest(root)
        files = sorted(p.relative_to(root / CONTENT_DIR).as_posix() for p in (root / CONTENT_DIR).rglob("*") if p.is_file())
    if as_json:
        click.echo(json.dumps({**m, "files": files}, indent=2))
        return
    ks, kb = m["kscore"]["student"], m["kscore"]["base"]

    def line(k: dict) -> str:
        f = lambda x: "n/a" if x is None else f"{x:.1f}"  # noqa: E731
        return f"K {k['k']:.1f} (T {f(k['t'])} / C {f(k['c'])} / L {f(k['l'])}), {k['passed']}/{k['n']} rows pass"

    rows = [
        ("specialist", f"{m['name']} {m['version']}  (format {m['format_version']}, created {m['created_at']})"),
        ("task", m["task"]),
        ("base", f"{m['base'].get('name')}  {m['base'].get('revision') or m['base'].get('sha256', '')[:16]}"),
        ("teacher", f"{m['teacher']['model']} k={m['teacher']['k']} ({m['teacher']['mode']}), "
                    f"{m['teacher']['samples']} samples, ${m['teacher']['cost_usd']:.4f}"),
        ("fit", f"{m['fit']['steps']} steps on {m['fit']['examples']} examples, loss "
                f"{m['fit']['loss_start']} → {m['fit']['loss_end']}"),
        ("student", line(ks)),
        ("base model", line(kb)),
        ("gate", "none" if not m.get("gate") else f"K={m['gate']['k']:g} passed"),
        ("compute", ", ".join(f"{k} {v}" for k, v in m["compute"].items())),
        ("files", ", ".join(files)),
    ]
    for k, v in rows:
        click.echo(f"{k:<12}{v}")


@cli.command(name="compare")
@click.argument("old", type=click.Path(dir_okay=False))
@click.argument("new", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--tolerance", default=0.5, show_default=True, type=click.FloatRange(min=0),
              help="K points NEW may fall below OLD and still be promoted.")
@click.option("--max-regressions", default=0, show_default=True, type=click.IntRange(0),
              help="Rows that passed in OLD and fail in NEW allowed for a promote.")
@click.option("--key", type=click.Path(dir_okay=False), help="Public key (PEM) both artifacts must be signed with "
              "[default: kolm's own key, $KOLM_HOME/keys/signing.pub].")
@click.option("--identity", help="Sigstore signer identity (e.g. an e-mail or workflow URI).")
@click.option("--issuer", help="Sigstore OIDC issuer URL of that identity.")
def compare_cmd(old: str, new: str, as_json: bool, tolerance: float, max_regressions: int, key: str | None,
                identity: str | None, issuer: str | None) -> None:
    """Compare two signed artifacts on their shared holdout rows: K/T/C/L deltas, regressed rows,
    and whether to promote NEW. Exits 0 whatever the recommendation (it is a report)."""
    from kolm_ray.compare import compare, load_side

    trust = _trust_or_default(key, identity, issuer)
    old_report, old_meta = load_side(old, trust)
    new_report, new_meta = load_side(new, trust)
    result = compare(old_report, new_report, old_meta, new_meta, tolerance=tolerance, max_regressions=max_regressions)
    if as_json:
        click.echo(result.model_dump_json(indent=2))
        return
    for line in result.lines():
        click.echo(line)


def _pairs(values: tuple[str, ...], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or not k or not val:
            raise InputError(f"invalid {flag} {v!r}: use KEY=VALUE")
        out[k] = val
    return out


def _api_keys(path: str | None) -> dict[str, str]:
    """An API keys file: JSON {"key name": "token", ...} -> name -> SHA-256 of the token."""
    from kolm_ray.serve.config import token_digest

    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read the API keys file ({e})", path=path) from None
    if not isinstance(data, dict) or not data or not all(isinstance(v, str) and len(v) >= 16 for v in data.values()):
        raise InputError('API keys file must be a JSON object {"name": "token", ...} with tokens of 16+ characters',
                         path=path)
    return {name: token_digest(tok) for name, tok in data.items()}


@cli.command(name="serve")
@click.argument("artifacts", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="HTTP port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP host (0.0.0.0 to listen on all).")
@click.option("--address", default=None, help="Ray cluster address [default: RAY_ADDRESS or a local instance].")
@click.option("--app-name", default="kolm", show_default=True, help="Serve application name.")
@click.option("--route-prefix", default="/", show_default=True, help="Route prefix of the application.")
@click.option("--key", type=click.Path(dir_okay=False), help="Public key artifacts must be signed with "
              "[default: kolm's own key, $KOLM_HOME/keys/signing.pub].")
@click.option("--identity", help="Sigstore identity artifacts must be signed by.")
@click.option("--issuer", help="OIDC issuer URL of that identity.")
@click.option("--api-keys", type=click.Path(dir_okay=False), help='JSON file {"name": "token"}: require bearer auth.')
@click.option("--base-path", multiple=True, help="BASE_ID_OR_SHA256=DIR: where this host keeps a base model.")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1), help="Replicas per base model.")
@click.option("--num-gpus", default=None, type=click.FloatRange(0), help="GPU share per replica [default: 1 if the "
              "cluster has GPUs, else 0].")
@click.option("--num-cpus", default=1.0, show_default=True, type=click.FloatRange(0), help="CPUs per replica.")
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--batch-greedy", is_flag=True, help=_help(ModelDeploymentOptions, "batch_greedy"))
@click.option("--max-ongoing", default=16, show_default=True, type=click.IntRange(1),
              help="Requests one replica works on at once.")
@click.option("--max-queued", default=64, show_default=True, type=click.IntRange(0),
              help="Requests queued per base model before 503s.")
@click.option("--emit-config", type=click.Path(dir_okay=False), help="Write a `serve deploy` config here and exit.")
@click.option("--detach", is_flag=True, help="Return once deployed; the app keeps running on the cluster.")
@click.option("--env", default=None, help="Serve an environment's released Specialists (see `kolm publish`), with "
              "its canary split and rollout controller, instead of ARTIFACTS.")
@click.option("--rollout-interval", default=10.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds between the rollout controller's ticks (with --env).")
@click.option("--audit-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help=_help(AuditOptions, "rate") + " The teacher is asked off the request path.")
@click.option("--audit-teacher", default=AuditOptions.model_fields["teacher"].default, show_default=True,
              help=_help(AuditOptions, "teacher"))
@click.option("--audit-max-pending", default=AuditOptions.model_fields["max_pending"].default, show_default=True,
              type=click.IntRange(1), help=_help(AuditOptions, "max_pending"))
def serve_cmd(artifacts: tuple[str, ...], port: int, host: str, address: str | None, app_name: str, route_prefix: str,
              key: str | None, identity: str | None, issuer: str | None, api_keys: str | None,
              base_path: tuple[str, ...], replicas: int, num_gpus: float | None, num_cpus: float,
              max_batch_size: int, batch_greedy: bool, max_ongoing: int, max_queued: int, emit_config: str | None,
              detach: bool, env: str | None, rollout_interval: float, audit_rate: float, audit_teacher: str,
              audit_max_pending: int) -> None:
    """Serve ARTIFACTS over OpenAI-compatible HTTP on Ray Serve: one deployment per base model,
    every Specialist's adapter on it, a receipt for every call."""
    from pydantic import ValidationError

    from kolm_ray.home import kolm_home
    from kolm_ray.serve.config import ModelDeploymentOptions, ServeConfig

    if env is not None:
        from kolm_ray.home import kolm_home as _home
        from kolm_ray.publish.release import ReleaseStore

        if artifacts or emit_config:
            raise InputError("--env serves the environment's released versions: give no ARTIFACTS or --emit-config")
        store = ReleaseStore(_home(), env)
        if not store.exists():
            raise InputError(f"no environment {env!r}: `kolm publish ART --to {env}` creates it")
        state = store.load()
        artifacts = tuple(sorted({v.artifact for r in state.releases.values() for v in r.hosted()}))
        app_name = f"kolm-{env}"
        if any(r.canary and r.canary.audit.rate > 0 for r in state.releases.values()):
            if not os.environ.get("ANTHROPIC_API_KEY"):
                click.echo("warning: a canary in this environment is audited, but ANTHROPIC_API_KEY is not set "
                           "here: the ingress uses its node's environment, or records its audits as failed", err=True)
    if not artifacts:
        raise InputError("give the .kolm artifacts to serve")
    from kolm_ray.store import is_remote, location_of

    for a in artifacts:
        if not is_remote(a) and not Path(a).is_file():
            raise InputError("artifact not found", path=a)
    trust = _trust_or_default(key, identity, issuer)
    if audit_rate > 0 and not os.environ.get("ANTHROPIC_API_KEY"):
        raise InputError("--audit-rate asks the teacher for references: set ANTHROPIC_API_KEY (and "
                         "ANTHROPIC_BASE_URL for a proxy)")
    if detach and not (address or os.environ.get("RAY_ADDRESS")):
        raise InputError("--detach needs a running cluster to leave the app on: give --address or set RAY_ADDRESS")
    from kolm_ray.serve.catalog import build_catalog

    base_paths = _pairs(base_path, "--base-path")
    key_digests = _api_keys(api_keys)
    paths = [location_of(a) for a in artifacts]  # absolute paths, or s3:// URIs each replica downloads
    catalog = build_catalog(paths, trust, base_paths)  # verified before Ray starts
    for r in catalog.refused:
        click.echo(f"refused     {r.artifact}: {r.reason}", err=True)
    if not catalog.specialists:
        raise InputError("nothing to serve: every artifact was refused")
    if emit_config is None:
        import ray

        from kolm_ray.cluster import connect

        connect(address)
        if num_gpus is None:
            num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    try:
        cfg = ServeConfig(
            artifacts=paths,
            trust_key=str(trust.public_key.resolve()) if trust.public_key else None,
            trust_identity=trust.identity, trust_issuer=trust.issuer, store=str(kolm_home()), app_name=app_name,
            route_prefix=route_prefix, base_paths=base_paths, api_key_digests=key_digests,
            model=ModelDeploymentOptions(replicas=replicas, num_gpus=num_gpus or 0.0, num_cpus=num_cpus,
                                         max_batch_size=max_batch_size, max_ongoing_requests=max_ongoing,
                                         max_queued_requests=max_queued, batch_greedy=batch_greedy),
            audit=AuditOptions(rate=audit_rate, teacher=audit_teacher, max_pending=audit_max_pending),
        )
    except ValidationError as e:
        raise InputError(f"invalid serving options: {e.errors()[0]['msg']}") from None
    if emit_config:
        from kolm_ray.serve.app import deploy_config

        Path(emit_config).write_text(json.dumps(deploy_config(cfg, host, port), indent=2) + "\n")
        click.echo(f"wrote {emit_config}: run `serve deploy {emit_config}` against the cluster")
        return
    if env is not None:
        from kolm_ray.publish import controller

        base = cfg.model_dump(exclude={"artifacts", "app_name", "pins", "routes"})
        controller.start(env, kolm_home(), base, host, port, rollout_interval)
        click.echo(f"rollout     controller kolm-rollout-{env} ticks every {rollout_interval:g} s")
    else:
        from kolm_ray.serve.app import run

        run(cfg, host=host, port=port, catalog=catalog)
    for s in catalog.specialists:
        click.echo(f"serving     {s.ref}  ({s.artifact})")
    prefix = route_prefix.rstrip("/")
    click.echo(f"endpoint    http://{host}:{port}{prefix}/v1  (receipts under {cfg.receipts_dir})")
    if audit_rate > 0:
        click.echo(f"audits      {100 * audit_rate:g}% of calls get a reference from the teacher, off the request "
                   "path; recorded in the receipts")
    if detach:
        return
    import time

    from ray import serve

    click.echo("Ctrl-C stops serving")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        if env is not None:
            from kolm_ray.publish import controller

            controller.stop(env)
        serve.delete(app_name)  # graceful: replicas drain and flush their receipts
        click.echo("stopped")


def _poke(env: str) -> None:
    """Tell a running rollout controller (on the cluster at RAY_ADDRESS) to apply the change now."""
    if not os.environ.get("RAY_ADDRESS"):
        return
    from kolm_ray.cluster import connect
    from kolm_ray.publish import controller

    try:  # the change is already recorded: a controller that can't be reached picks it up on its next tick
        connect(None)
        if controller.poke(env) is not None:
            click.echo(f"applied     the running app kolm-{env} picked the change up")
    except Exception as e:  # noqa: BLE001 - a warning, never a failed publish
        click.echo(f"warning: could not reach the rollout controller of {env!r} ({type(e).__name__}: {e}); "
                   "it applies the change on its next tick", err=True)


@cli.command(name="publish")
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--to", "env", required=True, help="Environment (e.g. prod, marketing-prod).")
@click.option("--canary", default=5.0, show_default=True, type=click.FloatRange(0, 100, min_open=True),
              help="Percent of the Specialist's traffic the new version gets while it holds.")
@click.option("--hold", default="24h", show_default=True, help="How long the canary holds before it may be promoted.")
@click.option("--min-samples", default=200, show_default=True, type=click.IntRange(1),
              help="Canary calls needed before it is judged.")
@click.option("--tolerance", default=0.5, show_default=True, type=click.FloatRange(0),
              help="K points the new version may trail stable (offline compare and online).")
@click.option("--audit-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help=_help(AuditSettings, "rate"))
@click.option("--shadow", is_flag=True, help=_help(AuditSettings, "shadow"))
@click.option("--audit-tolerance", default=AuditSettings.model_fields["tolerance"].default, show_default=True,
              type=click.FloatRange(0), help=_help(AuditSettings, "tolerance"))
@click.option("--confidence", default=AuditSettings.model_fields["confidence"].default, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True), help=_help(AuditSettings, "confidence"))
@click.option("--min-audits", default=AuditSettings.model_fields["min_audits"].default, show_default=True,
              type=click.IntRange(1), help=_help(AuditSettings, "min_audits"))
@click.option("--force", is_flag=True, help="Publish even if the compare rejects it, or replace a running canary.")
@click.option("--key", type=click.Path(dir_okay=False), help="Public key the artifact must be signed with.")
@click.option("--identity", help="Sigstore signer identity.")
@click.option("--issuer", help="Sigstore OIDC issuer URL.")
def publish_cmd(artifact: str, env: str, canary: float, hold: str, min_samples: int, tolerance: float,
                audit_rate: float, shadow: bool, audit_tolerance: float, confidence: float, min_audits: int,
                force: bool, key: str | None, identity: str | None, issuer: str | None) -> None:
    """Release ARTIFACT to an environment: the first version is stable at once; a later one goes
    out behind a canary, holds, and is promoted or rolled back by the rollout controller."""
    from kolm_ray.home import kolm_home
    from kolm_ray.publish.release import check_env
    from kolm_ray.publish.service import parse_duration, publish_artifact

    from pydantic import ValidationError

    check_env(env)
    hold_s = parse_duration(hold)
    try:
        audit = AuditSettings(rate=audit_rate, shadow=shadow, tolerance=audit_tolerance, confidence=confidence,
                              min_audits=min_audits)
    except ValidationError as e:
        raise InputError(f"invalid audit settings: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    trust = _trust_or_default(key, identity, issuer)
    _, line, comparison = publish_artifact(kolm_home(), env, artifact, trust, weight=canary / 100, hold_s=hold_s,
                                           min_samples=min_samples, tolerance=tolerance, force=force, audit=audit)
    if comparison is not None:
        for c in comparison.lines()[:5]:
            click.echo(c)
    click.echo(line)
    _poke(env)


@cli.command(name="status")
@click.option("--env", required=True, help="Environment.")
@click.option("--json", "as_json", is_flag=True)
def status_cmd(env: str, as_json: bool) -> None:
    """Each Specialist in ENV: stable and canary versions, weight, phase, online K, samples, hold left."""
    from kolm_ray.home import kolm_home
    from kolm_ray.publish.service import env_status

    st = env_status(kolm_home(), env)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    f = lambda x: "n/a" if x is None else f"{x:.1f}"  # noqa: E731
    for e in st["specialists"]:
        audited = e["audited_calls"]
        click.echo(f"{e['name']:<16}{e['phase']:<12}stable {e['stable']} (online K {f(e['stable_online_k'])}, "
                   f"{e['stable_calls']} calls; audited K {f(e['stable_audited_k'])}, {audited['stable']} audits)")
        if e["canary"]:
            click.echo(f"{'':<28}canary {e['canary']} at {100 * e['weight']:g}% (online K {f(e['canary_online_k'])}, "
                       f"{e['canary_calls']}/{e['min_samples']} calls; audited K {f(e['canary_audited_k'])}, "
                       f"{audited['canary']} audits), hold {e['hold_left_s']:.0f} s left")
            missing = {k: e["audit_failed"][k] + e["audit_dropped"][k] for k in ("stable", "canary")}
            if e["audit"]["rate"] > 0 or any(missing.values()):
                click.echo(f"{'':<28}audits: {audited['canary']} canary + {audited['stable']} stable, "
                           f"{sum(e['audit_failed'].values())} failed (teacher), "
                           f"{sum(e['audit_dropped'].values())} dropped (queue full), ${e['audit_cost_usd']:.4f}"
                           + (f" + {e['audit_uncosted']} uncosted (no price for the teacher)"
                              if e["audit_uncosted"] else ""))
            ev = e["evidence"]
            click.echo(f"{'':<28}evidence ({ev['signal']} K): {ev['action']}: {ev['reason']}")
        if e["last_decision"]:
            click.echo(f"{'':<28}controller: {e['last_decision']['action']}: {e['last_decision']['reason']}")
        elif e["last_transition"]:
            t = e["last_transition"]
            click.echo(f"{'':<28}last: {t['phase']} {t['version']}: {t['reason']}")


@cli.command(name="promote")
@click.argument("name")
@click.option("--env", required=True)
def promote_cmd(name: str, env: str) -> None:
    """Give NAME's canary all traffic now."""
    from kolm_ray.home import kolm_home
    from kolm_ray.publish.service import manual

    r = manual(kolm_home(), env, name, "promote").releases[name]
    click.echo(f"promoted    {name}@{r.stable.version} is stable in {env} (previous {r.previous.version} kept)")
    _poke(env)


@cli.command(name="rollback")
@click.argument("name")
@click.option("--env", required=True)
def rollback_cmd(name: str, env: str) -> None:
    """Send NAME's canary to 0% (or, after a promotion, bring the previous stable back)."""
    from kolm_ray.home import kolm_home
    from kolm_ray.publish.service import manual

    r = manual(kolm_home(), env, name, "rollback").releases[name]
    click.echo(f"rolled back {name}: stable {r.stable.version} in {env}")
    _poke(env)


@cli.group()
def receipts() -> None:
    """The receipt log of served calls."""


@receipts.command(name="verify")
@click.option("--store", type=click.Path(file_okay=False), help="kolm's store [default: KOLM_HOME].")
@click.option("--app-name", default=None, help="Only this application's receipts.")
@click.option("--json", "as_json", is_flag=True)
def receipts_verify(store: str | None, app_name: str | None, as_json: bool) -> None:
    """Check every receipt's hash and the chain: exits 1 on an edited, dropped or reordered receipt."""
    from kolm_ray.errors import KolmRuntimeError
    from kolm_ray.home import kolm_home
    from kolm_ray.serve.receipts import verify_log

    root = Path(store) if store else kolm_home()
    directory = root / "receipts" / (app_name or "")
    if not directory.is_dir():
        raise InputError("no receipts here", path=str(directory))
    report = verify_log(directory)
    if as_json:
        click.echo(json.dumps({"ok": report.ok, **report.model_dump()}, indent=2))
    else:
        for seg in report.segments:
            click.echo(f"{'ok' if not seg.problems else 'TAMPERED':<9}{seg.segment}  {seg.receipts} receipts")
            for p in seg.problems:
                click.echo(f"         {p}")
    if not report.ok:
        raise KolmRuntimeError(f"receipt log under {directory} failed verification"
                               if report.segments else f"no receipt segments under {directory}")
    if not as_json:
        click.echo(f"verified    {report.receipts} receipts in {len(report.segments)} segment(s)")


@cli.group()
def base() -> None:
    """Base models."""


@base.command(name="tiny")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--hidden-size", default=128, show_default=True, type=click.IntRange(16))
@click.option("--layers", default=2, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
def base_tiny(out: str, hidden_size: int, layers: int, seed: int) -> None:
    """Write a tiny random-init Qwen2 causal LM with an offline tokenizer to OUT."""
    from kolm_ray.train.base import build_tiny_base

    path = build_tiny_base(out, hidden_size=hidden_size, layers=layers, seed=seed)
    click.echo(f"wrote a tiny Qwen2 base to {path}")


@cli.group(name="teacher-limits")
def teacher_limits() -> None:
    """The organization's teacher limits and tenants' budgets (the operator's; compiles only read them)."""


@teacher_limits.command(name="set")
@click.option("--key", default=None, help="The key digest the change is for (`kolm teacher-limits show` lists it) "
              "[default: the default entry, for every key without its own].")
@click.option("--this-key", is_flag=True, help="For this environment's key (ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL).")
@click.option("--max-in-flight", type=click.IntRange(1), default=None, help=_help(RateLimits, "max_in_flight"))
@click.option("--calls-per-minute", type=click.IntRange(1), default=None, help=_help(RateLimits, "calls_per_minute"))
@click.option("--tokens-per-minute", type=click.IntRange(1), default=None, help=_help(RateLimits, "tokens_per_minute"))
@click.option("--tenant", default=None, help="The tenant whose budget --budget-usd / --budget-tokens set.")
@click.option("--budget-usd", type=click.FloatRange(min=0), default=None, help="The tenant's budget in US dollars.")
@click.option("--budget-tokens", type=click.IntRange(0), default=None, help="The tenant's budget in billed tokens.")
def teacher_limits_set(key: str | None, this_key: bool, max_in_flight: int | None, calls_per_minute: int | None,
                       tokens_per_minute: int | None, tenant: str | None, budget_usd: float | None,
                       budget_tokens: int | None) -> None:
    """Change the given limits (the rest are kept); running quotas pick them up within a second."""
    from kolm_ray.sampling.limits import key_digest, set_limits, show_limits

    if this_key:
        key = key_digest(os.environ.get("ANTHROPIC_API_KEY"), os.environ.get("ANTHROPIC_BASE_URL"))
    set_limits(key=key, max_in_flight=max_in_flight, calls_per_minute=calls_per_minute,
               tokens_per_minute=tokens_per_minute, tenant=tenant, budget_usd=budget_usd, budget_tokens=budget_tokens)
    for line in show_limits(os.environ.get("ANTHROPIC_API_KEY"), os.environ.get("ANTHROPIC_BASE_URL")).lines():
        click.echo(line)


@teacher_limits.command(name="show")
@click.option("--json", "as_json", is_flag=True, help="Print the file, this key's limits and spend as JSON.")
def teacher_limits_show(as_json: bool) -> None:
    """The limits as they apply to this environment's key, and its tenants' budgets and spend."""
    from kolm_ray.sampling.limits import show_limits

    view = show_limits(os.environ.get("ANTHROPIC_API_KEY"), os.environ.get("ANTHROPIC_BASE_URL"))
    if as_json:
        click.echo(view.model_dump_json(indent=2))
        return
    for line in view.lines():
        click.echo(line)


def main() -> None:
    cli(prog_name="kolm")


if __name__ == "__main__":
    main()
