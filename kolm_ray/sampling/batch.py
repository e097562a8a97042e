"""``--batch``: the same samples through the Message Batches API, at half price, for runs
that can wait.

The requests (one per row and sample, cached or not) are split, in key order, into chunks of
at most ``batch_max_requests``; the chunks do not depend on what is cached, so a re-run makes
the same ones. For each chunk the requests not in the response cache are submitted as one
batch, polled every ``batch_poll_s``, and their results written to the cache. Errored or
expired requests are resubmitted, up to ``max_attempts`` batches in all.

Nothing is paid for twice, whatever moment a run dies at. Each chunk has a journal under
``$KOLM_HOME/batches``, named by the digest of all its request keys, and every submission is
journaled (fsynced) *before* ``batches.create`` is called: the intent (when, how many
requests, the digest of their keys), then the batch id once the API has answered, then the
errors once its results are cached. A run holds a lock on the chunk's journal while it works
on the chunk, so two identical runs on one host never both submit it: the second waits, then
takes what the first cached. A re-run finds the journal, collects the results of a batch
already submitted instead of paying for it again, and where only the intent was written (the
run died between ``create`` and the journal write) finds the batch that ``create`` made:
``batches.list`` (newest first) back to the intent, by the number of requests, and by its
requests' ids for every candidate that has ended. A candidate still running cannot say yet:
the only one is adopted *provisionally*; no other journal counts it as taken (its real owner's
re-run must still find it), and once it ends, a batch whose ids are not the intent's is let go
and ours submitted, at no cost to ``max_attempts``. No candidate means ``create`` never got
through (submitted again); several running ones that cannot be told apart stop the stage with
a ``TeacherError`` saying which, rather than pay twice.

Journals of the previous format (one batch id, named by the digest of the keys it submitted:
those not cached then) are found where the cache has not changed since, and collected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anthropic
import pyarrow as pa
from filelock import FileLock, Timeout

from kolm_ray.durable import write_json
from kolm_ray.errors import TeacherError
from kolm_ray.home import state_dir
from kolm_ray.sampling.cache import ResponseCache, request_key
from kolm_ray.sampling.calls import CALL_SCHEMA, SamplingPlan, expand, result_row
from kolm_ray.sampling.pricing import Usage
from kolm_ray.sampling.prompt import message_params
from kolm_ray.sampling.teacher import SampleResult, message_text, usage_of

log = logging.getLogger("kolm_ray.sampling.batch")

JOURNAL_FORMAT_VERSION = 2
# Error types in a batch result that a resubmission can cure.
_RETRYABLE_BATCH_ERRORS = {"overloaded_error", "api_error", "rate_limit_error", "timeout_error"}
# This machine's clock and the API's may differ by this much: a batch created up to this long
# before a journaled intent is still a candidate for it.
CLOCK_SKEW_S = 120.0


def keys_digest(keys: list[str] | set[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def journal_dir() -> Path:
    return state_dir() / "batches"


def journal_path(chunk_keys: list[str]) -> Path:
    """The journal of the chunk holding these request keys (all of them, cached or not)."""
    return journal_dir() / f"{keys_digest(chunk_keys)[:24]}.json"


class _Journal:
    """One chunk's submissions: ``{"intent_at", "count", "keys", "batch_id", "state", "errors"}``
    with ``state`` one of intent, submitted, done, never_created, not_ours (a batch adopted
    provisionally and let go), and ``provisional`` on a submitted batch adopted before it
    ended. Every change is fsynced."""

    def __init__(self, chunk_keys: list[str]):
        self.path = journal_path(chunk_keys)
        self.requests = len(chunk_keys)
        self.submissions: list[dict[str, Any]] = []
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise TeacherError(f"the batch journal {self.path} is unreadable ({e}): it says which batches were paid "
                               "for; fix or remove it (removing it may pay for a batch again)") from None
        if data.get("format_version") == JOURNAL_FORMAT_VERSION:
            self.submissions = list(data.get("submissions", []))
        elif "batch_id" in data:  # the previous format: one submitted batch, its id known
            self.submissions = [{"intent_at": data.get("submitted_at", 0.0), "count": data.get("requests"),
                                 "keys": None, "batch_id": data["batch_id"], "state": "submitted", "errors": {}}]

    def save(self) -> None:
        write_json(self.path, {"format_version": JOURNAL_FORMAT_VERSION, "requests": self.requests,
                               "submissions": self.submissions})

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@contextmanager
def _chunk_lock(path: Path) -> Iterator[None]:
    """Hold the lock of the journal at ``path``; say so when another run holds it, and wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("another kolm run on this host is submitting or collecting these requests (journal %s); "
                    "waiting for it, so they are paid for once", path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _journaled_batch_ids() -> set[str]:
    """Every batch id a journal in this state dir names as surely its own (batches known to be
    someone's). A provisional adoption is not: the batch may be another run's, whose re-run
    must still find it."""
    ids: set[str] = set()
    for p in journal_dir().glob("*.json"):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if data.get("batch_id"):
            ids.add(data["batch_id"])
        ids.update(s["batch_id"] for s in data.get("submissions", [])
                   if s.get("batch_id") and not s.get("provisional") and s.get("state") != "not_ours")
    return ids


def _request_total(batch: Any) -> int:
    c = batch.request_counts
    return c.processing + c.succeeded + c.errored + c.canceled + c.expired


def find_created_batch(client: anthropic.Anthropic, intent: dict[str, Any],
                       journal: Path) -> tuple[str, bool] | None:
    """The batch a run created for ``intent`` and died before journaling, as ``(id,
    provisional)``, or None when no batch can be it (``create`` never got through).

    Candidates: batches created since the intent (less ``CLOCK_SKEW_S``) with its number of
    requests that no journal names as surely its own. One that has ended is ours only if its
    requests' ids are the intent's (``intent["keys"]``). Ours: an ended one whose ids match;
    else the one candidate still running, provisionally (``provisional``: its ids are checked
    once it ends); else None.

    Raises:
        TeacherError: several candidates still running, and none that has ended is ours.
    """
    since = float(intent["intent_at"]) - CLOCK_SKEW_S
    known = _journaled_batch_ids()
    undecided = []
    for b in client.messages.batches.list(limit=100):  # newest first, page after page
        if b.created_at.timestamp() < since:
            break
        if b.id in known or _request_total(b) != intent["count"]:
            continue
        if b.processing_status != "ended" or not intent.get("keys"):
            undecided.append(b)  # its requests' ids are not to be had until it ends
        elif keys_digest({e.custom_id for e in client.messages.batches.results(b.id)}) == intent["keys"]:
            return b.id, False  # (two with these very ids hold the same answers: either will do)
    if len(undecided) <= 1:
        return (undecided[0].id, True) if undecided else None
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(intent["intent_at"])))
    raise TeacherError(
        f"a batch of {intent['count']} requests was being submitted when an earlier run stopped ({when}), and "
        f"{len(undecided)} batches created since then could be it: {', '.join(b.id for b in undecided)}. "
        f"kolm cannot tell which one it paid for, so it submits nothing rather than pay twice. Re-run once they "
        f"have ended (their requests then tell them apart), or remove {journal} to submit again (the requests of "
        f"the one that was ours are then paid for again).")


