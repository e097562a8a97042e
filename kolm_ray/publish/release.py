"""Release state: per environment and Specialist, the stable version, the canary and its weight,
the phase, and every transition with its reason.

Durable in ``$KOLM_HOME/envs/ENV/release.json`` (``durable.write_atomic``: a temp file fsynced,
renamed over the state, its folder fsynced; a crash leaves the old state or the new, whole), so a
restart of Serve, of the cluster or of the CLI restores the same routing. One writer at a time:
every change goes through ``ReleaseStore.update``, which holds an exclusive lock on
``release.lock`` for the whole read-modify-write, so concurrent publishes are serialized, never
interleaved. The transitions (``add_version``, ``promote``, ``rollback``) are pure functions of a
``Release``; they raise ``InputError`` where the move is not allowed.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Callable, Iterator, Literal

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kolm_ray.durable import write_atomic
from kolm_ray.errors import InputError, KolmRuntimeError

RELEASE_FORMAT_VERSION = 2  # 2: canaries carry audit settings, decisions their evidence
_READABLE_VERSIONS = (1, 2)
Phase = Literal["stable", "canary", "promoted", "rolled_back"]
_ENV = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class Version(BaseModel):
    model_config = ConfigDict(frozen=True)
    version: str
    artifact: str
    artifact_sha256: str
    offline_k: float | None = Field(None, description="The artifact's holdout K (0-100).")


class AuditSettings(BaseModel):
    """A canary's audits: a share of its calls (and as many of stable's) gets a teacher reference."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    rate: float = Field(0.0, ge=0, le=1, description="Share of the canary's calls (and as many of stable's) that "
                        "get a teacher reference and an audited K; 0 judges on the format-level online K alone.")
    shadow: bool = Field(False, description="The canary also answers a copy of stable's audited calls, unseen by "
                         "users, so it is judged before anyone sees it.")
    tolerance: float = Field(5.0, ge=0, description="K points the canary's audited K may trail stable's.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Confidence of the always-valid bound behind a decision.")
    min_audits: int = Field(10, ge=1, description="Audited calls per version before the audited K is judged.")

    @model_validator(mode="after")
    def _shadow_needs_audits(self) -> "AuditSettings":
        if self.shadow and self.rate <= 0:
            raise ValueError("shadow (--shadow) answers a copy of stable's audited calls: it needs an audit rate "
                             "(--audit-rate) above 0")
        return self


class Canary(Version):
    weight: float = Field(ge=0, le=1, description="Share of the Specialist's traffic sent to the canary.")
    started_at: float
    hold_s: float = Field(ge=0)
    min_samples: int = Field(ge=1)
    tolerance: float = Field(ge=0, description="K points the canary's online (format-level) K may trail stable's.")
    audit: AuditSettings = Field(default_factory=AuditSettings, description="How the canary is audited.")


class Transition(BaseModel):
    model_config = ConfigDict(frozen=True)
    time: float
    phase: Phase
    version: str
    reason: str


class Decision(BaseModel):
    """The rollout controller's last word on a canary (shown by `kolm status`)."""

    model_config = ConfigDict(frozen=True)
    time: float
    action: Literal["wait", "promote", "rollback"]
    reason: str
    signal: Literal["audited", "online"] | None = Field(None, description="Which K the bound is about.")
    bound: dict[str, float] | None = Field(None, description="diff, lo, hi (K points) and confidence of the "
                                           "always-valid interval for canary - stable.")


