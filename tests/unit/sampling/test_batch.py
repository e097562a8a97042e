"""``--batch`` never pays for a request twice, whatever moment a run dies at: the real SDK
against the stand-in, runs killed (SIGKILL) at the exact seam in a child process, and the
stand-in counting every request it answered in a batch (answered = paid)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import anthropic
import pyarrow as pa
import pytest

from kolm_ray.errors import TeacherError
from kolm_ray.sampling.config import QuotaConfig, SampleConfig, TeacherConfig
from kolm_ray.testing.messages_api import replay_responder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
ROWS = [{"id": f"r{i}", "input": f"question {i}", "output": f"answer {i}"} for i in range(6)]
K = 2
N = len(ROWS) * K

# One batch run in a child process, killed (SIGKILL: no cleanup, no finally) at one seam:
#   put N          after the N-th answer is cached (a crash while results are being cached)
#   after_create   once batches.create has returned, before the journal records the batch id
#   before_create  just before batches.create is sent (the intent journaled, no batch made)
#   hold_create    not killed: paused just before batches.create until the file `go` appears in
#                  the folder argv[5] (it writes `in_create` there once paused)
#   none           not at all
CHILD = r"""
import json, os, signal, sys, time
import pyarrow as pa
from kolm_ray.sampling import batch
from tests.unit.sampling.test_batch import plan_for

mode, n, cache_dir, rows_json = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "put":
    put, done = batch.ResponseCache.put, [0]
    def dying_put(self, key, value):
        put(self, key, value)
        done[0] += 1
        if done[0] == n:
            die()
    batch.ResponseCache.put = dying_put
elif mode in ("after_create", "before_create"):
    from anthropic.resources.messages.batches import Batches
    create = Batches.create
    def dying_create(self, **kw):
        if mode == "before_create":
            die()
        create(self, **kw)
        die()
    Batches.create = dying_create
elif mode == "hold_create":
    from anthropic.resources.messages.batches import Batches
    create, signals = Batches.create, sys.argv[5]
    def held_create(self, **kw):
        open(os.path.join(signals, "in_create"), "w").close()
        while not os.path.exists(os.path.join(signals, "go")):
            time.sleep(0.01)
        return create(self, **kw)
    Batches.create = held_create
out = batch.call_teacher_batch(plan_for(cache_dir), pa.Table.from_pylist(json.loads(rows_json)))
print(json.dumps({"texts": out.column("text").to_pylist()}))
"""


def plan_for(cache_dir: str, k: int = K, max_attempts: int = 10):
    from kolm_ray.sampling.calls import SamplingPlan
    from kolm_ray.sampling.prompt import system_blocks

    return SamplingPlan(task="Answer.", system=system_blocks("Answer.", None, []),
                        teacher=TeacherConfig(model="claude-opus-4-7", max_tokens=16, max_attempts=max_attempts),
                        sample=SampleConfig(k=k, batch=True, batch_poll_s=0.02), quota=QuotaConfig(),
                        cache_dir=cache_dir)


def _child(mode: str, n: int, cache_dir, rows=ROWS) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, mode, str(n), str(cache_dir), json.dumps(rows)],
                          cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=120,
                          check=False)


def _run(cache_dir, rows=ROWS, max_attempts: int = 10):
    from kolm_ray.sampling.batch import call_teacher_batch

    return call_teacher_batch(plan_for(str(cache_dir), max_attempts=max_attempts), pa.Table.from_pylist(rows))


def _paid_once(srv, n=N):
    assert sum(srv.stats.batch_paid.values()) == n and set(srv.stats.batch_paid.values()) == {1}, srv.stats.batch_paid


# Another compile's rows: as many requests as ROWS, none of the same.
OTHER_ROWS = [{"id": f"o{i}", "input": f"other question {i}", "output": f"other answer {i}"} for i in range(6)]


@pytest.fixture
def api(messages_api):
    return messages_api(replay_responder({r["input"]: r["output"] for r in ROWS + OTHER_ROWS}), batch_delay_s=0.1)


def _wait_for(what: str, predicate, timeout_s: float = 120.0) -> None:
    """Wait for a state (never for a duration); fail saying which one never came."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"never saw: {what}"
        time.sleep(0.02)


