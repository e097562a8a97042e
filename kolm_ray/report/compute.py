"""The bill, computed (pure: no I/O). ``build_report`` turns an environment's receipts, its
release history and what each version's artifact records into a typed ``Report``: per Specialist
and in total, calls and tokens, what the same calls would have cost on a frontier model, what they
cost self-hosted, what compiling the Specialist cost, monthly savings and payback days.

Where each figure comes from:

* calls, tokens, latency, online K: the call receipts (kind "call") in the window;
  audited K and audit spend: the audit records (kind "audit").
* frontier cost: each call's ``prompt_tokens`` / ``completion_tokens`` at the price book's
  ``frontier`` prices. Prompt caching: a Specialist's calls share its task as the system prompt;
  the shared prefix is taken as the shortest prompt of all but the shortest ``PREFIX_OUTLIERS``
  (10%) of its calls in the window (so one short prompt does not switch caching off for the
  Specialist; a call shorter than the prefix is billed uncached), cached when at least
  ``cache.min_tokens``. The frontier gets its best case: a cached call within ``cache.ttl_s`` of
  the Specialist's previous cached call reads the prefix (a read refreshes it); any other cached
  call writes it (``cache_write``, 1.25x input) only if the next cached call reads it, and pays
  plain input otherwise, so caching never costs more than not caching. A call that sent no
  prompt (an error before the model ran) touches no cache and does not keep it alive. Batch: a call
  in a burst (``batch.min_calls`` calls of one Specialist within ``batch.window_s``) is billed at
  ``batch.factor``; caching and batching stack, as the API bills them.
* self-hosted cost: with a GPU share, ``lease.gpu_hour`` x share for every hour of the
  environment's window, each stretch of it split between the Specialists released by then, by the
  tokens they served in it (equally when none served any); with no Specialist there is nothing
  to bill. Without a share (the measured basis): the replica-seconds the ok calls measured (their
  latency) at ``lease.gpu_hour``. Error answers are left out (a 503 spent its time waiting for a
  replica, not on one). Receipts do not say whether the replica had a GPU, so a CPU replica's
  seconds are priced at ``gpu_hour`` too, and calls served concurrently by one replica are each
  counted in full: the measured basis overstates self-hosted cost (``--gpu-share`` is the lease
  basis). Audit spend (the teacher references bought to judge canaries) is added: it is paid only
  because kolm serves.
* compile cost, per version the environment released or served: the teacher dollars that
  version's compile paid (not the cached samples an earlier version paid for; $0 for a recorded
  stand-in) plus its fit and eval GPU-seconds at ``gpu_hour`` and CPU-seconds at ``cpu_hour`` x
  the CPUs each worker held (one, with a note, where the artifact does not record it).
* monthly figures: each Specialist's over its own window (from its first release, or the start
  of ``--since`` if later), scaled to 30 days; a window under a day is extrapolated and says so.
  The total's are the sums of the Specialists'. Payback: compile cost / savings per day.
"""

from __future__ import annotations

import calendar
import itertools
import math
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kolm_ray.publish.release import EnvState
from kolm_ray.report.prices import PriceBook
from kolm_ray.sampling.pricing import Usage, cost_usd

REPORT_FORMAT_VERSION = 1
DAY_S = 86400.0
MONTH_DAYS = 30.0  # what "monthly" means here: per 30 days
PREFIX_OUTLIERS = 0.1  # share of a Specialist's shortest prompts ignored when taking its shared prefix
_ACTIONS = {"stable": "publish", "canary": "publish", "promoted": "promote", "rolled_back": "rollback"}


class ArtifactFacts(BaseModel):
    """What a version's artifact records about its compile (``found`` False: no artifact was found)."""

    model_config = ConfigDict(frozen=True)
    name: str
    version: str
    found: bool = True
    artifact: str | None = None
    artifact_sha256: str | None = None
    teacher_model: str | None = None
    teacher_recorded: bool = False
    teacher_usd: float = 0.0  # what this version's compile paid the teacher
    gpu_seconds: float = 0.0  # fit + eval
    cpu_seconds: float = 0.0  # fit + eval (worker-seconds on CPU)
    cpus_per_worker: float | None = None  # None: not recorded (priced as one core per worker)
    note: str | None = None


