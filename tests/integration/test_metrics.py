"""kolm's metrics reach the node's Prometheus endpoint: a served Specialist's calls (ok and
refused) from the ingress replica, a compile's stage and teacher figures from the driver, and a
rollout tick's from a Ray worker, each series with its labels. The session's head node is
started with a known ``--metrics-export-port`` (``LocalHead.metrics_export_port``); Ray flushes
metrics every few seconds, so the test polls the endpoint until the series appear."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import requests
from click.testing import CliRunner

from kolm_ray import metrics
from kolm_ray.cli import cli

APP, PREFIX = "kolm-metrics", "/metrics-test"


def _scrape(port: int) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    body = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [s for family in text_string_to_metric_families(body) for s in family.samples
            if s.name.startswith("ray_kolm_")]


def _wait_for(port: int, wanted: dict[str, list[dict[str, str]]], within_s: float = 180) -> list:
    """Scrape until every ``name -> [labels ...]`` has a sample carrying those labels; the samples."""
    deadline = time.monotonic() + within_s
    while True:
        samples = _scrape(port)
        missing = {name: labels for name, want in wanted.items() for labels in want
                   if not any(s.name == name and labels.items() <= s.labels.items() for s in samples)}
        if not missing:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"never exported: {missing}; kolm series seen: "
                                 f"{sorted({(s.name, tuple(sorted(s.labels.items()))) for s in samples})[:40]}")
        time.sleep(1)


def _value(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


@pytest.fixture(scope="module")
def served(ray_session, ray_head, specialists, serve_port, tmp_path_factory):
    from ray import serve

    home = tmp_path_factory.mktemp("metrics-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KOLM_HOME", str(home))
        res = CliRunner().invoke(cli, ["serve", str(specialists["route"]), "--port", str(serve_port), "--detach",
                                       "--num-cpus", "0", "--key", str(specialists["public_key"]),
                                       "--app-name", APP, "--route-prefix", PREFIX])
        assert res.exit_code == 0, res.output
    url = f"http://127.0.0.1:{serve_port}{PREFIX}"
    for _ in range(240):
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(0.5)
    yield url
    serve.delete(APP)


def test_served_calls_and_refusals_reach_the_endpoint_labelled_by_specialist_version_and_kind(served, ray_head):
    chat = {"model": "route", "messages": [{"role": "user", "content": "I was charged twice"}], "max_tokens": 6,
            "temperature": 0}
    answers = [requests.post(f"{served}/v1/chat/completions", json=chat, timeout=120) for _ in range(3)]
    assert [r.status_code for r in answers] == [200] * 3
    tokens_out = sum(r.json()["usage"]["completion_tokens"] for r in answers)
    unknown = requests.post(f"{served}/v1/chat/completions", json={**chat, "model": "no-such-model"}, timeout=60)
    assert unknown.status_code == 404
    bad = requests.post(f"{served}/v1/chat/completions", json={**chat, "max_tokens": "6"}, timeout=60)
    assert bad.status_code == 400

    who = {"specialist": "route", "version": "1.0", "application": APP}
    samples = _wait_for(ray_head.metrics_export_port, {
        "ray_kolm_serve_requests_total": [{**who, "route": "latest", "status": "ok"}],
        "ray_kolm_serve_latency_ms_bucket": [{**who, "status": "ok", "le": "+Inf"}],
        "ray_kolm_serve_tokens_in_total": [who],
        "ray_kolm_serve_tokens_out_total": [who],
        "ray_kolm_serve_online_k_scored_total": [who],
        "ray_kolm_serve_errors_total": [
            {"specialist": "-", "version": "-", "kind": "model_not_found", "application": APP},
            {"specialist": "-", "version": "-", "kind": "invalid_request_error", "application": APP}],
    })
    # Series are cumulative and this app is new: the figures are this test's calls.
    assert _value(samples, "ray_kolm_serve_requests_total", **who) == 3
    assert _value(samples, "ray_kolm_serve_latency_ms_count", **who) == 3
    assert _value(samples, "ray_kolm_serve_tokens_out_total", **who) == tokens_out
    assert _value(samples, "ray_kolm_serve_errors_total", kind="model_not_found", application=APP) == 1
    assert {s.labels["deployment"] for s in samples
            if s.name == "ray_kolm_serve_requests_total" and s.labels.get("application") == APP} == {"ingress"}


def test_compile_and_rollout_figures_reach_the_endpoint_from_the_driver_and_a_worker(ray_session, ray_head):
    import ray

    name = f"metrics-{time.time_ns() % 10**9}"  # this test's own series
    clock = metrics.StageClock(SimpleNamespace(stage=lambda n, total=0: None), name, "acme")
    clock.stage("verifier")
    clock.stage("teacher")
    clock.finish()
    metrics.record_teacher(name, "acme", SimpleNamespace(calls=12, cache_hits=4, retries=3,
                                                         retries_by_kind={"rate_limited": 2}, cost_usd=0.5,
                                                         recorded=False))

    def tick() -> dict:
        from kolm_ray import metrics as m

        def state(action):
            return SimpleNamespace(releases={name: SimpleNamespace(
                phase="canary", canary=SimpleNamespace(version="1.1", weight=0.25),
                last_decision=SimpleNamespace(action=action, signal="online") if action else None)})

        m.record_rollout("staging", state(None), state("wait"))
        return m.errors()

    assert ray.get(ray.remote(num_cpus=0)(tick).remote()) == {}
    assert metrics.errors() == {}
    tags = {"specialist": name, "tenant": "acme"}
    samples = _wait_for(ray_head.metrics_export_port, {
        "ray_kolm_compile_stage_seconds_count": [{**tags, "stage": "verifier"}, {**tags, "stage": "teacher"}],
        "ray_kolm_compile_teacher_calls_total": [{**tags, "stage": "teacher"}],
        "ray_kolm_compile_teacher_failures_total": [{**tags, "kind": "rate_limited"}],
        "ray_kolm_compile_teacher_cost_usd_total": [tags],
        "ray_kolm_rollout_canary_weight": [{"env": "staging", "specialist": name, "version": "1.1"}],
        "ray_kolm_rollout_decisions_total": [{"env": "staging", "specialist": name, "action": "wait"}],
    })
    assert _value(samples, "ray_kolm_compile_teacher_calls_total", **tags) == 12
    assert _value(samples, "ray_kolm_compile_teacher_failures_total", **tags, kind="rate_limited") == 2
    assert _value(samples, "ray_kolm_compile_teacher_cost_usd_total", **tags) == pytest.approx(0.5)
    assert _value(samples, "ray_kolm_rollout_canary_weight", specialist=name) == 0.25


def test_a_compile_driver_that_exits_at_once_still_gets_its_figures_exported(ray_head):
    """A `ray job submit` compile's driver exits right after its last stage, sooner than Ray's
    metrics report interval (10 s): its figures are still exported (Ray flushes them when the
    driver's worker shuts down)."""
    import os
    import subprocess
    import sys

    name = f"metrics-exit-{time.time_ns() % 10**9}"
    script = f"""
import ray
from types import SimpleNamespace
from kolm_ray import metrics
ray.init(address={ray_head.address!r}, namespace="kolm-test", log_to_driver=False)

@metrics.finishes_stage_clocks
def compile():
    clock = metrics.StageClock(SimpleNamespace(stage=lambda n, total=0: None), {name!r}, "acme")
    clock.stage("eval")
    clock.stage("sign")
    metrics.record_teacher({name!r}, "acme", SimpleNamespace(calls=7, cache_hits=0, retries=0,
                           retries_by_kind={{}}, cost_usd=0.25, recorded=False))

compile()
assert metrics.errors() == {{}}, metrics.errors()
"""
    env = {**os.environ, **ray_head.env}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    tags = {"specialist": name, "tenant": "acme"}
    samples = _wait_for(ray_head.metrics_export_port, {
        "ray_kolm_compile_stage_seconds_count": [{**tags, "stage": "eval"}, {**tags, "stage": "sign"}],
        "ray_kolm_compile_teacher_calls_total": [{**tags, "stage": "teacher"}],
    }, within_s=60)
    assert _value(samples, "ray_kolm_compile_teacher_calls_total", **tags) == 7
    assert _value(samples, "ray_kolm_compile_teacher_cost_usd_total", **tags) == pytest.approx(0.25)
