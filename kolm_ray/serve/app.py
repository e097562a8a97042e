"""Building and running the serving application.

Pipeline: ``ServeConfig`` -> ``build_catalog`` (verify every artifact; refuse the bad ones) ->
``build_app`` (one ``BaseModelServer`` deployment per base model, an ``Ingress`` routing to them;
which Specialists are live travels as each deployment's ``user_config``) -> ``run`` (``serve.run``
on the connected cluster). ``app_builder`` is the same application for ``serve deploy`` of a
config that ``deploy_config`` writes.

Serve on a cluster is shared by its applications: ``running_serve`` reads what it already fixes
(the HTTP host and port its proxies took when it first started, later ``serve.start`` options
being ignored; each live app's route prefix), so ``endpoint`` and ``check_route_prefix`` can
refuse or correct a deploy before Serve would ignore or reject it. ``stop`` deletes an app
gracefully (replicas drain and flush their receipts).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from kolm_ray.errors import InputError
from kolm_ray.serve.catalog import Catalog, build_catalog
from kolm_ray.serve.config import ServeConfig


def deployment_name(base_key: str) -> str:
    return "base-" + hashlib.sha256(base_key.encode()).hexdigest()[:10]


def _trust_dict(cfg: ServeConfig) -> dict[str, Any]:
    return {"public_key": cfg.trust_key, "identity": cfg.trust_identity, "issuer": cfg.trust_issuer}


def build_app(cfg: ServeConfig, catalog: Catalog, model_class: Any = None) -> Any:
    """The Serve application for ``catalog``: returns ``Ingress.bind(...)``. ``model_class``
    replaces ``BaseModelServer`` (the serving benchmark's model that answers at once)."""
    from ray import serve

    from kolm_ray.serve.deployments import BaseModelServer, Ingress

    model_class = model_class or BaseModelServer
    m = cfg.model
    handles = {}
    for key, specialists in catalog.by_base().items():
        dep = serve.deployment(model_class).options(
            name=deployment_name(key), num_replicas=m.replicas,
            ray_actor_options={"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
            max_ongoing_requests=m.max_ongoing_requests, max_queued_requests=m.max_queued_requests,
            user_config={"specialists": [s.model_dump() for s in specialists], "max_batch_size": m.max_batch_size,
                         "batch_wait_s": m.batch_wait_s},
            # Loading a base and its adapters takes a while on a cold node.
            health_check_period_s=10, graceful_shutdown_timeout_s=30,
        )
        handles[key] = dep.bind(specialists[0].base_path, _trust_dict(cfg), cfg.base_paths, m.dtype, None,
                                m.batch_greedy)
    ingress = serve.deployment(Ingress).options(
        name="ingress", num_replicas=cfg.ingress_replicas,
        # An environment's app may be asked to audit by any later publish; a plain app only with --audit-rate.
        ray_actor_options=_ingress_actor_options(audits=cfg.audit.rate > 0 or bool(cfg.routes)),
        max_ongoing_requests=max(64, 4 * m.max_ongoing_requests * m.replicas),
        max_queued_requests=max(64, 4 * m.max_queued_requests),
        user_config={"specialists": [s.model_dump() for s in catalog.specialists], "pins": cfg.pins,
                     "routes": cfg.routes, "refused": [r.model_dump() for r in catalog.refused]},
        graceful_shutdown_timeout_s=30,
    )
    return ingress.bind(handles, cfg.home, cfg.app_name, cfg.api_key_digests, cfg.max_tokens_cap,
                        cfg.max_input_chars, cfg.receipts_flush_s, cfg.audit.model_dump(),
                        max_body_bytes=cfg.max_body_bytes, replica_wait_s=cfg.replica_wait_s)


def _ingress_actor_options(audits: bool) -> dict[str, Any]:
    """An ingress that may audit asks the teacher: it gets the SDK's settings (ANTHROPIC_API_KEY,
    ANTHROPIC_BASE_URL) of the process that deploys it, where that process has them; otherwise
    it reads its node's own environment. They travel in the replica's runtime environment, never
    in the application's config (which `--emit-config` writes to a file); note that Ray keeps a
    deployment's runtime environment in its Serve state, readable by whoever holds the cluster's
    token. An ingress that never audits gets no key."""
    from kolm_ray.sampling.teacher import sdk_env

    env = sdk_env() if audits else {}
    return {"num_cpus": 0, **({"runtime_env": {"env_vars": env}} if env else {})}


def app_builder(args: dict[str, Any]) -> Any:
    """``import_path: kolm_ray.serve.app:app_builder`` in a Serve config; ``args`` is a ServeConfig."""
    cfg = ServeConfig.model_validate(args)
    return build_app(cfg, build_catalog(cfg.artifacts, cfg.trust(), cfg.base_paths))


def deploy_config(cfg: ServeConfig, host: str = "0.0.0.0", port: int = 8000) -> dict[str, Any]:
    """A Serve config file (``serve deploy FILE``) for the same application."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [{"name": cfg.app_name, "route_prefix": cfg.route_prefix,
                          "import_path": "kolm_ray.serve.app:app_builder", "args": cfg.model_dump(mode="json")}],
    }


def run(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, catalog: Catalog | None = None,
        model_class: Any = None) -> Catalog:
    """Start Serve on the connected cluster (if it is not running) and deploy or update the app.

    Raises:
        InputError: no artifact verified, so there is nothing to serve; or another app on the
            cluster holds the route prefix.
    """
    from ray import serve
    from ray.serve.exceptions import RayServeException

    from kolm_ray.errors import KolmRuntimeError

    catalog = catalog or build_catalog(cfg.artifacts, cfg.trust(), cfg.base_paths)
    if not catalog.specialists:
        reasons = "; ".join(f"{r.artifact}: {r.reason}" for r in catalog.refused) or "no artifacts given"
        raise InputError(f"nothing to serve ({reasons})")
    running = running_serve()
    if running is not None:
        check_route_prefix(running, cfg.app_name, cfg.route_prefix)
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build_app(cfg, catalog, model_class), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    except RayServeException as e:  # e.g. another app took the route prefix since the check above
        cause = getattr(e, "cause", None) or e  # the controller's own exception inside Ray's task error
        raise KolmRuntimeError(f"deploying the app {cfg.app_name!r} failed: {str(cause).splitlines()[-1]}") from None
    except RuntimeError as e:
        raise KolmRuntimeError(f"deploying the app {cfg.app_name!r} failed: {e}; {_failure_detail(cfg.app_name)}") from None
    return catalog


@dataclass(frozen=True)
class RunningServe:
    """What Serve already running on a cluster has fixed for every app deployed there."""

    host: str  # where its HTTP proxies listen: set when Serve first started, never changed after
    port: int
    route_prefixes: dict[str, str]  # live application -> its route prefix (apps being deleted left out)


def running_serve() -> RunningServe | None:
    """Serve on the connected cluster, or None when it is not running (the next deploy starts it)."""
    # Ray has no public getter for the running proxies' HTTP options; this is what serve.status() reads.
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    details = ServeInstanceDetails(**client.get_serve_details())
    http = details.http_options
    return RunningServe(host=http.host, port=http.port,
                        route_prefixes={name: app.route_prefix for name, app in details.applications.items()
                                        if app.route_prefix is not None and app.status != "DELETING"})


def endpoint(host: str, port: int, running: RunningServe | None, *, insist: bool) -> tuple[str, int]:
    """The host and port an app deployed now answers on (pure): those asked for when Serve is not
    running yet (it starts there), else the running Serve's, which a deploy cannot move.

    Raises:
        InputError: ``insist`` (the user named the host or port) and Serve listens elsewhere.
    """
    if running is None or (running.host, running.port) == (host, port):
        return host, port
    if insist:
        fix = f"--port {running.port}" if running.host == host else f"--host {running.host} --port {running.port}"
        raise InputError(f"Serve on this cluster already listens on {running.host}:{running.port} (fixed when it "
                         f"first started): use {fix}, or stop Serve first (`serve shutdown`)")
    return running.host, running.port


def check_route_prefix(running: RunningServe, app_name: str, route_prefix: str) -> None:
    """Pure. Raises: InputError naming the live app that holds ``route_prefix`` (not ``app_name``
    itself: redeploying an app on its own prefix updates it)."""
    holder = next((name for name, prefix in sorted(running.route_prefixes.items())
                   if prefix == route_prefix and name != app_name), None)
    if holder is not None:
        raise InputError(f"the route prefix {route_prefix} is held by the app {holder!r} on this cluster: serve "
                         f"{app_name!r} beside it (--route-prefix /other --app-name other) or stop {holder!r} first "
                         f"(kolm serve --stop --app-name {holder})")


def stop(app_name: str) -> bool:
    """Delete ``app_name`` gracefully and wait until it is gone: its replicas finish the requests
    they hold and each ingress closes its receipt writer, so no receipt is lost. False when no
    such app runs on the connected cluster."""
    from ray import serve

    if app_name not in serve.status().applications:
        return False
    serve.delete(app_name)
    return True


def _failure_detail(app_name: str) -> str:
    """The first failing deployment's message, from Serve's status."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001 - best effort: the caller's error stands without it
        return "see the Serve controller logs"
    for name, dep in (app.deployments if app else {}).items():
        if dep.message:
            return f"{name}: {dep.message.strip().splitlines()[-1]}"
    return "see the Serve controller logs"
