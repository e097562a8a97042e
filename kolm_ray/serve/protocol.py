"""The OpenAI-compatible wire format: request validation and response bodies (pure functions).

A Specialist answers one input with one output, so a chat request's input is its last user
message (a client's own system message is ignored: the Specialist's task prompt is fixed at
compile time) and a completion request's input is its prompt. Every response body names the
version that served it (``model`` = ``name@version``, and a ``kolm`` object); the ingress also
sets the ``x-kolm-version`` header. Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``. Must not call models or Ray.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class RequestError(Exception):
    """A request the API refuses: HTTP status, OpenAI error type, param and code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                              429: "rate_limit_error", 503: "overloaded_error"}.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we ignore (logprobs=None, ...)
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str | list[str]


@dataclass(frozen=True)
class Parsed:
    """What the ingress needs from a request, whichever endpoint it came to."""

    kind: Literal["chat", "completion"]
    model: str
    input: str
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    stop: tuple[str, ...]
    stream: bool
    user: str | None


def parse(kind: Literal["chat", "completion"], raw: bytes, max_input_chars: int) -> Parsed:
    """Validate a request body.

    Raises:
        RequestError: 400 naming the offending field.
    """
    try:
        body = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    model_cls = ChatRequest if kind == "chat" else CompletionRequest
    try:
        req = model_cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        raise RequestError(400, f"invalid '{param}': {err['msg']}", param=param) from None
    if isinstance(req, ChatRequest):
        users = [m for m in req.messages if m.role == "user"]
        if not users:
            raise RequestError(400, "messages must include a user message: it is the Specialist's input",
                               param="messages")
        text = users[-1].text()
    else:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise RequestError(400, "prompt must be one string", param="prompt")
        text = prompts[0]
    if not text.strip():
        raise RequestError(400, "the input is empty", param="messages" if kind == "chat" else "prompt")
    if len(text) > max_input_chars:
        raise RequestError(400, f"the input is {len(text)} characters; at most {max_input_chars} are accepted",
                           param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    stop = () if req.stop is None else ((req.stop,) if isinstance(req.stop, str) else tuple(req.stop))
    return Parsed(kind=kind, model=req.model, input=text, max_tokens=req.max_completion_tokens or req.max_tokens,
                  temperature=req.temperature, top_p=req.top_p, stop=stop, stream=req.stream, user=req.user)


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def kolm_block(ref: str, version: str, artifact_sha256: str, route: str) -> dict[str, Any]:
    return {"specialist": ref.split("@")[0], "version": version, "artifact_sha256": artifact_sha256, "route": route}


def response_body(p: Parsed, rid: str, ref: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
                  kolm: dict[str, Any]) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    created = int(time.time())
    if p.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": None}
        return {"id": rid, "object": "chat.completion", "created": created, "model": ref, "choices": [choice],
                "usage": usage, "kolm": kolm}
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "text_completion", "created": created, "model": ref, "choices": [choice],
            "usage": usage, "kolm": kolm}


def stream_chunk(p: Parsed, rid: str, ref: str, delta: str | None, finish: str | None, *, first: bool = False,
                 kolm: dict[str, Any] | None = None, usage: dict[str, int] | None = None) -> str:
    """One server-sent event carrying a piece of the answer (or, with ``finish``, the end)."""
    created = int(time.time())
    if p.kind == "chat":
        d: dict[str, Any] = {} if delta is None else {"content": delta}
        if first:
            d["role"] = "assistant"
        body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": ref,
                                "choices": [{"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}]}
    else:
        body = {"id": rid, "object": "text_completion", "created": created, "model": ref,
                "choices": [{"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}]}
    if kolm is not None:
        body["kolm"] = kolm
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


STREAM_DONE = "data: [DONE]\n\n"


def models_body(specialists: list[Any], pins: dict[str, str]) -> dict[str, Any]:
    """``GET /v1/models``: each Specialist by name (with its versions) and each ``name@version``."""
    data = []
    by_name: dict[str, list[Any]] = {}
    for s in specialists:
        by_name.setdefault(s.name, []).append(s)
    for name, versions in sorted(by_name.items()):
        versions.sort(key=lambda s: s.version_key)
        default = pins.get(name) or versions[-1].version
        data.append({"id": name, "object": "model", "created": 0, "owned_by": "kolm",
                     "version": default, "versions": [s.version for s in versions]})
        data += [{"id": s.ref, "object": "model", "created": 0, "owned_by": "kolm", "version": s.version}
                 for s in versions]
    return {"object": "list", "data": data}
