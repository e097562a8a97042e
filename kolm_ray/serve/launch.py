"""Launching serving: what ``kolm serve`` does once its flags are parsed, and ``--stop``.

Pipeline: ``ServeRequest`` (the typed choices) -> ``prepare`` (an environment's released
artifacts; every file there; the trust; verify every artifact into a ``Catalog``, refusing the bad
ones; join the cluster and take the host and port a running Serve allows; the ``ServeConfig``) ->
``write_config`` (a ``serve deploy`` file, nothing started) or ``start`` (the app, or an
environment's rollout controller, which deploys it) -> ``serve_until_interrupted`` (block; Ctrl-C
stops gracefully). ``stop_serving`` stops what ``start`` left running.

Checks that need no cluster come first, in the order a user fixes them, so a bad input never
starts Ray. Prints nothing and never exits: what a user should see goes to the ``say`` / ``warn``
callbacks or comes back as ``Launch.lines()``; failures are ``kolm_ray.errors``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from kolm_ray.errors import InputError, KolmRuntimeError
from kolm_ray.home import kolm_home
from kolm_ray.publish import controller
from kolm_ray.publish.release import ReleaseStore
from kolm_ray.serve import app as serve_app
from kolm_ray.serve.audit import AuditOptions
from kolm_ray.serve.catalog import Catalog, build_catalog
from kolm_ray.serve.config import ModelDeploymentOptions, ServeConfig
from kolm_ray.signing import Trust
from kolm_ray.store import is_remote, location_of

Say = Callable[[str], None]


@dataclass(frozen=True)
class ServeRequest:
    """What to serve, where and how big: ``kolm serve``'s flags, parsed."""

    artifacts: tuple[str, ...] = ()  # .kolm files or s3:// URIs; empty with ``env``
    env: str | None = None  # serve this environment's released versions (see kolm_ray.publish) instead
    app_name: str = "kolm"
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = 8000
    endpoint_given: bool = False  # the user named the host or port: refuse one Serve cannot give, never move it
    address: str | None = None  # Ray cluster [default: RAY_ADDRESS or a local instance]
    base_paths: Mapping[str, str] = field(default_factory=dict)  # base id or sha256 -> folder on the hosts
    api_key_digests: Mapping[str, str] = field(default_factory=dict)  # key name -> SHA-256 of its token
    replicas: int = 1
    num_gpus: float | None = None  # per replica; None: 1 if the cluster has a GPU, else 0
    num_cpus: float = 1.0
    max_batch_size: int = 8
    batch_greedy: bool = False
    max_ongoing: int = 16
    max_queued: int = 64
    audit: AuditOptions = field(default_factory=AuditOptions)
    emit_config: str | None = None  # write a `serve deploy` config here instead of starting anything
    detach: bool = False  # leave the app running on the cluster and return
    rollout_interval_s: float = 10.0  # the rollout controller's tick (with ``env``)

    @property
    def served_app(self) -> str:
        """The app's name on the cluster: an environment's is ``kolm-ENV``."""
        return controller.app_name(self.env) if self.env is not None else self.app_name


@dataclass(frozen=True)
class Launch:
    """A verified, configured serving app, ready to be written out or started."""

    request: ServeRequest
    cfg: ServeConfig
    catalog: Catalog
    host: str
    port: int

    def lines(self) -> list[str]:
        """What is served and where, once started."""
        out = [f"serving     {s.ref}  ({s.artifact})" for s in self.catalog.specialists]
        out.append(f"endpoint    http://{self.host}:{self.port}{self.cfg.route_prefix.rstrip('/')}/v1  "
                   f"(receipts under {self.cfg.receipts_dir})")
        if self.cfg.audit.rate > 0:
            out.append(f"audits      {100 * self.cfg.audit.rate:g}% of calls get a reference from the teacher, off "
                       "the request path; recorded in the receipts")
        return out


