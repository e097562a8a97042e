import json

import pytest

from kolm_ray.errors import InputError
from kolm_ray.kscore import score_rows
from kolm_ray.testing.corpus import LEADS_TASK, ROUTING_TASK, TLDR_TASK, leads_rows, routing_rows, tldr_rows
from kolm_ray.verifier import VERIFIER_FORMAT_VERSION, Verifier, synthesize, synthesize_from_samples

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


# ----- the instruction and the teacher samples' consensus -------------------------------------

TRIAGE_LABELS = ["billing", "technical", "account", "sales", "spam"]
TRIAGE_TASK = ("Triage the support ticket into one of: billing, technical, account, sales, spam. "
               "Answer with the label only.")
VERBOSE = "Category: billing. This ticket is about billing."


def _triage_samples(n_rows=10):
    """Per row: two right bare labels, one verbose sentence, one wrong bare label."""
    inputs, samples = [], []
    for i in range(n_rows):
        right, wrong = TRIAGE_LABELS[i % 5], TRIAGE_LABELS[(i + 1) % 5]
        inputs.append(f"Ticket {i}: a question about {right}.")
        samples.append([right, right.capitalize() + ".", f"Category: {right}. This ticket is about {right}.", wrong])
    return samples, inputs


def _leads_samples():
    """Per row: three JSON answers and one prose answer; None marks a failed call."""
    intents = ["interested", "later", "not_interested"]
    inputs, samples = [], []
    for i, r in enumerate(leads_rows(12, seed=3)):
        obj = json.loads(r.output)
        inputs.append(r.input)
        samples.append([r.output, r.output, json.dumps({**obj, "intent": intents[(i + 1) % 3]}),
                        f"The lead from {obj['company']} sounds {obj['intent']}.", None])
    return samples, inputs


def test_labels_named_by_the_instruction_set_the_kind():
    v = synthesize_from_samples(TRIAGE_TASK, *_triage_samples())
    assert v.kind == "label" and v.sources["kind"] == "instruction"
    assert v.labels == TRIAGE_LABELS and v.sources["labels"] == "instruction"


def test_verbose_answer_to_a_label_task_fails():
    samples, inputs = _triage_samples()
    v = synthesize_from_samples(TRIAGE_TASK, samples, inputs)
    assert not v.score(VERBOSE, inputs[0]).passed
    assert v.score("billing", inputs[0]).passed


def test_wrong_but_valid_label_passes():
    samples, inputs = _triage_samples()
    v = synthesize_from_samples(TRIAGE_TASK, samples, inputs)
    assert v.score("sales", inputs[0]).passed  # row 0 is billing: choosing is the selection's job
    assert not v.score("refund", inputs[0]).passed


def test_label_consensus_is_learned_from_samples_without_labels_in_the_instruction():
    samples, inputs = _triage_samples()
    v = synthesize_from_samples("Triage the support ticket.", samples, inputs)
    assert v.kind == "label" and v.sources["kind"] == "samples"
    assert sorted(v.labels) == sorted(TRIAGE_LABELS) and v.sources["labels"] == "samples"
    assert not v.score(VERBOSE, inputs[0]).passed
    assert v.score("Technical", inputs[0]).passed


def test_short_answers_that_do_not_recur_across_rows_are_text():
    inputs = [f"What is the capital of country {i}?" for i in range(8)]
    samples = [[f"City{i}", f"City{i}", f"City{i}"] for i in range(8)]
    v = synthesize_from_samples("Name the capital.", samples, inputs)
    assert v.kind == "text"


def test_json_keys_and_types_named_by_the_instruction_are_the_schema():
    task = 'Return a JSON object with "name" (string), "score" (integer) and "tags" (list of strings).'
    v = synthesize_from_samples(task, [['{"name": "Ana", "score": "4", "tags": []}']], ["Ana rated us 4."])
    assert v.kind == "json" and v.sources["kind"] == "instruction"
    props = v.json_schema["properties"]
    assert (props["name"]["type"], props["score"]["type"], props["tags"]["type"]) == ("string", "integer", "array")
    assert set(v.json_schema["required"]) == {"name", "score", "tags"}
    assert v.score('{"name": "Ana", "score": 4, "tags": ["x"]}').passed
    assert not v.score('{"name": "Ana", "score": "4", "tags": []}').passed  # the sample's own type loses


def test_json_consensus_from_samples_fails_the_prose_minority():
    samples, inputs = _leads_samples()
    v = synthesize_from_samples("Extract the lead from the cold-email reply.", samples, inputs)
    assert v.kind == "json" and v.sources["json_schema"] == "samples"
    assert set(v.json_schema["required"]) == {"intent", "company", "summary"}
    assert v.score(samples[0][0], inputs[0]).passed
    assert v.score(samples[0][3], inputs[0]).c == 0.0
    assert not v.score(samples[0][3], inputs[0]).passed


