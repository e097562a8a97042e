"""The Ray Serve deployments: ``BaseModelServer`` (one per base model, many adapters on its one
copy of the base, batched across adapters) and ``Ingress`` (FastAPI, OpenAI-compatible HTTP,
routing by Specialist name, receipts for every call).

Which Specialists are live is each deployment's ``user_config``: changing it (a new version, a
pin) reconfigures running replicas without restarting them or dropping requests. A replica
verifies every artifact before loading it; one that fails is refused with a log line and
never served, while the others keep serving. Must not compile, sign or publish.

The HTTP edge: a request body is read by the ingress itself, under ``max_body_bytes`` (413 for
a declared or a chunked body past it), and validated by ``protocol.parse`` alone; every answer
that is not a 200 is in OpenAI's error shape, FastAPI's own 404 and 405 included. A model
replica that died or is restarting is a 503 ``unavailable`` with ``Retry-After`` (retried once on
another replica first), never a 500: a 500 is a bug in kolm. ``GET /healthz`` is liveness only
(no auth: load balancers and probes call it); what is served and refused, with artifact paths
and reasons, is ``GET /healthz/details`` behind the API's bearer keys. ``GET /openapi.json`` is
the API's schema, request bodies included (``protocol.request_schemas``).
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
from collections import Counter, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from kolm_ray.metrics import record_call, record_error
from kolm_ray.serve.catalog import Specialist, UnknownModel, adapter_name, open_specialist, resolve_model
from kolm_ray.serve.protocol import (
    ERROR_TYPES, STREAM_DONE, ChatCompletion, ChatCompletionChunk, ErrorResponse, Health, HealthDetails, ModelList,
    Parsed, RequestError, TextCompletion, TextCompletionChunk, error_body, kolm_block, models_body, new_id, parse,
    request_schemas, response_body, stream_chunk, stream_event_schema,
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
        self._batcher = _Batcher(self._generate_batch)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """``{"specialists": [...], "max_batch_size": n, "batch_wait_s": s}``: load what is new
        (verified first), unload what is gone."""
        from kolm_ray.errors import KolmError

        self._batcher.max_batch_size = int(config.get("max_batch_size", 8))
        self._batcher.wait_s = float(config.get("batch_wait_s", 0.01))
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
        """What this replica serves and refuses, and how many batches of each size it has run
        (``batch_sizes``: size -> count, since the replica started)."""
        return {"live": sorted(s.ref for s in self.live.values()), "refused": dict(self.refused),
                "batch_sizes": dict(sorted(self._batcher.sizes.items()))}

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request, generated in a batch with whatever else is waiting (``_Batcher``)."""
        return await self._batcher.submit(request)

    async def _generate_batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A batch of requests, possibly for different adapters. A request for an adapter that is
        not live gets an error entry; the rest of the batch is served."""
        from kolm_ray.serve.host import Generation

        gens = [Generation(**{**r, "stop": tuple(r.get("stop", ()))}) for r in requests]
        try:
            done: list[Any] = await asyncio.to_thread(self.host.generate, gens, strict=False)
        except Exception:  # noqa: BLE001 - one request's failure must not fail its batch-mates: each alone
            log.exception("a batch of %d failed; generating its requests one by one", len(gens))
            done = [await self._alone(g) for g in gens]
        return [{"error": f"not loaded: {r['adapter']}"} if c is None else
                {"error": f"generation failed: {type(c).__name__}: {c}", "failed": True} if isinstance(c, Exception) else
                {"text": c.text, "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                 "finish_reason": c.finish_reason} for r, c in zip(requests, done)]

    async def _alone(self, g: Any) -> Any:
        """One request's Completion (None: its adapter is not loaded), or the exception it raised."""
        try:
            return (await asyncio.to_thread(lambda: self.host.generate([g], strict=False)))[0]
        except Exception as e:  # noqa: BLE001 - a bug for this request only: the ingress answers it 500
            log.exception("generation failed for adapter %s", g.adapter)
            return e

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


BATCH_MEMORY = 4  # batches the load is remembered over: a load that falls is forgotten within 4
FOLLOW_SHARE = 0.1  # of the last batch's run time, waited for its callers to come back
FOLLOW_MAX_S = 0.1  # ... but never longer: the callers' round trip, not a generation


