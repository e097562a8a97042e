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
errors once its results are cached. A re-run finds the journal, collects the results of a
batch already submitted instead of paying for it again, and where only the intent was written
(the run died between ``create`` and the journal write) finds the batch that ``create`` made:
``batches.list`` (newest first) back to the intent, by the number of requests, and, among
several, by its requests' ids once they have ended. It adopts a batch only when exactly one
matches; none means ``create`` never got through (submitted again); several that cannot be
told apart stop the stage with a ``TeacherError`` saying which, rather than pay twice.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import anthropic
import pyarrow as pa

from kolm_ray.durable import write_json
from kolm_ray.errors import TeacherError
from kolm_ray.home import state_dir
from kolm_ray.sampling.cache import ResponseCache, request_key
from kolm_ray.sampling.pricing import Usage
from kolm_ray.sampling.prompt import message_params
from kolm_ray.sampling.teacher import SampleResult, message_text, usage_of

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
    with ``state`` one of intent, submitted, done, never_created. Every change is fsynced."""

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


def _journaled_batch_ids() -> set[str]:
    """Every batch id any journal in this state dir names (batches known to be someone's)."""
    ids: set[str] = set()
    for p in journal_dir().glob("*.json"):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if data.get("batch_id"):
            ids.add(data["batch_id"])
        ids.update(s["batch_id"] for s in data.get("submissions", []) if s.get("batch_id"))
    return ids


def _request_total(batch: Any) -> int:
    c = batch.request_counts
    return c.processing + c.succeeded + c.errored + c.canceled + c.expired


def find_created_batch(client: anthropic.Anthropic, intent: dict[str, Any], journal: Path) -> str | None:
    """The id of the batch a run created for ``intent`` and died before journaling, or None
    when no batch matches (``create`` never got through).

    Candidates: batches created since the intent (less ``CLOCK_SKEW_S``) with its number of
    requests that no journal names. Among several, those that have ended are told apart by their
    requests' ids (``intent["keys"]``).

    Raises:
        TeacherError: several candidates, and their requests cannot (yet) tell which is ours.
    """
    since = float(intent["intent_at"]) - CLOCK_SKEW_S
    known = _journaled_batch_ids()
    candidates = []
    for b in client.messages.batches.list(limit=100):  # newest first, page after page
        if b.created_at.timestamp() < since:
            break
        if b.id not in known and _request_total(b) == intent["count"]:
            candidates.append(b)
    if len(candidates) <= 1:
        return candidates[0].id if candidates else None
    ours = [b for b in candidates if b.processing_status == "ended" and intent.get("keys")
            and keys_digest({e.custom_id for e in client.messages.batches.results(b.id)}) == intent["keys"]]
    if len(ours) == 1:
        return ours[0].id
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(intent["intent_at"])))
    raise TeacherError(
        f"a batch of {intent['count']} requests was being submitted when an earlier run stopped ({when}), and "
        f"{len(candidates)} batches created since then could be it: {', '.join(b.id for b in candidates)}. "
        f"kolm cannot tell which one it paid for, so it submits nothing rather than pay twice. Re-run once they "
        f"have ended (their requests then tell them apart), or remove {journal} to submit again (the requests of "
        f"the one that was ours are then paid for again).")


def _chunks(keys: list[str], size: int) -> list[list[str]]:
    ordered = sorted(set(keys))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def call_teacher_batch(plan: Any, rows: pa.Table, progress: Callable[[int], None] | None = None) -> pa.Table:
    """Same contract as ``fanout.call_teacher``: one output row per (row, sample)."""
    from kolm_ray.sampling.fanout import CALL_SCHEMA, _expand, _result_row

    cfg, tcfg = plan.sample, plan.teacher
    client = anthropic.Anthropic(timeout=tcfg.timeout_s)  # SDK retries are fine for control calls
    cache = ResponseCache(plan.cache_dir).for_endpoint(str(client.base_url))
    reqs: list[tuple[dict[str, Any], str, dict[str, Any]]] = []
    params_of: dict[str, dict[str, Any]] = {}
    for row in rows.to_pylist():
        for req in _expand(row, cfg.k):
            params = message_params(model=tcfg.model, system=plan.system, user_input=req["input"],
                                    max_tokens=tcfg.max_tokens, temperature=tcfg.temperature)
            key = request_key(params, req["sample_index"])
            reqs.append((req, key, params))
            params_of[key] = params

    results: dict[str, SampleResult] = {}
    for key in params_of:
        hit = cache.get(key)
        if hit is not None:
            results[key] = SampleResult(text=hit["text"], usage=Usage(**hit["usage"]), cached=True,
                                        served_model=hit.get("model"))
    if progress and results:
        progress(len(results))
    run = _Run(client, cache, cfg, tcfg, params_of, results, progress)
    for chunk in _chunks(list(params_of), cfg.batch_max_requests):
        run.chunk(chunk)
    out = [_result_row(req, key, results[key]) for req, key, _ in reqs]
    return pa.Table.from_pylist(out, schema=CALL_SCHEMA).sort_by([("id", "ascending"), ("sample_index", "ascending")])


class _Run:
    def __init__(self, client: anthropic.Anthropic, cache: ResponseCache, cfg: Any, tcfg: Any,
                 params_of: dict[str, dict[str, Any]], results: dict[str, SampleResult],
                 progress: Callable[[int], None] | None):
        self.client, self.cache, self.cfg, self.tcfg = client, cache, cfg, tcfg
        self.params_of, self.results, self.progress = params_of, results, progress
        self.failures: dict[str, list[str]] = {}
        self.tries: dict[str, int] = {}

    def chunk(self, keys: list[str]) -> None:
        if all(k in self.results for k in keys):
            journal_path(keys).unlink(missing_ok=True)  # a finished chunk whose journal outlived a crash
            return
        journal = _Journal(keys)
        # What an earlier run of this chunk left: its errors, its batches to collect.
        for sub in journal.submissions:
            if sub["state"] == "intent":
                bid = find_created_batch(self.client, sub, journal.path)
                sub["batch_id"], sub["state"] = (bid, "submitted") if bid else (None, "never_created")
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

    def _collect(self, journal: _Journal, sub: dict[str, Any], keys: list[str]) -> None:
        """Wait for a submitted batch to end, cache its answers, journal its errors."""
        batch_id = sub["batch_id"]
        while self.client.messages.batches.retrieve(batch_id).processing_status != "ended":
            time.sleep(self.cfg.batch_poll_s)
        mine = set(keys)
        errors: dict[str, str] = {}
        for entry in self.client.messages.batches.results(batch_id):
            key, result = entry.custom_id, entry.result
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
                kind = result.error.error.type if result.type == "errored" else result.type
                errors[key] = kind
                self._failed(key, kind)
        sub["state"], sub["errors"] = "done", errors
        journal.save()
