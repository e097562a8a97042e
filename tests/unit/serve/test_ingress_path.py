"""serve.ingress_path: which of Serve's HTTP paths a cluster kolm starts takes, and what kolm says."""

from __future__ import annotations

from kolm_ray.serve import ingress_path
from kolm_ray.serve.ingress_path import FAST_PATH_ENV, HAPROXY, PYTHON_PROXY


def test_a_local_cluster_gets_the_fast_path_unless_the_user_chose():
    environ = {"PATH": "/bin"}
    assert ingress_path.for_local_cluster(environ) == FAST_PATH_ENV
    assert environ == {"PATH": "/bin", **FAST_PATH_ENV}
    # A variable the user set is theirs, whatever its value: `=0` turns HAProxy off.
    mine = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    assert ingress_path.for_local_cluster(mine) == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    assert mine["RAY_SERVE_ENABLE_HA_PROXY"] == "0"


def test_the_python_proxy_gets_a_note_naming_the_variables_and_the_fast_path_none():
    note = ingress_path.describe(PYTHON_PROXY)
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1" in note and "cluster.yaml" in note
    assert ingress_path.describe(HAPROXY) is None and ingress_path.describe(None) is None


def test_cluster_yaml_and_the_image_start_nodes_on_the_fast_path():
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    yaml_text = (root / "cluster.yaml").read_text()
    starts = [line for line in yaml_text.splitlines() if "ray start" in line]
    assert starts and all(all(f"{k}={v}" in line for k, v in FAST_PATH_ENV.items()) for line in starts), starts
    docker = (root / "deploy" / "Dockerfile").read_text()
    assert all(f"{k}={v}" in docker for k, v in FAST_PATH_ENV.items())