def prepare(request: ServeRequest, trust: Callable[[], Trust], warn: Say) -> Launch:
    """Check, verify and configure ``request``: everything before anything is deployed.

    ``trust`` gives the trust artifacts must be signed by; it is asked once the artifacts are
    known to exist. ``warn`` gets each refused artifact and what the user should know.
    Ray is joined only when the app will be started (not for ``emit_config``).

    Raises:
        InputError: no such environment, a missing artifact, a flag that conflicts with another,
            every artifact refused, a host, port or route prefix the running Serve cannot give.
        KolmRuntimeError: the cluster cannot be reached.
    """
    artifacts = _targets(request, warn)
    for a in artifacts:
        if not is_remote(a) and not Path(a).is_file():
            raise InputError("artifact not found", path=a)
    trusted = trust()
    _check_flags(request)
    paths = [location_of(a) for a in artifacts]  # absolute paths, or s3:// URIs each replica downloads
    catalog = build_catalog(paths, trusted, dict(request.base_paths))  # verified before Ray starts
    for r in catalog.refused:
        warn(f"refused     {r.artifact}: {r.reason}")
    if not catalog.specialists:
        raise InputError("nothing to serve: every artifact was refused")
    host, port, num_gpus = request.host, request.port, request.num_gpus
    if request.emit_config is None:
        host, port, num_gpus = _join_cluster(request)
    cfg = _serve_config(request, paths, trusted, num_gpus)
    return Launch(request=request, cfg=cfg, catalog=catalog, host=host, port=port)


def _targets(request: ServeRequest, warn: Say) -> tuple[str, ...]:
    """The artifacts to serve: those given, or the environment's released versions."""
    if request.env is None:
        if not request.artifacts:
            raise InputError("give the .kolm artifacts to serve")
        return request.artifacts
    if request.artifacts or request.emit_config:
        raise InputError("--env serves the environment's released versions: give no ARTIFACTS or --emit-config")
    store = ReleaseStore(kolm_home(), request.env)
    if not store.exists():
        raise InputError(f"no environment {request.env!r}: `kolm publish ART --to {request.env}` creates it")
    state = store.load()
    if any(r.canary and r.canary.audit.rate > 0 for r in state.releases.values()) and not _teacher_key():
        warn("warning: a canary in this environment is audited, but ANTHROPIC_API_KEY is not set here: the "
             "ingress uses its node's environment, or records its audits as failed")
    artifacts = tuple(sorted({v.artifact for r in state.releases.values() for v in r.hosted()}))
    if not artifacts:
        raise InputError("give the .kolm artifacts to serve")
    return artifacts


def _check_flags(request: ServeRequest) -> None:
    if request.audit.rate > 0 and not _teacher_key():
        raise InputError("--audit-rate asks the teacher for references: set ANTHROPIC_API_KEY (and "
                         "ANTHROPIC_BASE_URL for a proxy)")
    if request.detach and not (request.address or os.environ.get("RAY_ADDRESS")):
        raise InputError("--detach needs a running cluster to leave the app on: give --address or set RAY_ADDRESS")


def _teacher_key() -> bool:
    return bool(os.environ.get("ANTHROPIC_API_KEY"))


def _join_cluster(request: ServeRequest) -> tuple[str, int, float]:
    """Join Ray; the host and port the app will answer on, and each replica's GPU share.

    Serve keeps the HTTP host and port it first started on: join them, or refuse a host or port
    the user named that Serve would silently ignore."""
    # Ray is imported only here, once the app is to be started: checking inputs needs none of it.
    import ray

    from kolm_ray.cluster import connect
    from kolm_ray.serve import ingress_path

    if not (ray.is_initialized() or request.address or os.environ.get("RAY_ADDRESS")):
        ingress_path.for_local_cluster()  # the local cluster starts as cluster.yaml's nodes do
    connect(request.address)
    num_gpus = request.num_gpus
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    running = serve_app.running_serve()
    host, port = serve_app.endpoint(request.host, request.port, running, insist=request.endpoint_given)
    if running is not None:
        serve_app.check_route_prefix(running, request.served_app, request.route_prefix)
    return host, port, num_gpus


