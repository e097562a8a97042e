"""The always-valid bound behind rollout decisions: it keeps its level however often it is checked."""

import math
import random

import pytest

from kolm_ray.publish.evidence import Scores, difference_bound


def _naive(c: Scores, s: Scores, z: float = 1.96) -> tuple[float, float]:
    """A fixed-horizon normal interval: right for one look, wrong for a look every tick."""
    d = c.mean - s.mean
    se = math.sqrt(c.variance / c.n + s.variance / s.n)
    return d - z * se, d + z * se


def _ever_excludes_the_truth(rng, interval, p_canary=0.7, p_stable=0.8, looks=400) -> bool:
    truth = 100 * (p_canary - p_stable)
    c, s = Scores(), Scores()
    for i in range(looks):
        c = c.add(float(rng.random() < p_canary))
        s = s.add(float(rng.random() < p_stable))
        if i >= 10:
            lo, hi = interval(c, s)
            if not lo <= truth <= hi:
                return True
    return False


def test_the_bound_keeps_its_level_when_checked_on_every_tick_and_a_naive_interval_does_not():
    rng = random.Random(0)
    runs = 1000

    def always_valid(c, s):
        b = difference_bound(c, s, 0.95)
        return b.lo, b.hi

    def naive(c, s):
        lo, hi = _naive(c, s)
        return 100 * lo, 100 * hi

    assert sum(_ever_excludes_the_truth(rng, always_valid) for _ in range(runs)) / runs <= 0.05
    # Why the controller may not use a fixed-horizon interval: checked every tick, it is wrong far
    # more often than its 5%.
    assert sum(_ever_excludes_the_truth(rng, naive) for _ in range(runs)) / runs > 0.15


def test_a_version_whose_every_score_is_equal_is_not_taken_as_certain():
    one = Scores().add(1.0).add(1.0)
    b = difference_bound(one, one, 0.95)
    assert b.diff == 0 and b.lo < -20 and b.hi > 20


def test_more_evidence_narrows_the_bound_and_it_is_symmetric():
    def make(n, p):
        s = Scores()
        for i in range(n):
            s = s.add(1.0 if (i * 7919) % 100 < 100 * p else 0.0)
        return s

    widths = []
    for n in (20, 200, 2000):
        b = difference_bound(make(n, 0.6), make(n, 0.8), 0.95)
        swapped = difference_bound(make(n, 0.8), make(n, 0.6), 0.95)
        assert b.lo <= b.diff <= b.hi
        assert (swapped.lo, swapped.hi) == pytest.approx((-b.hi, -b.lo))
        widths.append(b.hi - b.lo)
    assert widths[0] > widths[1] > widths[2]


def test_no_data_no_bound_and_bad_levels_are_refused():
    assert difference_bound(Scores(), Scores().add(1.0), 0.95) is None
    with pytest.raises(ValueError, match="confidence"):
        difference_bound(Scores().add(1.0), Scores().add(1.0), 1.0)


@pytest.mark.parametrize("p_canary, p_stable", [(0.95, 1.0), (0.94, 0.99), (0.93, 0.98), (1.0, 1.0)])
def test_the_bound_keeps_its_level_near_perfect_accuracy(p_canary, p_stable):
    # Near 0% or 100% a plug-in variance collapses and a canary at the margin is "proven" fine.
    rng = random.Random(1)

    def always_valid(c, s):
        b = difference_bound(c, s, 0.95)
        return b.lo, b.hi

    runs = 600
    wrong = sum(_ever_excludes_the_truth(rng, always_valid, p_canary, p_stable, looks=300) for _ in range(runs))
    assert wrong / runs <= 0.05
