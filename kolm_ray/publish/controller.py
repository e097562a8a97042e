"""The rollout controller: one detached Ray actor per environment (``kolm-rollout-ENV``) that,
on a timer, (1) judges every canary from the receipts with ``rollout.decide`` and records the
transition it calls for, and (2) brings the environment's Serve app in line with the release
state whenever what it serves moved: hosted versions, stable pins or the canary split (a
publish, promote or rollback from any CLI, or its own decision).

Applying is two-phase so no request fails: first every version the new state hosts is loaded
(on top of what is live) with the old routes, then the routes switch. A version stops being
loaded only once it has left the release state (two transitions later). Must not compile.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolm_ray.publish.release import Canary, EnvState, Release, ReleaseStore, promote, rollback, routes
from kolm_ray.publish.rollout import Policy, Verdict, Window, decide, window

if TYPE_CHECKING:
    from kolm_ray.serve.catalog import Catalog
    from kolm_ray.serve.config import ServeConfig

log = logging.getLogger("kolm_ray.publish")


def app_name(env: str) -> str:
    return f"kolm-{env}"


def actor_name(env: str) -> str:
    return f"kolm-rollout-{env}"


def policy_of(canary: Canary) -> Policy:
    """The rollout policy a canary was published with."""
    a = canary.audit
    return Policy(hold_s=canary.hold_s, min_samples=canary.min_samples, tolerance=canary.tolerance,
                  audited=a.rate > 0, audit_tolerance=a.tolerance, confidence=a.confidence, min_audits=a.min_audits)


def verdict_of(release: Release, receipts: list[dict[str, Any]], now: float) -> Verdict:
    """``decide`` on one release's canary over the receipts since it started (pure)."""
    c = release.canary
    return verdict_on(release, window(receipts, release.name, c.version, c.started_at),
                      window(receipts, release.name, release.stable.version, c.started_at), now)


def verdict_on(release: Release, canary: Window, stable: Window, now: float) -> Verdict:
    """``decide`` on one release's canary, given both versions' windows since it started (pure)."""
    return decide(canary, stable, now - release.canary.started_at, policy_of(release.canary))


def judge(state: EnvState, receipts: list[dict[str, Any]], now: float) -> EnvState:
    """Every canary's decision from the receipts; transitions recorded with their reasons (pure)."""
    from kolm_ray.publish.release import Decision

    releases = dict(state.releases)
    for name, r in state.releases.items():
        if r.canary is None or r.phase != "canary":
            continue
        v = verdict_of(r, receipts, now)
        if v.action == "promote":
            releases[name] = promote(r, now=now, reason=v.reason)
        elif v.action == "rollback":
            releases[name] = rollback(r, now=now, reason=v.reason)
        else:
            releases[name] = r
        bound = None if v.bound is None else {"diff": v.bound.diff, "lo": v.bound.lo, "hi": v.bound.hi,
                                              "confidence": v.bound.confidence}
        releases[name] = releases[name].model_copy(update={"last_decision": Decision(
            time=now, action=v.action, reason=v.reason, signal=v.signal, bound=bound)})
    return state.model_copy(update={"releases": releases})


def serve_config(state: EnvState, serve_options: dict[str, Any], hosted_extra: list[str] = (),
                 with_routes: bool = True, route_source: EnvState | None = None) -> Any:
    """The ServeConfig for an environment's app: ``serve_options`` (the ServeConfig fields the
    release state does not decide: trust, store, replicas...) with every hosted version loaded,
    names pinned to stable, and the canary split (from ``route_source`` when given: the routes
    still live)."""
    from kolm_ray.serve.config import ServeConfig

    artifacts = sorted({v.artifact for r in state.releases.values() for v in r.hosted()} | set(hosted_extra))
    src = route_source or state
    return ServeConfig(**{**serve_options, "artifacts": artifacts, "app_name": app_name(state.env),
                          "pins": {n: r.stable.version for n, r in src.releases.items()},
                          "routes": routes(src) if with_routes else {}})


def released_catalog(cfg: "ServeConfig", *states: EnvState) -> "Catalog":
    """The catalog of ``cfg``'s artifacts, each held to the digest recorded when it was published
    in ``states``: an artifact whose file changed since is refused, the rest serve."""
    from kolm_ray.publish.release import published_digests
    from kolm_ray.serve.catalog import build_catalog

    return build_catalog(cfg.artifacts, cfg.trust(), cfg.base_paths, expected_sha256=published_digests(*states))


