"""kolm's Prometheus metrics, through Ray's metrics API: every metric is defined once here
(``METRICS``), and the code paths that already hold the figures call one small function each:

- the ingress, where a call's receipt is written: ``record_call(receipt)`` (requests, latency,
  tokens in and out, online K: the receipt's own figures, so the two never disagree) and
  ``record_error(specialist, kind)`` for every error answer;
- the rollout controller, once per tick: ``record_rollout(env, before, after)`` (canary weight,
  decisions);
- the compile driver: ``StageClock`` (each stage's duration) and ``record_teacher(...)`` (the
  teacher stage's calls, cache hits, retries, failures by kind, 429s among them, and dollars).

Ray exports them on each node's metrics endpoint (``ray start --metrics-export-port``) with a
``ray_`` prefix, counters with ``_total`` and histograms as ``_bucket``/``_sum``/``_count``
(``exported_names``). The serving metrics are ``ray.serve.metrics``, which add the replica's
``deployment``, ``replica`` and ``application`` (``kolm-ENV`` for an environment) tags.

Compile series are one-shot: a compile driver records each (specialist, tenant, stage) series
once, at its full value (a Ray counter cannot be created at 0: ``inc`` refuses 0), and Prometheus's
``increase``/``rate`` take a series' first sample as its baseline, so a compile's figures would
count ~0 there. The dashboard's compile panels therefore add the value of a series that did not
exist one window earlier (``X unless X offset W``) to the ``increase`` of the others, rather
than this module recording a second, zero-initialised copy of every series.

Each process hands its records to the node's metrics agent every ``metrics_report_interval_ms``
(10 s by default), and once more when its Ray worker shuts down (Ray's OpenTelemetry reader
flushes on shutdown): a compile driver that exits right after its last stage still gets that
stage's figures exported (tested); one killed with SIGKILL loses its last interval's.

Must never fail a request, a tick or a compile: a metrics error is logged once per metric and
counted (``errors()``, and ``kolm_metrics_errors`` when that can still be recorded), never
raised. Outside Ray (no worker connected) every function is a no-op. Must not read receipts,
release state or samples itself: callers hand it what they already hold.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
import time
from collections import Counter as _Tally
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Self

log = logging.getLogger("kolm_ray.metrics")

Kind = Literal["counter", "gauge", "histogram"]
EXPORT_PREFIX = "ray_"  # Ray's exporter puts it before every application metric's name
UNRESOLVED = "-"  # the specialist/version of an error answered before a served Specialist was named
# (never a Specialist name: names start with a letter or digit). The requested name itself is
# not a label: a client could make up a new one per request and grow the series without bound.

# Serving latency in milliseconds, end to end at the ingress (body read to answer or last
# streamed chunk). A label answer from a tiny adapter comes back in tens of ms on a GPU, a
# generation of a few hundred tokens on a CPU replica takes seconds, and the ingress gives up
# waiting for a replica after 30 s (``replica_wait_s``); the buckets cover that whole span
# about x2-x2.5 apart, so p50 and p99 from ``histogram_quantile`` are within a bucket's width.
LATENCY_MS_BOUNDARIES = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000]
# A compile stage takes from under a second (the verifier, a reused fit) to hours (the fit of a
# large base, a Message Batches teacher stage that waits up to a day).
STAGE_SECONDS_BOUNDARIES = [1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400]


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name (without Ray's prefix), type, help text and tag keys. ``serve``:
    recorded in a Serve replica through ``ray.serve.metrics`` (which adds the replica's tags)."""

    name: str
    kind: Kind
    description: str
    tags: tuple[str, ...]
    boundaries: tuple[float, ...] = ()
    serve: bool = False


_SERVE = ("specialist", "version")
_COMPILE = ("specialist", "tenant", "stage")

METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    # serving: recorded in the ingress, one call at a time
    MetricSpec("kolm_serve_requests", "counter", "Calls served and receipted (one per receipt), by route "
               "(stable, canary, pinned, latest) and status (ok, error, cancelled).",
               (*_SERVE, "route", "status"), serve=True),
    MetricSpec("kolm_serve_errors", "counter", "Error answers, by kind (the error's code: unavailable, overloaded, "
               "model_not_found, invalid_api_key, request_too_large, stream, server_error, ...). specialist and "
               "version are '-' for a request refused before it named a served Specialist.",
               (*_SERVE, "kind"), serve=True),
    MetricSpec("kolm_serve_latency_ms", "histogram", "End-to-end latency of receipted calls at the ingress, in ms "
               "(the receipt's latency_ms).", (*_SERVE, "status"), tuple(LATENCY_MS_BOUNDARIES), serve=True),
    MetricSpec("kolm_serve_tokens_in", "counter", "Prompt tokens of receipted calls.", _SERVE, serve=True),
    MetricSpec("kolm_serve_tokens_out", "counter", "Completion tokens of receipted calls.", _SERVE, serve=True),
    # Online K as two counters rather than a histogram: Ray's histogram sum is built from bucket
    # midpoints, and the mean K is what the rollout decides on, so it must be exact.
    MetricSpec("kolm_serve_online_k_points", "counter", "Sum of the online (reference-free) K, 0-100, of the "
               "calls scored; divided by kolm_serve_online_k_scored it is the mean online K.", _SERVE, serve=True),
    MetricSpec("kolm_serve_online_k_scored", "counter", "Calls with an online K (answered ok and scored by the "
               "Specialist's verifier).", _SERVE, serve=True),
    # rollout: recorded by each environment's controller actor, once per tick
    MetricSpec("kolm_rollout_canary_weight", "gauge", "Share of traffic routed to the canary version, 0-1 (0 once "
               "it is promoted or rolled back).", ("env", "specialist", "version")),
    MetricSpec("kolm_rollout_decisions", "counter", "Rollout decisions on a canary (wait, promote, rollback), by "
               "the K signal they rest on.", ("env", "specialist", "version", "action", "signal")),
    # compile: recorded in the compile's driver
    MetricSpec("kolm_compile_stage_seconds", "histogram", "Wall time of each compile stage (verifier, teacher, fit, "
               "eval, sign), in seconds.", _COMPILE, tuple(STAGE_SECONDS_BOUNDARIES)),
    MetricSpec("kolm_compile_teacher_calls", "counter", "Teacher calls made by the stage (answered by the live API "
               "or a stand-in), cache hits not included.", _COMPILE),
    MetricSpec("kolm_compile_teacher_cache_hits", "counter", "Teacher samples read from the response cache "
               "(not paid again).", _COMPILE),
    MetricSpec("kolm_compile_teacher_retries", "counter", "Teacher calls retried.", _COMPILE),
    MetricSpec("kolm_compile_teacher_failures", "counter", "Failed teacher attempts by kind (rate_limited is a "
               "429; overloaded a 529; server, timeout, connection, malformed, client, budget).", (*_COMPILE, "kind")),
    MetricSpec("kolm_compile_teacher_cost_usd", "counter", "Dollars paid to the teacher by the stage, at list "
               "price (0 for recorded answers from a stand-in).", _COMPILE),
    # the metrics themselves
    MetricSpec("kolm_metrics_errors", "counter", "Metric records that failed (logged; the request or compile "
               "went on).", ("metric",)),
)}


def exported_names(spec: MetricSpec) -> set[str]:
    """The series names Ray's Prometheus endpoint shows for ``spec``."""
    full = EXPORT_PREFIX + spec.name
    if spec.kind == "counter":
        return {full + "_total"}
    if spec.kind == "histogram":
        return {full + "_bucket", full + "_sum", full + "_count"}
    return {full}


# ----- the registry: one metric object per process, made at first use ------------------------

_lock = threading.Lock()
_objects: dict[str, Any] = {}
_errors: _Tally = _Tally()
_errors_lock = threading.Lock()  # recorded from the ingress's threads and a compile's at once
_canaries: dict[tuple[str, str], str] = {}  # (env, specialist) -> the canary version whose weight was set


def errors() -> dict[str, int]:
    """Metric records that failed in this process, by metric name."""
    with _errors_lock:
        return dict(_errors)


