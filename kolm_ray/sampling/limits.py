"""The operator's teacher limits: the organization's rate limits and the tenants' budgets.

One JSON file in kolm's state dir (``teacher-limits.json``, format-versioned), written only by
the operator (``kolm teacher-limits set`` → ``set_limits``) and read by the shared quota actor
(``sampling/quota.py``) when it starts and whenever the file changes. A compile never writes
it: a compile's own flags only narrow its share (``QuotaConfig``).

Entries are keyed by the digest of the API key (or, without one, the auth token:
``teacher_identity``) and endpoint (``key_digest``, the suffix of the quota actor's name), with
a ``default`` entry for keys that have none::

    {"format_version": 1,
     "default": {"org": {"max_in_flight": 16, "calls_per_minute": 4000, "tokens_per_minute": 2000000},
                 "tenants": {"acme": {"usd": 50.0, "tokens": null}}},
     "keys": {"3f2a9c01d4e5": {"org": {"max_in_flight": 64, ...}}}}

A key's entry takes its ``org`` limits from the key when it states them, else from ``default``;
its tenants are the default's overlaid by the key's. Budgets are per key (each key's quota
actor keeps its own spend, in ``teacher-quota/v3-<digest>.json`` beside this file). The actor
reads both files where the compile that created it saw them: on a multi-node cluster keep the
state dir on shared storage. Must not admit calls or call the teacher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kolm_ray.durable import write_atomic
from kolm_ray.errors import InputError
from kolm_ray.home import state_dir

log = logging.getLogger("kolm_ray.sampling.limits")

LIMITS_FORMAT_VERSION = 1
NAMESPACE = "kolm"
# v2: leases, holders, AIMD and budgets; v3: callers' liveness tokens (``alive``). A new name
# each time, so a cluster still running the previous actor (whose methods differ) is not joined
# by mistake; and its own state file (``quota_state_path``), so the two never share one.
QUOTA_VERSION = "v3"
QUOTA_PREFIX = f"kolm-teacher-quota-{QUOTA_VERSION}-"
# The earlier actor's name: a v3 client retires one still running for its key (two actors would
# each admit the organization's whole limit), and the v3 actor takes over its ledger.
RETIRED_QUOTA_PREFIX = "kolm-teacher-quota-v2-"


def key_digest(api_key: str | None, base_url: str | None) -> str:
    """The 12-hex digest naming one organization's key and endpoint (never the key itself);
    ``api_key`` is the credential ``teacher_identity`` picks."""
    return hashlib.sha256(f"{api_key or ''}|{base_url or ''}".encode()).hexdigest()[:12]


def teacher_identity(env: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """The credential and endpoint that name this environment's organization, for
    ``key_digest`` / ``quota_name``: ANTHROPIC_API_KEY, else ANTHROPIC_AUTH_TOKEN (a gateway's
    bearer token: two tokens are two quotas, not one shared by every token user), and
    ANTHROPIC_BASE_URL. An API key's digest is what it always was."""
    env = os.environ if env is None else env
    credential = env.get("ANTHROPIC_API_KEY") or None
    if credential is None and env.get("ANTHROPIC_AUTH_TOKEN"):
        credential = "auth-token:" + env["ANTHROPIC_AUTH_TOKEN"]
    return credential, env.get("ANTHROPIC_BASE_URL") or None


def quota_name(api_key: str | None, base_url: str | None) -> str:
    return QUOTA_PREFIX + key_digest(api_key, base_url)


class RateLimits(BaseModel):
    """An organization's teacher rate limits (as the provider's console states them)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # Defaults where the operator has stated nothing: the limiter adapts down from them on 429s.
    max_in_flight: int = Field(64, ge=1, description="Teacher calls in flight across the cluster.")
    calls_per_minute: int = Field(4000, ge=1, description="Teacher calls started per minute across the cluster.")
    tokens_per_minute: int = Field(2_000_000, ge=1, description="Input+output tokens per minute across the cluster.")


class TenantBudget(BaseModel):
    """What one tenant may spend on the teacher in all (None: no limit of that kind)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    usd: float | None = Field(None, ge=0, description="US dollars.")
    tokens: int | None = Field(None, ge=0, description="Billed tokens (input, output and prompt-cache).")


