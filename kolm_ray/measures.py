"""Text measures: what the verifier and the instruction reader count, detect and normalize.

Words and content words, sentences and bullets, the language a text is written in, what a bare
label looks like, label and fenced-JSON normalization, a JSON value's schema type. Pure,
deterministic and fast: the verifier scores live traffic with these. This module must not read
instructions, score outputs or learn from examples; it measures one text, and its callers
decide what a measure means.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_LETTERS = re.compile(r"[^\W\d_]+")
_STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from further
    had has have having he her here hers herself him himself his how i if in into is it its itself just
    me more most my myself no nor not now of off on once only or other our ours ourselves out over own
    same she should so some such than that the their theirs them themselves then there these they this
    those through to too under until up very was we were what when where which while who whom why will
    with would you your yours yourself yourselves said says new one two will may might must shall
    yet via per within without across""".split()
)
# Indentation is horizontal whitespace only: a "\s*" that may cross lines is tried again at every
# line start, quadratic in a reply of blank lines (``^`` already matches at each line).
_BULLET = re.compile(r"^[^\S\n]*([-*+\u2022]|\d+[.)])\s", re.M)
_FENCE_OPEN = re.compile(r"\s*```[a-zA-Z]*")
# A sentence ends at . ! ? (and closing quotes) before a space or the end, except a period
# after an initial ("U.S.") or a common abbreviation. Only at the start of a run of end marks,
# taken whole: a run that fails from its start fails from inside it too (and retrying at every
# mark of "....x" was quadratic).
_SENTENCE_END = re.compile(r"(?<![.!?])[.!?]++[\"'\u201d\u2019)\]]*+(?=\s|$)")
_ABBREVIATIONS = frozenset({"e.g", "i.e", "mr", "mrs", "ms", "dr", "vs", "st", "etc", "no", "approx"})
# A bare label: one line, a few words, no inner punctuation ("Category: billing" is chatter).
_LABEL_SHAPE = re.compile(r"[^\W_][\w \-/&+']*")
LABEL_MAX_WORDS = 5
_LABEL_MAX_CHARS = 48


# ----- words, sentences, bullets -------------------------------------------------------------


# The cache pays for inputs scored against many samples (k per row) and references scored again
# on every call; texts past this length are computed each time, so a serving host's memory stays
# bounded (8,192 entries of at most 16 KiB each) whatever its callers send.
_CACHED_TEXT_CHARS = 16_384


def content_words(text: str) -> frozenset[str]:
    """Lower-cased content words of ``text``, crudely stemmed to 6 characters."""
    if len(text) > _CACHED_TEXT_CHARS:
        return _content_words_of(text)
    return _content_words_cached(text)


def _content_words_of(text: str) -> frozenset[str]:
    return frozenset(w[:6] for w in _WORD.findall(text.lower()) if len(w) > 2 and w not in _STOPWORDS)


_content_words_cached = functools.lru_cache(maxsize=8192)(_content_words_of)


def word_count(text: str) -> int:
    return len(_WORD.findall(text.lower()))


def word_tokens(text: str) -> list[str]:
    """The lower-cased words of ``text``, the ones ``word_count`` counts."""
    return _WORD.findall(text.lower())


def sentence_count(text: str) -> int:
    """Sentences in ``text``: ends at . ! ? (not after an initial or e.g./Mr./etc.) and line breaks."""
    n = 0
    for line in text.splitlines():
        last = 0
        letter = _LETTERS.search(line)  # the first letter at or after ``last``, searched once per ``last``
        for m in _SENTENCE_END.finditer(line):
            if line[m.start()] == ".":
                word = _word_before(line, last, m.start()).lower().lstrip("(\"'")
                if word in _ABBREVIATIONS or (len(word.rsplit(".", 1)[-1]) == 1 and word[-1:].isalpha()):
                    continue
            if letter is not None and letter.start() < m.start():
                n += 1
            last = m.end()
            letter = _LETTERS.search(line, last)
        if letter is not None:
            n += 1
    return n


def _word_before(line: str, lo: int, hi: int) -> str:
    """The last whitespace-separated word of ``line[lo:hi]`` ("" if none), as ``rsplit(None, 1)``
    would give it, without copying the slice: a run of skipped initials ("a. a. a. ...") keeps
    ``lo`` fixed, and a slice per period was quadratic."""
    end = hi
    while end > lo and line[end - 1].isspace():
        end -= 1
    start = end
    while start > lo and not line[start - 1].isspace():
        start -= 1
    return line[start:end]


def bullet_count(text: str) -> int:
    """Lines of ``text`` that start a bullet (``-``, ``*``, ``+``, ``\u2022`` or ``1.``)."""
    return len(_BULLET.findall(text))


def has_bullet(text: str) -> bool:
    """Whether a line of ``text`` starts a bullet (as ``bullet_count`` counts them)."""
    return _BULLET.search(text) is not None


# ----- labels and JSON -----------------------------------------------------------------------


def normalize_label(text: str) -> str:
    return text.strip().strip("\"'`.!").strip().lower()


def is_label_shaped(text: str) -> bool:
    """Whether ``text`` looks like a bare label: one line, a few words, no inner punctuation."""
    s = text.strip()
    return (
        "\n" not in s
        and word_count(s) <= LABEL_MAX_WORDS
        and len(s) <= _LABEL_MAX_CHARS
        and bool(_LABEL_SHAPE.fullmatch(normalize_label(s)))
    )


