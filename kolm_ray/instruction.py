"""The instruction reader: what a task instruction states outright about its output.

``read_instruction(instruction) -> InstructionSpec``: a closed label set or a request for the
bare label; JSON output, the keys it names, their types and allowed values; word, sentence and
bullet counts; the output language. Pure and conservative: anything unclear is left out, and
ordinary prose ("one of our customers") yields nothing.

This module must not score outputs, nor learn from references or teacher samples: the verifier
(``kolm_ray.verifier``) weighs what is read here against the examples and does the scoring.
"""

from __future__ import annotations

import json
import re
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from kolm_ray.measures import LABEL_MAX_WORDS, json_type, normalize_label

# The output kinds: a label from a small closed set, a JSON object, or free text.
Kind = Literal["label", "json", "text"]

# Word counts this small are a short answer, not a text shape: the kind is left to the examples.
_SHORT_ANSWER_WORDS = 5

_LANGUAGE_CODES = {
    "english": "en", "spanish": "es", "french": "fr", "german": "de", "italian": "it",
    "portuguese": "pt", "dutch": "nl", "polish": "pl", "swedish": "sv", "danish": "da",
    "norwegian": "no", "finnish": "fi", "russian": "ru", "ukrainian": "uk", "turkish": "tr",
    "greek": "el", "arabic": "ar", "hebrew": "he", "hindi": "hi", "japanese": "ja",
    "chinese": "zh", "korean": "ko", "indonesian": "id", "vietnamese": "vi", "thai": "th",
}
_LANGUAGE_NAMES = {code: name.capitalize() for name, code in _LANGUAGE_CODES.items()}


def language_name(code: str) -> str:
    """The English name of the language with ISO 639-1 ``code`` ("fr": "French"); unknown codes as given."""
    return _LANGUAGE_NAMES.get(code, code)


# ----- reading the instruction ---------------------------------------------------------------


class CountRange(BaseModel):
    """A count the output must keep: ``lo`` to ``hi`` inclusive; a missing end is open."""

    model_config = ConfigDict(frozen=True)
    lo: int | None = Field(None, description="Fewest allowed; None: no lower bound.")
    hi: int | None = Field(None, description="Most allowed; None: no upper bound.")

    def contains(self, n: int) -> bool:
        return (self.lo is None or n >= self.lo) and (self.hi is None or n <= self.hi)

    def covering(self, counts: Sequence[int]) -> "CountRange":
        """This range widened just enough to hold every one of ``counts``."""
        if not counts:
            return self
        lo = None if self.lo is None else min(self.lo, min(counts))
        hi = None if self.hi is None else max(self.hi, max(counts))
        return CountRange(lo=lo, hi=hi)

    def __str__(self) -> str:
        if self.lo is not None and self.lo == self.hi:
            return str(self.lo)
        if self.lo is not None and self.hi is not None:
            return f"{self.lo}-{self.hi}"
        return f"at least {self.lo}" if self.lo is not None else f"at most {self.hi}"


class JsonKey(BaseModel):
    """A JSON key the instruction names."""

    model_config = ConfigDict(frozen=True)
    name: str = Field(description="The key, as the instruction spells it.")
    type: str | None = Field(None, description="The JSON Schema type the instruction states, if any.")
    enum: list[str] | None = Field(None, description="The values the instruction allows ('one of ...'), if any.")


class InstructionSpec(BaseModel):
    """What a task instruction states outright about its output; ``read_instruction`` builds it."""

    model_config = ConfigDict(frozen=True)
    labels: list[str] | None = Field(None, description="A closed label set the instruction lists.")
    label_only: bool = Field(False, description="The instruction asks for the bare label ('Answer with the label only').")
    json_output: bool = Field(False, description="The instruction asks for JSON output.")
    json_keys: list[JsonKey] = Field(default_factory=list, description="JSON keys the instruction names, in order.")
    words: CountRange | None = Field(None, description="Word count ('a 60-word', 'under 20 words'); lo == hi: a target.")
    sentences: CountRange | None = Field(None, description="Sentence count ('in one sentence', 'at most 3 sentences').")
    bullets: CountRange | None = Field(None, description="Bullet count ('3 bullets', 'three bullet points').")
    bullet_list: bool = Field(False, description="The instruction asks for a bullet list.")
    language: str | None = Field(None, description="Output language as an ISO 639-1 code ('Answer in French').")

    @property
    def kind(self) -> Kind | None:
        """The output kind the instruction implies, or None where it does not say."""
        if self.json_output:
            return "json"
        if self.labels or self.label_only:
            return "label"
        long_words = self.words is not None and max(self.words.lo or 0, self.words.hi or 0) > _SHORT_ANSWER_WORDS
        if self.sentences or self.bullets or self.bullet_list or long_words:
            return "text"
        return None


_NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
}
# A digit count is never the tail of a longer number: "2,000-word" is 2000, not "000-word";
# "1.5 pages" holds no count. Thousands separators are part of the number.
_NUM = r"(?<![\d,.])(?:\d{1,3}(?:,\d{3})+|\d{1,6})(?![\d,.]\d)|" + "|".join(
    sorted(_NUMBER_WORDS, key=len, reverse=True))
_AT_MOST = (r"under|at\s+most|no\s+more\s+than|not\s+more\s+than|fewer\s+than|less\s+than|no\s+longer\s+than"
            r"|max(?:imum)?(?:\s+of)?|up\s+to|within")
_AT_LEAST = r"at\s+least|no\s+fewer\s+than|no\s+less\s+than|min(?:imum)?(?:\s+of)?"


def _count_pattern(unit: str) -> re.Pattern[str]:
    return re.compile(
        rf"\b(?:between\s+(?P<a>{_NUM})\s+and\s+(?P<b>{_NUM})"
        rf"|(?P<c>{_NUM})\s*(?:-|\u2013|to)\s*(?P<d>{_NUM})"
        rf"|(?:(?P<bound>{_AT_MOST}|{_AT_LEAST}|exactly)\s+)?(?P<n>{_NUM}))[\s-]+(?:{unit})\b",
        re.I,
    )


# "a 60-word TLDR", "in 60 words", "under 20 words", "between 40 and 60 words", "40-60 words"
_LENGTH_IN_INSTRUCTION = _count_pattern(r"words?")
_SENTENCES_IN_INSTRUCTION = _count_pattern(r"sentences?")
_ONE_SENTENCE = re.compile(r"\b(?:in\s+a(?:\s+single)?\s+sentence|a\s+single\s+sentence|single[\s-]sentence)\b", re.I)
_BULLETS_IN_INSTRUCTION = _count_pattern(r"bullet(?:ed)?[\s-]?points?|bullets?")
_BULLET_LIST_OF = re.compile(
    rf"\bbullet(?:ed)?[\s-]?(?:point\s+)?list\s+(?:of|with)\s+(?P<n>{_NUM})\s+(?:items|points|bullets)\b", re.I
)
_BULLET_LIST = re.compile(r"\b(?:bullet(?:ed)?[\s-]?(?:list|points)|as\s+bullets)\b", re.I)
# A count right after these words is about something else: "the 3 sentences below", "more than".
_NOT_A_STATED_COUNT = frozenset(
    "the these those first last following than over not no is are was were has have had contains".split()
)
_EACH = re.compile(r"\s*(?:each|apiece|per\b|for\s+each|in\s+each)", re.I)
# A count after these is for one part of the output, not the whole: "3 bullets, each under 12
# words", "keep every bullet under 12 words", "per bullet: at most 12 words", "bullets of at most 12 words".
_OUTPUT_PARTS = (r"bullet(?:[\s-]?points?)?|points?|items?|lines?|sentences?|paragraphs?|sections?|entries|entry"
                 r"|steps?|tips?|ideas?|options?|takeaways?|headings?|questions?|answers?|reasons?|examples?|ones?")
_PER_PART_BEFORE = re.compile(
    r"(?:\b(?:each|every|per)(?:\s+of\s+(?:them|these|those|the))?(?:\s+(?:[\w-]+\s+)?(?:" + _OUTPUT_PARTS + r")\b)?"
    r"|\b(?:bullets|bullet\s+points|points|items|lines|sentences|paragraphs|sections|entries|steps|tips)\s+of)"
    r"(?:\s+(?:should|must|can|is|are|be|stays?|kept|with|of|in|at|to|containing|using)\b)*\s*[:,\-\u2014]?\s*$",
    re.I,
)
# What the task is given, not what it writes: a count on one of these describes the input
# ("a 500-word article", "the review (up to 300 words)", "the input lists 5 bullet points").
_INPUT_NOUNS = (r"articles?|reviews?|reports?|inputs?|texts?|stor(?:y|ies)|e-?mails?|messages?|documents?|docs?"
                r"|posts?|transcripts?|tickets?|passages?|essays?|papers?|letters?|comments?|threads?"
                r"|conversations?|chats?|excerpts?|memos?|pages?|abstracts?|sources?|complaints?|descriptions?"
                r"|contents?|snippets?|listings?|notes")