def _chunks(keys: list[str], size: int) -> list[list[str]]:
    ordered = sorted(set(keys))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def call_teacher_batch(plan: SamplingPlan, rows: pa.Table, progress: Callable[[int], None] | None = None) -> pa.Table:
    """Same contract as ``fanout.call_teacher``: one output row per (row, sample)."""
    cfg, tcfg = plan.sample, plan.teacher
    client = anthropic.Anthropic(timeout=tcfg.timeout_s)  # SDK retries are fine for control calls
    cache = ResponseCache(plan.cache_dir).for_endpoint(str(client.base_url))
    reqs: list[tuple[dict[str, Any], str, dict[str, Any]]] = []
    params_of: dict[str, dict[str, Any]] = {}
    for row in rows.to_pylist():
        for req in expand(row, cfg.samples_per_input):
            params = message_params(model=tcfg.model, system=plan.system, user_input=req["input"],
                                    max_tokens=tcfg.max_tokens, temperature=tcfg.temperature)
            key = request_key(params, req["sample_index"])
            reqs.append((req, key, params))
            params_of[key] = params

    results: dict[str, SampleResult] = {}
    run = _Run(client, cache, cfg, tcfg, params_of, results, progress)
    run.from_cache(list(params_of))
    run.previous_format_journals()
    for chunk in _chunks(list(params_of), cfg.batch_max_requests):
        run.chunk(chunk)
    out = [result_row(req, key, results[key]) for req, key, _ in reqs]
    return pa.Table.from_pylist(out, schema=CALL_SCHEMA).sort_by([("id", "ascending"), ("sample_index", "ascending")])


