"""Serving on Ray Serve over loopback: two Specialists on one tiny base behind the
OpenAI-compatible ingress, reached through the real `openai` client and plain HTTP; a tampered
artifact refused while the others serve; receipts; 4xx, 404, 401, 413 and 503; a bare /healthz
and its details behind the API's keys; what the one Serve instance of a cluster fixes (its
port, each app's route prefix); `kolm serve --stop`."""

import asyncio
import json
import socket
import time

import aiohttp
import openai
import requests
import pytest
from click.testing import CliRunner

from kolm_ray.cli import cli

RUNNER = CliRunner()


def _wait_healthy(url: str) -> dict:
    for _ in range(240):
        try:
            r = requests.get(f"{url}/healthz", timeout=5)
            if r.status_code == 200:
                return r.json()
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} never became healthy")


@pytest.fixture(scope="module")
def served(ray_session, specialists, tmp_path_factory, serve_port):
    """`kolm serve --detach` of route, tldr and a tampered artifact, and a second, tight app
    (bearer keys, one request at a time, a one-deep queue) on the same Serve instance."""
    from ray import serve

    home = tmp_path_factory.mktemp("serve-home")
    port = serve_port
    keys = home / "keys.json"
    keys.write_text(json.dumps({"team-a": "token-aaaaaaaaaaaaaaaa"}))
    common = ["--port", str(port), "--detach", "--num-cpus", "0", "--key", str(specialists["public_key"])]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KOLM_HOME", str(home))
        res = RUNNER.invoke(cli, ["serve", str(specialists["route"]), str(specialists["tldr"]),
                                  str(specialists["tampered"]), *common])
        assert res.exit_code == 0, res.output
        tight = RUNNER.invoke(cli, ["serve", str(specialists["route"]), *common, "--app-name", "tight",
                                    "--route-prefix", "/tight", "--api-keys", str(keys), "--max-batch-size", "1",
                                    "--max-ongoing", "1", "--max-queued", "1"])
        assert tight.exit_code == 0, tight.output
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url)
    _wait_healthy(f"{url}/tight")
    yield {"url": url, "home": home, "output": res.output}
    for app in ("kolm", "tight"):
        serve.delete(app)  # a no-op for an app already deleted


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served['url']}/v1", api_key="unused", max_retries=0)


def test_a_cluster_started_as_cluster_yaml_does_serves_behind_haproxy(served):
    from kolm_ray.serve.ingress_path import HAPROXY, running_path

    # The session's head starts with the fast path's variables, as cluster.yaml's nodes do.
    assert running_path() == HAPROXY
    assert "Python proxy" not in served["output"]


def test_two_specialists_answer_through_the_openai_client_naming_their_versions(served, client):
    answers = {}
    for name in ("route", "tldr"):
        raw = client.chat.completions.with_raw_response.create(
            model=name, messages=[{"role": "user", "content": "I was charged twice for my invoice"}], max_tokens=8,
            temperature=0)
        assert raw.headers["x-kolm-version"] == f"{name}@1.0"
        resp = raw.parse()
        assert resp.model == f"{name}@1.0" and resp.kolm["version"] == "1.0"  # type: ignore[attr-defined]
        assert resp.usage.completion_tokens <= 8 and resp.choices[0].message.role == "assistant"
        answers[name] = resp.choices[0].message.content
    assert answers["route"] != answers["tldr"]  # each Specialist's own adapter answered
    comp = client.completions.create(model="route@1.0", prompt="I was charged twice for my invoice", max_tokens=8,
                                     temperature=0)
    assert comp.choices[0].text == answers["route"] and comp.model == "route@1.0"