class RolloutController:
    """Ray actor body: ``tick`` judges and applies; a thread calls it every ``interval_s``."""

    def __init__(self, env: str, home: str, serve_options: dict[str, Any], host: str, port: int,
                 interval_s: float = 10.0) -> None:
        self.env, self.home = env, Path(home)
        self.store = ReleaseStore(self.home, env)
        self.serve_options, self.host, self.port = serve_options, host, port
        self.interval_s = interval_s
        self.applied: EnvState | None = None
        self.last_error: str | None = None
        self.ticks = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._loop, daemon=True, name=f"rollout-{env}").start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - keep the loop alive; the error is reported by status()
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("rollout tick failed for %s", self.env)

    def tick(self) -> dict[str, Any]:
        """Judge canaries, then apply the state to Serve if it moved. Returns ``status()``."""
        from kolm_ray.metrics import record_rollout
        from kolm_ray.serve.receipts import read_receipts

        with self._lock:
            receipts_dir = self.home / "receipts" / app_name(self.env)
            state = before = self.store.load()
            canaries = [r.canary.started_at for r in state.releases.values() if r.canary is not None]
            if canaries:
                receipts = read_receipts(receipts_dir, since=min(canaries)) if receipts_dir.is_dir() else []
                state = self.store.update(lambda s: judge(s, receipts, time.time()))
            record_rollout(self.env, before, state)  # decisions taken and canary weights, as metrics
            # Decisions that only "wait" rewrite the state (its last_decision), not what is served:
            # apply only when the hosted versions or the routes moved.
            if self.applied is None or _serving_differs(state, self.applied):
                self._apply(state)
            else:
                self.applied = self.applied.model_copy(update={"revision": state.revision})
            self.ticks += 1
            self.last_error = None
            return self.status()

    def _apply(self, state: EnvState) -> None:
        from kolm_ray.serve.app import run

        if self.applied is not None:
            old_hosted, new_hosted = _hosted(self.applied), _hosted(state)
            if not new_hosted <= old_hosted:  # phase 1: load the new versions, old routes
                cfg = serve_config(state, self.serve_options, hosted_extra=sorted(old_hosted),
                                   route_source=self.applied)
                run(cfg, host=self.host, port=self.port, catalog=released_catalog(cfg, state, self.applied))
        cfg = serve_config(state, self.serve_options)
        run(cfg, host=self.host, port=self.port, catalog=released_catalog(cfg, state))  # phase 2: switch routes
        self.applied = state
        log.info("applied release state revision %d of %s", state.revision, self.env)

    def status(self) -> dict[str, Any]:
        return {"env": self.env, "applied_revision": self.applied.revision if self.applied else None,
                "ticks": self.ticks, "last_error": self.last_error}

    def stop(self) -> None:
        self._stop.set()


def _hosted(state: EnvState) -> set[str]:
    return {v.artifact for r in state.releases.values() for v in r.hosted()}


def _serving_differs(a: EnvState, b: EnvState) -> bool:
    return routes(a) != routes(b) or _hosted(a) != _hosted(b) or \
        {n: r.stable.version for n, r in a.releases.items()} != {n: r.stable.version for n, r in b.releases.items()}


def start(env: str, home: Path, serve_options: dict[str, Any], host: str, port: int, interval_s: float) -> Any:
    """Start (or restart, with these settings) the environment's controller; applies the state once."""
    import ray

    name = actor_name(env)
    stop(env)
    from kolm_ray.sampling.teacher import sdk_env

    teacher_env = sdk_env()  # the apps it deploys hand these to their ingress, which asks the teacher for audits
    actor = ray.remote(RolloutController).options(
        name=name, namespace="kolm", lifetime="detached", num_cpus=0, max_restarts=-1, max_concurrency=4,
        **({"runtime_env": {"env_vars": teacher_env}} if teacher_env else {}),
    ).remote(env, str(home), serve_options, host, port, interval_s)
    ray.get(actor.tick.remote())
    return actor


def stop(env: str) -> bool:
    """Stop and remove the environment's controller; False when none runs."""
    import ray

    try:
        actor = ray.get_actor(actor_name(env), namespace="kolm")
    except ValueError:
        return False
    ray.get(actor.stop.remote())
    ray.kill(actor)
    return True


def poke(env: str) -> dict[str, Any] | None:
    """Ask a running controller to tick now (a publish's change goes live at once); None if none runs."""
    import ray

    try:
        actor = ray.get_actor(actor_name(env), namespace="kolm")
    except ValueError:
        return None
    return ray.get(actor.tick.remote())
