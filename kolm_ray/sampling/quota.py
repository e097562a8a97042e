"""The teacher quota shared by every compile on a cluster.

An API key's rate limit belongs to the organization, not to one job, so calls in flight, calls
per minute and tokens per minute are admitted by one named, detached Ray actor per key
(``kolm-teacher-quota-<key digest>`` in namespace ``kolm``). A 429 seen by any compile pauses
admission for all of them until its ``retry-after`` has passed.

The decision is the pure function ``admit``; the actor only keeps the state and waits.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from dataclasses import dataclass, replace

import ray

from kolm_ray.sampling.config import QuotaConfig

NAMESPACE = "kolm"


@dataclass(frozen=True)
class QuotaState:
    in_flight: int = 0
    call_tokens: float = 0.0  # call-bucket level; refills at calls_per_minute / 60 per second
    token_tokens: float = 0.0  # token-bucket level; refills at tokens_per_minute / 60 per second
    updated_at: float = 0.0
    paused_until: float = 0.0


def refill(state: QuotaState, now: float, limits: QuotaConfig) -> QuotaState:
    dt = max(0.0, now - state.updated_at)
    return replace(
        state,
        call_tokens=min(limits.calls_per_minute, state.call_tokens + dt * limits.calls_per_minute / 60.0),
        token_tokens=min(limits.tokens_per_minute, state.token_tokens + dt * limits.tokens_per_minute / 60.0),
        updated_at=now,
    )


def admit(state: QuotaState, now: float, tokens: int, limits: QuotaConfig) -> float:
    """Seconds to wait before a call of ``tokens`` estimated tokens may start (0: now).

    ``math.inf`` means "until a call in flight finishes". ``state`` must be refilled to ``now``.
    A call larger than the whole token bucket is admitted when the bucket is full, so it is
    throttled but never starved.
    """
    if now < state.paused_until:
        return state.paused_until - now
    if state.in_flight >= limits.max_in_flight:
        return math.inf
    waits = [0.0]
    if state.call_tokens < 1.0:
        waits.append((1.0 - state.call_tokens) * 60.0 / limits.calls_per_minute)
    need = min(float(tokens), float(limits.tokens_per_minute))
    if state.token_tokens < need:
        waits.append((need - state.token_tokens) * 60.0 / limits.tokens_per_minute)
    return max(waits)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class TeacherQuota:
    """Detached actor holding one organization's teacher quota."""

    def __init__(self, limits: QuotaConfig):
        self._limits = limits
        now = time.monotonic()
        self._state = QuotaState(
            call_tokens=limits.calls_per_minute, token_tokens=limits.tokens_per_minute, updated_at=now
        )
        self._cond = asyncio.Condition()
        self._stats = {"admitted": 0, "waited": 0, "rate_limited": 0}

    async def configure(self, limits: QuotaConfig) -> None:
        async with self._cond:
            self._limits = limits
            self._cond.notify_all()

    async def acquire(self, tokens: int) -> None:
        async with self._cond:
            waited = False
            while True:
                now = time.monotonic()
                self._state = refill(self._state, now, self._limits)
                wait = admit(self._state, now, tokens, self._limits)
                if wait <= 0:
                    break
                waited = True
                try:
                    await asyncio.wait_for(self._cond.wait(), timeout=None if math.isinf(wait) else wait)
                except asyncio.TimeoutError:
                    pass
            need = min(float(tokens), float(self._limits.tokens_per_minute))
            self._state = replace(
                self._state,
                in_flight=self._state.in_flight + 1,
                call_tokens=self._state.call_tokens - 1.0,
                token_tokens=self._state.token_tokens - need,
            )
            self._stats["admitted"] += 1
            self._stats["waited"] += waited

    async def release(self, estimated: int, actual: int, retry_after_s: float | None = None) -> None:
        """End a call: correct the token estimate and, after a 429, pause everyone."""
        async with self._cond:
            now = time.monotonic()
            paused = self._state.paused_until
            if retry_after_s is not None:
                self._stats["rate_limited"] += 1
                paused = max(paused, now + retry_after_s)
            self._state = replace(
                self._state,
                in_flight=max(0, self._state.in_flight - 1),
                token_tokens=self._state.token_tokens + min(estimated, self._limits.tokens_per_minute) - actual,
                paused_until=paused,
            )
            self._cond.notify_all()

    async def stats(self) -> dict:
        return {**self._stats, "in_flight": self._state.in_flight}


def quota_name(api_key: str | None, base_url: str | None) -> str:
    digest = hashlib.sha256(f"{api_key or ''}|{base_url or ''}".encode()).hexdigest()[:12]
    return f"kolm-teacher-quota-{digest}"


def get_quota(limits: QuotaConfig, api_key: str | None, base_url: str | None):
    """The cluster's quota actor for this key, created on first use; later callers' limits win."""
    handle = TeacherQuota.options(
        name=quota_name(api_key, base_url), namespace=NAMESPACE, lifetime="detached",
        get_if_exists=True, max_concurrency=10_000,
    ).remote(limits)
    ray.get(handle.configure.remote(limits))
    return handle
