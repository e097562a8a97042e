"""Property tests of the rollout decision and the canary split (``publish.rollout``).

For any observed figures, ``decide`` never promotes a canary with fewer than ``min_samples``
calls, during the hold, without the audits it needs, or whose judged K (audited K with audits,
else the online K) trails stable's by more than the tolerance; nor one whose error rate, or
unavailable rate, exceeds stable's by more than the allowed margin; and rolls back only on
evidence against the canary (errors, a significantly worse K or unavailability). ``choose_route`` always names an existing version
("canary" or "stable"), sends each routing key to one version, moves a key only towards the
canary as the weight grows, and over many keys (or draws of a seeded generator) sends a share
within a fixed bound of the weight: deterministic, never statistically flaky.
"""

from __future__ import annotations

import math
import random

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kolm_ray.publish.evidence import Scores, difference_bound
from kolm_ray.publish.rollout import Policy, Window, audit_share, choose_route, decide

# Reproducible in CI: the same examples every run, nothing saved between runs.
_BASE = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow])


def examples(n: int) -> settings:
    """The shared settings with ``n`` examples: sized so each test runs in seconds on two cores."""
    return settings(_BASE, max_examples=n)


unit = st.floats(0.0, 1.0)
# A few distinct per-call scores, repeated: windows of a handful to tens of thousands of calls.
few_scores = st.lists(st.sampled_from([0.0, 1.0, 0.5, 0.9]) | unit, max_size=12)


def _scores(values: list[float], repeat: int) -> Scores:
    s = Scores()
    for x in values:
        s = s.add(x)
    return Scores(s.n * repeat, s.total * repeat, s.squares * repeat)


@st.composite
def windows(draw) -> Window:
    """A consistent window: errors within the calls, an online K for at most the ok calls."""
    repeat = draw(st.sampled_from([1, 1, 3, 40, 1000]))
    online = _scores(draw(few_scores), repeat)
    errors = draw(st.integers(0, 50)) * (repeat if draw(st.booleans()) else 1)
    unavailable = draw(st.integers(0, 50)) * (repeat if draw(st.booleans()) else 1)
    calls = online.n + errors + unavailable + draw(st.integers(0, 30))
    audited = _scores(draw(few_scores), draw(st.sampled_from([1, 2, 10, 100])))
    return Window(calls=calls, errors=errors, unavailable=unavailable, online=online, audited=audited)


policies = st.builds(
    Policy,
    hold_s=st.sampled_from([0.0, 60.0, 600.0]) | st.floats(0, 3600),
    min_samples=st.integers(0, 500),
    tolerance=st.sampled_from([0.0, 2.0, 5.0]) | st.floats(0, 50),
    audited=st.booleans(),
    audit_tolerance=st.sampled_from([0.0, 5.0]) | st.floats(0, 50),
    confidence=st.sampled_from([0.9, 0.95, 0.99]) | st.floats(0.5, 0.999),
    min_audits=st.integers(0, 50),
    max_error_rate_delta=st.sampled_from([0.0, 0.05]) | st.floats(0, 0.5),
)
# Rounding: a bound and a mean computed along different paths may differ in the last bits.
EPS = 1e-9


@examples(800)
@given(canary=windows(), stable=windows(), elapsed_s=st.sampled_from([0.0, 30.0, 1e6]) | st.floats(0, 1e5),
       p=policies)
@example(canary=Window(calls=19, online=_scores([1.0], 19)), stable=Window(calls=400, online=_scores([0.5], 400)),
         elapsed_s=1e6, p=Policy(hold_s=0, min_samples=20, tolerance=2.0))
@example(canary=Window(calls=4000, online=_scores([0.85, 0.95], 2000)),
         stable=Window(calls=4000, online=_scores([0.9, 1.0], 2000)), elapsed_s=1e6,
         p=Policy(hold_s=0, min_samples=20, tolerance=2.0))
@example(canary=Window(), stable=Window(), elapsed_s=0.0, p=Policy(hold_s=0, min_samples=0, tolerance=0.0,
                                                                   audited=True, min_audits=0))
def test_decide_never_promotes_without_the_evidence(canary, stable, elapsed_s, p):
    v = decide(canary, stable, elapsed_s, p)
    assert v.action in ("wait", "promote", "rollback")
    assert isinstance(v.reason, str) and v.reason
    if v.action != "promote":
        return
    assert canary.calls >= p.min_samples, v.reason
    assert elapsed_s >= p.hold_s, v.reason
    assert canary.error_rate <= stable.error_rate + p.max_error_rate_delta + EPS, v.reason
    assert canary.unavailable_rate <= stable.unavailable_rate + p.max_error_rate_delta + EPS, v.reason
    assert v.bound is not None and v.bound.lo <= v.bound.diff <= v.bound.hi
    if p.audited:
        assert v.signal == "audited"
        assert canary.audited.n >= p.min_audits and stable.audited.n >= p.min_audits, v.reason
        assert canary.audited.n > 0 and stable.audited.n > 0
        assert canary.audited_k >= stable.audited_k - p.audit_tolerance - EPS, v.reason
        assert v.bound.lo >= -p.audit_tolerance
    else:
        assert v.signal == "online"
        assert canary.k is not None and stable.k is not None, v.reason
        assert canary.k >= stable.k - p.tolerance - EPS, v.reason
        assert v.bound.lo >= -p.tolerance


