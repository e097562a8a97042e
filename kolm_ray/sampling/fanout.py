"""The k-sampled teacher fan-out on Ray Data, and self-consistent selection of one sample per row.

``sample_rows`` is the stage, in order:

1. ``plan``: the system prompt (task + verifier rules + few-shot examples).
2. ``call_teacher``: Ray Data reads the rows, expands each into k requests and calls the
   teacher from async actors (``_TeacherCall``) under the cluster-wide quota; or, with
   ``batch``, the Message Batches API (``kolm_ray.sampling.batch``). Cached answers cost nothing.
   Both take and return the tables of ``kolm_ray.sampling.calls``.
3. ``score_samples``: the verifier's T/C/L for every sample (on Ray Data); where the rows have
   no reference outputs the verifier is first learned from each row's k samples
   (``synthesize_from_samples``).
4. ``select``: the pure ``choose_best`` picks one sample per row by self-consistency among the
   samples that pass the verifier: a label or JSON answer by majority vote (the verifier's K
   breaks ties), free text by minimum Bayes risk (the passing sample closest to the others,
   by content-word overlap). ``agreement`` records how many of the row's samples agree with
   the chosen one; ``summarize`` flags the rows below ``SampleConfig.min_agreement``, where the
   teacher is unsure.

Writing the dataset is ``write_samples`` (all or nothing, and the folder never missing). Must
not train or sign anything.
"""

from __future__ import annotations

import asyncio
import bisect
import ctypes
import errno
import glob
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pydantic import BaseModel, ConfigDict, Field

from kolm_ray.durable import fsync_dir
from kolm_ray.errors import BudgetExceeded, InputError, TeacherError
from kolm_ray.sampling.prompt import RECORDED_MODEL_PREFIX
from kolm_ray.measures import content_words, normalize_label, parse_json_object
from kolm_ray.sampling.batch import call_teacher_batch
from kolm_ray.sampling.budget import BudgetCheck, budget_check
from kolm_ray.sampling.cache import ResponseCache, request_key
from kolm_ray.sampling.calls import CALL_SCHEMA, REQUEST_SCHEMA, SAMPLE_SCHEMA, SamplingPlan, expand, result_row
from kolm_ray.sampling.config import QuotaConfig, SampleConfig, TeacherConfig
from kolm_ray.sampling.limits import teacher_identity
from kolm_ray.sampling.pricing import Prices, Usage, cost_usd
from kolm_ray.sampling.prompt import message_params, prompt_digest, system_blocks
from kolm_ray.sampling.quota import NAMESPACE, quota_name, release_holder, teacher_quota
from kolm_ray.sampling.teacher import UNAVAILABLE, AnthropicTeacher, sdk_env
from kolm_ray.verifier import Verifier, synthesize, synthesize_from_samples

# 2: selection by self-consistency; every sample row carries its row's ``agreement``.
# 3: ``served_model``, the model name each answer came back with (a recorded teacher says so).
SAMPLES_FORMAT_VERSION = 3

SCORE_COLUMNS = [("t", pa.float64()), ("c", pa.float64()), ("l", pa.float64()), ("k", pa.float64()), ("passed", pa.bool_())]
# Added by ``select``: the kept sample of each row, and the row's agreement (None where every
# sample of the row failed), repeated on each of its k samples.
SELECT_COLUMNS = [("chosen", pa.bool_()), ("agreement", pa.float64())]

# Two free texts agree at content-word F1 >= 0.5: the verifier's own bar for a faithful
# paraphrase (it shares about half its content words with the reference).
TEXT_AGREEMENT_F1 = 0.5


class Outage(BaseModel):
    """When the teacher did not answer: the longest stretch from a failure (529 overloaded, 5xx,
    timeout, unreachable) to the next answer, with no answer in between."""

    model_config = ConfigDict(frozen=True)
    failures: int = Field(description="Calls that failed because the teacher was unavailable.")
    by_kind: dict[str, int] = Field(description="Those failures by kind (overloaded: 529).")
    longest_s: float = Field(description="Seconds of the longest stretch without an answer.")
    started_at: float = Field(description="When that stretch began (epoch seconds): its first failure.")
    ended_at: float | None = Field(description="When it ended: the next answer (None: never answered again).")

    def line(self) -> str:
        kinds = ", ".join(f"{v} {_KIND_NAMES.get(k, k)}" for k, v in sorted(self.by_kind.items()))
        at = time.strftime("%H:%M:%S", time.localtime(self.started_at))
        end = (f"to {time.strftime('%H:%M:%S', time.localtime(self.ended_at))}" if self.ended_at is not None
               else "and did not come back")
        return (f"outage      teacher unavailable for {_duration(self.longest_s)} (no answer from {at} {end}) · "
                f"{self.failures} failed calls: {kinds}")


_KIND_NAMES = {"overloaded": "overloaded (529)", "server": "server errors (5xx)", "timeout": "timeouts",
               "connection": "unreachable"}


