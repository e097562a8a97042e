"""The teacher calls of a sampling run, as tables: what both ways of calling the teacher take and
return, so that the online fan-out (``fanout.call_teacher``) and the Message Batches path
(``batch.call_teacher_batch``) agree on them (``fanout`` hands ``--batch`` runs to ``batch``; ``batch`` never imports ``fanout``).

Owns the plan both paths are given (``SamplingPlan``), the expansion of a row into its k
requests (``expand``, rows of ``REQUEST_SCHEMA``), and the row each answered (or failed) call
becomes (``result_row``, rows of ``CALL_SCHEMA``: the written ``SAMPLE_SCHEMA`` columns plus the
calls' timing). Must not call the teacher, score or select anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from kolm_ray.sampling.config import QuotaConfig, SampleConfig, TeacherConfig
from kolm_ray.sampling.teacher import SampleResult

SAMPLE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("input", pa.string()),
        ("reference", pa.string()),
        ("sample_index", pa.int32()),
        ("key", pa.string()),
        ("text", pa.string()),
        ("error", pa.string()),
        ("failures", pa.string()),
        ("attempts", pa.int32()),
        ("cached", pa.bool_()),
        ("input_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("cache_read_tokens", pa.int64()),
        ("cache_write_tokens", pa.int64()),
        ("served_model", pa.string()),
    ]
)
# What the calls add for the stage's own report and never write: when the teacher was seen
# unavailable for each sample, and when it answered (epoch seconds).
TIMING_COLUMNS = [("unavailable_at", pa.list_(pa.float64())), ("answered_at", pa.float64())]
CALL_SCHEMA = pa.schema(list(SAMPLE_SCHEMA) + [pa.field(n, t) for n, t in TIMING_COLUMNS])

REQUEST_SCHEMA = pa.schema([("id", pa.string()), ("input", pa.string()), ("reference", pa.string()),
                            ("sample_index", pa.int64())])


@dataclass(frozen=True)
class SamplingPlan:
    """What every call of a run is made from: the task, the system prompt, and the stage's configs."""

    task: str
    system: list[dict[str, Any]]
    teacher: TeacherConfig
    sample: SampleConfig
    quota: QuotaConfig
    cache_dir: str


def expand(row: dict[str, Any], k: int) -> list[dict[str, Any]]:
    """The k requests (``REQUEST_SCHEMA`` rows) of one input row, sample indices 0..k-1."""
    return [
        {"id": row["id"], "input": row["input"], "reference": row["output"], "sample_index": j} for j in range(k)
    ]


def result_row(req: dict[str, Any], key: str, res: SampleResult) -> dict[str, Any]:
    """The ``CALL_SCHEMA`` row of request ``req`` (cache key ``key``) once called: its answer or
    its error, attempts, tokens and timing."""
    return {
        "id": req["id"], "input": req["input"], "reference": req["reference"],
        "sample_index": int(req["sample_index"]), "key": key, "text": res.text, "error": res.error,
        "failures": ",".join(res.failures), "attempts": res.attempts, "cached": res.cached,
        "input_tokens": res.usage.input_tokens, "output_tokens": res.usage.output_tokens,
        "cache_read_tokens": res.usage.cache_read_tokens, "cache_write_tokens": res.usage.cache_write_tokens,
        "served_model": res.served_model,
        "unavailable_at": list(res.unavailable_at), "answered_at": res.answered_at,
    }
