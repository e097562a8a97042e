"""The ingress's HTTP edge without Serve: the body read under a size limit, the bounded wait for
a model replica, how a dead replica or a failed generation maps to a status, the published
OpenAPI schema, and the one-request fallback of a failed batch."""

import asyncio
import json
import re
from collections import deque
from types import SimpleNamespace

import pytest
from starlette.requests import Request

from kolm_ray.serve import deployments
from kolm_ray.serve.deployments import (
    BaseModelServer,
    Ingress,
    _assigned,
    _NoReplicaInTime,
    openapi_schema,
)
from kolm_ray.serve.protocol import RequestError


def _request(headers: dict[str, str], chunks: list[bytes]) -> tuple[Request, list[bytes]]:
    """A Starlette request whose body arrives in ``chunks``; what was read is recorded."""
    read: list[bytes] = []
    pending = list(chunks)

    async def receive():
        if pending:
            body = pending.pop(0)
            read.append(body)
            return {"type": "http.request", "body": body, "more_body": bool(pending)}
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    return Request(scope, receive), read


def _read(limit: int, headers: dict[str, str], chunks: list[bytes]) -> tuple[bytes | RequestError, list[bytes]]:
    request, read = _request(headers, chunks)
    try:
        return asyncio.run(Ingress._read_body(SimpleNamespace(max_body_bytes=limit, body_read_timeout_s=60.0), request)), read
    except RequestError as e:
        return e, read


def test_a_declared_length_over_the_limit_is_413_before_any_of_the_body_is_read():
    got, read = _read(1000, {"content-length": "1001"}, [b"x" * 1001])
    assert isinstance(got, RequestError) and got.status == 413 and got.code == "request_too_large"
    assert read == []  # refused on the header alone
    got, _ = _read(1000, {"content-length": "9" * 5000}, [b"x"])  # no int() of a 5000-digit header
    assert isinstance(got, RequestError) and got.status == 413


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit():
    got, read = _read(1000, {"transfer-encoding": "chunked"}, [b"x" * 400] * 10)
    assert isinstance(got, RequestError) and got.status == 413 and "over 1000 bytes" in got.message
    assert len(read) == 3  # 1200 bytes read of 4000: the rest never was


def test_a_body_within_the_limit_is_read_whole():
    assert _read(1000, {"content-length": "1000"}, [b"x" * 600, b"y" * 400])[0] == b"x" * 600 + b"y" * 400
    assert _read(1000, {}, [b"{}"])[0] == b"{}"


class _Response:
    """A handle call: assigned to a replica after ``after`` seconds (never: None), or failing."""

    def __init__(self, after: float | None, error: BaseException | None = None) -> None:
        self.after, self.error, self.cancelled = after, error, False

    async def _fetch_future_result_async(self):
        if self.error is not None:
            raise self.error
        await asyncio.sleep(3600 if self.after is None else self.after)


def _assign(response: _Response, wait_s: float) -> BaseException | None:
    response.cancel = lambda: setattr(response, "cancelled", True)
    try:
        asyncio.run(_assigned(response, wait_s))
    except BaseException as e:  # noqa: BLE001 - what it raised is the result
        return e
    return None


def test_a_request_no_replica_takes_in_time_is_withdrawn_and_a_quick_one_goes_through():
    never = _Response(None)
    assert isinstance(_assign(never, 0.05), _NoReplicaInTime) and never.cancelled
    quick = _Response(0.0)
    assert _assign(quick, 5) is None and not quick.cancelled
    from ray.serve.exceptions import BackPressureError

    assert isinstance(_assign(_Response(0, BackPressureError(num_queued_requests=1, max_queued_requests=1)), 5),
                      BackPressureError)  # Serve's own refusal passes through (the caller's 503)


def _ingress() -> SimpleNamespace:
    return SimpleNamespace(models={"b": object()}, replica_wait_s=1.0, _down=set(), routes={}, specialists=[],
                           _request=lambda s, p: {"adapter": "a"})


def _dispatch(ingress: SimpleNamespace, outcomes: list) -> tuple:
    """``Ingress._dispatch`` with a call that raises or returns ``outcomes`` in turn."""
    calls = []

    async def call(handle, request, wait_s):
        calls.append(wait_s)
        out = outcomes.pop(0)
        if isinstance(out, BaseException):
            raise out
        return out, out

    s = SimpleNamespace(base_key="b", ref="route@1.0")
    return asyncio.run(Ingress._dispatch(ingress, s, SimpleNamespace(model="route"), "latest", call)), calls


def _died():
    from ray.exceptions import ActorDiedError

    return ActorDiedError()


