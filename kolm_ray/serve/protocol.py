"""The OpenAI-compatible wire format: request validation and response bodies (pure functions).

A Specialist answers one input with one output, so a chat request's input is its last user
message (a client's own system message is ignored: the Specialist's task prompt is fixed at
compile time) and a completion request's input is its prompt. Every response body names the
version that served it (``model`` = ``name@version``, and a ``kolm`` object); the ingress also
sets the ``x-kolm-version`` header. Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``. Must not call models or Ray.

The request models (``ChatRequest``, ``CompletionRequest``) are also what the ingress publishes
as its OpenAPI schema (``request_schemas``), with the response models below: the schema a
client or a fuzzer reads is the one ``parse`` enforces. ``parse`` stays the only validation
path (the ingress reads the body itself, under a size limit, and never lets FastAPI parse it),
so every refusal keeps kolm's own message and OpenAI's error shape.
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
                 type_: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after  # seconds, sent as Retry-After (a 503 the client may retry)
        self.type = type_ or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               503: "overloaded_error"}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


MAX_STOP = 4  # OpenAI's own limit; each stop string is checked against every piece of a stream


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we ignore (logprobs=None, ...)
    model: str = Field(min_length=1, description="A Specialist: `name` (its newest or pinned version) or "
                       "`name@version`; GET /v1/models lists them.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens in the answer (at most the server's cap).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens; wins over it.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 or absent: greedy, as the eval decoded.")
    top_p: float | None = Field(None, gt=0, le=1)
    # Only one choice: the schema says so (const), the validator below says it in kolm's words.
    n: int = Field(1, json_schema_extra={"const": 1})
    stream: bool = False
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP} stop strings.",
                                         json_schema_extra={"maxItems": MAX_STOP})
    user: str | None = Field(None, description="Also the routing key of a canary split (sticky per user).")

    @field_validator("max_tokens", "max_completion_tokens", "n", mode="before")
    @classmethod
    def _whole(cls, v: Any) -> Any:
        """8.0 is an integer to JSON Schema (and to the schema published): so it is here too."""
        return int(v) if isinstance(v, float) and v.is_integer() else v

    @field_validator("n")
    @classmethod
    def _one(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v


class ContentPart(BaseModel):
    """One part of a message's content; the text parts are the input, others are ignored."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None  # typed: a part whose text is not a string is a 400, not a crash


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatRequest(_Common):
    """POST /v1/chat/completions. The input is the last user message (system messages are
    ignored: the Specialist's task prompt is fixed at compile time)."""

    messages: list[ChatMessage] = Field(min_length=1, json_schema_extra={
        "contains": {"type": "object", "properties": {"role": {"const": "user"}}, "required": ["role"]}})


class CompletionRequest(_Common):
    """POST /v1/completions. The input is the prompt: one string."""

    prompt: str | list[str] = Field(json_schema_extra={"minItems": 1, "maxItems": 1})


