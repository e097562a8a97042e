"""Fuzzing the serving ingress with schemathesis, against the OpenAPI schema it publishes
(/openapi.json), live on loopback behind Ray Serve: schema-valid and schema-invalid requests to
every operation, with the app's bearer key. No answer may be a 5xx (a 500 is a bug in kolm;
nothing here kills a replica), every 4xx is in OpenAI's error shape, schema-invalid bodies are
refused; a valid request is answered and /healthz still answers afterwards.

The app under test has tight limits (8 tokens, 2,000 input characters, 64 KiB bodies) so that
the requests the fuzzer steers to a served Specialist generate quickly on the CPU."""

import json
import os
import time

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

KEY = "fuzz-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
APP = "fuzz"
MAX_TOKENS, MAX_INPUT_CHARS = 8, 2000
# Examples per POST operation: bounded for CI (about 20 s of requests in all); a deeper run sets
# KOLM_FUZZ_EXAMPLES (and KOLM_FUZZ_RANDOM=1 for new examples each run rather than the same ones).
EXAMPLES = int(os.environ.get("KOLM_FUZZ_EXAMPLES", "150"))
RANDOM = os.environ.get("KOLM_FUZZ_RANDOM") == "1"


@pytest.fixture(scope="module")
def fuzz_url(ray_session, specialists, serve_port, tmp_path_factory):
    """An app serving `route` (and refusing a tampered artifact), with a key and small limits."""
    from ray import serve

    from kolm_ray.serve.app import run
    from kolm_ray.serve.config import ModelDeploymentOptions, ServeConfig, token_digest

    cfg = ServeConfig(artifacts=[str(specialists["route"]), str(specialists["tampered"])],
                      trust_key=str(specialists["public_key"]), store=str(tmp_path_factory.mktemp("fuzz-home")),
                      app_name=APP, route_prefix=f"/{APP}", api_key_digests={"fuzzer": token_digest(KEY)},
                      max_tokens_cap=MAX_TOKENS, max_input_chars=MAX_INPUT_CHARS, max_body_bytes=64 * 1024,
                      model=ModelDeploymentOptions(num_cpus=0))
    run(cfg, port=serve_port)
    url = f"http://127.0.0.1:{serve_port}/{APP}"
    try:
        _wait_ready(url)
        yield url
    finally:
        serve.delete(APP)


def _wait_ready(url: str) -> None:
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            r = requests.post(f"{url}/v1/completions", json={"model": "route", "prompt": "hi", "max_tokens": 1},
                              headers=AUTH, timeout=30)
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} never answered")


@pytest.fixture(scope="module")
def api_schema(fuzz_url):
    """The published schema, with the key for the bearer scheme it declares: schemathesis sends it
    (and its auth checks drop or spoil it to see the 401)."""
    config = schemathesis.Config.from_dict({"auth": {"openapi": {"bearer": {"bearer": KEY}}}})
    return schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json", config=config, timeout=30)


def openai_error_shape(ctx, response, case):
    """Every refusal is ``{"error": {"message", "type", "param", "code"}}``, as OpenAI's clients parse."""
    if response.status_code < 400:
        return
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, f"not OpenAI's error shape: {response.text[:300]}"
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, f"not OpenAI's error shape: {response.text[:300]}"
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), response.text[:300]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)


def _refused_beyond_the_schema(path: str, case):
    """The RequestError kolm's own validator gives a schema-valid chat body for the one rule no
    JSON Schema can state (the last user message is the input: it must hold text, within the
    app's limit), or None. The server must then answer exactly that 400."""
    from kolm_ray.serve.protocol import RequestError, parse

    if path != "/v1/chat/completions" or not isinstance(case.body, dict):
        return None
    try:
        parse("chat", json.dumps(case.body).encode(), MAX_INPUT_CHARS, MAX_TOKENS)
    except RequestError as e:
        return e if e.param == "messages" else None
    except (TypeError, ValueError):  # not JSON-serializable as generated: the server sees what it sees
        return None
    return None


def _steered(case, positive: bool) -> None:
    """Half the generated bodies (by the parity of their model name's length, so a failing case
    replays the same) name the served Specialist, so generation runs too, not only the 404 path.
    Only a model that is already valid (a non-empty string) is renamed: a negative case's
    invalid model stays invalid. A schema-valid chat body renamed so also gets a last user
    message with text (the one rule no schema states), so that it is answered."""
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str) and len(body["model"]) % 2 == 1:
        body["model"] = "route"
        if positive and isinstance(body.get("messages"), list):
            body["messages"].append({"role": "user", "content": f"steered input {len(body['messages'])}"})


# schemathesis's pytest plugin (`schemathesis.pytest.from_fixture`, which a live server on a
# fixture needs) sets `request.node._nodeid`, which pytest 9 no longer has: its documented
# Hypothesis integration (`as_strategy` under `given`) runs the same generation and checks.
OPERATIONS = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
              ("GET", "/healthz"), ("GET", "/healthz/details")]


@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_the_ingress_answers_whatever_a_client_sends_without_a_server_error(api_schema, fuzz_url, method, path):
    from hypothesis import given
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    op = api_schema[path][method]
    modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if method == "POST" else [])
    examples = EXAMPLES if method == "POST" else 5

    @given(generated=st.one_of(*(op.as_strategy(generation_mode=m).map(lambda c, m=m: (c, m)) for m in modes)))
    @settings(max_examples=examples, deadline=None, derandomize=not RANDOM, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(generated):
        case, mode = generated
        _steered(case, mode == GenerationMode.POSITIVE)
        unstated = _refused_beyond_the_schema(path, case)
        response = case.call(base_url=fuzz_url, timeout=60)
        case.validate_response(response, additional_checks=[openai_error_shape],
                               excluded_checks=[positive_data_acceptance] if unstated else [],
                               transport_kwargs={"base_url": fuzz_url, "timeout": 60})
        sent = response.request.headers.get("authorization")
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if sent != AUTH["Authorization"]:  # a case generated with no key or a spoiled one: only 401 will do
            assert response.status_code == 401 or path == "/healthz", response.text
            return
        if unstated:
            assert response.status_code == 400 and response.json()["error"]["message"] == unstated.message

    statuses: dict[int, int] = {}
    fuzz()
    print(f"{method} {path}: statuses {dict(sorted(statuses.items()))}")
    if method == "POST":  # the fuzzing reached the model, not only the refusals
        assert statuses.get(200, 0) >= 5 and statuses.get(400, 0) >= 5, statuses


def test_a_valid_request_is_answered_and_healthz_answers_after_the_fuzzing(fuzz_url):
    """Runs after the fuzzing (file order): the app still serves and probes still see it live."""
    ok = requests.post(f"{fuzz_url}/v1/chat/completions", headers=AUTH, timeout=60,
                       json={"model": "route", "messages": [{"role": "user", "content": "I was charged twice"}],
                             "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["model"] == "route@1.0"
    health = requests.get(f"{fuzz_url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    details = requests.get(f"{fuzz_url}/healthz/details", headers=AUTH, timeout=30).json()
    assert details["specialists"] == ["route@1.0"] and len(details["refused"]) == 1
