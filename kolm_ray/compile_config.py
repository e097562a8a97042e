"""The compile config file: everything ``kolm compile`` takes, as a commented YAML file.

    kolm compile --config compile.yaml [--epochs 10 ...]    # a flag given on the command line wins
    kolm compile ... --print-config > compile.yaml           # the effective config, then exit

The file has the flags' fields: top-level keys for the compile itself (``examples``, ``eval``,
``base``, ``gate``, ...) and one section per typed stage config, holding that config's fields:
``teacher`` (``TeacherConfig``; ``--teacher`` is ``teacher.model``), ``sample``
(``SampleConfig``), ``quota`` (``QuotaConfig``) and ``fit`` (``FitConfig``). Unknown keys are
refused. Relative paths in a file are relative to the file.

``load_settings`` reads a file and lays the command line's flags over it; ``settings_from_args``
reads a ``kolm compile`` argument list (the nightly spec's deprecated form); ``to_yaml`` writes
the settings back (absolute paths, each field with its help); ``plan_compile`` checks every
input and builds the typed configs; ``run_compile`` runs the compile behind the queue.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kolm_ray.compile import CompileConfig, CompileResult, Prepared, parse_gate
from kolm_ray.errors import InputError
from kolm_ray.progress import StageProgress
from kolm_ray.sampling.config import QuotaConfig, SampleConfig, TeacherConfig
from kolm_ray.task import GIVE_IT, read_task as read_task_text
from kolm_ray.train.config import FitConfig

Say = Callable[[str], None]

_C = CompileConfig.model_fields


def _about(field: str, more: str) -> str:
    return f"{(_C[field].description or '').rstrip('.')}{more}"


class CompileSettings(BaseModel):
    """``kolm compile``'s whole configuration, as its flags or a config file give it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    task: str | None = Field(None, description=_about("task", " (or task_file)."))
    task_file: Path | None = Field(None, description="Read the task instruction from this file.")
    examples: Path | None = Field(None, description=_about("examples", ", JSONL/Parquet (required)."))
    eval: Path | None = Field(None, description=_about("holdout", " (required)."))
    base: str | None = Field(None, description=_about("base", " (required)."))
    gate: float | None = Field(None, ge=0, le=100, description="Minimum holdout K-score, 0..100 (e.g. 88 or K=88); "
                               "below it the compile exits 3 and writes no artifact.")
    name: str | None = Field(None, description=_about("name", " (default: from the task)."))
    out: str | None = Field(None, description="Artifact store: a folder or s3://BUCKET/PREFIX "
                            "(default: $KOLM_HOME/artifacts).")
    work_dir: Path | None = Field(None, description=_about("work_dir", " (default: runs/NAME)."))
    sign: str | None = Field(None, description="key:PATH, or sigstore (default: kolm's own key).")
    prices: Path | None = Field(None, description="JSON price table overriding the built-in one.")
    address: str | None = Field(None, description="Ray cluster address (default: RAY_ADDRESS or a local instance).")
    new_version: bool = Field(False, description="Compile again even when an artifact of identical inputs exists.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="How one teacher call is made.")
    sample: SampleConfig = Field(default_factory=SampleConfig, description="The teacher fan-out.")
    quota: QuotaConfig = Field(default_factory=QuotaConfig,
                               description="This compile's claim on the organization's teacher quota.")
    fit: FitConfig = Field(default_factory=FitConfig, description="The LoRA fit (DeepSpeed under Ray Train).")

    @field_validator("gate", mode="before")
    @classmethod
    def _gate(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                return float(v) if v.strip().replace(".", "", 1).isdigit() else parse_gate(v)
            except InputError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("quota")
    @classmethod
    def _no_holder(cls, v: QuotaConfig) -> QuotaConfig:
        if v.holder is not None:
            raise ValueError("quota.holder is set by the compile queue, not by a config")
        return v


SECTIONS = ("teacher", "sample", "quota", "fit")
_PATHS = ("task_file", "examples", "eval", "prices", "work_dir")

# Every `kolm compile` flag, and where it lands in the config: (key,) or (section, field).
FLAGS: dict[str, tuple[str, ...]] = {
    "--task-file": ("task_file",), "--examples": ("examples",), "--eval": ("eval",), "--base": ("base",),
    "--gate": ("gate",), "--name": ("name",), "--out": ("out",), "--work-dir": ("work_dir",), "--sign": ("sign",),
    "--prices": ("prices",), "--address": ("address",), "--new-version": ("new_version",),
    "--teacher": ("teacher", "model"),
    **{f"--{f.replace('_', '-')}": ("sample", f) for f in
       ("samples_per_input", "n", "batch", "concurrency", "min_agreement", "max_failed_fraction")},
    **{f"--{f.replace('_', '-')}": ("quota", f) for f in
       ("tenant", "max_in_flight", "calls_per_minute", "tokens_per_minute")},
    "--k": ("sample", "samples_per_input"),  # the short spelling of --samples-per-input
    "--max-cost": ("quota", "max_cost_usd"),
    **{f"--{f.replace('_', '-')}": ("fit", f) for f in
       ("epochs", "max_steps", "lr", "lora_r", "lora_alpha", "target_modules", "workers", "cpus_per_worker",
        "batch_size", "max_length", "zero_stage", "checkpoint_every", "max_failures", "seed")},
}
BOOLEAN_FLAGS = {"--new-version", "--batch"}
# Click's parameter name of each flag (``--max-cost`` is ``max_cost_usd``, as in `kolm sample`).
_PARAMS = {"task": ("task",), "max_cost_usd": ("quota", "max_cost_usd"),
           **{flag[2:].replace("-", "_"): where for flag, where in FLAGS.items()}}


def flag_overrides(given: Mapping[str, Any]) -> dict[str, Any]:
    """Flags given on the command line (click parameter name -> value) as a config mapping.
    Raises: InputError (a malformed --gate)."""
    out: dict[str, Any] = {}
    for param, value in given.items():
        where = _PARAMS.get(param)
        if where is None:
            raise InputError(f"{param!r} is not a compile setting")
        if where == ("gate",):
            value = parse_gate(value)
        elif where == ("fit", "target_modules") and isinstance(value, str):
            value = [m.strip() for m in value.split(",") if m.strip()] or None
        if len(where) == 1:
            out[where[0]] = value
        else:
            out.setdefault(where[0], {})[where[1]] = value
    return out


def args_overrides(args: list[str]) -> dict[str, Any]:
    """``kolm compile``'s arguments (``["--examples", "ex.jsonl", "--epochs", "8", ...]``) as a
    config mapping, values as text (the configs coerce them). Raises: InputError."""
    by_param: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = str(args[i])
        flag, eq, value = a.partition("=")
        if not a.startswith("--"):
            if "task" in by_param:
                raise InputError(f"unexpected compile argument {a!r} (TASK is given already)")
            by_param["task"] = a
        elif flag not in FLAGS:
            raise InputError(f"unknown compile argument {flag!r}")
        elif flag in BOOLEAN_FLAGS:
            if eq:
                raise InputError(f"{flag} takes no value")
            by_param[flag[2:].replace("-", "_")] = True
        else:
            if not eq:
                if i + 1 >= len(args):
                    raise InputError(f"{flag} needs a value")
                i += 1
                value = str(args[i])
            by_param[flag[2:].replace("-", "_")] = value
        i += 1
    return flag_overrides(by_param)


# ----- reading a file, laying flags over it --------------------------------------------------


def load_settings(path: str | os.PathLike | None, overrides: Mapping[str, Any] | None = None) -> CompileSettings:
    """The config file at ``path`` (None: none) with ``overrides`` (``flag_overrides``) laid
    over it: defaults < file < flags.

    Raises:
        InputError: the file is missing, not YAML, not a mapping, or a field is unknown or
            invalid (named with its line).
    """
    if path is None:
        return settings_from(overrides or {})
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("config file not found", path=str(p)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the config file ({e})", path=str(p)) from None
    data, lines = _parse_yaml(text, str(p))
    return settings_from(overrides or {}, data, base_dir=p.parent, source=str(p), lines=lines)


def settings_from(overrides: Mapping[str, Any], data: Mapping[str, Any] | None = None, *,
                  base_dir: Path | None = None, source: str | None = None,
                  lines: Mapping[tuple[Any, ...], int] | None = None) -> CompileSettings:
    """``data`` (a config mapping whose relative paths are relative to ``base_dir``) with
    ``overrides`` laid over it. A validation error names ``source`` and the field (and its line,
    from ``lines``: key path -> line). Raises: InputError."""
    data = dict(data or {})
    if base_dir is not None:
        data = _relative_to(data, base_dir)
    if isinstance(data.get("sample"), Mapping) and "k" in data["sample"]:  # the short spelling, as `--k`
        data["sample"] = {("samples_per_input" if k == "k" else k): v for k, v in data["sample"].items()}
    merged = dict(data)
    if {"task", "task_file"} & set(overrides):  # one setting, two spellings: the command line's wins whole
        merged.pop("task", None)
        merged.pop("task_file", None)
    for key, value in overrides.items():
        if key in SECTIONS and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        elif key in SECTIONS and key in merged:
            pass  # the file's value is not a section: validation names it
        else:
            merged[key] = value
    try:
        return CompileSettings.model_validate(merged)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        field = ".".join(map(str, loc))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (see `kolm compile --print-config` for every field)"
        in_file = source is not None and _get(data, loc) is not _MISSING and _get(overrides, loc) is _MISSING
        if in_file:
            line = _line(lines or {}, loc)
            raise InputError(f"invalid compile config: {field}: {msg}", path=source, line=line) from None
        flag = next((f for f, w in FLAGS.items() if w == loc), None)
        raise InputError(f"invalid {flag or field}: {msg}") from None


_MISSING = object()


def _get(d: Any, loc: tuple[Any, ...]) -> Any:
    for k in loc:
        if not isinstance(d, Mapping) or k not in d:
            return _MISSING
        d = d[k]
    return d


def _line(lines: Mapping[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    for n in range(len(loc), 0, -1):  # the field's own line, else its section's
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _parse_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[tuple[Any, ...], int]]:
    """The file's mapping, and the line (1-based) of every key in it by key path."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"not valid YAML ({problem})", path=source,
                         line=mark.line + 1 if mark is not None else None) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise InputError("a compile config is a mapping of fields (examples: ..., fit: {epochs: ...})",
                         path=source, line=1)
    lines: dict[tuple[Any, ...], int] = {}

    def walk(n: Any, prefix: tuple[Any, ...]) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = (*prefix, k.value)
                lines[key] = k.start_mark.line + 1
                walk(v, key)

    walk(node, ())
    return data, lines


def _is_uri(text: str) -> bool:
    return "://" in text


def _relative_to(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """A file's relative paths joined to its folder (a base only when that folder exists there:
    otherwise it is a short name or hub id)."""
    out = dict(data)
    for key in _PATHS:
        v = out.get(key)
        if isinstance(v, str) and v and not Path(v).expanduser().is_absolute():
            out[key] = str(base_dir / v)
    if isinstance(out.get("out"), str) and not _is_uri(out["out"]) and not Path(out["out"]).expanduser().is_absolute():
        out["out"] = str(base_dir / out["out"])
    base = out.get("base")
    if isinstance(base, str) and not Path(base).is_absolute() and (base_dir / base).is_dir():
        out["base"] = str(base_dir / base)
    sign = out.get("sign")
    if isinstance(sign, str) and sign.startswith("key:") and not Path(sign[4:]).expanduser().is_absolute():
        out["sign"] = f"key:{base_dir / sign[4:]}"
    return out


# ----- writing the effective config ----------------------------------------------------------


def absolute(s: CompileSettings) -> CompileSettings:
    """``s`` with its local paths absolute, so that a file written from it works from anywhere."""
    update: dict[str, Any] = {k: getattr(s, k).expanduser().absolute() for k in _PATHS if getattr(s, k) is not None}
    if s.out is not None and not _is_uri(s.out):
        update["out"] = str(Path(s.out).expanduser().absolute())
    if s.base is not None and Path(s.base).expanduser().is_dir():
        update["base"] = str(Path(s.base).expanduser().absolute())
    if s.sign is not None and s.sign.startswith("key:"):
        update["sign"] = f"key:{Path(s.sign[4:]).expanduser().absolute()}"
    return s.model_copy(update=update)


def _scalar(v: Any) -> str:
    import yaml

    if isinstance(v, Path):
        v = str(v)
    if isinstance(v, tuple):
        v = list(v)
    text = yaml.safe_dump(v, default_flow_style=True, width=float("inf"), allow_unicode=True)
    text = text.removesuffix("\n").removesuffix("\n...").strip()
    if "\n" in text:  # a multi-line string: one JSON (= YAML double-quoted) line
        return json.dumps(v, ensure_ascii=False)
    return text


def _field_lines(model: BaseModel, indent: str, skip: set[str] = frozenset()) -> list[str]:
    out = []
    for name, f in type(model).model_fields.items():
        if name in skip:
            continue
        value = getattr(model, name)
        help_ = " ".join((f.description or "").split())
        if isinstance(value, BaseModel):
            out += ["", f"{indent}{name}:  # {help_}" if help_ else f"{indent}{name}:"]
            out += _field_lines(value, indent + "  ", {"holder"} if isinstance(value, QuotaConfig) else set())
        else:
            out.append(f"{indent}{name}: {_scalar(value)}" + (f"  # {help_}" if help_ else ""))
    return out


def to_yaml(s: CompileSettings) -> str:
    """The settings as a commented config file (paths absolute): ``load_settings`` reads it back
    as the same settings."""
    head = ["# kolm compile --config FILE: a flag given on the command line overrides its field here.",
            "# Relative paths are relative to this file; null is the default the comment names."]
    return "\n".join(head + _field_lines(absolute(s), "")) + "\n"


# ----- from settings to a running compile ----------------------------------------------------


@dataclass(frozen=True)
class CompilePlan:
    """Every input checked and every stage config built: what ``run_compile`` needs."""

    prepared: Prepared
    teacher: TeacherConfig
    sample: SampleConfig
    quota: QuotaConfig
    prices: Any
    fit: FitConfig
    signer: Any
    new_version: bool = False
    address: str | None = None

    @property
    def teacher_calls(self) -> int:
        rows = self.prepared.rows.num_rows
        return min(rows, self.sample.n or rows) * self.sample.samples_per_input


def read_task(task: str | None, task_file: Path | None) -> str:
    """The task instruction: ``task``, or the text of ``task_file``. Raises: InputError."""
    return read_task_text(task, task_file, missing=f"{GIVE_IT} (task or task_file in a config)")


def plan_compile(s: CompileSettings, say: Say = lambda m: None) -> CompilePlan:
    """Check every input before anything runs or is paid (rows, base, store, prices, the
    teacher's key, tenant, signer) and build the stage configs. ``say``: a line about a signing
    key made now. Raises: InputError."""
    from kolm_ray.admission import check_tenant, default_tenant
    from kolm_ray.compile import derive_name, prepare
    from kolm_ray.home import artifacts_uri
    from kolm_ray.sampling.pricing import load_prices, price_for
    from kolm_ray.signing import signer_from_spec

    missing = [flag for flag, key in (("--examples", "examples"), ("--eval", "eval"), ("--base", "base"))
               if getattr(s, key) is None]
    if missing:
        raise InputError(f"missing {', '.join(missing)}: give {'them' if len(missing) > 1 else 'it'} as flags "
                         "or in a --config file")
    instruction = read_task(s.task, s.task_file)
    name = s.name or derive_name(instruction)
    prepared = prepare(CompileConfig(
        task=instruction, examples=s.examples, holdout=s.eval, base=s.base, name=name, gate=s.gate,
        store=s.out or artifacts_uri(),  # a folder or s3://...: a str (Path mangles URIs)
        work_dir=s.work_dir or Path("runs") / name,
    ))
    prices = price_for(s.teacher.model, load_prices(str(s.prices)) if s.prices else None)
    if not (os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN")):
        raise InputError("set ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL for a proxy) for the teacher")
    quota = s.quota.model_copy(update={"tenant": check_tenant(s.quota.tenant or default_tenant())})
    signer = signer_from_spec(s.sign, say=say)
    return CompilePlan(prepared=prepared, teacher=s.teacher, sample=s.sample, quota=quota, prices=prices, fit=s.fit,
                       signer=signer, new_version=s.new_version, address=s.address)


def run_compile(plan: CompilePlan, *, say: Say = lambda m: None, progress: StageProgress | None = None) -> CompileResult:
    """The compile behind the cluster's compile queue (``kolm_ray.compile.queued_compile``):
    an artifact of identical inputs is reused unless ``plan.new_version``. ``progress`` is told
    of each stage's progress (teacher calls, fit steps and loss, eval rows).
    Raises: whatever ``queued_compile`` raises (GateFailed below the gate)."""
    from kolm_ray.compile import queued_compile
    from kolm_ray.home import kolm_home

    return queued_compile(plan.prepared, state_dir=kolm_home(), teacher=plan.teacher, sample=plan.sample,
                          quota=plan.quota, prices=plan.prices, fit_cfg=plan.fit, signer=plan.signer, say=say,
                          progress=progress, new_version=plan.new_version, address=plan.address)
