"""Evidence for a rollout decision: how sure are we that the canary is no worse than stable?

Per-call scores are in [0, 1] (a receipt's K / 100). For each version we keep running sums
(``Scores``); ``difference_bound`` turns two of them into an **always-valid** confidence interval
for ``mean(canary) - mean(stable)``: the mixture sequential probability ratio test's interval
(Robbins' normal mixture; Johari, Pekelis & Walsh, "Always valid inference: continuous
monitoring of A/B tests", 2017). It stays valid however often it is looked at, so the
controller may check it on every tick and stop as soon as it is conclusive; a fixed-horizon
interval checked every tick would promote a worse canary far more often than its stated level.

Variances are estimated with one 0 and one 1 added to each version's scores (as Agresti-Caffo add
a success and a failure), so a version whose every score is the same is not taken as certain:
near 0% or 100% accuracy a bare plug-in variance would make the bound far too narrow.
Pure: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Scale of the differences the mixture is tuned for (score units, 0..1): 0.2 = 20 K points, so a
# large regression is caught within a few dozen audits, at little cost near zero (see the tests).
# Smaller values tighten the interval for small differences and loosen it for large ones.
MIXTURE_TAU = 0.2


@dataclass(frozen=True)
class Scores:
    """Running sums of per-call scores in [0, 1]."""

    n: int = 0
    total: float = 0.0
    squares: float = 0.0

    def add(self, x: float) -> "Scores":
        return Scores(self.n + 1, self.total + x, self.squares + x * x)

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    @property
    def variance(self) -> float:
        """Regularized variance of one score: the variance of the scores with one 0 and one 1
        added (as Agresti-Caffo add a success and a failure), so a run of equal scores still
        leaves about 1/n of doubt instead of none."""
        n, total, squares = self.n + 2, self.total + 1, self.squares + 1
        return max(0.0, squares - total * total / n) / n


@dataclass(frozen=True)
class Bound:
    """An always-valid interval for canary - stable, in K points (0-100)."""

    diff: float
    lo: float
    hi: float
    confidence: float

    def text(self) -> str:
        return f"{self.diff:+.1f} K points, {100 * self.confidence:g}% bound [{self.lo:+.1f}, {self.hi:+.1f}]"


def difference_bound(canary: Scores, stable: Scores, confidence: float, tau: float = MIXTURE_TAU) -> Bound | None:
    """The always-valid (mSPRT) interval for ``canary.mean - stable.mean``; None without data.

    Raises:
        ValueError: ``confidence`` outside (0, 1) or ``tau`` not positive.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if canary.n == 0 or stable.n == 0:
        return None
    diff = canary.mean - stable.mean  # type: ignore[operator]
    v = canary.variance / canary.n + stable.variance / stable.n
    t2 = tau * tau
    alpha = 1 - confidence
    radius = math.sqrt(v * (v + t2) / t2 * (math.log((v + t2) / v) - 2 * math.log(alpha)))
    return Bound(diff=100 * diff, lo=100 * (diff - radius), hi=100 * (diff + radius), confidence=confidence)
