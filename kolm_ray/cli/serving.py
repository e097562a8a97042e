"""`kolm serve` and `kolm receipts`: parse, call ``kolm_ray.serve.launch`` / ``serve.receipts``, print."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kolm_ray.cli.app import cli
from kolm_ray.cli.options import (
    address_option,
    given,
    option_help,
    parse_pairs,
    read_api_keys,
    trust_options,
    trust_or_default,
)
from kolm_ray.errors import InputError, KolmRuntimeError
from kolm_ray.home import kolm_home
from kolm_ray.serve import launch
from kolm_ray.serve.audit import AuditOptions
from kolm_ray.serve.config import ModelDeploymentOptions
from kolm_ray.serve.receipts import verify_log


@cli.command(name="serve", short_help="Serve Specialists over OpenAI-compatible HTTP.", epilog="""\b
Examples:
  kolm serve ~/.kolm/artifacts/routing-1.0.kolm ~/.kolm/artifacts/tldr-1.2.kolm --port 8000
  kolm serve --env prod --address 10.0.0.5:6379 --detach
  kolm serve --stop --env prod --address 10.0.0.5:6379

\b
Exit codes:
  0  stopped with Ctrl-C, deployed (--detach), the config written (--emit-config), or stopped (--stop)
  1  a runtime failure (the cluster, Serve), or nothing to stop (--stop)
  2  bad input: a missing artifact, an unusable key, every artifact refused, a bad option, a --port or
     --host other than the running Serve's, a route prefix another app holds""")
@click.argument("artifacts", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="HTTP port. Serve "
              "keeps the port it first started on: on a cluster where it runs already, the app joins that port "
              "(a different --port given is refused).")
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP host (0.0.0.0 to listen on all); fixed "
              "like --port once Serve runs.")
@address_option
@click.option("--app-name", default="kolm", show_default=True, help="Serve application name.")
@click.option("--route-prefix", default="/", show_default=True, help="Route prefix of the application.")
@trust_options("artifacts")
@click.option("--api-keys", type=click.Path(dir_okay=False), help='JSON file {"name": "token"}: require bearer auth.')
@click.option("--base-path", multiple=True, help="BASE_ID_OR_SHA256=DIR: where this host keeps a base model.")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1), help="Replicas per base model.")
@click.option("--num-gpus", default=None, type=click.FloatRange(0), help="GPU share per replica [default: 1 if the "
              "cluster has GPUs, else 0].")
@click.option("--num-cpus", default=1.0, show_default=True, type=click.FloatRange(0), help="CPUs per replica.")
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(1),
              help="Most requests one replica generates for in one batch (across adapters).")
@click.option("--batch-greedy", is_flag=True, help=option_help(ModelDeploymentOptions, "batch_greedy"))
@click.option("--max-ongoing", default=16, show_default=True, type=click.IntRange(1),
              help="Requests one replica works on at once.")
@click.option("--max-queued", default=64, show_default=True, type=click.IntRange(0),
              help="Requests queued per base model before 503s.")
@click.option("--emit-config", type=click.Path(dir_okay=False), help="Write a `serve deploy` config here and exit.")
@click.option("--detach", is_flag=True, help="Return once deployed; the app keeps running on the cluster.")
@click.option("--stop", is_flag=True, help="Stop the app --app-name (or the environment's app and rollout "
              "controller, --env) on the cluster at --address / RAY_ADDRESS, gracefully: replicas drain and flush "
              "their receipts. Exits 1 when there is nothing to stop.")
@click.option("--env", default=None, help="Serve an environment's released Specialists (see `kolm publish`), with "
              "its canary split and rollout controller, instead of ARTIFACTS.")
