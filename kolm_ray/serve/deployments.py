"""The Ray Serve deployments: ``BaseModelServer`` (one per base model, many adapters on its one
copy of the base, batched across adapters) and ``Ingress`` (FastAPI, OpenAI-compatible HTTP,
routing by Specialist name, receipts for every call).

Which Specialists are live is each deployment's ``user_config``: changing it (a new version, a
pin) reconfigures running replicas without restarting them or dropping requests. A replica
verifies every artifact before loading it; one that fails is refused with a log line and
never served, while the others keep serving. Must not compile, sign or publish.
"""


import asyncio
import dataclasses
import json
import logging
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from kolm_ray.serve.catalog import Specialist, UnknownModel, adapter_name, open_specialist, resolve_model
from kolm_ray.serve.protocol import (
    STREAM_DONE, Parsed, RequestError, error_body, kolm_block, models_body, new_id, parse, response_body,
    stream_chunk,
)

log = logging.getLogger("kolm_ray.serve")


class BaseModelServer:
    """One base model and the adapters of every Specialist compiled on it."""

    def __init__(self, base_path: str, trust: dict[str, Any], base_paths: dict[str, str], dtype: str | None = None,
                 device: str | None = None, batch_greedy: bool = False) -> None:
        from kolm_ray.serve.host import AdapterHost
        from kolm_ray.signing import Trust

        self.trust = Trust(**{k: Path(v) if k == "public_key" and v else v for k, v in trust.items()})
        self.base_paths = base_paths
        self.host = AdapterHost(base_path, device=device, dtype=dtype, batch_greedy=batch_greedy)
        self.workdir = Path(tempfile.mkdtemp(prefix="kolm-serve-"))
        self.live: dict[str, Specialist] = {}  # adapter name -> Specialist
        self.refused: dict[str, str] = {}  # artifact -> reason

    def reconfigure(self, config: dict[str, Any]) -> None:
        """``{"specialists": [...], "max_batch_size": n, "batch_wait_s": s}``: load what is new
        (verified first), unload what is gone."""
        from kolm_ray.errors import KolmError

        self.generate.set_max_batch_size(int(config.get("max_batch_size", 8)))
        self.generate.set_batch_wait_timeout_s(float(config.get("batch_wait_s", 0.01)))
        wanted = {adapter_name(s): s for s in (Specialist.model_validate(d) for d in config.get("specialists", []))}
        for name, s in wanted.items():
            if name in self.live and self.live[name].artifact_sha256 == s.artifact_sha256:
                continue
            try:
                # One folder per artifact digest: new bytes under an old name@version really reload.
                dest = self.workdir / f"{name}-{s.artifact_sha256[:12]}"
                loaded = open_specialist(s.artifact, self.trust, dest=dest, base_paths=self.base_paths)
                if loaded.artifact_sha256 != s.artifact_sha256:
                    raise KolmError(f"{s.artifact} changed since it was catalogued")
            except KolmError as e:
                self.refused[s.artifact] = str(e)
                log.error("refusing artifact %s (%s): %s", s.artifact, s.ref, e)
                self.live.pop(name, None)
                self.host.unload_adapter(name)
                continue
            self.host.load_adapter(name, loaded.adapter_dir)
            self.live[name] = loaded
            self.refused.pop(s.artifact, None)
            log.info("serving %s from %s", s.ref, s.artifact)
        for name in [n for n in self.live if n not in wanted]:
            gone = self.live.pop(name)  # out of live first: new requests for it stop here
            self.host.unload_adapter(name)
            shutil.rmtree(self.workdir / f"{name}-{gone.artifact_sha256[:12]}", ignore_errors=True)

    def status(self) -> dict[str, Any]:
        return {"live": sorted(s.ref for s in self.live.values()), "refused": dict(self.refused)}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A batch of requests, possibly for different adapters. A request for an adapter that is
        not live gets an error entry; the rest of the batch is served."""
        from kolm_ray.serve.host import Generation

        gens = [Generation(**{**r, "stop": tuple(r.get("stop", ()))}) for r in requests]
        done = await asyncio.to_thread(lambda: self.host.generate(gens, strict=False))
        return [{"error": f"not loaded: {r['adapter']}"} if c is None else
                {"text": c.text, "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                 "finish_reason": c.finish_reason} for r, c in zip(requests, done)]

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Text deltas as they are produced, then one final entry with the token counts."""
        from kolm_ray.serve.host import Completion, Generation

        if request["adapter"] not in self.live:
            yield {"error": f"not loaded: {request['adapter']}"}
            return
        it = self.host.stream(Generation(**{**request, "stop": tuple(request.get("stop", ()))}))
        end = object()
        try:
            while (item := await asyncio.to_thread(next, it, end)) is not end:
                if isinstance(item, Completion):
                    yield {"done": True, "text": item.text, "prompt_tokens": item.prompt_tokens,
                           "completion_tokens": item.completion_tokens, "finish_reason": item.finish_reason}
                else:
                    yield {"delta": item}
        finally:
            await asyncio.to_thread(it.close)

    def __del__(self) -> None:
        shutil.rmtree(getattr(self, "workdir", ""), ignore_errors=True)