def _duration(s: float) -> str:
    return f"{int(s // 60)}m{s % 60:04.1f}s" if s >= 60 else f"{s:.1f}s"


def outage_of(unavailable_at: Sequence[Sequence[float]], answered_at: Sequence[float | None],
              kinds: Counter | None = None) -> Outage | None:
    """The longest stretch without an answer that began with an unavailable failure, from each
    sample's unavailable failures' times and answer time; None when nothing failed so."""
    fails = sorted(t for ts in unavailable_at for t in (ts or ()))
    if not fails:
        return None
    answers = sorted(t for t in answered_at if t is not None)
    best: tuple[float, float, float | None] | None = None
    i = 0
    while i < len(fails):
        start = fails[i]
        j = bisect.bisect_right(answers, start)
        nxt = answers[j] if j < len(answers) else None  # the stretch ends at the next answer
        end = nxt if nxt is not None else fails[-1]
        length = end - start
        if best is None or length > best[0]:
            best = (length, start, nxt)
        while i < len(fails) and (nxt is None or fails[i] <= nxt):
            i += 1
    by_kind = {k: v for k, v in (kinds or Counter()).items() if k in UNAVAILABLE}
    length, start, nxt = best
    return Outage(failures=len(fails), by_kind=by_kind, longest_s=round(length, 3), started_at=start, ended_at=nxt)


class SampleSummary(BaseModel):
    """What the stage did and what it cost; printed by the CLI and stored beside the dataset."""

    model_config = ConfigDict(frozen=True)
    format_version: int = SAMPLES_FORMAT_VERSION
    teacher: str
    mode: str
    rows: int
    k: int
    samples: int
    calls: int
    cache_hits: int
    retries: int
    retries_by_kind: dict[str, int]
    failed_samples: int
    failed_rows: int
    failed_row_ids: list[str]
    accepted_rows: int
    acceptance_rate: float
    mean_agreement: float = Field(description="Mean over rows with a sample of the share agreeing with the chosen one.")
    min_agreement: float = Field(description="Rows whose agreement is below this are flagged.")
    low_agreement_rows: int = Field(description="Rows below min_agreement: where the teacher is unsure.")
    low_agreement_row_ids: list[str] = Field(description="The first 100 of them, by id.")
    usage: Usage
    cost_usd: float
    dataset_usage: Usage
    dataset_cost_usd: float
    elapsed_s: float
    quota: dict[str, Any] | None = None
    served_by: list[str] = Field(default_factory=list, description="The model names the answers came back with.")
    outage: Outage | None = Field(None, description="When the teacher did not answer (None: it always did).")

    @property
    def recorded(self) -> bool:
        """Every answer came from a stand-in replaying recorded answers (its model is ``recorded:...``)."""
        return bool(self.served_by) and all(m.startswith(RECORDED_MODEL_PREFIX) for m in self.served_by)

    def source(self) -> str:
        """Where the answers came from, for every line that states calls or cost."""
        if self.recorded:
            return "recorded answers: a stand-in, not a live model; nothing paid"
        via = os.environ.get("ANTHROPIC_BASE_URL")
        return f"{self.mode}, via {via}" if via else self.mode

    def _calls(self) -> str:
        verb = "answered by the stand-in" if self.recorded else "paid now"
        return f"{self.calls} calls {verb}, {self.cache_hits} from cache"

    def cost_line(self) -> str:
        """What was paid by this run and what the whole dataset cost at list price: two figures,
        each saying what it covers."""
        if self.recorded:
            return f"$0 paid (recorded) · ${self.dataset_cost_usd:.4f} at list price for the {self.samples} samples"
        return (f"${self.cost_usd:.4f} paid now for {self.calls} calls · ${self.dataset_cost_usd:.4f} for the "
                f"{self.samples} samples at list price, cached ones included")

    def headline(self) -> str:
        """The compile's one teacher line."""
        down = (f" · teacher unavailable for {_duration(self.outage.longest_s)} ({self.outage.failures} failed calls)"
                if self.outage else "")
        return (f"teacher     {self.teacher} k={self.k} ({self.source()}): {self._calls()}, {self.retries} retries, "
                f"{self.failed_rows} rows failed · acceptance {100 * self.acceptance_rate:.1f}% · {self.cost_line()}"
                f"{down}")

    def lines(self) -> list[str]:
        u = self.usage
        retry_kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.retries_by_kind.items())) or "none"
        unsure = self.low_agreement_row_ids[:5]
        return [
            f"teacher     {self.teacher} ({self.source()}) · {self.rows} rows x k={self.k} = {self.samples} samples",
            f"calls       {self._calls()}, {self.retries} retries ({retry_kinds}), "
            f"{self.failed_samples} failed samples",
            f"rows        {self.rows - self.failed_rows} kept, {self.failed_rows} failed · "
            f"acceptance {100 * self.acceptance_rate:.1f}% pass the verifier",
            f"agreement   mean {100 * self.mean_agreement:.1f}% of samples agree with the chosen one · "
            f"{self.low_agreement_rows} rows below {100 * self.min_agreement:.0f}% (teacher unsure)"
            + (f": {', '.join(unsure)}{', ...' if self.low_agreement_rows > len(unsure) else ''}" if unsure else ""),
            f"tokens      in {u.input_tokens:,} · out {u.output_tokens:,} · cache read {u.cache_read_tokens:,} · "
            f"cache write {u.cache_write_tokens:,}",
            *([self.outage.line()] if self.outage else []),
            f"cost        {self.cost_line()}",
            f"time        {self.elapsed_s:.1f} s",
        ]


