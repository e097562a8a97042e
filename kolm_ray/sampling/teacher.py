"""The teacher: the Anthropic Messages API through the official SDK.

The SDK is configured its own way (``ANTHROPIC_API_KEY`` or ``ANTHROPIC_AUTH_TOKEN``,
``ANTHROPIC_BASE_URL``); ``sdk_env`` carries those settings to Ray workers. Its built-in
retries are off (``max_retries=0``) because the retry decision (``decide_retry``, a pure function
of the attempt and the failure) must also count each retry and tell the cluster-wide quota about
429s. Every answer goes into the response cache, scoped to the endpoint the client calls, before
it is returned.

While a call holds a quota lease, the process making it is known to the quota by a liveness
token (an object this process owns): when the process dies (a killed actor, a killed driver),
the quota frees its leases and sample claims at once rather than at their expiry.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import anthropic

from kolm_ray.errors import BudgetExceeded
from kolm_ray.sampling.cache import ResponseCache
from kolm_ray.sampling.config import QuotaConfig, TeacherConfig
from kolm_ray.sampling.pricing import Prices, Usage, cost_usd
from kolm_ray.sampling.prompt import estimate_tokens, sdk_kwargs

# "budget": refused by the quota before the call was made (a tenant's budget or --max-cost spent).
FailureKind = Literal["rate_limited", "overloaded", "server", "timeout", "connection", "malformed", "client", "budget"]
log = logging.getLogger(__name__)
RETRYABLE: frozenset[str] = frozenset({"rate_limited", "overloaded", "server", "timeout", "connection", "malformed"})
# Failures that mean the teacher itself is not answering (overloaded, erroring, unreachable), as
# opposed to our own rate limit or a bad request: the outage the summary reports.
UNAVAILABLE: frozenset[str] = frozenset({"overloaded", "server", "timeout", "connection"})


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    message: str
    retry_after_s: float | None = None


@dataclass
class SampleResult:
    """One sample's outcome. ``text`` is None when every attempt failed."""

    text: str | None
    usage: Usage = field(default_factory=Usage)
    attempts: int = 0
    cached: bool = False
    error: str | None = None
    failures: list[str] = field(default_factory=list)
    served_model: str | None = None  # the model name the answer came back with
    # When the teacher was seen unavailable for this sample (its ``UNAVAILABLE`` failures, epoch
    # seconds) and when it answered: the stage's outage report is built from these.
    unavailable_at: list[float] = field(default_factory=list)
    answered_at: float | None = None

    @property
    def retries(self) -> int:
        return max(0, self.attempts - 1)


class Teacher(Protocol):
    async def sample(self, params: dict[str, Any], key: str) -> SampleResult: ...


def decide_retry(attempt: int, failure: Failure, cfg: TeacherConfig, jitter: float = 0.0) -> float | None:
    """Seconds to wait before attempt ``attempt + 1``, or None to give up.

    ``attempt`` counts from 1. Non-retryable failures (bad request, auth) give up at once;
    ``retry-after`` is honored as the floor of the wait; otherwise exponential backoff with
    ``jitter`` (0..1) spreading the wait by up to half.
    """
    if failure.kind not in RETRYABLE or attempt >= cfg.max_attempts:
        return None
    backoff = min(cfg.backoff_max_s, cfg.backoff_base_s * (2 ** (attempt - 1)))
    backoff *= 1.0 + 0.5 * jitter
    if failure.retry_after_s is not None:
        return max(failure.retry_after_s, 0.0)
    return backoff


def classify(exc: BaseException) -> Failure:
    """Map an SDK exception to a failure kind."""
    if isinstance(exc, anthropic.APITimeoutError):
        return Failure("timeout", str(exc))
    if isinstance(exc, anthropic.APIConnectionError):
        return Failure("connection", str(exc))
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        retry_after = _retry_after(exc.response.headers)
        if status == 429:
            return Failure("rate_limited", f"429 {exc.message}", retry_after)
        if status == 529:
            return Failure("overloaded", f"529 {exc.message}", retry_after)
        if status >= 500 or status == 408:
            return Failure("server", f"{status} {exc.message}", retry_after)
        return Failure("client", f"{status} {exc.message}")
    if isinstance(exc, (anthropic.APIResponseValidationError, ValueError)):
        return Failure("malformed", f"malformed response: {exc}")
    raise exc


def _retry_after(headers: Any) -> float | None:
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return float(value) * scale
        except ValueError:
            continue
    return None


def message_text(message: Any) -> str:
    return "".join(getattr(b, "text", "") for b in message.content if getattr(b, "type", None) == "text")


