"""A local Ray head node started with ``ray start --head`` in its own temp dir, with token auth,
for tests and benchmarks that need what only a real cluster has (the job server for
``ray job submit``, a cluster that outlives its drivers); and more nodes joined to it with
``ray start --address`` (``LocalWorker``), so one machine runs a multi-node cluster.

Stopped by killing the processes that name its temp dir, never by ``ray stop`` (which stops
every Ray instance on the machine).

Every node starts as ``cluster.yaml``'s do, with Serve's fast path on (HAProxy in front of
ingress replicas, ``kolm_ray.serve.ingress_path``); each node's HAProxy gets stats and metrics
ports of its own, so clusters side by side on one machine do not collide.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free now and not handed out before by this process.

    The kernel may give the same ephemeral port to two binds in a row once the first socket is
    closed; two of a node's components given one port make ``ray start`` fail."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclass
class LocalHead:
    """``ray start --head`` on loopback ports chosen free, token auth on."""

    num_cpus: int | None = None
    object_store_bytes: int = 1 << 30
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    metrics_export_port: int = field(default_factory=free_port)  # the node's Prometheus endpoint
    temp_dir: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        """What a client process (``ray job submit``, a driver) needs in its environment."""
        bin_dir = str(Path(sys.executable).parent)
        return {"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.token}

    @property
    def ray_bin(self) -> str:
        return str(Path(sys.executable).parent / "ray")

    def start(self) -> "LocalHead":
        # Short: Ray's unix socket paths under the temp dir have a length limit.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="kr-", dir="/tmp"))
        cmd = [self.ray_bin, "start", "--head", f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
               "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--temp-dir={self.temp_dir}",
               f"--object-store-memory={self.object_store_bytes}", "--disable-usage-stats",
               f"--metrics-export-port={self.metrics_export_port}"]
        # Every port explicit and free: another Ray on this machine (a developer's, a leaked one)
        # holds the defaults, and a head whose dashboard agent lost port 52365 has no job agent.
        cmd += [f"--{flag}={free_port()}" for flag in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
            "ray-client-server-port", "node-manager-port", "object-manager-port")]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        _ray_start(cmd, {**serve_node_env(), **self.env}, self.stop)
        return self

    def stop(self) -> None:
        kill_by_temp_dir(self.temp_dir)
        self.temp_dir = None


@dataclass
class LocalWorker:
    """A second (third, ...) node: ``ray start --address HEAD`` in its own temp dir, on free ports."""

    head: LocalHead
    num_cpus: int = 1
    object_store_bytes: int = 256 << 20
    temp_dir: Path | None = None

    def start(self) -> "LocalWorker":
        self.temp_dir = Path(tempfile.mkdtemp(prefix="kw-", dir="/tmp"))
        cmd = [self.head.ray_bin, "start", f"--address={self.head.address}", f"--num-cpus={self.num_cpus}",
               f"--temp-dir={self.temp_dir}", f"--object-store-memory={self.object_store_bytes}", "--disable-usage-stats"]
        cmd += [f"--{flag}={free_port()}" for flag in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
            "metrics-export-port", "node-manager-port", "object-manager-port")]
        _ray_start(cmd, {**serve_node_env(), **self.head.env}, self.stop)
        return self

    def stop(self) -> None:
        """Kill the node's processes at once, as a lost machine would go."""
        kill_by_temp_dir(self.temp_dir)
        self.temp_dir = None


def serve_node_env() -> dict[str, str]:
    """What a node of a test cluster starts with for Serve: the fast path, and free ports for
    its HAProxy's stats and metrics listeners (Ray's defaults, 8404 and 9101, are one per machine)."""
    from kolm_ray.serve.ingress_path import FAST_PATH_ENV, LOCAL_DRAIN_ENV

    # The short drain of a local cluster: Ray's 30 s (for a cloud load balancer) would add half
    # a minute to every app a test deletes.
    return {**FAST_PATH_ENV, **LOCAL_DRAIN_ENV, "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}


def _ray_start(cmd: list[str], env: dict[str, str], cleanup) -> None:
    """Run ``ray start ...`` with the cluster's auth settings; on failure clean up and raise."""
    full = {**os.environ, **env}
    full.pop("RAY_ADDRESS", None)
    res = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=180)
    if res.returncode != 0:
        cleanup()
        raise RuntimeError(f"`{' '.join(cmd[1:3])}` failed ({res.returncode}): {res.stderr[-2000:]}")


def kill_by_temp_dir(temp_dir: Path | None) -> None:
    """Kill every process whose command line names ``temp_dir`` (a node's), and their children."""
    import psutil

    if temp_dir is None:
        return
    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if p.pid not in spared and any(str(temp_dir) in part for part in (p.info["cmdline"] or [])):
                procs += [c for c in (p, *p.children(recursive=True)) if c.pid not in spared]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=30)
    shutil.rmtree(temp_dir, ignore_errors=True)