def _journal_of(rows) -> dict:
    """The journal of the (one) chunk of ``rows``, as saved now ({} when there is none)."""
    from kolm_ray.sampling.batch import journal_path

    try:
        return json.loads(journal_path(sorted(_params(rows))).read_text())
    except FileNotFoundError:
        return {}


def _params(rows) -> dict:
    """Every request of ``rows`` by its key, as ``call_teacher_batch`` makes them."""
    from kolm_ray.sampling.cache import request_key
    from kolm_ray.sampling.prompt import message_params

    plan = plan_for("unused")
    out = {}
    for r in rows:
        for j in range(K):
            p = message_params(model=plan.teacher.model, system=plan.system, user_input=r["input"],
                               max_tokens=plan.teacher.max_tokens, temperature=None)
            out[request_key(p, j)] = p
    return out


def _texts(out) -> list:
    return out.column("text").to_pylist()


def _expected(rows) -> list:
    return [r["output"] for r in rows for _ in range(K)]


def test_the_stand_in_lists_batches_newest_first_through_the_sdk(api):
    client = anthropic.Anthropic()
    made = [client.messages.batches.create(requests=[{"custom_id": f"c{i}-{j}", "params": {
        "model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "question 1"}]}} for j in range(i + 1)])
        for i in range(3)]
    listed = list(client.messages.batches.list(limit=2))  # two pages, followed by the SDK
    assert [b.id for b in listed] == [b.id for b in reversed(made)]
    assert [b.request_counts.processing + b.request_counts.succeeded for b in listed] == [3, 2, 1]
    assert listed[0].created_at >= listed[-1].created_at and listed[0].created_at.tzinfo is not None
    page = client.messages.batches.list(limit=1, after_id=made[2].id)
    assert [b.id for b in page.data] == [made[1].id] and page.has_more


def test_a_run_killed_while_caching_results_pays_for_nothing_again(api, tmp_path):
    cache = tmp_path / "cache"
    died = _child("put", 3, cache)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert api.stats.batches_created == 1
    _paid_once(api)
    # Three answers cached, nine not: the re-run collects the batch it already paid for.
    out = _run(cache)
    assert out.column("text").to_pylist() == [r["output"] for r in ROWS for _ in range(K)]
    assert api.stats.batches_created == 1
    _paid_once(api)
    assert out.column("cached").to_pylist().count(True) == 3
    assert not list((tmp_path.parent / "kolm-home" / "batches").glob("*.json"))  # the journal is done with


def test_a_run_killed_between_create_and_the_journal_write_pays_once(api, tmp_path):
    cache = tmp_path / "cache"
    died = _child("after_create", 0, cache)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert api.stats.batches_created == 1
    out = _run(cache)  # finds the batch the dead run created, by its intent, and adopts it
    assert out.column("text").to_pylist() == [r["output"] for r in ROWS for _ in range(K)]
    assert api.stats.batches_created == 1
    _paid_once(api)


def test_a_run_killed_before_create_submits_once_on_the_rerun(api, tmp_path):
    cache = tmp_path / "cache"
    died = _child("before_create", 0, cache)
    assert died.returncode == -signal.SIGKILL and api.stats.batches_created == 0
    out = _run(cache)  # the intent matches no batch: create never got through
    assert out.column("error").to_pylist() == [None] * N
    assert api.stats.batches_created == 1
    _paid_once(api)


def test_an_intent_that_two_batches_could_match_is_refused_then_told_apart_once_they_end(api, tmp_path):
    from kolm_ray.sampling.batch import _chunks, _Journal, journal_path, keys_digest
    from kolm_ray.sampling.cache import request_key
    from kolm_ray.sampling.prompt import message_params

    plan = plan_for(str(tmp_path / "cache"))
    params = {}
    for r in ROWS:
        for j in range(K):
            p = message_params(model=plan.teacher.model, system=plan.system, user_input=r["input"],
                               max_tokens=plan.teacher.max_tokens, temperature=None)
            params[request_key(p, j)] = p
    (chunk,) = _chunks(list(params), plan.sample.batch_max_requests)
    journal = _Journal(chunk)
    journal.submissions.append({"intent_at": time.time(), "count": N, "keys": keys_digest(chunk), "batch_id": None,
                                "state": "intent", "errors": {}})
    journal.save()
    # Two batches of as many requests appear after the intent: ours (created by a run that died
    # before journaling its id), and someone else's.
    api.batch_delay_s = 1.0
    client = anthropic.Anthropic()
    ours = client.messages.batches.create(requests=[{"custom_id": k, "params": p} for k, p in params.items()])
    other = client.messages.batches.create(requests=[{"custom_id": f"x{i}", "params": p}
                                                     for i, p in enumerate(params.values())])
    with pytest.raises(TeacherError, match="cannot tell which one it paid for") as e:
        _run(tmp_path / "cache")
    assert ours.id in str(e.value) and other.id in str(e.value) and str(journal_path(chunk)) in str(e.value)
    assert api.stats.batches_created == 2  # nothing submitted
    time.sleep(1.1)  # both ended: their requests tell them apart
    out = _run(tmp_path / "cache")
    assert out.column("error").to_pylist() == [None] * N
    assert api.stats.batches_created == 2
    assert {k: v for k, v in api.stats.batch_paid.items() if not k.startswith("x")} == {k: 1 for k in params}


def test_chunks_do_not_depend_on_what_is_cached(api, tmp_path):
    """The journal is named by every request of the chunk, cached or not."""
    from kolm_ray.sampling.batch import _chunks

    keys = [f"{i:064x}" for i in range(10)]
    assert _chunks(keys, 4) == _chunks(list(reversed(keys)), 4) == [keys[0:4], keys[4:8], keys[8:10]]


# ----- adopting only our own batch ------------------------------------------------------------


def test_a_single_ended_batch_of_someone_elses_is_never_adopted(api, tmp_path):
    """A run died before create; since then another compile made a batch of as many requests,
    and it has ended. Its requests' ids say it is not ours: the re-run submits its own, and the
    other batch costs it no attempt (max_attempts=1 here: an attempt burned is a run failed)."""
    cache = tmp_path / "cache"
    died = _child("before_create", 0, cache)
    assert died.returncode == -signal.SIGKILL and api.stats.batches_created == 0
    client = anthropic.Anthropic()
    theirs = client.messages.batches.create(requests=[{"custom_id": f"x{i}", "params": p}
                                                      for i, p in enumerate(_params(OTHER_ROWS).values())])
    _wait_for("their batch ended", lambda: client.messages.batches.retrieve(theirs.id).processing_status == "ended")
    out = _run(cache, max_attempts=1)
    assert _texts(out) == _expected(ROWS) and out.column("error").to_pylist() == [None] * N
    assert api.stats.batches_created == 2
    assert {k: v for k, v in api.stats.batch_paid.items() if not k.startswith("x")} == {k: 1 for k in _params(ROWS)}


def test_a_batch_adopted_before_it_ends_is_provisional_and_stays_findable_by_its_owner(api, tmp_path):
    """Two runs died: ours before create, another compile's (as many requests) after create,
    before journaling its batch. Our re-run can only guess that batch is ours while it runs:
    the guess must not hide it from its owner's re-run (who would pay for it again), and once
    it ends and is seen not to be ours, we submit our own without losing an attempt."""
    cache = tmp_path / "cache"
    api.hold_batches = True  # every batch stays in progress until end_batches()
    assert _child("before_create", 0, cache).returncode == -signal.SIGKILL
    assert _child("after_create", 0, cache, rows=OTHER_ROWS).returncode == -signal.SIGKILL
    assert api.stats.batches_created == 1
    outs: dict = {}

    def run(name, rows, **kw):
        try:
            outs[name] = _run(cache, rows, **kw)
        except BaseException as e:  # noqa: BLE001 - reported by the assertions below
            outs[name] = e

    ours = threading.Thread(target=run, args=("ours", ROWS), kwargs={"max_attempts": 1}, daemon=True)
    theirs = threading.Thread(target=run, args=("theirs", OTHER_ROWS), daemon=True)
    try:
        ours.start()
        _wait_for("our re-run adopting the one candidate",
                  lambda: (_journal_of(ROWS).get("submissions") or [{}])[0].get("state") == "submitted")
        theirs.start()
        _wait_for("their re-run deciding about their intent", lambda: (
            _journal_of(OTHER_ROWS).get("submissions") or [{}])[0].get("state") not in (None, "intent"))
        created_while_held = api.stats.batches_created
    finally:
        api.end_batches()
        for t in (ours, theirs):
            if t.is_alive() or t.ident:
                t.join(120)
    assert created_while_held == 1  # they found their batch: not paid again
    assert _texts(outs["ours"]) == _expected(ROWS), outs["ours"]
    assert _texts(outs["theirs"]) == _expected(OTHER_ROWS), outs["theirs"]
    assert api.stats.batches_created == 2  # theirs, and ours once theirs was seen not to be ours
    _paid_once(api, 2 * N)


def test_two_identical_batch_runs_on_one_host_pay_once(api, tmp_path):
    """The first run has journaled its intent and is inside create; the second, started now,
    waits for it (a lock on the chunk's journal) instead of finding no batch and paying again."""
    cache, signals = tmp_path / "cache", tmp_path / "signals"
    signals.mkdir()
    logs = [tmp_path / "first.err", tmp_path / "second.err"]

    def start(mode: str, log) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", CHILD, mode, "0", str(cache), json.dumps(ROWS), str(signals)],
                                cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=open(log, "w"),
                                text=True)

    first = start("hold_create", logs[0])
    second = None
    try:
        _wait_for("the first run inside create", lambda: (signals / "in_create").exists() or first.poll() is not None)
        second = start("none", logs[1])
        _wait_for("the second run waiting, or paying", lambda: api.stats.batches_created > 0
                  or "waiting for it" in logs[1].read_text() or second.poll() is not None)
    finally:
        (signals / "go").touch()
    outs = []
    for p in (first, second):
        stdout, _ = p.communicate(timeout=120)
        assert p.returncode == 0, [log.read_text()[-2000:] for log in logs]
        outs.append(json.loads(stdout.strip().splitlines()[-1])["texts"])
    assert outs == [_expected(ROWS)] * 2
    assert api.stats.batches_created == 1
    _paid_once(api)


def test_a_journal_of_the_previous_format_is_collected_not_paid_again(api, tmp_path):
    """The previous kolm named a journal by the keys it submitted (those not cached then) and
    kept one batch id in it. Its run died while the batch was processing, with 3 answers
    cached from before: this run finds that journal and collects the batch."""
    from kolm_ray.sampling.batch import journal_dir, keys_digest
    from kolm_ray.sampling.cache import ResponseCache
    from kolm_ray.sampling.pricing import Usage

    client = anthropic.Anthropic()
    params = _params(ROWS)
    answers = {k: r["output"] for r in ROWS for k in _params([r])}
    cached = sorted(params)[:3]
    cache = ResponseCache(str(tmp_path / "cache")).for_endpoint(str(client.base_url))
    for key in cached:
        cache.put(key, {"text": answers[key], "usage": Usage().model_dump(), "model": "m"})
    submitted = sorted(set(params) - set(cached))
    old = client.messages.batches.create(requests=[{"custom_id": k, "params": params[k]} for k in submitted])
    journal = journal_dir() / f"{keys_digest(submitted)[:24]}.json"
    journal.parent.mkdir(parents=True)
    journal.write_text(json.dumps({"batch_id": old.id, "submitted_at": time.time(), "requests": len(submitted)}))
    out = _run(tmp_path / "cache")
    assert _texts(out) == _expected(ROWS)
    assert api.stats.batches_created == 1
    _paid_once(api, len(submitted))
    assert out.column("cached").to_pylist().count(True) == 3
    assert not journal.exists()