def usage_of(u: Any) -> Usage:
    return Usage(
        input_tokens=u.input_tokens or 0,
        output_tokens=u.output_tokens or 0,
        cache_read_tokens=getattr(u, "cache_read_input_tokens", None) or 0,
        cache_write_tokens=getattr(u, "cache_creation_input_tokens", None) or 0,
    )


SDK_ENV_VARS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL")
# A quota lease outlives the call it covers by this much past the timeout: the SDK gives up at
# the timeout, and the release then needs a moment to reach the quota actor.
LEASE_MARGIN_S = 30.0
# A claim on a sample key (one payer per sample across the cluster) lasts this long unless its
# owner renews it (every third of it): a dead owner's sample is free again within a minute.
KEY_CLAIM_S = 60.0


def _liveness_token() -> Any | None:
    """An object owned by this process, or None outside Ray: the quota actor holds a reference
    to it, and Ray tells the holder of a reference when its owner dies."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return ray.put(f"kolm teacher {os.getpid()}")
    except Exception as e:  # noqa: BLE001 - without it, leases still expire on their own
        log.warning("no liveness token for the quota (leases will only expire): %s", e)
        return None


def sdk_env() -> dict[str, str]:
    """The SDK's own settings from this process's environment, to hand to Ray workers."""
    return {k: os.environ[k] for k in SDK_ENV_VARS if os.environ.get(k)}


class AnthropicTeacher:
    """A ``Teacher`` over ``anthropic.AsyncAnthropic``, behind the cache and the shared quota.

    With a quota, each attempt holds a lease from it (``claim``: the holder, tenant and caps it
    acquires under; without one, a holder made for this teacher) and hands it back with the
    call's outcome and its billed tokens and cost (``prices``: the teacher model's; without
    them the tenant's dollar spend is not booked).
    """

    def __init__(
        self, cfg: TeacherConfig, cache: ResponseCache, quota: Any | None = None, sdk_env: dict[str, str] | None = None,
        *, claim: QuotaConfig | None = None, prices: Prices | None = None,
    ):
        self.cfg = cfg
        self.cache = cache
        self.quota = quota
        claim = claim or QuotaConfig()
        self.claim = claim if claim.holder else claim.model_copy(update={"holder": f"teacher-{uuid.uuid4().hex[:12]}"})
        self.prices = prices
        # sdk_env carries the driver's ANTHROPIC_* settings to a Ray worker that did not inherit them.
        env = sdk_env or {}
        self.client = anthropic.AsyncAnthropic(
            max_retries=0, timeout=cfg.timeout_s,
            **({"api_key": env["ANTHROPIC_API_KEY"]} if "ANTHROPIC_API_KEY" in env else {}),
            **({"auth_token": env["ANTHROPIC_AUTH_TOKEN"]} if "ANTHROPIC_AUTH_TOKEN" in env else {}),
            **({"base_url": env["ANTHROPIC_BASE_URL"]} if "ANTHROPIC_BASE_URL" in env else {}),
        )
        # Answers are cached for the endpoint this client calls, whatever the cache was built for.
        self.cache = cache.for_endpoint(str(self.client.base_url))
        self._rng = random.Random()
        self._alive = _liveness_token() if quota is not None else None

    async def sample(self, params: dict[str, Any], key: str) -> SampleResult:
        hit = await asyncio.to_thread(self.cache.get, key)  # an object store blocks
        if hit is not None:
            return SampleResult(text=hit["text"], usage=Usage(**hit["usage"]), cached=True, served_model=hit.get("model"))
        if self.quota is None:
            return await self._paid(params, key)
        # One payer per sample across the cluster: another compile already calling for this key
        # is waited for, and its answer read from the cache. The claim is kept alive while this
        # call (its quota wait, its attempts and their backoff) lasts, and expires soon after
        # a dead owner's last renewal.
        owner = f"{self.claim.holder}/{uuid.uuid4().hex[:8]}"
        while not await self.quota.claim_key.remote(key, owner, KEY_CLAIM_S, **self._alive_kw()):
            hit = await asyncio.to_thread(self.cache.get, key)
            if hit is not None:
                return SampleResult(text=hit["text"], usage=Usage(**hit["usage"]), cached=True, served_model=hit.get("model"))
        renewer = asyncio.get_running_loop().create_task(self._keep_claim(key, owner))
        try:
            return await self._paid(params, key)
        finally:
            renewer.cancel()
            try:
                await self.quota.release_key.remote(key, owner)
            except Exception as e:  # noqa: BLE001 - the claim expires by itself; the result stands
                log.warning("could not release the claim on sample %s: %s", key[:12], e)

    def _alive_kw(self) -> dict[str, Any]:
        # In a list, so Ray hands the quota the reference itself (it watches its owner), not the value.
        return {"alive": [self._alive]} if self._alive is not None else {}

    async def _keep_claim(self, key: str, owner: str) -> None:
        while True:
            await asyncio.sleep(KEY_CLAIM_S / 3)
            try:
                await self.quota.claim_key.remote(key, owner, KEY_CLAIM_S, **self._alive_kw())
            except Exception as e:  # noqa: BLE001 - one missed renewal leaves two more before expiry
                log.warning("could not renew the claim on sample %s: %s", key[:12], e)

    async def _paid(self, params: dict[str, Any], key: str) -> SampleResult:
        result = SampleResult(text=None)
        estimated = estimate_tokens(params)
        lease_s = self.cfg.timeout_s + LEASE_MARGIN_S
        while True:
            result.attempts += 1
            grant = None
            if self.quota is not None:
                try:
                    grant = await self.quota.acquire.remote(estimated, self.claim, lease_s, **self._alive_kw())
                except BudgetExceeded as exc:  # not paid for; the stage counts and reports these
                    result.failures.append("budget")
                    result.error = f"budget: {exc}"[:500]
                    return result
            actual, outcome, retry_after_429, billed, cost = estimated, "failed", None, 0, 0.0
            try:
                message = await self.client.messages.create(**sdk_kwargs(params))
                text = message_text(message)
                usage = usage_of(message.usage)
                actual = usage.input_tokens + usage.output_tokens + usage.cache_read_tokens + usage.cache_write_tokens
                outcome, billed = "ok", actual
                cost = cost_usd(usage, self.prices) if self.prices is not None else 0.0
                await asyncio.to_thread(self.cache.put, key, {
                    "text": text, "usage": usage.model_dump(), "model": message.model,
                    "stop_reason": message.stop_reason, "at": time.time()})
                result.text, result.usage, result.served_model = text, usage, message.model
                result.answered_at = time.time()
                return result
            except Exception as exc:  # noqa: BLE001 - classify() re-raises what it does not know
                failure = classify(exc)
                result.failures.append(failure.kind)
                if failure.kind in UNAVAILABLE:
                    result.unavailable_at.append(time.time())
                if failure.kind == "rate_limited":
                    outcome, actual = "rate_limited", 0  # a rejected call spends none of the token budget
                    retry_after_429 = failure.retry_after_s or self.cfg.backoff_base_s
            finally:
                if grant is not None:
                    await self.quota.release.remote(grant.lease, estimated=estimated, actual=actual, outcome=outcome,
                                                    cost_usd=cost, billed_tokens=billed, retry_after_s=retry_after_429)
            wait = decide_retry(result.attempts, failure, self.cfg, jitter=self._rng.random())
            if wait is None:
                result.error = f"{failure.kind}: {failure.message}"[:500]
                return result
            await asyncio.sleep(wait)


def probe(model: str, timeout_s: float = 10.0) -> None:
    """Check, before anything is paid for, that the teacher answers with this environment's key:
    one request to the free token-counting endpoint (``ANTHROPIC_BASE_URL``, ``ANTHROPIC_API_KEY``).

    Raises:
        InputError: the key is refused (401/403) or the model is unknown (404).
        KolmRuntimeError: the endpoint cannot be reached.
    """
    from kolm_ray.errors import InputError, KolmRuntimeError

    where = os.environ.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com"
    client = anthropic.Anthropic(max_retries=2, timeout=timeout_s)
    try:
        client.messages.count_tokens(model=model, messages=[{"role": "user", "content": "ping"}])
    except (anthropic.AuthenticationError, anthropic.PermissionDeniedError) as e:
        raise InputError(f"the teacher at {where} refused the key ({e.status_code}): check ANTHROPIC_API_KEY") from None
    except anthropic.NotFoundError as e:
        if "model" in str(e.message).lower():  # Anthropic's own: "model: claude-..."
            raise InputError(f"the teacher at {where} does not know the model {model!r} (404): check --teacher") from None
        # A proxy without the token-counting route: reachable, and the paid calls will tell.
    except anthropic.APIConnectionError as e:
        raise KolmRuntimeError(f"cannot reach the teacher at {where} ({type(e).__name__}): check ANTHROPIC_BASE_URL "
                               "and the network; nothing was paid") from None
    except anthropic.APIStatusError:
        pass  # 429, 529, 5xx: reachable and the key accepted; the stage retries those itself
