"""``kolm compile``: the whole pipeline in one place.

    verifier -> teacher -> fit -> eval -> gate -> sign

``compile_specialist`` calls the stages in that order; each is a named function below. Every
stage is resumable: the teacher's answers are cached, the fit resumes from its last checkpoint
(Ray Train run snapshot), and a finished fit or eval is reused when its inputs have not changed.
Inputs are validated by the caller (``prepare``) before Ray starts or a call is paid for, and the
set-up (base, LoRA targets, chat template, signer, store, cluster) by ``kolm_ray.preflight`` in
``queued_compile``, before the teacher stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kolm_ray.artifact import (
    ARTIFACT_FORMAT_VERSION, artifact_name, check_name, check_within_limits, file_digest, pack,
    put_artifact, release_version, reserve_version,
)
from kolm_ray.durable import json_bytes, write_json
from kolm_ray.errors import GateFailed, InputError
from kolm_ray.home import store_uri, teacher_cache_dir
from kolm_ray.kscore import KScore
from kolm_ray.metrics import finishes_stage_clocks
from kolm_ray.progress import StageProgress, guarded
from kolm_ray.provenance import package_versions, parent_or_none
from kolm_ray.rows import read_rows
from kolm_ray.sampling.config import QuotaConfig, SampleConfig, TeacherConfig
from kolm_ray.sampling.fanout import SampleOutcome, sample_rows, write_samples
from kolm_ray.sampling.pricing import Prices
from kolm_ray.signing import Signer
from kolm_ray.store import is_remote, join, open_store
from kolm_ray.train.base import BaseRef, directory_digest, resolve_base
from kolm_ray.train.config import FitConfig
from kolm_ray.train.eval import EVAL_PATH_VERSION, EvalResult, decoding_for, evaluate
from kolm_ray.train.fit import FitResult, fit, run_name
from kolm_ray.verifier import Verifier, synthesize

Progress = Callable[[str], None]


class StageMonitor(Protocol):
    """Who watches a compile from outside (the compile queue): the stage it is in, progress
    within it, and the teacher spend so far."""

    def stage(self, name: str, total: int = 0) -> None: ...
    def progress(self, n: int) -> None: ...
    def spend(self, usd: float) -> None: ...


class _Unwatched:
    def stage(self, name: str, total: int = 0) -> None:
        pass

    def progress(self, n: int) -> None:
        pass

    def spend(self, usd: float) -> None:
        pass


class CompileConfig(BaseModel):
    """Everything one compile needs besides its stage configs."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    task: str = Field(description="The task instruction.")
    examples: Path = Field(description="Rows to distill from.")
    holdout: Path = Field(description="Held-out rows with reference outputs, for the K-score.")
    base: str = Field(description="Base model: short name, hub id or local folder.")
    name: str = Field(description="Specialist name (artifact NAME-MAJOR.MINOR.kolm).")
    gate: float | None = Field(None, description="Minimum holdout K-score for a promotable artifact.")
    store: str = Field(description="Where artifacts are written: a folder, or s3://BUCKET/PREFIX (each "
                       "version created if absent, never overwritten).")
    work_dir: Path = Field(description="Per-compile working state: samples, checkpoints, eval.")

    @field_validator("store", mode="before")
    @classmethod
    def _store_location(cls, v: Any) -> Any:
        """A folder (str or Path) or an object-storage URI that can create-if-absent.
        Raises: InputError (a malformed URI, or gs://, which has no create-if-absent here)."""
        from kolm_ray.store import is_remote, open_store

        if isinstance(v, Path):
            v = str(v)
        if not isinstance(v, str):
            return v  # pydantic says what is wrong with it
        store = open_store(v)
        if not store.can_create_if_absent:
            raise InputError(f"artifact store {v!r}: {store.uri.partition(':')[0]}:// has no create-if-absent here, "
                             "so versions could be overwritten: use s3://BUCKET/PREFIX or a folder (--out)")
        return store.uri if is_remote(v) else v


