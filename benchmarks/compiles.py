"""Many compiles on one cluster: N compiles started at once (N = 1, 2, 4, 8) through the compile
queue, against a Messages API stand-in that allows ``--limit`` calls in flight.

    python benchmarks/compiles.py [--ns 1,2,4,8] [--cpus 2] [--rows 24] [--k 2] [--limit 16] [--write]

In the same run, on one ``ray start --head`` node of ``--cpus`` CPUs: the makespan of N compiles
against N x solo / P, where solo is the N = 1 makespan and P the compiles the cluster runs at
once (a fit or eval worker is granted one CPU: P = min(N, CPUs)); the goal is <= 1.2. Each
compile has its own task wording, so none is answered from another's teacher cache. The
operator's limit (``kolm teacher-limits set --max-in-flight``) is the server's: the figures are
the most calls the server saw in flight (goal: never above the limit) and its 429s per paid
call (goal < 0.05). Last, with ``kolm queue limits --max-running 1``, compiles wait in the queue
and the resident memory of a waiting compile's driver (on the head, where `ray job submit` runs
drivers) is measured: what each queued compile costs the head.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _machine import machine  # noqa: E402
from _report import record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "routing"
KOLM = str(Path(sys.executable).parent / "kolm")


def compile_args(base: Path, work: Path, tag: str, rows: int, k: int) -> list[str]:
    task = (EXAMPLE / "task.txt").read_text().strip()
    return [KOLM, "compile", f"{task} (run {tag})", "--examples", str(EXAMPLE / "examples.jsonl"),
            "--eval", str(EXAMPLE / "holdout.jsonl"), "--base", str(base), "--name", f"bench-{tag}",
            "--work-dir", str(work / tag), "--n", str(rows), "--k", str(k), "--epochs", "2",
            "--tenant", f"tenant{hash(tag) % 3}"]


def run_wave(n: int, base: Path, work: Path, env: dict[str, str], rows: int, k: int, server) -> dict:
    from kolm_ray.testing.messages_api import ServerStats

    server.stats = ServerStats()
    t0 = time.perf_counter()
    procs = [subprocess.Popen(compile_args(base, work, f"{n}-{i}", rows, k), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(n)]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    failed = [o[-2000:] for p, o in zip(procs, outs) if p.returncode != 0]
    if failed:
        raise SystemExit(f"{len(failed)} of {n} compiles failed:\n{failed[0]}")
    s = server.stats
    return {"n": n, "wall": wall, "paid": s.succeeded, "max_in_flight": s.max_in_flight, "rate_limited": s.rate_limited}


def queued_driver_memory(base: Path, work: Path, env: dict[str, str], home: Path, rows: int, k: int) -> float:
    """Resident MB of a compile's driver while it waits in the queue (max-running 1)."""
    import psutil

    from kolm_ray.admission import QueuePolicy, save_policy

    save_policy(home, QueuePolicy(max_running=1))
    procs = [subprocess.Popen(compile_args(base, work, f"queued-{i}", rows, k), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(4)]
    try:
        waiting: list[dict] = []
        for _ in range(300):
            res = subprocess.run([KOLM, "queue", "--json"], env=env, capture_output=True, text=True)
            waiting = [t for t in json.loads(res.stdout or "[]") if t["state"] == "waiting"]
            if len(waiting) >= 3:
                break
            time.sleep(1)
        time.sleep(3)
        names = {t["name"] for t in waiting}
        rss = [psutil.Process(p.pid).memory_info().rss / 2**20 for i, p in enumerate(procs)
               if p.poll() is None and f"bench-queued-{i}" in names]
        return sum(rss) / max(1, len(rss))
    finally:
        for p in procs:
            p.kill()
        save_policy(home, QueuePolicy())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="1,2,4,8")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--teacher-latency", type=float, default=0.2)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from kolm_ray.sampling.limits import set_limits
    from kolm_ray.testing.cluster import LocalHead
    from kolm_ray.testing.messages_api import MessagesAPIServer, replay_responder
    from kolm_ray.train.base import build_tiny_base

    answers = {json.loads(x)["input"]: json.loads(x)["output"]
               for x in (EXAMPLE / "recorded-teacher.jsonl").read_text().splitlines() if x.strip()}
    server = MessagesAPIServer(replay_responder(answers), latency_s=args.teacher_latency,
                               max_in_flight=args.limit).start()
    head = LocalHead(num_cpus=args.cpus).start()
    with tempfile.TemporaryDirectory() as d:
        home, work = Path(d) / "home", Path(d) / "work"
        base = build_tiny_base(Path(d) / "base")
        env = {**os.environ, **head.env, "RAY_ADDRESS": head.address, "KOLM_HOME": str(home),
               "ANTHROPIC_BASE_URL": server.url, "ANTHROPIC_API_KEY": "bench-compiles"}
        os.environ["KOLM_HOME"] = str(home)
        set_limits(max_in_flight=args.limit, notify=False)
        try:
            waves = [run_wave(int(n), base, work, env, args.rows, args.k, server) for n in args.ns.split(",")]
            memory = queued_driver_memory(base, work, env, home, args.rows, args.k)
        finally:
            head.stop()
            server.stop()
    solo = next(w["wall"] for w in waves if w["n"] == 1)
    serial = {w["n"]: w["n"] * solo for w in waves}
    lines = [f"machine: {machine()}; one head of {args.cpus} CPUs; {args.rows} rows x k={args.k} per compile, "
             f"2 epochs on the tiny Qwen2; teacher stand-in: {args.limit} in flight, {args.teacher_latency:g} s a call",
             f"{'N':>2} {'makespan s':>10} {'N x solo / P':>12} {'ratio':>6} {'vs serial':>9} {'paid calls':>10} "
             f"{'max in flight':>13} {'429 / paid':>10}"]
    for w in waves:
        p = min(w["n"], args.cpus)
        ideal = w["n"] * solo / p
        lines.append(f"{w['n']:>2} {w['wall']:>10.1f} {ideal:>12.1f} {w['wall'] / ideal:>6.2f} "
                     f"{w['wall'] / serial[w['n']]:>9.2f} {w['paid']:>10} "
                     f"{w['max_in_flight']:>13} {w['rate_limited'] / max(1, w['paid']):>10.3f}")
    lines.append(f"head memory per queued compile (its waiting driver's RSS): {memory:.0f} MB")
    record(f"compiles-{args.cpus}cpu", lines, args.write)


if __name__ == "__main__":
    main()