def test_a_replica_that_died_is_retried_once_then_a_503_with_retry_after():
    ingress = _ingress()
    (_, _, out), calls = _dispatch(ingress, [_died(), {"text": "ok"}])
    assert out == {"text": "ok"} and len(calls) == 2 and ingress._down == set()  # answered: not down any more
    with pytest.raises(RequestError) as e:
        _dispatch(ingress, [_died(), _died()])
    assert (e.value.status, e.value.code, e.value.retry_after) == (503, "unavailable", 5)
    assert ingress._down == {"b"}


def test_no_replica_in_time_is_a_503_unavailable_with_retry_after():
    with pytest.raises(RequestError) as e:
        _dispatch(_ingress(), [_NoReplicaInTime()])
    assert (e.value.status, e.value.code, e.value.retry_after) == (503, "unavailable", 5)
    assert "no model replica took the request within 1 s" in e.value.message
    down = _ingress()
    down._down.add("b")
    with pytest.raises(RequestError) as e:
        _dispatch(down, [_NoReplicaInTime()])
    assert (e.value.status, e.value.code, e.value.retry_after) == (503, "unavailable", 5)
    assert "restarting" in e.value.message
    with pytest.raises(RequestError) as e:  # died, and the replica Serve starts did not come in time
        _dispatch(_ingress(), [_died(), _NoReplicaInTime()])
    assert e.value.code == "unavailable"


def test_overload_is_a_503_and_a_failed_generation_a_500():
    from ray.serve.exceptions import BackPressureError

    with pytest.raises(RequestError) as e:
        _dispatch(_ingress(), [BackPressureError(num_queued_requests=1, max_queued_requests=1)])
    assert (e.value.status, e.value.code, e.value.retry_after) == (503, "overloaded", 1)
    with pytest.raises(RequestError) as e:
        _dispatch(_ingress(), [{"error": "generation failed: RuntimeError", "failed": True}])
    assert e.value.status == 500 and e.value.type == "server_error"


def test_the_schema_publishes_request_bodies_errors_limits_and_auth():
    schema = openapi_schema(keys=True, max_tokens_cap=8, max_input_chars=100, root_path="/fuzz")
    text = json.dumps(schema)
    missing = set(re.findall(r"#/components/schemas/(\w+)", text)) - set(schema["components"]["schemas"])
    assert not missing  # every reference resolves
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["required"] and {"200", "400", "401", "404", "413", "503"} <= set(chat["responses"])
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    req = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert req["max_tokens"]["anyOf"][0]["maximum"] == 8 and req["prompt"]["anyOf"][0]["maxLength"] == 100
    assert schema["servers"] == [{"url": "/fuzz"}] and "bearer" in schema["components"]["securitySchemes"]
    assert "security" not in schema["paths"]["/healthz"]["get"]  # probes need no key
    assert schema["paths"]["/healthz/details"]["get"]["security"] == [{"bearer": []}]
    assert "/openapi.json" not in schema["paths"]
    open_ = openapi_schema()
    assert "securitySchemes" not in open_["components"] and "security" not in open_["paths"]["/v1/models"]["get"]


def test_fastapis_own_errors_are_in_openais_shape():
    from starlette.testclient import TestClient

    client = TestClient(deployments.api, raise_server_exceptions=False)
    for method, path, status in (("GET", "/nowhere", 404), ("DELETE", "/healthz", 405)):
        r = client.request(method, path)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_batch_that_fails_is_generated_one_by_one_so_only_the_culprit_fails():
    """One request's failure (a bug) must not fail the requests batched with it."""
    from kolm_ray.serve.host import Completion

    class Host:
        def generate(self, gens, strict):
            if any(g.input == "bad" for g in gens):
                raise RuntimeError("probability tensor contains nan")
            return [Completion(text=g.input.upper(), prompt_tokens=1, completion_tokens=1, finish_reason="stop")
                    for g in gens]

    server = SimpleNamespace(host=Host())
    server._alone = lambda g: BaseModelServer._alone(server, g)
    reqs = [{"adapter": "a", "system": "", "input": t, "max_new_tokens": 4} for t in ("good", "bad", "fine")]
    out = asyncio.run(BaseModelServer._generate_batch(server, reqs))
    assert [o.get("text") for o in out] == ["GOOD", None, "FINE"]
    assert out[1]["failed"] and "RuntimeError" in out[1]["error"]