# "a 500-word article", "a 400-600 word customer email": the unit, then (one modifier and) the noun.
_INPUT_NOUN_AFTER = re.compile(
    r"(?:\s+(?!(?:the|a|an|of|for|to|in|on|about|from|and|or|each|per|this|that|these|those|your|its|their"
    r"|our|my)\b)[\w-]+)?[\s-]+(?:" + _INPUT_NOUNS + r")\b",
    re.I,
)
# "the review (up to 300 words)", "an article of about 500 words", "the input lists 5 bullet
# points", "the email is a bullet list": the noun, then a bracket, dash or linking word.
_INPUT_NOUN_BEFORE = re.compile(
    r"\b(?:" + _INPUT_NOUNS + r")(?:'s)?"
    r"(?:\s*(?:\(|\[|,|\u2014|\u2013|--)\s*|\s+)"
    r"(?:(?:which|that|is|are|was|were|has|have|had|lists|list|listing|contains|contain|containing|includes"
    r"|include|including|of|runs|spans|averages|may|might|will|be|itself|typically|usually|often|already"
    r"|about|around|roughly|approximately|nearly|almost|some|just|a|an|the|its)\s+)*"
    rf"(?:(?:{_NUM})[\s-]+)?$",
    re.I,
)
# ... unless the task writes that noun itself: "Write a 150-word email", "Draft an email of at most 120 words".
_WRITES_A = re.compile(
    r"\b(?:write|draft|compose|produce|generate|create|prepare|craft)\s+(?:a|an|one|your)\s+(?:[\w-]+\s+){0,2}$",
    re.I,
)
_NEGATION = re.compile(
    r"\b(?:no|not|never|without|don't|do\s+not|avoid|instead\s+of|rather\s+than)\W+(?:\w+\W+){0,2}$", re.I
)

_LANGUAGE_NAME = "|".join(_LANGUAGE_CODES)
_LANGUAGE_IN_INSTRUCTION = re.compile(
    r"\b(?P<verb>answer|respond|reply|write|written|output|return|summari[sz]e|translate|translated|draft|compose"
    r"|rewrite|explain|describe|give|produce|generate)\b(?P<gap>[^.!?\n;:]{0,60}?)"
    rf"\b(?:in|into)\s+(?:plain\s+|simple\s+|fluent\s+|formal\s+|informal\s+|natural\s+)?(?P<lang>{_LANGUAGE_NAME})\b"
    rf"(?P<alternative>\s*(?:,|or|and|/)\s*(?:{_LANGUAGE_NAME})\b)?",
    re.I,
)
_COPULA = re.compile(r"\b(?:is|are|was|were)\s*$", re.I)
_RELATIVE = re.compile(r"\b(?:which|that|who|is|are|was|were)\b", re.I)

