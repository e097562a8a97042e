"""What the ``kolm publish / status / promote / rollback`` commands do, over the release store.

``publish_artifact``: verify the artifact, compare it with the environment's stable version
(``kolm_ray.compare``), refuse what the compare rejects (unless forced), record the release.
``env_status``: the state with each version's online figures from the receipts. A running
rollout controller picks every change up on its next tick (``controller.poke`` makes that now).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from kolm_ray.errors import GateFailed, InputError
from kolm_ray.publish.release import AuditSettings, EnvState, ReleaseStore, Version, add_version, promote, rollback
from kolm_ray.publish.rollout import window

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def parse_duration(text: str) -> float:
    """'24h', '30m', '45s', '2d' or plain seconds. Raises: InputError."""
    m = _DURATION.match(text.strip().lower())
    if not m:
        raise InputError(f"invalid duration {text!r}: use e.g. 24h, 30m, 45s")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


class NotRecommended(GateFailed):
    """The compare with stable did not recommend promoting (``publish_artifact(require_promote=True)``)."""

    def __init__(self, comparison: Any) -> None:
        self.comparison = comparison
        super().__init__(f"{comparison.recommendation}: {comparison.reason}")


def publish_artifact(home: Path, env: str, artifact: str, trust: Any, *, weight: float, hold_s: float,
                     min_samples: int, tolerance: float, force: bool = False,
                     audit: AuditSettings | None = None, require_promote: bool = False) -> tuple[EnvState, str, Any]:
    """Returns the new state, a one-line summary, and the comparison with stable (or None).

    ``require_promote`` (the nightly): publish only what the compare recommends promoting.

    Raises:
        InputError: bad artifact or a move the release does not allow.
        ArtifactRejected: the signature does not verify.
        GateFailed: the compare with stable says reject (without ``force``); ``NotRecommended``
            when it does not say promote under ``require_promote``.
    """
    from kolm_ray.compare import compare, load_side
    from kolm_ray.store import fetched, location_of

    store = ReleaseStore(home, env)
    where = location_of(artifact)  # an absolute path, or the s3:// / gs:// URI serving reads it from
    with fetched(artifact) as local:  # one download
        # Verified, and digested from the very bytes verified (a file swapped in meanwhile changes
        # neither); the base model is not needed to publish.
        report, meta = load_side(local, trust)
    digest = meta.artifact_sha256
    meta = meta.model_copy(update={"source": where})
    # Serving refuses the artifact if its bytes ever differ from this digest.
    new = Version(version=meta.version, artifact=where, artifact_sha256=digest,
                  offline_k=(report.get("student") or {}).get("k"))
    ref = f"{meta.name}@{meta.version}"
    current = store.load().releases.get(meta.name)
    comparison = None
    if current is not None:
        old_report, old_meta = load_side(current.stable.artifact, trust)
        comparison = compare(old_report, report, old_meta, meta, tolerance=tolerance)
        if require_promote and comparison.recommendation != "promote":
            raise NotRecommended(comparison)
        if comparison.recommendation == "reject" and not force:
            raise GateFailed(f"refusing to publish {ref}: compared with stable {current.stable.version}, "
                             f"{comparison.reason} (use --force to publish anyway)")

    def change(s: EnvState) -> EnvState:
        r = add_version(s.releases.get(meta.name), meta.name, new, now=time.time(), weight=weight, hold_s=hold_s,
                        min_samples=min_samples, tolerance=tolerance, force=force, audit=audit)
        return s.model_copy(update={"releases": {**s.releases, meta.name: r}})

    state = store.update(change)
    r = state.releases[meta.name]
    if r.phase == "stable":
        line = f"{ref} is the first version in {env}: stable at once"
    elif r.phase == "promoted":
        line = f"{ref} published with all traffic: stable in {env}"
    else:
        a = r.canary.audit
        judged = (f"audited K ({100 * a.rate:g}% of its calls and as many of stable's"
                  f"{', plus shadow answers' if a.shadow else ''}) within {a.tolerance:g} points at "
                  f"{100 * a.confidence:g}%" if a.rate > 0 else
                  f"online K within {tolerance:g} points at {100 * a.confidence:g}% (no audits: format-level only)")
        line = (f"{ref} rolled out behind {100 * weight:g}% traffic in {env}; hold for "
                f"{_human(hold_s)}, auto-promote on no K-score regression: {judged}")
    return state, line, comparison


def manual(home: Path, env: str, name: str, action: str) -> EnvState:
    """``kolm promote`` / ``kolm rollback``. Raises: InputError."""
    store = ReleaseStore(home, env)

    def change(s: EnvState) -> EnvState:
        r = s.releases.get(name)
        if r is None:
            raise InputError(f"{name!r} is not released in {env!r}")
        moved = (promote if action == "promote" else rollback)(r, now=time.time(), reason=f"manual {action}")
        return s.model_copy(update={"releases": {**s.releases, name: moved}})

    return store.update(change)


def env_status(home: Path, env: str, now: float | None = None) -> dict[str, Any]:
    """Each Specialist: stable and canary, weight, phase, online and audited K and calls of each
    (and their failed calls: the version's errors, the serving path's 503s), audit failures and
    cost, hold left, and the evidence (bound) the controller decides on."""
    from kolm_ray.publish.controller import app_name, verdict_on
    from kolm_ray.serve.receipts import read_receipts

    store = ReleaseStore(home, env)
    if not store.exists():
        raise InputError(f"no environment {env!r} under {home / 'envs'}: `kolm publish ART --to {env}` creates it")
    state = store.load()
    now = now or time.time()
    rdir = home / "receipts" / app_name(env)
    out = {"env": env, "revision": state.revision, "specialists": []}
    for name, r in sorted(state.releases.items()):
        since = r.canary.started_at if r.canary else (r.history[-1].time if r.history else 0.0)
        receipts = read_receipts(rdir, since=since) if rdir.is_dir() else []
        st = window(receipts, name, r.stable.version, since)
        entry: dict[str, Any] = {
            "name": name, "phase": r.phase, "stable": r.stable.version,
            "stable_online_k": st.k, "stable_calls": st.calls, "stable_audited_k": st.audited_k,
            "stable_errors": st.errors, "stable_unavailable": st.unavailable,
            "canary": None, "weight": 0.0, "previous": r.previous.version if r.previous else None,
            "audited_calls": {"stable": st.audited.n},
            "audit_failed": {"stable": st.audit_failed}, "audit_dropped": {"stable": st.audit_dropped},
            "audit_cost_usd": round(st.audit_cost_usd, 6), "audit_uncosted": st.audit_uncosted,
            "last_decision": r.last_decision.model_dump() if r.last_decision else None,
            "last_transition": r.history[-1].model_dump() if r.history else None,
        }
        if r.canary:
            cw = window(receipts, name, r.canary.version, since)
            v = verdict_on(r, cw, st, now)  # since == the canary's start: the windows the controller reads
            entry.update(canary=r.canary.version, weight=r.canary.weight, canary_online_k=cw.k,
                         canary_calls=cw.calls, canary_audited_k=cw.audited_k, min_samples=r.canary.min_samples,
                         canary_errors=cw.errors, canary_unavailable=cw.unavailable,
                         audit=r.canary.audit.model_dump(),
                         hold_left_s=max(0.0, r.canary.hold_s - (now - r.canary.started_at)),
                         audited_calls={"stable": st.audited.n, "canary": cw.audited.n},
                         audit_failed={"stable": st.audit_failed, "canary": cw.audit_failed},
                         audit_dropped={"stable": st.audit_dropped, "canary": cw.audit_dropped},
                         audit_cost_usd=round(st.audit_cost_usd + cw.audit_cost_usd, 6),
                         audit_uncosted=st.audit_uncosted + cw.audit_uncosted,
                         evidence={"signal": v.signal, "action": v.action, "reason": v.reason},
                         bound=None if v.bound is None else {
                             "signal": v.signal, "diff": round(v.bound.diff, 3), "lo": round(v.bound.lo, 3),
                             "hi": round(v.bound.hi, 3), "confidence": v.bound.confidence,
                             "tolerance": r.canary.audit.tolerance if v.signal == "audited" else r.canary.tolerance})
        out["specialists"].append(entry)
    return out


def _human(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):  # "24h", as people say a hold
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
