"""``kolm compare``: two versions of a Specialist side by side, and whether to promote the new one.

Pipeline: ``load_side`` opens each artifact with ``open_verified`` (nothing is read before its
signature checks out) and returns its eval report and identity -> ``compare`` (pure) matches the
holdout rows by id, re-aggregates K, T, C, L over the rows both holdouts share, lists the rows
that passed before and fail now, and decides promote / hold / reject -> ``Comparison.lines()``
is the printed form.

The decision (``recommend``) is a pure function of the figures, in K points:

* ``reject``  when K fell by more than ``tolerance``;
* ``hold``    when K is within ``tolerance`` (or up) but more than ``max_regressions`` rows
  that passed in OLD fail in NEW;
* ``promote`` otherwise.

This module reads artifacts and compares them; it never writes, moves or re-signs one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kolm_ray.errors import InputError
from kolm_ray.kscore import RowScore, aggregate
from kolm_ray.verifier import Checks

COMPARISON_FORMAT_VERSION = 1
Recommendation = Literal["promote", "hold", "reject"]
_CLIP = 100  # characters of an output shown per side in the printed regressions block


class SideMeta(BaseModel):
    """Which artifact a report came from."""

    model_config = ConfigDict(frozen=True)
    name: str
    version: str
    source: str = Field("", description="Where the report was read from (artifact path), for error messages.")
    verifier_sha256: str | None = Field(None, description="Digest of the verifier.json that scored the report.")
    artifact_sha256: str | None = Field(None, description="SHA-256 of the artifact bytes that were verified.")


class SideFigures(BaseModel):
    """One artifact's student K, T, C, L (0-100; None where a check does not apply) over the shared rows."""

    model_config = ConfigDict(frozen=True)
    name: str
    version: str
    k: float
    t: float | None
    c: float
    l: float | None  # noqa: E741
    n: int
    passed: int


class RowChange(BaseModel):
    """A holdout row whose pass/fail verdict changed, with both outputs side by side."""

    model_config = ConfigDict(frozen=True)
    id: str
    input: str | None
    reference: str | None
    old_output: str | None
    new_output: str | None
    old_k: float = Field(description="The row's score in OLD, 0-100.")
    new_k: float = Field(description="The row's score in NEW, 0-100.")


class Comparison(BaseModel):
    """OLD vs NEW on the holdout rows they share; deltas are NEW - OLD in points."""

    model_config = ConfigDict(frozen=True)
    format_version: int = COMPARISON_FORMAT_VERSION
    old: SideFigures
    new: SideFigures
    delta_k: float
    delta_t: float | None
    delta_c: float
    delta_l: float | None
    shared_rows: int
    regressions: list[RowChange] = Field(description="Rows that passed in OLD and fail in NEW.")
    improvements: int = Field(description="Rows that failed in OLD and pass in NEW.")
    improved: list[str] = Field(description="Ids of those rows.")
    tolerance: float
    max_regressions: int
    recommendation: Recommendation
    reason: str
    notes: list[str] = Field(default_factory=list, description="Differing holdouts, names or verifiers.")

    def lines(self) -> list[str]:
        """The terminal report: figures, the decision, then regressed rows and notes."""
        o, n = self.old, self.new
        out = [
            _row("K-score", f"{n.k:.1f} {_arrow(self.delta_k)} from {o.k:.1f} ({_signed(self.delta_k)})"),
            _row("T / C / L", f"{_fmt(n.t)} / {_fmt(n.c)} / {_fmt(n.l)}  "
                              f"({_signed(self.delta_t)} / {_signed(self.delta_c)} / {_signed(self.delta_l)})"),
            _row("regressions", str(len(self.regressions))),
            _row("improvements", str(self.improvements)),
            _row("recommended", "promote new artifact" if self.recommendation == "promote"
                 else f"{self.recommendation}: {self.reason}"),
        ]
        if self.regressions:
            out.append("")
            out.append("regressed rows (passed in old, fail in new)")
            for r in self.regressions:
                out.append(f"  {r.id}  (k {r.old_k:.1f} → {r.new_k:.1f})")
                out.append(f"    old  {_clip(r.old_output)}")
                out.append(f"    new  {_clip(r.new_output)}")
        for note in self.notes:
            out.append(_row("note", note))
        return out