def parse_gate(text: str | None) -> float | None:
    """``K=88`` -> 88.0, a K-score from 0 to 100. Raises: InputError for anything else."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*[Kk]\s*=\s*(\d+(?:\.\d+)?)\s*", text)
    if not m or not 0 <= float(m.group(1)) <= 100:
        raise InputError(f"invalid --gate {text!r}: write it as K=88 (a K-score from 0 to 100)")
    return float(m.group(1))


def derive_name(task: str) -> str:
    words = [w for w in re.findall(r"[a-z0-9]+", task.lower()) if w not in {"a", "an", "the", "for", "of", "to", "and"}]
    return check_name("-".join(words[:4])[:40].strip("-") or "specialist")


@dataclass(frozen=True)
class Prepared:
    cfg: CompileConfig
    rows: pa.Table
    holdout: pa.Table
    base: BaseRef


def prepare(cfg: CompileConfig) -> Prepared:
    """Validate every input before anything runs. Raises: InputError."""
    check_name(cfg.name)
    rows = read_rows(cfg.examples)
    holdout = read_rows(cfg.holdout, require_output=True)
    base = resolve_base(cfg.base)
    if cfg.gate is not None and not 0 <= cfg.gate <= 100:
        raise InputError(f"--gate K={cfg.gate:g} is outside 0..100")
    for where in {cfg.store, teacher_cache_dir()}:  # a missing bucket fails here, not at the first write
        if is_remote(where):
            open_store(where).check()
    return Prepared(cfg=cfg, rows=rows, holdout=holdout, base=base)


@dataclass(frozen=True)
class CompileResult:
    artifact: Path | str  # a local path, or the object's URI in an object store
    name: str
    version: str
    student: KScore
    base: KScore
    fit: FitResult | None  # None: an artifact of identical inputs was reused (``reused``)
    sampling: SampleOutcome | None
    size_bytes: int
    reused: bool = False


# ----- identical inputs: one version ---------------------------------------------------------

# Fields that change how a compile runs, never what it makes: left out of its recipe.
_OPERATIONAL = {"fit": {"cpus_per_worker", "checkpoint_every", "max_failures"},
                "sample": {"concurrency", "actors", "batch_poll_s", "max_failed_fraction"},
                "teacher": {"timeout_s", "max_attempts"}}


def recipe_digest(p: Prepared, teacher: TeacherConfig, sample: SampleConfig, fit_cfg: FitConfig,
                  signer: Signer) -> str | None:
    """What the artifact is made of and signed with: the task, the rows' bytes, the base, the
    teacher (its model, settings and endpoint), sampling and fit settings, the signer's public
    key, and the versions of the code and formats that score it. Two compiles with the same
    recipe make the same Specialist, so the second reuses the first's version (unless
    ``--new-version``). None for a keyless signer, whose identity is only known once it signs."""
    from kolm_ray import __version__
    from kolm_ray.sampling.fanout import SAMPLES_FORMAT_VERSION

    public = signer.public_pem()
    if public is None:
        return None
    parts = {
        "kolm_ray": __version__, "formats": [SAMPLES_FORMAT_VERSION, EVAL_PATH_VERSION, ARTIFACT_FORMAT_VERSION],
        # The endpoint answers: a recorded stand-in and the live API are different teachers.
        "endpoint": (os.environ.get("ANTHROPIC_BASE_URL") or "").rstrip("/") or None,
        "task": p.cfg.task, "name": p.cfg.name,
        "examples": file_digest(p.cfg.examples), "holdout": file_digest(p.cfg.holdout),
        # A local base by its content only: `./tiny-base` and `examples/../tiny-base` are one base.
        "base": {k: v for k, v in p.base.fingerprint().items() if not (p.base.local and k == "id")},
        "teacher": teacher.model_dump(mode="json", exclude=_OPERATIONAL["teacher"]),
        "sample": sample.model_dump(mode="json", exclude=_OPERATIONAL["sample"]),
        "fit": fit_cfg.model_dump(mode="json", exclude=_OPERATIONAL["fit"]),
        "signer": hashlib.sha256(public).hexdigest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _recipe_key(name: str, recipe: str) -> str:
    return f"recipes/{name}/{recipe[:32]}.json"


def stage_reuse(p: Prepared, recipe: str, signer: Signer, say: Progress = lambda s: None) -> CompileResult | None:
    """The artifact an earlier compile of the same recipe put in the store, if it is still
    there, verifies under ``signer``'s public key, and its signed manifest names this recipe;
    None otherwise (a record or artifact that cannot be used is said and ignored).

    Raises:
        GateFailed: that artifact's K-score is below this compile's gate (nothing written).
    """
    import tempfile

    from kolm_ray.artifact import open_verified
    from kolm_ray.errors import KolmError
    from kolm_ray.signing import Trust

    store = open_store(p.cfg.store)
    key = _recipe_key(p.cfg.name, recipe)
    if not store.exists(key):
        return None
    try:
        entry = json.loads(store.read_bytes(key))
        fname = entry["artifact"]
        if not store.exists(fname):
            return None  # deleted since: compile it again
        with tempfile.TemporaryDirectory() as td:
            pub = Path(td) / "signer.pub"
            pub.write_bytes(signer.public_pem() or b"")
            with open_verified(store.url(fname), Trust(public_key=pub)) as (_, manifest):
                size = store.size(fname)
    except (KolmError, KeyError, TypeError, ValueError, OSError) as e:
        say(f"recompile   {fname if 'fname' in locals() else key} cannot be reused ({type(e).__name__}: {e})")
        return None
    if manifest.get("recipe") != recipe:
        return None
    student, base = (KScore.model_validate({**manifest["kscore"][side], "rows": []}) for side in ("student", "base"))
    if p.cfg.gate is not None and student.k < p.cfg.gate:
        raise GateFailed(f"{fname} was compiled from identical inputs and has K-score {student.k:.1f}, "
                         f"below the gate K={p.cfg.gate:g}: change the inputs, or pass --new-version to compile again")
    where = store.url(fname) if is_remote(p.cfg.store) else Path(store.url(fname))
    return CompileResult(artifact=where, name=p.cfg.name, version=manifest["version"], student=student, base=base,
                         fit=None, sampling=None, size_bytes=size, reused=True)


def _record_recipe(p: Prepared, recipe: str, version: tuple[int, int]) -> None:
    open_store(p.cfg.store).write_bytes(_recipe_key(p.cfg.name, recipe), json_bytes(
        {"artifact": artifact_name(p.cfg.name, version), "version": f"{version[0]}.{version[1]}"}))


# ----- the stages ----------------------------------------------------------------------------


def stage_verifier(p: Prepared) -> Verifier | None:
    refs = p.rows.column("output").to_pylist()
    if not any(refs):
        return None  # learned from the teacher's samples in the next stage
    return synthesize(p.cfg.task, refs, p.rows.column("input").to_pylist())


def stage_teacher(p: Prepared, verifier: Verifier | None, teacher: TeacherConfig, sample: SampleConfig,
                  quota: QuotaConfig, prices: Prices, progress: Callable[[int], None] | None,
                  say: Progress = lambda s: None) -> SampleOutcome:
    """Raises: BudgetExceeded before any call when the estimate passes ``--max-cost`` or the
    tenant's budget; TeacherError past the failed-rows threshold."""
    outcome = sample_rows(p.cfg.task, p.rows, teacher=teacher, sample=sample, quota=quota, prices=prices,
                          cache_dir=teacher_cache_dir(), verifier=verifier, progress=progress,
                          on_budget=lambda check: [say(line) for line in check.lines()])
    write_samples(p.cfg.work_dir / "samples", outcome)
    return outcome


