import random

import pyarrow as pa
import pytest
from pydantic import ValidationError

from kolm_ray.sampling.config import QuotaConfig, SampleConfig, TeacherConfig
from kolm_ray.sampling.fanout import (
    SAMPLES_FORMAT_VERSION, TEXT_AGREEMENT_F1, SamplingPlan, agreement, choose_best, select, similarity, summarize,
)
from kolm_ray.sampling.pricing import DEFAULT_PRICES


def s(i, text, k, passed=True):
    return {"sample_index": i, "text": text, "k": k, "passed": passed}


# Paraphrases of one summary, a far-off outlier and an over-long ramble, for minimum Bayes risk.
PARA_A = "The port authority delayed the new container cranes in Gdansk after a customs audit."
PARA_B = "Gdansk port authority delays container cranes following an audit by customs officials."
PARA_C = "After a customs audit, Gdansk port officials delayed the container cranes."
OUTLIER = "A school district in Austin funded tutoring for students ahead of exams."
RAMBLE = PARA_A + " Officials said the decision followed months of debate over freight tariffs and dredging."


# ----- label and JSON: majority vote --------------------------------------------------------


def test_majority_beats_a_higher_k_minority():
    samples = [s(0, "sales", 1.0), s(1, "billing", 0.8), s(2, "Billing.", 0.8), s(3, "support", 0.9)]
    assert choose_best(samples, "label") == 1


def test_json_majority_compares_by_content_and_beats_a_higher_k_minority():
    a, b = '{"x": 1, "y": 2}', '{"y": 2, "x": 1}'
    samples = [s(0, '{"x": 3, "y": 2}', 1.0), s(1, a, 0.8), s(2, b, 0.85)]
    assert choose_best(samples, "json") == 2  # the majority answer; its higher-K sample


def test_verifier_breaks_a_vote_tie_by_mean_k():
    samples = [s(0, "sales", 0.8), s(1, "billing", 0.9), s(2, "sales", 0.8), s(3, "billing", 1.0)]
    assert choose_best(samples, "label") == 3


def test_a_full_tie_goes_to_the_answer_sampled_first():
    assert choose_best([s(0, "billing", 1.0), s(1, "sales", 1.0), s(2, "sales", 1.0), s(3, "billing", 1.0)],
                       "label") == 0


def test_samples_that_fail_the_verifier_do_not_vote():
    samples = [s(0, "billing", 0.5, passed=False), s(1, "billing", 0.5, passed=False), s(2, "sales", 0.9)]
    assert choose_best(samples, "label") == 2


# ----- text: minimum Bayes risk -------------------------------------------------------------


def test_mbr_picks_the_consensus_paraphrase_over_a_higher_k_outlier():
    samples = [s(0, OUTLIER, 0.99), s(1, PARA_A, 0.8), s(2, PARA_B, 0.85), s(3, PARA_C, 0.8)]
    # A is closest to the other paraphrases (C ties it and loses on sample index): neither the
    # outlier's K nor B's higher K outweighs the consensus.
    assert choose_best(samples, "text") == 1
    assert choose_best([s(0, OUTLIER, 1.0), s(1, PARA_B, 0.76), s(2, PARA_C, 0.77)], "text") == 2


def test_mbr_counts_samples_that_fail_the_verifier_as_evidence():
    # The ramble fails (too long) but repeats A's content: A is the consensus, not the outlier.
    samples = [s(0, OUTLIER, 0.95), s(1, PARA_A, 0.8), s(2, RAMBLE, 0.4, passed=False)]
    assert choose_best(samples, "text") == 1


def test_text_without_consensus_falls_back_to_k_then_index():
    assert choose_best([s(0, "a", 0.5), s(1, "b", 0.9), s(2, "c", 0.7)], "text") == 1
    assert choose_best([s(0, "a", 0.8), s(1, "b", 0.8)], "text") == 0


def test_similarity_is_content_word_f1():
    assert similarity(PARA_A, PARA_A) == 1.0
    assert similarity(PARA_A, OUTLIER) == 0.0
    assert similarity(PARA_A, PARA_B) >= TEXT_AGREEMENT_F1
    assert similarity("ok", "OK ") == 1.0 and similarity("ok", "no") == 0.0