def recommend(delta_k: float, regressions: int, tolerance: float, max_regressions: int) -> tuple[Recommendation, str]:
    """The decision, a pure function of the figures (see the module docstring)."""
    if delta_k < -tolerance:
        return "reject", f"K fell by {-delta_k:.1f}, more than the tolerance of {tolerance:g}"
    if regressions > max_regressions:
        return "hold", (f"K is within tolerance ({_signed(delta_k)}) but {regressions} row(s) regressed, "
                        f"more than the {max_regressions} allowed")
    return "promote", (f"K {_signed(delta_k)} (tolerance {tolerance:g}) and {regressions} row(s) regressed "
                       f"(at most {max_regressions} allowed)")


def compare(
    old_report: dict[str, Any],
    new_report: dict[str, Any],
    old_meta: SideMeta,
    new_meta: SideMeta,
    tolerance: float = 0.5,
    max_regressions: int = 0,
) -> Comparison:
    """Compare two eval reports (``eval.json``) on the student's holdout rows they share.

    Rows are matched by id; a row whose input or reference differs between the two holdouts is
    not shared. K, T, C, L are re-aggregated from the per-row checks over the shared rows only,
    so both sides are scored on the same rows.

    Raises:
        InputError: a negative tolerance or max_regressions, a malformed report (missing rows,
            duplicate ids, a row without its checks), or no holdout rows in common.
    """
    if tolerance < 0:
        raise InputError(f"tolerance must be >= 0, got {tolerance:g}")
    if max_regressions < 0:
        raise InputError(f"max_regressions must be >= 0, got {max_regressions}")
    old_rows = _rows(old_report, old_meta)
    new_rows = _rows(new_report, new_meta)

    shared = [rid for rid, r in old_rows.items()
              if rid in new_rows and _task_of(r) == _task_of(new_rows[rid])]
    notes = _notes(old_rows, new_rows, shared, old_meta, new_meta)
    if not shared:
        raise InputError(f"the holdouts of {old_meta.source or old_meta.name} and {new_meta.source or new_meta.name} "
                         "share no row (same id, input and reference): nothing to compare")

    old_k = aggregate([RowScore(id=rid, checks=old_rows[rid]["checks"]) for rid in shared])
    new_k = aggregate([RowScore(id=rid, checks=new_rows[rid]["checks"]) for rid in shared])

    regressions, improved = [], []
    for rid in shared:
        o, n = old_rows[rid], new_rows[rid]
        if o["checks"].passed and not n["checks"].passed:
            regressions.append(RowChange(
                id=rid, input=o["input"], reference=o["reference"], old_output=o["output"],
                new_output=n["output"], old_k=100 * o["checks"].k, new_k=100 * n["checks"].k,
            ))
        elif not o["checks"].passed and n["checks"].passed:
            improved.append(rid)

    delta_k = new_k.k - old_k.k
    decision, reason = recommend(delta_k, len(regressions), tolerance, max_regressions)

    def side(meta: SideMeta, ks) -> SideFigures:
        return SideFigures(name=meta.name, version=meta.version, k=ks.k, t=ks.t, c=ks.c, l=ks.l, n=ks.n,
                           passed=ks.passed)

    return Comparison(
        old=side(old_meta, old_k), new=side(new_meta, new_k),
        delta_k=delta_k, delta_t=_delta(old_k.t, new_k.t), delta_c=new_k.c - old_k.c, delta_l=_delta(old_k.l, new_k.l),
        shared_rows=len(shared), regressions=regressions, improvements=len(improved), improved=improved,
        tolerance=tolerance, max_regressions=max_regressions, recommendation=decision, reason=reason, notes=notes,
    )