def distillation_pairs(outcome: SampleOutcome) -> list[tuple[str, str]]:
    """The chosen sample of every row whose chosen sample passes the verifier."""
    return [(r["input"], r["text"]) for r in outcome.samples.to_pylist() if r["chosen"] and r["passed"]]


def stage_fit(p: Prepared, pairs: list[tuple[str, str]], cfg: FitConfig, say: Progress = lambda s: None,
              progress: StageProgress | None = None) -> FitResult:
    if not pairs and (cfg.max_steps is None or cfg.max_steps > 0):
        raise InputError("no teacher sample passed the verifier: nothing to distill (see samples/summary.json)")
    name = run_name(p.base, p.cfg.task, pairs, cfg)
    done = p.cfg.work_dir / "fit" / name
    marker = done / "fit.json"
    if marker.is_file():  # this exact fit already finished: reuse it
        data = json.loads(marker.read_text())
        data["loss_curve"] = [tuple(x) for x in data["loss_curve"]]
        return FitResult(**{**data, "adapter_dir": Path(data["adapter_dir"]), "steps_this_run": 0})
    # Checkpoints go where every node can reach them: the object store when KOLM_HOME is one.
    storage = join(store_uri(), "train", p.cfg.name) if is_remote(store_uri()) else p.cfg.work_dir / "train"
    result = fit(p.base, p.cfg.task, pairs, cfg, storage=storage, dest=done / "adapter", say=say, progress=progress)
    write_json(marker, {**result.__dict__, "adapter_dir": str(result.adapter_dir)})
    return result


