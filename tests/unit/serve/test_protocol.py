"""Request validation at the HTTP edge: each bad request gets a 400 naming the field."""

import json

import pytest

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
