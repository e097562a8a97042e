"""The teacher quota shared by every compile on a cluster.

An API key's rate limit belongs to the organization, not to one job, so calls in flight, calls
per minute and tokens per minute are admitted by one named, detached Ray actor per key
(``kolm-teacher-quota-v3-<key digest>`` in namespace ``kolm``), under the limits the operator
stated (``sampling/limits.py``; defaults where none are stated). A compile never changes them:
its own caps (``QuotaConfig``) narrow only its own share, min(org, cap). The actor of the
previous version (``kolm-teacher-quota-v2-<key digest>``), if one still runs, is retired by the
first client of the v3 one, which takes its ledger over: two would each admit the whole limit.

* **Leases.** ``acquire`` grants a lease that expires after the teacher's timeout plus a margin;
  ``release(lease)`` ends it. A caller may name its process by a liveness token (``alive``: an
  object reference its process owns): when that process dies (a killed actor, a killed driver)
  the actor sees the owner gone within seconds and ends its leases and sample claims at once,
  so a killed compile's slots come back before the next run starts. Without a token (or after
  the actor's own restart, which loses the references) a lease ends at its expiry;
  ``release_holder`` ends a cancelled compile's at once. No count is kept forever.
* **AIMD.** A 429 halves the effective in-flight limit (not below 1; once per burst: 429s of
  calls admitted before the cut do not cut again) and pauses admission for its ``retry-after``;
  every window of successes (as many as the limit) adds one, up to the organization's limit.
  Only a success that ends a call admitted under the current limit, while that limit was in use
  (as many in flight as it allows), counts: a limit the callers do not fill has shown nothing
  about the server (TCP's congestion window validation, RFC 7661), so a run's tail or a quiet
  hour does not raise it past what was tried. Under the real limit the limiter converges instead of hammering it.
* **Budgets.** Each release carries the call's billed tokens and dollars; a tenant whose budget
  is spent, or a compile past its ``max_cost_usd``, is refused at ``acquire`` (``BudgetExceeded``).

Every decision is a pure function (``admit``, ``holder_limits``, ``aimd_success``,
``aimd_rate_limited``) or a method of ``QuotaBook`` that takes ``now`` and never waits or
touches a file, so tests drive it tick by tick. The actor keeps a ``QuotaBook``, waits, reloads
the operator's file when it changes, and keeps the book's durable part (tenants' spend; on a
restart, also leases and the learned limit) in the state dir.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import ray

from kolm_ray.durable import write_atomic
from kolm_ray.errors import BudgetExceeded
from kolm_ray.sampling.config import QuotaConfig
from kolm_ray.sampling.limits import (
    NAMESPACE, QUOTA_PREFIX, RETIRED_QUOTA_PREFIX, RateLimits, ResolvedLimits, Spend, TenantBudget, key_digest,
    limits_path, load_limits, quota_name, quota_state_path, retired_quota_state_path, spend_of,
)

log = logging.getLogger("kolm_ray.sampling.quota")

QUOTA_STATE_FORMAT_VERSION = 1
# A caller that states no lease time: TeacherConfig.timeout_s's default (120 s) plus the
# teacher's margin (teacher.LEASE_MARGIN_S, 30 s); AnthropicTeacher states its own.
DEFAULT_LEASE_S = 150.0
HOLDER_IDLE_S = 3600.0  # a holder with nothing in flight for this long is forgotten
RECENT_EXPIRED = 4096  # expired leases remembered so a late release still books its spend
PERSIST_EVERY_S = 0.5  # the durable state is written at most this often (and at once when asked)
RELOAD_EVERY_S = 1.0  # how often the actor looks for a changed limits file
OWNER_CHECK_S = 1.0  # how often the actor asks whether the processes holding leases are alive
ANONYMOUS = "anonymous"

Outcome = Literal["ok", "rate_limited", "failed"]


@dataclass(frozen=True)
class QuotaState:
    in_flight: int = 0
    call_tokens: float = 0.0  # call-bucket level; refills at calls_per_minute / 60 per second
    token_tokens: float = 0.0  # token-bucket level; refills at tokens_per_minute / 60 per second
    updated_at: float = 0.0
    paused_until: float = 0.0


def full(limits: RateLimits, now: float) -> QuotaState:
    return QuotaState(call_tokens=limits.calls_per_minute, token_tokens=limits.tokens_per_minute, updated_at=now)


def refill(state: QuotaState, now: float, limits: RateLimits) -> QuotaState:
    dt = max(0.0, now - state.updated_at)
    return replace(
        state,
        call_tokens=min(limits.calls_per_minute, state.call_tokens + dt * limits.calls_per_minute / 60.0),
        token_tokens=min(limits.tokens_per_minute, state.token_tokens + dt * limits.tokens_per_minute / 60.0),
        updated_at=now,
    )


def admit(state: QuotaState, now: float, tokens: int, limits: RateLimits) -> float:
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


def holder_limits(org: RateLimits, caps: QuotaConfig | None) -> RateLimits:
    """One holder's limits: the organization's, narrowed by the holder's own caps (never widened)."""
    if caps is None:
        return org
    pick = {name: min(getattr(org, name), cap) for name in ("max_in_flight", "calls_per_minute", "tokens_per_minute")
            if (cap := getattr(caps, name)) is not None}
    return org.model_copy(update=pick) if pick else org


