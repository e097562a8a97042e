"""Verifier throughput on one core: outputs scored per second for each output kind, against
the 5,000 outputs/s the serving path needs (it scores live traffic), and against a baseline
that does only the unavoidable part (tokenizing the output) in the same run.

    python benchmarks/verifier.py [--write]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _machine import machine  # noqa: E402

from kolm_ray.testing.corpus import LEADS_TASK, ROUTING_TASK, TLDR_TASK, leads_rows, routing_rows, tldr_rows  # noqa: E402
from kolm_ray.measures import _content_words_cached, word_count  # noqa: E402
from kolm_ray.verifier import synthesize  # noqa: E402

TARGET = 5000.0


def rate(fn, items, seconds: float = 1.5) -> float:
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        _content_words_cached.cache_clear()  # live traffic: every input is new
        for it in items:
            fn(*it)
        n += len(items)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    lines = ["verifier: outputs scored per second on one core (input, output and reference given, no warm cache)"]
    for kind, task, rows in (("text", TLDR_TASK, tldr_rows(400, seed=7)), ("label", ROUTING_TASK, routing_rows(400, seed=7)),
                             ("json", LEADS_TASK, leads_rows(400, seed=7))):
        v = synthesize(task, [r.output for r in rows[:100]], [r.input for r in rows[:100]])
        # Score held-out rows so nothing is warm from synthesis.
        items = [(r.output, r.input, r.output) for r in rows[100:]]
        ours = rate(v.score, items)
        base = rate(lambda o, i, r: word_count(o), items)
        lines.append(f"  {kind:5s}  {ours:9,.0f}/s  ({ours / TARGET:5.1f} x the 5,000/s target; "
                     f"tokenize-only baseline {base:9,.0f}/s, ratio {ours / base:.2f})")
    lines.append(f"  machine: {machine()}")
    from _report import record

    record("verifier", lines, args.write)


if __name__ == "__main__":
    main()
