"""The rollout controller's decision and the canary traffic split, as pure functions.

``window`` turns receipts into each version's online figures since the canary started: served
calls and errors, the reference-free online K of every call (a format check: is it a valid
label, a well-formed answer), and the **audited K** of the calls the teacher answered too (the
output scored against the teacher's reference, as the holdout is). ``decide`` is the whole
policy, and every K judgement in it rests on an always-valid interval for the difference
(``evidence.difference_bound``), never on two bare means:

* fast guards, at any time once the canary has ``min_samples`` calls (served, for the error
  rate): roll back when its error rate exceeds stable's by more than ``max_error_rate_delta``,
  when its calls are unavailable significantly more often than stable's (by more than the same
  delta: ``unavailability_regressed``), or when its online K is significantly worse than
  stable's by more than ``tolerance`` (the interval lies below);
* with audits (``audited``): roll back, at any time, as soon as the canary's audited K is
  significantly worse than stable's by more than ``audit_tolerance``;
* wait while the hold lasts, while the canary has fewer than ``min_samples`` calls, while its
  unavailable rate is more than ``max_error_rate_delta`` above stable's (not shown to be the
  canary's, so no rollback, but no promotion on it either), while either version has fewer
  than ``min_audits`` audited calls, or while the evidence is inconclusive (never promote on no
  data);
* promote once the interval shows the canary is not worse than stable by more than the
  tolerance (audited K with audits; otherwise the online K, and the reason says so).

A failed call is the version's **error** (a 500: its generation failed) or the serving path's
**unavailability** (a 503: ``overloaded``, a replica gone or restarting; the receipt's ``error``
says which). An error is the version's own, so a bare rate over the served calls rolls back
quickly. A 503 usually says nothing about the version: stable and canary share the base's queue
and replicas, and an overload burst hits 5% of the canary's calls as it hits stable's, so on a
few dozen calls a bare rate would roll back a good canary on the noise. Unavailability counts
against the canary only when the always-valid interval shows it significantly above stable's (a
canary on a base of its own whose replicas keep failing, say).

``choose_route`` is the ingress's split: sticky by routing key when one is given. Must not do I/O.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

from kolm_ray.publish.evidence import Bound, Scores, difference_bound
from kolm_ray.serve.receipts import INFRA_ERRORS

Action = Literal["wait", "promote", "rollback"]


@dataclass(frozen=True)
class Window:
    """One version's figures over a stretch of receipts."""

    calls: int = 0
    errors: int = 0  # the version's: its generation failed (a 500)
    unavailable: int = 0  # the serving path's: a 503 (overloaded, a replica gone); see the module doc
    online: Scores = field(default_factory=Scores)  # reference-free K of ok calls
    audited: Scores = field(default_factory=Scores)  # K against the teacher's reference
    audit_failed: int = 0  # the teacher did not answer (outage, budget): no reference
    audit_dropped: int = 0  # the audit queue was full: never asked
    audit_cost_usd: float = 0.0  # over the audits that carry a cost
    audit_uncosted: int = 0  # paid audits whose teacher has no price: not counted in the cost

    @property
    def ok(self) -> int:
        return self.calls - self.errors - self.unavailable

    @property
    def served(self) -> int:
        """Calls that reached the version (not turned away by the serving path)."""
        return self.calls - self.unavailable

    @property
    def k(self) -> float | None:
        """Mean online (reference-free) K, 0-100."""
        return None if self.online.mean is None else 100 * self.online.mean

    @property
    def audited_k(self) -> float | None:
        """Mean audited K, 0-100."""
        return None if self.audited.mean is None else 100 * self.audited.mean

    @property
    def error_rate(self) -> float:
        """The version's errors over the calls that reached it."""
        return self.errors / self.served if self.served else 0.0

    @property
    def unavailable_rate(self) -> float:
        return self.unavailable / self.calls if self.calls else 0.0

    @property
    def unavailability(self) -> Scores:
        """Each call as 1 (turned away) or 0, for ``difference_bound``."""
        return Scores(n=self.calls, total=float(self.unavailable), squares=float(self.unavailable))