def strip_fence(text: str) -> str:
    """The body of a fenced code block that is the whole of ``text`` (```` ```json ```` ... ```` ``` ````),
    else ``text`` stripped.

    As ``^\\s*```[a-zA-Z]*\\s*\\n(.*?)\\n\\s*```\\s*$`` (dot-all) would match, in linear time: that
    expression backtracks cubically over a reply of blank lines. The body runs from after the last
    line break before its first non-blank character to the first line break after its last one
    (an all-blank body: between the last two line breaks).
    """
    opening = _FENCE_OPEN.match(text)
    if opening is None:
        return text.strip()
    inner = text[opening.end():].rstrip()
    if not inner.endswith("```"):
        return text.strip()
    inner = inner[:-3]  # up to the closing fence
    first = len(inner) - len(inner.lstrip())  # first non-blank character (len(inner) if none)
    last = len(inner.rstrip())  # just past the last one
    if first == len(inner):  # nothing but blanks: the body lies between the last two line breaks
        end = inner.rfind("\n")
        start = inner.rfind("\n", 0, end) if end > 0 else -1
    else:
        start, end = inner.rfind("\n", 0, first), inner.find("\n", last)
    if start == -1 or end == -1:
        return text.strip()
    return inner[start + 1:end]


def parse_json_object(text: str) -> dict | None:
    try:
        value = json.loads(strip_fence(text))
    except (ValueError, RecursionError):  # not JSON, a number past int()'s digit limit, nested too deep
        return None
    return value if isinstance(value, dict) else None


def json_type(v: Any) -> str:
    """The JSON Schema type of a parsed JSON value (``bool`` is ``boolean``, not ``integer``)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


# ----- output language -----------------------------------------------------------------------

# A small built-in profile: the commonest function words of each of seven languages. Enough to
# tell which of them a sentence or more is written in, in microseconds; anything else (short
# text, other languages, mixed text) is "unsure" (None). ``detect_language`` is the one place to
# swap in a real language-identification library.
_LANGUAGE_PROFILES = {
    "en": """the and of to is are was were that this it with for on be have has not by from at which
        their they will would an or as but we you he she its been these there what who""",
    "es": """el la los las de del que y en un una es son por para con no se su sus al lo como más pero
        muy este esta está también sobre entre fue ha han hay desde cuando porque ya""",
    "fr": """le la les de des du et est un une en que qui dans pour pas sur au aux avec ce cette ces il
        elle ils sont ont mais plus par ne se leur été très aussi nous vous être""",
    "de": """der die das den dem des und ist sind nicht ein eine einen einem mit von zu auf für im es
        sich auch dass wird werden wurde hat haben bei aus nach oder aber wie noch über sie er wir""",
    "it": """il lo la gli le di del della dei che e è un una per non con sono si da nel nella alla al
        anche ma più come questo questa essere ha hanno stato molto loro tra dopo""",
    "pt": """o a os as de do da dos das que e é um uma em no na nos nas para com não por se mais como mas
        foi são ao à seu sua também está pelo pela muito já isso""",
    "nl": """de het een en van is zijn dat die niet in op te met voor aan er ook als maar om bij door
        wordt worden naar nog dit deze heeft hebben was uit over kan wel geen ik je we""",
}


def _profile_index() -> dict[str, tuple[tuple[str, float], ...]]:
    """word -> ((language, weight), ...): a word in n profiles counts 1/n for each."""
    langs: dict[str, list[str]] = {}
    for lang, words in sorted(_LANGUAGE_PROFILES.items()):
        for w in sorted(set(words.split())):
            langs.setdefault(w, []).append(lang)
    return {w: tuple((lang, 1 / len(ls)) for lang in ls) for w, ls in langs.items()}


_PROFILE_INDEX = _profile_index()
# Weighted function-word hits needed, and the lead over the runner-up, to name a language.
_LANGUAGE_MIN_EVIDENCE = 2.0
_LANGUAGE_MARGIN = 1.5
_LANGUAGE_SAMPLE_CHARS = 2000
# Punctuation and digits to spaces: str.split is several times faster than a Unicode regex.
_NOT_WORD_CHARS = str.maketrans(
    {c: " " for c in ".,;:!?\"'()[]{}<>\u00bf\u00a1\u00ab\u00bb\u201c\u201d\u2018\u2019-\u2013\u2014/\\*#_|&+=%$@0123456789"}
)


def detect_language(text: str) -> str | None:
    """The language of ``text`` as an ISO 639-1 code, or None when unsure.

    A built-in stopword profile for en, es, fr, de, it, pt and nl: deterministic and fast, but
    it needs a sentence or so of text and names no other language (it says None for those).
    """
    scores: dict[str, float] = {}
    # The first couple of thousand characters say enough, and keep long outputs cheap.
    for w in text[:_LANGUAGE_SAMPLE_CHARS].lower().translate(_NOT_WORD_CHARS).split():
        hits = _PROFILE_INDEX.get(w)
        if hits:
            for lang, weight in hits:
                scores[lang] = scores.get(lang, 0.0) + weight
    if not scores:
        return None
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    best, top = ranked[0]
    runner_up = ranked[1][1] if len(ranked) > 1 else 0.0
    if top < _LANGUAGE_MIN_EVIDENCE or top < _LANGUAGE_MARGIN * runner_up:
        return None
    return best