class Release(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    phase: Phase
    stable: Version
    canary: Canary | None = None
    previous: Version | None = Field(None, description="The stable before the last promotion, kept for rollback.")
    retired: Version | None = Field(None, description="The last version rolled back: kept loaded (no routes) so "
                                    "no request in flight meets an unloaded adapter.")
    history: list[Transition] = []
    last_decision: Decision | None = None

    def hosted(self) -> list[Version]:
        """Every version a serving app keeps loaded for this Specialist (routed or not)."""
        out = [self.stable] + [v for v in (self.canary, self.previous, self.retired) if v is not None]
        seen, unique = set(), []
        for v in out:
            if v.version not in seen:
                seen.add(v.version)
                unique.append(v)
        return unique


class EnvState(BaseModel):
    model_config = ConfigDict(frozen=True)
    format_version: int = RELEASE_FORMAT_VERSION
    env: str
    revision: int = 0
    releases: dict[str, Release] = {}


# ----- transitions (pure) -----------------------------------------------------------------------


def add_version(current: Release | None, name: str, new: Version, *, now: float, weight: float, hold_s: float,
                min_samples: int, tolerance: float, force: bool = False,
                audit: AuditSettings | None = None) -> Release:
    """A new version joins the Specialist's release: the first version becomes stable at once; a
    later one goes out as canary behind ``weight`` of the traffic (promoted at once at 100%).
    ``audit``: how the canary is audited (none by default).

    Raises:
        InputError: the version is already released, or a canary is still running (without ``force``).
    """
    if current is None:
        return Release(name=name, phase="stable", stable=new,
                       history=[Transition(time=now, phase="stable", version=new.version, reason="first version")])
    known = [v for v in (current.stable, current.canary, current.previous, current.retired) if v is not None]
    if any(v.version == new.version for v in known):
        raise InputError(f"{name} {new.version} is already released in this environment (versions are immutable: "
                         "compile a new one)")
    if current.canary is not None and current.phase == "canary" and not force:
        raise InputError(f"{name} {current.canary.version} is still in canary: promote or roll it back first "
                         "(or publish with --force to replace it)")
    canary = Canary(**new.model_dump(), weight=weight, started_at=now, hold_s=hold_s, min_samples=min_samples,
                    tolerance=tolerance, audit=audit or AuditSettings())
    if weight >= 1:
        return promote(current.model_copy(update={"canary": canary, "phase": "canary"}), now=now,
                       reason="published with 100% weight")
    return current.model_copy(update={
        "phase": "canary", "canary": canary, "last_decision": None,
        "history": [*current.history, Transition(time=now, phase="canary", version=new.version,
                                                 reason=f"published behind {100 * weight:g}% of traffic")]})


def promote(r: Release, *, now: float, reason: str) -> Release:
    """The canary takes all traffic; the old stable is kept for rollback. Raises: InputError (no canary)."""
    if r.canary is None or r.phase != "canary":
        raise InputError(f"{r.name} has no canary to promote")
    new_stable = Version(**r.canary.model_dump(include=set(Version.model_fields)))
    return r.model_copy(update={
        "phase": "promoted", "stable": new_stable, "canary": None, "previous": r.stable, "last_decision": None,
        "history": [*r.history, Transition(time=now, phase="promoted", version=new_stable.version, reason=reason)]})


def rollback(r: Release, *, now: float, reason: str) -> Release:
    """A canary goes to 0%; right after a promotion, the previous stable comes back. Either way
    the version rolled back is retired (loaded, unrouted). Raises: InputError (nothing to undo)."""
    if r.canary is not None and r.phase == "canary":
        return r.model_copy(update={
            "phase": "rolled_back", "canary": None, "last_decision": None,
            "retired": Version(**r.canary.model_dump(include=set(Version.model_fields))),
            "history": [*r.history, Transition(time=now, phase="rolled_back", version=r.canary.version,
                                               reason=reason)]})
    if r.phase == "promoted" and r.previous is not None:
        return r.model_copy(update={
            "phase": "rolled_back", "stable": r.previous, "previous": None, "retired": r.stable,
            "last_decision": None,
            "history": [*r.history, Transition(time=now, phase="rolled_back", version=r.stable.version,
                                               reason=reason)]})
    raise InputError(f"{r.name} has nothing to roll back to (phase {r.phase}, stable {r.stable.version})")


def published_digests(*states: EnvState) -> dict[str, str]:
    """Artifact -> the SHA-256 recorded when it was published, for every version the states host:
    serving refuses an artifact whose bytes no longer match (``serve.catalog.build_catalog``)."""
    return {v.artifact: v.artifact_sha256 for s in states for r in s.releases.values() for v in r.hosted()}


def routes(state: EnvState) -> dict[str, dict]:
    """What the ingress needs: name -> stable version, canary version and weight."""
    return {name: {"stable": r.stable.version, "canary": r.canary.version if r.canary else None,
                   "weight": r.canary.weight if r.canary else 0.0,
                   "audit_rate": r.canary.audit.rate if r.canary else 0.0,
                   "shadow": bool(r.canary and r.canary.audit.shadow)}
            for name, r in state.releases.items()}


# ----- the store --------------------------------------------------------------------------------


def check_env(env: str) -> str:
    if not _ENV.match(env):
        raise InputError(f"invalid environment name {env!r}: lower-case letters, digits, - and _")
    return env


class ReleaseStore:
    """``$KOLM_HOME/envs/ENV/``: release.json (the state) and release.lock (one writer at a time)."""

    def __init__(self, home: Path, env: str) -> None:
        self.env = check_env(env)
        self.dir = home / "envs" / env
        self.path = self.dir / "release.json"

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> EnvState:
        if not self.path.is_file():
            return EnvState(env=self.env)
        data = json.loads(self.path.read_text())
        if data.get("format_version") not in _READABLE_VERSIONS:
            raise InputError(f"release state format_version {data.get('format_version')!r} is not supported",
                             path=str(self.path))
        return EnvState.model_validate({**data, "format_version": RELEASE_FORMAT_VERSION})

    @contextlib.contextmanager
    def _locked(self, timeout_s: float) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        # An flock underneath: a holder that dies (killed, crashed) lets go with its file
        # descriptor, so no lock is left stale; the file itself stays, for the next writer.
        lock = FileLock(self.dir / "release.lock")
        try:
            lock.acquire(timeout=max(timeout_s, 0.0))  # (filelock waits forever on a negative timeout)
        except Timeout:
            raise KolmRuntimeError(f"another publish to {self.env!r} held the lock for {timeout_s:g} s; "
                                   "try again") from None
        try:
            yield
        finally:
            lock.release()

    def update(self, change: Callable[[EnvState], EnvState], timeout_s: float = 30.0) -> EnvState:
        """Apply ``change`` to the current state under the lock and write the result atomically
        and durably.

        Raises:
            KolmRuntimeError: the lock stayed held past ``timeout_s``, or the state could not be
                written (a full disk: the message names the file; the previous state stays).
        """
        with self._locked(timeout_s):
            before = self.load()
            after = change(before)
            if after == before:
                return before
            after = after.model_copy(update={"revision": before.revision + 1})
            try:
                write_atomic(self.path, after.model_dump_json(indent=2))
            except OSError as e:  # a full disk: the previous state stays, whole
                raise KolmRuntimeError(f"cannot write the release state {self.path}: {e.strerror or e}; "
                                       f"{self.env!r} keeps its previous state (revision {before.revision})") from None
            return after