def stage_eval(p: Prepared, verifier: Verifier, adapter: Path | None, fit_cfg: FitConfig,
               on_rows: Callable[[int], None] = lambda n: None) -> EvalResult:
    h = p.holdout
    key = hashlib.sha256(json.dumps([
        EVAL_PATH_VERSION, verifier.to_json(), p.base.fingerprint(), p.cfg.task, h.to_pylist(),
        directory_digest(adapter) if adapter else None, decoding_for(verifier).manifest(),
    ], sort_keys=True, default=str).encode()).hexdigest()[:16]
    cached = p.cfg.work_dir / "eval" / f"{key}.json"
    if cached.is_file():
        data = json.loads(cached.read_text())
        on_rows(h.num_rows)
        return EvalResult(score=KScore.model_validate(data["score"]), outputs=data["outputs"])
    import ray

    use_gpu = fit_cfg.use_gpu if fit_cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    result = evaluate(verifier, p.base.source, str(adapter) if adapter else None, p.cfg.task,
                      h.column("id").to_pylist(), h.column("input").to_pylist(), h.column("output").to_pylist(),
                      workers=fit_cfg.workers, use_gpu=use_gpu, cpus_per_worker=fit_cfg.cpus_per_worker,
                      on_rows=on_rows)
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_json(cached, {"score": result.score.model_dump(), "outputs": result.outputs})
    return result


def stage_gate(p: Prepared, student: EvalResult, report: dict[str, Any], version: str) -> None:
    """Raises: GateFailed (exit 3) below the gate, after keeping the report under rejected/."""
    if p.cfg.gate is None or student.score.k >= p.cfg.gate:
        return
    from kolm_ray.store import open_store

    store = open_store(p.cfg.store)
    key = f"rejected/{p.cfg.name}-{version}.report.json"
    store.write_bytes(key, json_bytes(report))
    major, _, minor = version.partition(".")
    release_version(store, p.cfg.name, (int(major), int(minor)))  # no artifact: the next compile takes it
    raise GateFailed(
        f"K-score {student.score.k:.1f} is below the gate K={p.cfg.gate:g} by {p.cfg.gate - student.score.k:.1f}; "
        f"no artifact written. Report kept for inspection: {store.url(key)}"
    )


def stage_sign(p: Prepared, version: tuple[int, int], files: dict[str, Any], adapter: Path, signer: Signer) -> Path:
    """Sign and pack the Specialist, then put it in the store as ``NAME-X.Y.kolm`` (a ``version``
    from ``reserve_version``), create-if-absent. Returns the artifact's local path: in a folder
    store the artifact itself; in an object store the packed copy that was uploaded, kept as
    ``work_dir/artifacts/NAME-X.Y.kolm`` (the object is ``kolm_ray.store.join(cfg.store, artifact_name(...))``).

    Raises:
        KolmRuntimeError: ``NAME-X.Y.kolm`` already exists in the store (it is never overwritten).
    """
    from kolm_ray.store import is_remote

    fname = artifact_name(p.cfg.name, version)
    staging = p.cfg.work_dir / "artifact-staging"
    if staging.exists():
        shutil.rmtree(staging)
    content = staging / "specialist"
    content.mkdir(parents=True)
    shutil.copytree(adapter, content / "adapter")
    for member, data in files.items():
        if isinstance(data, str):
            (content / member).write_text(data)
        else:
            write_json(content / member, data)
    check_within_limits(content)  # before signing: an artifact no reader would unpack is not written
    signature = staging / "specialist.sig"
    signer.sign(content, signature)
    packed = pack(content, signature, staging / fname)
    where = put_artifact(p.cfg.store, packed, p.cfg.name, version)
    local = Path(where)
    if is_remote(p.cfg.store):
        local = p.cfg.work_dir / "artifacts" / fname
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(packed, local)
    shutil.rmtree(staging, ignore_errors=True)
    return local


