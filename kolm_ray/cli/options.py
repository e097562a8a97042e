"""The options and arguments the commands share: option groups from the typed configs (the
teacher, a claim on the teacher quota, the fit, trust, the cluster's address), the task text, and
the help epilog (examples and exit codes).

A command takes a group with its decorator (``@teacher_options``, ``@claim_options``,
``@trust_options("the artifact")``) rather than spelling the options out again, so a flag means
the same, with the same default and help, wherever it appears; the help comes from the config's
field descriptions (``option_help``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kolm_ray.admission import check_tenant, default_tenant
from kolm_ray.errors import InputError
from kolm_ray.sampling.config import QuotaConfig, SampleConfig, TeacherConfig
from kolm_ray.serve.config import token_digest
from kolm_ray.signing import Trust, default_trust
from kolm_ray.task import read_task
from kolm_ray.train.config import FitConfig


def epilog(*examples: str, codes: dict[int, str]) -> str:
    """A command's help epilog: its example invocations, then what each exit code means.
    ``\\b`` keeps click from rewrapping them."""
    shown = "\n".join(f"  {e}" for e in examples)
    meaning = "\n".join(f"  {code}  {text}" for code, text in sorted(codes.items()))
    return f"\b\nExamples:\n{shown}\n\n\b\nExit codes:\n{meaning}"


def option_help(model: type, field: str) -> str:
    return model.model_fields[field].description or ""


def task_text(task: str | None, task_file: str | None) -> str:
    """Raises: InputError (see ``kolm_ray.task.read_task``)."""
    return read_task(task, task_file)


def _apply(f, options: list):
    """Decorate ``f`` with ``options`` so they show in the order listed."""
    for opt in reversed(options):
        f = opt(f)
    return f


def address_option(f):
    """--address: the Ray cluster a command joins."""
    return click.option("--address", default=None,
                        help="Ray cluster address [default: RAY_ADDRESS or a local instance].")(f)


def progress_option(f):
    """--progress: how a long command shows its stages' progress (``kolm_ray.cli.progress``)."""
    return click.option("--progress", "progress_mode", default="auto", show_default=True, envvar="KOLM_PROGRESS",
                        type=click.Choice(["auto", "live", "lines", "off"]),
                        help="Stage progress on stderr: live on a terminal, plain lines in a pipe or job log "
                             "(auto chooses by whether stderr is a terminal), or none [env: KOLM_PROGRESS].")(f)


def teacher_options(f):
    """The teacher and its sampling, as a compile and `kolm sample` both take them (``TeacherConfig``,
    ``SampleConfig``), and --prices."""
    return _apply(f, [
        click.option("--teacher", default=TeacherConfig.model_fields["model"].default, show_default=True,
                     help=option_help(TeacherConfig, "model")),
        click.option("--samples-per-input", "--k", "samples_per_input", default=4, show_default=True,
              type=click.IntRange(1, 64), help=option_help(SampleConfig, "samples_per_input")),
        click.option("--n", default=None, type=click.IntRange(1), help=option_help(SampleConfig, "n")),
        click.option("--batch", is_flag=True, help=option_help(SampleConfig, "batch")),
        click.option("--concurrency", default=64, show_default=True, type=click.IntRange(1),
                     help=option_help(SampleConfig, "concurrency")),
        click.option("--min-agreement", default=SampleConfig.model_fields["min_agreement"].default, show_default=True,
                     type=click.FloatRange(0, 1), help=option_help(SampleConfig, "min_agreement")),
        click.option("--max-failed-fraction", default=0.05, show_default=True, type=click.FloatRange(0, 1),
                     help=option_help(SampleConfig, "max_failed_fraction")),
        click.option("--prices", type=click.Path(dir_okay=False), help="JSON price table overriding the built-in one."),
    ])


def rate_options(model: type):
    """--max-in-flight / --calls-per-minute / --tokens-per-minute, with ``model``'s help: a run's
    claim (``QuotaConfig``) or the organization's limits (``RateLimits``). None when not given."""
    def decorate(f):
        return _apply(f, [
            click.option(f"--{field.replace('_', '-')}", default=None, type=click.IntRange(1),
                         help=option_help(model, field))
            for field in ("max_in_flight", "calls_per_minute", "tokens_per_minute")
        ])
    return decorate


def claim_options(f):
    """One compile's (or sampling run's) claim on the organization's teacher quota."""
    return _apply(f, [
        click.option("--tenant", default=None, help="Who the run is for: the queue's fairness and limits, and the "
                     "teacher budget it spends [default: KOLM_TENANT, else the login name]."),
        rate_options(QuotaConfig),
        click.option("--max-cost", "max_cost_usd", default=None, type=click.FloatRange(min=0),
                     help=option_help(QuotaConfig, "max_cost_usd")),
    ])