class Spend(BaseModel):
    """What has been spent: by a tenant (the quota's ledger) or by one compile."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    usd: float = 0.0
    tokens: int = 0
    calls: int = 0

    def __add__(self, other: "Spend") -> "Spend":
        return Spend(usd=self.usd + other.usd, tokens=self.tokens + other.tokens, calls=self.calls + other.calls)


class KeyLimits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    org: RateLimits | None = Field(None, description="The organization's rate limits (None: the default entry's).")
    tenants: dict[str, TenantBudget] = Field(default_factory=dict)


class TeacherLimits(BaseModel):
    """The whole file."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    format_version: Literal[1] = LIMITS_FORMAT_VERSION
    default: KeyLimits | None = None
    keys: dict[str, KeyLimits] = Field(default_factory=dict)

    def for_key(self, digest: str) -> "ResolvedLimits":
        """The limits that apply to one key: its own entry over the default entry."""
        d = self.default or KeyLimits()
        k = self.keys.get(digest) or KeyLimits()
        org = k.org or d.org
        return ResolvedLimits(org=org or RateLimits(), stated=org is not None,
                              tenants={**d.tenants, **k.tenants})


class ResolvedLimits(BaseModel):
    """What the quota actor enforces for its key."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    org: RateLimits = RateLimits()
    stated: bool = Field(False, description="Whether the operator stated the org limits (else defaults).")
    tenants: dict[str, TenantBudget] = Field(default_factory=dict)


def limits_path() -> Path:
    """``teacher-limits.json`` in kolm's state dir."""
    return state_dir() / "teacher-limits.json"


def quota_state_path(digest: str) -> Path:
    """Where a key's quota actor keeps its durable state, the tenants' ledger among it
    (``teacher-quota/v3-<digest>.json``, versioned as the actor's name; written by the actor
    only)."""
    return state_dir() / "teacher-quota" / f"{QUOTA_VERSION}-{digest}.json"


def retired_quota_state_path(digest: str) -> Path:
    """Where the earlier (v2) actor kept its state, ``teacher-quota/<digest>.json``: the v3
    actor reads its ledger from there, never writes it."""
    return state_dir() / "teacher-quota" / f"{digest}.json"


def spend_of(raw: dict) -> Spend:
    """A ledger entry as any version wrote it: fields this one does not know are left out,
    missing ones are 0."""
    return Spend.model_validate({k: v for k, v in raw.items() if k in Spend.model_fields})


def read_ledger(digest: str, path: str | Path | None = None) -> dict[str, Spend]:
    """The tenants' spend on one key as its quota actor last wrote it (at most half a second
    behind it); before any v3 actor wrote one, the earlier actor's; empty when nothing was
    spent yet."""
    paths = [Path(path)] if path is not None else [quota_state_path(digest), retired_quota_state_path(digest)]
    for p in paths:
        try:
            snap = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
        return {t: spend_of(s) for t, s in snap.get("spend", {}).items()}
    return {}


class LimitsView(BaseModel):
    """What ``kolm teacher-limits show`` prints: the file, this key's digest and limits, and the
    tenants' budgets and spend on it."""

    model_config = ConfigDict(frozen=True)
    path: str
    key: str = Field(description="This environment's key digest (ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL).")
    limits: TeacherLimits
    applied: ResolvedLimits = Field(description="What this key's quota enforces.")
    spend: dict[str, Spend] = Field(description="This key's tenants' spend.")

    def lines(self) -> list[str]:
        o = self.applied.org
        out = [f"file        {self.path}{'' if Path(self.path).exists() else ' (none yet: defaults apply)'}",
               f"this key    {self.key} · {o.max_in_flight} in flight · {o.calls_per_minute:,} calls/min · "
               f"{o.tokens_per_minute:,} tokens/min" + ("" if self.applied.stated else " (defaults: not stated)")]
        for name in sorted(set(self.applied.tenants) | set(self.spend)):
            b, s = self.applied.tenants.get(name), self.spend.get(name, Spend())
            usd = f"${s.usd:.4f} of ${b.usd:.2f}" if b and b.usd is not None else f"${s.usd:.4f} (no limit)"
            tok = (f"{s.tokens:,} of {b.tokens:,} tokens" if b and b.tokens is not None
                   else f"{s.tokens:,} tokens (no limit)")
            out.append(f"tenant      {name}: {usd} · {tok} · {s.calls} calls")
        for digest in sorted(self.limits.keys):
            if digest != self.key:
                org = self.limits.keys[digest].org
                out.append(f"key         {digest}: " + (f"{org.max_in_flight} in flight · {org.calls_per_minute:,} "
                                                        f"calls/min · {org.tokens_per_minute:,} tokens/min"
                                                        if org else "default rates")
                           + f" · {len(self.limits.keys[digest].tenants)} tenant budget(s)")
        return out