@examples(300)
@given(canary=windows(), stable=windows(), p=policies)
def test_decide_rolls_back_only_on_evidence_against_the_canary(canary, stable, p):
    v = decide(canary, stable, 0.0, p)
    if v.action != "rollback":
        return
    worse_errors = canary.served >= p.min_samples and canary.error_rate > stable.error_rate + p.max_error_rate_delta
    worse_k = v.bound is not None and (
        v.bound.hi < -(p.audit_tolerance if v.signal == "audited" else p.tolerance))
    # Turned away significantly more often than stable by more than the delta (its own rate
    # against the delta when stable has no calls).
    gone = difference_bound(canary.unavailability, stable.unavailability, p.confidence)
    worse_unavailable = canary.calls >= p.min_samples and canary.calls > 0 and (
        canary.unavailable_rate > p.max_error_rate_delta if stable.calls == 0
        else gone is not None and gone.lo > 100 * p.max_error_rate_delta)
    assert worse_errors or worse_k or worse_unavailable, v.reason
    if worse_k:
        assert v.bound.diff < 0


names = st.sampled_from(["tldr", "route", ""]) | st.text(max_size=10)
weights = st.floats(0.0, 1.0) | st.sampled_from([0.0, 1.0, 1e-9, 0.5, 1 - 1e-9])
KEYS = 4000
# |share - weight| <= 5 standard deviations of a share over KEYS keys (sd <= 0.5 / sqrt(KEYS)):
# a hash split that passes this for every name and weight tried is routing by the weight.
BOUND = 5 * 0.5 / math.sqrt(KEYS)


@examples(60)
@given(name=names, weight=weights, prefix=st.sampled_from(["user-", "", "tenant/7/"]) | st.text(max_size=4))
def test_keyed_split_sends_a_share_near_the_weight(name, weight, prefix):
    routes = [choose_route(name, weight, f"{prefix}{i}") for i in range(KEYS)]
    assert set(routes) <= {"canary", "stable"}
    share = routes.count("canary") / KEYS
    assert abs(share - weight) <= BOUND, (share, weight)
    if weight <= 0:
        assert share == 0
    if weight >= 1:
        assert share == 1


@examples(60)
@given(name=names, weight=weights, seed=st.integers(0, 2**32))
def test_unkeyed_split_sends_a_share_near_the_weight(name, weight, seed):
    rng = random.Random(seed)
    share = sum(choose_route(name, weight, None, rng) == "canary" for _ in range(KEYS)) / KEYS
    assert abs(share - weight) <= BOUND, (share, weight)


@examples(400)
@given(name=names, key=st.none() | st.text(), w1=weights | st.floats(allow_nan=True, allow_infinity=True),
       w2=weights)
@example(name="x", key="a", w1=math.nan, w2=0.5)
@example(name="x", key=None, w1=math.inf, w2=0.5)
def test_a_key_sees_one_version_and_only_moves_to_the_canary_as_the_weight_grows(name, key, w1, w2):
    first = choose_route(name, w1, key, random.Random(0))
    assert first in ("canary", "stable")
    if key:  # sticky: the same version on every call
        assert all(choose_route(name, w1, key) == first for _ in range(3))
        if not math.isnan(w1):
            lo, hi = sorted((w1, w2))
            if choose_route(name, lo, key) == "canary":
                assert choose_route(name, hi, key) == "canary"


@examples(300)
@given(weight=weights, audit_rate=unit, serve_rate=unit,
       route=st.sampled_from(["canary", "stable", "pinned"]))
def test_audit_shares_are_probabilities_and_balance_the_two_versions(weight, audit_rate, serve_rate, route):
    share = audit_share(route, weight, audit_rate, serve_rate)
    assert 0.0 <= share <= 1.0
    assert share >= serve_rate
    if serve_rate == 0 and 0 < weight < 1 and audit_rate * weight / (1 - weight) <= 1:
        # As many stable calls audited as canary calls, in expectation.
        canary = weight * audit_share("canary", weight, audit_rate, 0.0)
        stable = (1 - weight) * audit_share("stable", weight, audit_rate, 0.0)
        assert math.isclose(canary, stable, rel_tol=1e-9, abs_tol=1e-12)
