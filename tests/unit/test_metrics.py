"""kolm_ray.metrics: every metric defined once with its tags; recording maps a receipt, a tick
and a compile's figures onto them; nothing is recorded outside Ray; a failing record is counted
and never raised; the Grafana dashboard queries only series the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from kolm_ray import metrics
from kolm_ray.serve.receipts import Receipt

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "kolm-dashboard.json"


class FakeMetric:
    def __init__(self, name: str, fail: bool = False) -> None:
        self.name, self.fail, self.points = name, fail, []

    def _add(self, value, tags):
        if self.fail:
            raise TypeError("Tag values must be str")
        self.points.append((value, tags))

    inc = set = observe = lambda self, value, tags=None: self._add(value, tags)


@pytest.fixture
def recorded(monkeypatch):
    """Ray 'connected', every metric a fake that keeps its points: name -> FakeMetric."""
    fakes: dict[str, FakeMetric] = {}
    monkeypatch.setattr(metrics, "_connected", lambda: True)
    monkeypatch.setattr(metrics, "_metric", lambda name: fakes.setdefault(name, FakeMetric(name)))
    monkeypatch.setattr(metrics, "_errors", metrics._Tally())
    monkeypatch.setattr(metrics, "_canaries", {})
    return fakes


def _receipt(**kw) -> Receipt:
    base = dict(time=1.0, request_id="r1", specialist="route", version="1.2", artifact_sha256="a" * 64,
                route="canary", status="ok", input_sha256="b" * 64, output_sha256="c" * 64, latency_ms=42.5,
                prompt_tokens=17, completion_tokens=3, t=None, c=100.0, l=None, k=80.0)
    return Receipt(**{**base, **kw})


def test_every_metric_is_named_kolm_described_and_tagged_once():
    for name, spec in metrics.METRICS.items():
        assert name == spec.name and re.fullmatch(r"kolm_[a-z_]+", name), name
        assert not name.endswith(("_total", "_bucket", "_sum", "_count")), name  # Ray adds these
        assert spec.description and isinstance(spec.tags, tuple) and len(set(spec.tags)) == len(spec.tags)
        assert not {"deployment", "replica", "application"} & set(spec.tags)  # Serve's own tags
        assert (spec.kind == "histogram") == bool(spec.boundaries)
        assert list(spec.boundaries) == sorted(set(spec.boundaries))
    serving = [s for s in metrics.METRICS.values() if s.name.startswith("kolm_serve_")]
    assert serving and all(s.serve and s.tags[:2] == ("specialist", "version") for s in serving)
    assert metrics.METRICS["kolm_serve_errors"].tags == ("specialist", "version", "kind")
    assert "stage" in metrics.METRICS["kolm_compile_stage_seconds"].tags


def test_exported_names_carry_rays_prefix_and_suffixes():
    m = metrics.METRICS
    assert metrics.exported_names(m["kolm_serve_requests"]) == {"ray_kolm_serve_requests_total"}
    assert metrics.exported_names(m["kolm_serve_latency_ms"]) == {
        "ray_kolm_serve_latency_ms_bucket", "ray_kolm_serve_latency_ms_sum", "ray_kolm_serve_latency_ms_count"}
    assert metrics.exported_names(m["kolm_rollout_canary_weight"]) == {"ray_kolm_rollout_canary_weight"}


def test_outside_ray_recording_is_a_no_op(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(metrics, "_errors", metrics._Tally())

    def never(name):
        raise AssertionError(f"metric {name} made outside Ray")

    monkeypatch.setattr(metrics, "_metric", never)
    metrics.record_call(_receipt())
    metrics.record_error(None, "model_not_found")
    metrics.record_stage("route", None, "fit", 3.0)
    clock = metrics.StageClock(SimpleNamespace(stage=lambda n, t=0: None), "route", None)
    clock.stage("verifier")
    clock.finish()
    assert metrics.errors() == {}


def test_a_call_is_recorded_from_its_receipts_own_figures(recorded):
    metrics.record_call(_receipt())
    who = {"specialist": "route", "version": "1.2"}
    assert recorded["kolm_serve_requests"].points == [(1, {**who, "route": "canary", "status": "ok"})]
    assert recorded["kolm_serve_latency_ms"].points == [(42.5, {**who, "status": "ok"})]
    assert recorded["kolm_serve_tokens_in"].points == [(17, who)]
    assert recorded["kolm_serve_tokens_out"].points == [(3, who)]
    assert recorded["kolm_serve_online_k_points"].points == [(80.0, who)]
    assert recorded["kolm_serve_online_k_scored"].points == [(1, who)]


def test_an_error_call_counts_a_request_and_no_tokens_or_k(recorded):
    metrics.record_call(_receipt(status="error", output_sha256=None, prompt_tokens=0, completion_tokens=0,
                                 c=None, k=None))
    assert recorded["kolm_serve_requests"].points[0][1]["status"] == "error"
    assert "kolm_serve_tokens_in" not in recorded and "kolm_serve_online_k_scored" not in recorded


def test_an_error_before_a_specialist_is_named_is_labelled_dash(recorded):
    metrics.record_error(None, "model_not_found")
    metrics.record_error(SimpleNamespace(name="route", version="1.0"), "invalid_request_error")
    assert recorded["kolm_serve_errors"].points == [
        (1, {"specialist": "-", "version": "-", "kind": "model_not_found"}),
        (1, {"specialist": "route", "version": "1.0", "kind": "invalid_request_error"})]


def test_a_failing_metric_is_swallowed_counted_and_reported_as_a_metric(monkeypatch, caplog):
    fakes = {"kolm_metrics_errors": FakeMetric("kolm_metrics_errors")}
    monkeypatch.setattr(metrics, "_connected", lambda: True)
    monkeypatch.setattr(metrics, "_metric", lambda name: fakes.setdefault(name, FakeMetric(name, fail=True)))
    monkeypatch.setattr(metrics, "_errors", metrics._Tally())
    for _ in range(2):
        metrics.record_call(_receipt())  # must not raise
    assert metrics.errors()["kolm_serve_requests"] == 2 and metrics.errors()["kolm_serve_latency_ms"] == 2
    assert (1, {"metric": "kolm_serve_requests"}) in fakes["kolm_metrics_errors"].points
    warned = [r for r in caplog.records if "kolm_serve_requests" in r.getMessage()]
    assert len(warned) == 1  # logged once per metric, then counted


def test_a_malformed_figure_is_swallowed_and_counted(recorded):
    metrics.record_call(SimpleNamespace(specialist="route"))  # no version, status, ...
    metrics.record_teacher("route", None, None)
    assert metrics.errors() == {"record_call": 1, "record_teacher": 1}


def test_real_ray_metric_with_a_missing_tag_is_swallowed(monkeypatch):
    """A real Ray metric object (no cluster needed to make one) refusing a point."""
    from ray.util.metrics import Counter

    real = Counter("kolm_test_refuses", "test", tag_keys=("specialist", "version", "kind", "route"))
    monkeypatch.setattr(metrics, "_connected", lambda: True)
    monkeypatch.setattr(metrics, "_metric", lambda name: real)
    monkeypatch.setattr(metrics, "_errors", metrics._Tally())
    metrics.record_error(None, "overloaded")  # Ray refuses it: no value for its tag "route"
    assert metrics.errors()["kolm_serve_errors"] == 1


def test_stage_clock_times_each_stage_and_passes_everything_on(recorded):
    seen = []
    inner = SimpleNamespace(stage=lambda n, total=0: seen.append(("stage", n, total)),
                            progress=lambda n: seen.append(("progress", n)), spend=lambda u: seen.append(("spend", u)))
    now = iter([0.0, 2.0, 2.0, 12.5, 12.5, 13.0])
    clock = metrics.StageClock(inner, "route", "acme", clock=lambda: next(now))
    clock.stage("verifier")
    clock.stage("teacher", 40)
    clock.progress(3)
    clock.spend(0.25)
    clock.stage("fit")
    clock.finish()
    clock.finish()  # nothing left to time
    assert seen == [("stage", "verifier", 0), ("stage", "teacher", 40), ("progress", 3), ("spend", 0.25),
                    ("stage", "fit", 0)]
    tags = {"specialist": "route", "tenant": "acme"}
    assert recorded["kolm_compile_stage_seconds"].points == [
        (2.0, {**tags, "stage": "verifier"}), (10.5, {**tags, "stage": "teacher"}), (0.5, {**tags, "stage": "fit"})]


def _summary(**kw):
    base = dict(calls=30, cache_hits=10, retries=4, retries_by_kind={"rate_limited": 3, "overloaded": 1},
                cost_usd=0.42, recorded=False)
    return SimpleNamespace(**{**base, **kw})


def test_teacher_figures_are_the_summarys(recorded):
    metrics.record_teacher("route", None, _summary())
    tags = {"specialist": "route", "tenant": "default", "stage": "teacher"}
    assert recorded["kolm_compile_teacher_calls"].points == [(30, tags)]
    assert recorded["kolm_compile_teacher_cache_hits"].points == [(10, tags)]
    assert recorded["kolm_compile_teacher_retries"].points == [(4, tags)]
    assert recorded["kolm_compile_teacher_failures"].points == [(1, {**tags, "kind": "overloaded"}),
                                                                 (3, {**tags, "kind": "rate_limited"})]
    assert recorded["kolm_compile_teacher_cost_usd"].points == [(0.42, tags)]


def test_recorded_teacher_answers_are_never_reported_as_paid(recorded):
    metrics.record_teacher("route", "acme", _summary(recorded=True, retries=0, retries_by_kind={}))
    assert "kolm_compile_teacher_cost_usd" not in recorded and "kolm_compile_teacher_retries" not in recorded
    assert recorded["kolm_compile_teacher_calls"].points[0][0] == 30


def _state(**releases):
    return SimpleNamespace(releases={
        name: SimpleNamespace(phase="canary" if canary else "stable",
                              canary=SimpleNamespace(version=canary, weight=weight) if canary else None,
                              last_decision=SimpleNamespace(action=action, signal="online") if action else None)
        for name, (canary, weight, action) in releases.items()})


def test_rollout_decisions_and_canary_weights_and_a_finished_canary_goes_to_zero(recorded):
    before = _state(route=("1.1", 0.1, None), tldr=(None, 0, None))
    metrics.record_rollout("prod", before, _state(route=("1.1", 0.1, "wait"), tldr=(None, 0, None)))
    promoted = _state(route=(None, 0, "promote"), tldr=(None, 0, None))
    metrics.record_rollout("prod", _state(route=("1.1", 0.1, "wait")), promoted)
    metrics.record_rollout("prod", promoted, promoted)  # no canary left: nothing judged, nothing set
    who = {"env": "prod", "specialist": "route", "version": "1.1"}
    assert recorded["kolm_rollout_decisions"].points == [(1, {**who, "action": "wait", "signal": "online"}),
                                                          (1, {**who, "action": "promote", "signal": "online"})]
    assert recorded["kolm_rollout_canary_weight"].points == [(0.1, who), (0.0, who)]


def _exprs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "definition"):  # a panel's PromQL; a query variable's
                yield v
            else:
                yield from _exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _exprs(v)


def test_the_dashboard_queries_only_series_the_code_exports_and_shows_every_metric():
    dash = json.loads(DASHBOARD.read_text())
    assert isinstance(dash["schemaVersion"], int) and dash["title"] and dash["uid"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    exprs = list(_exprs(dash))
    assert exprs
    exported = metrics.names()
    used = set()
    for e in exprs:
        series = set(re.findall(r"\b(?:ray_)?kolm_[a-z_]+", e))
        assert series, e
        assert series <= exported, f"{sorted(series - exported)} in {e!r}: not a series kolm_ray.metrics exports"
        used |= series
    for spec in metrics.METRICS.values():
        assert metrics.exported_names(spec) & used, f"{spec.name} has no panel"
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]


def test_a_stage_that_raises_is_timed_too(recorded):
    now = iter([0.0, 4.0, 4.0, 9.0])

    @metrics.finishes_stage_clocks
    def compile_():
        watch = metrics.StageClock(SimpleNamespace(stage=lambda n, total=0: None), "route", None,
                                   clock=lambda: next(now))
        watch.stage("teacher")
        watch.stage("fit")
        raise RuntimeError("the fit failed")

    with pytest.raises(RuntimeError, match="the fit failed"):
        compile_()
    assert [(v, t["stage"]) for v, t in recorded["kolm_compile_stage_seconds"].points] == [(4.0, "teacher"),
                                                                                            (5.0, "fit")]
    clock = metrics.StageClock(SimpleNamespace(stage=lambda n, total=0: None), "route", None,
                               clock=iter([0.0, 1.5]).__next__)
    with pytest.raises(KeyError), clock as watch:  # and as a context manager
        watch.stage("sign")
        raise KeyError("x")
    assert recorded["kolm_compile_stage_seconds"].points[-1][0] == 1.5


def test_the_compile_finishes_its_stage_clock_when_a_stage_raises():
    from kolm_ray import compile as compile_module

    wrapper_code = metrics.finishes_stage_clocks(lambda: None).__code__
    assert compile_module.compile_specialist.__code__ is wrapper_code  # decorated with finishes_stage_clocks


def test_failed_records_are_counted_under_a_lock(monkeypatch):
    class Checked(metrics._Tally):
        def __setitem__(self, key, value):
            assert metrics._errors_lock.locked(), "counted without the lock"
            super().__setitem__(key, value)

    monkeypatch.setattr(metrics, "_connected", lambda: True)
    monkeypatch.setattr(metrics, "_metric", lambda name: FakeMetric(name, fail=True))
    monkeypatch.setattr(metrics, "_errors", Checked())
    metrics.record_error(None, "overloaded")
    metrics.record_teacher("route", None, None)
    assert metrics.errors() == {"kolm_serve_errors": 1, "kolm_metrics_errors": 1, "record_teacher": 1}


def _targets(dash):
    def panels(ps):
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))
    return [(p["title"], t["expr"]) for p in panels(dash["panels"]) for t in p.get("targets", [])]


def test_serving_panels_are_per_environment():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert "application" in variables["application"]["definition"]
    serving = [(title, e) for title, e in _targets(dash) if "kolm_serve_" in e]
    assert serving
    for title, e in serving:
        selectors = re.findall(r"ray_kolm_serve_[a-z_]+(\{[^}]*\})?", e)
        assert all('application=~"$application"' in s for s in selectors), (title, e)
        assert all("application" in by for by in re.findall(r"by \(([^)]*)\)", e)), (title, e)


def test_compile_panels_count_a_series_first_value():
    """A compile's series appear at their full value; increase() alone would count them as ~0."""
    compile_exprs = [(title, e) for title, e in _targets(json.loads(DASHBOARD.read_text())) if "kolm_compile_" in e]
    assert compile_exprs
    for title, e in compile_exprs:
        for sel, window in re.findall(r"increase\((ray_kolm_compile_[a-z_]+(?:\{[^}]*\})?)\[([^\]]+)\]\)", e):
            assert f"({sel} unless {sel} offset {window}) or increase({sel}[{window}])" in e, (title, e)
