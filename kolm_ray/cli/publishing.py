"""`kolm publish`, `kolm status`, `kolm promote`, `kolm rollback`: parse, call
``kolm_ray.publish.service``, print."""

from __future__ import annotations

import json
import os

import click
from pydantic import ValidationError

from kolm_ray.cli.app import cli
from kolm_ray.cli.options import option_help, trust_options, trust_or_default
from kolm_ray.errors import InputError
from kolm_ray.home import kolm_home
from kolm_ray.publish import controller
from kolm_ray.publish.release import AuditSettings, check_env
from kolm_ray.publish.service import (
    env_status,
    manual,
    parse_duration,
    publish_artifact,
)


def _poke(env: str) -> None:
    """Tell a running rollout controller (on the cluster at RAY_ADDRESS) to apply the change now."""
    if not os.environ.get("RAY_ADDRESS"):
        return
    # Imports Ray: only once there is a cluster to reach.
    from kolm_ray.cluster import connect

    try:  # the change is already recorded: a controller that can't be reached picks it up on its next tick
        connect(None)
        if controller.poke(env) is not None:
            click.echo(f"applied     the running app kolm-{env} picked the change up")
    except Exception as e:  # noqa: BLE001 - a warning, never a failed publish
        click.echo(f"warning: could not reach the rollout controller of {env!r} ({type(e).__name__}: {e}); "
                   "it applies the change on its next tick", err=True)


@cli.command(name="publish", short_help="Release an artifact to an environment.", epilog="""\b
Examples:
  kolm publish ~/.kolm/artifacts/routing-1.1.kolm --to prod
  kolm publish routing-1.2.kolm --to prod --canary 10 --hold 2h --audit-rate 0.05

\b
Exit codes:
  0  published (stable at once, or behind a canary)
  1  the signature does not verify
  2  bad input: a missing artifact, an unusable key, a bad option, a move the release refuses
  3  the compare with the stable version rejects it (--force publishes anyway)""")
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
              help=option_help(AuditSettings, "rate"))
@click.option("--shadow", is_flag=True, help=option_help(AuditSettings, "shadow"))
@click.option("--audit-tolerance", default=AuditSettings.model_fields["tolerance"].default, show_default=True,
              type=click.FloatRange(0), help=option_help(AuditSettings, "tolerance"))
@click.option("--confidence", default=AuditSettings.model_fields["confidence"].default, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True), help=option_help(AuditSettings, "confidence"))
@click.option("--min-audits", default=AuditSettings.model_fields["min_audits"].default, show_default=True,
              type=click.IntRange(1), help=option_help(AuditSettings, "min_audits"))
@click.option("--force", is_flag=True, help="Publish even if the compare rejects it, or replace a running canary.")
@trust_options("the artifact")
def publish_cmd(artifact: str, env: str, canary: float, hold: str, min_samples: int, tolerance: float,
                audit_rate: float, shadow: bool, audit_tolerance: float, confidence: float, min_audits: int,
                force: bool, key: str | None, identity: str | None, issuer: str | None) -> None:
    """Release ARTIFACT to an environment: the first version is stable at once; a later one goes
    out behind a canary, holds, and is promoted or rolled back by the rollout controller."""
    check_env(env)
    hold_s = parse_duration(hold)
    try:
        audit = AuditSettings(rate=audit_rate, shadow=shadow, tolerance=audit_tolerance, confidence=confidence,
                              min_audits=min_audits)
    except ValidationError as e:
        raise InputError(f"invalid audit settings: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    trust = trust_or_default(key, identity, issuer)
    _, line, comparison = publish_artifact(kolm_home(), env, artifact, trust, weight=canary / 100, hold_s=hold_s,
                                           min_samples=min_samples, tolerance=tolerance, force=force, audit=audit)
    if comparison is not None:
        for c in comparison.lines()[:5]:
            click.echo(c)
    click.echo(line)
    _poke(env)


@cli.command(name="status", short_help="An environment's versions, canaries and K.", epilog="""\b
Examples:
  kolm status --env prod
  kolm status --env prod --json

\b
Exit codes:
  0  shown
  2  bad arguments (no such environment)""")
@click.option("--env", required=True, help="Environment, as given to `kolm publish --to` (e.g. prod).")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status_cmd(env: str, as_json: bool) -> None:
    """Each Specialist in ENV: stable and canary versions, weight, phase, online K, samples, hold left."""
    st = env_status(kolm_home(), env)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    f = lambda x: "n/a" if x is None else f"{x:.1f}"  # noqa: E731

    def failed(entry: dict, who: str) -> str:
        parts = [f"{entry[f'{who}_errors']} errors"] if entry[f"{who}_errors"] else []
        parts += [f"{entry[f'{who}_unavailable']} unavailable (503)"] if entry[f"{who}_unavailable"] else []
        return "".join(f", {x}" for x in parts)

    for e in st["specialists"]:
        audited = e["audited_calls"]
        click.echo(f"{e['name']:<16}{e['phase']:<12}stable {e['stable']} (online K {f(e['stable_online_k'])}, "
                   f"{e['stable_calls']} calls{failed(e, 'stable')}; audited K {f(e['stable_audited_k'])}, {audited['stable']} audits)")
        if e["canary"]:
            click.echo(f"{'':<28}canary {e['canary']} at {100 * e['weight']:g}% (online K {f(e['canary_online_k'])}, "
                       f"{e['canary_calls']}/{e['min_samples']} calls{failed(e, 'canary')}; audited K {f(e['canary_audited_k'])}, "
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


@cli.command(name="promote", short_help="Give a Specialist's canary all traffic now.", epilog="""\b
Examples:
  kolm promote routing --env prod

\b
Exit codes:
  0  promoted
  2  bad arguments (no such environment or Specialist, or no canary to promote)""")
@click.argument("name")
@click.option("--env", required=True, help="Environment the Specialist is released in (e.g. prod).")
def promote_cmd(name: str, env: str) -> None:
    """Give NAME's canary all traffic now."""
    r = manual(kolm_home(), env, name, "promote").releases[name]
    click.echo(f"promoted    {name}@{r.stable.version} is stable in {env} (previous {r.previous.version} kept)")
    _poke(env)


@cli.command(name="rollback", short_help="Send a canary to 0%, or restore the previous.", epilog="""\b
Examples:
  kolm rollback routing --env prod

\b
Exit codes:
  0  rolled back
  2  bad arguments (no such environment or Specialist, or nothing to roll back)""")
@click.argument("name")
@click.option("--env", required=True, help="Environment the Specialist is released in (e.g. prod).")
def rollback_cmd(name: str, env: str) -> None:
    """Send NAME's canary to 0% (or, after a promotion, bring the previous stable back)."""
    r = manual(kolm_home(), env, name, "rollback").releases[name]
    click.echo(f"rolled back {name}: stable {r.stable.version} in {env}")
    _poke(env)
