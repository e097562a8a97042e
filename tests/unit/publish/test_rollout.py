"""The rollout decision, tick by tick, on the evidence it is given; the canary split; audit shares."""

import random

import pytest

from kolm_ray.publish.evidence import Scores
from kolm_ray.publish.rollout import Policy, Window, audit_share, choose_route, decide, window

POLICY = Policy(hold_s=60, min_samples=20, tolerance=2.0)
AUDITED = Policy(hold_s=60, min_samples=20, tolerance=2.0, audited=True, audit_tolerance=5.0, min_audits=10)


def scores(values) -> Scores:
    s = Scores()
    for x in values:
        s = s.add(x)
    return s


def w(calls, k=0.9, errors=0, audited=()) -> Window:
    """``calls`` calls whose online K alternates around ``k`` (a little spread, as real traffic has)."""
    ok = calls - errors
    online = scores([min(1.0, k + (0.05 if i % 2 else -0.05)) for i in range(ok)])
    return Window(calls=calls, errors=errors, online=online, audited=scores(audited))


def right(n_right: int, n: int) -> list[float]:
    """Audited K of ``n`` calls of which ``n_right`` were right (a label task: 1 or 0), interleaved."""
    rng = random.Random(n_right * 1000 + n)
    xs = [1.0] * n_right + [0.0] * (n - n_right)
    rng.shuffle(xs)
    return xs


def test_the_undertrained_canary_that_format_k_promoted_is_rolled_back_on_audited_k():
    # As measured on main: every canary answer a valid label (online K 100 vs stable's 77.6 over 130
    # calls), but 4 of 30 right against stable's 17 of 30.
    canary = Window(calls=130, errors=0, online=scores([1.0] * 130), audited=scores(right(4, 30)))
    stable = Window(calls=130, errors=0, online=scores([1.0] * 101 + [0.0] * 29), audited=scores(right(17, 30)))
    v = decide(canary, stable, 25, AUDITED)
    assert v.action == "rollback" and v.signal == "audited"
    assert "audited K 13.3 is below stable's 56.7" in v.reason
    assert v.bound.hi < -5
    # Without audits the same figures say nothing against it: the format check is all there is.
    assert decide(canary, stable, 25, POLICY).action == "wait"  # holding
    assert decide(canary, stable, 100, POLICY).action == "promote"