# ----- fallbacks and determinism ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["label", "json", "text"])
def test_when_none_pass_the_highest_k_wins(kind):
    samples = [s(0, "x", 0.3, passed=False), s(1, "y", 0.6, passed=False), s(2, "x", 0.5, passed=False)]
    assert choose_best(samples, kind) == 1
    assert choose_best([s(0, "x", 0.6, passed=False), s(1, "y", 0.6, passed=False)], kind) == 0


def test_failed_samples_are_never_chosen_and_all_failed_gives_none():
    assert choose_best([s(0, None, None), s(1, "b", 0.2, passed=False)], "text") == 1
    assert choose_best([s(0, None, None), s(1, None, None)], "label") is None


@pytest.mark.parametrize("kind, texts", [
    ("label", ["sales", "billing", "Billing", "sales", "bug", "billing"]),
    ("text", [PARA_A, OUTLIER, PARA_B, PARA_C, RAMBLE, OUTLIER]),
])
def test_the_choice_does_not_depend_on_arrival_order(kind, texts):
    rng = random.Random(7)
    samples = [s(i, t, rng.choice([0.8, 0.9, 1.0]), passed=t != RAMBLE) for i, t in enumerate(texts)]
    want = samples[choose_best(samples, kind)]["sample_index"]
    for _ in range(20):
        shuffled = rng.sample(samples, len(samples))
        assert shuffled[choose_best(shuffled, kind)]["sample_index"] == want


# ----- agreement ----------------------------------------------------------------------------


def test_agreement_is_the_share_of_samples_with_text_that_give_the_chosen_answer():
    samples = [s(0, "billing", 1.0), s(1, "Billing.", 1.0), s(2, "Category: billing.", 0.5, passed=False),
               s(3, "sales", 1.0)]
    assert agreement(samples, 0, "label") == 0.5
    assert agreement([*samples[:3], s(3, None, None)], 0, "label") == pytest.approx(2 / 3)  # failed call left out
    assert agreement([s(0, "sales", 1.0)], 0, "label") == 1.0
    assert agreement([s(0, '{"a": 1}', 1.0), s(1, '{ "a":1 }', 1.0), s(2, '{"a": 2}', 1.0)], 0, "json") == \
        pytest.approx(2 / 3)


def test_text_agreement_counts_samples_above_the_overlap_threshold():
    samples = [s(0, PARA_A, 0.8), s(1, PARA_B, 0.8), s(2, OUTLIER, 0.8), s(3, "", 0.0, passed=False)]
    assert agreement(samples, 0, "text") == 0.5


def test_agreement_refuses_a_failed_call_as_the_chosen_one():
    with pytest.raises(ValueError, match="no text"):
        agreement([s(0, None, None), s(1, "x", 1.0)], 0, "label")


# ----- select and summarize -----------------------------------------------------------------


def record(row_id, i, text, k, passed=True):
    return {"id": row_id, "input": f"input of {row_id}", "reference": None, **s(i, text, k, passed),
            "key": f"{row_id}-{i}", "error": None if text is not None else "failed", "failures": "",
            "attempts": 1, "cached": False, "input_tokens": 10, "output_tokens": 2,
            "cache_read_tokens": 0, "cache_write_tokens": 0}


def test_select_marks_one_per_row_and_repeats_the_row_agreement_on_every_sample():
    t = pa.Table.from_pylist([
        {"id": "a", **s(0, "x", 0.1)}, {"id": "a", **s(1, "y", 0.9)},
        {"id": "b", **s(0, None, None)}, {"id": "b", **s(1, None, None)},
        {"id": "c", **s(0, "billing", 1.0)}, {"id": "c", **s(1, "sales", 1.0)}, {"id": "c", **s(2, "sales", 1.0)},
    ])
    out = select(t, "label")
    assert out.column("chosen").to_pylist() == [False, True, False, False, False, True, False]
    assert out.column("agreement").to_pylist() == pytest.approx([0.5, 0.5, None, None, 2 / 3, 2 / 3, 2 / 3])
    assert out.schema.field("agreement").type == pa.float64()


