"""Self-consistent selection end to end: ``sample_rows`` on rows without reference outputs, the
real SDK against the local Messages API server, the fan-out and scoring on a local Ray
instance, the verifier learned from the samples, and ``samples.parquet`` read back.

Each row's teacher gives a fixed SET of k=4 answers (the k identical requests arrive in any
order, so which request gets which answer is not fixed): two right ones, one malformed or
off-band, one wrong but well-formed. A few more rows get four answers that all disagree; they
must be flagged as rows where the teacher is unsure.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kolm_ray.rows import ROW_SCHEMA
from kolm_ray.sampling.config import QuotaConfig, SampleConfig, TeacherConfig
from kolm_ray.sampling.fanout import SampleOutcome, sample_rows, write_samples
from kolm_ray.sampling.pricing import DEFAULT_PRICES
from kolm_ray.testing.messages_api import user_text
from kolm_ray.verifier import parse_json_object

K = 4
N_ROWS = 48  # rows with a right answer among their samples
N_UNSURE = 4  # rows whose four samples all disagree
MIN_RIGHT = 0.95  # the bar: at least 95% of the rows keep the right answer


@dataclass(frozen=True)
class TaskRow:
    id: str
    input: str
    answers: tuple[str, ...]  # the teacher's k samples, in no particular order
    right: frozenset[str]  # answers that count as right; empty for an unsure row


def rows_table(rows: list[TaskRow]) -> pa.Table:
    """The table ``kolm_ray.rows.read_rows`` returns for rows without reference outputs."""
    return pa.Table.from_pylist(
        [{"id": r.id, "input": r.input, "output": None, "reference": None} for r in rows], schema=ROW_SCHEMA)


def run(messages_api, tmp_path: Path, task: str, rows: list[TaskRow]) -> tuple[SampleOutcome, list[dict]]:
    by_input = {r.input: r.answers for r in rows}
    assert len(by_input) == len(rows), "inputs must be unique: the teacher answers by input"

    def respond(body: dict, seen: int) -> str:
        # The k identical requests of one row get seen = 0..k-1 in arrival order.
        return by_input[user_text(body)][seen % K]

    srv = messages_api(respond)
    outcome = sample_rows(
        task, rows_table(rows), teacher=TeacherConfig(max_attempts=3), sample=SampleConfig(k=K),
        quota=QuotaConfig(), prices=DEFAULT_PRICES["claude-opus-4-7"], cache_dir=tmp_path / "cache",
    )
    assert srv.stats.succeeded == len(rows) * K
    written = write_samples(tmp_path / "samples", outcome)
    return outcome, pq.read_table(written / "samples.parquet").to_pylist()


def check_selection(outcome: SampleOutcome, samples: list[dict], rows: list[TaskRow], is_right) -> None:
    """≥ 95% right among the rows that have a right answer; every unsure row flagged; the
    row's agreement repeated on each of its samples; only unsure or wrongly chosen rows flagged."""
    assert "learned from the teacher's samples" in outcome.verifier.notes
    chosen = {r["id"]: r for r in samples if r["chosen"]}
    assert len(chosen) == len(rows)
    by_id: dict[str, list[dict]] = {}
    for r in samples:
        by_id.setdefault(r["id"], []).append(r)
    assert all(len({s["agreement"] for s in ss}) == 1 for ss in by_id.values())

    sure = [r for r in rows if r.right]
    unsure = {r.id for r in rows if not r.right}
    wrong = {r.id for r in sure if not is_right(chosen[r.id]["text"], r)}
    assert len(sure) - len(wrong) >= MIN_RIGHT * len(sure), sorted(
        (i, chosen[i]["text"], chosen[i]["k"]) for i in wrong)
    for r in sure:
        if r.id not in wrong:  # the two right answers agree with each other
            assert chosen[r.id]["agreement"] >= 0.5, (r.id, chosen[r.id]["text"], chosen[r.id]["agreement"])
    assert all(chosen[i]["agreement"] == 0.25 for i in unsure)

    s = outcome.summary
    flagged = set(s.low_agreement_row_ids)
    assert unsure <= flagged and flagged - unsure <= wrong, (sorted(flagged), sorted(unsure), sorted(wrong))
    assert s.low_agreement_rows == len(flagged) and s.min_agreement == 0.5
    assert s.format_version == 3
    expected_mean = sum(c["agreement"] for c in chosen.values()) / len(chosen)
    assert abs(s.mean_agreement - expected_mean) < 1e-3
    assert any("teacher unsure" in line for line in s.lines())