@pytest.mark.parametrize("error, code, kind", [("died", "unavailable", "unavailable"), ("bug", None, "server_error")])
def test_a_stream_whose_replica_fails_after_the_200_ends_with_an_error_event(error, code, kind):
    """The 200 is out with the first piece: a replica that dies (or a bug) mid-stream ends the
    stream with an error event in OpenAI's shape, not a cut connection, and its receipt says
    "error" (the old stream let the exception cut the connection), with what failed: the serving
    path (a replica gone: not the version's fault) or the version (a bug)."""
    from kolm_ray.serve.protocol import Parsed

    receipts = []
    ingress = SimpleNamespace(_receipt=lambda *a, error=None: receipts.append((a[4], error)),
                              _maybe_audit=lambda *a: None)

    async def items():
        yield {"delta": " more"}
        raise _died() if error == "died" else RuntimeError("boom")

    p = Parsed(kind="chat", model="route", input="hi", max_tokens=4, temperature=None, top_p=None, stop=(),
               stream=True, user=None)
    s = SimpleNamespace(ref="route@1.0")

    async def run():
        return [e async for e in Ingress._stream(ingress, s, p, items(), {"delta": "first"}, "chatcmpl-1", {}, 0.0,
                                                 None, "latest")]

    events = asyncio.run(run())
    assert len(events) == 3 and "first" in events[0] and "more" in events[1]
    last = json.loads(events[2].removeprefix("data: "))
    assert set(last["error"]) == {"message", "type", "param", "code"} and last["error"]["code"] == code
    assert receipts == [("error", kind)]


@pytest.mark.parametrize("env, audits", [
    ({}, False),
    ({"ANTHROPIC_API_KEY": "sk-test"}, True),
    ({"ANTHROPIC_AUTH_TOKEN": "gateway-token"}, True),  # a gateway's bearer token alone audits too
])
def test_a_replica_audits_with_an_api_key_or_an_auth_token(monkeypatch, tmp_path, env, audits):
    from kolm_ray.serve.audit import AuditOptions

    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert (deployments._audit_teacher(str(tmp_path), AuditOptions()) is not None) is audits


def test_a_canary_not_live_whose_route_changed_meanwhile_is_a_503_not_a_500():
    """The canary's replica lacks it and the release's routes moved on under the request (no
    route for the name any more): a retry finds the new routes, so 503 with Retry-After."""
    async def call(handle, request, wait_s):
        return {"error": "not loaded: route-1.1"}, {"error": "not loaded: route-1.1"}

    s = SimpleNamespace(base_key="b", ref="route@1.1")
    with pytest.raises(RequestError) as e:
        asyncio.run(Ingress._dispatch(_ingress(), s, SimpleNamespace(model="route"), "canary", call))
    assert e.value.status == 503 and e.value.code == "unavailable" and e.value.retry_after


def test_a_body_that_stops_arriving_is_a_408_and_frees_the_ingress():
    """A client that declares a small body and never sends all of it must not hold a slot for good."""
    sent = [b'{"model": "route", ']

    async def receive():
        if sent:
            return {"type": "http.request", "body": sent.pop(), "more_body": True}
        await asyncio.Event().wait()  # the rest never comes

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
             "headers": [(b"content-length", b"1000")]}
    with pytest.raises(RequestError) as e:
        asyncio.run(Ingress._read_body(SimpleNamespace(max_body_bytes=4096, body_read_timeout_s=0.2), Request(scope, receive)))
    assert e.value.status == 408 and e.value.code == "request_timeout"


def test_the_batcher_starts_a_lone_request_at_once_and_batches_what_queued_meanwhile():
    """No batch waits for company it has no reason to expect (a lone request used to wait out
    Serve's batch timeout); requests that queue while a batch runs go together in the next; a
    request whose caller is gone before its batch starts is dropped."""
    from kolm_ray.serve.deployments import _Batcher

    async def main() -> None:
        sizes: list[list[int]] = []
        gate = asyncio.Event()

        async def run(items: list[int]) -> list[int]:
            sizes.append(list(items))
            if len(sizes) == 1:
                await gate.wait()
            return [2 * i for i in items]

        b = _Batcher(run, max_batch_size=4, wait_s=3600)  # a batch that waited to fill would hang here
        first = asyncio.create_task(b.submit(1))
        while not sizes:
            await asyncio.sleep(0)
        assert sizes == [[1]]  # started alone, at once
        later = [asyncio.create_task(b.submit(i)) for i in (2, 3, 4, 5, 6)]
        await asyncio.sleep(0)
        later[1].cancel()  # 3: its caller is gone
        b.wait_s = 0
        gate.set()
        assert await asyncio.wait_for(first, 60) == 2
        assert await asyncio.wait_for(asyncio.gather(later[0], *later[2:]), 60) == [4, 8, 10, 12]
        assert sizes == [[1], [2, 4, 5], [6]]
        assert b.sizes == {1: 2, 3: 1}  # what a replica's status() reports as batch_sizes

    asyncio.run(main())