def plan(
    task: str, rows: pa.Table, verifier: Verifier | None, teacher: TeacherConfig, sample: SampleConfig,
    quota: QuotaConfig, cache_dir: str | Path,
) -> SamplingPlan:
    labeled = [(r["input"], r["output"]) for r in rows.to_pylist() if r["output"]]
    return SamplingPlan(
        task=task,
        system=system_blocks(task, verifier, labeled[: teacher.few_shot]),
        teacher=teacher, sample=sample, quota=quota, cache_dir=str(cache_dir),
    )


class _TeacherCall:
    """Ray Data async actor: calls the teacher for a batch of requests, concurrently."""

    def __init__(self, plan: SamplingPlan, quota_actor: str, concurrency: int, env: dict[str, str],
                 prices: Prices | None = None):
        self.plan = plan
        quota = ray.get_actor(quota_actor, namespace=NAMESPACE)
        # plan.quota: this compile's holder, tenant and caps; prices: to book what each call cost.
        self.teacher = AnthropicTeacher(plan.teacher, ResponseCache(plan.cache_dir), quota, sdk_env=env,
                                        claim=plan.quota, prices=prices)
        self.sem: asyncio.Semaphore | None = None
        self.concurrency = concurrency

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self.sem is None:  # created on the actor's event loop
            self.sem = asyncio.Semaphore(self.concurrency)
        reqs = batch.to_pylist()  # Arrow, not NumPy: a missing reference must stay None, not NaN

        async def one(req: dict[str, Any]) -> dict[str, Any]:
            params = message_params(
                model=self.plan.teacher.model, system=self.plan.system, user_input=req["input"],
                max_tokens=self.plan.teacher.max_tokens, temperature=self.plan.teacher.temperature,
            )
            key = request_key(params, int(req["sample_index"]))
            async with self.sem:
                res = await self.teacher.sample(params, key)
            return result_row(req, key, res)

        out = await asyncio.gather(*(one(r) for r in reqs))
        return pa.Table.from_pylist(out, schema=CALL_SCHEMA)