def batch_plan(recent: Sequence[int], last_run_s: float, max_batch_size: int, wait_s: float) -> tuple[int, float]:
    """How many requests the next batch waits for, and at most how long (pure).

    It waits for the largest load of the last few batches (``recent``: each batch's requests
    and those that queued while it ran; 1 for a lone caller,
    who so never waits), for ``wait_s`` or a share of the last batch's run time, whichever is
    longer. The callers of a batch that just ended come back together, one round trip later
    (proxy, ingress, replica: tens of ms on a busy host): a wait shorter than that split 8 in
    flight into batches of 1 and 7, halving what batching buys.
    """
    want = min(max_batch_size, max(recent, default=1))
    return want, max(wait_s, min(FOLLOW_MAX_S, FOLLOW_SHARE * last_run_s))


def gather_deadline(started: float, last_arrival: float, plan_wait_s: float, gap_s: float) -> float:
    """Until when a batch smaller than it wants keeps waiting (pure): the plan's wait, and
    longer while a burst is still arriving (the last request came within ``gap_s``), but never
    past ``FOLLOW_MAX_S`` (or the plan's wait, if longer). Eight requests sent at once reach the
    replica spread by the proxy's and ingress's work on each (~1.5 ms apiece on 2 cores): a
    fixed 10 ms split such a burst into 1 and 7 after every lull."""
    return min(started + max(plan_wait_s, FOLLOW_MAX_S), max(started + plan_wait_s, last_arrival + gap_s))


