"""Building and running the serving application.

Pipeline: ``ServeConfig`` -> ``build_catalog`` (verify every artifact; refuse the bad ones) ->
``build_app`` (one ``BaseModelServer`` deployment per base model, an ``Ingress`` routing to them;
which Specialists are live travels as each deployment's ``user_config``) -> ``run`` (``serve.run``
on the connected cluster). ``app_builder`` is the same application for ``serve deploy`` of a
config that ``deploy_config`` writes.
"""

from __future__ import annotations

import hashlib
from typing import Any

from kolm_ray.serve.catalog import Catalog, build_catalog
from kolm_ray.serve.config import ServeConfig


def deployment_name(base_key: str) -> str:
    return "base-" + hashlib.sha256(base_key.encode()).hexdigest()[:10]


def _trust_dict(cfg: ServeConfig) -> dict[str, Any]:
    return {"public_key": cfg.trust_key, "identity": cfg.trust_identity, "issuer": cfg.trust_issuer}


def build_app(cfg: ServeConfig, catalog: Catalog) -> Any:
    """The Serve application for ``catalog``: returns ``Ingress.bind(...)``."""
    from ray import serve

    from kolm_ray.serve.deployments import BaseModelServer, Ingress

    m = cfg.model
    handles = {}
    for key, specialists in catalog.by_base().items():
        dep = serve.deployment(BaseModelServer).options(
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
    return ingress.bind(handles, cfg.store, cfg.app_name, cfg.api_key_digests, cfg.max_tokens_cap,
                        cfg.max_input_chars, cfg.receipts_flush_s, cfg.audit.model_dump())


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


def run(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, catalog: Catalog | None = None) -> Catalog:
    """Start Serve on the connected cluster (if it is not running) and deploy or update the app.

    Raises:
        InputError: no artifact verified, so there is nothing to serve.
    """
    from ray import serve

    from kolm_ray.errors import InputError, KolmRuntimeError

    catalog = catalog or build_catalog(cfg.artifacts, cfg.trust(), cfg.base_paths)
    if not catalog.specialists:
        reasons = "; ".join(f"{r.artifact}: {r.reason}" for r in catalog.refused) or "no artifacts given"
        raise InputError(f"nothing to serve ({reasons})")
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build_app(cfg, catalog), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    except RuntimeError as e:
        raise KolmRuntimeError(f"deploying the app {cfg.app_name!r} failed: {e}; {_failure_detail(cfg.app_name)}") from None
    return catalog


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
