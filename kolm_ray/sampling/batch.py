"""``--batch``: the same samples through the Message Batches API, at half price, for runs
that can wait.

Requests not already in the response cache are submitted in batches of at most
``batch_max_requests``, polled every ``batch_poll_s``, and their results written to the cache.
Each submitted batch id is journaled under ``$KOLM_HOME/batches`` before it is polled, so a run
that crashes while a batch is processing resumes polling that batch instead of paying for a
second one. Errored or expired requests are resubmitted up to ``max_attempts`` times.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import anthropic
import pyarrow as pa

from kolm_ray.home import state_dir
from kolm_ray.sampling.cache import ResponseCache, request_key
from kolm_ray.sampling.pricing import Usage
from kolm_ray.sampling.prompt import message_params
from kolm_ray.sampling.teacher import SampleResult, message_text, usage_of

# Error types in a batch result that a resubmission can cure.
_RETRYABLE_BATCH_ERRORS = {"overloaded_error", "api_error", "rate_limit_error", "timeout_error"}


def _journal_path(keys: list[str]) -> Path:
    digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:24]
    return state_dir() / "batches" / f"{digest}.json"


def _submit_or_resume(client: anthropic.Anthropic, chunk: list[tuple[str, dict[str, Any]]]) -> str:
    journal = _journal_path([k for k, _ in chunk])
    if journal.exists():
        return json.loads(journal.read_text())["batch_id"]
    batch = client.messages.batches.create(requests=[{"custom_id": k, "params": p} for k, p in chunk])
    journal.parent.mkdir(parents=True, exist_ok=True)
    tmp = journal.with_suffix(".tmp")
    tmp.write_text(json.dumps({"batch_id": batch.id, "submitted_at": time.time(), "requests": len(chunk)}))
    os.replace(tmp, journal)
    return batch.id


def call_teacher_batch(plan: Any, rows: pa.Table, progress: Callable[[int], None] | None = None) -> pa.Table:
    """Same contract as ``fanout.call_teacher``: one output row per (row, sample)."""
    from kolm_ray.sampling.fanout import SAMPLE_SCHEMA, _expand, _result_row

    cfg, tcfg = plan.sample, plan.teacher
    client = anthropic.Anthropic(timeout=tcfg.timeout_s)  # SDK retries are fine for control calls
    cache = ResponseCache(plan.cache_dir)
    reqs: list[tuple[dict[str, Any], str, dict[str, Any]]] = []
    for row in rows.to_pylist():
        for req in _expand(row, cfg.k):
            params = message_params(model=tcfg.model, system=plan.system, user_input=req["input"],
                                    max_tokens=tcfg.max_tokens, temperature=tcfg.temperature)
            reqs.append((req, request_key(params, req["sample_index"]), params))

    results: dict[str, SampleResult] = {}
    pending: dict[str, dict[str, Any]] = {}
    for _, key, params in reqs:
        hit = cache.get(key)
        if hit is not None:
            results[key] = SampleResult(text=hit["text"], usage=Usage(**hit["usage"]), cached=True,
                                         served_model=hit.get("model"))
        else:
            pending[key] = params
    if progress and results:
        progress(len(results))

    failures: dict[str, list[str]] = {k: [] for k in pending}
    attempt = 0
    while pending and attempt < tcfg.max_attempts:
        attempt += 1
        items = sorted(pending.items())
        for i in range(0, len(items), cfg.batch_max_requests):
            chunk = items[i : i + cfg.batch_max_requests]
            batch_id = _submit_or_resume(client, chunk)
            while client.messages.batches.retrieve(batch_id).processing_status != "ended":
                time.sleep(cfg.batch_poll_s)
            for entry in client.messages.batches.results(batch_id):
                key, result = entry.custom_id, entry.result
                if key not in pending:
                    continue
                if result.type == "succeeded":
                    usage = usage_of(result.message.usage)
                    text = message_text(result.message)
                    cache.put(key, {"text": text, "usage": usage.model_dump(), "model": result.message.model,
                                    "stop_reason": result.message.stop_reason, "at": time.time(), "batch": batch_id})
                    results[key] = SampleResult(text=text, usage=usage, attempts=attempt,
                                                failures=failures[key], served_model=result.message.model)
                    del pending[key]
                    if progress:
                        progress(1)
                else:
                    kind = result.type
                    if result.type == "errored":
                        kind = result.error.error.type
                    failures[key].append(kind)
                    if result.type == "errored" and kind not in _RETRYABLE_BATCH_ERRORS:
                        results[key] = SampleResult(text=None, attempts=attempt, failures=failures[key],
                                                    error=f"batch: {kind}")
                        del pending[key]
            _journal_path([k for k, _ in chunk]).unlink(missing_ok=True)
    for key in pending:
        results[key] = SampleResult(text=None, attempts=attempt, failures=failures[key],
                                    error=f"batch: gave up after {attempt} attempts ({', '.join(failures[key])})")
    out = [_result_row(req, key, results[key]) for req, key, _ in reqs]
    return pa.Table.from_pylist(out, schema=SAMPLE_SCHEMA).sort_by([("id", "ascending"), ("sample_index", "ascending")])