def test_json_consensus_counts_one_value_per_row_for_enums():
    samples, inputs = _leads_samples()
    v = synthesize_from_samples("Extract the lead from the cold-email reply.", samples, inputs)
    props = v.json_schema["properties"]
    assert props["intent"]["enum"] == ["interested", "later", "not_interested"]
    assert "enum" not in props["summary"]


def test_stated_word_count_sets_the_length_band_for_samples():
    rows = tldr_rows(8, seed=5)
    short = [" ".join(r.output.split()[:30]) + "." for r in rows]
    samples = [[s, s, " ".join([s] * 3)] for s in short]
    v = synthesize_from_samples("Write a 30-word summary of the article.", samples, [r.input for r in rows])
    assert v.kind == "text" and v.sources["length"] == "instruction"
    assert v.length.lo <= 30 <= v.length.hi
    assert v.score(short[0], rows[0].input).l == 1.0
    ninety = v.score(" ".join([short[0]] * 3), rows[0].input)
    assert ninety.l < 0.5 and not ninety.passed


def test_references_win_over_the_instruction_on_the_kind():
    task = "Classify the ticket as one of: billing, sales, spam. Answer with the label only."
    refs = [f"This ticket is about {x}, so the {x} team should answer it today." for x in ["billing", "sales", "spam"] * 2]
    v = synthesize(task, refs)
    assert v.kind == "text" and v.sources["kind"] == "references"
    assert any("references are text" in n for n in v.notes)


def test_references_win_over_the_instruction_on_a_key_type():
    task = 'Return JSON with "name" (string) and "score" (integer).'
    refs = [json.dumps({"name": n, "score": s}) for n, s in [("Ana", "high"), ("Bo", "low"), ("Cy", "high")]]
    v = synthesize(task, refs)
    assert v.json_schema["properties"]["score"]["type"] == "string"
    assert v.score(refs[0]).passed


def test_label_named_only_by_the_instruction_is_valid_with_references():
    task = "Route the message to one of: billing, sales, support, spam, account."
    v, rows = synthesize(task, [r.output for r in routing_rows(48, seed=1)]), routing_rows(48, seed=1)
    assert "account" in v.labels and v.sources["labels"] == "instruction+references"
    assert v.score("account", rows[0].input).c == 1.0


_CITIES = ["Osaka", "Austin", "Gdansk", "Lyon", "Porto", "Quito", "Leeds", "Busan"]


def test_stated_language_fails_an_answer_in_another_language():
    inputs = [f"The {c} grid operator cut its battery program, citing pressure on storage and prices." for c in _CITIES]
    spanish = [f"El operador de la red de {c} cortó su programa de baterías por la presión sobre los precios y "
               f"el almacenamiento, y los gestores revisarán la capacidad antes de la temporada." for c in _CITIES]
    v = synthesize_from_samples("Summarize the article in Spanish.", [[s] for s in spanish], inputs)
    assert v.language == "es" and v.sources["language"] == "instruction"
    english = tldr_rows(1, seed=2)[0].output
    assert v.score(spanish[0], inputs[0]).passed
    assert v.score(english, inputs[0]).c < 0.5


def test_references_in_another_language_drop_the_stated_language():
    v, rows = _fit("text")
    w = synthesize("Summarize the article in Spanish.", [r.output for r in rows], [r.input for r in rows])
    assert w.language is None and any("language es" in n for n in w.notes)
    assert w.score(rows[0].output, rows[0].input).passed


def test_stated_sentence_count_fails_a_longer_answer():
    rows = tldr_rows(8, seed=4)
    one = [r.output.split(". ")[0] + "." for r in rows]
    v = synthesize_from_samples("Summarize the article in one sentence.", [[s] for s in one], [r.input for r in rows])
    assert v.text_rules.sentences is not None and str(v.text_rules.sentences) == "1"
    assert v.score(one[0], rows[0].input).c == 1.0
    assert v.score(one[0] + " " + one[1], rows[0].input).c < 0.5


def test_stated_bullet_count_fails_a_shorter_list():
    inputs = [f"Article {i} about the port's cargo, cranes and customs." for i in range(6)]
    three = "- Cargo volumes rose.\n- Cranes were replaced.\n- Customs checks slowed."
    v = synthesize_from_samples("Summarize the article in 3 bullets.", [[three]] * 6, inputs)
    assert v.text_rules.markdown == "bullets" and str(v.text_rules.bullets) == "3"
    assert v.score(three, inputs[0]).c == 1.0
    assert v.score("- Cargo volumes rose.\n- Cranes were replaced.", inputs[0]).c < 0.5