def test_streaming_matches_the_plain_answer(client):
    kw = dict(model="tldr", messages=[{"role": "user", "content": "please summarize this"}], max_tokens=10,
              temperature=0)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == plain
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"} and chunks[0].model == "tldr@1.0"


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_a_stream_reports_the_same_usage_as_the_same_call_without_streaming(client, kind):
    """With a stop string the stream halts a few tokens late and used to count them (and the eos
    token): its final chunk's usage must be the plain response's."""
    def call(**kw):
        if kind == "chat":
            return client.chat.completions.create(model="tldr", messages=[{"role": "user", "content": "please sum "
                                                  "this up"}], max_tokens=12, temperature=0, **kw)
        return client.completions.create(model="tldr", prompt="please sum this up", max_tokens=12, temperature=0, **kw)

    def text(r):
        return r.choices[0].message.content if kind == "chat" else r.choices[0].text

    stop = text(call()).split()[1]
    plain = call(stop=[stop])
    chunks = list(call(stop=[stop], stream=True))
    streamed = "".join((c.choices[0].delta.content or "") if kind == "chat" else c.choices[0].text
                       for c in chunks if c.choices)
    assert streamed.strip() == text(plain)
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens < 12
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason == "stop"


def test_models_lists_specialists_and_versions_and_unknown_ones_are_404(client):
    ids = {m.id for m in client.models.list()}
    assert {"route", "route@1.0", "tldr", "tldr@1.0"} <= ids and not any(i.startswith("evil") for i in ids)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="route@9.9", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:  # an unknown name is told what is served, as a version is
        client.completions.create(model="rout", prompt="x")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert "'rout' does not exist (served here: route, tldr;" in e.value.body["message"]