_LABEL_ONLY = re.compile(
    r"\b(?:answer|respond|reply|output|return|give|print|write)\s+(?:with\s+)?(?:only|just)\s+(?:the|a|one)\s+"
    r"(?:single\s+)?(?:label|category|class|tag)\b"
    r"|\b(?:the|a|one)\s+(?:single\s+)?(?:label|category|class|tag)(?:\s+name)?\s+(?:only|alone|and\s+nothing\s+else)\b",
    re.I,
)
_LABEL_NOUNS = r"labels|categories|classes|values|options|tags|teams|queues|intents|sentiments|answers|choices"
_ONE_OF = re.compile(
    r"\b(?:exactly\s+)?one\s+of(?P<explicit>\s+the\s+following|\s+these|\s+those)?"
    rf"(?:\s+(?P<noun>{_LABEL_NOUNS}))?\s*(?P<colon>:)?[ \t]*",
    re.I,
)
_LABELS_ARE = re.compile(
    r"\b(?:possible\s+|allowed\s+|valid\s+)?(?:labels?|categories|classes|tags|options|choices)\s*(?P<colon>:)[ \t]*"
    r"|\bthe\s+(?:possible\s+|allowed\s+|valid\s+)?(?:labels|categories|classes)\s+are\b[ \t]*",
    re.I,
)
# "to one team: billing, account or bug"
_ONE_NOUN = re.compile(
    r"\b(?:one|a\s+single|exactly\s+one)\s+(?:label|category|class|tag|team|queue|intent|sentiment|value|option)"
    r"\s*:[ \t]*",
    re.I,
)
_CLASSIFY_AS = re.compile(
    r"\b(?:classify|categori[sz]e|label|tag|mark|rate|sort|flag)\b[^.;:\n]{0,60}?\bas\s+(?:either\s+)?"
    r"|\broute\b[^.;:\n]{0,40}?\bto\s+(?:either\s+)?(?:the\s+)?",
    re.I,
)
_ANSWER_QUOTED = re.compile(
    r"\b(?:answer|respond|reply|output|return|say|choose|pick|select)\b[^.;:\n\"'`\u201c]{0,30}?(?=[\"'`\u201c])",
    re.I,
)
_PIPE_LIST = re.compile(r"(?<![|\w-])([\w-]+(?:[ \t]*\|[ \t]*[\w-]+)+)(?![\w|-])")
# A pipe list is a label set in brackets ("(billing|sales)") or right after an answer verb;
# elsewhere ("Format: name | company") it is a layout.
_PIPE_ENCLOSED = re.compile(r"[(\[{`][ \t]*$")
_PIPE_AFTER_VERB = re.compile(
    r"\b(?:answer|respond|reply|output|return|say|classify|label|choose|pick|select)\b[^.;:\n|]{0,20}$", re.I
)
_LIST_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\bvs)\.(?=\s|$)|[;!?\n()\[\]]|:(?=\s)", re.I)
_LIST_SPLIT = re.compile(r"\s*,\s*(?:or|and)\s+|\s*,\s*|\s+or\s+|\s+and\s+|\s*\|\s*", re.I)
_OPEN_SET = re.compile(r"\b(?:etc|e\.g|for\s+example|such\s+as|like|and\s+so\s+on|among\s+others)\b|\.\.\.|\u2026", re.I)
# Prose that follows the last item of a list: "billing, sales or spam for each ticket".
_AFTER_LIST = re.compile(
    r"\s+(?:based|depending|according|for|given|using|from|that|which|if|when|because|so|to|with|in|on|by"
    r"|after|before|unless|whichever|only|as)\b.*$",
    re.I,
)
_QUOTED = re.compile(r"[\"`\u201c\u2018']([^\"`\u201d\u2019'\n]{1,48})[\"`\u201d\u2019']")
_QUOTED_GAP = re.compile(r"\s*(?:,\s*(?:or|and)\s+|,|or|and|\||/)\s*$", re.I)
_LIST_STOP_ITEMS = frozenset({"nothing else", "nothing more", "no other text", "nothing", "only"})
_DETERMINERS = frozenset(
    "a an the our your their my his her its this that these those them us you me him it any some each every "
    "many several all other another".split()
)
_STRICT_ITEM = re.compile(r"(?:(?:not|no)\s+)?[^\W_][\w-]*", re.I)
_LOOSE_ITEM = re.compile(r"[^\W_][\w \-&+/']{0,39}", re.I)

