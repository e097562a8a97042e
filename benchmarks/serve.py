"""Serving: what kolm's HTTP path (Serve's proxy, the ingress, the model replica) adds to calling
the same model in-process, at the same batching; proxy + ingress requests/s alone; one adapter
against four on one base; memory of four adapters on one base against four merged models; and
the cost of a receipt per call.

    python benchmarks/serve.py [--rounds 5] [--requests 16] [--ones 20] [--concurrency 8]
                               [--ingress haproxy|python-proxy] [--write]

On a shared machine the load moves within minutes, so the two halves of a comparison must run
under the same load. The Serve apps start and the in-process hosts load once; then ``--rounds``
rounds each measure every cell in-process and over HTTP back to back (which of the two goes
first alternates, from cell to cell and from round to round). A ratio is the median of its
per-round ratios, with their min-max across rounds; an absolute figure is the median of its
per-round figures. The load average before and after, and at each round's start, is printed
with them. All on the same random-init Qwen2 and the same prompts (TL;DR inputs, 16 new tokens,
greedy), like for like:

- concurrency 1: ``--ones`` requests one at a time, in-process (``AdapterHost.generate([g])``)
  and over HTTP; the difference of the p50s is the latency the HTTP path adds.
- N in flight: ``--requests`` requests; in-process, ``AdapterHost.generate`` on batches of N
  (the batch the replica gets); over HTTP, N requests in flight. Both by default (a greedy
  request is decoded alone, so it gets the eval's tokens: a batch is N generations one after
  another) and with ``--batch-greedy`` (greedy requests share padded batches).
- 1 adapter and 4 adapters on one base (requests spread over the 4): each cell for both; the
  ratio 4 / 1 of the throughputs is taken within each round.
- an instant model (a replica whose host answers at once, no torch): requests/s and p50 of Serve's
  proxy and kolm's ingress alone, at N in flight and at 1.

Every Serve replica and the in-process host use the same number of torch threads (the machine's
cores, OMP_NUM_THREADS); the five apps stay deployed side by side for the whole run (their
replicas ask Ray for a fraction of a CPU each so that they all fit), so the idle ones weigh on
both halves alike. Before the rounds, every app and host generates once (not counted); in the
rounds, every cell, HTTP or in-process, starts with a one-token warm-up of the requests it keeps
in flight. Defaults take about 4 minutes on 2 cores: run it with ``--write`` on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _machine import machine  # noqa: E402

CELLS = ("one", "batched", "batch_greedy")  # concurrency 1; N in flight, greedy alone; --batch-greedy


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def make_specialists(base: Path, store: Path, n: int) -> list[Path]:
    from kolm_ray.testing.artifacts import make_artifact
    from kolm_ray.testing.corpus import TLDR_TASK, tldr_rows

    refs = [(r.input, r.output) for r in tldr_rows(8, seed=3)]
    return [make_artifact(store, base, f"spec{i}", (1, 0), task=TLDR_TASK, references=refs, seed=i,
                          max_new_tokens=16) for i in range(n)]


def open_host(base: Path, artifacts: list[Path], trust, dest: Path):
    """An in-process ``AdapterHost`` with ``artifacts``' adapters, and their Specialists."""
    from kolm_ray.serve.catalog import adapter_name, open_specialist
    from kolm_ray.serve.host import AdapterHost

    host = AdapterHost(str(base))
    specs = []
    for a in artifacts:
        s = open_specialist(a, trust, dest=dest / a.stem)
        host.load_adapter(adapter_name(s), s.adapter_dir)
        specs.append(s)
    return host, specs


def generations(specs, prompts: list[str], max_tokens: int) -> list:
    """The in-process requests for ``prompts``: request i for Specialist i mod len(specs), as over HTTP."""
    from kolm_ray.serve.catalog import adapter_name
    from kolm_ray.serve.host import Generation

    return [Generation(adapter=adapter_name(specs[i % len(specs)]), system=specs[i % len(specs)].system,
                       input=p, max_new_tokens=max_tokens) for i, p in enumerate(prompts)]