def _audit_teacher(store: str, options: Any) -> Any:
    """The teacher audits ask, or None (audits recorded as failed) without ANTHROPIC_API_KEY in
    this replica's environment. Built at the first audit: an app that never audits never joins
    the quota actor."""
    from kolm_ray.sampling.teacher import sdk_env

    env = sdk_env()
    if not env.get("ANTHROPIC_API_KEY"):
        return None
    return _FirstUseTeacher(lambda: _build_audit_teacher(store, options, env))


def _build_audit_teacher(store: str, options: Any, env: dict[str, str]) -> Any:
    from kolm_ray.sampling.cache import ResponseCache
    from kolm_ray.sampling.config import TeacherConfig
    from kolm_ray.sampling.quota import teacher_quota
    from kolm_ray.sampling.teacher import AnthropicTeacher

    key, url = env.get("ANTHROPIC_API_KEY"), env.get("ANTHROPIC_BASE_URL")
    quota = teacher_quota(key, url)  # the organization's quota, under the operator's limits
    cfg = TeacherConfig(model=options.teacher, max_tokens=options.max_tokens, timeout_s=options.timeout_s,
                        max_attempts=options.max_attempts)
    return AnthropicTeacher(cfg, ResponseCache(Path(store) / "cache" / "teacher"), quota, sdk_env=env)


class _FirstUseTeacher:
    """A ``Teacher`` built on its first call, off the event loop (joining the quota actor blocks)."""

    def __init__(self, build: Any) -> None:
        self._build, self._teacher, self._lock = build, None, asyncio.Lock()

    async def sample(self, params: dict[str, Any], key: str) -> Any:
        async with self._lock:
            if self._teacher is None:
                self._teacher = await asyncio.to_thread(self._build)
        return await self._teacher.sample(params, key)


def _price_or_none(model: str) -> Any:
    from kolm_ray.errors import InputError
    from kolm_ray.sampling.pricing import price_for

    try:
        return price_for(model)
    except InputError:
        return None  # an unpriced teacher: the audit is recorded as uncosted (cost None)


api = FastAPI(title="kolm", docs_url=None, redoc_url=None)


