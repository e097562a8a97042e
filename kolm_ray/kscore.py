"""K-score: the verifier's per-row checks aggregated over a set of rows.

``K = 100 x mean over rows of the weighted per-row score``; T, C and L are reported 0-100
each (``None`` where the check does not apply to the task's kind), with a pass/fail per row.
Owns aggregation and its printed form only; the checks themselves live in ``verifier``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from pydantic import BaseModel, ConfigDict

from kolm_ray.verifier import Checks, Verifier


class RowScore(BaseModel):
    model_config = ConfigDict(frozen=True)
    id: str
    checks: Checks


class KScore(BaseModel):
    """Aggregate verifier score over rows; ``rows`` keeps each row's checks."""

    model_config = ConfigDict(frozen=True)
    k: float
    t: float | None
    c: float
    l: float | None  # noqa: E741
    n: int
    passed: int
    rows: list[RowScore]

    @property
    def pass_rate(self) -> float:
        return self.passed / self.n if self.n else 0.0

    def line(self) -> str:
        """``K-score 93.4 (T 95.1 / C 92.0 / L 92.8)``; n/a for a check that does not apply."""

        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.1f}"

        return f"K-score {self.k:.1f} (T {fmt(self.t)} / C {fmt(self.c)} / L {fmt(self.l)})"


def aggregate(rows: Sequence[RowScore]) -> KScore:
    """Aggregate per-row checks; an empty input gives K 0 with n 0."""
    n = len(rows)

    def mean(values: Iterable[float | None]) -> float | None:
        vals = [v for v in values if v is not None]
        return 100.0 * sum(vals) / len(vals) if vals else None

    return KScore(
        k=mean(r.checks.k for r in rows) or 0.0,
        t=mean(r.checks.t for r in rows),
        c=mean(r.checks.c for r in rows) or 0.0,
        l=mean(r.checks.l for r in rows),
        n=n,
        passed=sum(r.checks.passed for r in rows),
        rows=list(rows),
    )


def score_rows(
    verifier: Verifier,
    ids: Sequence[str],
    outputs: Sequence[str | None],
    inputs: Sequence[str | None] | None = None,
    references: Sequence[str | None] | None = None,
) -> KScore:
    """Score aligned outputs (a missing output scores as empty) into a K-score."""
    rows = [
        RowScore(
            id=ids[i],
            checks=verifier.score(
                outputs[i] or "",
                inputs[i] if inputs is not None else None,
                references[i] if references is not None else None,
            ),
        )
        for i in range(len(ids))
    ]
    return aggregate(rows)