class FrontierCost(BaseModel):
    model_config = ConfigDict(frozen=True)
    usd: float = 0.0
    input_tokens: int = 0  # billed at the input price (not cached)
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    output_tokens: int = 0
    cached_prefix_tokens: int = 0  # the shared prefix assumed cached (0: no caching)
    cache_reads: int = 0  # calls that read the cache
    batched_calls: int = 0


class VersionCompile(ArtifactFacts):
    compute_usd: float = 0.0
    usd: float = 0.0


class Line(BaseModel):
    """One row of the bill: a Specialist, or the total."""

    model_config = ConfigDict(frozen=True)
    name: str
    calls: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    call_seconds: float = 0.0
    frontier: FrontierCost = Field(default_factory=FrontierCost)
    serving_usd: float = 0.0  # the lease's share (or the measured replica-seconds)
    audit_usd: float = 0.0
    audits_uncosted: int = 0
    self_hosted_usd: float = 0.0  # serving + audits
    compile_usd: float = 0.0
    versions: list[VersionCompile] = []
    frontier_monthly_usd: float = 0.0
    self_hosted_monthly_usd: float = 0.0
    savings_monthly_usd: float = 0.0
    payback_days: float | None = None  # None: no savings to pay the compile back
    days: float = 0.0  # the window the monthly figures are scaled from
    notes: list[str] = []


class Day(BaseModel):
    model_config = ConfigDict(frozen=True)
    day: str  # YYYY-MM-DD (UTC)
    calls: dict[str, int]
    frontier_usd: float
    self_hosted_usd: float


class KPoint(BaseModel):
    model_config = ConfigDict(frozen=True)
    specialist: str
    version: str
    day: str
    calls: int
    online_k: float | None
    audits: int
    audited_k: float | None


class Event(BaseModel):
    model_config = ConfigDict(frozen=True)
    time: float
    specialist: str
    version: str
    action: Literal["publish", "promote", "rollback"]
    reason: str


class Report(BaseModel):
    model_config = ConfigDict(frozen=True)
    format_version: int = REPORT_FORMAT_VERSION
    env: str
    start: float
    end: float
    days: float
    frontier_model: str
    basis: Literal["gpu_share", "measured"]
    gpu_hour: float
    cpu_hour: float
    gpu_share: float | None
    price_sources: list[str]
    specialists: list[Line]
    total: Line
    daily: list[Day]
    k_series: list[KPoint]
    events: list[Event]


# ----- pieces --------------------------------------------------------------------------------