_JSON_OUTPUT = re.compile(
    r"\b(?:as|in|into|return|returns|output|outputs|emit|produce|generate|give|write|respond\s+with|reply\s+with"
    r"|answer\s+with|format(?:ted)?\s+as|valid)\s+"
    r"(?:(?:a|an|one|only|single|valid|strict|compact|minified|just|raw|well-formed)\s+){0,3}json\b",
    re.I,
)
_JSON_WITH = re.compile(
    r"\s*(?:object\s+)?(?:with|containing|having|including)\s+(?:the\s+|exactly\s+)?"
    r"(?:(?P<noun>keys|fields|properties|attributes)\s*:?\s*)?",
    re.I,
)
_KEYS_NAMED = re.compile(r"\b(?:keys|fields|properties)\b(?:\s*(?P<colon>:)|\s+(?:are|named|called)\b)?\s*", re.I)
_TYPE_WORDS = (
    ("array", r"arrays?|lists?"),
    ("integer", r"integers?|int|whole\s+numbers?"),
    ("number", r"numbers?|floats?|decimals?|numeric"),
    ("boolean", r"booleans?|bool|true/false|true\s+or\s+false"),
    ("object", r"objects?|dict|mapping"),
    ("string", r"strings?|str|text"),
)
_A_TYPE_WORD = "(?:" + "|".join(rx for _, rx in _TYPE_WORDS) + r")\b"
_TYPE_WORD = re.compile("|".join(rf"(?P<{name}>\b(?:{rx})\b)" for name, rx in _TYPE_WORDS), re.I)
_TYPE_AFTER_KEY = re.compile(
    r"(?:\s+(?:key|field|property|value))?\s*(?:\(\s*|:\s*|\s+as\s+|\s*[-\u2014\u2013]\s*|\s+is\s+)(?:an?\s+)?"
    rf"(?={_A_TYPE_WORD})",
    re.I,
)
_KEY_ITEM = re.compile(
    r"[\"'`\u201c]?(?P<key>[A-Za-z_][\w-]*)[\"'`\u201d]?\s*(?:\((?P<t1>[^)]*)\)|:\s*(?P<t2>[A-Za-z][A-Za-z ]*))?"
)
_TYPED_PAIR = re.compile(
    rf"(?<![\w\"'`])[\"'`]?(?P<key>[A-Za-z_][\w-]*)[\"'`]?\s*:\s*(?:an?\s+)?(?={_A_TYPE_WORD})",
    re.I,
)
_KEY_LIST_END = re.compile(r"\.(?=\s|$)|[;\n]")
_NOT_KEYS = frozenset("output answer format input note notes example response return returns".split())


_TLDR = re.compile(r"\bTL\s*;\s*DR\b", re.I)


def read_instruction(instruction: str) -> InstructionSpec:
    """Read what ``instruction`` states outright about its output. Pure and conservative.

    Recognizes: label sets ("one of: a, b, c", "one of a, b or c", "labels: a, b", "classify
    as a or b", "(a|b)", quoted lists after "answer"), "Answer with the label only"; JSON
    output ("Return JSON", "as JSON with a, b and c") with keys named in a list, in quotes or
    backticks, in an example object, and their types where stated ('"score" (integer)',
    "name: string") and values ('"intent" one of a, b'); word counts ("60-word", "under 20
    words", "between 40 and 60 words"), sentence counts ("in one sentence", "at most three
    sentences"), bullet counts ("3 bullets", "three bullet points"); the output language
    ("Answer in French", "written in German", "translate into Spanish"). Anything unclear is
    left out: ordinary prose ("one of our customers") never yields a label set.
    """
    # "TL;DR" is one word, not two clauses: its semicolon must not cut "a TL;DR in Spanish" apart.
    text = _TLDR.sub("TLDR", instruction.strip())
    json_output = _reads_json_output(text)
    label_only = bool(_LABEL_ONLY.search(text)) and not json_output
    return InstructionSpec(
        labels=None if json_output else _read_labels(text, label_only),
        label_only=label_only,
        json_output=json_output,
        json_keys=_read_json_keys(text) if json_output else [],
        words=_read_count(_LENGTH_IN_INSTRUCTION, text),
        sentences=_read_sentences(text),
        bullets=_read_bullets(text),
        bullet_list=_reads_bullet_list(text),
        language=_read_language(text),
    )


def _negated(text: str, start: int) -> bool:
    return bool(_NEGATION.search(text[max(0, start - 40):start]))


def _number(token: str) -> int:
    return int(token.replace(",", "")) if token[0].isdigit() else _NUMBER_WORDS[token.lower()]


def _describes_input(text: str, start: int, end: int | None = None) -> bool:
    """Whether the count (or bullet list) at ``start:end`` is attached to a noun for the task's input.

    "a 500-word article", "the review (up to 300 words)", "the input lists 5 bullet points".
    """
    before = text[:start]
    if end is not None and _INPUT_NOUN_AFTER.match(text, end):
        return not _WRITES_A.search(before)
    m = _INPUT_NOUN_BEFORE.search(before)
    return bool(m) and not _WRITES_A.search(before[:m.start()])