def call_teacher(plan: SamplingPlan, rows: pa.Table, progress: Callable[[int], None] | None = None,
                 prices: Prices | None = None) -> pa.Table:
    """Every (row, sample) through the teacher; one output row per sample, failed ones included
    (``CALL_SCHEMA``: the written columns and the calls' timing).

    Online calls hold leases from the key's shared quota as ``plan.quota`` (holder, tenant,
    caps), booking each call's cost at ``prices`` against the tenant's budget."""
    cfg = plan.sample
    if cfg.batch:
        return call_teacher_batch(plan, rows, progress)
    api_key, base_url = teacher_identity()  # the quota's identity: the API key, else the auth token
    teacher_quota(api_key, base_url)
    if plan.quota.holder is None:  # one holder for the whole run, so its caps hold across its actors
        plan = SamplingPlan(**{**plan.__dict__, "quota": plan.quota.model_copy(
            update={"holder": f"run-{uuid.uuid4().hex[:12]}"})})
    n_samples = rows.num_rows * cfg.samples_per_input
    per_actor = max(1, -(-cfg.concurrency // cfg.actors))
    # The (row, sample) requests are made here, not in a Ray Data task: a task holds a whole
    # CPU, and on a busy cluster (a fit, Serve replicas, other compiles) that CPU may never come,
    # while the calls themselves need none. Enough blocks that every actor gets work; batches
    # small enough that one slow retry holds back few finished samples, large enough to keep
    # `per_actor` calls in flight.
    requests = pa.Table.from_pylist([q for r in rows.to_pylist() for q in expand(r, cfg.samples_per_input)], schema=REQUEST_SCHEMA)
    n_blocks = max(1, min(requests.num_rows, cfg.actors * 8))
    step = max(1, -(-requests.num_rows // n_blocks))
    blocks = [requests.slice(i, step) for i in range(0, requests.num_rows, step)] or [requests]
    ds = (
        ray.data.from_arrow(blocks)
        .map_batches(
            _TeacherCall,
            fn_constructor_kwargs={"plan": plan, "quota_actor": quota_name(api_key, base_url),
                                   "concurrency": per_actor, "env": sdk_env(), "prices": prices},
            batch_size=max(1, min(per_actor // 2, 64)),
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(
                size=cfg.actors, max_concurrent_calls_per_actor=8, max_tasks_in_flight_per_actor=8
            ),
            # I/O-bound: the actors wait on the network. Holding no CPU, they start on any node
            # at once and never starve a fit, an eval or a Serve replica of its cores.
            num_cpus=0,
        )
    )
    tables = []
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        tables.append(batch.cast(CALL_SCHEMA) if batch.num_rows else batch)
        if progress:
            progress(batch.num_rows)
    table = pa.concat_tables([t for t in tables if t.num_rows]) if tables else CALL_SCHEMA.empty_table()
    if table.num_rows != n_samples:
        raise TeacherError(f"fan-out returned {table.num_rows} samples, expected {n_samples}: data was lost")
    return table.sort_by([("id", "ascending"), ("sample_index", "ascending")])


def _score_batch(batch: pa.Table, verifier_json: str) -> pa.Table:
    verifier = _verifier_cache(verifier_json)
    texts, inputs, refs = (batch.column(c).to_pylist() for c in ("text", "input", "reference"))
    cols: dict[str, list] = {name: [] for name, _ in SCORE_COLUMNS}
    for text, inp, ref in zip(texts, inputs, refs):
        if text is None:
            for name, _ in SCORE_COLUMNS:
                cols[name].append(None if name != "passed" else False)
            continue
        ch = verifier.score(text, inp, ref)
        for name in ("t", "c", "l", "k", "passed"):
            cols[name].append(getattr(ch, name))
    for name, typ in SCORE_COLUMNS:
        batch = batch.append_column(pa.field(name, typ), pa.array(cols[name], type=typ))
    return batch


_VERIFIERS: dict[str, Verifier] = {}


def _verifier_cache(verifier_json: str) -> Verifier:
    if verifier_json not in _VERIFIERS:
        _VERIFIERS[verifier_json] = Verifier.from_json(verifier_json)
    return _VERIFIERS[verifier_json]


def score_samples(samples: pa.Table, verifier: Verifier) -> pa.Table:
    """Append T, C, L, K and passed to every sample (failed samples score None / False)."""
    if samples.num_rows == 0:
        return _score_batch(samples, verifier.to_json())
    ds = ray.data.from_arrow(samples).map_batches(
        _score_batch, fn_kwargs={"verifier_json": verifier.to_json()}, batch_format="pyarrow", batch_size=1024,
        num_cpus=0.25,  # milliseconds of work per batch: a share of a core, so a busy node still takes it
    )
    return pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by(
        [("id", "ascending"), ("sample_index", "ascending")]
    )


def _vote_key(kind: str, text: str, text_fields: Sequence[str] = ()) -> str:
    """The answer a label or JSON sample gives: samples with equal keys vote together. A JSON
    answer's free-text fields (``text_fields``: a summary, a note) are left out: paraphrases of
    one answer must vote together, and MBR chooses among them."""
    if kind == "label":
        return normalize_label(text)
    if kind == "json":
        obj = parse_json_object(text)
        if obj is None:
            return text
        return json.dumps({k: v for k, v in obj.items() if k not in text_fields}, sort_keys=True)
    return text


def _free_text(kind: str, text: str, text_fields: Sequence[str]) -> str:
    """What MBR compares: the whole text, or a JSON answer's free-text fields."""
    if kind != "json":
        return text
    obj = parse_json_object(text) or {}
    return " ".join(str(obj[k]) for k in text_fields if isinstance(obj.get(k), str))


def similarity(a: str, b: str) -> float:
    """Content-word F1 of two texts, 0..1: the cheap overlap measure behind MBR and agreement."""
    wa, wb = content_words(a), content_words(b)
    if not wa and not wb:  # nothing to compare by content ("ok", ""): only equal text agrees
        return 1.0 if a.strip().lower() == b.strip().lower() else 0.0
    return 2 * len(wa & wb) / (len(wa) + len(wb))


def _k(sample: dict[str, Any]) -> float:
    return round(sample["k"], 9)  # K is a weighted mean: equal scores may differ in the last bits


def choose_best(samples: Sequence[dict[str, Any]], kind: str, text_fields: Sequence[str] = ()) -> int | None:
    """Index (into ``samples``, one row's k samples) of the sample to keep; None if all failed.

    Self-consistency among the samples that pass the verifier:

    * ``label`` and ``json``: majority vote. Samples giving the same answer (normalized label,
      canonical JSON) vote together; the answer with most votes wins, a tie goes to the answer
      with the higher mean K, then to the one sampled first. Within the winning answer, the
      sample with the highest K (then lowest sample index) is kept; where the JSON has
      free-text fields (``text_fields``), they are left out of the vote and the winning
      answer's samples are chosen among by minimum Bayes risk over those fields.
    * ``text``: minimum Bayes risk. The passing sample with the highest mean ``similarity`` to
      the row's other samples that have text (passing or not) wins: the consensus, not the
      outlier. Ties go to the higher K, then the lower sample index.

    Where no sample passes, the highest K wins (then the lowest sample index). Each sample is a
    dict with ``text`` (None for a failed call), ``k``, ``passed`` and ``sample_index``.
    Deterministic: the result does not depend on the order of ``samples``.
    """
    ok = [i for i, s in enumerate(samples) if s.get("text") is not None and s.get("k") is not None]
    if not ok:
        return None

    def by_k(i: int) -> tuple:
        return (-_k(samples[i]), samples[i]["sample_index"])

    passing = [i for i in ok if samples[i].get("passed")]
    if not passing:
        return min(ok, key=by_k)
    if kind in ("label", "json"):
        answers: dict[str, list[int]] = {}
        for i in passing:
            answers.setdefault(_vote_key(kind, samples[i]["text"], text_fields), []).append(i)

        def answer_rank(members: list[int]) -> tuple:
            mean_k = round(sum(samples[i]["k"] for i in members) / len(members), 9)
            return (-len(members), -mean_k, min(samples[i]["sample_index"] for i in members))

        winners = min(answers.values(), key=answer_rank)
        if kind == "label" or not text_fields:
            return min(winners, key=by_k)
        passing = winners  # MBR over the free text, within the answer the vote chose

    def consensus(i: int) -> float:
        others = [j for j in ok if j != i]
        if not others:
            return 0.0
        mine = _free_text(kind, samples[i]["text"], text_fields)
        return round(sum(similarity(mine, _free_text(kind, samples[j]["text"], text_fields))
                         for j in others) / len(others), 9)

    return min(passing, key=lambda i: (-consensus(i), *by_k(i)))


def agreement(samples: Sequence[dict[str, Any]], chosen: int, kind: str, text_fields: Sequence[str] = ()) -> float:
    """Share (0..1) of the row's samples with text that agree with ``samples[chosen]``.

    Failed calls (``text`` None) are left out of the count; the chosen sample agrees with
    itself. ``label``/``json``: the same answer (normalized label, canonical JSON less its
    free-text ``text_fields``). ``text``:
    ``similarity`` to the chosen one of at least ``TEXT_AGREEMENT_F1``. Low agreement marks a
    row where the teacher is unsure.

    Raises:
        ValueError: ``samples[chosen]`` has no text (a failed call cannot be chosen).
    """
    mine = samples[chosen].get("text")
    if mine is None:
        raise ValueError(f"sample {chosen} has no text: a failed call cannot be the chosen one")
    texts = [s["text"] for s in samples if s.get("text") is not None]
    if kind in ("label", "json"):
        key = _vote_key(kind, mine, text_fields)
        agree = sum(1 for t in texts if _vote_key(kind, t, text_fields) == key)
    else:
        agree = sum(1 for t in texts if similarity(mine, t) >= TEXT_AGREEMENT_F1)
    return agree / len(texts)


def select(scored: pa.Table, kind: str, text_fields: Sequence[str] = ()) -> pa.Table:
    """Add ``chosen`` (one sample per row, none for a row whose samples all failed) and the
    row's ``agreement`` on each of its samples (None for such a row).

    ``scored`` must hold each row's samples together (``score_samples`` sorts by id).
    """
    records = scored.to_pylist()
    chosen = [False] * len(records)
    agree: list[float | None] = [None] * len(records)
    start = 0
    while start < len(records):
        end = start
        while end < len(records) and records[end]["id"] == records[start]["id"]:
            end += 1
        row = records[start:end]
        best = choose_best(row, kind, text_fields)
        if best is not None:
            chosen[start + best] = True
            agree[start:end] = [agreement(row, best, kind, text_fields)] * (end - start)
        start = end
    (chosen_name, chosen_type), (agree_name, agree_type) = SELECT_COLUMNS
    return (scored.append_column(pa.field(chosen_name, chosen_type), pa.array(chosen, type=chosen_type))
            .append_column(pa.field(agree_name, agree_type), pa.array(agree, type=agree_type)))


def summarize(
    table: pa.Table, plan: SamplingPlan, prices: Prices, elapsed_s: float, quota_stats: dict | None,
    outage: Outage | None = None,
) -> SampleSummary:
    """Counts, cost and agreement of a selected table (``select``'s output); rows whose
    agreement is below ``plan.sample.min_agreement`` are flagged. ``outage``: ``outage_of``
    the calls."""
    recs = table.to_pylist()
    paid = [r for r in recs if not r["cached"] and r["text"] is not None]
    usage = Usage()
    for r in paid:
        usage = usage + Usage(input_tokens=r["input_tokens"], output_tokens=r["output_tokens"],
                              cache_read_tokens=r["cache_read_tokens"], cache_write_tokens=r["cache_write_tokens"])
    dataset_usage = Usage()
    for r in recs:
        if r["text"] is not None:  # cached answers carry the usage they were paid for
            dataset_usage = dataset_usage + Usage(
                input_tokens=r["input_tokens"], output_tokens=r["output_tokens"],
                cache_read_tokens=r["cache_read_tokens"], cache_write_tokens=r["cache_write_tokens"])
    kinds: Counter = Counter()
    for r in recs:
        for f in (r["failures"] or "").split(","):
            if f:
                kinds[f] += 1
    by_row: dict[str, list[dict]] = {}
    for r in recs:
        by_row.setdefault(r["id"], []).append(r)
    failed_rows = sorted(i for i, rs in by_row.items() if all(r["text"] is None for r in rs))
    accepted = sum(1 for r in recs if r["chosen"] and r["passed"])
    agreements = {i: rs[0]["agreement"] for i, rs in by_row.items() if rs[0]["agreement"] is not None}
    low = sorted(i for i, a in agreements.items() if a < plan.sample.min_agreement)
    return SampleSummary(
        teacher=plan.teacher.model,
        mode="batch" if plan.sample.batch else "online",
        rows=len(by_row), k=plan.sample.samples_per_input, samples=len(recs),
        calls=len(paid), cache_hits=sum(1 for r in recs if r["cached"]),
        retries=sum(max(0, r["attempts"] - 1) for r in recs if not r["cached"]),
        retries_by_kind=dict(kinds),
        failed_samples=sum(1 for r in recs if r["text"] is None),
        failed_rows=len(failed_rows), failed_row_ids=failed_rows[:100],
        accepted_rows=accepted, acceptance_rate=accepted / len(by_row) if by_row else 0.0,
        mean_agreement=round(sum(agreements.values()) / len(agreements), 4) if agreements else 0.0,
        min_agreement=plan.sample.min_agreement,
        low_agreement_rows=len(low), low_agreement_row_ids=low[:100],
        usage=usage, cost_usd=round(cost_usd(usage, prices, batch=plan.sample.batch), 6),
        dataset_usage=dataset_usage,
        dataset_cost_usd=round(cost_usd(dataset_usage, prices, batch=plan.sample.batch), 6),
        elapsed_s=round(elapsed_s, 3), quota=quota_stats,
        served_by=sorted({r["served_model"] for r in recs if r.get("served_model")}),
        outage=outage,
    )


_LEARNED_NOTE = "learned from the teacher's samples"


def _samples_by_row(raw: pa.Table) -> tuple[list[list[str | None]], list[str]]:
    """Each row's k sample texts (failed calls as None), by sample index, and the row's input."""
    texts: dict[str, list[tuple[int, str | None]]] = {}
    inputs: dict[str, str] = {}
    for rid, inp, j, text in zip(*(raw.column(c).to_pylist() for c in ("id", "input", "sample_index", "text"))):
        texts.setdefault(rid, []).append((j, text))
        inputs[rid] = inp
    return [[t for _, t in sorted(texts[rid], key=lambda x: x[0])] for rid in texts], list(inputs.values())


@dataclass(frozen=True)
class SampleOutcome:
    samples: pa.Table  # every sample, scored, with `chosen` and its row's `agreement`
    verifier: Verifier
    summary: SampleSummary
    prompt_sha256: str | None = None  # the teacher's system prompt (``prompt.prompt_digest``)


def sample_rows(
    task: str,
    rows: pa.Table,
    *,
    teacher: TeacherConfig,
    sample: SampleConfig,
    quota: QuotaConfig,
    prices: Prices,
    cache_dir: str | Path,
    verifier: Verifier | None = None,
    progress: Callable[[int], None] | None = None,
    on_budget: Callable[[BudgetCheck], None] | None = None,
) -> SampleOutcome:
    """The sampling stage: budget check, teacher fan-out, scoring, self-consistent selection,
    summary.

    ``verifier`` defaults to one synthesized from the rows' reference outputs, or, where no row
    has one, learned from each row's k teacher samples (``synthesize_from_samples``).

    ``quota`` is this run's claim on the key's shared quota: its holder (one is made when it
    names none; its slots are freed when the stage ends, however it ends), tenant and caps.
    Before any call, the estimated cost of the uncached calls is checked against ``quota``'s
    ``max_cost_usd`` and the tenant's budget, and handed to ``on_budget`` to state.

    Raises:
        BudgetExceeded: the estimate passes a budget (nothing was paid), or the quota refused
            calls once a budget was spent during the run (what was paid is cached).
        TeacherError: more than ``sample.max_failed_fraction`` of the rows got no sample.
    """
    start = time.perf_counter()
    if sample.n is not None:
        rows = rows.slice(0, sample.n)
    refs = [o for o in rows.column("output").to_pylist() if o]
    if verifier is None and refs:
        verifier = synthesize(task, rows.column("output").to_pylist(), rows.column("input").to_pylist())
    quota = quota if quota.holder else quota.model_copy(update={"holder": f"sample-{uuid.uuid4().hex[:12]}"})
    p = plan(task, rows, verifier, teacher, sample, quota, cache_dir)
    api_key, base_url = teacher_identity()  # the quota's identity: the API key, else the auth token
    handle = teacher_quota(api_key, base_url)
    budget, spent = ray.get(handle.tenant_view.remote(quota.tenant))
    check = budget_check(rows, sample.samples_per_input, teacher, prices, system=p.system, cache=ResponseCache(p.cache_dir),
                         batch=sample.batch, claim=quota, budget=budget, spent=spent)
    if on_budget:
        on_budget(check)
    if not check.decision.ok:
        raise BudgetExceeded(check.decision.message)
    try:
        calls = call_teacher(p, rows, progress, prices)
        quota_stats = None if sample.batch else ray.get(handle.stats.remote(quota.holder))
    finally:  # a failed or cancelled run leaves no slot taken
        release_holder(api_key, base_url, quota.holder)
    kinds: Counter = Counter(f for fs in calls.column("failures").to_pylist() for f in (fs or "").split(",") if f)
    outage = outage_of(calls.column("unavailable_at").to_pylist(), calls.column("answered_at").to_pylist(), kinds) \
        if "unavailable_at" in calls.column_names else None
    raw = calls.select(SAMPLE_SCHEMA.names)
    refused = [e for e in raw.column("error").to_pylist() if e and e.startswith("budget:")]
    if refused:
        raise BudgetExceeded(f"{len(refused)} of {raw.num_rows} samples were refused once the budget was spent "
                             f"({refused[0][len('budget: '):]}); every answer received is cached: re-run when the "
                             f"budget allows")
    if verifier is None:
        texts, inputs = _samples_by_row(raw)
        verifier = synthesize_from_samples(task, texts, inputs)
        if _LEARNED_NOTE not in verifier.notes:
            verifier = verifier.model_copy(update={"notes": [*verifier.notes, _LEARNED_NOTE]})
    scored = select(score_samples(raw, verifier), verifier.kind, verifier.json_text_fields or ())
    summary = summarize(scored, p, prices, time.perf_counter() - start, quota_stats, outage)
    if summary.failed_rows > sample.max_failed_fraction * summary.rows:
        raise TeacherError(
            f"{summary.failed_rows} of {summary.rows} rows got no teacher sample "
            f"({100 * summary.failed_rows / summary.rows:.1f}% > max {100 * sample.max_failed_fraction:.1f}%); "
            f"retries by kind: {summary.retries_by_kind}"
            + (f"; {summary.outage.line().removeprefix('outage').strip()}" if summary.outage else "")
            + ". Every answer received is cached: re-run to resume."
        )
    return SampleOutcome(samples=scored, verifier=verifier, summary=summary, prompt_sha256=prompt_digest(p.system))


def samples_target(out_dir: str | Path) -> str | Path:
    """Where ``write_samples`` will write ``out_dir``: an object-storage URI as given, else the
    local folder (a ``file://`` URI turned into its path). Cheap and touching nothing: the CLI
    asks it before any teacher call.

    Raises:
        InputError: ``out_dir`` is a URI that is neither object storage nor a local ``file://``
            path; a file; or a symbolic link kolm did not make (kolm replaces what its link
            points to and removes the version it replaced, which here would be the user's).
    """
    from urllib.parse import unquote, urlsplit

    from kolm_ray.store import is_remote

    text = os.fspath(out_dir)
    if is_remote(text):
        return text
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme.lower() != "file" or parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise InputError(f"{text!r} is not a folder kolm can write samples to: give a local path, a file:///path "
                             "URI, or s3://BUCKET/PREFIX, gs://BUCKET/PREFIX")
        text = unquote(parts.path)
    out = Path(text).expanduser()
    if out.is_symlink():
        _kolm_version(out)  # raises for a link that is not kolm's
    elif out.exists() and not out.is_dir():
        raise InputError("is a file, not a folder: kolm writes samples.parquet, verifier.json and summary.json into "
                         "a folder; give another --out or remove the file", path=str(out))
    return out


# The versions ``write_samples`` makes: ``.NAME.v-<time>-<id>`` beside ``NAME``.
_VERSION_SUFFIX = r"\.v-\d{8}T\d{6}-[0-9a-f]{8}"


def _kolm_version(out: Path) -> Path:
    """The version folder kolm's link ``out`` points to (to remove once replaced).

    Raises:
        InputError: ``out`` is a link kolm did not make: its target is not a plain version name
            in ``out``'s own folder.
    """
    target = os.readlink(out)
    if re.fullmatch(r"\." + re.escape(out.name) + _VERSION_SUFFIX, target):
        return out.parent / target
    raise InputError(f"is a symbolic link to {target} that kolm did not make. kolm replaces a samples folder by "
                     f"writing a new version beside it and removing the one it replaced, which here would be your "
                     f"data: give --out the real folder ({out.resolve()}) or a new path, or remove the link",
                     path=str(out))


def write_samples(out_dir: str | Path, outcome: SampleOutcome) -> str | Path:
    """Write ``samples.parquet``, ``verifier.json`` and ``summary.json`` into ``out_dir`` at once;
    returns where they went (the folder's ``Path``, or the URI).

    A folder: ``out_dir`` is a symbolic link to a sibling version folder
    (``.NAME.v-<time>-<id>``). The new dataset is written and fsynced into a new version folder,
    then a new link is put over ``out_dir`` in one rename, and fsynced: at every instant
    ``out_dir`` is the previous dataset or the new one, never missing and never half of one,
    and a reader who opened the previous files keeps reading them. The replaced version is
    then removed. A real folder at ``out_dir`` (written before this layout) is swapped for the
    link in one ``renameat2(RENAME_EXCHANGE)`` where the system has it (Linux); elsewhere that
    one conversion renames it aside first, and for that instant ``out_dir`` is missing.

    An object-storage prefix (``s3://``, ``gs://``) has no rename: each file is one object
    (never seen half-written), and ``summary.json`` goes last, so it marks a complete dataset; a
    crash between the uploads can leave the new samples beside the previous summary.

    Raises:
        InputError: ``out_dir`` is not a place for samples (see ``samples_target``); nothing
            was written.
    """
    import tempfile

    from kolm_ray.store import open_store

    target = samples_target(out_dir)
    if isinstance(target, str):
        store = open_store(target)
        with tempfile.TemporaryDirectory(prefix="kolm-samples-") as td:
            pq.write_table(outcome.samples, Path(td) / "samples.parquet")
            store.upload_file(Path(td) / "samples.parquet", "samples.parquet")
        store.write_bytes("verifier.json", outcome.verifier.to_json().encode())
        store.write_bytes("summary.json", outcome.summary.model_dump_json(indent=2).encode())
        return store.uri
    out = target
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    version = parent / f".{out.name}.v-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    version.mkdir()
    switched = False
    try:
        pq.write_table(outcome.samples, version / "samples.parquet")
        _fsync_file(version / "samples.parquet")
        _write_synced(version / "verifier.json", outcome.verifier.to_json().encode())
        _write_synced(version / "summary.json", outcome.summary.model_dump_json(indent=2).encode())
        fsync_dir(version)
        previous = _point(out, version)
        switched = True
    finally:
        if not switched:  # never the folder `out` points to: only one that was never pointed to
            shutil.rmtree(version, ignore_errors=True)
    fsync_dir(parent)  # the switch itself on disk
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    _sweep(out, keep=version)
    return out


# Versions and links left by a writer that crashed are removed by a later write after this long
# (a concurrent writer's own are younger).
_STALE_S = 3600.0


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _point(out: Path, version: Path) -> Path | None:
    """Make ``out`` a link to ``version`` in one step (see ``write_samples``). Returns the
    folder ``out`` held before (to remove), or None."""
    parent = out.parent
    link = parent / f".{out.name}.link-{uuid.uuid4().hex[:8]}"
    os.symlink(version.name, link)  # relative: the folder can move with its versions
    try:
        if out.is_symlink():
            previous: Path | None = _kolm_version(out)  # only ever kolm's own version is removed
            os.replace(link, out)  # a link over a link: one rename
        elif out.exists():
            if not out.is_dir():  # checked by samples_target; a file put there since is not swapped aside
                raise InputError("is a file, not a folder: give another --out or remove the file", path=str(out))
            if _exchange(link, out):  # the old folder is now at `link`'s name
                previous = link
            else:
                previous = parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(out, previous)
                try:
                    os.replace(link, out)
                except BaseException:
                    os.rename(previous, out)  # put the old one back
                    raise
        else:
            previous = None
            os.replace(link, out)
    except BaseException:
        if link.is_symlink():
            link.unlink()
        raise
    return previous


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system
    or the file system has no such call (nothing was changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _sweep(out: Path, keep: Path) -> None:
    """Remove what crashed writers left beside ``out`` (versions no link names, temporary
    links, renamed-aside folders), once older than ``_STALE_S``."""
    now = time.time()
    current = out.parent / os.readlink(out) if out.is_symlink() else None
    for p in out.parent.glob(f".{glob.escape(out.name)}.*"):
        if p in (keep, current) or not p.name[len(out.name) + 2:].startswith(("v-", "link-", "old-", "tmp-")):
            continue
        try:
            if now - p.lstat().st_mtime < _STALE_S:
                continue
            if p.is_symlink():
                p.unlink()
            else:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass
