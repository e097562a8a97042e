import json

import pytest

from kolm_ray.errors import InputError
from kolm_ray.kscore import score_rows
from kolm_ray.testing.corpus import LEADS_TASK, ROUTING_TASK, TLDR_TASK, leads_rows, routing_rows, tldr_rows
from kolm_ray.verifier import Verifier, synthesize

TASKS = {
    "text": (TLDR_TASK, tldr_rows(48, seed=1)),
    "label": (ROUTING_TASK, routing_rows(48, seed=1)),
    "json": (LEADS_TASK, leads_rows(48, seed=1)),
}


def _fit(kind):
    task, rows = TASKS[kind]
    return synthesize(task, [r.output for r in rows], [r.input for r in rows]), rows


def _score(v, rows, outputs, with_reference=True):
    return score_rows(
        v, [r.id for r in rows], outputs, [r.input for r in rows],
        [r.output for r in rows] if with_reference else None,
    )


@pytest.mark.parametrize("kind", ["text", "label", "json"])
def test_kind_is_inferred(kind):
    v, _ = _fit(kind)
    assert v.kind == kind


@pytest.mark.parametrize("kind", ["text", "label", "json"])
@pytest.mark.parametrize("with_reference", [True, False])
def test_references_score_at_least_95(kind, with_reference):
    v, rows = _fit(kind)
    ks = _score(v, rows, [r.output for r in rows], with_reference)
    assert ks.k >= 95
    assert ks.passed == ks.n


def test_references_on_a_fresh_holdout_score_at_least_95():
    v, _ = _fit("text")
    holdout = tldr_rows(30, seed=99)
    assert _score(v, holdout, [r.output for r in holdout]).k >= 95


@pytest.mark.parametrize("kind", ["text", "label", "json"])
def test_empty_output_loses_30_points_on_every_applicable_check(kind):
    v, rows = _fit(kind)
    good, bad = _score(v, rows, [r.output for r in rows]), _score(v, rows, [""] * len(rows))
    assert good.c - bad.c >= 30
    for check in ("t", "l"):
        if getattr(good, check) is not None:
            assert getattr(good, check) - getattr(bad, check) >= 30
    assert bad.passed == 0


def test_wrong_label_loses_30_points_on_c():
    v, rows = _fit("label")
    labels = sorted(v.labels)
    wrong = [labels[(labels.index(r.output) + 1) % len(labels)] for r in rows]
    good, bad = _score(v, rows, [r.output for r in rows]), _score(v, rows, wrong)
    assert good.c - bad.c >= 30
    assert bad.passed == 0


def test_unknown_label_without_reference_fails_conformance():
    v, rows = _fit("label")
    assert v.score("escalations", rows[0].input).c == 0.0
    assert v.score(rows[0].output.upper() + ".", rows[0].input).c == 1.0


def test_three_times_too_long_loses_30_points_on_l():
    v, rows = _fit("text")
    good = _score(v, rows, [r.output for r in rows])
    bad = _score(v, rows, [" ".join([r.output] * 3) for r in rows])
    assert good.l - bad.l >= 30


def test_length_band_read_from_the_instruction():
    v, _ = _fit("text")
    assert v.length is not None and v.length.source.startswith("instruction")
    assert v.length.lo <= 60 <= v.length.hi


@pytest.mark.parametrize("with_reference", [True, False])
def test_another_rows_text_loses_30_points_on_t(with_reference):
    v, rows = _fit("text")
    # Rows cycle through 8 topics: the next row's TLDR is about something else.
    shifted = [rows[(i + 1) % len(rows)].output for i in range(len(rows))]
    good = _score(v, rows, [r.output for r in rows], with_reference)
    bad = _score(v, rows, shifted, with_reference)
    assert good.t - bad.t >= 30


def test_broken_json_loses_30_points_on_c():
    v, rows = _fit("json")
    good = _score(v, rows, [r.output for r in rows])
    bad = _score(v, rows, [r.output[:-2] for r in rows])
    assert good.c - bad.c >= 30
    assert bad.passed == 0


def test_json_schema_violation_costs_conformance():
    v, rows = _fit("json")
    obj = json.loads(rows[0].output)
    obj["intent"] = "maybe"  # not in the inferred enum
    assert "enum" in v.json_schema["properties"]["intent"]
    assert v.score(json.dumps(obj), rows[0].input).c < 1.0
    del obj["company"]
    assert v.score(json.dumps(obj), rows[0].input).c < v.score(rows[0].output, rows[0].input).c


def test_json_in_a_code_fence_is_accepted():
    v, rows = _fit("json")
    fenced = "```json\n" + rows[0].output + "\n```"
    assert v.score(fenced, rows[0].input).c == 1.0


def test_label_kind_gives_topic_and_length_no_weight_and_says_why():
    v, _ = _fit("label")
    assert v.weights.t == 0 and v.weights.l == 0
    assert any("T not applicable" in n for n in v.notes)
    assert v.score("billing").t is None


def test_preamble_and_markdown_break_text_conformance():
    v, rows = _fit("text")
    r = rows[0]
    assert v.score(r.output, r.input).c == 1.0
    assert v.score("Here is the TLDR: " + r.output, r.input).c < 1.0
    assert v.score("## TLDR\n" + r.output, r.input).c < 1.0


def test_serialization_round_trip_scores_identically():
    for kind in TASKS:
        v, rows = _fit(kind)
        back = Verifier.from_json(v.to_json())
        assert back == v
        for r in rows[:5]:
            assert back.score(r.output, r.input, r.output) == v.score(r.output, r.input, r.output)


def test_unknown_format_version_is_refused():
    v, _ = _fit("text")
    data = json.loads(v.to_json())
    data["format_version"] = 99
    with pytest.raises(InputError, match="format_version 99"):
        Verifier.from_json(json.dumps(data))


def test_synthesize_deterministic():
    a, _ = _fit("text")
    b, _ = _fit("text")
    assert a.to_json() == b.to_json()


def test_synthesize_without_references_is_an_input_error():
    with pytest.raises(InputError, match="no reference outputs"):
        synthesize("summarize", ["", "  "])


def test_describe_rules_feeds_the_teacher_prompt():
    v, _ = _fit("label")
    rules = " ".join(v.describe_rules())
    assert all(lab in rules for lab in v.labels)
