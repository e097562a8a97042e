"""The rollout decision, tick by tick, and the canary split."""

import random

import pytest

from kolm_ray.publish.rollout import Policy, Window, choose_route, decide, window

POLICY = Policy(hold_s=60, min_samples=20, tolerance=2.0)


def w(calls, k=0.9, errors=0) -> Window:
    return Window(calls=calls, errors=errors, k_sum=k * (calls - errors))


def test_a_canary_no_worse_than_stable_waits_out_the_hold_then_is_promoted():
    ticks = [(0, w(0), w(0)), (10, w(5), w(95)), (30, w(12), w(230)), (59, w(19), w(360)), (61, w(19), w(370)),
             (70, w(21), w(400))]
    actions = [decide(c, s, t, POLICY)[0] for t, c, s in ticks]
    assert actions == ["wait", "wait", "wait", "wait", "wait", "promote"]
    assert "too few canary calls to judge: 19 of 20" in decide(w(19), w(370), 61, POLICY)[1]


def test_a_worse_canary_is_rolled_back_during_the_hold():
    assert decide(w(19, k=0.2), w(300, k=0.95), 5, POLICY)[0] == "wait"  # not judged on too few calls
    action, reason = decide(w(20, k=0.2), w(300, k=0.95), 5, POLICY)
    assert action == "rollback" and "online K 20.0 trails stable's 95.0" in reason


def test_within_tolerance_is_not_a_regression():
    assert decide(w(40, k=0.89), w(400, k=0.90), 100, POLICY)[0] == "promote"
    assert decide(w(40, k=0.87), w(400, k=0.90), 100, POLICY)[0] == "rollback"


def test_errors_roll_back():
    action, reason = decide(w(40, errors=8), w(400, errors=4), 5, POLICY)
    assert action == "rollback" and "error rate 20.0%" in reason


def test_never_promotes_on_no_data():
    assert decide(w(0), w(0), 10**6, POLICY)[0] == "wait"
    assert decide(w(30), w(0), 10**6, POLICY) == ("wait", "no online K for stable or canary yet: nothing to compare")


def test_window_counts_one_version_since_the_start():
    receipts = [
        {"specialist": "a", "version": "1.1", "time": 5, "status": "ok", "k": 0.5},
        {"specialist": "a", "version": "1.1", "time": 15, "status": "ok", "k": 1.0},
        {"specialist": "a", "version": "1.1", "time": 16, "status": "error", "k": None},
        {"specialist": "a", "version": "1.0", "time": 17, "status": "ok", "k": 0.0},
        {"specialist": "b", "version": "1.1", "time": 18, "status": "ok", "k": 0.0},
    ]
    got = window(receipts, "a", "1.1", since=10)
    assert (got.calls, got.errors, got.k) == (2, 1, 100.0)


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
