"""The nightly pipeline: for each spec in a folder, compile, compare with the released version,
and publish behind a canary only if the gate passed and the compare recommends it. A failed
gate or a compare that does not say promote leaves the prior version serving.

A spec is a JSON file::

    {"name": "routing", "env": "prod",
     "compile": {"task_file": "task.txt", "examples": "ex.jsonl", "eval": "holdout.jsonl",
                 "base": "qwen-2.5-3b-instruct", "gate": 88, "fit": {"epochs": 10}},
     "canary": 5, "hold": "24h", "min_samples": 200, "tolerance": 0.5,
     "audit": {"rate": 0.2, "shadow": false, "tolerance": 5, "confidence": 0.95}}

``compile`` is a compile config (``kolm_ray.compile_config``): a mapping with the fields of a
``kolm compile --config`` file, or the path of such a file (``"compile": "compile.yaml"``).
Relative paths are relative to the spec (in a file: to the file). The spec's ``name`` names the
Specialist. Deprecated, still read: a list of ``kolm compile``'s arguments
(``["--task-file", "task.txt", "--examples", "ex.jsonl", ...]``).

The compile runs in this process through the library (``compile_config.run_compile``, behind the
cluster's compile queue), and the publish through ``publish.service.publish_artifact``, which
verifies the new artifact and compares it with the released one, each once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kolm_ray.compile_config import CompileSettings, args_overrides, load_settings, settings_from
from kolm_ray.errors import GateFailed, InputError, KolmError
from kolm_ray.publish.release import AuditSettings, check_env
from kolm_ray.publish.service import parse_duration

Outcome = Literal["published", "first_version", "unchanged", "gate_failed", "not_recommended", "failed"]


class NightlySpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    env: str
    compile: dict[str, Any] | str | list[str] = Field(
        description="The compile config: a mapping with a `kolm compile --config` file's fields, or that file's "
                    "path (relative to the spec). Deprecated: a list of `kolm compile` arguments.")
    canary: float = Field(5.0, gt=0, le=100)
    hold: str = "24h"
    min_samples: int = Field(200, ge=1)
    tolerance: float = Field(0.5, ge=0)
    audit: AuditSettings = Field(default_factory=AuditSettings, description="How the canary is audited (kolm "
                                 "publish --audit-rate, --shadow, --audit-tolerance, --confidence, --min-audits).")


def compile_settings(spec_path: Path, spec: NightlySpec) -> CompileSettings:
    """The spec's compile config, its relative paths resolved, named by the spec.
    Raises: InputError (naming the config file and line when it is one)."""
    name = {"name": spec.name}
    if isinstance(spec.compile, str):
        return load_settings(spec_path.parent / spec.compile, name)
    if isinstance(spec.compile, list):  # deprecated: `kolm compile`'s arguments
        data = args_overrides(spec.compile)
    else:
        data = spec.compile
    return settings_from(name, data, base_dir=spec_path.parent, source=str(spec_path))


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
            compile_settings(f, spec)
            specs.append((f, spec))
        except InputError as e:
            if e.path is not None and e.path != str(f):  # the compile config file it names, and which spec did
                where = f"{e.path}:{e.line}: " if e.line is not None else f"{e.path}: "
                raise InputError(f"{str(e).removeprefix(where)} (the compile config of {f.name})",
                                 path=e.path, line=e.line) from None
            raise InputError(f"invalid spec: {e}", path=str(f)) from None
        except json.JSONDecodeError as e:
            raise InputError(f"not valid JSON ({e.msg})", path=str(f), line=e.lineno) from None
        except ValidationError as e:
            err = e.errors()[0]
            raise InputError(f"invalid spec: {'.'.join(map(str, err['loc']))}: {err['msg']}", path=str(f)) from None
    if not specs:
        raise InputError("no *.json specs in the folder", path=str(folder))
    return specs


def run_one(spec_path: Path, spec: NightlySpec, home: Path, trust: Any, say: Callable[[str], None]) -> NightlyResult:
    """Compile the spec (reusing a version of identical inputs), then publish it unless it is
    the released version already; the publish verifies it and compares it with stable, once."""
    from kolm_ray.compile_config import plan_compile, run_compile
    from kolm_ray.publish.release import ReleaseStore
    from kolm_ray.publish.service import NotRecommended, publish_artifact

    def result(outcome: Outcome, detail: str) -> NightlyResult:
        say(f"{spec.name:<16}{outcome:<16}{detail}")
        return NightlyResult(spec=str(spec_path), name=spec.name, outcome=outcome, detail=detail)

    try:
        built = run_compile(plan_compile(compile_settings(spec_path, spec), say=say), say=say)
    except GateFailed as e:
        return result("gate_failed", f"below its gate: the released version keeps serving ({e})")
    except KolmError as e:
        return result("failed", f"compile: {e}: the released version keeps serving")
    stable = ReleaseStore(home, spec.env).load().releases.get(spec.name)
    released = {v.version for v in (stable.hosted() if stable is not None else [])}
    if built.reused and built.version in released:  # identical inputs to a version already out: nothing to do
        return result("unchanged", f"{spec.name}@{built.version} (identical inputs) is already released in {spec.env}")
    try:
        _, line, comparison = publish_artifact(
            home, spec.env, str(built.artifact), trust, weight=spec.canary / 100, hold_s=parse_duration(spec.hold),
            min_samples=spec.min_samples, tolerance=spec.tolerance, audit=spec.audit, require_promote=True)
    except NotRecommended as e:
        return result("not_recommended", str(e))
    except KolmError as e:
        return result("failed", f"publish: {e}")
    return result("first_version" if comparison is None else "published", line)


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