# ----- (a) labels ---------------------------------------------------------------------------

LABEL_TASK = ("Classify the support ticket into one of these labels: billing, account, bug, shipping. "
              "Answer with the label only.")
_TICKETS = {
    "billing": ["I was charged twice for invoice {n}", "the refund for order {n} never reached my card",
                "my invoice {n} shows the wrong amount", "please cancel the renewal charge on invoice {n}"],
    "account": ["I cannot log in to account {n}", "please change the email on account {n}",
                "my password reset link for account {n} expired", "how do I close account {n}"],
    "bug": ["the app crashes when I open report {n}", "export {n} fails with an error page",
            "the dashboard shows a blank chart for project {n}", "search returns nothing for item {n}"],
    "shipping": ["parcel {n} has not arrived after two weeks", "the tracking page for parcel {n} is stuck",
                 "parcel {n} was delivered to the wrong address", "can you ship order {n} by express"],
}
_OPENERS = ["Hi,", "Hello team,", "Good morning,", "Hey,", "Dear support,"]


def label_rows(seed: int) -> list[TaskRow]:
    rng = random.Random(seed)
    labels = sorted(_TICKETS)
    rows = []
    for i in range(N_ROWS + N_UNSURE):
        label = labels[i % len(labels)]
        text = f"{rng.choice(_OPENERS)} {rng.choice(_TICKETS[label]).format(n=1000 + i)}. Thanks."
        if i < N_ROWS:
            wrong = rng.choice([x for x in labels if x != label])
            answers = [label, label, f"Category: {label}. This ticket is about {label}.", wrong]
            right = frozenset({label})
        else:
            answers, right = list(labels), frozenset()
        rng.shuffle(answers)
        rows.append(TaskRow(f"ticket-{i:03d}", text, tuple(answers), right))
    return rows


def test_label_majority_vote_keeps_the_right_label_and_flags_unsure_rows(ray_session, messages_api, tmp_path):
    rows = label_rows(seed=21)
    outcome, samples = run(messages_api, tmp_path, LABEL_TASK, rows)
    assert outcome.verifier.kind == "label"
    check_selection(outcome, samples, rows, lambda text, r: text in r.right)


# ----- (b) JSON -----------------------------------------------------------------------------

JSON_TASK = ("Extract the order from the customer's message as JSON with the keys customer, product and "
             "quantity. Answer with the JSON object only.")
_FIRST = ["Ana", "Tom", "Li", "Omar", "Eva", "Sam", "Priya", "Jon", "Mira", "Kofi"]
_LAST = ["Berg", "Costa", "Ito", "Haddad", "Novak", "Reyes", "Shah", "Weber"]
_PRODUCTS = ["desk lamp", "office chair", "standing desk", "monitor arm", "keyboard", "webcam"]
_ORDER_TEMPLATES = [
    "Hi, this is {c}. We would like to order {q} x {p} for the new office. Reference {n}.",
    "Hello, {c} here: please send {q} units of the {p} to our warehouse. Reference {n}.",
    "Good afternoon. Could you ship {q} of your {p} model to us? Regards, {c}. Reference {n}.",
]


def json_rows(seed: int) -> list[TaskRow]:
    rng = random.Random(seed)
    rows = []
    for i in range(N_ROWS + N_UNSURE):
        truth = {"customer": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}", "product": rng.choice(_PRODUCTS),
                 "quantity": rng.randint(1, 40)}
        text = rng.choice(_ORDER_TEMPLATES).format(c=truth["customer"], q=truth["quantity"], p=truth["product"],
                                                   n=5000 + i)
        if i < N_ROWS:
            same = json.dumps(dict(reversed(list(truth.items()))), separators=(",", ":"))  # same object, other form
            answers = [json.dumps(truth), same,
                       f"Sure! Here is the order as JSON: {json.dumps(truth)} Let me know if you need more.",
                       json.dumps({**truth, "quantity": truth["quantity"] + rng.randint(1, 5)})]
            right = frozenset({json.dumps(truth, sort_keys=True)})
        else:
            answers = [json.dumps({**truth, "quantity": truth["quantity"] + d}) for d in range(K)]
            right = frozenset()
        rng.shuffle(answers)
        rows.append(TaskRow(f"order-{i:03d}", text, tuple(answers), right))
    return rows