@click.option("--rollout-interval", default=10.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds between the rollout controller's ticks (with --env).")
@click.option("--audit-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help=option_help(AuditOptions, "rate") + " The teacher is asked off the request path.")
@click.option("--audit-teacher", default=AuditOptions.model_fields["teacher"].default, show_default=True,
              help=option_help(AuditOptions, "teacher"))
@click.option("--audit-max-pending", default=AuditOptions.model_fields["max_pending"].default, show_default=True,
              type=click.IntRange(1), help=option_help(AuditOptions, "max_pending"))
@click.pass_context
def serve_cmd(ctx: click.Context, artifacts: tuple[str, ...], port: int, host: str, address: str | None,
              app_name: str, route_prefix: str, key: str | None, identity: str | None, issuer: str | None,
              api_keys: str | None, base_path: tuple[str, ...], replicas: int, num_gpus: float | None,
              num_cpus: float, max_batch_size: int, batch_greedy: bool, max_ongoing: int, max_queued: int,
              emit_config: str | None, detach: bool, env: str | None, rollout_interval: float, audit_rate: float,
              audit_teacher: str, audit_max_pending: int, stop: bool = False) -> None:
    """Serve ARTIFACTS over OpenAI-compatible HTTP on Ray Serve: one deployment per base model,
    every Specialist's adapter on it, a receipt for every call."""
    if stop:
        if artifacts or emit_config or detach:
            raise InputError("--stop takes no ARTIFACTS, --emit-config or --detach: name the app (--app-name) "
                             "or the environment (--env)")
        launch.stop_serving(app_name, env, address, say=click.echo)
        return
    request = launch.ServeRequest(
        artifacts=artifacts, env=env, app_name=app_name, route_prefix=route_prefix, host=host, port=port,
        endpoint_given=given(ctx, "host", "port"), address=address, base_paths=parse_pairs(base_path, "--base-path"),
        api_key_digests=read_api_keys(api_keys), replicas=replicas, num_gpus=num_gpus, num_cpus=num_cpus,
        max_batch_size=max_batch_size, batch_greedy=batch_greedy, max_ongoing=max_ongoing, max_queued=max_queued,
        audit=AuditOptions(rate=audit_rate, teacher=audit_teacher, max_pending=audit_max_pending),
        emit_config=emit_config, detach=detach, rollout_interval_s=rollout_interval)
    ready = launch.prepare(request, trust=lambda: trust_or_default(key, identity, issuer),
                           warn=lambda line: click.echo(line, err=True))
    if emit_config:
        launch.write_config(ready, emit_config)
        click.echo(f"wrote {emit_config}: run `serve deploy {emit_config}` against the cluster")
        return
    launch.start(ready, say=click.echo)
    for line in ready.lines():
        click.echo(line)
    if not detach:
        click.echo("Ctrl-C stops serving")
        launch.serve_until_interrupted(ready)
        click.echo("stopped")


@cli.group(short_help="The receipt log of served calls.", epilog="""\b
Examples:
  kolm receipts verify
  kolm receipts verify --app-name kolm-prod --json

\b
Exit codes:
  0  done
  1  a receipt log failed verification
  2  bad arguments""")
def receipts() -> None:
    """The receipt log of served calls."""


@receipts.command(name="verify", short_help="Check every receipt's hash and the chain.", epilog="""\b
Examples:
  kolm receipts verify
  kolm receipts verify --home /mnt/kolm --app-name kolm-prod --json > tips.json
  kolm receipts verify --anchors tips.json   # also catches the newest segments deleted since

\b
Exit codes:
  0  every receipt and the chain verify (a torn tail a crash left is a note)
  1  an edited, dropped or reordered receipt, a missing segment (or no segments)
  2  no receipts there, or an unreadable --anchors file""")
@click.option("--home", type=click.Path(file_okay=False), help="kolm's home [default: KOLM_HOME].")
@click.option("--store", "old_home", type=click.Path(file_okay=False), hidden=True,
              help="Deprecated name of --home, kept for scripts written before.")
@click.option("--app-name", default=None, help="Only this application's receipts.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--anchors", "anchors_file", type=click.Path(dir_okay=False), default=None,
              help="A report saved earlier with --json: its `tips` (where the newest segments ended) are checked "
                   "too, so deleting the newest segments with their heads is caught.")
def receipts_verify(home: str | None, old_home: str | None, app_name: str | None, as_json: bool,
                    anchors_file: str | None) -> None:
    """Check every receipt's hash and the chain: exits 1 on an edited, dropped or reordered receipt."""
    root = Path(home or old_home) if (home or old_home) else kolm_home()
    directory = root / "receipts" / (app_name or "")
    if not directory.is_dir():
        raise InputError("no receipts here", path=str(directory))
    report = verify_log(directory, _saved_tips(anchors_file, directory) if anchors_file else ())
    if as_json:
        click.echo(json.dumps({"ok": report.ok, **report.model_dump()}, indent=2))
    else:
        for seg in report.segments:
            click.echo(f"{'ok' if not seg.problems else 'TAMPERED':<9}{seg.segment}  {seg.receipts} receipts")
            for p in seg.problems:
                click.echo(f"         {p}")
            for w in seg.warnings:
                click.echo(f"         note: {w}")
    if not report.ok:
        raise KolmRuntimeError(f"receipt log under {directory} failed verification"
                               if report.segments else f"no receipt segments under {directory}")
    if not as_json:
        click.echo(f"verified    {report.receipts} receipts in {len(report.segments)} segment(s)")
        if report.tips:
            click.echo(f"tips        {len(report.tips)} newest segment(s) no other segment anchors: keep this "
                       "report (--json) outside the store and pass it back with --anchors")


def _saved_tips(path: str, directory: Path) -> list[dict]:
    """The ``tips`` of a report saved with ``--json``, made relative to ``directory`` (the saved
    report may have verified another folder: the whole store, or one app); tips outside
    ``directory`` are not this verification's business.

    Raises: InputError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
        tips = data["tips"] if isinstance(data, dict) else data
        if not isinstance(tips, list) or not all(isinstance(t, dict) and {"segment", "seq", "hash"} <= t.keys()
                                                 for t in tips):
            raise ValueError("no list of {segment, seq, hash} under `tips`")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, ValueError) as e:
        raise InputError(f"not a saved receipts report ({e}); write one with `kolm receipts verify --json`",
                         path=path) from None
    saved = data.get("directory") if isinstance(data, dict) else None
    if not saved:
        return tips
    here = directory.resolve()
    rebased = []
    for t in tips:
        where = (Path(saved) / t["segment"]).resolve()
        if where.is_relative_to(here):
            rebased.append({**t, "segment": str(where.relative_to(here))})
    return rebased