def test_tampered_artifact_is_refused_while_the_others_serve(served, client):
    assert "refused" in served["output"] and "signature verification failed" in served["output"]
    health = requests.get(f"{served['url']}/healthz/details", timeout=30).json()
    assert health["specialists"] == ["route@1.0", "tldr@1.0"]
    assert any("tampered" in r["artifact"] for r in health["refused"])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="evil", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/chat/completions", b"{broken", 400, "not valid JSON"),
    ("/v1/chat/completions", json.dumps({"model": "route"}).encode(), 400, "invalid 'messages'"),
    ("/v1/chat/completions", json.dumps({"model": "route", "n": 3, "messages": [{"role": "user", "content": "x"}]})
     .encode(), 400, "only n=1"),
    ("/v1/chat/completions", json.dumps({"model": "route", "max_tokens": 10**6,
                                         "messages": [{"role": "user", "content": "x"}]}).encode(), 400, "at most"),
    ("/v1/completions", json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "does not exist"),
])
def test_bad_requests_get_openai_shaped_errors(served, path, body, status, words):
    r = requests.post(served["url"] + path, data=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert words in err["message"] and err["type"] and "code" in err and "param" in err


def test_healthz_is_bare_and_its_details_need_the_apis_key(served):
    """/healthz is for probes: no artifact paths, refusal reasons or routes. The details are
    behind the same bearer keys as the API (open on an app without keys, as its API is)."""
    for url in (served["url"], f"{served['url']}/tight"):
        bare = requests.get(f"{url}/healthz", timeout=30)
        assert bare.status_code == 200 and bare.json() == {"status": "ok"}
    details = requests.get(f"{served['url']}/healthz/details", timeout=30).json()  # no keys on this app
    assert details["status"] == "ok" and details["specialists"] == ["route@1.0", "tldr@1.0"]
    tight = f"{served['url']}/tight/healthz/details"
    for headers in ({}, {"authorization": "Bearer wrong-key"}):
        denied = requests.get(tight, headers=headers, timeout=30)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        assert "refused" not in denied.text and "route@1.0" not in denied.text
    ok = requests.get(tight, headers={"authorization": "Bearer token-aaaaaaaaaaaaaaaa"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["specialists"] == ["route@1.0"] and ok.json()["refused"] == []


def _raw_request(port: int, head: bytes, chunks: list[bytes] = (), timeout: float = 60) -> tuple[int, dict, dict]:
    """Send ``head`` and ``chunks`` on a raw connection, never finishing the body, and read the
    answer: a server that waits for the whole body before answering times out here."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        for c in chunks:
            sock.sendall(c)
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            assert more, f"connection closed before an answer: {data!r}"
            data += more
        head_out, _, body = data.partition(b"\r\n\r\n")
        lines = head_out.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_a_body_declared_over_the_limit_is_413_before_any_of_it_is_read(served, client, serve_port):
    """10 GB declared and none of it sent: the answer comes at once (the old ingress read the
    body whole first, and waited for it). The real `openai` client's 5 MiB prompt: the same 413."""
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10737418240\r\n\r\n")
    status, _, body = _raw_request(serve_port, head)
    assert status == 413 and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "request_too_large" and body["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="route", prompt="x" * (5 * 2**20), max_tokens=2)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    assert "at most 4194304" in e.value.body["message"]


def test_a_chunked_body_is_refused_once_it_passes_the_limit(served, serve_port):
    """A chunked body declares no length: it is read chunk by chunk and refused as soon as it
    passes the limit, while the client is still sending (the last chunk never comes)."""
    mib = b"x" * 2**20
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (len(mib), mib)
    status, _, body = _raw_request(serve_port, head, [chunk] * 5)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert "over 4194304 bytes" in body["error"]["message"]

    def generated():  # requests sends a generator chunked, to its end
        yield b'{"model": "route", "messages": [{"role": "user", "content": "'
        for _ in range(6):
            yield mib
        yield b'"}]}'

    r = requests.post(f"{served['url']}/v1/chat/completions", data=generated(), timeout=60,
                      headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_a_long_chat_history_under_the_limit_is_served(client):
    """The limit leaves room for the history OpenAI clients resend: only the last user message
    is the Specialist's input."""
    history = [{"role": "user", "content": "earlier " * 40_000}, {"role": "assistant", "content": "ok " * 40_000}]
    resp = client.chat.completions.create(model="route", max_tokens=2,
                                          messages=[*history, {"role": "user", "content": "I was charged twice"}])
    assert resp.model == "route@1.0"


def test_unknown_routes_and_methods_get_openai_shaped_errors(served):
    for method, path, status in (("GET", "/v1/nothing", 404), ("DELETE", "/v1/models", 405),
                                 ("GET", "/v1/chat/completions", 405)):
        r = requests.request(method, served["url"] + path, timeout=30)
        assert r.status_code == status, (method, path, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_the_openapi_schema_publishes_the_request_bodies(served):
    schema = requests.get(f"{served['url']}/openapi.json", timeout=30).json()
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatRequest"}
    assert {"model", "messages", "max_tokens", "stream"} <= set(schema["components"]["schemas"]["ChatRequest"]
                                                                ["properties"])
    assert "413" in chat["responses"] and "/v1/models" in schema["paths"] and "/healthz/details" in schema["paths"]


def test_receipts_record_every_call_and_verify(served, client):
    from kolm_ray.serve.receipts import digest

    prompts = {digest(t): t for t in ("receipt one", "receipt two", "receipt three")}
    for text in prompts.values():
        client.chat.completions.create(model="route", messages=[{"role": "user", "content": text}], max_tokens=4)
    for _ in range(60):  # flushed on a 0.5 s timer
        mine = [r for r in _receipts(served) if r["input_sha256"] in prompts]
        if len(mine) == 3:
            break
        time.sleep(0.25)
    assert len(mine) == 3
    for r in mine:
        assert (r["specialist"], r["version"], r["status"]) == ("route", "1.0", "ok")
        assert r["output_sha256"] and r["artifact_sha256"] and r["latency_ms"] > 0 and r["completion_tokens"] > 0
        assert r["c"] is not None and r["k"] is not None  # the verifier's reference-free checks
    ok = RUNNER.invoke(cli, ["receipts", "verify", "--store", str(served["home"]), "--app-name", "kolm"])
    assert ok.exit_code == 0, ok.output


def _receipts(served) -> list[dict]:
    from kolm_ray.serve.receipts import read_receipts

    d = served["home"] / "receipts" / "kolm"
    return read_receipts(d) if d.is_dir() else []


def test_bearer_keys_are_required_when_configured(served):
    url = f"{served['url']}/tight/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong-key", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=url, api_key="token-aaaaaaaaaaaaaaaa", max_retries=0)
    resp = ok.chat.completions.create(model="route", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert resp.model == "route@1.0"


def test_overload_gets_503_not_an_unbounded_backlog(served):
    async def burst() -> list[int]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as c:
            async def one() -> int:
                async with c.post(f"{served['url']}/tight/v1/completions",
                                  headers={"authorization": "Bearer token-aaaaaaaaaaaaaaaa"},
                                  json={"model": "route", "prompt": "a long answer please", "max_tokens": 64}) as r:
                    if r.status == 503:
                        assert (await r.json())["error"]["code"] == "overloaded"
                        assert r.headers["retry-after"] == "1"  # the openai client waits that long and retries
                    return r.status
            return await asyncio.gather(*(one() for _ in range(16)))

    codes = asyncio.run(burst())
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 1, codes


def test_streams_under_overload_get_a_503_before_any_200(served):
    async def burst() -> list[tuple[int, str]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as c:
            async def one() -> tuple[int, str]:
                async with c.post(f"{served['url']}/tight/v1/chat/completions",
                                  headers={"authorization": "Bearer token-aaaaaaaaaaaaaaaa"},
                                  json={"model": "route", "stream": True, "max_tokens": 48,
                                        "messages": [{"role": "user", "content": "a long answer please"}]}) as r:
                    return r.status, (await r.read()).decode()
            return await asyncio.gather(*(one() for _ in range(12)))

    got = asyncio.run(burst())
    assert {code for code, _ in got} <= {200, 503} and any(code == 503 for code, _ in got), [c for c, _ in got]
    for code, body in got:
        if code == 503:
            assert json.loads(body)["error"]["code"] == "overloaded"
        else:
            assert body.rstrip().endswith("data: [DONE]")


def test_serve_stop_stops_a_detached_app_and_flushes_every_receipt(served):
    """`kolm serve --stop` is graceful: calls made just before the app goes away are on disk. A
    second stop finds nothing and says so (exit 1)."""
    from ray import serve

    from kolm_ray.serve.receipts import digest, read_receipts

    c = openai.OpenAI(base_url=f"{served['url']}/tight/v1", api_key="token-aaaaaaaaaaaaaaaa", max_retries=0)
    prompts = [f"last call {i}" for i in range(5)]
    for p in prompts:
        c.completions.create(model="route", prompt=p, max_tokens=2)
    stopped = RUNNER.invoke(cli, ["serve", "--stop", "--app-name", "tight"])  # well inside the 0.5 s flush interval
    assert stopped.exit_code == 0 and "stopped     app tight" in stopped.output, stopped.output
    assert "tight" not in serve.status().applications
    logged = {r["input_sha256"] for r in read_receipts(served["home"] / "receipts" / "tight")}
    assert {digest(p) for p in prompts} <= logged
    ok = RUNNER.invoke(cli, ["receipts", "verify", "--store", str(served["home"])])
    assert ok.exit_code == 0, ok.output
    again = RUNNER.invoke(cli, ["serve", "--stop", "--app-name", "tight"])
    assert again.exit_code == 1 and "nothing to stop: no app 'tight'" in again.output
    assert "kolm" in again.output.split("apps running there:")[1]


def test_serve_stop_env_stops_its_rollout_controller_and_its_app(served, specialists, kolm_home):
    import ray
    from ray import serve

    from kolm_ray.serve.receipts import digest, read_receipts

    key = ["--key", str(specialists["public_key"])]
    published = RUNNER.invoke(cli, ["publish", str(specialists["route"]), "--to", "edge", *key])
    assert published.exit_code == 0, published.output
    up = RUNNER.invoke(cli, ["serve", "--env", "edge", "--route-prefix", "/edge", "--detach", "--num-cpus", "0",
                             "--rollout-interval", "60", *key])
    assert up.exit_code == 0, up.output
    _wait_healthy(f"{served['url']}/edge")
    c = openai.OpenAI(base_url=f"{served['url']}/edge/v1", api_key="unused", max_retries=0)
    c.completions.create(model="route", prompt="the last call before the stop", max_tokens=2)
    stopped = RUNNER.invoke(cli, ["serve", "--stop", "--env", "edge"])
    assert stopped.exit_code == 0, stopped.output
    assert stopped.output.splitlines() == ["stopped     rollout controller kolm-rollout-edge",
                                           "stopped     app kolm-edge (its replicas drained and flushed their receipts)"]
    with pytest.raises(ValueError):  # the controller is gone, so nothing deploys the app again
        ray.get_actor("kolm-rollout-edge", namespace="kolm")
    assert "kolm-edge" not in serve.status().applications
    logged = {r["input_sha256"] for r in read_receipts(kolm_home / "receipts" / "kolm-edge")}
    assert digest("the last call before the stop") in logged


def test_a_port_or_route_prefix_serve_cannot_give_is_refused_before_deploying(served, specialists, serve_port):
    """Serve keeps the port it first started on, and one app per route prefix: `kolm serve` says
    so (exit 2, one line) instead of printing an endpoint nothing answers, or a traceback."""
    from kolm_ray.testing.cluster import free_port

    common = [str(specialists["route"]), "--detach", "--num-cpus", "0", "--key", str(specialists["public_key"])]
    other = free_port()
    moved = RUNNER.invoke(cli, ["serve", *common, "--port", str(other), "--app-name", "moved", "--route-prefix", "/m"])
    assert moved.exit_code == 2, moved.output
    assert (f"error: Serve on this cluster already listens on 127.0.0.1:{serve_port} (fixed when it first started): "
            f"use --port {serve_port}, or stop Serve first") in moved.output
    taken = RUNNER.invoke(cli, ["serve", *common, "--app-name", "second"])
    assert taken.exit_code == 2 and "error: the route prefix / is held by the app 'kolm' on this cluster" in taken.output
    assert "--route-prefix /other --app-name other" in taken.output and "Traceback" not in taken.output


def test_serve_audit_rate_audits_calls_through_the_teacher_off_the_request_path(served, specialists, messages_api,
                                                                                 serve_port, monkeypatch):
    from ray import serve

    from kolm_ray.serve.receipts import read_receipts
    from kolm_ray.testing.messages_api import replay_responder

    monkeypatch.setenv("KOLM_HOME", str(served["home"]))
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    # No --port: the app joins the running Serve's port, and the endpoint printed is the one that answers.
    args = ["serve", str(specialists["route"]), "--detach", "--num-cpus", "0", "--key",
            str(specialists["public_key"]), "--app-name", "audited", "--route-prefix", "/audited", "--audit-rate", "1"]
    refused = RUNNER.invoke(cli, args)
    assert refused.exit_code == 2 and "ANTHROPIC_API_KEY" in refused.output  # checked before anything starts
    prompts = [f"I was charged twice, invoice {i}" for i in range(4)]
    teacher = messages_api(replay_responder({p: "billing" for p in prompts}))
    res = RUNNER.invoke(cli, args)
    assert res.exit_code == 0 and "audits      100% of calls" in res.output, res.output
    assert f"endpoint    http://127.0.0.1:{serve_port}/audited/v1" in res.output
    try:
        _wait_healthy(f"{served['url']}/audited")
        c = openai.OpenAI(base_url=f"{served['url']}/audited/v1", api_key="unused", max_retries=0)
        ids = [c.chat.completions.create(model="route", messages=[{"role": "user", "content": p}]).id
               for p in prompts[:3]]
        streamed = list(c.chat.completions.create(model="route", stream=True,
                                                  messages=[{"role": "user", "content": prompts[3]}]))
        ids.append(streamed[0].id)
        deadline = time.time() + 60
        while time.time() < deadline:
            audits = [r for r in read_receipts(served["home"] / "receipts" / "audited") if r.get("kind") == "audit"]
            if len(audits) >= 4:
                break
            time.sleep(0.5)
    finally:
        serve.delete("audited")
    assert sorted(a["request_id"] for a in audits) == sorted(ids)  # each call, streamed or not, audited once
    assert all(a["status"] == "ok" and a["k"] is not None and a["judge"] == "route@1.0" for a in audits)
    assert all(a["cost_usd"] is None for a in audits)  # the test artifact's teacher has no price: uncosted
    assert teacher.stats.succeeded == 4
    ok = RUNNER.invoke(cli, ["receipts", "verify", "--store", str(served["home"]), "--app-name", "audited"])
    assert ok.exit_code == 0, ok.output