def window(receipts: Iterable[dict[str, Any]], name: str, version: str, since: float) -> Window:
    """``name@version``'s figures from receipts newer than ``since``: calls (``kind`` "call", the
    default) and audits (``kind`` "audit", linked to a call by its request id). Receipts as
    ``read_receipts`` returns them, in the current format (K 0-100); the evidence works on 0-1."""
    calls = errors = unavailable = failed = dropped = uncosted = 0
    online, audited, cost = Scores(), Scores(), 0.0
    for r in receipts:
        if r["specialist"] != name or r["version"] != version or r["time"] < since:
            continue
        if r.get("kind", "call") == "audit":
            if r.get("cost_usd") is None and r["status"] == "ok":
                uncosted += 1
            cost += r.get("cost_usd") or 0.0
            if r["status"] == "ok" and r.get("k") is not None:
                audited = audited.add(r["k"] / 100)
            elif r["status"] == "dropped":
                dropped += 1
            else:
                failed += 1
            continue
        if r["status"] == "cancelled":
            continue  # a client that hung up says nothing about the version
        calls += 1
        if r["status"] != "ok":  # a receipt from before ``error`` was recorded counts as the version's
            if r.get("error") in INFRA_ERRORS:
                unavailable += 1
            else:
                errors += 1
        elif r.get("k") is not None:
            online = online.add(r["k"] / 100)
    return Window(calls=calls, errors=errors, unavailable=unavailable, online=online, audited=audited,
                  audit_failed=failed, audit_dropped=dropped, audit_cost_usd=cost, audit_uncosted=uncosted)


@dataclass(frozen=True)
class Policy:
    """How a canary is judged: what the release was published with (``controller.policy_of``)."""

    hold_s: float
    min_samples: int
    tolerance: float  # K points the canary's online K may trail stable's
    audited: bool = False  # judged on audited K (the release asked for audits)
    audit_tolerance: float = 5.0  # K points the canary's audited K may trail stable's
    confidence: float = 0.95
    min_audits: int = 10  # audited calls per version before the audited K is judged at all
    max_error_rate_delta: float = 0.05  # also how much more often the canary may be unavailable (bound)


@dataclass(frozen=True)
class Verdict:
    """One tick's decision, its reason, and the evidence (which K, and its interval) behind it."""

    action: Action
    reason: str
    signal: Literal["audited", "online"] | None = None  # which K the bound is about
    bound: Bound | None = None


def decide(canary: Window, stable: Window, elapsed_s: float, p: Policy) -> Verdict:
    """One tick's decision on a canary from its and stable's windows since it started."""
    online = difference_bound(canary.online, stable.online, p.confidence)
    audited = difference_bound(canary.audited, stable.audited, p.confidence)
    # Never judged on no audits, whatever ``min_audits`` says (a Policy built with 0 once promoted on none).
    need_audits = max(1, p.min_audits)
    enough_audits = canary.audited.n >= need_audits and stable.audited.n >= need_audits
    if canary.served >= p.min_samples and canary.error_rate > stable.error_rate + p.max_error_rate_delta:
        return Verdict("rollback", f"error rate {100 * canary.error_rate:.1f}% vs stable's "
                                   f"{100 * stable.error_rate:.1f}% over {canary.served} canary calls served")
    if canary.calls >= p.min_samples:
        if (why := unavailability_regressed(canary, stable, p)) is not None:
            return Verdict("rollback", why)
        if online is not None and online.hi < -p.tolerance:
            return Verdict("rollback", f"online K {canary.k:.1f} is below stable's {stable.k:.1f} by more than "
                                       f"{p.tolerance:g} ({online.text()}) over {canary.calls} canary calls",
                           "online", online)
    if p.audited and enough_audits and audited is not None and audited.hi < -p.audit_tolerance:
        return Verdict("rollback", f"audited K {canary.audited_k:.1f} is below stable's {stable.audited_k:.1f} by "
                                   f"more than {p.audit_tolerance:g} ({audited.text()}) over {canary.audited.n} "
                                   f"and {stable.audited.n} audited calls", "audited", audited)
    signal, bound = ("audited", audited) if p.audited else ("online", online)
    if elapsed_s < p.hold_s:
        return Verdict("wait", f"holding: {p.hold_s - elapsed_s:.0f} s left ({canary.calls} canary calls so far)",
                       signal, bound)
    if canary.calls < p.min_samples:
        return Verdict("wait", f"too few canary calls to judge: {canary.calls} of {p.min_samples}", signal, bound)
    if canary.unavailable_rate > stable.unavailable_rate + p.max_error_rate_delta:
        # Not yet shown to be the canary's (no rollback), but never promoted on it either.
        return Verdict("wait", f"unavailable on {100 * canary.unavailable_rate:.1f}% of its calls vs stable's "
                               f"{100 * stable.unavailable_rate:.1f}%: more than {100 * p.max_error_rate_delta:g} "
                               f"points above, waiting for the evidence either way", signal, bound)
    if p.audited:
        if not enough_audits:
            return Verdict("wait", f"too few audited calls to judge: canary {canary.audited.n}, stable "
                                   f"{stable.audited.n} of {need_audits} each", signal, bound)
        assert audited is not None  # both versions have audits
        if audited.lo >= -p.audit_tolerance:
            return Verdict("promote", f"audited K {canary.audited_k:.1f} vs stable's {stable.audited_k:.1f}: not "
                                      f"worse by more than {p.audit_tolerance:g} ({audited.text()}) over "
                                      f"{canary.audited.n} and {stable.audited.n} audited calls", signal, audited)
        return Verdict("wait", f"audited K inconclusive: {audited.text()}, tolerance {p.audit_tolerance:g}", signal,
                       audited)
    if online is None:
        return Verdict("wait", "no online K for stable or canary yet: nothing to compare", signal, None)
    if online.lo >= -p.tolerance:
        return Verdict("promote", f"online K {canary.k:.1f} vs stable's {stable.k:.1f}: not worse by more than "
                                  f"{p.tolerance:g} ({online.text()}) over {canary.calls} canary calls, error rate "
                                  f"{100 * canary.error_rate:.1f}%, unavailable {100 * canary.unavailable_rate:.1f}%; "
                                  f"format-level K only (no audits)", signal, online)
    return Verdict("wait", f"online K inconclusive: {online.text()}, tolerance {p.tolerance:g}", signal, online)