# ----- the pipeline --------------------------------------------------------------------------


@finishes_stage_clocks  # a stage that raises is timed too (its StageClock is finished on the way out)
def compile_specialist(
    p: Prepared,
    *,
    teacher: TeacherConfig,
    sample: SampleConfig,
    quota: QuotaConfig,
    prices: Prices,
    fit_cfg: FitConfig,
    signer: Signer,
    say: Progress = lambda s: None,
    teacher_progress: Callable[[int], None] | None = None,
    monitor: StageMonitor | None = None,
    recipe: str | None = None,
    progress: StageProgress | None = None,
) -> CompileResult:
    """verifier -> teacher -> fit -> eval -> gate -> sign.

    ``recipe`` (``recipe_digest``) is recorded in the manifest and the store, so a later compile
    of identical inputs finds this version (``stage_reuse``). ``progress`` is told of each
    stage's progress: teacher calls, fit steps (with the loss), eval rows.

    Raises:
        GateFailed: the student's holdout K-score is below the gate (no artifact written).
        TeacherError / KolmRuntimeError: a stage failed at run time (re-running resumes).
    """
    cfg = p.cfg
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    from kolm_ray.metrics import StageClock, record_teacher

    watch = StageClock(monitor or _Unwatched(), cfg.name, quota.tenant)  # times each stage, as a metric

    shown = guarded(progress)  # a display that raises turns itself off: it never fails a paid compile

    def on_teacher(n: int) -> None:
        watch.progress(n)
        shown.advance(n)
        if teacher_progress:
            teacher_progress(n)

    watch.stage("verifier")
    verifier = stage_verifier(p)
    if verifier is not None:
        say("verifier    " + " · ".join(verifier.learned()))
    else:
        say("verifier    deferred: no reference outputs; learned from the teacher's samples by consensus")

    rows = p.rows.num_rows if sample.n is None else min(sample.n, p.rows.num_rows)
    watch.stage("teacher", rows * sample.samples_per_input)
    shown.stage("teacher", rows * sample.samples_per_input, "calls")
    outcome = stage_teacher(p, verifier, teacher, sample, quota, prices, on_teacher, say)
    if verifier is None:
        say("verifier    " + " · ".join(outcome.verifier.learned()))
    verifier = outcome.verifier
    s = outcome.summary
    watch.spend(s.cost_usd)
    record_teacher(cfg.name, quota.tenant, s)
    say(s.headline())
    if s.low_agreement_rows:
        say(f"            {s.low_agreement_rows} rows where under {100 * s.min_agreement:g}% of the samples agree with "
            f"the kept one (the teacher is unsure): {', '.join(s.low_agreement_row_ids[:5])}"
            f"{' …' if s.low_agreement_rows > 5 else ''} (see samples/samples.parquet, column agreement)")

    pairs = distillation_pairs(outcome)
    watch.stage("fit")
    shown.stage("fit", None, "steps")  # the total is known once the workers have tokenized the pairs
    fitted = stage_fit(p, pairs, fit_cfg, say, shown)
    resumed = f", resumed at step {fitted.resumed_from_step}" if fitted.resumed_from_step else ""
    reused = " (reused)" if fitted.steps_this_run == 0 and fitted.steps else ""
    loss = (f"loss {fitted.loss_start:.3f} → {fitted.loss_end:.3f}" if fitted.loss_curve else "no steps")
    say(f"fit         LoRA r={fit_cfg.lora_r} on {p.base.name}: {fitted.steps} steps on {len(pairs)} examples, "
        f"{fitted.workers} {fitted.device} worker(s), {fitted.train_seconds:.1f} s, {loss}{resumed}{reused}")

    watch.stage("eval", 2)
    eval_started = time.perf_counter()  # the manifest's eval_*_seconds (kolm report prices the compile with it)
    shown.stage("eval", 2 * p.holdout.num_rows, "rows")  # the student's outputs, then the base's
    student = stage_eval(p, verifier, fitted.adapter_dir, fit_cfg, shown.advance)
    watch.progress(1)
    base = stage_eval(p, verifier, None, fit_cfg, shown.advance)
    shown.done()
    eval_seconds = round((time.perf_counter() - eval_started) * fit_cfg.workers, 3)  # wall x workers, as the fit's
    say(f"eval        student {student.score.line()} · base {base.score.line()}")

    watch.stage("sign")
    version = reserve_version(cfg.store, cfg.name)  # create-if-absent: no other compile gets it
    vstr = f"{version[0]}.{version[1]}"
    h = p.holdout
    eval_report = {
        "student": _score_summary(student.score),
        "base": _score_summary(base.score),
        "rows": [
            {"id": rid, "input": inp, "reference": ref,
             "student": {"output": so, **sr.checks.model_dump()},
             "base": {"output": bo, **br.checks.model_dump()}}
            for rid, inp, ref, so, sr, bo, br in zip(
                h.column("id").to_pylist(), h.column("input").to_pylist(), h.column("output").to_pylist(),
                student.outputs, student.score.rows, base.outputs, base.score.rows)
        ],
    }
    stage_gate(p, student, {"name": cfg.name, "version": vstr, "gate": cfg.gate, "eval": eval_report}, vstr)

    samples_file = cfg.work_dir / "samples" / "samples.parquet"
    manifest = {
        "format_version": ARTIFACT_FORMAT_VERSION,
        "name": cfg.name,
        "version": vstr,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "task": cfg.task,
        "recipe": recipe,
        "base": p.base.manifest_entry(),  # a hub base: its commit, what fit, eval and serving load
        "prompt": {"system": cfg.task, "format": "chat_template"},
        "generation": decoding_for(verifier).manifest(),  # what the eval decoded with; serving reads it
        "teacher": {"model": teacher.model, "samples_per_input": sample.samples_per_input, "mode": s.mode, "samples": s.samples,
                    "recorded": s.recorded, "served_by": s.served_by,
                    "prompt_sha256": outcome.prompt_sha256,  # the system prompt every call shared
                    "usage": s.dataset_usage.model_dump(), "cost_usd": s.dataset_cost_usd,
                    "paid_this_run_usd": s.cost_usd},
        "digests": {"examples": file_digest(cfg.examples), "holdout": file_digest(cfg.holdout),
                    "distillation": file_digest(samples_file)},
        "kscore": {"student": _score_summary(student.score), "base": _score_summary(base.score)},
        "gate": {"k": cfg.gate, "passed": True} if cfg.gate is not None else None,
        "compute": {"teacher_cost_usd": s.dataset_cost_usd, f"fit_{fitted.device}_seconds": fitted.worker_seconds,
                    f"eval_{fitted.device}_seconds": eval_seconds,
                    "compile_seconds": round(time.perf_counter() - started, 1)},
        "fit": {"steps": fitted.steps, "examples": len(pairs), "loss_start": fitted.loss_start,
                "loss_end": fitted.loss_end, "tokens": fitted.tokens},
        "packages": package_versions(),
        "parent": parent_or_none(cfg.store, cfg.name, version, say),  # the version this one recompiles
    }
    train = {"config": fit_cfg.model_dump(mode="json"), "loss_curve": fitted.loss_curve, "tokens": fitted.tokens,
             "train_seconds": fitted.train_seconds, "workers": fitted.workers, "device": fitted.device,
             "resumed_from_step": fitted.resumed_from_step, "steps_this_run": fitted.steps_this_run,
             "run_name": fitted.run_name}
    files = {"manifest.json": manifest, "verifier.json": verifier.to_json(), "eval.json": eval_report,
             "train.json": train}
    dest = stage_sign(p, version, files, fitted.adapter_dir, signer)
    if recipe is not None:
        _record_recipe(p, recipe, version)
    where = join(cfg.store, artifact_name(cfg.name, version)) if is_remote(cfg.store) else dest
    say(f"signed      {where} ({dest.stat().st_size / 1e6:.2f} MB, {signer.describe()})")
    watch.finish()
    return CompileResult(artifact=where, name=cfg.name, version=vstr, student=student.score, base=base.score,
                         fit=fitted, sampling=outcome, size_bytes=dest.stat().st_size)


