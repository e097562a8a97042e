"""Serving: what kolm's HTTP path (Serve's proxy, the ingress, the model replica) adds to calling
the same model in-process, at the same batching; proxy + ingress requests/s alone; one adapter
against four on one base; memory of four adapters on one base against four merged models; and
the cost of a receipt per call.

    python benchmarks/serve.py [--requests 96] [--concurrency 8] [--hidden 256] [--layers 4] [--write]

All in the same run, on the same random-init Qwen2 and the same prompts (TL;DR inputs, 16 new
tokens, greedy), like for like:

- concurrency 1: one request at a time, in-process (``AdapterHost.generate([g])``) and over
  HTTP; the difference of the p50s is the latency the HTTP path adds.
- N in flight: in-process, ``AdapterHost.generate`` on batches of N (the batch the replica
  gets); over HTTP, N requests in flight. Both by default (a greedy request is decoded alone,
  so it gets the eval's tokens: a batch is N generations one after another) and with
  ``--batch-greedy`` (greedy requests share padded batches).
- an instant model (a replica whose host answers at once, no torch): requests/s and p50 of Serve's
  proxy and kolm's ingress alone, at N in flight and at 1.

The Serve replica gets the same CPU cores (torch threads) as the in-process host. On a shared
machine the absolute figures move from run to run: compare the ratios, taken in one run.
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


def inprocess(base: Path, artifacts: list[Path], trust, prompts: list[str], max_tokens: int,
              batch: int) -> dict:
    """In-process figures: one call at a time, and batches of ``batch`` (greedy decoded alone, and
    with ``batch_greedy``), on one host."""
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
        out = {"one": _timed(host, [[g] for g in gens])}
        batches = [gens[i:i + batch] for i in range(0, len(gens), batch)]
        out["batched"] = _timed(host, batches)
        host.batch_greedy = True
        host.generate(gens[:batch])
        out["batch_greedy"] = _timed(host, batches)
    return out


def _timed(host, batches: list[list]) -> dict:
    """Requests/s over ``batches`` called one after another; p50/p99 of a request (its batch's time)."""
    lat, n = [], 0
    t0 = time.perf_counter()
    for b in batches:
        t = time.perf_counter()
        host.generate(b)
        lat += [time.perf_counter() - t] * len(b)
        n += len(b)
    wall = time.perf_counter() - t0
    return {"rps": n / wall, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99)}


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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--instant-requests", type=int, default=400, help="requests sent to the instant model")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    from kolm_ray.cluster import connect
    from kolm_ray.signing import Trust, default_key_paths
    from kolm_ray.testing.cluster import free_port
    from kolm_ray.testing.corpus import tldr_rows
    from kolm_ray.train.base import build_tiny_base

    n = args.concurrency
    with tempfile.TemporaryDirectory() as d:
        os.environ["KOLM_HOME"] = str(Path(d) / "home")
        base = build_tiny_base(Path(d) / "base", hidden_size=args.hidden, layers=args.layers,
                               intermediate_size=args.hidden * 2)
        arts = make_specialists(base, Path(d) / "store", 4)
        pub = default_key_paths()[1]
        trust = Trust(public_key=pub)
        prompts = [r.input[:600] for r in tldr_rows(args.requests, seed=11)]
        ones = prompts[: max(16, args.requests // 3)]  # concurrency 1: fewer (they take longest)
        cpus = os.cpu_count() or 1

        rows = {}
        for label, subset in (("1 adapter", arts[:1]), ("4 adapters", arts)):
            rows[label] = {"inproc": inprocess(base, subset, trust, prompts, args.max_tokens, n)}
        connect(None)
        port = free_port()
        from ray import serve

        for label, subset in (("1 adapter", arts[:1]), ("4 adapters", arts)):
            models = [f"spec{i}" for i in range(len(subset))]
            for batch_greedy in (False, True):  # parity with the eval (default) vs --batch-greedy
                app = ("one" if len(subset) == 1 else "four") + ("-batched" if batch_greedy else "")
                url = served(subset, pub, Path(d) / "home", port, cpus, n, app, batch_greedy)
                r = rows[label]
                r["batch_greedy" if batch_greedy else "batched"] = asyncio.run(
                    http_load(url, models, prompts, n, args.max_tokens))
                if not batch_greedy:
                    r["one"] = asyncio.run(http_load(url, models, ones, 1, args.max_tokens))
                serve.delete(app)
        url = served(arts[:1], pub, Path(d) / "home", port, cpus, n, "instant", model_class=instant_server())
        many = prompts * (args.instant_requests // len(prompts) + 1)
        instant = {"n": asyncio.run(http_load(url, ["spec0"], many[: args.instant_requests], n, 1)),
                   "one": asyncio.run(http_load(url, ["spec0"], many[: args.instant_requests // 4], 1, 1))}
        serve.delete("instant")
        mem = memory(base, arts, trust)
        rc = receipt_cost()

    ms = lambda x: f"{1000 * x:7.1f} ms"  # noqa: E731
    lines = [f"serve: {args.requests} requests ({len(ones)} at concurrency 1), {args.max_tokens} new tokens each, "
             f"greedy; random-init Qwen2 (hidden {args.hidden}, {args.layers} layers), LoRA r=4; Serve replica with "
             f"{cpus} CPUs (torch threads), max batch {n}; in-process: the same host, batches of the same size"]
    for label, r in rows.items():
        i, one, b, bg = r["inproc"], r["one"], r["batched"], r["batch_greedy"]
        errors = one["errors"] + b["errors"] + bg["errors"]
        lines += [
            f"  {label}",
            f"    concurrency 1            in-process p50 {ms(i['one']['p50'])}   HTTP p50 {ms(one['p50'])}   "
            f"added {1000 * (one['p50'] - i['one']['p50']):6.1f} ms  (HTTP p99 {ms(one['p99'])})",
            f"    {n} in flight, greedy alone in-process {i['batched']['rps']:6.1f} req/s   HTTP {b['rps']:6.1f} req/s "
            f"  ratio {b['rps'] / i['batched']['rps']:.2f}   (HTTP p50 {ms(b['p50'])}, in-process batch {ms(i['batched']['p50'])})",
            f"    {n} in flight, --batch-greedy in-process {i['batch_greedy']['rps']:6.1f} req/s   HTTP {bg['rps']:6.1f} req/s "
            f"  ratio {bg['rps'] / i['batch_greedy']['rps']:.2f}   (HTTP p50 {ms(bg['p50'])}, in-process batch "
            f"{ms(i['batch_greedy']['p50'])})",
            f"    {errors} errors",
        ]
    one1, four = rows["1 adapter"], rows["4 adapters"]
    lines += [
        f"  4 adapters / 1 adapter over HTTP: greedy alone {four['batched']['rps'] / one1['batched']['rps']:.2f}, "
        f"--batch-greedy {four['batch_greedy']['rps'] / one1['batch_greedy']['rps']:.2f}",
        f"  proxy + ingress alone (instant model): {instant['n']['rps']:6.1f} req/s at {n} in flight "
        f"(p50 {ms(instant['n']['p50'])}), {instant['one']['rps']:6.1f} req/s at 1 (p50 {ms(instant['one']['p50'])}), "
        f"{instant['n']['errors'] + instant['one']['errors']} errors",
        f"  memory, 4 Specialists: one base + 4 adapters {mem['shared'] / 2**20:7.1f} MiB   "
        f"4 merged models {mem['merged'] / 2**20:7.1f} MiB   ratio {mem['merged'] / mem['shared']:.2f}x",
        f"  receipt per call (verifier checks + queue): {rc['per_call_ms']:.3f} ms; flushing "
        f"{rc['n']} receipts: {rc['flush_ms']:.0f} ms off the request path",
        f"  machine: {machine()}",
    ]
    from _report import record

    record("serve", lines, args.write)


if __name__ == "__main__":
    main()