def test_summary_flags_rows_below_min_agreement():
    price = DEFAULT_PRICES["claude-opus-4-7"]
    recs = (
        [record("sure", i, "billing", 1.0) for i in range(4)]
        + [record("half", i, t, 1.0) for i, t in enumerate(["sales", "sales", "bug", "billing"])]
        + [record("unsure", i, t, 1.0) for i, t in enumerate(["sales", "bug", "billing", "account"])]
        + [record("dead", i, None, None, passed=False) for i in range(4)]
    )
    plan = SamplingPlan(task="Route it.", system=[], teacher=TeacherConfig(), sample=SampleConfig(k=4),
                        quota=QuotaConfig(), cache_dir="unused")
    summary = summarize(select(pa.Table.from_pylist(recs), "label"), plan, price, 1.0, None)
    # 0.5 (two of four) is at the bar, not below it; a row with no sample has no agreement.
    assert summary.low_agreement_rows == 1 and summary.low_agreement_row_ids == ["unsure"]
    assert summary.mean_agreement == pytest.approx((1.0 + 0.5 + 0.25) / 3, abs=1e-4)
    assert summary.failed_rows == 1 and summary.format_version == SAMPLES_FORMAT_VERSION == 3
    assert any("1 rows below 50% (teacher unsure): unsure" in line for line in summary.lines())

    strict = SamplingPlan(**{**plan.__dict__, "sample": SampleConfig(k=4, min_agreement=0.75)})
    summary = summarize(select(pa.Table.from_pylist(recs), "label"), strict, price, 1.0, None)
    assert summary.low_agreement_row_ids == ["half", "unsure"]


def test_min_agreement_must_be_a_share():
    with pytest.raises(ValidationError):
        SampleConfig(min_agreement=1.5)
    assert SampleConfig().min_agreement == 0.5


def test_json_paraphrases_of_one_answer_vote_together_and_mbr_picks_among_them():
    import json as _json

    def lead(intent, note):
        return _json.dumps({"intent": intent, "note": note})

    samples = [
        {"text": lead("buy", "Wants a quote for 40 seats this quarter"), "k": 0.9, "passed": True, "sample_index": 0},
        {"text": lead("buy", "Asks for a quote covering 40 seats"), "k": 0.8, "passed": True, "sample_index": 1},
        {"text": lead("churn", "Wants to cancel the contract"), "k": 1.0, "passed": True, "sample_index": 2},
        {"text": lead("buy", "Quote for 40 seats wanted this quarter"), "k": 0.85, "passed": True, "sample_index": 3},
    ]
    # By whole-JSON vote every sample is its own answer and the highest K ("churn") would win.
    assert choose_best(samples, "json") == 2
    best = choose_best(samples, "json", text_fields=["note"])
    assert _json.loads(samples[best]["text"])["intent"] == "buy"
    assert agreement(samples, best, "json", text_fields=["note"]) == 0.75


# ----- the outage report ---------------------------------------------------------------------


def test_outage_is_the_longest_stretch_from_a_failure_to_the_next_answer():
    from collections import Counter

    from kolm_ray.sampling.fanout import outage_of

    assert outage_of([[], []], [1.0, 2.0]) is None
    # Answers at 1 and 2; then every call fails from 10 to 130; answers again from 131.
    fails = [[10.0, 11.0, 13.0, 70.0, 130.0], [10.5, 40.0, 100.0], []]
    o = outage_of(fails, [131.0, 140.0, 1.0], Counter({"overloaded": 8, "rate_limited": 3}))
    assert (o.longest_s, o.started_at, o.ended_at, o.failures) == (121.0, 10.0, 131.0, 8)
    assert o.by_kind == {"overloaded": 8}  # our own rate limit is not the teacher being down
    assert "teacher unavailable for 2m01.0s" in o.line() and "8 overloaded (529)" in o.line()
    # A blip answered at once, then a longer stretch that never recovered.
    o = outage_of([[5.0], [20.0, 50.0]], [5.5, 6.0])
    assert (o.longest_s, o.started_at, o.ended_at) == (30.0, 20.0, None) and "did not come back" in o.line()
