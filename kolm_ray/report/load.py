"""What ``kolm report`` reads: an environment's release state, its receipts in the window, and
each released or served version's artifact manifest (only ``specialist/manifest.json`` is read from
the tar; the artifact's SHA-256 is recorded beside the figures so they trace to the very file, and
to the receipts, which carry the same digest)."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

from kolm_ray.errors import InputError
from kolm_ray.publish.release import EnvState, ReleaseStore
from kolm_ray.report.compute import ArtifactFacts, Report, build_report
from kolm_ray.report.prices import PriceBook

MAX_MANIFEST_BYTES = 1 << 20


def teacher_paid(manifest: dict[str, Any]) -> tuple[float, str | None]:
    """What this version's compile paid the teacher, and a note where that is not plainly it.

    The manifest's ``teacher.cost_usd`` is the whole dataset at list price, cached samples
    included: a recompile from the same teacher cache carries it again, so summing it over
    versions would count those samples twice. ``teacher.paid_this_run_usd`` is what the compile
    itself paid (``SampleSummary.cost_usd``); a recorded stand-in (``teacher.recorded``) was
    paid nothing."""
    teacher = manifest.get("teacher") or {}
    if teacher.get("recorded"):
        return 0.0, "recorded stand-in teacher: $0 paid"
    if teacher.get("paid_this_run_usd") is not None:
        return float(teacher["paid_this_run_usd"]), None
    listed = float(teacher.get("cost_usd") or (manifest.get("compute") or {}).get("teacher_cost_usd") or 0.0)
    return listed, ("teacher dollars at list price for the whole dataset (compiled before kolm recorded what "
                    "each run paid): samples cached from an earlier version are counted again") if listed else None


def manifest_facts(path: str, name: str, version: str) -> ArtifactFacts:
    """The compile's cost figures from ``path``'s manifest (teacher dollars paid, fit and eval
    seconds) and ``train.json``'s fit config (the CPUs each worker held, when recorded)."""
    from kolm_ray.artifact import CONTENT_DIR
    from kolm_ray.store import fetched

    try:
        with fetched(path) as local:
            h = hashlib.sha256()
            with open(local, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            with tarfile.open(local, "r:") as tar:
                member = tar.getmember(f"{CONTENT_DIR}/manifest.json")
                if not member.isfile() or member.size > MAX_MANIFEST_BYTES:
                    raise ValueError("manifest.json is not a small regular file")
                manifest = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                train = _small_json(tar, f"{CONTENT_DIR}/train.json")
    except FileNotFoundError:
        return ArtifactFacts(name=name, version=version, found=False, artifact=str(path), note=f"no artifact at {path}")
    except (OSError, KeyError, ValueError, tarfile.TarError, InputError) as e:
        return ArtifactFacts(name=name, version=version, found=False, artifact=str(path),
                             note=f"unreadable artifact ({type(e).__name__}: {e})")
    teacher = manifest.get("teacher") or {}
    compute = manifest.get("compute") or {}
    secs = {dev: sum(float(compute.get(f"{stage}_{dev}_seconds") or 0) for stage in ("fit", "eval"))
            for dev in ("gpu", "cpu")}
    notes = [] if any(f"eval_{d}_seconds" in compute for d in ("gpu", "cpu")) else \
        ["no eval seconds recorded (compiled before kolm recorded them)"]
    paid, why = teacher_paid(manifest)
    notes += [why] if why else []
    # CPU seconds are worker-seconds; a core-hour price needs the cores each worker held: the
    # compute entry if a manifest records it, else the fit config (a queued compile records its grant).
    cores = compute.get("cpus_per_worker") or ((train or {}).get("config") or {}).get("cpus_per_worker")
    if secs["cpu"] and not cores:
        notes.append("CPUs per worker not recorded: CPU-seconds priced at one core per worker")
    return ArtifactFacts(name=name, version=version, artifact=str(path), artifact_sha256=h.hexdigest(),
                         teacher_model=teacher.get("model"), teacher_recorded=bool(teacher.get("recorded")),
                         teacher_usd=paid, gpu_seconds=secs["gpu"], cpu_seconds=secs["cpu"],
                         cpus_per_worker=float(cores) if cores else None, note="; ".join(notes) or None)


def _small_json(tar: tarfile.TarFile, name: str) -> dict[str, Any] | None:
    """A small JSON member of the artifact, or None when absent or not small."""
    try:
        member = tar.getmember(name)
    except KeyError:
        return None
    if not member.isfile() or member.size > MAX_MANIFEST_BYTES:
        return None
    data = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
    return data if isinstance(data, dict) else None


def _candidates(state: EnvState, store: str) -> dict[tuple[str, str], str]:
    from kolm_ray.artifact import artifact_name
    from kolm_ray.store import join

    out: dict[tuple[str, str], str] = {}
    for name, r in state.releases.items():
        for v in (r.stable, r.canary, r.previous, r.retired):
            if v is not None:
                out[(name, v.version)] = v.artifact
        for t in r.history:
            if (name, t.version) not in out:
                major, _, minor = t.version.partition(".")
                if major.isdigit() and minor.isdigit():
                    out[(name, t.version)] = join(store, artifact_name(name, (int(major), int(minor))))
    return out


def load_report(home: Path, env: str, book: PriceBook, *, since_s: float, now: float, artifacts_store: str,
                frontier: str | None = None, gpu_hour: float | None = None,
                gpu_share: float | None = None) -> Report:
    """Read ``env``'s release state, receipts and artifacts under ``home`` and build the report.

    Raises: InputError for an unknown environment or a frontier model the book does not price.
    """
    from kolm_ray.artifact import artifact_name
    from kolm_ray.publish.controller import app_name
    from kolm_ray.serve.receipts import read_receipts
    from kolm_ray.store import join

    if since_s <= 0:
        raise InputError("--since must be a duration above 0 (e.g. 30d, 12h)")
    store = ReleaseStore(home, env)
    if not store.exists():
        raise InputError(f"no environment {env!r} under {home / 'envs'}: `kolm publish ART --to {env}` creates it")
    book.frontier_prices(frontier or book.default_frontier)
    state = store.load()
    rdir = home / "receipts" / app_name(env)
    receipts: list[dict[str, Any]] = read_receipts(rdir, since=now - since_s) if rdir.is_dir() else []
    where = _candidates(state, artifacts_store)
    for r in receipts:
        key = (r["specialist"], r["version"])
        if key not in where and r["version"].replace(".", "").isdigit() and r["version"].count(".") == 1:
            major, minor = r["version"].split(".")
            where[key] = join(artifacts_store, artifact_name(r["specialist"], (int(major), int(minor))))
    facts = {key: manifest_facts(path, *key) for key, path in where.items()}
    return build_report(env, state, receipts, facts, book, since_s=since_s, now=now, frontier=frontier,
                        gpu_hour=gpu_hour, gpu_share=gpu_share)
