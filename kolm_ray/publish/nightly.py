"""The nightly pipeline: for each spec in a folder, compile, compare with the released version,
and publish behind a canary only if the gate passed and the compare recommends it. A failed
gate or a compare that does not say promote leaves the prior version serving.

A spec is a JSON file::

    {"name": "routing", "env": "prod",
     "compile": ["--task-file", "task.txt", "--examples", "ex.jsonl", "--eval", "holdout.jsonl",
                 "--base", "qwen-2.5-3b-instruct", "--gate", "K=88"],
     "canary": 5, "hold": "24h", "min_samples": 200, "tolerance": 0.5,
     "audit": {"rate": 0.2, "shadow": false, "tolerance": 5, "confidence": 0.95}}

``compile`` takes exactly ``kolm compile``'s arguments (relative paths are relative to the spec).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kolm_ray.errors import InputError, KolmError
from kolm_ray.publish.release import AuditSettings, check_env
from kolm_ray.publish.service import parse_duration

Outcome = Literal["published", "first_version", "unchanged", "gate_failed", "not_recommended", "failed"]


class NightlySpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    env: str
    compile: list[str] = Field(description="`kolm compile` arguments.")
    canary: float = Field(5.0, gt=0, le=100)
    hold: str = "24h"
    min_samples: int = Field(200, ge=1)
    tolerance: float = Field(0.5, ge=0)
    audit: AuditSettings = Field(default_factory=AuditSettings, description="How the canary is audited (kolm "
                                 "publish --audit-rate, --shadow, --audit-tolerance, --confidence, --min-audits).")


class NightlyResult(BaseModel):
    spec: str
    name: str
    outcome: Outcome
    detail: str


def load_specs(folder: Path) -> list[tuple[Path, NightlySpec]]:
    """Raises: InputError naming the spec file for a malformed one."""
    if not folder.is_dir():
        raise InputError("spec folder not found", path=str(folder))
    specs = []
    for f in sorted(folder.glob("*.json")):
        try:
            spec = NightlySpec.model_validate(json.loads(f.read_text()))
            check_env(spec.env)
            parse_duration(spec.hold)
            specs.append((f, spec))
        except InputError as e:
            raise InputError(f"invalid spec: {e}", path=str(f)) from None
        except json.JSONDecodeError as e:
            raise InputError(f"not valid JSON ({e.msg})", path=str(f), line=e.lineno) from None
        except ValidationError as e:
            err = e.errors()[0]
            raise InputError(f"invalid spec: {'.'.join(map(str, err['loc']))}: {err['msg']}", path=str(f)) from None
    if not specs:
        raise InputError("no *.json specs in the folder", path=str(folder))
    return specs


def _resolve_paths(args: list[str], base: Path) -> list[str]:
    path_flags = {"--task-file", "--examples", "--eval", "--prices", "--out", "--work-dir"}
    out = list(args)
    for i, a in enumerate(out[:-1]):
        if a in path_flags and not Path(out[i + 1]).is_absolute():
            out[i + 1] = str(base / out[i + 1])
        elif a == "--base" and (base / out[i + 1]).is_dir():  # a local base folder, not a hub id
            out[i + 1] = str(base / out[i + 1])
    return out


def run_one(spec_path: Path, spec: NightlySpec, home: Path, trust: Any, say: Callable[[str], None]) -> NightlyResult:
    from kolm_ray.cli import cli
    from kolm_ray.compare import compare, load_side
    from kolm_ray.publish.release import ReleaseStore
    from kolm_ray.publish.service import publish_artifact

    def result(outcome: Outcome, detail: str) -> NightlyResult:
        say(f"{spec.name:<16}{outcome:<16}{detail}")
        return NightlyResult(spec=str(spec_path), name=spec.name, outcome=outcome, detail=detail)

    args = ["compile", *_resolve_paths(spec.compile, spec_path.parent), "--name", spec.name]
    rv = cli.main(args, prog_name="kolm", standalone_mode=False)
    if isinstance(rv, int) or rv is None:
        code = rv or 0
        if code == 3:
            return result("gate_failed", "below its gate: the released version keeps serving")
        return result("failed", f"compile exited {code}: the released version keeps serving")
    artifact = rv.artifact
    stable = ReleaseStore(home, spec.env).load().releases.get(spec.name)
    released = {v.version for v in (stable.hosted() if stable is not None else [])}
    if rv.reused and rv.version in released:  # identical inputs to a version already out: nothing to do
        return result("unchanged", f"{spec.name}@{rv.version} (identical inputs) is already released in {spec.env}")
    if stable is not None:
        old, old_meta = load_side(stable.stable.artifact, trust)
        new, new_meta = load_side(artifact, trust)
        cmp = compare(old, new, old_meta, new_meta, tolerance=spec.tolerance)
        if cmp.recommendation != "promote":
            return result("not_recommended", f"{cmp.recommendation}: {cmp.reason}")
    try:
        _, line, _ = publish_artifact(home, spec.env, str(artifact), trust, weight=spec.canary / 100,
                                      hold_s=parse_duration(spec.hold), min_samples=spec.min_samples,
                                      tolerance=spec.tolerance, audit=spec.audit)
    except KolmError as e:
        return result("failed", f"publish: {e}")
    return result("first_version" if stable is None else "published", line)


def run_nightly(folder: Path, home: Path, trust: Any, say: Callable[[str], None] = print) -> list[NightlyResult]:
    """Every spec, each on its own: one that fails is reported and the others still run."""
    results = []
    for path, spec in load_specs(folder):
        try:
            results.append(run_one(path, spec, home, trust, say))
        except Exception as e:  # noqa: BLE001 - counted as failed (the job exits 1), never silent
            say(f"{spec.name:<16}{'failed':<16}{type(e).__name__}: {e}")
            results.append(NightlyResult(spec=str(path), name=spec.name, outcome="failed",
                                         detail=f"{type(e).__name__}: {e}"))
    return results
