"""A local HTTP server speaking the Anthropic Messages API, for tests, benchmarks and offline
examples: ``POST /v1/messages`` (plain and streaming), and the Message Batches API
(``POST /v1/messages/batches``, ``GET /v1/messages/batches`` (newest first, paged by
``limit``/``after_id``/``before_id`` as the real API), ``GET .../{id}``, ``GET .../{id}/results``).
A batch ends ``batch_delay_s`` after it is created; with ``hold_batches`` set, batches created
stay in progress until ``end_batches()``, so a test decides when they end.

With ``api_key`` or ``auth_token`` set it checks credentials as the real API does
(``x-api-key``, or ``Authorization: Bearer``) and answers 401 otherwise; ``stats.auth`` counts
which scheme each request used. ``outage(seconds)`` answers every message 529 (overloaded)
until it has passed, then recovers.

Answers come from a ``responder`` (a function of the request body and how many times this
exact prompt was seen, so k samples of one prompt can differ). Faults are injected from a
seeded plan: 429 with ``retry-after``, 529, 500, slow replies past the client's timeout, and
malformed bodies. ``max_in_flight`` plays the real API's concurrency limit: a request arriving
while that many are open is answered 429 with ``retry-after``. Counters record what was asked and answered, so tests can assert that no
sample was paid for twice. Runs aiohttp on its own thread and event loop; binds to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import math
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web

Responder = Callable[[dict[str, Any], int], str]


@dataclass
class FaultPlan:
    """Probabilities (0..1) of each injected fault per /v1/messages request, drawn from ``seed``."""

    rate_limit: float = 0.0
    overloaded: float = 0.0
    server_error: float = 0.0
    malformed: float = 0.0
    slow: float = 0.0
    slow_s: float = 5.0
    retry_after_s: float = 0.05
    seed: int = 0


@dataclass
class ServerStats:
    requests: int = 0
    succeeded: int = 0
    faults: Counter = field(default_factory=Counter)
    batch_requests: int = 0
    prompts: Counter = field(default_factory=Counter)
    in_flight: int = 0
    max_in_flight: int = 0  # most /v1/messages requests open at once, rejected ones included
    rate_limited: int = 0  # 429s sent: injected faults and the concurrency limit together
    concurrency_rejected: int = 0  # of them, requests past ``max_in_flight``
    first_request_at: float | None = None
    last_success_at: float | None = None
    count_tokens: int = 0  # free /v1/messages/count_tokens requests (not in ``requests``)
    # Batch requests answered (so paid for), by custom_id: more than 1 for one id is paying twice.
    batch_paid: Counter = field(default_factory=Counter)
    batches_created: int = 0
    auth: Counter = field(default_factory=Counter)  # "x-api-key" / "bearer" / "none", per /v1 request
    unauthorized: int = 0  # 401s sent
    outage_rejected: int = 0  # 529s sent by ``outage``


def user_text(body: dict[str, Any]) -> str:
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content if isinstance(b, dict))


def _system_text(body: dict[str, Any]) -> str:
    system = body.get("system") or ""
    if isinstance(system, str):
        return system
    return "".join(b.get("text", "") for b in system)


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def replay_responder(answers: dict[str, str], variants: Callable[[str, int], str] | None = None) -> Responder:
    """A recorded teacher: the answer stored for the input; ``variants`` rewrites the n-th repeat."""

    def respond(body: dict[str, Any], seen: int) -> str:
        text = user_text(body)
        answer = answers.get(text, "I do not know.")
        return variants(answer, seen) if variants else answer

    return respond


def sample_variants(kind: str, labels: list[str] | None = None) -> Callable[[str, int], str]:
    """Teacher-like variety among the k samples of one prompt: the first is the recorded answer,
    later ones are flawed the way a real teacher's samples are (a preamble, rambling, a clipped
    answer, a wrong label, broken JSON), so best-of-k has something to choose between.
    """

    def vary(answer: str, seen: int) -> str:
        v = seen % 4
        if v == 0:
            return answer
        if kind == "label":
            others = [x for x in (labels or []) if x != answer]
            return others[seen % len(others)] if v == 2 and others else answer
        if kind == "json":
            return answer[:-2] if v == 2 else answer
        if v == 1:
            return "Here is the summary you asked for: " + answer
        if v == 2:
            return " ".join(answer.split()[: max(3, len(answer.split()) // 3)])
        return answer + " " + answer

    return vary


class MessagesAPIServer:
    """``with MessagesAPIServer(responder) as srv: srv.url`` serves on a free loopback port."""

    def __init__(
        self,
        responder: Responder,
        *,
        latency_s: float = 0.0,
        faults: FaultPlan | None = None,
        batch_delay_s: float = 0.2,
        batch_error_rate: float = 0.0,
        max_in_flight: int | None = None,
        port: int = 0,
        model_prefix: str = "",
        api_key: str | None = None,
        auth_token: str | None = None,
        cancel_on_disconnect: bool = False,
    ):
        self.responder = responder
        self.api_key, self.auth_token = api_key, auth_token  # either set: requests must carry one
        # True: a request whose client went away (killed, timed out) stops at once, unanswered
        # and not counted in ``succeeded``; False: it runs on and is answered to nobody.
        self.cancel_on_disconnect = cancel_on_disconnect
        self.outage_until = 0.0
        self.outage_started_at: float | None = None
        self.outage_status = 529
        self._outage_pending: float | None = None
        self.model_prefix = model_prefix  # "recorded:" when replaying recorded answers
        self.max_in_flight = max_in_flight
        self.latency_s = latency_s
        self.faults = faults or FaultPlan()
        self.batch_delay_s = batch_delay_s
        self.batch_error_rate = batch_error_rate
        self.hold_batches = False  # True: batches created stay in progress until end_batches()
        self.stats = ServerStats()
        self._rng = random.Random(self.faults.seed)
        self._seen: Counter = Counter()
        self._cached_prefixes: set[str] = set()
        self._batches: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port = port  # 0: a free one, known once started
        self._start_error: OSError | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ----- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "MessagesAPIServer":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._start())
            except OSError as e:  # the port is taken: say so instead of a thread's traceback
                self._start_error = e
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="messages-api", daemon=True)
        self._thread.start()
        if not ready.wait(10) or self._start_error is not None:
            raise RuntimeError(f"the Messages API stand-in did not start on port {self.port}: {self._start_error}")
        return self

    def outage(self, seconds: float, status: int = 529, *, from_first_request: bool = False) -> None:
        """Answer every ``/v1/messages`` request ``status`` (529: overloaded) for ``seconds``
        from now (or from the next request, ``from_first_request``), then answer again.
        ``outage_started_at`` and ``outage_until`` say when it began and ends."""
        self.outage_status = status
        if from_first_request:
            self._outage_pending = seconds
        else:
            self.outage_started_at, self.outage_until = time.time(), time.time() + seconds

    def end_batches(self) -> None:
        """End every batch held in progress (``hold_batches``) now, and hold no more."""
        with self._lock:
            self.hold_batches = False
            for batch in self._batches.values():
                if batch["ready_at"] == math.inf:
                    batch["ready_at"] = time.time()

    async def _start(self) -> None:
        app = web.Application(client_max_size=256 * 1024**2, middlewares=[self._authenticate])
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_post("/v1/messages/batches", self._batch_create)
        app.router.add_get("/v1/messages/batches", self._batch_list)
        app.router.add_get("/v1/messages/batches/{id}", self._batch_get)
        app.router.add_get("/v1/messages/batches/{id}/results", self._batch_results)
        app.router.add_get("/_stats", self._stats_view)
        app.router.add_post("/_reset", self._reset)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=self.cancel_on_disconnect)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._loop is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)  # type: ignore[union-attr]
        fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)  # type: ignore[union-attr]
        self._loop = None

    def __enter__(self) -> "MessagesAPIServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- the model -----------------------------------------------------------------------
    def _answer(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt_key = hashlib.sha256(json.dumps([body.get("system"), body["messages"]], sort_keys=True).encode()).hexdigest()
        prefix = hashlib.sha256(_system_text(body).encode()).hexdigest()
        with self._lock:
            seen = self._seen[prompt_key]
            self._seen[prompt_key] += 1
            self.stats.prompts[prompt_key] += 1
            cached = prefix in self._cached_prefixes
            self._cached_prefixes.add(prefix)
        text = self.responder(body, seen)
        sys_tokens = _tokens(_system_text(body))
        cacheable = any(isinstance(b, dict) and b.get("cache_control") for b in (body.get("system") or []))
        usage = {
            "input_tokens": _tokens(user_text(body)) + (0 if cacheable else sys_tokens),
            "output_tokens": min(_tokens(text), int(body.get("max_tokens", 1024))),
            "cache_creation_input_tokens": sys_tokens if cacheable and not cached else 0,
            "cache_read_input_tokens": sys_tokens if cacheable and cached else 0,
        }
        return {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": f"{self.model_prefix}{body.get('model', 'unknown')}",
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }

    def _draw_fault(self) -> str | None:
        f = self.faults
        with self._lock:
            x = self._rng.random()
        for name, p in (
            ("rate_limit", f.rate_limit), ("overloaded", f.overloaded), ("server_error", f.server_error),
            ("malformed", f.malformed), ("slow", f.slow),
        ):
            if x < p:
                return name
            x -= p
        return None

    @staticmethod
    def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
        body = {"type": "error", "error": {"type": kind, "message": message}}
        return web.json_response(body, status=status, headers=headers)

    # ----- handlers ------------------------------------------------------------------------
    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)
        key = request.headers.get("x-api-key")
        bearer = request.headers.get("authorization", "")
        token = bearer[len("Bearer "):] if bearer.startswith("Bearer ") else None
        self.stats.auth["x-api-key" if key else "bearer" if token else "none"] += 1
        if self.api_key is None and self.auth_token is None:
            return await handler(request)
        if (self.api_key is not None and key == self.api_key) or (self.auth_token is not None and token == self.auth_token):
            return await handler(request)
        self.stats.unauthorized += 1
        return self._error(401, "authentication_error", "invalid x-api-key" if key else
                           "invalid bearer token" if token else "no credentials: x-api-key or Authorization: Bearer")

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        if self.stats.first_request_at is None:
            self.stats.first_request_at = time.time()
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            if self.max_in_flight is not None and self.stats.in_flight > self.max_in_flight:
                self.stats.concurrency_rejected += 1
                self.stats.rate_limited += 1
                return self._error(429, "rate_limit_error", f"more than {self.max_in_flight} requests in flight",
                                   {"retry-after": str(self.faults.retry_after_s)})
            return await self._messages_inner(request)
        finally:
            self.stats.in_flight -= 1

    async def _messages_inner(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            assert isinstance(body.get("messages"), list) and body["messages"]
            assert "model" in body and "max_tokens" in body
        except Exception:  # noqa: BLE001 - any unparsable request is the client's error
            return self._error(400, "invalid_request_error", "body must be JSON with model, max_tokens, messages")
        if self._outage_pending is not None:
            self.outage_started_at, self.outage_until = time.time(), time.time() + self._outage_pending
            self._outage_pending = None
        if time.time() < self.outage_until:
            self.stats.outage_rejected += 1
            self.stats.faults["overloaded" if self.outage_status == 529 else "server_error"] += 1
            kind = "overloaded_error" if self.outage_status == 529 else "api_error"
            return self._error(self.outage_status, kind, "outage: the API is not answering")
        fault = self._draw_fault()
        if fault:
            self.stats.faults[fault] += 1
        if fault == "rate_limit":
            self.stats.rate_limited += 1
            return self._error(429, "rate_limit_error", "rate limited", {"retry-after": str(self.faults.retry_after_s)})
        if fault == "overloaded":
            return self._error(529, "overloaded_error", "overloaded")
        if fault == "server_error":
            return self._error(500, "api_error", "internal error")
        if fault == "slow":
            await asyncio.sleep(self.faults.slow_s)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if fault == "malformed":
            return web.Response(text='{"id": "msg_x", "content": [', content_type="application/json")
        message = self._answer(body)
        self.stats.succeeded += 1
        self.stats.last_success_at = time.time()
        if body.get("stream"):
            return await self._stream(request, message)
        return web.json_response(message)

    async def _count_tokens(self, request: web.Request) -> web.Response:
        """The free token-counting endpoint: what a preflight asks to check the key and the route."""
        self.stats.count_tokens += 1
        try:
            body = await request.json()
            assert isinstance(body.get("messages"), list) and body["messages"] and "model" in body
        except Exception:  # noqa: BLE001
            return self._error(400, "invalid_request_error", "body must be JSON with model and messages")
        return web.json_response({"input_tokens": _tokens(_system_text(body) + user_text(body))})

    async def _stream(self, request: web.Request, message: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        text = message["content"][0]["text"]
        start = {**message, "content": [], "stop_reason": None, "usage": {**message["usage"], "output_tokens": 0}}
        events = [
            ("message_start", {"type": "message_start", "message": start}),
            ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ]
        for i in range(0, len(text), 16):
            events.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta", "text": text[i:i + 16]}}))
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": message["usage"]["output_tokens"]}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        for name, data in events:
            await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        await resp.write_eof()
        return resp

    def _batch_view(self, batch: dict[str, Any]) -> dict[str, Any]:
        ended = time.time() >= batch["ready_at"]
        n = len(batch["requests"])
        counts = {"processing": 0 if ended else n, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if ended:
            for r in batch["results"]:
                counts[r["result"]["type"]] += 1
        iso = datetime.datetime.fromtimestamp(batch["created"], datetime.timezone.utc).isoformat().replace("+00:00", "Z")
        return {
            "id": batch["id"],
            "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress",
            "request_counts": counts,
            "created_at": iso,
            "expires_at": iso,
            "ended_at": iso if ended else None,
            "archived_at": None,
            "cancel_initiated_at": None,
            "results_url": f"{self.url}/v1/messages/batches/{batch['id']}/results" if ended else None,
        }

    async def _stats_view(self, request: web.Request) -> web.Response:
        st = self.stats
        return web.json_response({
            "requests": st.requests, "succeeded": st.succeeded, "faults": dict(st.faults),
            "max_in_flight": st.max_in_flight, "rate_limited": st.rate_limited,
            "concurrency_rejected": st.concurrency_rejected, "first_request_at": st.first_request_at,
            "last_success_at": st.last_success_at,
        })

    async def _reset(self, request: web.Request) -> web.Response:
        self.stats = ServerStats()
        return web.json_response({"ok": True})

    async def _batch_create(self, request: web.Request) -> web.Response:
        body = await request.json()
        reqs = body.get("requests")
        if not isinstance(reqs, list) or not reqs:
            return self._error(400, "invalid_request_error", "requests must be a non-empty list")
        self.stats.batch_requests += len(reqs)
        results = []
        for r in reqs:
            with self._lock:
                errored = self._rng.random() < self.batch_error_rate
            if errored:
                results.append({"custom_id": r["custom_id"], "result": {"type": "errored", "error": {
                    "type": "error", "error": {"type": "overloaded_error", "message": "overloaded"}}}})
            else:
                msg = self._answer(r["params"])
                self.stats.succeeded += 1
                self.stats.batch_paid[r["custom_id"]] += 1
                results.append({"custom_id": r["custom_id"], "result": {"type": "succeeded", "message": msg}})
        self.stats.batches_created += 1
        bid = f"msgbatch_{uuid.uuid4().hex[:24]}"
        with self._lock:
            batch = {"id": bid, "requests": reqs, "results": results, "created": time.time(),
                     "ready_at": math.inf if self.hold_batches else time.time() + self.batch_delay_s}
            self._batches[bid] = batch
        return web.json_response(self._batch_view(batch))

    async def _batch_list(self, request: web.Request) -> web.Response:
        """Batches newest first, ``limit`` (1..1000, default 20) a page; ``after_id``: the page
        after that batch (older ones), ``before_id``: the page just before it (newer ones)."""
        q = request.query
        try:
            limit = int(q.get("limit", "20"))
            assert 1 <= limit <= 1000
        except (ValueError, AssertionError):
            return self._error(400, "invalid_request_error", "limit must be an integer from 1 to 1000")
        ordered = sorted(self._batches.values(), key=lambda b: b["created"], reverse=True)
        ids = [b["id"] for b in ordered]
        if "after_id" in q:
            if q["after_id"] not in ids:
                return self._error(404, "not_found_error", "no such batch")
            start = ids.index(q["after_id"]) + 1
            page = ordered[start:start + limit]
            more = start + limit < len(ordered)
        elif "before_id" in q:
            if q["before_id"] not in ids:
                return self._error(404, "not_found_error", "no such batch")
            end = ids.index(q["before_id"])
            page = ordered[max(0, end - limit):end]
            more = end - limit > 0
        else:
            page, more = ordered[:limit], len(ordered) > limit
        data = [self._batch_view(b) for b in page]
        return web.json_response({"data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None})

    async def _batch_get(self, request: web.Request) -> web.Response:
        batch = self._batches.get(request.match_info["id"])
        if batch is None:
            return self._error(404, "not_found_error", "no such batch")
        return web.json_response(self._batch_view(batch))

    async def _batch_results(self, request: web.Request) -> web.Response:
        batch = self._batches.get(request.match_info["id"])
        if batch is None or time.time() < batch["ready_at"]:
            return self._error(404, "not_found_error", "results not ready")
        lines = "\n".join(json.dumps(r) for r in batch["results"]) + "\n"
        return web.Response(body=lines.encode(), content_type="application/binary")


def main() -> None:
    """``python -m kolm_ray.testing.messages_api --replay rows.jsonl``: serve until interrupted.

    Prints the base URL on the first line, for ``ANTHROPIC_BASE_URL``.
    """
    import argparse

    from kolm_ray.sampling.prompt import RECORDED_MODEL_PREFIX  # how kolm knows recorded answers

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replay", action="append", default=[],
                    help="JSONL rows {input, output}: answer each input with its output (repeatable).")
    ap.add_argument("--port", type=int, default=0, help="Loopback port [default: a free one].")
    ap.add_argument("--latency", type=float, default=0.0, help="Seconds added to every reply.")
    ap.add_argument("--rate-limit", type=float, default=0.0, help="Share of requests answered 429.")
    ap.add_argument("--overloaded", type=float, default=0.0, help="Share of requests answered 529.")
    ap.add_argument("--max-in-flight", type=int, default=None, help="Answer 429 past this many requests at once.")
    ap.add_argument("--outage", type=float, default=0.0, metavar="SECONDS",
                    help="Answer every message 529 (overloaded) for this long after starting, then recover.")
    args = ap.parse_args()
    answers: dict[str, str] = {}
    for path in args.replay:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    answers[rec["input"]] = rec.get("output") or ""

    def respond(body: dict[str, Any], seen: int) -> str:
        return answers.get(user_text(body), "ok")

    srv = MessagesAPIServer(respond, latency_s=args.latency, max_in_flight=args.max_in_flight,
                            faults=FaultPlan(rate_limit=args.rate_limit, overloaded=args.overloaded), port=args.port,
                            model_prefix=RECORDED_MODEL_PREFIX)
    try:
        srv.start()
    except (RuntimeError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.outage:
        srv.outage(args.outage)
    print(srv.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        srv.stop()


if __name__ == "__main__":
    main()
