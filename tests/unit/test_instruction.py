"""``read_instruction``: what an instruction states outright, and never what ordinary prose
only seems to say."""

import pytest

from kolm_ray.instruction import CountRange, read_instruction


@pytest.mark.parametrize(
    "instruction, labels",
    [
        ("Triage the ticket into one of: billing, technical, account, sales, spam.",
         ["billing", "technical", "account", "sales", "spam"]),
        ("Classify the email as one of billing, sales or spam.", ["billing", "sales", "spam"]),
        ("Pick one of billing, sales, support, spam for each ticket.", ["billing", "sales", "support", "spam"]),
        ("Labels: positive, negative, neutral.", ["positive", "negative", "neutral"]),
        ("The categories are billing, sales and spam.", ["billing", "sales", "spam"]),
        ("Classify the sentiment as positive or negative.", ["positive", "negative"]),
        ("Label each email as spam or not spam.", ["spam", "not spam"]),
        ("Answer (yes|no).", ["yes", "no"]),
        ("Reply with billing|sales|support.", ["billing", "sales", "support"]),
        ('Answer "yes" or "no".', ["yes", "no"]),
        ('Choose one of "billing", "sales" or "spam".', ["billing", "sales", "spam"]),
        ("Route the message to billing, sales or support.", ["billing", "sales", "support"]),
        ("Rate the review as 1, 2, 3, 4 or 5.", ["1", "2", "3", "4", "5"]),
        ("Route the customer message to one team: billing, account or bug.", ["billing", "account", "bug"]),
        ("Classify the intent as one of the following labels: refund, cancel, upgrade.", ["refund", "cancel", "upgrade"]),
        ("Answer with one of the following:\n- billing: payment problems\n- sales: quotes\n- spam\n\nThanks.",
         ["billing", "sales", "spam"]),
    ],
)
def test_label_set_is_read_from_the_instruction(instruction, labels):
    spec = read_instruction(instruction)
    assert spec.labels == labels
    assert spec.kind == "label"


@pytest.mark.parametrize(
    "instruction",
    [
        "Route the inbound customer message to the team that should handle it.",
        "Write a reply to one of our customers who asked about pricing.",
        "Summarize the message from one of our customers or partners.",
        "Tell me which one of these is best.",
        "Classify the message as quickly as possible.",
        "Pick the team, such as billing, sales, etc.",
        "Mark the ticket as resolved or escalate it.",
        "Options are limited, costly or slow.",
        "Summarize the following: the text.",
        "Format: name | company | intent",
        "| a | b |\n|---|---|",
        'Write "Hello" and "World" on separate lines.',
    ],
)
def test_prose_yields_no_label_set(instruction):
    assert read_instruction(instruction).labels is None


@pytest.mark.parametrize(
    "instruction", ["Answer with the label only.", "Reply with just the category.", "Output only the label.",
                    "Return the category name only."],
)
def test_answer_with_the_label_only_asks_for_a_bare_label(instruction):
    spec = read_instruction(instruction)
    assert spec.label_only and spec.kind == "label"


@pytest.mark.parametrize(
    "instruction, keys",
    [
        ("Extract the lead from the cold-email reply as JSON with intent, company and summary.",
         [("intent", None), ("company", None), ("summary", None)]),
        ('Return a JSON object with "name" (string), "score" (integer) and "tags" (list of strings).',
         [("name", "string"), ("score", "integer"), ("tags", "array")]),
        ("Return JSON with keys name, company and intent.", [("name", None), ("company", None), ("intent", None)]),
        ('Return JSON with keys "name", "company" and "intent".', [("name", None), ("company", None), ("intent", None)]),
        ("Respond in JSON with fields name: string, age: integer.", [("name", "string"), ("age", "integer")]),
        ('Output JSON like {"name": "Acme", "score": 3, "ok": true}.',
         [("name", "string"), ("score", "integer"), ("ok", "boolean")]),
        ('Return JSON. The "score" key is an integer from 1 to 5; "reason" is a string.',
         [("score", "integer"), ("reason", "string")]),
    ],
)
def test_json_keys_and_types_are_read_from_the_instruction(instruction, keys):
    spec = read_instruction(instruction)
    assert spec.json_output and spec.kind == "json"
    assert [(k.name, k.type) for k in spec.json_keys] == keys
    assert spec.labels is None


def test_json_key_values_listed_with_one_of_become_its_enum():
    spec = read_instruction('Return JSON with "intent" one of interested, later, not_interested and "company" (string).')
    keys = {k.name: k for k in spec.json_keys}
    assert keys["intent"].enum == ["interested", "later", "not_interested"]
    assert keys["company"].type == "string" and keys["company"].enum is None


@pytest.mark.parametrize(
    "instruction", ["Given a JSON payload, summarize it in English.", "Do not answer in JSON; write plain text."],
)
def test_json_input_or_forbidden_json_is_not_json_output(instruction):
    assert not read_instruction(instruction).json_output


@pytest.mark.parametrize(
    "instruction, lo, hi",
    [
        ("Draft a 60-word TLDR for the article body provided.", 60, 60),
        ("Summarize in 60 words.", 60, 60),
        ("Summarize in under 20 words.", None, 20),
        ("Write at most 50 words.", None, 50),
        ("Write at least 50 words.", 50, None),
        ("Write between 40 and 60 words.", 40, 60),
        ("Write a 40-60 word summary.", 40, 60),
    ],
)
def test_word_count_is_read_from_the_instruction(instruction, lo, hi):
    assert read_instruction(instruction).words == CountRange(lo=lo, hi=hi)