def test_json_majority_vote_keeps_the_right_object_and_flags_unsure_rows(ray_session, messages_api, tmp_path):
    rows = json_rows(seed=22)
    outcome, samples = run(messages_api, tmp_path, JSON_TASK, rows)
    assert outcome.verifier.kind == "json"

    def is_right(text: str, r: TaskRow) -> bool:
        obj = parse_json_object(text)
        return obj is not None and json.dumps(obj, sort_keys=True) in r.right

    check_selection(outcome, samples, rows, is_right)


# ----- (c) free text ------------------------------------------------------------------------

TEXT_TASK = "Summarize the message in about 20 words."
_TOPICS = {  # topic: (actor, its vocabulary)
    "port": ("port authority", "cranes containers freight harbor customs vessels dockworkers tariffs".split()),
    "clinic": ("hospital network", "nurses vaccines patients pharmacy surgery screening clinics insurance".split()),
    "farm": ("growers cooperative", "wheat irrigation orchards fertilizer cattle tractors silos drought".split()),
    "rail": ("transit agency", "trams railway commuters fares timetable tunnel depot stations".split()),
    "school": ("school district", "teachers curriculum exams classrooms tutoring literacy principals funding".split()),
    "grid": ("grid operator", "batteries turbines substation solar megawatts outages transmission meters".split()),
}
_PLACES = ["Oslo", "Lyon", "Denver", "Osaka", "Quito", "Leeds", "Perth", "Gdansk", "Austin", "Porto", "Tartu", "Cork"]
_VERBS = ["expanded", "delayed", "approved", "audited", "rebuilt", "paused"]
_ASIDES = ["Officials said the decision followed months of heated debate among board members.",
           "Critics argued the timeline was too ambitious for a project of this scale.",
           "Local residents gave the plan a mixed reception at a crowded public meeting.",
           "Analysts expect further changes once the next budget is published in spring."]


def _summaries(actor: str, place: str, verb: str, key: list[str]) -> tuple[str, str]:
    a = (f"The {actor} in {place} {verb} plans for {key[0]} and {key[1]}, which will affect "
         f"{key[2]}, {key[3]} and {key[4]} this year.")
    b = (f"In {place}, the {actor} {verb} its {key[0]} and {key[1]} plans; {key[2]}, {key[3]} "
         f"and {key[4]} will be affected this year.")
    return a, b


def text_rows(seed: int) -> list[TaskRow]:
    rng = random.Random(seed)
    topics = sorted(_TOPICS)
    facts = []
    for i in range(N_ROWS + N_UNSURE):
        topic = topics[i % len(topics)]
        actor, words = _TOPICS[topic]
        place, verb, key = rng.choice(_PLACES), rng.choice(_VERBS), rng.sample(words, 5)
        message = (f"Update {i}: the {actor} in {place} {verb} its plans for {key[0]} and {key[1]} on Monday. "
                   f"The decision will affect {key[2]}, {key[3]} and {key[4]} this year. "
                   + " ".join(rng.sample(_ASIDES, 2)))
        facts.append((topic, message, _summaries(actor, place, verb, key)))
    rows = []
    for i, (topic, message, (a, b)) in enumerate(facts):
        others = [j for j, f in enumerate(facts) if f[0] != topic]
        if i < N_ROWS:
            ramble = a + " " + " ".join(_ASIDES) + f" The {topic} story will be followed closely by reporters."
            off_topic = facts[rng.choice(others)][2][0]  # another row's summary, on another topic
            answers, right = [a, b, ramble, off_topic], frozenset({a, b})
        else:  # four summaries of four rows on four other topics
            picks, seen_topics = [], {topic}
            for j in rng.sample(others, len(others)):
                if facts[j][0] not in seen_topics and len(picks) < K:
                    picks.append(facts[j][2][0])
                    seen_topics.add(facts[j][0])
            answers, right = picks, frozenset()
        rng.shuffle(answers)
        rows.append(TaskRow(f"msg-{i:03d}", message, tuple(answers), right))
    return rows


def test_text_minimum_bayes_risk_keeps_a_consensus_summary_and_flags_unsure_rows(ray_session, messages_api, tmp_path):
    rows = text_rows(seed=23)
    outcome, samples = run(messages_api, tmp_path, TEXT_TASK, rows)
    assert outcome.verifier.kind == "text"
    check_selection(outcome, samples, rows, lambda text, r: text in r.right)
