"""Self-consistent selection: how often the kept sample is right, against k, for a simulated
teacher that is right with probability p per sample, beside the exact accuracy of plurality
vote (random tie-break) computed by enumerating the multinomial vote counts.

The simulated teacher answers a label task with L labels: right with probability p, otherwise
one of the L-1 wrong labels, uniformly. Every answer is a bare label, so the verifier passes
them all with K = 1 and cannot tell right from wrong: whatever beats one sample is the vote.
The real ``choose_best`` (pure: no Ray, no network) picks one sample per row; its tie-break
(the answer sampled first) is a uniform random tie-break, since the k samples are
exchangeable. Baselines measured in the same run: one sample (k=1), and the theory.

    python benchmarks/selection.py [--rows 20000] [--labels 4] [--seed 0] [--write]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from functools import lru_cache

sys.path.insert(0, os.path.dirname(__file__))
from _machine import machine  # noqa: E402

from kolm_ray.sampling.fanout import choose_best  # noqa: E402

KS = (1, 2, 4, 8)
PS = (0.4, 0.55, 0.7)


def _compositions(k: int, parts: int):
    """Every way of writing k as an ordered sum of ``parts`` non-negative counts."""
    if parts == 1:
        yield (k,)
        return
    for first in range(k + 1):
        for rest in _compositions(k - first, parts - 1):
            yield (first, *rest)


@lru_cache(maxsize=None)
def plurality_accuracy(k: int, p: float, labels: int) -> float:
    """Exact P(plurality vote with uniform random tie-break picks the right label).

    Vote counts (right, wrong_1 .. wrong_{L-1}) are multinomial(k; p, q, .., q), q = (1-p)/(L-1).
    """
    q = (1 - p) / (labels - 1)
    total = 0.0
    for counts in _compositions(k, labels):
        right, top = counts[0], max(counts)
        if right == 0 or right < top:
            continue
        prob = math.factorial(k)
        for c in counts:
            prob /= math.factorial(c)
        prob *= p**right * q ** (k - right)
        total += prob / counts.count(top)
    return total


def simulate(k: int, p: float, labels: int, rows: int, rng: random.Random) -> float:
    """Share of ``rows`` simulated rows where ``choose_best`` keeps a right sample."""
    names = [f"label{j}" for j in range(labels)]  # names[0] is right
    right = 0
    for _ in range(rows):
        samples = []
        for i in range(k):
            text = names[0] if rng.random() < p else names[rng.randrange(1, labels)]
            samples.append({"sample_index": i, "text": text, "k": 1.0, "passed": True})
        right += samples[choose_best(samples, "label")]["text"] == names[0]
    return right / rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000, help="Simulated rows per (p, k) cell.")
    ap.add_argument("--labels", type=int, default=4, help="Size L of the label set.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    started = time.perf_counter()
    lines = [
        f"selection: share of rows whose kept sample is right; simulated teacher right with probability p, "
        f"wrong answers uniform over the other {args.labels - 1} of L={args.labels} labels; "
        f"{args.rows:,} rows per cell, seed {args.seed}",
        "  measured with choose_best (theory: exact plurality vote, random tie-break)",
        "  p     " + "".join(f"{'k=' + str(k):>18s}" for k in KS) + "    k=8 / k=1",
    ]
    worst_z = 0.0
    for p in PS:
        cells, measured = [], {}
        for k in KS:
            acc = simulate(k, p, args.labels, args.rows, rng)
            theory = plurality_accuracy(k, p, args.labels)
            se = math.sqrt(max(theory * (1 - theory), 1e-12) / args.rows)
            worst_z = max(worst_z, abs(acc - theory) / se)
            measured[k] = acc
            cells.append(f"{acc:7.3f} ({theory:.3f})")
        lines.append(f"  {p:<5.2f} " + "".join(f"{c:>18s}" for c in cells) + f"    {measured[8] / measured[1]:9.2f}x")
    lines.append(f"  largest gap to theory: {worst_z:.1f} standard errors "
                 f"({len(PS) * len(KS)} cells; under ~3 means choose_best is the plurality vote)")
    lines.append(f"  {len(PS) * sum(KS) * args.rows:,} samples selected in {time.perf_counter() - started:.1f} s")
    lines.append(f"  machine: {machine()}")
    from _report import record

    record("selection", lines, args.write)


if __name__ == "__main__":
    main()
