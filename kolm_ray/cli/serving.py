"""`kolm serve` and `kolm receipts`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from kolm_ray.cli.app import cli
from kolm_ray.cli.options import option_help, parse_pairs, read_api_keys, trust_or_default
from kolm_ray.errors import InputError
from kolm_ray.serve.audit import AuditOptions
from kolm_ray.serve.config import ModelDeploymentOptions


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
def serve_cmd(artifacts: tuple[str, ...], port: int, host: str, address: str | None, app_name: str, route_prefix: str,
              key: str | None, identity: str | None, issuer: str | None, api_keys: str | None,
              base_path: tuple[str, ...], replicas: int, num_gpus: float | None, num_cpus: float,
              max_batch_size: int, batch_greedy: bool, max_ongoing: int, max_queued: int, emit_config: str | None,
              detach: bool, env: str | None, rollout_interval: float, audit_rate: float, audit_teacher: str,
              audit_max_pending: int, stop: bool = False) -> None:
    """Serve ARTIFACTS over OpenAI-compatible HTTP on Ray Serve: one deployment per base model,
    every Specialist's adapter on it, a receipt for every call."""
    from pydantic import ValidationError

    from kolm_ray.home import kolm_home
    from kolm_ray.serve.config import ModelDeploymentOptions, ServeConfig

    if stop:
        if artifacts or emit_config or detach:
            raise InputError("--stop takes no ARTIFACTS, --emit-config or --detach: name the app (--app-name) "
                             "or the environment (--env)")
        _stop_serving(f"kolm-{env}" if env is not None else app_name, env, address)
        return
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
    trust = trust_or_default(key, identity, issuer)
    if audit_rate > 0 and not os.environ.get("ANTHROPIC_API_KEY"):
        raise InputError("--audit-rate asks the teacher for references: set ANTHROPIC_API_KEY (and "
                         "ANTHROPIC_BASE_URL for a proxy)")
    if detach and not (address or os.environ.get("RAY_ADDRESS")):
        raise InputError("--detach needs a running cluster to leave the app on: give --address or set RAY_ADDRESS")
    from kolm_ray.serve.catalog import build_catalog

    base_paths = parse_pairs(base_path, "--base-path")
    key_digests = read_api_keys(api_keys)
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
        from click.core import ParameterSource

        from kolm_ray.serve.app import check_route_prefix, endpoint, running_serve

        # Serve keeps the HTTP host and port it first started on: join them (and print them), or
        # refuse a --port / --host the user asked for that Serve would silently ignore.
        running = running_serve()
        ctx = click.get_current_context()
        asked = any(ctx.get_parameter_source(p) != ParameterSource.DEFAULT for p in ("host", "port"))
        host, port = endpoint(host, port, running, insist=asked)
        if running is not None:
            check_route_prefix(running, app_name, route_prefix)
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

    from kolm_ray.serve.app import stop as stop_app

    click.echo("Ctrl-C stops serving")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        if env is not None:
            from kolm_ray.publish import controller

            controller.stop(env)
        stop_app(app_name)  # graceful: replicas drain and flush their receipts
        click.echo("stopped")


def _stop_serving(app_name: str, env: str | None, address: str | None) -> None:
    """``kolm serve --stop``: the environment's rollout controller first (so it deploys nothing
    again), then the app, gracefully. Raises: InputError (no cluster named), KolmRuntimeError
    (nothing to stop: exit 1, so a mistyped name or address is not taken for success)."""
    from kolm_ray.cluster import connect
    from kolm_ray.errors import KolmRuntimeError
    from kolm_ray.serve.app import running_serve
    from kolm_ray.serve.app import stop as stop_app

    where = address or os.environ.get("RAY_ADDRESS")
    if not where:
        raise InputError("--stop needs the cluster the app runs on: give --address or set RAY_ADDRESS")
    connect(address)
    stopped = False
    if env is not None:
        from kolm_ray.publish import controller

        if controller.stop(env):
            click.echo(f"stopped     rollout controller {controller.actor_name(env)}")
            stopped = True
    if stop_app(app_name):
        click.echo(f"stopped     app {app_name} (its replicas drained and flushed their receipts)")
        stopped = True
    if not stopped:
        running = running_serve()
        apps = ", ".join(sorted(running.route_prefixes)) if running and running.route_prefixes else "none"
        what = f"no app {app_name!r}" + (f" and no rollout controller for {env!r}" if env is not None else "")
        raise KolmRuntimeError(f"nothing to stop: {what} on the cluster at {where} (apps running there: {apps})")



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
  kolm receipts verify --store /mnt/kolm --app-name kolm-prod --json > tips.json
  kolm receipts verify --anchors tips.json   # also catches the newest segments deleted since

\b
Exit codes:
  0  every receipt and the chain verify (a torn tail a crash left is a note)
  1  an edited, dropped or reordered receipt, a missing segment (or no segments)
  2  no receipts there, or an unreadable --anchors file""")
@click.option("--store", type=click.Path(file_okay=False), help="kolm's store [default: KOLM_HOME].")
@click.option("--app-name", default=None, help="Only this application's receipts.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--anchors", "anchors_file", type=click.Path(dir_okay=False), default=None,
              help="A report saved earlier with --json: its `tips` (where the newest segments ended) are checked "
                   "too, so deleting the newest segments with their heads is caught.")
def receipts_verify(store: str | None, app_name: str | None, as_json: bool, anchors_file: str | None) -> None:
    """Check every receipt's hash and the chain: exits 1 on an edited, dropped or reordered receipt."""
    from kolm_ray.errors import KolmRuntimeError
    from kolm_ray.home import kolm_home
    from kolm_ray.serve.receipts import verify_log

    root = Path(store) if store else kolm_home()
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