# ----- responses, for the published schema (the bodies themselves are built by the functions below)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every refusal: OpenAI's error shape."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class KolmBlock(BaseModel):
    """The version that answered (also the ``x-kolm-version`` header) and the route that chose it."""

    specialist: str
    version: str
    artifact_sha256: str
    route: Literal["pinned", "canary", "stable", "latest"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None


class ChatCompletion(BaseModel):
    """The answer to POST /v1/chat/completions (with ``stream``: server-sent events of
    ``chat.completion.chunk`` objects, then ``data: [DONE]``)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str = Field(description="name@version that answered")
    choices: list[ChatChoice]
    usage: Usage
    kolm: KolmBlock


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None


class TextCompletion(BaseModel):
    """The answer to POST /v1/completions (with ``stream``: server-sent events, then ``data: [DONE]``)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str = Field(description="name@version that answered")
    choices: list[CompletionChoice]
    usage: Usage
    kolm: KolmBlock


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None  # on the first chunk
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None
    logprobs: None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion; the last carries ``usage``."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    kolm: KolmBlock | None = None
    usage: Usage | None = None


class TextChunkChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None


class TextCompletionChunk(BaseModel):
    """One server-sent event of a streamed completion; the last carries ``usage``."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChunkChoice]
    kolm: KolmBlock | None = None
    usage: Usage | None = None


def stream_event_schema(chunk_ref: str, error_ref: str) -> dict[str, Any]:
    """One server-sent event of a stream (what OpenAPI 3.2 calls the ``itemSchema`` of
    text/event-stream): its ``data`` is a JSON chunk, an error (the model replica failed after
    the 200 went out) or the closing ``[DONE]``."""
    return {"type": "object", "required": ["data"], "properties": {"data": {"type": "string", "anyOf": [
        {"const": "[DONE]"},
        {"contentMediaType": "application/json",
         "contentSchema": {"anyOf": [{"$ref": chunk_ref}, {"$ref": error_ref}]}}]}}}


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    version: str
    versions: list[str] | None = Field(None, description="On a bare name's entry: every version served.")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelEntry]


class Health(BaseModel):
    """GET /healthz: liveness and readiness only (200 ok, 503 nothing to serve)."""

    status: Literal["ok", "unavailable"]


class HealthDetails(Health):
    """GET /healthz/details (the API's own auth): what is served, routed and refused."""

    specialists: list[str]
    routes: dict[str, dict[str, Any]]
    refused: list[dict[str, str]]


def request_schemas(ref_template: str = "#/components/schemas/{model}", *, max_tokens_cap: int | None = None,
                    max_input_chars: int | None = None) -> dict[str, Any]:
    """The request models' JSON Schemas (and the models they use), by name: for the OpenAPI
    document's ``components.schemas``, the ingress's request bodies referring to them. With a
    server's limits, the schema states them too (``maximum`` tokens; a prompt's ``maxLength``)."""
    from pydantic.json_schema import models_json_schema

    _, defs = models_json_schema([(ChatRequest, "validation"), (CompletionRequest, "validation")],
                                 ref_template=ref_template)
    schemas = defs["$defs"]
    for name in ("ChatRequest", "CompletionRequest"):
        props = schemas[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens"):
            if max_tokens_cap is not None:
                next(a for a in props[field]["anyOf"] if a.get("type") == "integer")["maximum"] = max_tokens_cap
    for alt in schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]:
        text = alt["items"] if alt["type"] == "array" else alt
        text["pattern"] = r"\S"  # holds text: ``parse`` says "the input is empty" (kolm's words, not a pattern's)
        if max_input_chars is not None:
            text["maxLength"] = max_input_chars
    return schemas


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


def parse(kind: Literal["chat", "completion"], raw: bytes, max_input_chars: int,
          max_tokens_cap: int | None = None) -> Parsed:
    """Validate a request body: what ``request_schemas`` publishes, and what no JSON Schema can
    say (the last user message is the input and must hold text; the server's limits).

    Raises:
        RequestError: 400 naming the offending field.
    """
    try:
        body = json.loads(raw or b"")
    except (ValueError, RecursionError) as e:
        # ValueError: bad JSON or bytes (JSONDecodeError, UnicodeDecodeError), and an integer
        # literal past Python's 4300-digit conversion limit; RecursionError: nesting too deep.
        why = "it is nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise RequestError(400, f"request body is not valid JSON: {why}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    model_cls = ChatRequest if kind == "chat" else CompletionRequest
    try:
        # Strict: a JSON type is what the schema says it is (false is not a temperature, "8" not a
        # max_tokens), as OpenAI's API has it; lax mode would coerce them.
        req = model_cls.model_validate(body, strict=True)
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
    for field in ("max_tokens", "max_completion_tokens"):  # both, as the published schema caps both
        asked = getattr(req, field)
        if max_tokens_cap is not None and asked is not None and asked > max_tokens_cap:
            raise RequestError(400, f"{field} is {asked}; at most {max_tokens_cap} are allowed", param=field)
    stop = () if req.stop is None else ((req.stop,) if isinstance(req.stop, str) else tuple(req.stop))
    if len(stop) > MAX_STOP:
        raise RequestError(400, f"stop takes at most {MAX_STOP} strings, not {len(stop)}", param="stop")
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