def day_of(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def batched(times: list[float], min_calls: int | None, window_s: float) -> list[bool]:
    """For calls at sorted ``times``: whether each lies in a burst of at least ``min_calls`` calls
    within ``window_s`` of each other."""
    n = len(times)
    if min_calls is None or n < min_calls:
        return [False] * n
    cover = [0] * (n + 1)
    right = 0
    for left in range(n):
        right = max(right, left)
        while right + 1 < n and times[right + 1] - times[left] <= window_s:
            right += 1
        if right - left + 1 >= min_calls:
            cover[left] += 1
            cover[right + 1] -= 1
    out, running = [], 0
    for i in range(n):
        running += cover[i]
        out.append(running > 0)
    return out


def frontier_costs(calls: list[dict[str, Any]], book: PriceBook, model: str) -> tuple[FrontierCost, list[float]]:
    """One Specialist's calls (sorted by time) priced on ``model``: the total and each call's cost."""
    prices = book.frontier_prices(model)
    if not calls:
        return FrontierCost(), []
    prefix = shared_prefix([c["prompt_tokens"] for c in calls])
    if prefix < book.cache.min_tokens:
        prefix = 0
    batch = batched([c["time"] for c in calls], book.batch.min_calls, book.batch.window_s)
    # Which calls carry the cached prefix, which read it (within the TTL of the previous such
    # call: a read refreshes it) and which write it (only when the next one reads it).
    hits = [i for i, c in enumerate(calls) if prefix and c["prompt_tokens"] >= prefix]
    is_read = {i: k > 0 and calls[i]["time"] - calls[hits[k - 1]]["time"] <= book.cache.ttl_s
               for k, i in enumerate(hits)}
    is_write = {i: not is_read[i] and k + 1 < len(hits) and is_read[hits[k + 1]] for k, i in enumerate(hits)}
    per_call, totals = [], Usage()
    for i, (c, is_batched) in enumerate(zip(calls, batch)):
        read, write = is_read.get(i, False), is_write.get(i, False)
        cached = prefix if read or write else 0
        u = Usage(input_tokens=c["prompt_tokens"] - cached, output_tokens=c["completion_tokens"],
                  cache_read_tokens=cached if read else 0, cache_write_tokens=cached if write else 0)
        per_call.append(cost_usd(u, prices) * (book.batch.factor if is_batched else 1.0))
        totals = totals + u
    reads = sum(is_read.values())
    return FrontierCost(usd=sum(per_call), input_tokens=totals.input_tokens,
                        cache_write_tokens=totals.cache_write_tokens, cache_read_tokens=totals.cache_read_tokens,
                        output_tokens=totals.output_tokens, cached_prefix_tokens=prefix, cache_reads=reads,
                        batched_calls=sum(batch)), per_call


def shared_prefix(prompts: list[int]) -> int:
    """The prompt length (tokens) all but the shortest ``PREFIX_OUTLIERS`` of the calls that sent
    a prompt reach: the Specialist's shared prefix, taken as cached (0: no prompt was sent)."""
    positive = sorted(p for p in prompts if p > 0)
    return positive[int(len(positive) * PREFIX_OUTLIERS)] if positive else 0


def compile_cost(f: ArtifactFacts, gpu_hour: float, cpu_hour: float) -> VersionCompile:
    cores = f.cpus_per_worker if f.cpus_per_worker is not None else 1.0
    compute = f.gpu_seconds / 3600 * gpu_hour + f.cpu_seconds * cores / 3600 * cpu_hour
    return VersionCompile(**f.model_dump(), compute_usd=compute, usd=f.teacher_usd + compute)


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def _days(start: float, end: float) -> list[str]:
    out, t = [], math.floor(start / DAY_S) * DAY_S
    while t < end or not out:
        out.append(day_of(t))
        t += DAY_S
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _payback(compile_usd: float, savings_monthly: float) -> float | None:
    per_day = savings_monthly / MONTH_DAYS
    return compile_usd / per_day if per_day > 0 else None


def _monthly(line: Line, days: float) -> Line:
    """``line``'s monthly figures and payback, scaled from its own window of ``days``."""
    scale = MONTH_DAYS / days if days > 0 else 0.0
    savings = (line.frontier.usd - line.self_hosted_usd) * scale
    notes = list(line.notes)
    if 0 < days < 1:
        notes.append(f"monthly figures extrapolated from {days * 24:.1f} hours of use (under a day)")
    return line.model_copy(update={
        "frontier_monthly_usd": line.frontier.usd * scale, "self_hosted_monthly_usd": line.self_hosted_usd * scale,
        "savings_monthly_usd": savings, "payback_days": _payback(line.compile_usd, savings), "days": days,
        "notes": notes})


def _lease_split(names: list[str], starts: dict[str, float], calls: dict[str, list[dict[str, Any]]],
                 start: float, now: float, usd_per_s: float) -> dict[str, float]:
    """The lease over ``start``-``now`` split between the Specialists: each stretch between two
    first releases goes to the Specialists released by then, by the tokens they served in it
    (equally when none served any)."""
    out = {n: 0.0 for n in names}
    cuts = sorted({start, now, *(t for t in starts.values() if start < t < now)})
    for a, b in itertools.pairwise(cuts):
        live = [n for n in names if starts[n] <= a]
        tok = {n: sum(c["prompt_tokens"] + c["completion_tokens"] for c in calls[n]
                      if a <= c["time"] < b or (b == now and c["time"] == now)) for n in live}
        total = sum(tok.values())
        for n in live:
            out[n] += usd_per_s * (b - a) * (tok[n] / total if total else 1 / len(live))
    return out


# ----- the report ----------------------------------------------------------------------------


def build_report(env: str, state: EnvState, receipts: Iterable[dict[str, Any]],
                 artifacts: dict[tuple[str, str], ArtifactFacts], book: PriceBook, *, since_s: float, now: float,
                 frontier: str | None = None, gpu_hour: float | None = None,
                 gpu_share: float | None = None) -> Report:
    """The bill for ``env`` over the ``since_s`` seconds before ``now`` (from the environment's
    first release, if later). ``gpu_hour`` / ``gpu_share`` override the book's lease.

    Raises: InputError for a frontier model the book does not price.
    """
    model = frontier or book.default_frontier
    book.frontier_prices(model)
    gpu_hour = book.lease.gpu_hour if gpu_hour is None else gpu_hour
    share = book.lease.gpu_share if gpu_share is None else (gpu_share or None)  # 0: the measured basis
    history = [(name, t) for name, r in state.releases.items() for t in r.history]
    first = min((t.time for _, t in history), default=None)
    start = now - since_s if first is None else max(now - since_s, min(first, now))
    days = (now - start) / DAY_S
    recs = [r for r in receipts if start <= r.get("time", -1) <= now]
    calls = [r for r in recs if r.get("kind", "call") == "call"]
    audits = [r for r in recs if r.get("kind") == "audit"]

    names = sorted({*state.releases, *(r["specialist"] for r in recs)})
    by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in sorted(calls, key=lambda r: r["time"]):
        by_name[c["specialist"]].append(c)
    # Each Specialist's own window: from its first release (the window's start, if earlier, or for
    # one that only has receipts) to now.
    starts = {n: max(start, min((t.time for m, t in history if m == n), default=start)) for n in names}
    starts = {n: min(t, now) for n, t in starts.items()}
    lease = (_lease_split(names, starts, by_name, start, now, gpu_hour * share / 3600)
             if share is not None else {})
    day_list = _days(start, now)
    daily_frontier: dict[str, float] = defaultdict(float)
    daily_self: dict[str, float] = defaultdict(float)
    daily_calls: dict[str, dict[str, int]] = {d: {n: 0 for n in names} for d in day_list}

    lines = []
    for n in names:
        cs = by_name[n]
        fc, per_call = frontier_costs(cs, book, model)
        call_s = sum(c["latency_ms"] for c in cs) / 1000
        ok = [c for c in cs if c.get("status", "ok") == "ok"]  # an error's latency was not spent on a replica
        for c, usd in zip(cs, per_call):
            d = day_of(c["time"])
            daily_frontier[d] += usd
            daily_calls.setdefault(d, {m: 0 for m in names})[n] += 1
        if share is not None:
            serving = lease[n]
        else:
            serving = gpu_hour * sum(c["latency_ms"] for c in ok) / 1000 / 3600
            for c in ok:
                daily_self[day_of(c["time"])] += gpu_hour * c["latency_ms"] / 1000 / 3600
        mine = [a for a in audits if a["specialist"] == n]
        audit_usd = sum(a.get("cost_usd") or 0.0 for a in mine)
        for a in mine:
            daily_self[day_of(a["time"])] += a.get("cost_usd") or 0.0
        seen = {t.version for m, t in history if m == n} | {c["version"] for c in cs}
        versions = [compile_cost(artifacts.get((n, v)) or ArtifactFacts(name=n, version=v, found=False,
                                                                         note="no artifact found"),
                                 gpu_hour, book.lease.cpu_hour) for v in sorted(seen, key=_version_key)]
        lines.append(_monthly(Line(
            name=n, calls=len(cs), errors=sum(c.get("status") == "error" for c in cs),
            prompt_tokens=sum(c["prompt_tokens"] for c in cs), completion_tokens=sum(c["completion_tokens"] for c in cs),
            call_seconds=call_s, frontier=fc, serving_usd=serving, audit_usd=audit_usd,
            audits_uncosted=sum(a.get("cost_usd") is None and a.get("status") == "ok" for a in mine),
            self_hosted_usd=serving + audit_usd, compile_usd=sum(v.usd for v in versions), versions=versions),
            (now - starts[n]) / DAY_S))
    if share is not None and names:  # no Specialist: no lease billed (the total's self-hosted is 0 too)
        for d in day_list:
            d0 = calendar.timegm(time.strptime(d, "%Y-%m-%d"))
            daily_self[d] += gpu_hour * share * _overlap(d0, d0 + DAY_S, start, now) / 3600

    monthly = {k: sum(getattr(x, k) for x in lines)
               for k in ("frontier_monthly_usd", "self_hosted_monthly_usd", "savings_monthly_usd")}
    total = Line(
        name="total", calls=sum(x.calls for x in lines), errors=sum(x.errors for x in lines),
        prompt_tokens=sum(x.prompt_tokens for x in lines), completion_tokens=sum(x.completion_tokens for x in lines),
        call_seconds=sum(x.call_seconds for x in lines),
        frontier=FrontierCost(**{k: sum(getattr(x.frontier, k) for x in lines)
                                 for k in FrontierCost.model_fields if k != "cached_prefix_tokens"}),
        serving_usd=sum(x.serving_usd for x in lines), audit_usd=sum(x.audit_usd for x in lines),
        audits_uncosted=sum(x.audits_uncosted for x in lines),
        self_hosted_usd=sum(x.self_hosted_usd for x in lines), compile_usd=sum(x.compile_usd for x in lines),
        days=days, **monthly)  # the total's monthly figures: the sums of the Specialists' (each over its window)
    total = total.model_copy(update={"payback_days": _payback(total.compile_usd, total.savings_monthly_usd)})

    return Report(
        env=env, start=start, end=now, days=days, frontier_model=model,
        basis="gpu_share" if share is not None else "measured", gpu_hour=gpu_hour, cpu_hour=book.lease.cpu_hour,
        gpu_share=share, price_sources=book.sources, specialists=lines, total=total,
        daily=[Day(day=d, calls=daily_calls[d], frontier_usd=daily_frontier[d], self_hosted_usd=daily_self[d])
               for d in sorted(daily_calls)],
        k_series=_k_series(calls, audits),
        events=sorted((Event(time=t.time, specialist=n, version=t.version, action=_ACTIONS[t.phase], reason=t.reason)
                       for n, t in history if start <= t.time <= now), key=lambda e: e.time))


def _version_key(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in v.split("."))
    except ValueError:
        return (1 << 30,)


def _k_series(calls: list[dict[str, Any]], audits: list[dict[str, Any]]) -> list[KPoint]:
    online: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    counted: dict[tuple[str, str, str], int] = defaultdict(int)
    audited: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for c in calls:
        key = (c["specialist"], c["version"], day_of(c["time"]))
        counted[key] += 1
        if c.get("k") is not None:
            online[key].append(c["k"])
    for a in audits:
        if a.get("status") == "ok" and a.get("k") is not None:
            audited[(a["specialist"], a["version"], day_of(a["time"]))].append(a["k"])
    return [KPoint(specialist=s, version=v, day=d, calls=counted.get((s, v, d), 0), online_k=_mean(online[(s, v, d)]),
                   audits=len(audited[(s, v, d)]), audited_k=_mean(audited[(s, v, d)]))
            for s, v, d in sorted({*counted, *audited})]