@pytest.mark.parametrize(
    "instruction, lo, hi",
    [
        ("Summarize in one sentence.", 1, 1),
        ("Summarize in a single sentence.", 1, 1),
        ("Explain in 2 sentences.", 2, 2),
        ("Answer in at most three sentences.", None, 3),
        ("Write no more than 2 sentences.", None, 2),
        ("Write two to three sentences.", 2, 3),
    ],
)
def test_sentence_count_is_read_from_the_instruction(instruction, lo, hi):
    spec = read_instruction(instruction)
    assert spec.sentences == CountRange(lo=lo, hi=hi)
    assert spec.kind == "text"


@pytest.mark.parametrize(
    "instruction, n",
    [("List 3 bullets of key facts.", 3), ("Give three bullet points.", 3),
     ("Summarize as a bulleted list of five items.", 5)],
)
def test_bullet_count_is_read_from_the_instruction(instruction, n):
    assert read_instruction(instruction).bullets == CountRange(lo=n, hi=n)


@pytest.mark.parametrize(
    "instruction",
    ["Use the 3 words from the title.", "Fix the 2 sentences below.", "Write 3 bullets, one sentence each.",
     "Use 20 words per bullet.", "Do not use bullet points."],
)
def test_counts_about_something_else_are_not_read(instruction):
    spec = read_instruction(instruction)
    assert spec.words is None and spec.sentences is None
    assert not spec.bullet_list


@pytest.mark.parametrize(
    "instruction, language",
    [
        ("Summarize the article in Spanish.", "es"),
        ("Answer in French.", "fr"),
        ("Write a product description written in German.", "de"),
        ("Translate the text into Portuguese.", "pt"),
        ("Given a German email, write a reply in English.", "en"),
        ("Summarize this Spanish article in English.", "en"),
        ("Write a haiku in Dutch.", "nl"),
    ],
)
def test_output_language_is_read_from_the_instruction(instruction, language):
    assert read_instruction(instruction).language == language


@pytest.mark.parametrize(
    "instruction",
    ["The emails are written in German; route them.", "Summarize the text, which is in French.",
     "Respond in the same language as the input.", "Answer in English or Spanish."],
)
def test_input_language_or_a_choice_is_not_an_output_language(instruction):
    assert read_instruction(instruction).language is None


def test_a_tldr_semicolon_does_not_cut_the_sentence_apart():
    spec = read_instruction("Summarize the article in a 60-word TL;DR, in Spanish, in 3 sentences.")
    assert spec.language == "es" and str(spec.sentences) == "3" and str(spec.words) == "60"


# ----- attacks on the counts: a count must be stated, for the whole output -------------------


@pytest.mark.parametrize(
    "instruction, lo, hi",
    [
        ("Summarize the following 2,000-word report in 100 words.", 100, 100),  # not "000-word": 0 words
        ("Summarize the 1.5-page memo in 80 words.", 80, 80),
        ("Write a 1,000-word essay on the topic.", 1000, 1000),
        ("Write between 1,000 and 1,500 words.", 1000, 1500),
    ],
)
def test_count_inside_a_longer_number_is_not_read(instruction, lo, hi):
    assert read_instruction(instruction).words == CountRange(lo=lo, hi=hi)


@pytest.mark.parametrize(
    "instruction", ["Summarize in 0 words.", "Use 0 bullet points.", "Write at most 0 sentences.", "Write 000 words."]
)
def test_zero_is_never_a_stated_count(instruction):
    spec = read_instruction(instruction)
    assert spec.words is None and spec.sentences is None and spec.bullets is None


def test_count_on_an_input_noun_is_not_an_output_rule():
    headline = read_instruction("Given a 500-word article, write a short headline.")
    assert headline.words is None and headline.kind is None
    reply = read_instruction("Read the review (up to 300 words) and reply in one sentence.")
    assert reply.words is None and reply.sentences == CountRange(lo=1, hi=1)
    merge = read_instruction("The input lists 5 bullet points; merge them into one paragraph.")
    assert merge.bullets is None and not merge.bullet_list
    rewrite = read_instruction("Rewrite the 300-word email in at most 50 words.")
    assert rewrite.words == CountRange(hi=50)
    assert read_instruction("Given an article of about 500 words, write 2 sentences.").words is None
    assert read_instruction("The input is a bullet list; rewrite it as prose.").bullet_list is False


def test_count_on_a_noun_the_task_writes_is_read():
    # The same nouns, written by the task: the count is the output's.
    assert read_instruction("Write a 150-word email to the customer.").words == CountRange(lo=150, hi=150)
    assert read_instruction("Draft an email of at most 120 words.").words == CountRange(hi=120)
    assert read_instruction("Summarize each ticket in 20 words.").words == CountRange(lo=20, hi=20)


def test_count_for_each_part_is_not_the_whole_outputs():
    assert read_instruction("Each bullet under 12 words.").words is None
    spec = read_instruction("Write 3 bullets, each under 12 words.")
    assert spec.words is None and spec.bullets == CountRange(lo=3, hi=3)
    spec = read_instruction("Keep every bullet point to at most 12 words; give 4 bullet points.")
    assert spec.words is None and spec.bullets == CountRange(lo=4, hi=4)
    assert read_instruction("Write 3 sentences of at most 20 words.").words is None