def _read_count(pattern: re.Pattern[str], text: str) -> CountRange | None:
    """The first count ``pattern`` finds that is stated for the whole output, or None."""
    for m in pattern.finditer(text):
        if m.group("a") or m.group("c"):
            x, y = (_number(m.group("a")), _number(m.group("b"))) if m.group("a") else (
                _number(m.group("c")), _number(m.group("d")))
            lo, hi, bound = min(x, y), max(x, y), ""
        else:
            n, bound = _number(m.group("n")), (m.group("bound") or "").lower()
            lo, hi = n, n
            if bound and re.fullmatch(_AT_MOST, bound):
                lo = None
            elif bound and re.fullmatch(_AT_LEAST, bound):
                hi = None
        before = text[:m.start()].split()
        if not bound and (before and before[-1].lower().strip(",") in _NOT_A_STATED_COUNT):
            continue  # "the 3 sentences below", "more than 20 words": not a stated count
        if _negated(text, m.start()) or _EACH.match(text, m.end()) or _PER_PART_BEFORE.search(text, 0, m.start()):
            continue  # "do not write 3 sentences"; "20 words per bullet", "3 bullets, each under 12 words"
        if _describes_input(text, m.start(), m.end()):
            continue  # "a 500-word article", "the input lists 5 bullet points": the input, not the output
        if hi == 0 or (hi is None and lo == 0):
            continue  # "0 words" states nothing an output could keep
        return CountRange(lo=lo or None, hi=hi)
    return None


def _read_sentences(text: str) -> CountRange | None:
    stated = _read_count(_SENTENCES_IN_INSTRUCTION, text)
    if stated is None and _ONE_SENTENCE.search(text):
        return CountRange(lo=1, hi=1)
    return stated


def _read_bullets(text: str) -> CountRange | None:
    stated = _read_count(_BULLETS_IN_INSTRUCTION, text)
    if stated is None and (m := _BULLET_LIST_OF.search(text)) and not _negated(text, m.start()) \
            and not _describes_input(text, m.start()) and _number(m.group("n")) > 0:
        n = _number(m.group("n"))
        return CountRange(lo=n, hi=n)
    return stated


def _reads_bullet_list(text: str) -> bool:
    """A bullet list asked for: "as bullets", "a bulleted list"; not "the input lists 5 bullet points"."""
    return any(
        not _negated(text, m.start()) and not _describes_input(text, m.start())
        for m in _BULLET_LIST.finditer(text)
    )


def _read_language(text: str) -> str | None:
    found: set[str] = set()
    for m in _LANGUAGE_IN_INSTRUCTION.finditer(text):
        if m.group("verb").lower() == "written" and _COPULA.search(text[:m.start()]):
            continue  # "the emails are written in German": the input, not the output
        if _RELATIVE.search(m.group("gap")):
            continue  # "summarize the text, which is in French"
        if m.group("alternative"):
            return None  # "in English or Spanish": no one language
        found.add(_LANGUAGE_CODES[m.group("lang").lower()])
    return found.pop() if len(found) == 1 else None


def _reads_json_output(text: str) -> bool:
    return any(not _negated(text, m.start()) for m in _JSON_OUTPUT.finditer(text))


# -- label sets


def _read_labels(text: str, label_only: bool) -> list[str] | None:
    """The first clearly stated closed label set, or None."""
    candidates: list[tuple[int, list[str] | None]] = []
    for m in _ONE_OF.finditer(text):
        explicit = bool(m.group("explicit") or m.group("noun") or m.group("colon"))
        min_items = 2 if explicit or label_only else 3
        candidates.append((m.start(), _list_at(text, m.end(), strict=not explicit, min_items=min_items)))
    for m in _LABELS_ARE.finditer(text):
        explicit = bool(m.group("colon"))
        candidates.append((m.start(), _list_at(text, m.end(), strict=not explicit, min_items=2 if explicit else 3)))
    for m in _ONE_NOUN.finditer(text):
        candidates.append((m.start(), _list_at(text, m.end(), strict=False, min_items=2)))
    for m in _CLASSIFY_AS.finditer(text):
        candidates.append((m.start(), _list_at(text, m.end(), strict=True, min_items=2)))
    for m in _ANSWER_QUOTED.finditer(text):
        candidates.append((m.start(), _quoted_list_at(text, m.end())[0]))
    for m in _PIPE_LIST.finditer(text):
        line_start = text.rfind("\n", 0, m.start()) + 1
        before = text[line_start:m.start()]
        if _PIPE_ENCLOSED.search(before) or _PIPE_AFTER_VERB.search(before):
            candidates.append((m.start(), _clean_items([p for p in m.group(1).split("|")], strict=True, min_items=2)))
    for _, labels in sorted(candidates, key=lambda c: c[0]):
        if labels:
            return labels
    return None