def show_limits(api_key: str | None, base_url: str | None, path: str | Path | None = None) -> LimitsView:
    """The operator's limits as they apply to this key, with its tenants' spend (from the
    quota actor's ledger file; no Ray needed).

    Raises:
        InputError: the limits file is unreadable.
    """
    p = Path(path) if path is not None else limits_path()
    limits = load_limits(p)
    digest = key_digest(api_key, base_url)
    return LimitsView(path=str(p), key=digest, limits=limits, applied=limits.for_key(digest),
                      spend=read_ledger(digest))


def load_limits(path: str | Path | None = None) -> TeacherLimits:
    """The operator's limits; a missing file means none stated (every default applies).

    Raises:
        InputError: the file is not valid JSON or not a limits file of a known version.
    """
    p = Path(path) if path is not None else limits_path()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return TeacherLimits()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON ({e.msg}); fix it or rewrite it with `kolm teacher-limits set`",
                         path=str(p), line=e.lineno) from None
    if not isinstance(data, dict) or data.get("format_version") != LIMITS_FORMAT_VERSION:
        raise InputError(f"not a teacher limits file of format_version {LIMITS_FORMAT_VERSION}", path=str(p))
    try:
        return TeacherLimits.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise InputError(f"bad entry {where}: {err['msg']}", path=str(p)) from None


def set_limits(
    *,
    key: str | None = None,
    max_in_flight: int | None = None,
    calls_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
    tenant: str | None = None,
    budget_usd: float | None = None,
    budget_tokens: int | None = None,
    path: str | Path | None = None,
    notify: bool = True,
) -> TeacherLimits:
    """Change the operator's limits: the given fields of one entry (``key``: a ``key_digest``;
    None: the default entry), the rest kept. Concurrent writers are serialized by a lock file
    and the file is replaced atomically, so a reader sees the old file or the new one.

    With ``notify`` and a connected Ray driver, the key's running quota actors reload at once
    (they also notice the change by themselves within a second).

    Raises:
        InputError: a bad value, a budget without a tenant, or an unreadable existing file.
    """
    p = Path(path) if path is not None else limits_path()
    if tenant is None and (budget_usd is not None or budget_tokens is not None):
        raise InputError("a budget belongs to a tenant: give --tenant NAME with --budget-usd / --budget-tokens")
    if key is not None and (len(key) != 12 or any(c not in "0123456789abcdef" for c in key)):
        raise InputError(f"key {key!r} is not a key digest (12 hex digits, as `kolm teacher-limits show` lists)")
    p.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(p) + ".lock", timeout=30):
        current = load_limits(p)
        entry = (current.default if key is None else current.keys.get(key)) or KeyLimits()
        rates = {"max_in_flight": max_in_flight, "calls_per_minute": calls_per_minute,
                 "tokens_per_minute": tokens_per_minute}
        changed = {k: v for k, v in rates.items() if v is not None}
        try:
            org = entry.org
            if changed:
                base = org or (current.default.org if key is not None and current.default else None) or RateLimits()
                org = RateLimits.model_validate({**base.model_dump(), **changed})
            tenants = dict(entry.tenants)
            if tenant is not None:
                budget = tenants.get(tenant, TenantBudget())
                update = {k: v for k, v in (("usd", budget_usd), ("tokens", budget_tokens)) if v is not None}
                tenants[tenant] = TenantBudget.model_validate({**budget.model_dump(), **update})
        except ValidationError as e:
            err = e.errors()[0]
            raise InputError(f"bad limit {'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None
        entry = KeyLimits(org=org, tenants=tenants)
        new = (current.model_copy(update={"default": entry}) if key is None
               else current.model_copy(update={"keys": {**current.keys, key: entry}}))
        write_atomic(p, new.model_dump_json(indent=2) + "\n")
    if notify:
        _tell_quotas(key)
    return new


def _tell_quotas(key: str | None) -> list[str]:
    """Ask the running quota actors the change concerns (one key's, or all for the default
    entry) to reload now. Nothing to do without a connected driver: they poll the file too."""
    import ray

    if not ray.is_initialized():
        return []
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a.get("namespace") == NAMESPACE and a["name"].startswith(QUOTA_PREFIX)
             and (key is None or a["name"] == QUOTA_PREFIX + key)]
    told = []
    for name in names:
        try:
            ray.get(ray.get_actor(name, namespace=NAMESPACE).reload.remote(), timeout=10)
            told.append(name)
        except (ValueError, ray.exceptions.RayError) as e:  # gone or restarting: it reads the file as it starts
            log.warning("quota actor %s did not reload now (%s); it reads the file when it runs again", name, e)
    return told