class _Batcher:
    """Gathers a replica's concurrent requests into batches for ``run`` (one batch at a time).

    A batch starts as soon as the model is free, with what queued meanwhile (up to
    ``max_batch_size``). It waits for more only while it is smaller than the load just seen
    (``batch_plan``). So a request that comes alone never waits (Serve's ``@serve.batch`` held
    every batch for its whole timeout unless it filled, 10 ms added to a lone request), while a
    steady N in flight, which come back in a burst, are batched N at a time. A request whose
    caller is gone before its batch starts is dropped.
    """

    def __init__(self, run: Any, max_batch_size: int = 8, wait_s: float = 0.01) -> None:
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self._queue: list[tuple[Any, asyncio.Future]] = []
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        # The load each of the last batches saw: its own requests and those that queued while it
        # ran (capped at a batch). A batch's size alone would remember a split burst (7, then
        # the straggler alone) as a load of 7 and wait for 7 ever after.
        self._recent: deque[int] = deque(maxlen=BATCH_MEMORY)
        self._last_run_s = 0.0  # how long the last batch ran
        self.sizes: Counter[int] = Counter()  # batches run, by size
        self._last_arrival = 0.0  # loop time of the last submit

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        future = loop.create_future()
        self._last_arrival = loop.time()
        self._queue.append((item, future))
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        return await future

    async def _work(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            want, wait_s = batch_plan(self._recent, self._last_run_s, self.max_batch_size, self.wait_s)
            gathering_since = loop.time()
            while len(self._queue) < want and (
                    left := gather_deadline(gathering_since, self._last_arrival, wait_s, self.wait_s) - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            batch = [(x, f) for x, f in self._queue[: self.max_batch_size] if not f.done()]
            del self._queue[: self.max_batch_size]
            if not batch:
                continue
            self.sizes[len(batch)] += 1
            started = loop.time()
            try:
                results = await self.run([x for x, _ in batch])
            except Exception as e:  # noqa: BLE001 - the batch's callers get it; the worker carries on
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            finally:
                self._last_run_s = loop.time() - started
                self._recent.append(min(self.max_batch_size, len(batch) + len(self._queue)))
            for (_, f), r in zip(batch, results):
                if not f.done():
                    f.set_result(r)


def _audit_teacher(store: str, options: Any) -> Any:
    """The teacher audits ask, or None (audits recorded as failed) without ANTHROPIC_API_KEY or
    ANTHROPIC_AUTH_TOKEN in this replica's environment. Built at the first audit: an app that never audits never joins
    the quota actor."""
    from kolm_ray.sampling.teacher import sdk_env

    env = sdk_env()
    if not (env.get("ANTHROPIC_API_KEY") or env.get("ANTHROPIC_AUTH_TOKEN")):
        return None
    return _FirstUseTeacher(lambda: _build_audit_teacher(store, options, env))


def _build_audit_teacher(store: str, options: Any, env: dict[str, str]) -> Any:
    from kolm_ray.sampling.cache import ResponseCache
    from kolm_ray.sampling.config import TeacherConfig
    from kolm_ray.sampling.limits import teacher_identity
    from kolm_ray.sampling.quota import teacher_quota
    from kolm_ray.sampling.teacher import AnthropicTeacher

    quota = teacher_quota(*teacher_identity(env))  # the organization's quota, under the operator's limits
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


# FastAPI's own /openapi.json is off: the Ingress serves it (``openapi_json``), built from this
# replica's keys and limits. (Module state would not do: Serve pickles the Ingress class by
# value, so its methods see a copy of this module's globals, not the module's own.)
api = FastAPI(title="kolm", version="1", docs_url=None, redoc_url=None, openapi_url=None,
              description="OpenAI-compatible API of kolm Specialists (LoRA adapters served by Ray Serve).")

RETRY_AFTER_OVERLOADED_S = 1  # a full queue drains in about a generation's time
RETRY_AFTER_UNAVAILABLE_S = 5  # Serve starts a new replica and loads the base and its adapters
# A body that stops arriving (a client that declares 1 KB and sends half) would hold an ingress
# slot for good: after this long without the whole body the request is a 408. Generous: a 4 MiB
# body over a slow mobile link still arrives.
BODY_READ_TIMEOUT_S = 60.0


def _replica_gone() -> tuple[type[BaseException], ...]:
    """What a call to a model replica raises when the replica died, is restarting or cannot be
    reached (RayActorError covers ActorDiedError and ActorUnavailableError)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    return RayActorError, DeploymentUnavailableError


_REPLICA_GONE = _replica_gone()


class _NoReplicaInTime(Exception):
    """No model replica took the request within the ingress's ``replica_wait_s``."""


async def _assigned(response: Any, wait_s: float) -> None:
    """Wait until Serve's router has handed ``response`` (a handle call, plain or streaming) to a
    model replica, at most ``wait_s``; the generation that follows is not bounded. Without this a
    request waits in the router for as long as no replica can take it: while Serve restarts one
    that died, or forever while one crash-loops.

    Raises:
        _NoReplicaInTime: the wait ran out (the request is withdrawn from the router's queue).
    """
    # What awaiting the response does first (Ray 2.60, pinned); without it, the wait is Serve's.
    fetch = getattr(response, "_fetch_future_result_async", None)
    if fetch is None:
        return
    try:
        await asyncio.wait_for(asyncio.shield(fetch()), wait_s)
    except TimeoutError:
        response.cancel()  # unassigned: it leaves the router's queue
        raise _NoReplicaInTime from None


def _error_response(e: RequestError) -> JSONResponse:
    headers = {"retry-after": str(e.retry_after)} if e.retry_after is not None else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own refusals (no such route: 404, wrong method: 405) in OpenAI's shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(error_body(str(exc.detail), ERROR_TYPES.get(exc.status_code, "invalid_request_error"),
                                   None, code), status_code=exc.status_code, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """No route lets FastAPI parse a body (``protocol.parse`` does); this covers any that ever does."""
    err = (exc.errors() or [{}])[0]
    param = ".".join(str(x) for x in err.get("loc", ())[1:]) or None
    return JSONResponse(error_body(f"invalid '{param}': {err.get('msg', 'invalid request')}",
                                   "invalid_request_error", param), status_code=400)


@api.exception_handler(Exception)
async def _bug(request: Request, exc: Exception) -> JSONResponse:
    """A failure no route caught is a bug in kolm: a 500, in OpenAI's shape, logged."""
    log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse, "description": d} for s, d in (
        (400, "Invalid request (the message names the field in `param`)."),
        (401, "Missing or wrong API key (only when the server has keys)."),
        (404, "No such Specialist or version (`code`: model_not_found)."),
        (413, "Request body over the server's limit (`code`: request_too_large)."),
        (503, ("Overloaded or the model replica unavailable (`code`: overloaded or unavailable); "
               "retry after `Retry-After` seconds.")),
    ) if s in statuses}