@dataclass(frozen=True)
class Aimd:
    """The limiter's learned in-flight limit. ``epoch`` counts the cuts: a call admitted in an
    earlier epoch was sent before the last cut, so its 429 does not cut again."""

    limit: float
    epoch: int = 0
    successes: int = 0


def aimd_success(a: Aimd, ceiling: int, in_flight: int) -> Aimd:
    """One call succeeded with ``in_flight`` calls out (itself included): after a window of
    successes (as many as the limit) the limit grows by one, never above ``ceiling`` (the
    organization's limit). A success while fewer than the limit were out does not count: the
    limit was not in use, so the server's answer says nothing about one higher."""
    if in_flight < int(a.limit):
        return a
    successes = a.successes + 1
    if successes >= max(1, int(a.limit)):
        return replace(a, limit=float(min(ceiling, int(a.limit) + 1)), successes=0)
    return replace(a, successes=successes)


def aimd_rate_limited(a: Aimd, lease_epoch: int) -> Aimd:
    """A call admitted in ``lease_epoch`` got a 429: halve the limit (not below 1) and start a
    new epoch, unless the call predates the last cut (one cut per burst)."""
    if lease_epoch < a.epoch:
        return a
    return Aimd(limit=float(max(1, int(a.limit) // 2)), epoch=a.epoch + 1, successes=0)


def effective_limits(org: RateLimits, aimd: Aimd) -> RateLimits:
    return org.model_copy(update={"max_in_flight": max(1, min(org.max_in_flight, int(aimd.limit)))})


@dataclass(frozen=True)
class Grant:
    """What ``acquire`` returns: the lease to release, and when it expires if not released."""

    lease: str
    expires_at: float


@dataclass(frozen=True)
class Lease:
    id: str
    holder: str
    tenant: str | None
    tokens: int
    epoch: int
    granted_at: float
    expires_at: float
    owner: str | None = None  # the liveness token of the process making the call (None: unknown)


@dataclass
class _Holder:
    caps: QuotaConfig
    limits: RateLimits
    state: QuotaState
    spend: Spend = field(default_factory=Spend)
    admitted: int = 0
    rate_limited: int = 0
    max_in_flight_seen: int = 0
    last_seen: float = 0.0


class QuotaBook:
    """The shared quota's books: leases, the organization's and each holder's buckets, the AIMD
    limit and the tenants' spend. Every method takes ``now``; none waits or touches a file."""

    def __init__(self, limits: ResolvedLimits, now: float):
        self.limits = limits
        self.aimd = Aimd(limit=float(limits.org.max_in_flight))
        self.state = full(limits.org, now)
        self.leases: dict[str, Lease] = {}
        self.holders: dict[str, _Holder] = {}
        self.spend: dict[str, Spend] = {}
        # The retired (v2) actor's ledger as last taken over: its later spend is what it adds.
        self.taken_over: dict[str, Spend] = {}
        self.counts: Counter = Counter({k: 0 for k in ("admitted", "waited", "rate_limited", "expired_leases",
                                                       "late_releases", "refused_budget", "dead_owner_leases")})
        self.max_in_flight_seen = 0
        self._expired: OrderedDict[str, Lease] = OrderedDict()

    # ----- limits ---------------------------------------------------------------------------
    def effective(self) -> RateLimits:
        return effective_limits(self.limits.org, self.aimd)

    def set_limits(self, limits: ResolvedLimits, now: float) -> None:
        """The operator's limits changed: a new org in-flight limit restarts the learned one
        there (the operator knows the real limit better than the last 429 did)."""
        if limits.org != self.limits.org:
            self.aimd = Aimd(limit=float(limits.org.max_in_flight), epoch=self.aimd.epoch + 1)
        self.limits = limits
        for h in self.holders.values():
            h.limits = holder_limits(limits.org, h.caps)

    # ----- leases ---------------------------------------------------------------------------
    def next_expiry(self) -> float | None:
        return min((lease.expires_at for lease in self.leases.values()), default=None)

    def _end(self, lease: Lease, estimated: int = 0, actual: int = 0) -> None:
        """Take a lease's slot back from the organization and its holder."""
        tpm = self.limits.org.tokens_per_minute
        self.state = replace(self.state, in_flight=max(0, self.state.in_flight - 1),
                             token_tokens=self.state.token_tokens + min(estimated, tpm) - actual)
        h = self.holders.get(lease.holder)
        if h is not None:
            htpm = h.limits.tokens_per_minute
            h.state = replace(h.state, in_flight=max(0, h.state.in_flight - 1),
                              token_tokens=h.state.token_tokens + min(estimated, htpm) - actual)

    def reclaim(self, now: float) -> int:
        """End every lease past its expiry (its holder died or hangs); forget idle holders."""
        expired = [lease for lease in self.leases.values() if lease.expires_at <= now]
        for lease in expired:
            del self.leases[lease.id]
            self._end(lease)
            self._expired[lease.id] = lease
            while len(self._expired) > RECENT_EXPIRED:
                self._expired.popitem(last=False)
        self.counts["expired_leases"] += len(expired)
        for name in [n for n, h in self.holders.items()
                     if h.state.in_flight == 0 and h.last_seen < now - HOLDER_IDLE_S]:
            del self.holders[name]
        return len(expired)

    def _holder(self, claim: QuotaConfig, now: float) -> _Holder:
        name = claim.holder or ANONYMOUS
        h = self.holders.get(name)
        if h is None:
            limits = holder_limits(self.limits.org, claim)
            h = self.holders[name] = _Holder(caps=claim, limits=limits, state=full(limits, now))
        elif h.caps != claim:  # the latest claim of a holder sets its caps
            h.caps, h.limits = claim, holder_limits(self.limits.org, claim)
        h.last_seen = now
        return h

    def _check_budget(self, claim: QuotaConfig, h: _Holder) -> None:
        if claim.tenant is not None:
            budget = self.limits.tenants.get(claim.tenant)
            spent = self.spend.get(claim.tenant, Spend())
            if budget is not None and ((budget.usd is not None and spent.usd >= budget.usd)
                                       or (budget.tokens is not None and spent.tokens >= budget.tokens)):
                self.counts["refused_budget"] += 1
                raise BudgetExceeded(
                    f"tenant {claim.tenant!r} has spent its teacher budget (${spent.usd:.4f} of "
                    f"{'$%.4f' % budget.usd if budget.usd is not None else 'no dollar limit'}, {spent.tokens:,} of "
                    f"{'%s tokens' % format(budget.tokens, ',') if budget.tokens is not None else 'no token limit'})")
        if claim.max_cost_usd is not None and h.spend.usd >= claim.max_cost_usd:
            self.counts["refused_budget"] += 1
            raise BudgetExceeded(f"{claim.holder or ANONYMOUS} has spent ${h.spend.usd:.4f}, its --max-cost "
                                 f"${claim.max_cost_usd:.4f}")

    def try_acquire(self, now: float, tokens: int, claim: QuotaConfig | None = None,
                    lease_s: float = DEFAULT_LEASE_S, owner: str | None = None) -> Grant | float:
        """A lease for a call of ``tokens`` estimated tokens, or the seconds to wait before
        asking again (at most until the next lease expires). ``owner``: the liveness token of
        the calling process (``release_owner`` ends its leases when it dies).

        Raises:
            BudgetExceeded: the claim's tenant has spent its budget, or its holder its max cost.
        """
        claim = claim or QuotaConfig()
        self.reclaim(now)
        h = self._holder(claim, now)
        self._check_budget(claim, h)
        org = self.effective()
        self.state = refill(self.state, now, org)
        h.state = refill(h.state, now, h.limits)
        wait = max(admit(self.state, now, tokens, org), admit(h.state, now, tokens, h.limits))
        if wait > 0:
            nxt = self.next_expiry()
            return wait if nxt is None else min(wait, max(0.0, nxt - now))
        lease = Lease(id=uuid.uuid4().hex, holder=claim.holder or ANONYMOUS, tenant=claim.tenant, tokens=tokens,
                      epoch=self.aimd.epoch, granted_at=now, expires_at=now + lease_s, owner=owner)
        self.leases[lease.id] = lease
        self.state = replace(self.state, in_flight=self.state.in_flight + 1, call_tokens=self.state.call_tokens - 1.0,
                             token_tokens=self.state.token_tokens - min(float(tokens), float(org.tokens_per_minute)))
        h.state = replace(h.state, in_flight=h.state.in_flight + 1, call_tokens=h.state.call_tokens - 1.0,
                          token_tokens=h.state.token_tokens - min(float(tokens), float(h.limits.tokens_per_minute)))
        h.admitted += 1
        h.max_in_flight_seen = max(h.max_in_flight_seen, h.state.in_flight)
        self.counts["admitted"] += 1
        self.max_in_flight_seen = max(self.max_in_flight_seen, self.state.in_flight)
        return Grant(lease.id, lease.expires_at)

    def release(self, now: float, lease_id: str, *, estimated: int, actual: int, outcome: Outcome = "ok",
                cost_usd: float = 0.0, billed_tokens: int = 0, retry_after_s: float | None = None) -> bool:
        """End a call: free its slot, correct the token estimate, book its spend, and adapt.

        A 429 (``outcome="rate_limited"``) pauses admission for ``retry_after_s`` and cuts the
        limit; a success counts towards the next step up when its call was admitted under the
        current limit (its epoch) and the limit was in use (``aimd_success``). A lease that
        already expired is not freed twice, but its spend and outcome still count. False when the lease was not live.
        """
        lease = self.leases.pop(lease_id, None)
        live = lease is not None
        in_flight = self.state.in_flight  # this call's included while its lease is live
        if lease is None:
            self.counts["late_releases"] += 1
            lease = self._expired.pop(lease_id, None)
            if lease is None:  # unknown (granted before a restart that lost it): nothing to book
                return False
        else:
            self._end(lease, estimated, actual)
        h = self.holders.get(lease.holder)
        if billed_tokens or cost_usd:
            spent = Spend(usd=cost_usd, tokens=billed_tokens, calls=1)
            if lease.tenant is not None:
                self.spend[lease.tenant] = self.spend.get(lease.tenant, Spend()) + spent
            if h is not None:
                h.spend = h.spend + spent
        if outcome == "rate_limited":
            self.counts["rate_limited"] += 1
            if h is not None:
                h.rate_limited += 1
            self.aimd = aimd_rate_limited(self.aimd, lease.epoch)
            self.state = replace(self.state, paused_until=max(self.state.paused_until, now + (retry_after_s or 0.0)))
        elif outcome == "ok":
            # Only a call admitted under the current limit tells about it: one sent before the
            # last cut (its epoch) says nothing about the limit that replaced it.
            in_use = in_flight if live and lease.epoch == self.aimd.epoch else 0
            self.aimd = aimd_success(self.aimd, self.limits.org.max_in_flight, in_use)
        return live

    def release_holder(self, now: float, holder: str) -> int:
        """End every lease of ``holder`` (a finished or cancelled compile) and forget it."""
        mine = [lease for lease in self.leases.values() if lease.holder == holder]
        for lease in mine:
            del self.leases[lease.id]
            self._end(lease)
        self.holders.pop(holder, None)
        return len(mine)

    def release_owner(self, now: float, owner: str) -> int:
        """End every lease of the process known by the liveness token ``owner``: it died
        mid-call, and its calls will never be released. Its holder's other leases (its other
        processes) stand."""
        mine = [lease for lease in self.leases.values() if lease.owner == owner]
        for lease in mine:
            del self.leases[lease.id]
            self._end(lease)
        self.counts["dead_owner_leases"] += len(mine)
        return len(mine)

    def owners(self) -> set[str]:
        return {lease.owner for lease in self.leases.values() if lease.owner is not None}

    def take_over(self, retired: dict[str, Spend]) -> bool:
        """Add to the tenants' spend what the retired actor's ledger ``retired`` booked since it
        was last taken over (all of it the first time); False when nothing was new. A ledger
        smaller than the one taken over was started again: all of it is new."""
        changed = False
        for tenant, now_spent in retired.items():
            before = self.taken_over.get(tenant, Spend())
            grew = now_spent.usd >= before.usd and now_spent.tokens >= before.tokens and now_spent.calls >= before.calls
            new = (Spend(usd=now_spent.usd - before.usd, tokens=now_spent.tokens - before.tokens,
                         calls=now_spent.calls - before.calls) if grew else now_spent)
            if new != Spend():
                self.spend[tenant] = self.spend.get(tenant, Spend()) + new
                changed = True
        self.taken_over = dict(retired)
        return changed

    # ----- views ----------------------------------------------------------------------------
    def tenant_view(self, tenant: str | None) -> tuple[TenantBudget | None, Spend]:
        if tenant is None:
            return None, Spend()
        return self.limits.tenants.get(tenant), self.spend.get(tenant, Spend())

    def stats(self, holder: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.counts, "in_flight": self.state.in_flight, "max_in_flight_seen": self.max_in_flight_seen,
            "effective_limit": self.effective().max_in_flight, "org": self.limits.org.model_dump(),
            "org_stated": self.limits.stated, "leases": len(self.leases), "holders": len(self.holders),
        }
        h = self.holders.get(holder) if holder is not None else None
        if h is not None:
            out["holder"] = {"name": holder, "in_flight": h.state.in_flight, "admitted": h.admitted,
                             "rate_limited": h.rate_limited, "max_in_flight_seen": h.max_in_flight_seen,
                             "limits": h.limits.model_dump(), "spend": h.spend.model_dump()}
        return out

    # ----- durable state --------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {
            "format_version": QUOTA_STATE_FORMAT_VERSION,
            "spend": {t: s.model_dump() for t, s in self.spend.items()},
            "taken_over": {t: s.model_dump() for t, s in self.taken_over.items()},
            "leases": [asdict(lease) for lease in self.leases.values()],
            "holders": {n: {"caps": h.caps.model_dump(), "spend": h.spend.model_dump()} for n, h in self.holders.items()},
            "aimd": asdict(self.aimd),
            "paused_until": self.state.paused_until,
            "counts": dict(self.counts),
            "max_in_flight_seen": self.max_in_flight_seen,
        }

    def restore(self, snap: dict[str, Any], now: float, *, restarted: bool) -> None:
        """Take back a snapshot. The tenants' spend always (it is the ledger); on a restart of
        the same actor also its leases, holders, learned limit and pause, since the calls it
        admitted are still running. A fresh actor starts from the operator's limits.

        Records another version wrote are taken as far as they go: fields this one does not
        know are left out, missing ones take their defaults."""
        self.spend = {t: spend_of(s) for t, s in snap.get("spend", {}).items()}
        self.taken_over = {t: spend_of(s) for t, s in snap.get("taken_over", {}).items()}
        if not restarted:
            return
        for h in snap.get("holders", {}).values():
            claim = QuotaConfig.model_validate({k: v for k, v in h["caps"].items() if k in QuotaConfig.model_fields})
            self._holder(claim, now).spend = spend_of(h.get("spend", {}))
        for raw in snap.get("leases", []):
            lease = Lease(**_known(Lease, raw))
            self.leases[lease.id] = lease
            self.state = replace(self.state, in_flight=self.state.in_flight + 1)
            h = self.holders.get(lease.holder) or self._holder(QuotaConfig(holder=lease.holder), now)
            h.state = replace(h.state, in_flight=h.state.in_flight + 1)
        aimd = Aimd(**_known(Aimd, snap["aimd"])) if "aimd" in snap else self.aimd
        self.aimd = replace(aimd, limit=min(aimd.limit, float(self.limits.org.max_in_flight)))
        self.state = replace(self.state, paused_until=float(snap.get("paused_until", 0.0)))
        self.counts.update({k: v for k, v in snap.get("counts", {}).items() if k in self.counts})
        self.max_in_flight_seen = int(snap.get("max_in_flight_seen", 0))


def _known(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    """The fields of dataclass ``cls`` in ``raw``, the rest left out."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


class _TeacherQuota:
    """Detached actor holding one organization's teacher quota (one per key and endpoint);
    ``TeacherQuota`` is it as a Ray actor.

    Its constructor arguments are the key's digest and the paths of the operator's limits file,
    of its own durable state and of the retired (v2) actor's, whose ledger it takes over: Ray
    restarts it with the same ones.
    """

    def __init__(self, digest: str, limits_file: str, state_file: str, retired_state_file: str | None = None):
        self._digest, self._limits_file, self._state_file = digest, Path(limits_file), Path(state_file)
        self._retired_state_file = Path(retired_state_file) if retired_state_file else None
        self._limits_error: str | None = None
        self._limits_mtime = self._mtime()
        now = time.time()
        self._book = QuotaBook(self._read_limits(ResolvedLimits()), now)
        try:
            snap = json.loads(self._state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            snap = None
        if snap is not None:
            self._book.restore(snap, now, restarted=ray.get_runtime_context().was_current_actor_reconstructed)
        self._cond = asyncio.Condition()
        self._dirty = self._take_over_retired()
        self._persist_errors = 0
        self._housekeeper: asyncio.Task | None = None
        # Housekeeping steps that raised, by step (each logged; the loop goes on).
        self._housekeeping_errors: Counter = Counter()
        # Sample keys being paid for right now, and by whom (owner, expiry, liveness token): two
        # compiles of one task ask for the same samples, and only one of them may pay for each.
        self._calling: dict[str, tuple[str, float, str | None]] = {}
        self._keys = {"claimed": 0, "deduplicated": 0, "freed_dead_owner": 0, "freed_holder": 0}
        # Liveness tokens of the processes holding leases or claims: their hex -> the reference.
        self._alive: dict[str, Any] = {}

    # ----- the operator's limits and the durable state --------------------------------------
    def _mtime(self) -> int | None:
        try:
            return self._limits_file.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def _read_limits(self, last_good: ResolvedLimits) -> ResolvedLimits:
        """The operator's limits for this key; a broken file keeps ``last_good`` (and says so in
        stats and the log) rather than stopping every compile."""
        try:
            limits = load_limits(self._limits_file).for_key(self._digest)
            self._limits_error = None
            return limits
        except Exception as e:  # noqa: BLE001 - reported in stats, never silently dropped
            self._limits_error = str(e)
            log.warning("teacher limits file unreadable, keeping the last good limits: %s", e)
            return last_good

    def _reload(self) -> None:
        self._limits_mtime = self._mtime()
        self._book.set_limits(self._read_limits(self._book.limits), time.time())
        self._cond.notify_all()

    def _persist(self) -> None:
        self._dirty = False
        try:
            write_atomic(self._state_file, json.dumps(self._book.snapshot()), fsync=False)
        except OSError as e:
            self._persist_errors += 1
            self._dirty = True
            log.warning("could not write the teacher quota state to %s: %s", self._state_file, e)

    def _take_over_retired(self) -> bool:
        """Add what the retired actor booked since last time to the ledger (see
        ``QuotaBook.take_over``); True when that changed it. A file it cannot read is logged and
        taken over at the next try."""
        if self._retired_state_file is None:
            return False
        try:
            snap = json.loads(self._retired_state_file.read_text(encoding="utf-8"))
            retired = {t: spend_of(v) for t, v in snap.get("spend", {}).items()}
        except FileNotFoundError:
            return False
        except (OSError, ValueError, AttributeError, TypeError) as e:
            log.warning("could not read the retired teacher quota's ledger %s: %s", self._retired_state_file, e)
            return False
        return self._book.take_over(retired)

    async def _housekeeping(self) -> None:
        """Every ``PERSIST_EVERY_S``: free dead callers' slots, reclaim expired leases, reload a
        changed limits file, persist. A step that raises is logged and counted (``stats``'
        ``housekeeping_errors``) and the loop goes on: ending it would end persisting,
        reloading and reclaiming for the actor's whole life."""
        next_reload = next_owner_check = 0.0
        while True:
            await asyncio.sleep(PERSIST_EVERY_S)
            if time.monotonic() >= next_owner_check:
                next_owner_check = time.monotonic() + OWNER_CHECK_S
                try:
                    await self._free_dead_owners()
                except Exception as e:  # noqa: BLE001 - counted, logged, and tried again next tick
                    self._housekeeping_failed("free_dead_owners", e)
            async with self._cond:
                try:
                    if self._book.reclaim(time.time()):  # expired leases: free them now, not at the next acquire
                        self._dirty = True
                        self._cond.notify_all()
                except Exception as e:  # noqa: BLE001
                    self._housekeeping_failed("reclaim", e)
                try:
                    if time.monotonic() >= next_reload:
                        next_reload = time.monotonic() + RELOAD_EVERY_S
                        if self._mtime() != self._limits_mtime:
                            self._reload()
                except Exception as e:  # noqa: BLE001
                    self._housekeeping_failed("reload", e)
                try:
                    if self._dirty:
                        self._persist()
                except Exception as e:  # noqa: BLE001 - OSError is _persist's own; this is anything else
                    self._dirty = True
                    self._housekeeping_failed("persist", e)

    def _housekeeping_failed(self, step: str, e: Exception) -> None:
        self._housekeeping_errors[step] += 1
        log.error("teacher quota housekeeping: %s failed (%d so far), carrying on: %r", step,
                  self._housekeeping_errors[step], e, exc_info=e)

    def _watch(self, alive: list | None) -> str | None:
        """The hex of a caller's liveness token, kept to be checked (None: the caller sent none)."""
        if not alive:
            return None
        ref = alive[0]
        token = ref.hex()
        self._alive.setdefault(token, ref)
        return token

    async def _free_dead_owners(self) -> None:
        """End the leases and sample claims of every process that died holding them; forget the
        tokens nothing holds any more."""
        in_use = self._book.owners() | {c[2] for c in self._calling.values() if c[2] is not None}
        for token in [t for t in self._alive if t not in in_use]:
            del self._alive[token]
        if not self._alive:
            return
        tokens = list(self._alive)
        dead = await asyncio.gather(*(asyncio.to_thread(_owner_died, self._alive[t]) for t in tokens))
        gone = [t for t, d in zip(tokens, dead) if d]
        if not gone:
            return
        async with self._cond:
            now = time.time()
            for token in gone:
                n = self._book.release_owner(now, token)
                keys = [k for k, c in self._calling.items() if c[2] == token]
                for k in keys:
                    del self._calling[k]
                self._keys["freed_dead_owner"] += len(keys)
                self._alive.pop(token, None)
                log.warning("a teacher process died holding %d leases and %d sample claims: freed", n, len(keys))
            self._dirty = True
            self._cond.notify_all()

    def _start(self) -> None:
        if self._housekeeper is None:  # on the actor's event loop, at its first call
            self._housekeeper = asyncio.get_running_loop().create_task(self._housekeeping())

    # ----- the API --------------------------------------------------------------------------
    async def acquire(self, tokens: int, claim: QuotaConfig | None = None, lease_s: float = DEFAULT_LEASE_S,
                      alive: list | None = None) -> Grant:
        """Wait for room and grant a lease. ``alive``: ``[ref]``, an object the calling process
        owns (its lease ends when that process dies). Raises BudgetExceeded (see
        ``QuotaBook.try_acquire``)."""
        self._start()
        owner = self._watch(alive)
        async with self._cond:
            waited = False
            while True:
                got = self._book.try_acquire(time.time(), tokens, claim, lease_s, owner)
                if isinstance(got, Grant):
                    break
                waited = True
                try:
                    await asyncio.wait_for(self._cond.wait(), timeout=None if math.isinf(got) else got)
                except asyncio.TimeoutError:
                    pass
            self._book.counts["waited"] += waited
            self._watch(alive)  # again: a token unused while this call waited may have been forgotten
            self._dirty = True
            return got

    async def release(self, lease: str, *, estimated: int, actual: int, outcome: Outcome = "ok",
                      cost_usd: float = 0.0, billed_tokens: int = 0, retry_after_s: float | None = None) -> bool:
        self._start()
        async with self._cond:
            live = self._book.release(time.time(), lease, estimated=estimated, actual=actual, outcome=outcome,
                                      cost_usd=cost_usd, billed_tokens=billed_tokens, retry_after_s=retry_after_s)
            self._dirty = True
            self._cond.notify_all()
            return live

    async def claim_key(self, key: str, owner: str, ttl_s: float, alive: list | None = None) -> bool:
        """True: ``owner`` may pay for sample ``key`` (claimed, or its claim renewed, until
        ``ttl_s`` from now). False once another owner's call for it has ended: the answer is in
        the response cache (or that call failed: claim again). A claim whose owner died ends
        when its process is seen dead (``alive``, as for ``acquire``), else at its expiry."""
        self._start()
        async with self._cond:
            waited = False
            while True:
                now = time.time()
                held = self._calling.get(key)
                if held is None or held[0] == owner or held[1] <= now:
                    if waited:
                        self._keys["deduplicated"] += 1
                        return False
                    self._calling[key] = (owner, now + ttl_s, self._watch(alive))
                    self._keys["claimed"] += held is None or held[0] != owner
                    return True
                waited = True
                try:
                    await asyncio.wait_for(self._cond.wait(), timeout=held[1] - now)
                except asyncio.TimeoutError:
                    pass

    async def release_key(self, key: str, owner: str) -> None:
        self._start()
        async with self._cond:
            if self._calling.get(key, ("",))[0] == owner:
                del self._calling[key]
                self._cond.notify_all()

    async def release_holder(self, holder: str) -> int:
        self._start()
        async with self._cond:
            n = self._book.release_holder(time.time(), holder)
            keys = [k for k, c in self._calling.items() if c[0].startswith(f"{holder}/")]
            for k in keys:  # its sample claims too: a re-run does not wait for them to expire
                del self._calling[k]
            self._keys["freed_holder"] += len(keys)
            self._persist()
            self._cond.notify_all()
            return n

    async def take_over_retired(self) -> bool:
        """Take over what the retired actor booked since last time (``teacher_quota`` asks once
        it has retired one); True when the ledger changed."""
        self._start()
        async with self._cond:
            changed = self._take_over_retired()
            if changed:
                self._persist()
            return changed

    async def reload(self) -> dict[str, Any]:
        """Read the operator's limits file now (``set_limits`` asks after writing it)."""
        self._start()
        async with self._cond:
            self._reload()
            return self._book.limits.model_dump()

    async def limits(self) -> dict[str, Any]:
        self._start()
        return {**self._book.limits.model_dump(), "error": self._limits_error}

    async def tenant_view(self, tenant: str | None) -> tuple[TenantBudget | None, Spend]:
        return self._book.tenant_view(tenant)

    async def stats(self, holder: str | None = None) -> dict[str, Any]:
        return {**self._book.stats(holder), "limits_error": self._limits_error,
                "persist_errors": self._persist_errors, "keys": dict(self._keys),
                "housekeeping_errors": dict(self._housekeeping_errors)}


TeacherQuota = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_TeacherQuota)


def _owner_died(ref: Any) -> bool:
    """Whether the process owning ``ref`` is gone (blocks up to a few seconds: call off the loop)."""
    try:
        ray.get(ref, timeout=5)
    except ray.exceptions.OwnerDiedError:  # its owner, or the owner's node, died
        return True
    except Exception:  # noqa: BLE001 - a timeout or a hiccup says nothing: ask again next time
        return False
    return False


def teacher_quota(api_key: str | None, base_url: str | None):
    """The cluster's quota actor for this key and endpoint, created on first use under the
    operator's limits. Nothing a caller passes changes them. A v2 actor of the key still
    running is retired first, its ledger carried over (``_retire_earlier_quota``).

    Raises:
        InputError: the operator's limits file is unreadable (checked here, before any call).
    """
    digest = key_digest(api_key, base_url)
    load_limits()
    retired = _retire_earlier_quota(digest)
    handle = TeacherQuota.options(
        name=quota_name(api_key, base_url), namespace=NAMESPACE, lifetime="detached",
        get_if_exists=True, max_concurrency=10_000,
    ).remote(digest, str(limits_path()), str(quota_state_path(digest)), str(retired_quota_state_path(digest)))
    if retired:  # an actor that was already running takes over what the retired one booked last
        ray.get(handle.take_over_retired.remote())
    ray.get(handle.limits.remote())  # alive and named before the fan-out's actors look it up
    return handle


def _retire_earlier_quota(digest: str) -> bool:
    """Stop the earlier (v2) quota actor of this key if one still runs: two actors would each
    admit the organization's whole limit. It is asked to write its ledger first (its
    ``release_holder`` persists), and the v3 actor takes that ledger over. True if one was
    retired. A compile of the earlier version still running on the cluster loses its quota
    actor (its calls fail) or starts a new one; the log says so."""
    name = RETIRED_QUOTA_PREFIX + digest
    try:
        old = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    try:
        ray.get(old.release_holder.remote(f"kolm-retire-{uuid.uuid4().hex[:8]}"), timeout=30)
    except (ray.exceptions.RayError, AttributeError) as e:
        log.warning("the earlier teacher quota actor %s did not write its ledger before retiring (%s): "
                    "spend it booked in its last half second may be missing", name, e)
    ray.kill(old, no_restart=True)
    log.warning("retired the earlier teacher quota actor %s: it and %s would each have admitted the "
                "organization's whole limit; its ledger (%s) is carried over. A compile of the earlier kolm "
                "still running on this cluster loses its quota: re-run it with this version", name,
                QUOTA_PREFIX + digest, retired_quota_state_path(digest))
    return True


def release_holder(api_key: str | None, base_url: str | None, holder: str) -> int:
    """Free every slot ``holder`` still holds (a compile that ends or is cancelled); 0 if the
    key has no quota actor."""
    try:
        handle = ray.get_actor(quota_name(api_key, base_url), namespace=NAMESPACE)
    except ValueError:
        return 0
    return ray.get(handle.release_holder.remote(holder))