def test_a_regression_is_rolled_back_as_soon_as_it_is_significant_even_during_the_hold():
    stable_audits = right(14, 20)
    actions = []
    for n in (5, 10, 15, 20, 30, 40):
        canary = Window(calls=n * 2, online=scores([1.0] * n * 2), audited=scores(right(n // 5, n)))
        stable = Window(calls=200, online=scores([1.0] * 200), audited=scores(stable_audits))
        actions.append(decide(canary, stable, 10, AUDITED).action)
    assert actions[0] == "wait"  # 5 audits: too few to judge
    assert "rollback" in actions and actions[-1] == "rollback"
    assert actions.index("rollback") <= 4  # caught within 30 audits, long before the hold ends


def test_a_canary_identical_to_stable_waits_for_the_hold_and_the_evidence_then_is_promoted():
    ticks = []
    for t, n in ((10, 5), (30, 30), (70, 8), (80, 12), (120, 60), (400, 600)):
        same = [1.0 if i % 20 else 0.0 for i in range(n)]  # 95% right, both versions alike
        c = Window(calls=max(25, n), online=scores([1.0] * max(25, n)), audited=scores(same))
        s = Window(calls=400, online=scores([1.0] * 400), audited=scores(same))
        ticks.append(decide(c, s, t, AUDITED))
    actions = [v.action for v in ticks]
    assert actions[:2] == ["wait", "wait"] and "holding" in ticks[1].reason
    assert "too few audited calls" in ticks[2].reason
    assert actions[-1] == "promote" and "not worse by more than 5" in ticks[-1].reason
    first_promote = actions.index("promote")
    assert all(a == "wait" for a in actions[:first_promote])
    inconclusive = [v for v in ticks if "inconclusive" in v.reason]
    assert inconclusive, "some tick had audits but not yet enough evidence"
    assert ticks[-1].bound.lo >= -5


def test_without_audits_promotion_still_needs_evidence_on_the_online_k():
    few = decide(w(25, k=0.9), w(400, k=0.9), 100, POLICY)
    many = decide(w(4000, k=0.9), w(4000, k=0.9), 100, POLICY)
    assert few.action == "wait" and "online K inconclusive" in few.reason
    assert many.action == "promote" and "format-level K only (no audits)" in many.reason


def test_a_worse_online_k_is_rolled_back_once_significant():
    assert decide(w(19, k=0.2), w(300, k=0.95), 5, POLICY).action == "wait"  # not judged on too few calls
    v = decide(w(20, k=0.2), w(300, k=0.95), 5, POLICY)
    assert v.action == "rollback" and "online K 20.0 is below stable's 95.0" in v.reason


def test_within_tolerance_is_not_a_regression():
    assert decide(w(4000, k=0.89), w(4000, k=0.90), 100, POLICY).action == "promote"
    assert decide(w(4000, k=0.85), w(4000, k=0.90), 100, POLICY).action == "rollback"


def test_errors_roll_back():
    v = decide(w(40, errors=8), w(400, errors=4), 5, POLICY)
    assert v.action == "rollback" and "error rate 20.0%" in v.reason


def test_an_overload_burst_both_versions_share_is_not_the_canarys_fault():
    """Stable and canary share the base's queue: a burst of 503s lands on both. On main they
    counted as the canary's errors, and 4 of its 20 calls (20%) against stable's 10% rolled a
    good canary back."""
    canary = Window(calls=20, unavailable=4, online=scores([0.9] * 16))
    stable = Window(calls=380, unavailable=38, online=scores([0.9] * 342))
    v = decide(canary, stable, 5, POLICY)
    assert v.action == "wait" and canary.error_rate == 0.0 and canary.ok == 16


def test_a_canary_that_is_unavailable_far_more_often_than_stable_is_rolled_back():
    """A canary on a base of its own whose replicas keep failing: nearly every call a 503."""
    v = decide(Window(calls=40, unavailable=38, online=scores([0.9] * 2)), w(400), 5, POLICY)
    assert v.action == "rollback" and v.reason.startswith("unavailable on 95.0% of its calls vs stable's 0.0%")
    assert "bound [+" in v.reason and "+100.0]" in v.reason  # 0/1 data: the interval is clamped to the scale
    # Not on a handful of calls: the interval is wide until the evidence is there.
    assert decide(Window(calls=20, unavailable=5, online=scores([0.9] * 15)), w(400), 5, POLICY).action == "wait"
    # With no stable calls to compare with (all traffic on the canary), its own rate.
    v = decide(Window(calls=500, unavailable=500), Window(), 5, POLICY)
    assert v.action == "rollback" and "no stable calls to compare with" in v.reason


def test_a_canary_unavailable_more_often_is_not_promoted_before_it_is_shown_either_way():
    """8% of its calls turned away against stable's 2%: worse by more than 5 points, but not
    shown to be (the interval reaches below 5). It is held, not promoted on its K."""
    def turned_away(calls, unavailable):
        return Window(calls=calls, unavailable=unavailable, online=w(calls - unavailable).online)

    v = decide(turned_away(2000, 160), turned_away(4000, 80), 10**6, POLICY)
    assert v.action == "wait" and v.reason.startswith("unavailable on 8.0% of its calls vs stable's 2.0%")
    # The same K evidence with the canary turned away as often as stable: promoted.
    assert decide(turned_away(2000, 40), turned_away(4000, 80), 10**6, POLICY).action == "promote"


def test_the_error_guard_needs_min_samples_served_calls():
    """In an overload burst most canary calls are 503s: one 500 among the few it served is not
    an error rate yet."""
    canary = Window(calls=20, unavailable=15, errors=1, online=scores([0.9] * 4))
    stable = Window(calls=380, unavailable=285, errors=2, online=scores([0.9] * 93))
    assert decide(canary, stable, 5, POLICY).action == "wait"
    v = decide(Window(calls=40, errors=8, online=scores([0.9] * 32)), w(400, errors=4), 5, POLICY)
    assert v.action == "rollback" and v.reason.endswith("over 40 canary calls served")


def test_the_error_rate_is_over_the_calls_that_reached_the_version():
    got = Window(calls=40, errors=3, unavailable=10)
    assert (got.served, got.ok, got.error_rate, got.unavailable_rate) == (30, 27, 0.1, 0.25)
    assert Window().error_rate == Window().unavailable_rate == 0.0


def test_never_promotes_on_no_data():
    assert decide(w(0), w(0), 10**6, POLICY).action == "wait"
    assert decide(w(30), w(0), 10**6, POLICY).reason == "no online K for stable or canary yet: nothing to compare"
    assert decide(w(30, audited=[1.0] * 30), w(30), 10**6, AUDITED).action == "wait"  # stable has no audits


def test_window_counts_calls_and_audits_of_one_version_since_the_start():
    receipts = [  # K on 0-100, as read_receipts hands them over (format 3)
        {"specialist": "a", "version": "1.1", "time": 5, "status": "ok", "k": 50.0},
        {"specialist": "a", "version": "1.1", "time": 15, "status": "ok", "k": 100.0},
        {"specialist": "a", "version": "1.1", "time": 16, "status": "error", "k": None},  # before `error`
        {"specialist": "a", "version": "1.1", "time": 16, "status": "error", "k": None, "error": "server_error"},
        {"specialist": "a", "version": "1.1", "time": 16, "status": "error", "k": None, "error": "overloaded"},
        {"specialist": "a", "version": "1.1", "time": 16, "status": "error", "k": None, "error": "unavailable"},
        {"specialist": "a", "version": "1.1", "time": 16, "status": "cancelled", "k": None},
        {"kind": "audit", "specialist": "a", "version": "1.1", "time": 17, "status": "ok", "k": 0.0,
         "cost_usd": 0.002},
        {"kind": "audit", "specialist": "a", "version": "1.1", "time": 18, "status": "failed", "k": None},
        {"kind": "audit", "specialist": "a", "version": "1.1", "time": 19, "status": "dropped", "k": None},
        {"specialist": "a", "version": "1.0", "time": 17, "status": "ok", "k": 0.0},
        {"specialist": "b", "version": "1.1", "time": 18, "status": "ok", "k": 0.0},
    ]
    got = window(receipts, "a", "1.1", since=10)
    assert (got.calls, got.errors, got.unavailable, got.k) == (5, 2, 2, 100.0)
    assert (got.audited.n, got.audited_k, got.audit_failed, got.audit_dropped) == (1, 0.0, 1, 1)
    assert got.audit_cost_usd == pytest.approx(0.002)


def test_a_release_audits_its_canary_and_as_many_stable_calls():
    assert audit_share("canary", 0.05, 0.2, 0.0) == 0.2
    assert audit_share("stable", 0.05, 0.2, 0.0) == pytest.approx(0.2 * 0.05 / 0.95)
    assert audit_share("stable", 0.5, 0.2, 0.0) == pytest.approx(0.2)
    assert audit_share("stable", 0.05, 0.0, 0.01) == 0.01  # kolm serve --audit-rate: every call
    assert audit_share("pinned", 0.05, 0.2, 0.0) == 0.0
    assert audit_share("stable", 0.0, 0.2, 0.0) == 0.0  # no canary running: nothing to compare


def test_split_lands_near_the_weight_and_sticky_keys_stay_put():
    rng = random.Random(7)
    hits = sum(choose_route("tldr", 0.05, None, rng) == "canary" for _ in range(20_000))
    assert 0.045 < hits / 20_000 < 0.055
    for key in ("u1", "u2", "u3", "user-42"):
        first = choose_route("tldr", 0.3, key)
        assert all(choose_route("tldr", 0.3, key) == first for _ in range(50))
    keyed = sum(choose_route("tldr", 0.3, f"user-{i}") == "canary" for i in range(5000))
    assert 0.27 < keyed / 5000 < 0.33


@pytest.mark.parametrize("weight, route", [(0, "stable"), (1, "canary")])
def test_weights_at_the_ends(weight, route):
    assert {choose_route("x", weight, k) for k in (None, "a", "b")} == {route}