def _json_body(model: str) -> dict[str, Any]:
    """An operation's request body, as the schema publishes it (the ingress reads it itself)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}}}}


def _streamed(model: type, chunk: type) -> dict[str, Any]:
    """A completion's 200: its JSON body, or with ``stream`` its server-sent events (the schema
    of one event)."""
    ref = "#/components/schemas/{}".format
    return {"description": "The answer; with `stream`, server-sent events ending in `data: [DONE]`.",
            "content": {"application/json": {"schema": {"$ref": ref(model.__name__)}},
                        "text/event-stream": {"schema": stream_event_schema(ref(chunk.__name__),
                                                                            ref(ErrorResponse.__name__))}}}


def openapi_schema(*, keys: bool = False, max_tokens_cap: int | None = None, max_input_chars: int | None = None,
                   root_path: str = "") -> dict[str, Any]:
    """The API's OpenAPI document: FastAPI's schema of the routes, with the request bodies
    ``protocol.parse`` accepts, the app's limits, bearer auth on everything but /healthz when the
    app has keys, and ``servers`` naming its route prefix."""
    schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes,
                         servers=[{"url": root_path}] if root_path else None)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(request_schemas(max_tokens_cap=max_tokens_cap, max_input_chars=max_input_chars))
    for model in (ChatCompletion, TextCompletion, ChatCompletionChunk, TextCompletionChunk):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update({**body.pop("$defs", {}), model.__name__: body})
    if keys:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, ops in schema["paths"].items():
            if path != "/healthz":
                for op in ops.values():
                    op["security"] = [{"bearer": []}]
    return schema


@serve.ingress(api)
class Ingress:
    """OpenAI-compatible HTTP in front of the base model deployments."""

    def __init__(self, models: dict[str, Any], store: str, app_name: str, api_key_digests: dict[str, str],
                 max_tokens_cap: int, max_input_chars: int, receipts_flush_s: float,
                 audit: dict[str, Any] | None = None, max_body_bytes: int = 4 * 1024 * 1024,
                 replica_wait_s: float = 30.0) -> None:
        from kolm_ray.serve.audit import AuditOptions, Auditor
        from kolm_ray.serve.receipts import ReceiptWriter

        self.models = models  # base_key -> DeploymentHandle
        self.keys = {digest: name for name, digest in api_key_digests.items()}
        self.max_tokens_cap, self.max_input_chars = max_tokens_cap, max_input_chars
        self.max_body_bytes, self.replica_wait_s = max_body_bytes, replica_wait_s
        self.body_read_timeout_s = BODY_READ_TIMEOUT_S
        self._down: set[str] = set()  # base deployments whose replica died and none answered since
        self._openapi: dict[str, Any] | None = None  # built at its first request (it names the route prefix)
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

    async def _read_body(self, request: Request) -> bytes:
        """The request body, at most ``max_body_bytes`` of it. Raises RequestError 413: at once for
        a declared Content-Length over the limit (nothing read), else as soon as the chunks read
        pass it (a chunked body declares no length); 408 for a body still incomplete after
        ``body_read_timeout_s``."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "").strip()
        if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
            raise RequestError(413, f"the request body is {declared} bytes; at most {limit} are accepted",
                               code="request_too_large")
        body = bytearray()
        try:
            async with asyncio.timeout(self.body_read_timeout_s):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:
                        raise RequestError(413, f"the request body is over {limit} bytes, the most accepted",
                                           code="request_too_large")
        except TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {self.body_read_timeout_s:g} s",
                               code="request_timeout") from None
        return bytes(body)

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
                 key: str | None, route: str, error: str | None = None) -> None:
        from kolm_ray.serve.receipts import Receipt, digest, points

        checks = None
        if out is not None:
            checks = self.verifiers[s.artifact_sha256].score(out["text"], p.input)
        self.receipts.append(receipt := Receipt(
            time=time.time(), request_id=rid, specialist=s.name, version=s.version,
            artifact_sha256=s.artifact_sha256, route=route, status=status, input_sha256=digest(p.input),
            output_sha256=digest(out["text"]) if out else None, latency_ms=round(1000 * (time.perf_counter() - started), 3),
            prompt_tokens=out["prompt_tokens"] if out else 0, completion_tokens=out["completion_tokens"] if out else 0,
            **points(checks), api_key=key, error=error if status == "error" else None,
        ))
        record_call(receipt)  # the receipt's own figures: metrics and receipts never disagree

    async def _dispatch(self, s: Specialist, p: Parsed, route: str, call: Any) -> tuple[Specialist, str, Any]:
        """``await call(handle, request, wait_s) -> (result, first_item)`` on ``s``'s base
        deployment, the one path for plain and streaming requests: overload is a 503, a replica
        that died is retried once (on another, or on the one Serve starts in its place), no
        replica taking the request within ``replica_wait_s`` is a 503, and a canary not live on
        its replica falls back to stable. Every 503 carries Retry-After."""
        from ray.serve.exceptions import BackPressureError

        died = 0
        while True:
            base = s.base_key
            try:
                result, first = await call(self.models[base], self._request(s, p), self.replica_wait_s)
            except BackPressureError:
                raise RequestError(503, "the server is overloaded; retry later", code="overloaded",
                                   retry_after=RETRY_AFTER_OVERLOADED_S) from None
            except _NoReplicaInTime:
                why = ("the model replica is unavailable (restarting)" if died or base in self._down else
                       f"no model replica took the request within {self.replica_wait_s:g} s")
                raise RequestError(503, f"{why}; retry later", code="unavailable",
                                   retry_after=RETRY_AFTER_UNAVAILABLE_S) from None
            except _REPLICA_GONE as e:
                self._down.add(base)
                died += 1
                log.warning("a model replica of %s is gone (%s)%s", base, type(e).__name__,
                            "" if died > 1 else "; retrying once")
                if died > 1:
                    raise RequestError(503, "the model replica is unavailable; retry later", code="unavailable",
                                       retry_after=RETRY_AFTER_UNAVAILABLE_S) from None
                continue
            self._down.discard(base)  # a replica answered
            if "error" not in first:
                return s, route, result
            if first.get("failed"):  # the model raised on this request: a bug (logged by the replica)
                raise RequestError(500, "internal error: the generation failed", type_="server_error")
            if route != "canary":
                raise RequestError(503, f"{s.ref} is not available on its replica", code="unavailable",
                                   retry_after=RETRY_AFTER_UNAVAILABLE_S)
            # The canary is not live on its replica (yet, or any more): stable answers instead.
            try:
                s, route = resolve_model(f"{p.model}@{self.routes[p.model]['stable']}", self.specialists), "stable"
            except (KeyError, UnknownModel):  # the routes changed under this request: a retry finds the new ones
                raise RequestError(503, f"{s.ref} is not available and its route changed meanwhile; retry",
                                   code="unavailable", retry_after=RETRY_AFTER_UNAVAILABLE_S) from None

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

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_json(self, request: Request) -> JSONResponse:
        """The API's schema (open: it is kolm's, the same for every app, but for its limits)."""
        if self._openapi is None:
            self._openapi = openapi_schema(keys=bool(self.keys), max_tokens_cap=self.max_tokens_cap,
                                           max_input_chars=self.max_input_chars,
                                           root_path=request.scope.get("root_path", ""))
        return JSONResponse(self._openapi)

    @api.get("/healthz", response_model=None, responses={
        200: {"model": Health, "description": "Live, with Specialists to serve."},
        503: {"model": Health, "description": "Live, but nothing to serve."}})
    async def healthz(self) -> JSONResponse:
        """Liveness and readiness, open to load balancers and probes: nothing about what is served
        (that is /healthz/details, behind the API's keys)."""
        if not self.specialists:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @api.get("/healthz/details", response_model=None,
             responses={200: {"model": HealthDetails, "description": "Served, routed and refused."}, **_errors(401)})
    async def healthz_details(self, request: Request) -> JSONResponse:
        """What this app serves, its canary routes and the artifacts it refused (paths and reasons):
        under the same bearer keys as the API (open when the server has none, as the API is)."""
        try:
            self._auth(request)
        except RequestError as e:
            return _error_response(e)
        return JSONResponse({"status": "ok" if self.specialists else "unavailable",
                             "specialists": [s.ref for s in self.specialists], "routes": self.routes,
                             "refused": self.refused})

    @api.get("/v1/models", response_model=None,
             responses={200: {"model": ModelList, "description": "Each Specialist and each name@version."},
                        **_errors(401)})
    async def models_(self, request: Request) -> JSONResponse:
        try:
            self._auth(request)
        except RequestError as e:
            return _error_response(e)
        return JSONResponse(models_body(self.specialists, self.pins))

    @api.post("/v1/chat/completions", response_model=None, openapi_extra=_json_body("ChatRequest"),
              responses={200: _streamed(ChatCompletion, ChatCompletionChunk), **_errors(400, 401, 404, 413, 503)})
    async def chat(self, request: Request) -> Any:
        return await self._serve("chat", request)

    @api.post("/v1/completions", response_model=None, openapi_extra=_json_body("CompletionRequest"),
              responses={200: _streamed(TextCompletion, TextCompletionChunk), **_errors(400, 401, 404, 413, 503)})
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
            p = parse(kind, await self._read_body(request), self.max_input_chars,  # type: ignore[arg-type]
                      self.max_tokens_cap)
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
                self._receipt(s, p, rid, started, "error", None, key, route, error=e.code or e.type)
            record_error(s, e.code or e.type)
            return _error_response(e)
        except ClientDisconnect:  # gone before its body arrived: nobody reads the answer
            record_error(s, "client_disconnect")
            return JSONResponse(error_body("the client disconnected", "invalid_request_error"), status_code=400)
        except Exception as e:  # noqa: BLE001 - a bug: a 500 in OpenAI's shape, logged and counted
            log.exception("request %s failed", rid)
            record_error(s, "server_error")
            if s is not None and p is not None:
                self._receipt(s, p, rid, started, "error", None, None, route, error="server_error")
            return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)
        self._receipt(s, p, rid, started, "ok", out, key, route)
        self._maybe_audit(s, p, rid, out["text"], route)
        kolm = kolm_block(s.ref, s.version, s.artifact_sha256, route)
        headers = {"x-kolm-version": s.ref}
        return JSONResponse(response_body(p, rid, s.ref, out["text"], out["finish_reason"], out["prompt_tokens"],
                                          out["completion_tokens"], kolm), headers=headers)

    @staticmethod
    async def _generate_call(handle: Any, request: dict[str, Any],
                             wait_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
        response = handle.generate.remote(request)
        await _assigned(response, wait_s)
        out = await response
        return out, out

    @staticmethod
    async def _stream_call(handle: Any, request: dict[str, Any],
                           wait_s: float) -> tuple[tuple[Any, dict[str, Any]], dict[str, Any]]:
        items = handle.options(stream=True).stream.remote(request)
        await _assigned(items, wait_s)
        try:
            first = await items.__anext__()
        except StopAsyncIteration:
            first = {"error": "the model produced nothing"}
        return (items, first), first

    async def _stream(self, s: Specialist, p: Parsed, items: Any, first_item: dict[str, Any], rid: str,
                      kolm: dict[str, Any], started: float, key: str | None, route: str) -> AsyncIterator[str]:
        first, final, status, error = True, None, "error", "server_error"

        async def chain() -> AsyncIterator[dict[str, Any]]:
            yield first_item
            async for x in items:
                yield x

        try:
            async for item in chain():
                if "error" in item:  # the generation failed, or the adapter is no longer loaded
                    error = "server_error" if item.get("failed") else "unavailable"
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
        except Exception as e:  # noqa: BLE001 - after the 200: the stream ends with an error event
            # OpenAI's shape, as its mid-stream errors are, rather than a cut connection; the
            # receipt says "error". A replica gone is retryable; anything else is a bug.
            if isinstance(e, _REPLICA_GONE):
                error = "unavailable"
                log.warning("request %s: the model replica went away mid-stream (%s)", rid, type(e).__name__)
                err = error_body("the model replica became unavailable; retry", "server_error", None, "unavailable")
            else:
                log.exception("request %s failed mid-stream", rid)
                err = error_body(f"internal error: {type(e).__name__}", "server_error")
            yield f"data: {json.dumps(err)}\n\n"
        finally:
            self._receipt(s, p, rid, started, status, final, key, route, error=error)
            if status == "error":
                record_error(s, error)
            if status == "ok" and final is not None:
                self._maybe_audit(s, p, rid, final["text"], route)

    def __del__(self) -> None:
        receipts = getattr(self, "receipts", None)
        if receipts is not None:
            receipts.close()