@pytest.mark.parametrize(
    "instruction, dropped",
    [
        ("Summarize the article in one sentence.", lambda v: v.text_rules.sentences is None),
        ("Summarize the article in 3 bullets.",
         lambda v: v.text_rules.bullets is None and v.text_rules.markdown != "bullets"),
        ("Summarize the article in 15 words.", lambda v: v.length.source == "samples" and v.length.hi >= 50),
        ("Summarize the article in Spanish.", lambda v: v.language is None),
    ],
)
def test_consensus_that_breaks_a_stated_rule_wins(instruction, dropped):
    # Every sample has three sentences and 50 words, in English, with no bullets: a stated rule
    # they all break would fail every sample and leave the compile nothing to distill.
    rows = tldr_rows(8, seed=4)
    samples = [[r.output, r.output] for r in rows]
    v = synthesize_from_samples(instruction, samples, [r.input for r in rows])
    assert dropped(v)
    assert all(v.score(r.output, r.input).passed for r in rows)
    assert any("16 of 16 samples" in n and "they win" in n for n in v.notes)


def test_zero_word_length_band_cannot_be_built_or_crash_scoring():
    from pydantic import ValidationError

    from kolm_ray.verifier import LengthBand

    with pytest.raises(ValidationError):
        LengthBand(lo=0, hi=0, source="instruction")
    with pytest.raises(ValidationError):
        LengthBand(lo=30, hi=20, source="instruction")
    v, rows = _fit("text")
    broken = json.loads(v.to_json())
    broken["length"] = {"lo": 0, "hi": 0, "source": "instruction"}
    with pytest.raises(InputError, match="length"):
        Verifier.from_json(json.dumps(broken))
    # A band that skipped validation still scores: L is 0, not a ZeroDivisionError.
    unchecked = v.model_copy(update={"length": LengthBand.model_construct(lo=0.0, hi=0.0, source="instruction")})
    assert unchecked.score(rows[0].output, rows[0].input).l == 0.0
    # An instruction stating 0 words compiles, with no band from it.
    w = synthesize_from_samples("Summarize the article in 0 words.", [[r.output] for r in rows[:8]],
                                [r.input for r in rows[:8]])
    assert w.length.source == "samples" and w.score(rows[0].output, rows[0].input).passed


def test_failed_and_empty_samples_are_skipped():
    samples, inputs = _triage_samples()
    v = synthesize_from_samples(TRIAGE_TASK, [row + [None, "  "] for row in samples], inputs)
    assert v.n_samples == 40


def test_samples_without_any_text_are_an_input_error():
    with pytest.raises(InputError, match="no teacher sample"):
        synthesize_from_samples("Triage the ticket.", [[None, ""], [None]], ["a", "b"])


def test_samples_and_inputs_of_different_lengths_are_an_input_error():
    with pytest.raises(InputError, match="one input per row"):
        synthesize_from_samples("Triage the ticket.", [["billing"]], ["a", "b"])


def test_learned_says_what_came_from_where():
    v = synthesize_from_samples(TRIAGE_TASK, *_triage_samples())
    assert v.learned() == ["kind label (instruction)", "labels billing, technical, account, sales, spam (instruction)"]
    w, _ = _fit("text")
    assert "length 38-72 words (instruction+references)" in w.learned()


def test_describe_rules_mentions_language_sentences_and_bullets():
    inputs = [f"Artículo {i}" for i in range(4)]
    text = "- El puerto creció.\n- La aduana es lenta."
    v = synthesize_from_samples("Answer in Spanish with 2 bullets, at most two sentences.", [[text]] * 4, inputs)
    rules = " ".join(v.describe_rules())
    assert "Spanish" in rules and "2 bullets" in rules and "at most 2 sentences" in rules


# A verifier.json written by format version 1 (before instruction reading), byte for byte.
VERSION_1 = (
    '{"format_version": 1, "instruction": "Draft a 12-word TLDR of the news item.", "kind": "text", '
    '"labels": null, "json_schema": null, "json_text_fields": null, "text_rules": {"min_lines": 1, '
    '"max_lines": 1, "markdown": "never", "terminal_punctuation": true}, "length": {"lo": 8.399999999999999, '
    '"hi": 14.399999999999999, "source": "instruction+references"}, "topic": {"input_level": 0.9, "common": []}, '
    '"weights": {"t": 0.4, "c": 0.3, "l": 0.3}, "pass_threshold": 0.75, "n_references": 4, '
    '"notes": ["kind \'text\' inferred from 4 references"]}'
)


def test_version_1_verifier_still_loads_and_scores():
    v = Verifier.from_json(VERSION_1)
    assert v.format_version == VERIFIER_FORMAT_VERSION
    assert v.language is None and v.sources == {} and v.text_rules.sentences is None
    news = "The grid operator cut its battery program on Monday, citing pressure on storage and prices."
    checks = v.score("The grid operator cut its battery program, citing pressure on storage.", news)
    assert checks.passed and checks.c == 1.0
    assert Verifier.from_json(v.to_json()) == v