def timed(host, gens: list, batch: int, batch_greedy: bool) -> dict:
    """In-process: ``gens`` in batches of ``batch`` called one after another (after a one-token
    warm-up batch); requests/s, and p50/p99 of a request (its batch's time)."""
    host.batch_greedy = batch_greedy
    host.generate([dataclasses.replace(g, max_new_tokens=1) for g in gens[:batch]])  # warm-up
    lat, n = [], 0
    t0 = time.perf_counter()
    for b in (gens[i:i + batch] for i in range(0, len(gens), batch)):
        t = time.perf_counter()
        host.generate(b)
        lat += [time.perf_counter() - t] * len(b)
        n += len(b)
    wall = time.perf_counter() - t0
    return {"rps": n / wall, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "latencies": lat}


async def http_load(session, url: str, models: list[str], prompts: list[str], concurrency: int,
                    max_tokens: int) -> dict:
    """Over HTTP: ``prompts`` sent ``concurrency`` at a time (after a one-token warm-up of
    ``concurrency`` requests); requests/s, p50/p99, every latency, non-200 answers."""
    lat: list[float] = []
    sem = asyncio.Semaphore(concurrency)
    errors = 0

    async def one(i: int, p: str, tokens: int) -> None:
        nonlocal errors
        async with sem:
            t = time.perf_counter()
            async with session.post(f"{url}/v1/completions", json={"model": models[i % len(models)], "prompt": p,
                                                                   "max_tokens": tokens, "temperature": 0}) as r:
                await r.read()
                errors += r.status != 200
            lat.append(time.perf_counter() - t)

    await asyncio.gather(*(one(i, p, 1) for i, p in enumerate(prompts[:concurrency])))  # warm-up
    lat.clear()
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, p, max_tokens) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - t0
    return {"rps": len(prompts) / wall, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "errors": errors,
            "latencies": list(lat)}


def served(artifacts: list[Path], trust_key: Path, home: Path, port: int, cpus: float, batch: int,
           app: str, batch_greedy: bool = False, model_class=None) -> str:
    from kolm_ray.serve.app import run
    from kolm_ray.serve.config import ModelDeploymentOptions, ServeConfig

    cfg = ServeConfig(artifacts=[str(a) for a in artifacts], trust_key=str(trust_key), home=str(home), app_name=app,
                      route_prefix=f"/{app}", model=ModelDeploymentOptions(num_cpus=cpus, max_batch_size=batch,
                                                                          max_ongoing_requests=4 * batch,
                                                                          batch_greedy=batch_greedy))
    run(cfg, port=port, model_class=model_class)
    return f"http://127.0.0.1:{port}/{app}"


def instant_server():
    """``BaseModelServer`` whose host answers every request at once (no torch, no tokenizer):
    what is left is Serve's proxy, the ingress and the handle calls (defined here so the
    benchmark's replicas get it by value)."""
    from kolm_ray.serve.deployments import BaseModelServer
    from kolm_ray.serve.host import Completion

    class InstantHost:
        def __init__(self) -> None:
            self.adapters: dict[str, str] = {}

        def load_adapter(self, name, folder) -> None:
            self.adapters[name] = str(folder)

        def unload_adapter(self, name) -> None:
            self.adapters.pop(name, None)

        def generate(self, gens, strict=True):
            return [Completion(text="ok", prompt_tokens=1, completion_tokens=1, finish_reason="stop") for _ in gens]

    class InstantServer(BaseModelServer):
        def __init__(self, base_path, trust, base_paths, dtype=None, device=None, batch_greedy=False) -> None:
            from kolm_ray.signing import Trust

            self.trust = Trust(**{k: Path(v) if k == "public_key" and v else v for k, v in trust.items()})
            self.base_paths = base_paths
            self.host = InstantHost()
            self.workdir = Path(tempfile.mkdtemp(prefix="kolm-serve-"))
            self.live, self.refused = {}, {}
            from kolm_ray.serve.deployments import _Batcher

            self._batcher = _Batcher(self._generate_batch)

    return InstantServer