def _list_at(text: str, pos: int, *, strict: bool, min_items: int) -> list[str] | None:
    """The list of short items that starts at ``pos`` (quoted, comma/or/pipe separated, or bullets)."""
    return _list_span_at(text, pos, strict=strict, min_items=min_items)[0]


def _list_span_at(text: str, pos: int, *, strict: bool, min_items: int) -> tuple[list[str] | None, int]:
    """``_list_at`` and where the list's text ends."""
    if text[pos:pos + 1] in ("(", "["):
        pos += 1
    rest = text[pos:]
    if rest.lstrip(" \t").startswith("\n"):
        return _bullet_items(rest), pos + len(rest)
    if rest.lstrip()[:1] in "\"`\u201c'\u2018":
        return _quoted_list_at(text, pos)
    end = _LIST_END.search(rest)
    tail = rest[: end.start() if end else len(rest)]
    if quote := re.search(r"[\"`\u201c]", tail):  # an unquoted list ends where quoting starts
        tail = re.sub(r"(?:\s*,)?\s*\b(?:and|or)\s*$", "", tail[:quote.start()])
    if _OPEN_SET.search(tail):
        return None, pos + len(tail)  # "such as billing, sales, etc.": an open set
    return _clean_items(_LIST_SPLIT.split(tail.strip()), strict=strict, min_items=min_items), pos + len(tail)


def _clean_items(raw: list[str], *, strict: bool, min_items: int) -> list[str] | None:
    items = [r.strip().strip("\"'`.,") for r in raw]
    while items and items[-1].lower() in _LIST_STOP_ITEMS:
        items.pop()
    if items:
        items[-1] = _AFTER_LIST.sub("", items[-1]).strip()
    shape = _STRICT_ITEM if strict else _LOOSE_ITEM
    if len(items) < min_items:
        return None
    for item in items:
        words = item.lower().split()
        if not item or not shape.fullmatch(item) or len(words) > 3 or words[0] in _DETERMINERS:
            return None
    return _dedupe(items)


def _bullet_items(rest: str) -> list[str] | None:
    items = []
    for line in rest.lstrip(" \t").splitlines()[1:]:
        m = re.match(r"\s*(?:[-*+\u2022]|\d+[.)])\s+(.*)", line)
        if not m:
            if line.strip():
                break
            if items:
                break
            continue
        label = re.split(r"\s*(?::|\s[-\u2013\u2014]\s)", m.group(1), maxsplit=1)[0].strip().strip("\"'`")
        items.append(label)
    return _clean_items(items, strict=False, min_items=2)


def _quoted_list_at(text: str, pos: int) -> tuple[list[str] | None, int]:
    """Quoted items joined by , or and | from ``pos`` on, and where they end."""
    items: list[str] = []
    last = pos
    for m in _QUOTED.finditer(text, pos):
        gap = text[last:m.start()]
        if items and not _QUOTED_GAP.fullmatch(gap):
            break
        if not items and gap.strip():
            return None, pos
        items.append(m.group(1).strip())
        last = m.end()
    if len(items) < 2 or any(len(i.split()) > LABEL_MAX_WORDS for i in items):
        return None, last
    return _dedupe(items), last


def _dedupe(items: list[str]) -> list[str]:
    seen: dict[str, str] = {}
    for item in items:
        seen.setdefault(normalize_label(item), item)
    return list(seen.values())


# -- JSON keys


