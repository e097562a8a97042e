"""Audited online K: a share of served calls is answered by the teacher too, off the request
path, and the call's output is scored against that reference the way the holdout is.

Pipeline: the ingress decides per call (``rollout.audit_share`` and a draw), then
``Auditor.submit(AuditJob)`` puts the job on a bounded queue (a full queue drops it, recorded as
"dropped") -> a worker task asks the teacher once (``AnthropicTeacher``: cached, retried, under
the cluster-wide quota) -> every output of the job (the served one, and in shadow mode the
canary's unseen answer to the same input) is scored with the Specialist's verifier against that
reference -> one ``AuditRecord`` per output goes to the receipt writer, linked to the call by
its request id, with the teacher's usage and cost.

A teacher outage or budget limit never fails or slows a served call: ``submit`` never waits, and
a job whose teacher call fails (or raises) is recorded as "failed", so status can say how many
audits are missing and why. Audits still queued when a replica shuts down are lost unrecorded
(they are samples, not served calls). Must not generate with the model (the ingress hands it outputs) nor write files
(it hands records to the receipt writer).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from kolm_ray.sampling.cache import request_key
from kolm_ray.sampling.pricing import Prices, cost_usd
from kolm_ray.sampling.prompt import message_params, system_blocks
from kolm_ray.sampling.teacher import Teacher
from kolm_ray.serve.receipts import AuditRecord, digest, points
from kolm_ray.verifier import Verifier

log = logging.getLogger("kolm_ray.serve")


class AuditOptions(BaseModel):
    """How a serving application audits: ``kolm serve --audit-rate`` and its limits."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    rate: float = Field(0.0, ge=0, le=1, description="Share of every served call audited against the teacher "
                        "(where a release's --audit-rate asks more of a route, the larger share applies).")
    teacher: str = Field("claude-opus-4-7", description="Teacher model for audits of Specialists whose artifact "
                         "does not name the teacher it was distilled from.")
    max_pending: int = Field(256, ge=1, description="Audits queued per ingress replica; past it new ones are "
                             "dropped (and recorded as dropped), never waited for.")
    workers: int = Field(4, ge=1, description="Teacher calls in flight for audits per ingress replica.")
    max_shadow: int = Field(8, ge=0, description="Shadow answers (--shadow) generated at once per ingress replica; "
                            "past it a stable call's shadow is skipped and recorded as dropped, so shadows never "
                            "crowd out served calls.")
    max_attempts: int = Field(3, ge=1, description="Attempts per audit's teacher call (retries with backoff).")
    timeout_s: float = Field(60.0, gt=0, description="Seconds before one attempt of an audit's teacher call is "
                             "abandoned (and retried).")
    max_tokens: int = Field(1024, ge=1, description="Most output tokens of a reference answer.")


@dataclass(frozen=True)
class AuditTarget:
    """One output to judge against the job's reference."""

    specialist: str
    version: str
    artifact_sha256: str
    route: str
    output: str | None  # None: never produced (a shadow answer skipped at the cap)


@dataclass(frozen=True)
class AuditJob:
    """One served call to audit: its input, the judge's task and verifier (the teacher's prompt
    is built from them, and every target is scored with that verifier), and the outputs."""

    request_id: str
    input: str
    task: str
    teacher: str
    verifier: Verifier
    judge: str  # name@version whose task and verifier judge the job (a release's stable)
    targets: Sequence[AuditTarget]


def reference_request(job: AuditJob, max_tokens: int) -> tuple[dict[str, Any], str]:
    """The teacher request of an audit and its cache key: the task and the verifier's output
    rules as the system prompt, the call's input as the user turn, sample index 0 (the same input
    audited twice is paid for once)."""
    params = message_params(model=job.teacher, system=system_blocks(job.task, job.verifier, []),
                            user_input=job.input, max_tokens=max_tokens, temperature=None)
    return params, request_key(params, 0)