def _serve_config(request: ServeRequest, paths: list[str], trust: Trust, num_gpus: float | None) -> ServeConfig:
    try:
        return ServeConfig(
            artifacts=paths, trust_key=str(trust.public_key.resolve()) if trust.public_key else None,
            trust_identity=trust.identity, trust_issuer=trust.issuer, home=str(kolm_home()),
            app_name=request.served_app, route_prefix=request.route_prefix, base_paths=dict(request.base_paths),
            api_key_digests=dict(request.api_key_digests),
            model=ModelDeploymentOptions(
                replicas=request.replicas, num_gpus=num_gpus or 0.0, num_cpus=request.num_cpus,
                max_batch_size=request.max_batch_size, max_ongoing_requests=request.max_ongoing,
                max_queued_requests=request.max_queued, batch_greedy=request.batch_greedy),
            audit=request.audit,
        )
    except ValidationError as e:
        raise InputError(f"invalid serving options: {e.errors()[0]['msg']}") from None


def write_config(launch: Launch, path: str | Path) -> None:
    """Write ``launch`` as a ``serve deploy`` config file; nothing is started."""
    Path(path).write_text(json.dumps(serve_app.deploy_config(launch.cfg, launch.host, launch.port), indent=2) + "\n")


def start(launch: Launch, say: Say) -> None:
    """Deploy the app on the joined cluster; for an environment, start its rollout controller,
    which deploys it and keeps its canary split. Returns once deployed.

    Raises: InputError (a route prefix taken meanwhile), KolmRuntimeError (the deploy failed)."""
    from kolm_ray.serve import ingress_path

    request = launch.request
    if request.env is None:
        serve_app.run(launch.cfg, host=launch.host, port=launch.port, catalog=launch.catalog)
    else:
        base = launch.cfg.model_dump(exclude={"artifacts", "app_name", "pins", "routes"})
        controller.start(request.env, kolm_home(), base, launch.host, launch.port, request.rollout_interval_s)
        say(f"rollout     controller {controller.actor_name(request.env)} ticks every {request.rollout_interval_s:g} s")
    note = ingress_path.describe(ingress_path.running_path(), launch.host, _alive_nodes())
    if note:
        say(note)


def _alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def serve_until_interrupted(launch: Launch) -> None:
    """Block until Ctrl-C, then stop what ``start`` started, gracefully (replicas drain and flush
    their receipts), and return."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        if launch.request.env is not None:
            controller.stop(launch.request.env)
        serve_app.stop(launch.cfg.app_name)


def stop_serving(app_name: str, env: str | None, address: str | None, say: Say) -> None:
    """``kolm serve --stop``: the environment's rollout controller first (so it deploys nothing
    again), then the app (``kolm-ENV`` for an environment), gracefully.

    Raises:
        InputError: no cluster named (``address`` nor RAY_ADDRESS).
        KolmRuntimeError: nothing to stop (so a mistyped name or address is not taken for success).
    """
    # Ray is imported only here: the cluster is needed to stop anything, the checks above it are not.
    from kolm_ray.cluster import connect

    app_name = controller.app_name(env) if env is not None else app_name
    where = address or os.environ.get("RAY_ADDRESS")
    if not where:
        raise InputError("--stop needs the cluster the app runs on: give --address or set RAY_ADDRESS")
    connect(address)
    stopped = False
    if env is not None and controller.stop(env):
        say(f"stopped     rollout controller {controller.actor_name(env)}")
        stopped = True
    if serve_app.stop(app_name):
        say(f"stopped     app {app_name} (its replicas drained and flushed their receipts)")
        stopped = True
    if not stopped:
        running = serve_app.running_serve()
        apps = ", ".join(sorted(running.route_prefixes)) if running and running.route_prefixes else "none"
        what = f"no app {app_name!r}" + (f" and no rollout controller for {env!r}" if env is not None else "")
        raise KolmRuntimeError(f"nothing to stop: {what} on the cluster at {where} (apps running there: {apps})")