@serve.ingress(api)
class Ingress:
    """OpenAI-compatible HTTP in front of the base model deployments."""

    def __init__(self, models: dict[str, Any], store: str, app_name: str, api_key_digests: dict[str, str],
                 max_tokens_cap: int, max_input_chars: int, receipts_flush_s: float,
                 audit: dict[str, Any] | None = None) -> None:
        from kolm_ray.serve.audit import AuditOptions, Auditor
        from kolm_ray.serve.receipts import ReceiptWriter

        self.models = models  # base_key -> DeploymentHandle
        self.keys = {digest: name for name, digest in api_key_digests.items()}
        self.max_tokens_cap, self.max_input_chars = max_tokens_cap, max_input_chars
        ctx = serve.get_replica_context()
        writer = f"{time.strftime('%Y%m%dT%H%M%S')}-{ctx.replica_id.unique_id}-{uuid.uuid4().hex[:6]}"
        self.receipts = ReceiptWriter(Path(store) / "receipts" / app_name, writer, flush_interval_s=receipts_flush_s)
        self.specialists: list[Specialist] = []
        self.pins: dict[str, str] = {}
        self.routes: dict[str, dict[str, Any]] = {}
        self.refused: list[dict[str, str]] = []
        self.verifiers: dict[str, Any] = {}
        self.audit_options = AuditOptions.model_validate(audit or {})
        self.auditor = Auditor(_audit_teacher(store, self.audit_options), _price_or_none, self.receipts.append,
                               self.audit_options)
        self._background: set[asyncio.Task] = set()  # shadow generations in flight (held so they finish)
        self._rng = random.Random()
        self.audit_errors = 0  # audits that could not even be queued (logged; the call is unaffected)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """``{"specialists": [...], "pins": {name: version}, "routes": {name: {stable, canary,
        weight}}, "refused": [...]}``; swapped in at once, so no request sees half of it."""
        from kolm_ray.verifier import Verifier

        specialists = [Specialist.model_validate(d) for d in config.get("specialists", [])]
        verifiers = {s.artifact_sha256: self.verifiers.get(s.artifact_sha256) or Verifier.from_json(s.verifier)
                     for s in specialists}
        self.verifiers = {**self.verifiers, **verifiers}  # a request in flight may still need an old one
        self.specialists, self.pins = specialists, dict(config.get("pins", {}))
        self.routes = dict(config.get("routes", {}))
        self.refused = list(config.get("refused", []))

    # ----- plumbing ---------------------------------------------------------------------------

    def _auth(self, request: Request) -> str | None:
        """The calling key's name; None when the API has no keys. Raises RequestError 401."""
        if not self.keys:
            return None
        from kolm_ray.serve.config import token_digest

        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        name = self.keys.get(token_digest(token.strip())) if scheme.lower() == "bearer" and token.strip() else None
        if name is None:
            raise RequestError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                               code="invalid_api_key")
        return name

    def _resolve(self, p: Parsed, routing_key: str | None) -> tuple[Specialist, str]:
        """The Specialist version to serve and the route that chose it: "pinned" (name@version),
        "canary" or "stable" (a release's split, sticky per routing key), or "latest"."""
        from kolm_ray.publish.rollout import choose_route

        specialists, routes = self.specialists, self.routes  # one consistent snapshot
        try:
            if "@" in p.model:
                return resolve_model(p.model, specialists), "pinned"
            route = routes.get(p.model)
            if route:
                which = choose_route(p.model, float(route.get("weight") or 0), routing_key)
                if not route.get("canary"):
                    which = "stable"
                if which == "canary":
                    try:
                        return resolve_model(f"{p.model}@{route['canary']}", specialists), "canary"
                    except UnknownModel:  # refused on this host (e.g. its artifact changed): stable answers
                        which = "stable"
                return resolve_model(f"{p.model}@{route['stable']}", specialists), which
            return resolve_model(p.model, specialists, self.pins), "latest"
        except UnknownModel as e:
            raise RequestError(404, str(e), param="model", code="model_not_found") from None

    def _request(self, s: Specialist, p: Parsed) -> dict[str, Any]:
        if p.max_tokens is not None and p.max_tokens > self.max_tokens_cap:
            raise RequestError(400, f"max_tokens is {p.max_tokens}; at most {self.max_tokens_cap} are allowed",
                               param="max_tokens")
        d = s.decoding  # what the holdout was generated with; the request's own settings win
        return {"adapter": adapter_name(s), "system": s.system, "input": p.input,
                "max_new_tokens": p.max_tokens or d.max_new_tokens,
                "temperature": p.temperature if p.temperature is not None else d.temperature, "top_p": p.top_p,
                "stop": list(p.stop) or list(d.stop)}

    def _receipt(self, s: Specialist, p: Parsed, rid: str, started: float, status: str, out: dict[str, Any] | None,
                 key: str | None, route: str) -> None:
        from kolm_ray.serve.receipts import Receipt, digest, points

        checks = None
        if out is not None:
            checks = self.verifiers[s.artifact_sha256].score(out["text"], p.input)
        self.receipts.append(Receipt(
            time=time.time(), request_id=rid, specialist=s.name, version=s.version,
            artifact_sha256=s.artifact_sha256, route=route, status=status, input_sha256=digest(p.input),
            output_sha256=digest(out["text"]) if out else None, latency_ms=round(1000 * (time.perf_counter() - started), 3),
            prompt_tokens=out["prompt_tokens"] if out else 0, completion_tokens=out["completion_tokens"] if out else 0,
            **points(checks), api_key=key,
        ))

    async def _dispatch(self, s: Specialist, p: Parsed, route: str, call: Any) -> tuple[Specialist, str, Any]:
        """``await call(handle, request) -> (result, first_item)`` on ``s``'s base deployment, the
        one path for plain and streaming requests: overload is a 503, a replica that died is
        retried once on another, and a canary not live on its replica falls back to stable."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        died = 0
        while True:
            try:
                result, first = await call(self.models[s.base_key], self._request(s, p))
            except BackPressureError:
                raise RequestError(503, "the server is overloaded; retry later", code="overloaded") from None
            except (ActorDiedError, ActorUnavailableError, DeploymentUnavailableError):
                died += 1
                if died > 1:
                    raise RequestError(503, "the model replica is unavailable; retry later",
                                       code="unavailable") from None
                continue
            if "error" not in first:
                return s, route, result
            if route != "canary":
                raise RequestError(503, f"{s.ref} is not available on its replica", code="unavailable")
            # The canary is not live on its replica (yet, or any more): stable answers instead.
            s, route = resolve_model(f"{p.model}@{self.routes[p.model]['stable']}", self.specialists), "stable"

    # ----- audits (off the request path) ------------------------------------------------------

    def _maybe_audit(self, s: Specialist, p: Parsed, rid: str, output: str, route: str) -> None:
        """Audit this call with the share its route calls for: queue it (never waiting), and in
        shadow mode first have the canary answer the same input, unseen, in the background.
        Nothing here may fail the call it audits: an error is logged and counted."""
        try:
            self._audit(s, p, rid, output, route)
        except Exception:  # noqa: BLE001 - the call is answered and receipted already
            self.audit_errors += 1
            log.exception("could not audit request %s", rid)

    def _audit(self, s: Specialist, p: Parsed, rid: str, output: str, route: str) -> None:
        from kolm_ray.publish.rollout import audit_share
        from kolm_ray.serve.audit import AuditJob, AuditTarget

        r = self.routes.get(s.name) or {}
        share = audit_share(route, float(r.get("weight") or 0), float(r.get("audit_rate") or 0),
                            self.audit_options.rate)
        if share <= 0 or self._rng.random() >= share:
            return
        # One judge per release: the teacher is asked with stable's task and rules, and every
        # version's output is scored with stable's verifier, so canary and stable audits are one
        # measure and an input's reference is paid for once whichever version served it.
        judge = s
        if route in ("stable", "canary") and r.get("stable"):
            try:
                judge = resolve_model(f"{s.name}@{r['stable']}", self.specialists)
            except UnknownModel:
                judge = s
        job = AuditJob(request_id=rid, input=p.input, task=judge.system,
                       teacher=judge.teacher or self.audit_options.teacher, verifier=self._verifier(judge),
                       judge=judge.ref, targets=[AuditTarget(s.name, s.version, s.artifact_sha256, route, output)])
        if route == "stable" and r.get("shadow") and r.get("canary"):
            if len(self._background) < self.audit_options.max_shadow:
                task = asyncio.get_running_loop().create_task(self._shadow(job, p, f"{s.name}@{r['canary']}"))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                return
            try:
                c = resolve_model(f"{s.name}@{r['canary']}", self.specialists)
                self.auditor.skip_shadow(job, AuditTarget(c.name, c.version, c.artifact_sha256, "shadow", None))
            except UnknownModel:
                pass  # the canary is not live here: there is no shadow to skip
        self.auditor.submit(job)

    def _verifier(self, s: Specialist) -> Any:
        from kolm_ray.verifier import Verifier

        return self.verifiers.get(s.artifact_sha256) or Verifier.from_json(s.verifier)

    async def _shadow(self, job: Any, p: Parsed, canary_ref: str) -> None:
        """The canary's unseen answer to a stable call, audited with it against one reference."""
        from kolm_ray.serve.audit import AuditTarget

        try:
            c = resolve_model(canary_ref, self.specialists)
            out = await self.models[c.base_key].generate.remote(self._request(c, p))
            if "error" not in out:
                job = dataclasses.replace(job, targets=[*job.targets, AuditTarget(
                    c.name, c.version, c.artifact_sha256, "shadow", out["text"])])
        except Exception as e:  # noqa: BLE001 - a shadow answer is optional: stable's audit goes ahead alone
            log.warning("shadow answer from %s failed: %s: %s", canary_ref, type(e).__name__, e)
        self.auditor.submit(job)

    # ----- routes -----------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok", "specialists": [s.ref for s in self.specialists],
                             "routes": self.routes, "refused": self.refused})

    @api.get("/v1/models")
    async def models_(self, request: Request) -> JSONResponse:
        try:
            self._auth(request)
        except RequestError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return JSONResponse(models_body(self.specialists, self.pins))

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        return await self._serve("chat", request)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._serve("completion", request)

    async def _serve(self, kind: str, request: Request) -> Any:
        started = time.perf_counter()
        key: str | None = None
        s: Specialist | None = None
        p: Parsed | None = None
        route = "latest"
        rid = new_id(kind)
        try:
            key = self._auth(request)
            p = parse(kind, await request.body(), self.max_input_chars)  # type: ignore[arg-type]
            s, route = self._resolve(p, request.headers.get("x-kolm-routing-key") or p.user)
            self._request(s, p)  # max_tokens checked before anything is sent
            if p.stream:
                # The first item is awaited here, so overload, a dead replica or a missing adapter
                # is still a proper 503 (or the canary's fallback) before the 200 goes out.
                s, route, (items, first_item) = await self._dispatch(s, p, route, self._stream_call)
                kolm = kolm_block(s.ref, s.version, s.artifact_sha256, route)
                return StreamingResponse(self._stream(s, p, items, first_item, rid, kolm, started, key, route),
                                         headers={"x-kolm-version": s.ref}, media_type="text/event-stream")
            s, route, out = await self._dispatch(s, p, route, self._generate_call)
        except RequestError as e:
            if s is not None and p is not None and e.status >= 500:
                self._receipt(s, p, rid, started, "error", None, key, route)
            return JSONResponse(e.body(), status_code=e.status)
        except Exception as e:  # noqa: BLE001 - any other failure is a 500 in OpenAI's shape, and counted
            log.exception("request %s failed", rid)
            if s is not None and p is not None:
                self._receipt(s, p, rid, started, "error", None, None, route)
            return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)
        self._receipt(s, p, rid, started, "ok", out, key, route)
        self._maybe_audit(s, p, rid, out["text"], route)
        kolm = kolm_block(s.ref, s.version, s.artifact_sha256, route)
        headers = {"x-kolm-version": s.ref}
        return JSONResponse(response_body(p, rid, s.ref, out["text"], out["finish_reason"], out["prompt_tokens"],
                                          out["completion_tokens"], kolm), headers=headers)

    @staticmethod
    async def _generate_call(handle: Any, request: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        out = await handle.generate.remote(request)
        return out, out

    @staticmethod
    async def _stream_call(handle: Any, request: dict[str, Any]) -> tuple[tuple[Any, dict[str, Any]], dict[str, Any]]:
        items = handle.options(stream=True).stream.remote(request)
        try:
            first = await items.__anext__()
        except StopAsyncIteration:
            first = {"error": "the model produced nothing"}
        return (items, first), first

    async def _stream(self, s: Specialist, p: Parsed, items: Any, first_item: dict[str, Any], rid: str,
                      kolm: dict[str, Any], started: float, key: str | None, route: str) -> AsyncIterator[str]:
        first, final, status = True, None, "error"

        async def chain() -> AsyncIterator[dict[str, Any]]:
            yield first_item
            async for x in items:
                yield x

        try:
            async for item in chain():
                if "error" in item:
                    yield f"data: {json.dumps(error_body(item['error'], 'server_error'))}\n\n"
                    break
                if item.get("done"):
                    final = item
                    break
                yield stream_chunk(p, rid, s.ref, item["delta"], None, first=first, kolm=kolm if first else None)
                first = False
            if final is not None:
                usage = {"prompt_tokens": final["prompt_tokens"], "completion_tokens": final["completion_tokens"],
                         "total_tokens": final["prompt_tokens"] + final["completion_tokens"]}
                yield stream_chunk(p, rid, s.ref, None, final["finish_reason"], first=first, kolm=kolm, usage=usage)
                yield STREAM_DONE
                status = "ok"
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"  # the client hung up: says nothing about the version
            raise
        finally:
            self._receipt(s, p, rid, started, status, final, key, route)
            if status == "ok" and final is not None:
                self._maybe_audit(s, p, rid, final["text"], route)

    def __del__(self) -> None:
        receipts = getattr(self, "receipts", None)
        if receipts is not None:
            receipts.close()
