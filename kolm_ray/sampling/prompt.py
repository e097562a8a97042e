"""The teacher's prompt: a system prompt made of the task, the verifier's learned output rules
and few-shot examples from labeled rows, marked for prompt caching so the prefix shared by
every call is billed at the cache-read rate. Must not call the teacher.
"""

from __future__ import annotations

from typing import Any, Sequence

from kolm_ray.verifier import Verifier

# An endpoint that replays recorded answers (``python -m kolm_ray.testing.messages_api --replay``)
# names its model ``recorded:<model>``, so what it answered is never reported as paid.
RECORDED_MODEL_PREFIX = "recorded:"


def system_blocks(
    task: str, verifier: Verifier | None, examples: Sequence[tuple[str, str]]
) -> list[dict[str, Any]]:
    """System content blocks; the last carries ``cache_control`` so the whole prefix is cached."""
    parts = [f"You perform this task: {task.strip()}"]
    if verifier is not None:
        parts.append("Output rules:\n" + "\n".join(f"- {r}" for r in verifier.describe_rules()))
    if examples:
        shots = "\n\n".join(f"<input>\n{i}\n</input>\n<output>\n{o}\n</output>" for i, o in examples)
        parts.append("Examples of inputs and the expected outputs:\n\n" + shots)
    parts.append("Reply with the output for the user's input only.")
    return [{"type": "text", "text": "\n\n".join(parts), "cache_control": {"type": "ephemeral"}}]


def prompt_digest(system: list[dict[str, Any]]) -> str:
    """SHA-256 of the system blocks as sent (canonical JSON): the manifest's record of the prompt."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(system, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def message_params(
    *, model: str, system: list[dict[str, Any]], user_input: str, max_tokens: int, temperature: float | None
) -> dict[str, Any]:
    """The Messages API request body of one call; also the response cache's key material."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "system": system,
        "messages": [{"role": "user", "content": user_input}],
    }
    if temperature is not None:
        body["temperature"] = temperature
    return body


def sdk_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    """``messages.create`` keyword arguments for a request body.

    Current SDKs have no ``temperature`` parameter (current models sample at their own
    default); where one is configured it travels as ``extra_body``.
    """
    kwargs = {k: v for k, v in body.items() if k != "temperature"}
    if "temperature" in body:
        kwargs["extra_body"] = {"temperature": body["temperature"]}
    return kwargs


def estimate_tokens(params: dict[str, Any]) -> int:
    """Rough token count (4 characters a token) plus max_tokens, for the quota's admission."""
    chars = sum(len(b.get("text", "")) for b in params["system"]) + sum(len(m["content"]) for m in params["messages"])
    return chars // 4 + int(params["max_tokens"])
