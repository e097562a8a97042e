"""Serving: requests/s and p50/p99 latency through kolm's HTTP ingress on Ray Serve against
calling the same model in-process, with one adapter and with four on one base; memory of four
adapters on one base against four merged models; and the cost of a receipt per call.

    python benchmarks/serve.py [--requests 96] [--concurrency 8] [--hidden 256] [--layers 4] [--write]

All in the same run, on the same random-init Qwen2 and the same prompts (TL;DR inputs, 16 new
tokens, greedy). The in-process baseline calls ``AdapterHost.generate`` one request at a time,
as an application embedding the model would. The ingress gathers concurrent requests across
adapters; by default a greedy request is still decoded alone (its tokens are the eval's), and
with ``--batch-greedy`` greedy requests share padded batches (measured too). The Serve replica gets the same CPU cores (torch threads) as the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _machine import machine  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def make_specialists(base: Path, store: Path, n: int) -> list[Path]:
    from kolm_ray.testing.artifacts import make_artifact
    from kolm_ray.testing.corpus import TLDR_TASK, tldr_rows

    refs = [(r.input, r.output) for r in tldr_rows(8, seed=3)]
    return [make_artifact(store, base, f"spec{i}", (1, 0), task=TLDR_TASK, references=refs, seed=i,
                          max_new_tokens=16) for i in range(n)]


def inprocess(base: Path, artifacts: list[Path], trust, prompts: list[str], max_tokens: int) -> dict:
    from kolm_ray.serve.catalog import adapter_name, open_specialist
    from kolm_ray.serve.host import AdapterHost, Generation

    host = AdapterHost(str(base))
    specs = []
    with tempfile.TemporaryDirectory() as d:
        for a in artifacts:
            s = open_specialist(a, trust, dest=Path(d) / a.stem)
            host.load_adapter(adapter_name(s), s.adapter_dir)
            specs.append(s)
        gens = [Generation(adapter=adapter_name(specs[i % len(specs)]), system=specs[i % len(specs)].system,
                           input=p, max_new_tokens=max_tokens) for i, p in enumerate(prompts)]
        host.generate(gens[:2])  # warm-up
        lat = []
        t0 = time.perf_counter()
        for g in gens:
            t = time.perf_counter()
            host.generate([g])
            lat.append(time.perf_counter() - t)
        wall = time.perf_counter() - t0
    return {"rps": len(prompts) / wall, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99)}


async def http_load(url: str, models: list[str], prompts: list[str], concurrency: int, max_tokens: int,
                    keep: bool = False) -> dict:
    """Requests/s and p50/p99 of ``prompts`` sent ``concurrency`` at a time; ``keep`` adds every latency."""
    import aiohttp

    lat: list[float] = []
    sem = asyncio.Semaphore(concurrency)
    errors = 0

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as c:
        async def one(i: int, p: str) -> None:
            nonlocal errors
            async with sem:
                t = time.perf_counter()
                async with c.post(f"{url}/v1/completions", json={"model": models[i % len(models)], "prompt": p,
                                                                 "max_tokens": max_tokens, "temperature": 0}) as r:
                    await r.read()
                    errors += r.status != 200
                lat.append(time.perf_counter() - t)

        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts[:concurrency])))  # warm-up
        lat.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        wall = time.perf_counter() - t0
    return {"rps": len(prompts) / wall, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "errors": errors,
            **({"latencies": list(lat)} if keep else {})}


def served(artifacts: list[Path], trust_key: Path, store: Path, port: int, cpus: float, batch: int,
           app: str, batch_greedy: bool = False) -> str:
    from kolm_ray.serve.app import run
    from kolm_ray.serve.config import ModelDeploymentOptions, ServeConfig

    cfg = ServeConfig(artifacts=[str(a) for a in artifacts], trust_key=str(trust_key), store=str(store), app_name=app,
                      route_prefix=f"/{app}", model=ModelDeploymentOptions(num_cpus=cpus, max_batch_size=batch,
                                                                          max_ongoing_requests=4 * batch,
                                                                          batch_greedy=batch_greedy))
    run(cfg, port=port)
    return f"http://127.0.0.1:{port}/{app}"


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    from kolm_ray.cluster import connect
    from kolm_ray.signing import Trust, default_key_paths
    from kolm_ray.testing.cluster import free_port
    from kolm_ray.testing.corpus import tldr_rows
    from kolm_ray.train.base import build_tiny_base

    with tempfile.TemporaryDirectory() as d:
        os.environ["KOLM_HOME"] = str(Path(d) / "home")
        base = build_tiny_base(Path(d) / "base", hidden_size=args.hidden, layers=args.layers,
                               intermediate_size=args.hidden * 2)
        arts = make_specialists(base, Path(d) / "store", 4)
        pub = default_key_paths()[1]
        trust = Trust(public_key=pub)
        prompts = [r.input[:600] for r in tldr_rows(args.requests, seed=11)]
        cpus = os.cpu_count() or 1

        rows = {}
        for label, subset in (("1 adapter", arts[:1]), ("4 adapters", arts)):
            rows[label] = {"inproc": inprocess(base, subset, trust, prompts, args.max_tokens)}
        connect(None)
        port = free_port()
        for label, subset in (("1 adapter", arts[:1]), ("4 adapters", arts)):
            for batch_greedy in (False, True):  # parity with the eval (default) vs --batch-greedy
                app = ("one" if len(subset) == 1 else "four") + ("-batched" if batch_greedy else "")
                url = served(subset, pub, Path(d) / "home", port, cpus, args.concurrency, app, batch_greedy)
                models = [f"spec{i}" for i in range(len(subset))]
                rows[label]["batched" if batch_greedy else "http"] = asyncio.run(
                    http_load(url, models, prompts, args.concurrency, args.max_tokens))
                from ray import serve

                serve.delete(app)
        mem = memory(base, arts, trust)
        rc = receipt_cost()

    lines = [f"serve: {args.requests} requests, {args.max_tokens} new tokens each, greedy; random-init Qwen2 "
             f"(hidden {args.hidden}, {args.layers} layers), LoRA r=4; HTTP at {args.concurrency} in flight, "
             f"Serve replica with {cpus} CPUs, max batch {args.concurrency}"]
    for label, r in rows.items():
        i, h, b = r["inproc"], r["http"], r["batched"]
        lines += [
            f"  {label}",
            f"    in-process, one call at a time   {i['rps']:6.1f} req/s   p50 {1000 * i['p50']:7.1f} ms   "
            f"p99 {1000 * i['p99']:7.1f} ms",
            f"    HTTP ingress (Ray Serve)         {h['rps']:6.1f} req/s   p50 {1000 * h['p50']:7.1f} ms   "
            f"p99 {1000 * h['p99']:7.1f} ms   {h['errors']} errors   (greedy decoded alone: the eval's tokens)",
            f"    HTTP ingress, --batch-greedy     {b['rps']:6.1f} req/s   p50 {1000 * b['p50']:7.1f} ms   "
            f"p99 {1000 * b['p99']:7.1f} ms   {b['errors']} errors",
            f"    ratio HTTP / in-process          {h['rps'] / i['rps']:.2f} (throughput); --batch-greedy "
            f"{b['rps'] / i['rps']:.2f}",
        ]
    lines += [
        f"  memory, 4 Specialists: one base + 4 adapters {mem['shared'] / 2**20:7.1f} MiB   "
        f"4 merged models {mem['merged'] / 2**20:7.1f} MiB   ratio {mem['merged'] / mem['shared']:.2f}x",
        f"  receipt per call (verifier checks + queue): {rc['per_call_ms']:.3f} ms; flushing "
        f"{rc['n']} receipts: {rc['flush_ms']:.0f} ms off the request path",
        f"  machine: {machine()}",
    ]
    from _report import publish

    publish("serve", lines, args.write)


if __name__ == "__main__":
    main()