def unavailability_regressed(canary: Window, stable: Window, p: Policy) -> str | None:
    """Why the canary's calls are turned away (503) significantly more often than stable's, by
    more than ``max_error_rate_delta``; None when that is not shown. Without stable calls to
    compare with, the canary's own rate against the delta."""
    delta = 100 * p.max_error_rate_delta
    rate = 100 * canary.unavailable_rate
    if stable.calls == 0:
        return (f"unavailable on {rate:.1f}% of its {canary.calls} calls (more than {delta:g}), and no stable "
                f"calls to compare with") if rate > delta else None
    b = difference_bound(canary.unavailability, stable.unavailability, p.confidence)
    if b is None or b.lo <= delta:
        return None
    lo, hi = max(-100.0, b.lo), min(100.0, b.hi)
    return (f"unavailable on {rate:.1f}% of its calls vs stable's {100 * stable.unavailable_rate:.1f}%: more by "
            f"over {delta:g} points ({b.diff:+.1f} points, {100 * b.confidence:g}% bound [{lo:+.1f}, {hi:+.1f}]) "
            f"over {canary.calls} canary calls")


def choose_route(name: str, weight: float, routing_key: str | None, rng: random.Random | None = None) -> str:
    """"canary" or "stable". A routing key maps to a fixed point in [0, 1), so one user always sees
    one version (until the weight moves past their point)."""
    if weight <= 0:
        return "stable"
    if weight >= 1:
        return "canary"
    if routing_key:
        h = hashlib.sha256(f"{name}\0{routing_key}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
    else:
        u = (rng or random).random()
    return "canary" if u < weight else "stable"


def audit_share(route: str, weight: float, audit_rate: float, serve_rate: float) -> float:
    """The probability that a call on ``route`` is audited. A release's ``audit_rate`` applies to
    its canary's calls, and to as many stable calls in expectation (stable gets ``1 - weight`` of
    the traffic, so its share is scaled by ``weight / (1 - weight)``); ``serve_rate`` (``kolm
    serve --audit-rate``) applies to every call. The larger of the two wins."""
    share = 0.0
    if audit_rate > 0 and 0 < weight < 1:
        if route == "canary":
            share = audit_rate
        elif route == "stable":
            share = min(1.0, audit_rate * weight / (1 - weight))
    return max(share, serve_rate)
