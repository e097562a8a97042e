"""The sampling stage run on its own, outside a compile: what ``kolm sample`` does once its flags
are parsed.

Pipeline: ``prepare_sampling`` (read the rows, price the teacher, find its key, pick where the
samples go: everything the user gave is checked before Ray starts or a call is paid for) ->
``run_sampling`` (join Ray, ``fanout.sample_rows``, ``fanout.write_samples``).

Prints nothing: the teacher's progress and the budget check go to the caller's callbacks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from kolm_ray import cluster
from kolm_ray.errors import InputError
from kolm_ray.home import teacher_cache_dir
from kolm_ray.progress import NoProgress, StageProgress
from kolm_ray.rows import read_rows
from kolm_ray.sampling.budget import BudgetCheck
from kolm_ray.sampling.config import QuotaConfig, SampleConfig, TeacherConfig
from kolm_ray.sampling.fanout import (
    SampleOutcome,
    sample_rows,
    samples_target,
    write_samples,
)
from kolm_ray.sampling.pricing import Prices, load_prices, price_for
from kolm_ray.store import is_remote


@dataclass(frozen=True)
class SamplingRun:
    """One checked sampling run: the task, its rows, the configs, the teacher's price, where to write."""

    task: str
    rows: pa.Table
    teacher: TeacherConfig
    sample: SampleConfig
    quota: QuotaConfig
    prices: Prices
    out: str | Path  # a folder, or s3://bucket/prefix

    @property
    def calls(self) -> int:
        """Teacher samples asked for: k per row sampled."""
        return min(self.rows.num_rows, self.sample.n or self.rows.num_rows) * self.sample.samples_per_input


def prepare_sampling(task: str, examples: str | Path, *, teacher: TeacherConfig, sample: SampleConfig,
                     quota: QuotaConfig, prices_file: str | Path | None = None,
                     out_dir: str | Path | None = None) -> SamplingRun:
    """Check everything a sampling run needs before anything starts; ``out_dir`` defaults to
    ``runs/<task slug>/samples``.

    Raises:
        InputError: a missing or bad row (named by file:line), a teacher with no price,
            ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN) not set, an output folder kolm cannot write.
    """
    rows = read_rows(examples)
    price = price_for(teacher.model, load_prices(prices_file) if prices_file else None)
    if not (os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN")):
        raise InputError("set ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL for a proxy) for the teacher")
    out = samples_target(out_dir or str(Path("runs") / task_slug(task) / "samples"))
    return SamplingRun(task=task, rows=rows, teacher=teacher, sample=sample, quota=quota, prices=price, out=out)


def run_sampling(run: SamplingRun, address: str | None = None, progress: StageProgress | None = None,
                 on_budget: Callable[[BudgetCheck], None] | None = None) -> tuple[SampleOutcome, str | Path]:
    """Join Ray (its log beside a local output folder), sample, write; the outcome and where the
    samples were written. ``progress`` is told of the teacher calls as they are answered.

    Raises: what ``fanout.sample_rows`` raises (BudgetExceeded, TeacherError), KolmRuntimeError
    (the cluster cannot be reached)."""
    cluster.connect(address, log_file=None if is_remote(run.out) else Path(run.out).parent / "ray.log")
    shown = progress or NoProgress()
    shown.stage("teacher", run.calls, "calls")  # once Ray is joined: a live display draws past its output
    outcome = sample_rows(run.task, run.rows, teacher=run.teacher, sample=run.sample, quota=run.quota,
                          prices=run.prices, cache_dir=teacher_cache_dir(), progress=lambda n: shown.advance(n),
                          on_budget=on_budget)
    shown.done()
    return outcome, write_samples(run.out, outcome)


def task_slug(task: str) -> str:
    """A folder name from the task's first words."""
    words = re.findall(r"[a-z0-9]+", task.lower())
    return "-".join(words[:5]) or "task"
