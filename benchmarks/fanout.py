"""Fan-out throughput: kolm's Ray Data teacher stage against a hand-written asyncio loop over
the same SDK at the same concurrency, and against the ideal (concurrency / latency).

The local Messages API server runs in its own process with a fixed latency per call, so it
competes with neither side for the GIL. Both sides make the same number of fresh calls (the
response cache starts empty). Two figures per side: end to end (what a user waits for,
Ray's actor start-up included) and steady state (the server's first request to its last
answer). Prints ratios and the machine; ``--write`` updates README.md.

    python benchmarks/fanout.py [--calls 4096] [--concurrency 64] [--latency 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import json
import urllib.request

import anthropic
import pyarrow as pa

sys.path.insert(0, os.path.dirname(__file__))
from _machine import machine  # noqa: E402


async def asyncio_baseline(n: int, concurrency: int) -> float:
    client = anthropic.AsyncAnthropic(max_retries=0, timeout=60)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await client.messages.create(model="claude-opus-4-7", max_tokens=64,
                                         messages=[{"role": "user", "content": f"row {i}"}])

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - t


def kolm_fanout(n: int, concurrency: int, actors: int) -> float:
    from kolm_ray.cluster import connect
    from kolm_ray.sampling.config import QuotaConfig, SampleConfig, TeacherConfig
    from kolm_ray.sampling.fanout import call_teacher, plan
    from kolm_ray.sampling.limits import set_limits

    connect(None)
    rows = pa.table({"id": [f"r{i}" for i in range(n)], "input": [f"row {i}" for i in range(n)],
                     "output": [None] * n, "reference": [None] * n})
    with tempfile.TemporaryDirectory() as cache:
        # The organization's limits are the operator's: state them for this run's own home.
        os.environ["KOLM_HOME"] = str(Path(cache) / "home")
        set_limits(max_in_flight=concurrency, calls_per_minute=10**6, tokens_per_minute=10**9, notify=False)
        p = plan("Answer.", rows, None, TeacherConfig(max_tokens=64), SampleConfig(k=1, concurrency=concurrency, actors=actors),
                 QuotaConfig(), cache)
        t = time.perf_counter()
        out = call_teacher(p, rows)
        elapsed = time.perf_counter() - t
    assert out.num_rows == n and out.column("text").null_count == 0
    return elapsed


def server_window(url: str) -> float:
    """Seconds from the server's first request to its last answer; resets its counters."""
    with urllib.request.urlopen(f"{url}/_stats") as r:
        st = json.load(r)
    urllib.request.urlopen(urllib.request.Request(f"{url}/_reset", method="POST")).read()
    return st["last_success_at"] - st["first_request_at"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=4096)
    ap.add_argument("--concurrency", type=int, default=64)
    # 1 s: a frontier model's answer takes seconds; at 0.25 s Ray's fixed start-up dominates.
    ap.add_argument("--latency", type=float, default=1.0)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="Record the figures in benchmarks/README.md.")
    args = ap.parse_args()

    server = subprocess.Popen([sys.executable, "-m", "kolm_ray.testing.messages_api", "--latency", str(args.latency)],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        os.environ.update(ANTHROPIC_BASE_URL=url, ANTHROPIC_API_KEY=f"bench-{os.getpid()}")
        ideal = args.calls * args.latency / args.concurrency
        base = asyncio.run(asyncio_baseline(args.calls, args.concurrency))
        base_ss = server_window(url)
        ours = kolm_fanout(args.calls, args.concurrency, args.actors)
        ours_ss = server_window(url)
    finally:
        server.terminate()
    lines = [
        f"fan-out: {args.calls} calls, {args.concurrency} in flight, {args.latency * 1000:.0f} ms per call, "
        f"{args.actors} Ray Data actors",
        f"  ideal (concurrency / latency)   {args.calls / ideal:8.1f} calls/s",
        "                                 end to end                          steady state",
        f"  hand-written asyncio loop       {args.calls / base:6.1f} calls/s ({ideal / base:.3f} of ideal)      "
        f"{args.calls / base_ss:6.1f} calls/s ({ideal / base_ss:.3f} of ideal)",
        f"  kolm Ray Data fan-out           {args.calls / ours:6.1f} calls/s ({ideal / ours:.3f} of ideal)      "
        f"{args.calls / ours_ss:6.1f} calls/s ({ideal / ours_ss:.3f} of ideal)",
        f"  kolm / asyncio                  {base / ours:.3f}                                {base_ss / ours_ss:.3f}",
        f"  machine: {machine()}",
    ]
    from _report import record

    record("fanout", lines, args.write)


if __name__ == "__main__":
    main()