def _read_json_keys(text: str) -> list[JsonKey]:
    found: dict[str, tuple[int, str | None]] = {}  # key -> (first position, stated type)

    def add(key: str, pos: int, type_text: str | None) -> None:
        t = _json_type_named(type_text) if type_text else None
        if key not in found:
            found[key] = (pos, t)
        elif t and not found[key][1]:
            found[key] = (found[key][0], t)

    # Value lists ("one of ...") and example objects hold values, not keys.
    value_spans: list[tuple[int, int]] = []
    enums: list[tuple[int, list[str]]] = []
    for m in _ONE_OF.finditer(text):
        values, end = _list_span_at(text, m.end(), strict=False, min_items=2)
        value_spans.append((m.start(), end))
        if values:
            enums.append((m.start(), values))
    for start, end, obj in _example_objects(text):
        value_spans.append((start, end))
        for k, v in obj.items():
            add(k, start, json_type(v) if v not in ("", None) else None)

    def in_values(pos: int) -> bool:
        return any(a <= pos < b for a, b in value_spans)

    for m in _JSON_OUTPUT.finditer(text):
        if w := _JSON_WITH.match(text, m.end()):
            for key, type_text in _key_list(text, w.end(), min_items=1 if w.group("noun") else 2):
                add(key, w.end(), type_text)
    for m in _KEYS_NAMED.finditer(text):
        for key, type_text in _key_list(text, m.end(), min_items=1 if m.group("colon") else 2):
            add(key, m.end(), type_text)
    for m in _QUOTED.finditer(text):
        key = m.group(1)
        if re.fullmatch(r"[A-Za-z_][\w-]*", key) and not in_values(m.start()):
            t = _TYPE_AFTER_KEY.match(text, m.end())
            add(key, m.start(), text[t.end():t.end() + 24] if t else None)
    for m in _TYPED_PAIR.finditer(text):
        if m.group("key").lower() not in _NOT_KEYS and not in_values(m.start()):
            add(m.group("key"), m.start(), text[m.end():m.end() + 24])

    enum_of: dict[str, list[str]] = {}
    for pos, values in enums:
        clause = text[max(text.rfind(".", 0, pos), text.rfind(";", 0, pos), text.rfind("\n", 0, pos)) + 1:pos]
        mentions = [(clause.rfind(k), k) for k in found if re.search(rf"\b{re.escape(k)}\b", clause)]
        if mentions:
            enum_of.setdefault(max(mentions)[1], values)
    keys = sorted(found.items(), key=lambda kv: kv[1][0])
    return [
        JsonKey(name=k, type=t if t or k not in enum_of else "string", enum=enum_of.get(k))
        for k, (_, t) in keys
    ]


def _key_list(text: str, pos: int, *, min_items: int) -> list[tuple[str, str | None]]:
    end = _KEY_LIST_END.search(text, pos)
    tail = text[pos: end.start() if end else len(text)]
    parts, depth, cur = [], 0, ""
    for ch in tail:  # split on , / and / or outside parentheses
        depth += (ch == "(") - (ch == ")")
        cur += ch
        if depth == 0 and ch == ",":
            parts.append(cur[:-1])
            cur = ""
    parts.append(cur)
    raw = [p for chunk in parts for p in re.split(r"\s+(?:and|or)\s+(?![^(]*\))", chunk.strip())]
    raw = [re.sub(r"^(?:and|or)\s+", "", r.strip()) for r in raw if r.strip()]
    out: list[tuple[str, str | None]] = []
    for i, item in enumerate(raw):
        last = i == len(raw) - 1
        m = _KEY_ITEM.match(item) if last and out else _KEY_ITEM.fullmatch(item)
        if not m or m.group("key").lower() in _DETERMINERS:
            return []
        out.append((m.group("key"), m.group("t1") or m.group("t2")))
    return out if len(out) >= min_items else []


def _example_objects(text: str) -> list[tuple[int, int, dict]]:
    """Example JSON objects written into the instruction: (start, end, object)."""
    decoder = json.JSONDecoder()
    out = []
    pos = text.find("{")
    while pos != -1:
        try:
            value, end = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError):  # not JSON here, or nested past the parser's depth
            pos = text.find("{", pos + 1)
            continue
        if isinstance(value, dict) and value:
            out.append((pos, end, value))
        pos = text.find("{", end)
    return out


def _json_type_named(type_text: str) -> str | None:
    m = _TYPE_WORD.search(type_text)
    return m.lastgroup if m else None