def _score_summary(k: KScore) -> dict[str, Any]:
    return {"k": round(k.k, 2), "t": None if k.t is None else round(k.t, 2), "c": round(k.c, 2),
            "l": None if k.l is None else round(k.l, 2), "n": k.n, "passed": k.passed}


def queued_compile(p: Prepared, *, state_dir: Path, fit_cfg: FitConfig, quota: QuotaConfig,
                   say: Progress = lambda s: None, new_version: bool = False, address: str | None = None,
                   **stages: Any) -> CompileResult:
    """``compile_specialist`` behind the cluster's compile queue: wait for admission (holding
    nothing), run with the granted per-worker resources, heartbeat the stage and spend.

    First the preflight (``kolm_ray.preflight.check_setup``): base, LoRA target modules (resolved
    from the architecture when not given), chat template, signer, store and work dir, before
    anything is paid. An artifact compiled before from identical inputs is returned as it is,
    without queueing or any stage running, unless ``new_version``. Otherwise asks the teacher's
    free token-counting endpoint that it answers the key (``preflight.check_teacher``), joins the Ray cluster
    at ``address`` (Ray's own log lines go to ``work_dir/ray.log``) and refuses a compile that
    could never fit on it (``preflight.check_cluster``), then says the preflight line.

    Raises:
        InputError / ServiceUnreachable: the preflight failed (nothing paid, nothing queued).
        CompileCancelled: cancelled (``kolm cancel``) or rejected by the queue.
        plus whatever ``compile_specialist`` raises.
    """
    import ray

    from kolm_ray.admission import Demand, admitted
    from kolm_ray.preflight import check_cluster, check_setup, check_teacher, join_cluster

    setup = check_setup(p.base, fit_cfg, stages["signer"], store=p.cfg.store, work_dir=p.cfg.work_dir,
                        teacher_cache=teacher_cache_dir())
    fit_cfg = setup.fit_cfg  # the target modules resolved: the recipe and the run name hash these
    # A hub base pinned to its commit: the recipe, the run name, the eval and the manifest use it.
    p = Prepared(cfg=p.cfg, rows=p.rows, holdout=p.holdout, base=setup.base.ref)
    recipe = recipe_digest(p, stages["teacher"], stages["sample"], fit_cfg, stages["signer"])
    if recipe is not None and not new_version and (same := stage_reuse(p, recipe, stages["signer"], say)) is not None:
        say(f"unchanged   identical inputs to {p.cfg.name}-{same.version}: reusing it, nothing paid or trained "
            "(--new-version compiles again)")
        return same
    teacher_ok = check_teacher(stages["teacher"].model)  # free: a token count, nothing paid
    join_cluster(address, log_file=p.cfg.work_dir / "ray.log")
    say(setup.line(check_cluster(fit_cfg, state_dir), teacher=teacher_ok))
    use_gpu = fit_cfg.use_gpu if fit_cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    demand = Demand(workers=fit_cfg.workers, cpus_per_worker=fit_cfg.cpus_per_worker or 1.0,
                    gpus_per_worker=1.0 if use_gpu else 0.0)
    with admitted(state_dir, quota.tenant or "default", p.cfg.name, demand, say) as adm:
        assert adm.grant is not None
        granted = fit_cfg.model_copy(update={"cpus_per_worker": adm.grant.cpus_per_worker, "use_gpu": use_gpu})
        # The ticket holds the compile's teacher slots too: `kolm cancel` frees both at once.
        claim = quota.model_copy(update={"holder": adm.ticket})
        adm.probe = lambda: _teacher_spend(adm.ticket)
        return compile_specialist(p, fit_cfg=granted, quota=claim, say=say, monitor=adm, recipe=recipe, **stages)


def _teacher_spend(holder: str) -> float | None:
    """What ``holder`` has paid the teacher so far, from the cluster's quota book."""

    import ray

    from kolm_ray.sampling.limits import teacher_identity
    from kolm_ray.sampling.quota import NAMESPACE, quota_name

    actor = ray.get_actor(quota_name(*teacher_identity()),
                          namespace=NAMESPACE)
    held = ray.get(actor.stats.remote(holder), timeout=10).get("holder")
    return None if held is None else float(held["spend"]["usd"])
