"""Rollout decisions on audited K: how often each rule promotes a worse canary or rolls back a
good one, and how many audits it needs to decide, checked on every tick as the controller does.

    python benchmarks/rollout.py [--runs 400] [--write]

Simulated label-task audits (each audited call right or wrong), stable right with probability
0.85, canaries from equal to much worse; every tick adds ``--per-tick`` audited calls to each
version and the rule is asked again, up to ``--max-audits`` per version. Three rules, in the
same run on the same draws:

* kolm: ``rollout.decide`` (audited, tolerance 5 K points, always-valid 95% bound);
* the two-means rule main used (promote when the canary's mean is within the tolerance of
  stable's once it has ``min_audits``; roll back when it trails by more): the baseline;
* a fixed-horizon 95% normal interval checked every tick (a textbook A/B test, peeked at).

Pure: no Ray, no network.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _machine import machine  # noqa: E402

from kolm_ray.publish.evidence import Scores  # noqa: E402
from kolm_ray.publish.rollout import Policy, Window, decide  # noqa: E402

TOL = 5.0
POLICY = Policy(hold_s=0, min_samples=1, tolerance=100.0, audited=True, audit_tolerance=TOL, min_audits=10)


def kolm_rule(c: Scores, s: Scores) -> str:
    one = Scores(1, 1.0, 1.0)  # online K is not the question here: equal and perfect for both
    return decide(Window(calls=c.n, online=one, audited=c), Window(calls=s.n, online=one, audited=s), 1.0,
                  POLICY).action


def two_means(c: Scores, s: Scores) -> str:
    if c.n < 10 or s.n < 10:
        return "wait"
    return "rollback" if 100 * (c.mean - s.mean) < -TOL else "promote"


def fixed_horizon(c: Scores, s: Scores) -> str:
    if c.n < 10 or s.n < 10:
        return "wait"
    d = c.mean - s.mean
    se = math.sqrt(c.variance / c.n + s.variance / s.n)
    if 100 * (d + 1.96 * se) < -TOL:
        return "rollback"
    if 100 * (d - 1.96 * se) >= -TOL:
        return "promote"
    return "wait"


RULES = {"kolm (always-valid bound)": kolm_rule, "two means (main)": two_means,
         "fixed-horizon interval, peeked": fixed_horizon}


def simulate(p_canary: float, p_stable: float, runs: int, per_tick: int, max_audits: int, seed: int) -> dict:
    out = {name: {"promote": 0, "rollback": 0, "wait": 0, "audits": []} for name in RULES}
    rng = random.Random(seed)
    for _ in range(runs):
        c, s = Scores(), Scores()
        draws = []
        while c.n < max_audits:
            for _ in range(per_tick):
                c = c.add(float(rng.random() < p_canary))
                s = s.add(float(rng.random() < p_stable))
            draws.append((c, s))
        for name, rule in RULES.items():
            for cc, ss in draws:
                action = rule(cc, ss)
                if action != "wait":
                    out[name][action] += 1
                    out[name]["audits"].append(cc.n)
                    break
            else:
                out[name]["wait"] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=400)
    ap.add_argument("--per-tick", type=int, default=5)
    ap.add_argument("--max-audits", type=int, default=1000)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    stable = 0.85
    scenarios = [("equal", 0.85, "promote"), ("3 points worse", 0.82, "promote"),
                 ("15 points worse", 0.70, "rollback"), ("40 points worse", 0.45, "rollback")]
    t0 = time.perf_counter()
    lines = [f"rollout: audited label calls, stable right {100 * stable:.0f}%, tolerance {TOL:g} K points, "
             f"{args.per_tick} audits per version per tick, up to {args.max_audits}; {args.runs} runs per row",
             f"  {'canary':<17}{'rule':<33}{'promote':>9}{'rollback':>10}{'undecided':>11}{'median audits':>15}"]
    wrong: dict[str, list[float]] = {name: [] for name in RULES}
    for seed, (label, p, right) in enumerate(scenarios):
        res = simulate(p, stable, args.runs, args.per_tick, args.max_audits, seed=seed)
        for name, r in res.items():
            audits = sorted(r["audits"])
            med = audits[len(audits) // 2] if audits else float("nan")
            wrong_action = "rollback" if right == "promote" else "promote"
            wrong[name].append(r[wrong_action] / args.runs)
            lines.append(f"  {label:<17}{name:<33}{r['promote'] / args.runs:>9.3f}{r['rollback'] / args.runs:>10.3f}"
                         f"{r['wait'] / args.runs:>11.3f}{med:>15.0f}")
    lines.append("  worst wrong-decision rate per rule (promoting a canary 15+ points worse, or rolling back one "
                 "within the tolerance):")
    for name, ws in wrong.items():
        lines.append(f"    {name:<33}{max(ws):.3f}")
    lines += [f"  {time.perf_counter() - t0:.1f} s", f"  machine: {machine()}"]
    from _report import record

    record("rollout", lines, args.write)


if __name__ == "__main__":
    main()