def test_the_batch_plan_waits_for_the_load_just_seen_and_never_for_a_lone_caller():
    """Driven batch by batch: 8 callers in flight whose batch just ended come back one round
    trip later, so a batch that starts with only the straggler waits for them (long enough for
    a round trip, not a generation) instead of splitting into 1 and 7; a lone caller never waits;
    a load that falls is forgotten after a few batches."""
    from kolm_ray.serve.deployments import BATCH_MEMORY, FOLLOW_MAX_S, batch_plan

    assert batch_plan([], 0.0, 8, 0.01) == (1, 0.01)  # the first request: nothing to wait for
    assert batch_plan([1, 1, 1], 0.5, 8, 0.01)[0] == 1  # concurrency 1: a batch of one starts at once
    want, wait = batch_plan([8, 7], 0.5, 8, 0.01)
    assert want == 8 and 0.01 < wait <= FOLLOW_MAX_S  # the 7 that just ended are waited for
    assert batch_plan([8], 60.0, 8, 0.01)[1] == FOLLOW_MAX_S  # a long generation: still only a round trip
    assert batch_plan([8], 0.5, 4, 0.01)[0] == 4  # never more than a batch holds
    assert batch_plan([8], 0.0, 8, 0.5)[1] == 0.5  # the configured wait is the floor
    recent: deque[int] = deque([8], maxlen=BATCH_MEMORY)
    for _ in range(BATCH_MEMORY):
        recent.append(1)  # the load fell to one caller
    assert batch_plan(recent, 0.5, 8, 0.01)[0] == 1


def test_a_burst_still_arriving_is_waited_for_up_to_a_round_trip():
    """The gather deadline (pure): the plan's wait, extended while requests keep coming within
    the gap of each other, never past FOLLOW_MAX_S."""
    from kolm_ray.serve.deployments import FOLLOW_MAX_S, gather_deadline

    assert gather_deadline(0.0, 0.0, 0.01, 0.01) == 0.01  # nothing more came: the plan's wait
    assert gather_deadline(0.0, 0.025, 0.01, 0.01) == 0.035  # the last came at 25 ms: wait 10 ms past it
    assert gather_deadline(0.0, 5.0, 0.01, 0.01) == FOLLOW_MAX_S  # a trickle never holds a batch long
    assert gather_deadline(0.0, 0.0, 0.5, 0.01) == 0.5  # a configured wait above the cap stands


def test_the_batcher_gathers_a_burst_that_arrives_spread_out_after_a_lull():
    """Eight callers came back at once before (the load the batcher remembers); now they arrive
    8 ms apart, 56 ms in all (each crossed the proxy and the ingress), under a 40 ms gap and the
    100 ms cap: one batch of 8, not 1 + 7."""
    from kolm_ray.serve.deployments import _Batcher

    async def main() -> None:
        sizes: list[int] = []

        async def run(items: list[int]) -> list[int]:
            sizes.append(len(items))
            return items

        b = _Batcher(run, max_batch_size=8, wait_s=0.04)
        await asyncio.gather(*(b.submit(i) for i in range(8)))  # the load seen: 8 at once
        assert sizes == [1, 7] or sizes == [8]  # the very first request had no load to remember
        sizes.clear()
        b._recent.extend([8] * 4)

        async def late(i: int) -> int:
            await asyncio.sleep(0.008 * i)
            return await b.submit(i)

        assert await asyncio.wait_for(asyncio.gather(*(late(i) for i in range(8))), 60) == list(range(8))
        assert sizes == [8]

    asyncio.run(main())


def test_a_straggler_that_queued_during_a_batch_counts_in_the_load_remembered():
    """Seven came together and an eighth while their batch ran: the load was 8. Remembering the
    batch's size (7) split every later burst of 8 into 7 and 1, which it then remembered again."""
    from kolm_ray.serve.deployments import _Batcher

    async def main() -> None:
        sizes: list[int] = []
        gate = asyncio.Event()

        async def run(items: list[int]) -> list[int]:
            sizes.append(len(items))
            if len(sizes) == 1:
                await gate.wait()
            return items

        b = _Batcher(run, max_batch_size=8, wait_s=0.04)
        b._recent.extend([7] * 4)  # the load seen so far: 7 at a time
        first = [asyncio.create_task(b.submit(i)) for i in range(7)]
        while not sizes:
            await asyncio.sleep(0)
        straggler = asyncio.create_task(b.submit(7))  # queued while the 7 run
        await asyncio.sleep(0)
        gate.set()
        await asyncio.wait_for(asyncio.gather(*first, straggler), 60)
        assert sizes == [7, 1]

        async def late(i: int) -> int:
            await asyncio.sleep(0.008 * i)
            return await b.submit(i)

        await asyncio.wait_for(asyncio.gather(*(late(i) for i in range(8))), 60)
        assert sizes == [7, 1, 8]

    asyncio.run(main())