def load_side(artifact: str | Path, trust: Any) -> tuple[dict[str, Any], SideMeta]:
    """Open ``artifact`` verified under ``trust`` (a ``signing.Trust``); return its eval report and identity.

    Raises:
        InputError: unreadable artifact, or no readable ``eval.json`` in it.
        ArtifactRejected: the signature does not verify.
    """
    from kolm_ray.artifact import file_digest, open_verified_with_digest

    with open_verified_with_digest(artifact, trust) as (content, manifest, artifact_sha256):
        report_path = content / "eval.json"
        if not report_path.is_file():
            raise InputError("artifact has no specialist/eval.json: nothing to compare", path=str(artifact))
        try:
            report = json.loads(report_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"specialist/eval.json is not valid JSON ({e})", path=str(artifact)) from None
        verifier = content / "verifier.json"
        meta = SideMeta(
            name=str(manifest.get("name", "?")), version=str(manifest.get("version", "?")), source=str(artifact),
            verifier_sha256=file_digest(verifier) if verifier.is_file() else None, artifact_sha256=artifact_sha256,
        )
    return report, meta


# ----- inside compare -----------------------------------------------------------------------


def _rows(report: dict[str, Any], meta: SideMeta) -> dict[str, dict[str, Any]]:
    """id -> {input, reference, output, checks} for the student side; validated."""
    where = meta.source or f"{meta.name} {meta.version}"
    rows = report.get("rows") if isinstance(report, dict) else None
    if not isinstance(rows, list):
        raise InputError("eval report has no 'rows' list", path=where)
    out: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        student = row.get("student") if isinstance(row, dict) else None
        if not isinstance(student, dict) or "id" not in row:
            raise InputError(f"eval report row {i} has no id or no 'student' entry", path=where)
        rid = str(row["id"])
        if rid in out:
            raise InputError(f"eval report has the row id {rid!r} twice", path=where)
        try:
            checks = Checks.model_validate(student)
        except ValidationError as e:
            raise InputError(f"eval report row {rid!r} lacks the verifier's checks (t, c, l, k, passed): "
                             f"{e.errors()[0]['loc']} {e.errors()[0]['msg']}", path=where) from None
        out[rid] = {"input": row.get("input"), "reference": row.get("reference"),
                    "output": student.get("output"), "checks": checks}
    return out


def _task_of(row: dict[str, Any]) -> tuple[Any, Any]:
    return row["input"], row["reference"]


def _notes(old: dict, new: dict, shared: list[str], old_meta: SideMeta, new_meta: SideMeta) -> list[str]:
    notes = []
    only_old = sum(1 for rid in old if rid not in new)
    only_new = sum(1 for rid in new if rid not in old)
    changed = sum(1 for rid in old if rid in new) - len(shared)
    if only_old or only_new or changed:
        parts = [f"{only_old} row(s) only in old"] if only_old else []
        parts += [f"{only_new} only in new"] if only_new else []
        parts += [f"{changed} with a different input or reference"] if changed else []
        notes.append(f"holdouts differ ({', '.join(parts)}): compared on the {len(shared)} shared row(s) only")
    if old_meta.name != new_meta.name:
        notes.append(f"different Specialists: old is {old_meta.name!r}, new is {new_meta.name!r}")
    if old_meta.verifier_sha256 and new_meta.verifier_sha256 and old_meta.verifier_sha256 != new_meta.verifier_sha256:
        notes.append("verifiers differ: the two K-scores were computed by different verifiers")
    return notes


def _delta(old: float | None, new: float | None) -> float | None:
    return None if old is None or new is None else new - old


# ----- printed form -------------------------------------------------------------------------


def _row(label: str, value: str) -> str:
    return f"{label:<17}{value}"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _signed(x: float | None) -> str:
    # round first (and add 0.0 to turn -0.0 into 0.0) so the sign matches the printed digits
    return "n/a" if x is None else f"{round(x, 1) + 0.0:+.1f}"


def _arrow(delta: float) -> str:
    d = round(delta, 1)
    return "↑" if d > 0 else "↓" if d < 0 else "="


def _clip(text: str | None) -> str:
    if text is None:
        return "(no output)"
    flat = " ".join(text.split())
    return flat if len(flat) <= _CLIP else flat[: _CLIP - 1] + "…"
