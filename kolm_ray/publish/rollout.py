"""The rollout controller's decision and the canary traffic split, as pure functions.

``window`` turns receipts into each version's online figures (calls, errors, mean K from the
receipts' reference-free checks) since the canary started; ``decide`` is the whole policy:

* roll back, at any time, once the canary has ``min_samples`` calls and its online K trails
  stable's by more than ``tolerance`` points, or its error rate exceeds stable's by more than
  ``max_error_rate_delta``;
* wait while the hold lasts, and while the canary has fewer than ``min_samples`` calls or the
  stable version has none to compare with (never promote on no data);
* promote otherwise.

``choose_route`` is the ingress's split: sticky by routing key when one is given. Must not do I/O.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Iterable, Literal

Action = Literal["wait", "promote", "rollback"]


@dataclass(frozen=True)
class Window:
    calls: int
    errors: int
    k_sum: float  # over ok calls with a K

    @property
    def ok(self) -> int:
        return self.calls - self.errors

    @property
    def k(self) -> float | None:
        """Mean online K, 0-100."""
        return 100 * self.k_sum / self.ok if self.ok else None

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0


def window(receipts: Iterable[dict[str, Any]], name: str, version: str, since: float) -> Window:
    calls = errors = 0
    k_sum = 0.0
    for r in receipts:
        if r["specialist"] != name or r["version"] != version or r["time"] < since or r["status"] == "cancelled":
            continue  # a client that hung up says nothing about the version
        calls += 1
        if r["status"] != "ok":
            errors += 1
        elif r.get("k") is not None:
            k_sum += r["k"]
    return Window(calls=calls, errors=errors, k_sum=k_sum)


@dataclass(frozen=True)
class Policy:
    hold_s: float
    min_samples: int
    tolerance: float  # K points
    max_error_rate_delta: float = 0.05


def decide(canary: Window, stable: Window, elapsed_s: float, p: Policy) -> tuple[Action, str]:
    if canary.calls >= p.min_samples:
        if canary.k is not None and stable.k is not None and canary.k < stable.k - p.tolerance:
            return "rollback", (f"online K {canary.k:.1f} trails stable's {stable.k:.1f} by more than "
                                f"{p.tolerance:g} over {canary.calls} canary calls")
        if canary.error_rate > stable.error_rate + p.max_error_rate_delta:
            return "rollback", (f"error rate {100 * canary.error_rate:.1f}% vs stable's "
                                f"{100 * stable.error_rate:.1f}% over {canary.calls} canary calls")
    if elapsed_s < p.hold_s:
        return "wait", f"holding: {p.hold_s - elapsed_s:.0f} s left ({canary.calls} canary calls so far)"
    if canary.calls < p.min_samples:
        return "wait", f"too few canary calls to judge: {canary.calls} of {p.min_samples}"
    if stable.ok == 0 or canary.k is None or stable.k is None:
        return "wait", "no online K for stable or canary yet: nothing to compare"
    return "promote", (f"online K {canary.k:.1f} vs stable's {stable.k:.1f} (tolerance {p.tolerance:g}) over "
                       f"{canary.calls} canary calls, error rate {100 * canary.error_rate:.1f}%")


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