class _Run:
    def __init__(self, client: anthropic.Anthropic, cache: ResponseCache, cfg: Any, tcfg: Any,
                 params_of: dict[str, dict[str, Any]], results: dict[str, SampleResult],
                 progress: Callable[[int], None] | None):
        self.client, self.cache, self.cfg, self.tcfg = client, cache, cfg, tcfg
        self.params_of, self.results, self.progress = params_of, results, progress
        self.failures: dict[str, list[str]] = {}
        self.tries: dict[str, int] = {}

    def from_cache(self, keys: list[str]) -> None:
        """Take the answers the cache holds for ``keys`` (not yet taken)."""
        got = 0
        for key in keys:
            if key in self.results:
                continue
            hit = self.cache.get(key)
            if hit is not None:
                self.results[key] = SampleResult(text=hit["text"], usage=Usage(**hit["usage"]), cached=True,
                                                 served_model=hit.get("model"))
                got += 1
        if self.progress and got:
            self.progress(got)

    def previous_format_journals(self) -> None:
        """Collect the batches that journals of the previous format name: such a journal is
        named by the digest of the keys it submitted (those not cached then, in chunks of
        ``batch_max_requests``), so it is found when the cache has not changed since (the run
        died while its batch was processing). Its batch holds exactly those requests."""
        pending = sorted(k for k in self.params_of if k not in self.results)
        size = self.cfg.batch_max_requests
        for keys in (pending[i : i + size] for i in range(0, len(pending), size)):
            path = journal_path(keys)
            if not path.exists():
                continue
            with _chunk_lock(path):
                try:
                    data = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                if "format_version" in data or not data.get("batch_id"):
                    continue  # this format's own: its chunk reads it
                journal = _Journal(keys)
                log.info("collecting batch %s journaled by an earlier kolm (%s)", data["batch_id"], path)
                for sub in journal.submissions:
                    self._collect(journal, sub, keys)
                journal.remove()

    def chunk(self, keys: list[str]) -> None:
        path = journal_path(keys)
        with _chunk_lock(path):
            self.from_cache(keys)  # what another run on this host cached while this one waited
            if all(k in self.results for k in keys):
                path.unlink(missing_ok=True)  # a finished chunk whose journal outlived a crash
                return
            self._chunk(keys)

    def _chunk(self, keys: list[str]) -> None:
        journal = _Journal(keys)
        # What an earlier run of this chunk left: its errors, its batches to collect.
        for sub in journal.submissions:
            if sub["state"] == "intent":
                found = find_created_batch(self.client, sub, journal.path)
                sub["batch_id"], sub["state"] = (found[0], "submitted") if found else (None, "never_created")
                if found and found[1]:
                    sub["provisional"] = True
                journal.save()
            if sub["state"] == "submitted":
                self._collect(journal, sub, keys)
            elif sub["state"] == "done":
                for key, kind in sub.get("errors", {}).items():
                    self._failed(key, kind)
        attempts = sum(1 for s in journal.submissions if s["state"] == "done")
        pending = [k for k in keys if k not in self.results]
        while pending and attempts < self.tcfg.max_attempts:
            sub = {"intent_at": time.time(), "count": len(pending), "keys": keys_digest(pending), "batch_id": None,
                   "state": "intent", "errors": {}}
            journal.submissions.append(sub)
            journal.save()  # before the batch exists: a run that dies in create() finds it by this
            batch = self.client.messages.batches.create(
                requests=[{"custom_id": k, "params": self.params_of[k]} for k in pending])
            sub["batch_id"], sub["state"] = batch.id, "submitted"
            journal.save()
            self._collect(journal, sub, keys)
            attempts += 1
            pending = [k for k in keys if k not in self.results]
        for key in pending:
            self.results[key] = SampleResult(
                text=None, attempts=self.tries.get(key, 0), failures=self.failures.get(key, []),
                error=f"batch: gave up after {attempts} attempts ({', '.join(self.failures.get(key, []))})")
        journal.remove()

    def _failed(self, key: str, kind: str) -> None:
        self.failures.setdefault(key, []).append(kind)
        self.tries[key] = self.tries.get(key, 0) + 1
        if kind not in _RETRYABLE_BATCH_ERRORS and kind not in ("expired", "canceled") and key not in self.results:
            self.results[key] = SampleResult(text=None, attempts=self.tries[key], failures=self.failures[key],
                                             error=f"batch: {kind}")

    def _collect(self, journal: _Journal, sub: dict[str, Any], keys: list[str]) -> bool:
        """Wait for a submitted batch to end, cache its answers, journal its errors. False: it
        was not ours after all (adopted provisionally, and its requests' ids are not the
        intent's, or none of them is ours): let go, journaled ``not_ours``, no attempt spent.
        (An answer it holds to one of our very requests is cached all the same: the key is
        the request.)"""
        batch_id = sub["batch_id"]
        while self.client.messages.batches.retrieve(batch_id).processing_status != "ended":
            time.sleep(self.cfg.batch_poll_s)
        mine = set(keys)
        errors: dict[str, str] = {}
        ids: set[str] = set()
        for entry in self.client.messages.batches.results(batch_id):
            key, result = entry.custom_id, entry.result
            ids.add(key)
            if key not in mine:
                continue
            if result.type == "succeeded":
                if key in self.results and self.results[key].text is not None:
                    continue  # cached by the run that died collecting this batch
                usage = usage_of(result.message.usage)
                text = message_text(result.message)
                self.cache.put(key, {"text": text, "usage": usage.model_dump(), "model": result.message.model,
                                     "stop_reason": result.message.stop_reason, "at": time.time(), "batch": batch_id})
                self.tries[key] = self.tries.get(key, 0) + 1
                self.results[key] = SampleResult(text=text, usage=usage, attempts=self.tries[key],
                                                 failures=self.failures.get(key, []),
                                                 served_model=result.message.model, answered_at=time.time())
                if self.progress:
                    self.progress(1)
            else:
                errors[key] = result.error.error.type if result.type == "errored" else result.type
        ours = keys_digest(ids) == sub["keys"] if sub.get("provisional") and sub.get("keys") else bool(ids & mine)
        sub.pop("provisional", None)
        if not ours:
            sub["state"] = "not_ours"
            journal.save()
            log.info("batch %s, adopted before it ended, holds other requests: not ours, let go", batch_id)
            return False
        for key, kind in errors.items():
            self._failed(key, kind)
        sub["state"], sub["errors"] = "done", errors
        journal.save()
        return True
