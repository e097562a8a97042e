"""The operator's commands: `kolm queue`, `kolm cancel`, `kolm teacher-limits`: parse, call
``kolm_ray.admission`` / ``sampling.limits``, print."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from kolm_ray.admission import (
    QueuePolicy,
    cancel,
    list_tickets,
    load_policy,
    save_policy,
)
from kolm_ray.cli.app import cli
from kolm_ray.cli.options import (
    address_option,
    epilog,
    option_help,
    parse_pairs,
    rate_options,
)
from kolm_ray.errors import InputError
from kolm_ray.home import kolm_home
from kolm_ray.sampling.limits import (
    RateLimits,
    key_digest,
    set_limits,
    show_limits,
    teacher_identity,
)


@cli.group(name="queue", invoke_without_command=True, short_help="The cluster's compiles, waiting and running.",
           epilog=epilog("kolm queue", "kolm queue --all --json --address 10.0.0.5:6379",
                         "kolm queue limits --per-tenant 2 --tenant-limit acme=4",
                         codes={0: "listed", 1: "the cluster or the queue could not be reached",
                                2: "bad arguments"}))
@address_option
@click.option("--all", "show_all", is_flag=True, help="Also the compiles that ended in the last day.")
@click.option("--json", "as_json", is_flag=True, help="Print the tickets as JSON.")
@click.pass_context
def queue_cmd(ctx: click.Context, address: str | None, show_all: bool, as_json: bool) -> None:
    """The cluster's compiles: waiting (in admission order) and running, per tenant."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = address
        return
    # Imports Ray: the listing needs the cluster, the subcommands do not.
    from kolm_ray.cluster import connect

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
    click.echo(f"{'ID':<34} {'TENANT':<14} {'STATE':<9} {'POS':>3} {'STAGE':<9} {'PROGRESS':>9} {'SPEND':>9} {'AGE':>7}")
    for t in tickets:
        prog = f"{t['done']}/{t['total']}" if t["total"] else ""
        age = time.time() - t["submitted_at"]
        click.echo(f"{t['id']:<34} {t['tenant']:<14} {t['state']:<9} {t['position'] or '':>3} "
                   f"{t['stage'] if t['state'] == 'running' else '':<9} {prog:>9} ${t['spend_usd']:>8.4f} "
                   f"{age / 60:>6.1f}m" + (f"  {t['message']}" if t.get("message") and (show_all or t["state"] == "waiting") else ""))


@queue_cmd.command(name="limits", short_help="Show or set the queue's admission limits.", epilog=epilog(
    "kolm queue limits",
    "kolm queue limits --per-tenant 2 --tenant-limit acme=4 --max-running 8",
    "kolm queue limits --pause",
    codes={0: "shown (and saved)", 2: "bad arguments (a --tenant-limit that is not TENANT=N)"}))
@click.option("--max-running", default=None, type=click.IntRange(1), help=option_help(QueuePolicy, "max_running"))
@click.option("--per-tenant", default=None, type=click.IntRange(1), help=option_help(QueuePolicy, "per_tenant"))
@click.option("--tenant-limit", "tenant_limits", multiple=True, help="TENANT=N: this tenant's limit (repeatable).")
@click.option("--lease", "lease_s", default=None, type=click.FloatRange(min=1), help=option_help(QueuePolicy, "lease_s"))
@click.option("--pause/--resume", "paused", default=None, help=option_help(QueuePolicy, "paused"))
@click.option("--clear", is_flag=True, help="Back to the defaults before applying the other options.")
def queue_limits(max_running: int | None, per_tenant: int | None, tenant_limits: tuple[str, ...],
                 lease_s: float | None, paused: bool | None, clear: bool) -> None:
    """Show or set the queue's admission limits (kept in KOLM_HOME, read at every tick)."""
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
        for tenant, n in parse_pairs(tenant_limits, "--tenant-limit").items():
            if not n.isdigit() or int(n) < 1:
                raise InputError(f"--tenant-limit {tenant}={n}: the limit is a whole number of compiles, at least 1")
            limits[tenant] = int(n)
        update["tenant_limits"] = limits
    if update or clear:
        policy = QueuePolicy.model_validate({**policy.model_dump(), **update})
        save_policy(kolm_home(), policy)
    click.echo(policy.model_dump_json(indent=2))