def _count_error(name: str) -> int:
    """One more failed record of ``name``; how many so far."""
    with _errors_lock:
        _errors[name] += 1
        return _errors[name]


def _connected() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except Exception:  # noqa: BLE001 - no Ray, no metrics
        return False


def _metric(name: str) -> Any:
    """The Ray metric object for ``name`` in this process (created once; Serve metrics inside a
    replica, so they carry its tags)."""
    obj = _objects.get(name)
    if obj is not None:
        return obj
    with _lock:
        if name not in _objects:
            spec = METRICS[name]
            if spec.serve:
                from ray.serve import metrics as api
            else:
                from ray.util import metrics as api
            kw: dict[str, Any] = {"description": spec.description, "tag_keys": spec.tags}
            if spec.kind == "counter":
                _objects[name] = api.Counter(spec.name, **kw)
            elif spec.kind == "gauge":
                _objects[name] = api.Gauge(spec.name, **kw)
            else:
                _objects[name] = api.Histogram(spec.name, boundaries=list(spec.boundaries), **kw)
        return _objects[name]


def _record(name: str, value: float, tags: Mapping[str, Any]) -> None:
    """Record one point; a failure is logged (once per metric) and counted, never raised."""
    try:
        spec = METRICS[name]
        if spec.kind == "counter" and value <= 0:
            return  # a counter only moves up; nothing happened
        m = _metric(name)
        t = {k: str(v) for k, v in tags.items()}
        if spec.kind == "counter":
            m.inc(value, tags=t)
        elif spec.kind == "gauge":
            m.set(value, tags=t)
        else:
            m.observe(value, tags=t)
    except Exception as e:  # noqa: BLE001 - metrics must never fail what they measure
        if _count_error(name) == 1:
            log.warning("could not record metric %s (%s: %s); counting further failures silently",
                        name, type(e).__name__, e)
        if name != "kolm_metrics_errors":
            _record("kolm_metrics_errors", 1, {"metric": name})


def _guarded(fn: Any) -> Any:
    """Run a recording function only with Ray connected, and never let it raise."""
    def wrapper(*args: Any, **kwargs: Any) -> None:
        if not _connected():
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - e.g. a receipt or summary of an unexpected shape
            _count_error(fn.__name__)
            log.warning("metrics: %s failed (%s: %s)", fn.__name__, type(e).__name__, e)
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


# ----- serving ------------------------------------------------------------------------------


@_guarded
def record_call(receipt: Any) -> None:
    """One receipted call (a ``serve.receipts.Receipt``): its status, latency, tokens and online K."""
    r = receipt
    who = {"specialist": r.specialist, "version": r.version}
    _record("kolm_serve_requests", 1, {**who, "route": r.route, "status": r.status})
    _record("kolm_serve_latency_ms", float(r.latency_ms), {**who, "status": r.status})
    _record("kolm_serve_tokens_in", r.prompt_tokens, who)
    _record("kolm_serve_tokens_out", r.completion_tokens, who)
    if r.status == "ok" and r.k is not None:
        _record("kolm_serve_online_k_scored", 1, who)
        _record("kolm_serve_online_k_points", float(r.k), who)


@_guarded
def record_error(specialist: Any, kind: str) -> None:
    """One error answer of ``kind`` for ``specialist`` (a ``catalog.Specialist``: name and
    version), or None when the request never named a served one."""
    _record("kolm_serve_errors", 1, {"specialist": specialist.name if specialist else UNRESOLVED,
                                     "version": specialist.version if specialist else UNRESOLVED, "kind": kind})


# ----- rollout ------------------------------------------------------------------------------