def batch_sizes(url: str):
    """The batches the app at ``url`` has run, by size (its model replica's ``status()``)."""
    from collections import Counter

    from ray import serve

    app = url.rsplit("/", 1)[1]
    name = next(d for d in serve.status().applications[app].deployments if d.startswith("base-"))
    handle = serve.get_deployment_handle(name, app_name=app)
    if not handle.is_initialized:
        # Its own loop: on Serve's throughput-optimized path a driver's handle otherwise binds to
        # the running loop (this benchmark's asyncio.run), closed before serve.shutdown.
        handle._init(_run_router_in_separate_loop=True)
    got = handle.status.remote().result()["batch_sizes"]
    return Counter({int(k): v for k, v in got.items()})


def mean_batch(before, after) -> float:
    ran = after - before
    return sum(k * v for k, v in ran.items()) / max(1, sum(ran.values()))


def replica_threads() -> str:
    """OMP_NUM_THREADS as a Ray worker on this cluster sees it (torch's thread count there)."""
    import ray

    @ray.remote(num_cpus=0.01)
    def threads() -> str:
        return os.environ.get("OMP_NUM_THREADS", "?")

    return ray.get(threads.remote(), timeout=120)


async def rounds(args, hosts: dict, urls: dict, instant_url: str, prompts: list[str], ones: list[str]) -> dict:
    """``args.rounds`` rounds: every cell in-process and over HTTP back to back (alternating which
    goes first), then the instant model; per-round figures and the load at each round's start."""
    import aiohttp

    n, mt = args.concurrency, args.max_tokens
    out: dict = {"cells": {(label, cell): [] for label in hosts for cell in CELLS}, "instant": [], "loads": []}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        # Not counted: every replica's and host's first generations (lazy initialisation), both modes.
        warm = prompts[:2]
        for label, (host, specs) in hosts.items():
            for bg in (False, True):
                timed(host, generations(specs, warm, mt), len(warm), bg)
                await http_load(session, urls[(label, bg)], [f"spec{i}" for i in range(len(specs))], warm, 2, mt)
        await http_load(session, instant_url, ["spec0"], prompts[:n], n, 1)
        for r in range(args.rounds):
            out["loads"].append(os.getloadavg()[0])
            t_round = time.perf_counter()
            k = 0
            for label, (host, specs) in hosts.items():
                models = [f"spec{i}" for i in range(len(specs))]
                for cell in CELLS:
                    subset, conc = (ones, 1) if cell == "one" else (prompts, n)
                    gens = generations(specs, subset, mt)
                    url = urls[(label, cell == "batch_greedy")]
                    http_first = (r + k) % 2 == 1
                    k += 1
                    before = await asyncio.to_thread(batch_sizes, url)
                    if http_first:
                        h = await http_load(session, url, models, subset, conc, mt)
                    i = timed(host, gens, conc, cell == "batch_greedy")
                    if not http_first:
                        h = await http_load(session, url, models, subset, conc, mt)
                    h["batch"] = mean_batch(before, await asyncio.to_thread(batch_sizes, url))  # the warm-up's batches included
                    out["cells"][(label, cell)].append({"inproc": i, "http": h, "http_first": http_first})
            many = (prompts * (args.instant_requests // len(prompts) + 1))[: args.instant_requests]
            out["instant"].append({"n": await http_load(session, instant_url, ["spec0"], many, n, 1),
                                   "one": await http_load(session, instant_url, ["spec0"],
                                                          many[: max(1, args.instant_requests // 4)], 1, 1)})
            print(f"  round {r + 1}/{args.rounds}: {time.perf_counter() - t_round:.0f} s, load "
                  f"{out['loads'][-1]:.1f} at its start", file=sys.stderr, flush=True)
    return out


def memory(base: Path, artifacts: list[Path], trust) -> dict:
    """Parameter bytes held: one base with N adapters vs N merged copies."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kolm_ray.serve.catalog import adapter_name, open_specialist
    from kolm_ray.serve.host import AdapterHost

    def nbytes(models) -> int:
        seen, total = set(), 0
        for m in models:
            for t in list(m.parameters()) + list(m.buffers()):
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
        return total

    with tempfile.TemporaryDirectory() as d:
        dirs = [open_specialist(a, trust, dest=Path(d) / a.stem).adapter_dir for a in artifacts]
        host = AdapterHost(str(base))
        for a, ad in zip(artifacts, dirs):
            host.load_adapter(adapter_name(open_specialist(a, trust)), ad)
        shared = nbytes([host.model])
        del host
        gc.collect()
        merged = [PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), ad)
                  .merge_and_unload() for ad in dirs]
        separate = nbytes(merged)
    return {"shared": shared, "merged": separate}


def receipt_cost(n: int = 5000) -> dict:
    """Per-call cost on the request path: the verifier's reference-free checks + queueing a receipt."""
    from kolm_ray.serve.receipts import Receipt, ReceiptWriter, digest
    from kolm_ray.testing.corpus import TLDR_TASK, tldr_rows
    from kolm_ray.verifier import synthesize

    rows = tldr_rows(64, seed=9)
    v = synthesize(TLDR_TASK, [r.output for r in rows])
    with tempfile.TemporaryDirectory() as d:
        w = ReceiptWriter(Path(d), "bench", flush_interval_s=0.5)
        t0 = time.perf_counter()
        for i in range(n):
            r = rows[i % len(rows)]
            c = v.score(r.output, r.input)
            w.append(Receipt(time=time.time(), request_id=str(i), specialist="s", version="1.0", artifact_sha256="a",
                             route="stable", status="ok", input_sha256=digest(r.input), output_sha256=digest(r.output),
                             latency_ms=1.0, prompt_tokens=1, completion_tokens=1, t=c.t, c=c.c, l=c.l, k=c.k))
        per_call = (time.perf_counter() - t0) / n
        t1 = time.perf_counter()
        w.close()
        flush = time.perf_counter() - t1
    return {"per_call_ms": 1000 * per_call, "flush_ms": 1000 * flush, "n": n}


def spread(xs: list[float], fmt: str = ".2f") -> str:
    """``median [min-max]`` of per-round figures."""
    return f"{med(xs):{fmt}} [{min(xs):{fmt}} to {max(xs):{fmt}}]"


def report(args, res: dict, mem: dict, rc: dict, cpus: int, threads: str, replica: str, loads: tuple,
           took: float) -> list[str]:
    n, R = args.concurrency, args.rounds
    ms = lambda x: f"{1000 * x:.1f} ms"  # noqa: E731
    cells, inst = res["cells"], res["instant"]
    lines = [
        (f"serve: {R} rounds; in each, every cell in-process and over HTTP back to back (which goes first "
         f"alternates): {args.ones} requests at concurrency 1, {args.requests} at {n} in flight, "
         f"{args.instant_requests} to the instant model; {args.max_tokens} new tokens each, greedy; random-init "
         f"Qwen2 (hidden {args.hidden}, {args.layers} layers), LoRA r=4; Serve replicas with {replica} torch "
         f"threads, max batch {n}; in-process: the same host, {threads} torch threads, batches of the same size"),
        "  HTTP path: " + {"haproxy": "HAProxy -> ingress replica -> model replica (Serve throughput-optimized)",
                            "python-proxy": "Serve Python proxy -> ingress replica -> model replica"}.get(
                               args.path, "unknown (the Serve controller did not say)"),
        f"  figures: median of the {R} per-round figures [min to max across rounds]",
        (f"  load average (1 min) on these {cpus} cores: {loads[0]:.1f} before, {loads[1]:.1f} after, "
         f"{', '.join(f'{x:.1f}' for x in res['loads'])} at the rounds' starts; {took / 60:.1f} min in all"),
    ]
    rps = {}
    for label in ("1 adapter", "4 adapters"):
        c = {cell: cells[(label, cell)] for cell in CELLS}
        one = c["one"]
        added = [1000 * (h["http"]["p50"] - h["inproc"]["p50"]) for h in one]
        lat_ratio = [h["http"]["p50"] / h["inproc"]["p50"] for h in one]
        p99 = pct([x for h in one for x in h["http"]["latencies"]], 0.99)
        lines += [f"  {label}",
                  (f"    concurrency 1             in-process p50 {ms(med([h['inproc']['p50'] for h in one]))}   "
                   f"HTTP p50 {ms(med([h['http']['p50'] for h in one]))}   added {spread(added, '.1f')} ms   "
                   f"ratio {spread(lat_ratio)}   (HTTP p99 {ms(p99)}, all rounds)")]
        for cell, name in (("batched", "greedy alone"), ("batch_greedy", "--batch-greedy")):
            http, inproc = [h["http"] for h in c[cell]], [h["inproc"] for h in c[cell]]
            rps[(label, cell)] = ([h["rps"] for h in http], [i["rps"] for i in inproc])
            ratio = [h["rps"] / i["rps"] for h, i in zip(http, inproc)]
            lines.append(f"    {n} in flight, {name:<15}in-process {med([i['rps'] for i in inproc]):5.1f} req/s   "
                         f"HTTP {med([h['rps'] for h in http]):5.1f} req/s   ratio {spread(ratio)}   "
                         f"(HTTP p50 {ms(med([h['p50'] for h in http]))}, in-process batch "
                         f"{ms(med([i['p50'] for i in inproc]))}; HTTP batches of "
                         f"{med([h['batch'] for h in http]):.1f} on average)")
        lines.append(f"    {sum(h['http']['errors'] for cell in CELLS for h in c[cell])} errors")

    def four_over_one(cell: str, side: int) -> str:
        return spread([f / o for f, o in zip(rps[("4 adapters", cell)][side], rps[("1 adapter", cell)][side])])

    lines += [
        (f"  4 adapters / 1 adapter, throughput: HTTP greedy alone {four_over_one('batched', 0)}, --batch-greedy "
         f"{four_over_one('batch_greedy', 0)}; in-process {four_over_one('batched', 1)}, "
         f"{four_over_one('batch_greedy', 1)}"),
        (f"  proxy + ingress alone (instant model): {spread([i['n']['rps'] for i in inst], '.1f')} req/s at {n} in "
         f"flight (p50 {ms(med([i['n']['p50'] for i in inst]))}), {spread([i['one']['rps'] for i in inst], '.1f')} "
         f"req/s at 1 (p50 {spread([1000 * i['one']['p50'] for i in inst], '.1f')} ms), "
         f"{sum(i['n']['errors'] + i['one']['errors'] for i in inst)} errors"),
        (f"  memory, 4 Specialists: one base + 4 adapters {mem['shared'] / 2**20:.1f} MiB   "
         f"4 merged models {mem['merged'] / 2**20:.1f} MiB   ratio {mem['merged'] / mem['shared']:.2f}x"),
        (f"  receipt per call (verifier checks + queue): {rc['per_call_ms']:.3f} ms; flushing "
         f"{rc['n']} receipts: {rc['flush_ms']:.0f} ms off the request path"),
        f"  machine: {machine()}",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds; every ratio is the median of its per-round ratios")
    ap.add_argument("--requests", type=int, default=16, help="requests per round for each N-in-flight cell")
    ap.add_argument("--ones", type=int, default=20, help="requests per round for each concurrency-1 cell")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--instant-requests", type=int, default=200,
                    help="requests per round to the instant model at N in flight (a quarter of them at 1)")
    ap.add_argument("--ingress", choices=("haproxy", "python-proxy"), default="haproxy",
                    help="Serve's HTTP path on the cluster this starts: HAProxy in front of the ingress replicas "
                         "(what `kolm serve` and cluster.yaml start) or Serve's Python proxy; a cluster at "
                         "RAY_ADDRESS keeps its own")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if min(args.rounds, args.requests, args.ones, args.concurrency, args.instant_requests) < 1:
        ap.error("--rounds, --requests, --ones, --concurrency and --instant-requests must be at least 1")

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    # Before torch loads, and inherited by the Ray cluster this starts: the same torch threads everywhere.
    os.environ.setdefault("OMP_NUM_THREADS", str(cpus))
    threads = os.environ["OMP_NUM_THREADS"]

    from kolm_ray.cluster import connect
    from kolm_ray.signing import Trust, default_key_paths
    from kolm_ray.testing.cluster import free_port
    from kolm_ray.testing.corpus import tldr_rows
    from kolm_ray.train.base import build_tiny_base

    n = args.concurrency
    own_cluster = not os.environ.get("RAY_ADDRESS")  # connect(None) then starts a local cluster of our own
    if own_cluster:  # before Ray starts: its processes inherit these
        from kolm_ray.serve.ingress_path import FAST_PATH_ENV, LOCAL_DRAIN_ENV

        # As `kolm serve` starts a local cluster (its short drain too: Ray's 30 s held each app's
        # delete at the end), or explicitly without the fast path.
        os.environ.update({**FAST_PATH_ENV, **LOCAL_DRAIN_ENV} if args.ingress == "haproxy"
                          else {k: "0" for k in FAST_PATH_ENV})
    apps: list[str] = []
    with tempfile.TemporaryDirectory() as d:
        os.environ["KOLM_HOME"] = str(Path(d) / "home")
        base = build_tiny_base(Path(d) / "base", hidden_size=args.hidden, layers=args.layers,
                               intermediate_size=args.hidden * 2)
        arts = make_specialists(base, Path(d) / "store", 4)
        pub = default_key_paths()[1]
        trust = Trust(public_key=pub)
        rows = tldr_rows(args.requests + args.ones, seed=11)
        prompts = [r.input[:600] for r in rows[: args.requests]]
        ones = [r.input[:600] for r in rows[args.requests:]]
        subsets = {"1 adapter": arts[:1], "4 adapters": arts}
        hosts = {label: open_host(base, subset, trust, Path(d) / "open" / label.replace(" ", "-"))
                 for label, subset in subsets.items()}
        connect(None)
        from ray import serve

        try:
            port = free_port()
            replica = replica_threads()
            # A fraction of a CPU per replica, so all five fit on any cluster; torch threads come from OMP_NUM_THREADS.
            share = max(0.01, cpus / 10)
            urls = {}
            for label, subset in subsets.items():
                for batch_greedy in (False, True):
                    app = "bench-" + ("one" if len(subset) == 1 else "four") + ("-batched" if batch_greedy else "")
                    apps.append(app)
                    urls[(label, batch_greedy)] = served(subset, pub, Path(d) / "home", port, share, n, app,
                                                         batch_greedy)
            apps.append("bench-instant")
            instant_url = served(arts[:1], pub, Path(d) / "home", port, share, n, "bench-instant",
                                 model_class=instant_server())
            from kolm_ray.serve.ingress_path import running_path

            args.path = running_path()
            print(f"serve: apps up after {time.perf_counter() - started:.0f} s; {args.rounds} rounds",
                  file=sys.stderr, flush=True)
            res = asyncio.run(rounds(args, hosts, urls, instant_url, prompts, ones))
        finally:
            for app in apps:
                try:
                    serve.delete(app)
                except Exception as e:  # noqa: BLE001 - shut down what is left regardless
                    print(f"serve: deleting {app}: {e}", file=sys.stderr)
            if own_cluster:
                import ray

                serve.shutdown()
                ray.shutdown()
        load_after = os.getloadavg()[0]
        del hosts
        gc.collect()
        mem = memory(base, arts, trust)
        rc = receipt_cost()

    lines = report(args, res, mem, rc, cpus, threads, replica, (load_before, load_after),
                   time.perf_counter() - started)
    from _report import record

    record("serve", lines, args.write)


if __name__ == "__main__":
    main()