@cli.command(name="cancel", short_help="Cancel a waiting or running compile.", epilog=epilog(
    "kolm cancel tldr-3f9a1c2e",
    codes={0: "cancelled, or it had already ended", 1: "the cluster or the queue could not be reached",
           2: "bad arguments (no such ticket)"}))
@click.argument("ticket")
@address_option
def cancel_cmd(ticket: str, address: str | None) -> None:
    """Cancel a waiting or running compile (ID from `kolm queue`); what it held is freed."""
    # Both import Ray: a cancel needs the cluster (the queue, the teacher quota's actor).
    from kolm_ray.cluster import connect
    from kolm_ray.sampling.quota import release_holder

    connect(address)
    res = cancel(kolm_home(), ticket)
    if res["was"] == "running" and any(teacher_identity()):
        # Its teacher slots now, not at its driver's exit or its leases' expiry (the ticket is the holder).
        release_holder(*teacher_identity(), ticket)
    if res["was"] in ("waiting", "running"):
        click.echo(f"cancelled {ticket} (was {res['was']})")
    else:
        click.echo(f"{ticket} had already ended ({res['was']})")



@cli.group(name="teacher-limits", short_help="The organization's teacher limits and budgets.", epilog=epilog(
    "kolm teacher-limits show",
    "kolm teacher-limits set --max-in-flight 16 --calls-per-minute 1000",
    codes={0: "done", 2: "bad arguments"}))
def teacher_limits() -> None:
    """The organization's teacher limits and tenants' budgets (the operator's; compiles only read them)."""


@teacher_limits.command(name="set", short_help="Change the given teacher limits or a budget.", epilog=epilog(
    "kolm teacher-limits set --max-in-flight 16 --calls-per-minute 1000 --tokens-per-minute 400000",
    "kolm teacher-limits set --tenant acme --budget-usd 200",
    codes={0: "saved", 2: "bad arguments (a budget without --tenant, a value out of range)"}))
@click.option("--key", default=None, help="The key digest the change is for (`kolm teacher-limits show` lists it) "
              "[default: the default entry, for every key without its own].")
@click.option("--this-key", is_flag=True, help="For this environment's key (ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN, and ANTHROPIC_BASE_URL).")
@rate_options(RateLimits)
@click.option("--tenant", default=None, help="The tenant whose budget --budget-usd / --budget-tokens set.")
@click.option("--budget-usd", type=click.FloatRange(min=0), default=None, help="The tenant's budget in US dollars.")
@click.option("--budget-tokens", type=click.IntRange(0), default=None, help="The tenant's budget in billed tokens.")
def teacher_limits_set(key: str | None, this_key: bool, max_in_flight: int | None, calls_per_minute: int | None,
                       tokens_per_minute: int | None, tenant: str | None, budget_usd: float | None,
                       budget_tokens: int | None) -> None:
    """Change the given limits (the rest are kept); running quotas pick them up within a second."""
    if this_key:
        key = key_digest(*teacher_identity())
    set_limits(key=key, max_in_flight=max_in_flight, calls_per_minute=calls_per_minute,
               tokens_per_minute=tokens_per_minute, tenant=tenant, budget_usd=budget_usd, budget_tokens=budget_tokens)
    for line in show_limits(*teacher_identity()).lines():
        click.echo(line)


@teacher_limits.command(name="show", short_help="Show this key's limits, budgets and spend.", epilog=epilog(
    "kolm teacher-limits show",
    "kolm teacher-limits show --json",
    codes={0: "shown", 2: "an unreadable limits file"}))
@click.option("--json", "as_json", is_flag=True, help="Print the file, this key's limits and spend as JSON.")
def teacher_limits_show(as_json: bool) -> None:
    """The limits as they apply to this environment's key, and its tenants' budgets and spend."""
    view = show_limits(*teacher_identity())
    if as_json:
        click.echo(view.model_dump_json(indent=2))
        return
    for line in view.lines():
        click.echo(line)
