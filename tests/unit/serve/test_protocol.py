"""Request validation at the HTTP edge: each bad request gets a 400 naming the field."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kolm_ray.serve.protocol import RequestError, parse


def _chat(**kw) -> bytes:
    return json.dumps({"model": "tldr", "messages": [{"role": "user", "content": "hello"}], **kw}).encode()


def test_chat_input_is_the_last_user_message():
    body = json.dumps({"model": "tldr@1.2", "messages": [
        {"role": "system", "content": "ignored"}, {"role": "user", "content": "first"},
        {"role": "assistant", "content": "x"}, {"role": "user", "content": [{"type": "text", "text": "second"}]}],
        "max_tokens": 9, "stop": "\n", "user": "u1"}).encode()
    p = parse("chat", body, 1000)
    assert (p.model, p.input, p.max_tokens, p.stop, p.user) == ("tldr@1.2", "second", 9, ("\n",), "u1")


def test_completion_prompt_and_max_completion_tokens():
    p = parse("completion", json.dumps({"model": "m", "prompt": ["text"], "max_completion_tokens": 3}).encode(), 100)
    assert (p.input, p.max_tokens) == ("text", 3)


@pytest.mark.parametrize("raw, param, words", [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "must be a JSON object"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "model", "invalid 'model'"),
    (_chat(n=2), "n", "only n=1"),
    (_chat(temperature=3), "temperature", "invalid 'temperature'"),
    (_chat(max_tokens=0), "max_tokens", "invalid 'max_tokens'"),
    (json.dumps({"model": "m", "messages": []}).encode(), "messages", "invalid 'messages'"),
    (json.dumps({"model": "m", "messages": [{"role": "system", "content": "x"}]}).encode(), "messages",
     "must include a user message"),
    (json.dumps({"model": "m", "messages": [{"role": "robot", "content": "x"}]}).encode(), "messages.0.role", ""),
    (_chat(messages=[{"role": "user", "content": "   "}]), "messages", "the input is empty"),
    (_chat(messages=[{"role": "user", "content": "x" * 101}]), "messages", "at most 100"),
])
def test_bad_chat_requests_are_400_naming_the_field(raw, param, words):
    with pytest.raises(RequestError) as e:
        parse("chat", raw, 100)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message
    body = e.value.body()["error"]
    assert body["type"] == "invalid_request_error" and body["message"] == e.value.message


def test_completion_with_two_prompts_is_refused():
    with pytest.raises(RequestError) as e:
        parse("completion", json.dumps({"model": "m", "prompt": ["a", "b"]}).encode(), 100)
    assert e.value.param == "prompt"


# ----- hardening (issue 12): what a client can send is a 400, never an exception --------------

@pytest.mark.parametrize("raw, words", [
    (b"[" * 100_000, "nested too deeply"),  # was a RecursionError: a 500
    (b'{"model": "m", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "4300"),  # was a ValueError: a 500
])
def test_bodies_the_json_parser_cannot_hold_are_400(raw, words):
    with pytest.raises(RequestError) as e:
        parse("completion", raw, 100)
    assert e.value.status == 400 and "not valid JSON" in e.value.message and words in e.value.message


def test_a_content_part_whose_text_is_not_a_string_is_400_naming_it():
    """It was a TypeError joining the parts: a 500."""
    with pytest.raises(RequestError) as e:
        parse("chat", _chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), 100)
    assert e.value.status == 400 and e.value.param.startswith("messages.0.content")


@pytest.mark.parametrize("extra, param", [
    ({"temperature": False}, "temperature"), ({"max_tokens": "8"}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
    ({"stream": 1}, "stream"), ({"stream": "yes"}, "stream"), ({"max_tokens": 8.5}, "max_tokens"),
])
def test_json_types_are_strict_as_the_published_schema_says(extra, param):
    """Lax coercion accepted `false` as a temperature and "8" as max_tokens, which the schema
    (and OpenAI) refuse; 8.0 is still an integer, as it is to JSON Schema."""
    with pytest.raises(RequestError) as e:
        parse("chat", _chat(**extra), 100)
    assert e.value.status == 400 and e.value.param == param
    assert parse("chat", _chat(max_tokens=8.0, n=1.0), 100).max_tokens == 8


def test_at_most_four_stop_strings_and_the_token_cap_on_either_field():
    assert parse("chat", _chat(stop=["a", "b", "c", "d"]), 100).stop == ("a", "b", "c", "d")
    with pytest.raises(RequestError) as e:
        parse("chat", _chat(stop=list("abcde")), 100)
    assert e.value.param == "stop" and "at most 4" in e.value.message
    for field in ("max_tokens", "max_completion_tokens"):  # both, as the schema caps both
        with pytest.raises(RequestError) as e:
            parse("chat", _chat(**{"max_tokens": 4, field: 9}), 100, max_tokens_cap=8)
        assert e.value.param == field and "at most 8" in e.value.message


def test_error_types_and_retry_after():
    assert RequestError(413, "big", code="request_too_large").body()["error"] == {
        "message": "big", "type": "invalid_request_error", "param": None, "code": "request_too_large"}
    assert RequestError(503, "x", retry_after=5).retry_after == 5 and RequestError(503, "x").type == "overloaded_error"
    assert RequestError(500, "x").type == "server_error"


def _validator(name: str, **limits):
    import jsonschema

    from kolm_ray.serve.protocol import request_schemas

    defs = request_schemas("#/$defs/{model}", **limits)
    return jsonschema.Draft202012Validator({"$defs": defs, "$ref": f"#/$defs/{name}"})


@pytest.mark.parametrize("kind, body, valid", [
    ("completion", {"model": "m", "prompt": "hello"}, True),
    ("completion", {"model": "m", "prompt": ["hello"], "max_tokens": 8, "stop": ["a", "b"]}, True),
    ("completion", {"model": "m", "prompt": "   "}, False),  # no text
    ("completion", {"model": "m", "prompt": ["a", "b"]}, False),  # one prompt only
    ("completion", {"model": "m", "prompt": "x" * 101}, False),  # past the input limit
    ("completion", {"model": "m", "prompt": "x", "max_tokens": 9}, False),  # past the token cap
    ("completion", {"model": "m", "prompt": "x", "n": 2}, False),
    ("completion", {"model": "m", "prompt": "x", "stop": list("abcde")}, False),
    ("completion", {"model": "m", "prompt": "x", "temperature": False}, False),
    ("chat", {"model": "m", "messages": [{"role": "system", "content": "x"}]}, False),  # no user message
    ("chat", {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
              "logprobs": None}, True),  # unknown fields are allowed, as OpenAI clients send them
])
def test_the_published_request_schema_agrees_with_parse(kind, body, valid):
    name = "ChatRequest" if kind == "chat" else "CompletionRequest"
    assert _validator(name, max_tokens_cap=8, max_input_chars=100).is_valid(body) is valid
    try:
        parse(kind, json.dumps(body).encode(), 100, max_tokens_cap=8)
        accepted = True
    except RequestError as e:
        assert e.status == 400
        accepted = False
    assert accepted is valid


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=20)
_FIELDS = ("model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
           "stream", "stop", "user")


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["chat", "completion"]),
       raw=st.one_of(st.binary(max_size=64), _JSON.map(lambda v: json.dumps(v).encode()),
                     st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=6).map(lambda v: json.dumps(v).encode())))
def test_parse_answers_any_body_with_parsed_or_a_400(kind, raw):
    try:
        parse(kind, raw, 100, max_tokens_cap=8)
    except RequestError as e:
        assert e.status == 400 and e.body()["error"]["message"]