def quota_claim(tenant: str | None, max_in_flight: int | None, calls_per_minute: int | None, tokens_per_minute: int | None,
                max_cost_usd: float | None) -> QuotaConfig:
    """The claim ``claim_options`` parsed. Raises: InputError (a tenant name kolm cannot use)."""
    return QuotaConfig(tenant=check_tenant(tenant or default_tenant()), max_in_flight=max_in_flight,
                       calls_per_minute=calls_per_minute, tokens_per_minute=tokens_per_minute, max_cost_usd=max_cost_usd)


def fit_options(f):
    return _apply(f, [
        click.option("--epochs", default=FitConfig.model_fields["epochs"].default, show_default=True,
                     type=click.IntRange(1), help=option_help(FitConfig, "epochs")),
        click.option("--max-steps", default=None, type=click.IntRange(0), help=option_help(FitConfig, "max_steps")),
        click.option("--lr", default=FitConfig.model_fields["lr"].default, show_default=True,
                     type=click.FloatRange(min=0, min_open=True), help=option_help(FitConfig, "lr")),
        click.option("--lora-r", default=16, show_default=True, type=click.IntRange(1), help=option_help(FitConfig, "lora_r")),
        click.option("--lora-alpha", default=32, show_default=True, type=click.IntRange(1), help=option_help(FitConfig, "lora_alpha")),
        click.option("--target-modules", default=None,
                     help=option_help(FitConfig, "target_modules") + " Comma-separated, e.g. q_proj,v_proj."),
        click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help=option_help(FitConfig, "workers")),
        click.option("--cpus-per-worker", default=None, type=click.FloatRange(min=0, min_open=True),
                     help=option_help(FitConfig, "cpus_per_worker")),
        click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1), help=option_help(FitConfig, "batch_size")),
        click.option("--max-length", default=1024, show_default=True, type=click.IntRange(16), help=option_help(FitConfig, "max_length")),
        click.option("--zero-stage", default=2, show_default=True, type=click.IntRange(0, 3), help=option_help(FitConfig, "zero_stage")),
        click.option("--checkpoint-every", default=50, show_default=True, type=click.IntRange(1),
                     help=option_help(FitConfig, "checkpoint_every")),
        click.option("--max-failures", default=2, show_default=True, type=click.IntRange(0), help=option_help(FitConfig, "max_failures")),
        click.option("--seed", default=0, show_default=True, type=int, help=option_help(FitConfig, "seed")),
    ])


def trust_options(what: str):
    """--key / --identity / --issuer: whom ``what`` must be signed by (kolm's own key by default)."""
    def decorate(f):
        return _apply(f, [
            click.option("--key", type=click.Path(dir_okay=False), help=f"Public key (PEM) {what} must be signed "
                         "with [default: kolm's own key, $KOLM_HOME/keys/signing.pub]."),
            click.option("--identity", help="Sigstore signer identity (e.g. an e-mail or workflow URI), with --issuer."),
            click.option("--issuer", help="Sigstore OIDC issuer URL of that identity."),
        ])
    return decorate


def trust_from(key: str | None, identity: str | None, issuer: str | None) -> Trust:
    """The trust the flags name. Raises: InputError (no trust named, or an unusable key file)."""
    return Trust(public_key=Path(key) if key else None, identity=identity, issuer=issuer)


def trust_or_default(key: str | None, identity: str | None, issuer: str | None) -> Trust:
    """The trust the flags name, else kolm's own default key; either way said on stderr
    (``trusted     key PATH (kolm's own)``). Raises: InputError."""
    trust = trust_from(key, identity, issuer) if (key or identity or issuer) else default_trust()
    click.echo(f"trusted     {trust.describe()}", err=True)
    return trust


def given(ctx: click.Context, *names: str) -> bool:
    """Whether the user set any of the parameters ``names`` (not left to their defaults)."""
    return any(ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT for name in names)


def parse_pairs(values: tuple[str, ...], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or not k or not val:
            raise InputError(f"invalid {flag} {v!r}: use KEY=VALUE")
        out[k] = val
    return out


def read_api_keys(path: str | None) -> dict[str, str]:
    """An API keys file: JSON {"key name": "token", ...} -> name -> SHA-256 of the token."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read the API keys file ({e})", path=path) from None
    if not isinstance(data, dict) or not data or not all(isinstance(v, str) and len(v) >= 16 for v in data.values()):
        raise InputError('API keys file must be a JSON object {"name": "token", ...} with tokens of 16+ characters',
                         path=path)
    return {name: token_digest(tok) for name, tok in data.items()}
