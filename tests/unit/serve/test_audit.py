"""Audits against the real SDK and a local Messages API server: the reference scores the served
output as the holdout is; a cached reference is not paid twice; an outage or a full queue only
lowers the audit count and never raises into serving."""

import asyncio
import time

import pytest

from kolm_ray.sampling.cache import ResponseCache
from kolm_ray.sampling.config import TeacherConfig
from kolm_ray.sampling.pricing import price_for
from kolm_ray.sampling.teacher import AnthropicTeacher
from kolm_ray.serve.audit import AuditJob, AuditOptions, Auditor, AuditTarget
from kolm_ray.testing.messages_api import FaultPlan, MessagesAPIServer, replay_responder
from kolm_ray.verifier import synthesize

TASK = "Route the customer message to one team: billing, account or bug."
VERIFIER = synthesize(TASK, ["billing", "account", "bug", "billing", "account", "bug", "billing", "bug"])
ANSWERS = {"I was charged twice": "billing", "I cannot log in": "account"}


def job(rid: str, text: str, *outputs: tuple[str, str]) -> AuditJob:
    targets = [AuditTarget("route", version, "sha-" + version, "stable" if i == 0 else "shadow", out)
               for i, (version, out) in enumerate(outputs)]
    return AuditJob(request_id=rid, input=text, task=TASK, teacher="claude-opus-4-7", verifier=VERIFIER, judge="route@1.0",
                    targets=targets)


@pytest.fixture
def teacher_at(tmp_path):
    servers = []

    def make(server: MessagesAPIServer, **cfg) -> AnthropicTeacher:
        servers.append(server.start())
        return AnthropicTeacher(TeacherConfig(backoff_base_s=0.01, **cfg), ResponseCache(tmp_path / "cache"),
                                sdk_env={"ANTHROPIC_API_KEY": "test", "ANTHROPIC_BASE_URL": server.url})

    yield make
    for s in servers:
        s.stop()


def auditor(teacher, records, **options) -> Auditor:
    return Auditor(teacher, price_for, records.append, AuditOptions(**options))


def test_each_output_is_scored_against_one_teacher_reference(teacher_at):
    srv = MessagesAPIServer(replay_responder(ANSWERS))
    records = []
    a = auditor(teacher_at(srv), records)
    got = asyncio.run(a.audit(job("r1", "I was charged twice", ("1.0", "billing"), ("1.1", "account"))))
    assert [(r.version, r.route, r.status, r.k, r.passed) for r in got] == [
        ("1.0", "stable", "ok", 100.0, True), ("1.1", "shadow", "ok", 0.0, False)]  # K on 0-100
    assert all(r.request_id == "r1" and r.reference_sha256 and r.teacher == "claude-opus-4-7" for r in got)
    assert sum(r.cost_usd for r in got) > 0 and srv.stats.succeeded == 1  # one paid call for both outputs


def test_the_same_input_audited_twice_is_paid_for_once(teacher_at):
    srv = MessagesAPIServer(replay_responder(ANSWERS))
    a = auditor(teacher_at(srv), [])
    first = asyncio.run(a.audit(job("r1", "I cannot log in", ("1.0", "account"))))
    again = asyncio.run(a.audit(job("r2", "I cannot log in", ("1.0", "bug"))))
    assert srv.stats.succeeded == 1
    assert first[0].cost_usd > 0 and not first[0].cached
    assert again[0].cached and again[0].cost_usd == 0 and again[0].k == 0.0


def test_a_teacher_outage_records_failed_audits_and_raises_nothing(teacher_at):
    srv = MessagesAPIServer(replay_responder(ANSWERS), faults=FaultPlan(server_error=1.0))
    a = auditor(teacher_at(srv, max_attempts=2), [])
    [rec] = asyncio.run(a.audit(job("r1", "I was charged twice", ("1.0", "billing"))))
    assert rec.status == "failed" and rec.k is None and "server" in rec.error
    assert a.stats["failed"] == 1 and srv.stats.requests == 2  # retried, then given up


def test_without_a_teacher_audits_are_recorded_as_failed():
    [rec] = asyncio.run(Auditor(None, price_for, lambda r: None, AuditOptions()).audit(
        job("r1", "I was charged twice", ("1.0", "billing"))))
    assert rec.status == "failed" and "ANTHROPIC_API_KEY" in rec.error


def test_a_full_queue_drops_audits_at_once_and_records_them(teacher_at):
    srv = MessagesAPIServer(replay_responder(ANSWERS), latency_s=0.5)
    records = []
    a = auditor(teacher_at(srv), records, max_pending=1, workers=1)

    async def serve_burst() -> tuple[list[bool], float]:
        started = time.perf_counter()
        accepted = [a.submit(job(f"r{i}", "I was charged twice", ("1.0", "billing"))) for i in range(5)]
        took = time.perf_counter() - started
        await a.drain(timeout_s=10)
        return accepted, took

    accepted, _ = asyncio.run(serve_burst())
    assert accepted.count(True) <= 2 and accepted.count(False) >= 3
    dropped = [r for r in records if r.status == "dropped"]
    assert len(dropped) == accepted.count(False) and "queue full" in dropped[0].error
    assert a.stats["dropped"] == len(dropped)
    assert [r.status for r in records if r.status != "dropped"] == ["ok"] * accepted.count(True)


def test_an_audit_by_a_teacher_without_a_price_is_recorded_as_uncosted_not_free(teacher_at):
    srv = MessagesAPIServer(replay_responder(ANSWERS))
    a = Auditor(teacher_at(srv), lambda model: None, lambda r: None, AuditOptions())
    [rec] = asyncio.run(a.audit(job("r1", "I was charged twice", ("1.0", "billing"))))
    assert rec.status == "ok" and rec.cost_usd is None and rec.input_tokens > 0


class _TeacherWhoseQuotaActorDied:
    """A Teacher whose call raises instead of returning a failed sample (e.g. its quota actor died)."""

    async def sample(self, params, key):
        raise RuntimeError("The actor died unexpectedly before finishing this task.")


def test_an_audit_whose_teacher_raises_is_recorded_as_failed_not_lost():
    records = []
    a = Auditor(_TeacherWhoseQuotaActorDied(), price_for, records.append, AuditOptions())

    async def go():
        assert a.submit(job("r1", "I was charged twice", ("1.0", "billing")))
        await a.drain(timeout_s=5)

    asyncio.run(go())
    [rec] = records
    assert rec.status == "failed" and "actor died" in rec.error and a.stats["failed"] == 1


def test_a_shadow_skipped_at_the_cap_is_recorded_as_dropped_for_the_canary():
    records = []
    a = Auditor(None, price_for, records.append, AuditOptions(max_shadow=0))
    a.skip_shadow(job("r1", "I was charged twice", ("1.0", "billing")),
                  AuditTarget("route", "1.1", "sha-1.1", "shadow", None))
    [rec] = records
    assert (rec.version, rec.route, rec.status, rec.output_sha256) == ("1.1", "shadow", "dropped", None)
    assert "cap" in rec.error and rec.judge == "route@1.0"