def records_for(job: AuditJob, reference: str | None, *, status: str, now: float, cost: float | None = 0.0,
                cached: bool = False, input_tokens: int = 0, output_tokens: int = 0,
                error: str | None = None) -> list[AuditRecord]:
    """One record per target; with a reference, each output scored against it (pure)."""
    out = []
    share = None if cost is None else cost / max(1, len(job.targets))
    for t in job.targets:
        scored = reference is not None and t.output is not None
        checks = job.verifier.score(t.output, job.input, reference) if scored else None
        out.append(AuditRecord(
            time=now, request_id=job.request_id, specialist=t.specialist, version=t.version,
            artifact_sha256=t.artifact_sha256, route=t.route, status=status,  # type: ignore[arg-type]
            output_sha256=digest(t.output) if t.output is not None else None,
            reference_sha256=digest(reference) if reference is not None else None, judge=job.judge,
            **points(checks), passed=checks.passed if checks else None, teacher=job.teacher,
            cached=cached, input_tokens=input_tokens, output_tokens=output_tokens,
            cost_usd=None if share is None else round(share, 8),
            error=error,
        ))
    return out


class Auditor:
    """A bounded queue of audit jobs drained by ``workers`` tasks on the caller's event loop."""

    def __init__(self, teacher: Teacher | None, prices: Callable[[str], Prices | None],
                 record: Callable[[AuditRecord], None], options: AuditOptions,
                 clock: Callable[[], float] = time.time) -> None:
        self.teacher, self.prices, self.record, self.options, self.clock = teacher, prices, record, options, clock
        self._queue: asyncio.Queue[AuditJob] | None = None
        self._tasks: list[asyncio.Task] = []
        self.stats = {"submitted": 0, "ok": 0, "failed": 0, "dropped": 0, "cost_usd": 0.0}

    def _start(self) -> asyncio.Queue:
        if self._queue is None:  # created on the serving event loop, at the first audit
            self._queue = asyncio.Queue(maxsize=self.options.max_pending)
            self._tasks = [asyncio.get_running_loop().create_task(self._work(), name=f"audit-{i}")
                           for i in range(self.options.workers)]
        return self._queue

    def skip_shadow(self, job: AuditJob, canary: AuditTarget) -> None:
        """Record a shadow answer that was not generated (too many in flight) as dropped."""
        self.stats["dropped"] += 1
        for r in records_for(dataclasses.replace(job, targets=[canary]), None, status="dropped", now=self.clock(),
                             error=f"shadow answers at the cap ({self.options.max_shadow} in flight)"):
            self.record(r)

    def submit(self, job: AuditJob) -> bool:
        """Queue ``job`` without waiting; False (and "dropped" records) when the queue is full.
        Must be called on the event loop that serves requests."""
        queue = self._start()
        self.stats["submitted"] += 1
        try:
            queue.put_nowait(job)
            return True
        except asyncio.QueueFull:
            self.stats["dropped"] += 1
            for r in records_for(job, None, status="dropped", now=self.clock(),
                                 error=f"audit queue full ({self.options.max_pending} pending)"):
                self.record(r)
            return False

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            job = await self._queue.get()
            try:
                records = await self.audit(job)
            except Exception as e:  # noqa: BLE001 - an audit never takes the worker (or the server) down
                log.exception("audit of %s failed", job.request_id)
                self.stats["failed"] += 1
                records = records_for(job, None, status="failed", now=self.clock(),
                                      error=f"{type(e).__name__}: {e}"[:500])
            try:
                for r in records:
                    self.record(r)
            finally:
                self._queue.task_done()

    async def audit(self, job: AuditJob) -> list[AuditRecord]:
        """Ask the teacher for the reference and score every target against it."""
        if self.teacher is None:
            self.stats["failed"] += 1
            return records_for(job, None, status="failed", now=self.clock(),
                               error="no teacher: set ANTHROPIC_API_KEY where the ingress runs")
        params, key = reference_request(job, self.options.max_tokens)
        res = await self.teacher.sample(params, key)
        if res.text is None:
            self.stats["failed"] += 1
            return records_for(job, None, status="failed", now=self.clock(), error=res.error)
        prices = self.prices(job.teacher)
        cost = 0.0 if res.cached else None if prices is None else cost_usd(res.usage, prices)
        self.stats["ok"] += 1
        self.stats["cost_usd"] += cost or 0.0
        return records_for(job, res.text, status="ok", now=self.clock(), cost=cost, cached=res.cached,
                           input_tokens=res.usage.input_tokens, output_tokens=res.usage.output_tokens)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait (bounded) for queued audits to finish, e.g. before a graceful shutdown."""
        if self._queue is not None:
            try:
                await asyncio.wait_for(self._queue.join(), timeout=timeout_s)
            except asyncio.TimeoutError:
                log.warning("%d audits still pending at shutdown", self._queue.qsize())
