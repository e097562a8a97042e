"""Audits: what auditing served calls against the teacher adds to a served call's latency, and
what it costs in teacher calls per 1,000 served calls.

    python benchmarks/audit.py [--requests 200] [--concurrency 8] [--teacher-latency 0.5] [--write]

In the same run, on the same Serve instance, random-init Qwen2 base and prompts: the app with no
audits (the baseline) and the same app auditing every call (``--audit-rate 1``, the worst case),
alternated in rounds so that the machine's noise falls on both alike. The teacher is the local
Messages API server answering after ``--teacher-latency`` seconds (a frontier model takes about
that for a one-word label); audits run off the request path, so the goal is no difference at
p50. Cost is what the audit records say the teacher calls cost at list price (a repeated input is
answered from the teacher cache and costs nothing), per 1,000 served calls at rate 1; at rate R it
is R times that.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _machine import machine  # noqa: E402
from serve import http_load, pct  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200, help="Calls per round and app.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--teacher-latency", type=float, default=0.5)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    from kolm_ray.cluster import connect
    from kolm_ray.serve.app import run
    from kolm_ray.serve.audit import AuditOptions
    from kolm_ray.serve.config import ModelDeploymentOptions, ServeConfig
    from kolm_ray.serve.receipts import read_receipts
    from kolm_ray.signing import default_key_paths
    from kolm_ray.testing.artifacts import make_artifact
    from kolm_ray.testing.cluster import free_port
    from kolm_ray.testing.corpus import routing_rows
    from kolm_ray.testing.messages_api import MessagesAPIServer, replay_responder
    from kolm_ray.train.base import build_tiny_base

    n_total = args.requests * args.rounds
    rows = routing_rows(2 * n_total + 64, seed=21)  # both apps, every round: fresh inputs
    teacher = MessagesAPIServer(replay_responder({r.input: r.output for r in rows}),
                                latency_s=args.teacher_latency).start()
    os.environ.update(ANTHROPIC_BASE_URL=teacher.url, ANTHROPIC_API_KEY="bench")
    with tempfile.TemporaryDirectory() as d:
        home = Path(d) / "home"
        os.environ["KOLM_HOME"] = str(home)
        base = build_tiny_base(Path(d) / "base", hidden_size=256, layers=4, intermediate_size=512)
        refs = [(r.input, r.output) for r in rows[:16]]
        art = make_artifact(Path(d) / "store", base, "route", (1, 0), task="Route the message to one team.",
                            references=refs, seed=1, teacher="claude-opus-4-7")
        pub = default_key_paths()[1]
        connect(None)
        port = free_port()
        cpus = max(1, (os.cpu_count() or 2) // 2)  # both apps live at once, each base replica on half the cores
        urls = {}
        for app, rate in (("plain", 0.0), ("audited", 1.0)):
            cfg = ServeConfig(artifacts=[str(art)], trust_key=str(pub), store=str(home), app_name=app,
                              route_prefix=f"/{app}", audit=AuditOptions(rate=rate, max_pending=4096),
                              model=ModelDeploymentOptions(num_cpus=cpus, max_batch_size=args.concurrency,
                                                           max_ongoing_requests=4 * args.concurrency))
            run(cfg, port=port)
            urls[app] = f"http://127.0.0.1:{port}/{app}"
        lat: dict[str, list[float]] = {"plain": [], "audited": []}
        rps: dict[str, list[float]] = {"plain": [], "audited": []}
        offset = 0
        for _ in range(args.rounds):
            for app in ("plain", "audited"):  # alternate: the machine's noise falls on both
                prompts = [r.input for r in rows[offset:offset + args.requests]]
                offset += args.requests
                got = asyncio.run(http_load(urls[app], ["route"], prompts, args.concurrency, 16, keep=True))
                lat[app] += got["latencies"]
                rps[app].append(got["rps"])
        deadline = time.time() + 120
        audits: list[dict] = []
        while time.time() < deadline:  # audits finish off the request path: wait for them to land
            audits = [r for r in read_receipts(home / "receipts" / "audited") if r.get("kind") == "audit"]
            if len(audits) >= n_total:
                break
            time.sleep(1)
        from ray import serve

        for app in urls:
            serve.delete(app)
    teacher.stop()

    ok = [a for a in audits if a["status"] == "ok"]
    cost = sum(a["cost_usd"] or 0.0 for a in audits)
    per_1000 = 1000 * cost / max(1, len(audits))
    p50 = {k: pct(v, 0.5) for k, v in lat.items()}
    p99 = {k: pct(v, 0.99) for k, v in lat.items()}
    mean_rps = {k: sum(v) / len(v) for k, v in rps.items()}
    lines = [
        f"audit: {args.rounds} rounds x {args.requests} calls per app, {args.concurrency} in flight, 16 new tokens, "
        f"random-init Qwen2 (hidden 256, 4 layers), {cpus} CPU(s) per app; teacher answers after "
        f"{1000 * args.teacher_latency:.0f} ms",
        f"  no audits (baseline)        p50 {1000 * p50['plain']:7.1f} ms   p99 {1000 * p99['plain']:7.1f} ms   "
        f"{mean_rps['plain']:6.1f} req/s",
        f"  every call audited          p50 {1000 * p50['audited']:7.1f} ms   p99 {1000 * p99['audited']:7.1f} ms   "
        f"{mean_rps['audited']:6.1f} req/s",
        f"  ratio audited / baseline    p50 {p50['audited'] / p50['plain']:.2f}   p99 {p99['audited'] / p99['plain']:.2f}"
        f"   throughput {mean_rps['audited'] / mean_rps['plain']:.2f}",
        f"  audits recorded {len(audits)} of {n_total} calls ({len(ok)} ok); teacher cost ${cost:.4f} = "
        f"${per_1000:.3f} per 1,000 served calls at rate 1 (claude-opus-4-7 list prices, system prompt cached)",
        f"  machine: {machine()}",
    ]
    from _report import record

    record("audit", lines, args.write)


if __name__ == "__main__":
    main()