@_guarded
def record_rollout(env: str, before: Any, after: Any) -> None:
    """A controller tick: the decision ``judge`` took on every canary of ``before`` (an
    ``EnvState``; the decision is ``after``'s ``last_decision``), and every canary's weight in
    ``after`` (a canary gone since the last tick is set to 0). With no canary in ``before``
    nothing was judged, and ``after`` is ``before``."""
    for name, r in before.releases.items():
        if r.canary is None or r.phase != "canary":
            continue
        d = getattr(after.releases.get(name), "last_decision", None)
        if d is not None:
            _record("kolm_rollout_decisions", 1, {"env": env, "specialist": name, "version": r.canary.version,
                                                  "action": d.action, "signal": d.signal or "none"})
    live = {}
    for name, r in after.releases.items():
        if r.canary is not None:
            live[(env, name)] = r.canary.version
            _record("kolm_rollout_canary_weight", float(r.canary.weight),
                    {"env": env, "specialist": name, "version": r.canary.version})
    for (e, name), version in list(_canaries.items()):
        if e == env and live.get((e, name)) != version:
            _record("kolm_rollout_canary_weight", 0.0, {"env": env, "specialist": name, "version": version})
            del _canaries[(e, name)]
    _canaries.update(live)


# ----- compile ------------------------------------------------------------------------------


@_guarded
def record_stage(specialist: str, tenant: str | None, stage: str, seconds: float) -> None:
    """One compile stage's wall time."""
    _record("kolm_compile_stage_seconds", float(seconds),
            {"specialist": specialist, "tenant": tenant or "default", "stage": stage})


@_guarded
def record_teacher(specialist: str, tenant: str | None, summary: Any) -> None:
    """The teacher stage's figures from its ``SampleSummary`` (what its headline says)."""
    s = summary
    tags = {"specialist": specialist, "tenant": tenant or "default", "stage": "teacher"}
    _record("kolm_compile_teacher_calls", s.calls, tags)
    _record("kolm_compile_teacher_cache_hits", s.cache_hits, tags)
    _record("kolm_compile_teacher_retries", s.retries, tags)
    for kind, n in sorted(s.retries_by_kind.items()):
        _record("kolm_compile_teacher_failures", n, {**tags, "kind": kind})
    if not s.recorded:  # a recorded stand-in's answers are never reported as paid
        _record("kolm_compile_teacher_cost_usd", float(s.cost_usd), tags)


class StageClock:
    """A compile's ``StageMonitor`` that also times its stages: each ``stage(name)`` ends the
    previous stage (recorded with ``record_stage``), ``finish()`` ends the last. Everything is
    passed on to the monitor it wraps. Used as a context manager (``with StageClock(...) as
    watch:``) it finishes on the way out, so a stage that raises is timed too."""

    def __init__(self, inner: Any, specialist: str, tenant: str | None,
                 clock: Any = time.monotonic) -> None:
        self.inner, self.specialist, self.tenant, self._clock = inner, specialist, tenant, clock
        self._current: tuple[str, float] | None = None
        opened = _open_clocks.get()
        if opened is not None:
            opened.append(self)

    def _end(self) -> None:
        if self._current is not None:
            name, since = self._current
            record_stage(self.specialist, self.tenant, name, self._clock() - since)
            self._current = None

    def stage(self, name: str, total: int = 0) -> None:
        self._end()
        self._current = (name, self._clock())
        self.inner.stage(name, total)

    def progress(self, n: int) -> None:
        self.inner.progress(n)

    def spend(self, usd: float) -> None:
        self.inner.spend(usd)

    def finish(self) -> None:
        self._end()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


_open_clocks: contextvars.ContextVar[list[StageClock] | None] = contextvars.ContextVar("kolm_stage_clocks",
                                                                                    default=None)


def finishes_stage_clocks(fn: Any) -> Any:
    """Decorate a compile: every ``StageClock`` made during the call is finished when it returns
    or raises, so the stage that failed is timed too (without wrapping the body in a ``with``)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = _open_clocks.set([])
        try:
            return fn(*args, **kwargs)
        finally:
            clocks = _open_clocks.get() or []
            _open_clocks.reset(token)
            for c in clocks:
                c.finish()
    return wrapper


def names(specs: Iterable[MetricSpec] = ()) -> set[str]:
    """Every series name kolm's metrics export (``exported_names`` of each; all by default)."""
    return {n for s in (specs or METRICS.values()) for n in exported_names(s)}
