"""The verifier: synthesized from a task instruction and example rows, it scores one output.

Pipeline: ``synthesize(instruction, references)`` -> ``Verifier`` (a versioned, JSON-serializable
pydantic model that goes into the artifact) -> ``Verifier.score(output, input, reference)`` ->
``Checks`` (T, C, L in 0..1 and a pass/fail) -> ``kolm_ray.kscore.score_rows`` aggregates rows
into a K-score.

The three checks:

* **C, conformance** to the output kind inferred from the references: ``label`` (a small
  closed set), ``json`` (an inferred JSON Schema) or ``text`` (structural rules). With a
  reference, agreement with it counts too.
* **L, length band**: a word-count band learned from the references or read from the
  instruction ("a 60-word TLDR"); 1 inside, falling off linearly outside.
* **T, topic overlap**: content-word overlap of the output with its input (and with the
  reference where given), calibrated so that references score near 1.

A check that does not fit the kind gets weight 0 and a note saying why. This module must not
call a model or the network, and must stay deterministic and fast (thousands of outputs a
second on one core): it scores live traffic too.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from typing import Any, Literal, Sequence

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from kolm_ray.errors import InputError

VERIFIER_FORMAT_VERSION = 1

Kind = Literal["label", "json", "text"]

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
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
_MARKDOWN = re.compile(r"(^\s{0,3}#{1,6}\s)|(^\s*[-*+]\s)|(^\s*\d+[.)]\s)|(\*\*[^*]+\*\*)|(^```)", re.M)
_BULLET = re.compile(r"^\s*([-*+]|\d+[.)])\s", re.M)
_PREAMBLE = re.compile(
    r"^\s*(here(?:'s| is| are)\b|sure\b|certainly\b|of course\b|as an ai\b|i (?:can|will|would)\b|okay\b)",
    re.I,
)
_FENCE = re.compile(r"^\s*```[a-zA-Z]*\s*\n(.*?)\n\s*```\s*$", re.S)
# "a 60-word TLDR", "in 60 words", "under 100 words", "at most 50 words"
_LENGTH_IN_INSTRUCTION = re.compile(
    r"(?:(under|at most|no more than|fewer than|less than|max(?:imum)?(?: of)?|up to)\s+)?(\d{1,4})[\s-]?words?\b",
    re.I,
)

# Reference agreement for free text: a faithful paraphrase shares about half of its content
# words with the reference, so F1 of 0.5 already counts as full agreement.
_REFERENCE_OVERLAP_FULL = 0.5
# Below this share of content words taken from the input, references do not "talk about" their
# input (creative text, fixed phrasing), and topic overlap says nothing.
_TOPIC_MIN_LEVEL = 0.12


def content_words(text: str) -> frozenset[str]:
    """Lower-cased content words of ``text``, crudely stemmed to 6 characters."""
    return _content_words_cached(text)


@functools.lru_cache(maxsize=8192)
def _content_words_cached(text: str) -> frozenset[str]:
    return frozenset(w[:6] for w in _WORD.findall(text.lower()) if len(w) > 2 and w not in _STOPWORDS)


def word_count(text: str) -> int:
    return len(_WORD.findall(text.lower()))


def normalize_label(text: str) -> str:
    return text.strip().strip("\"'`.!").strip().lower()


def strip_fence(text: str) -> str:
    m = _FENCE.match(text)
    return m.group(1) if m else text.strip()


def parse_json_object(text: str) -> dict | None:
    try:
        value = json.loads(strip_fence(text))
    except (json.JSONDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class LengthBand(BaseModel):
    model_config = ConfigDict(frozen=True)
    lo: float = Field(description="Fewest words for full L score.")
    hi: float = Field(description="Most words for full L score.")
    source: str = Field(description="Where the band came from: references, instruction, or both.")


class TextRules(BaseModel):
    model_config = ConfigDict(frozen=True)
    min_lines: int = Field(description="Fewest non-empty lines among the references.")
    max_lines: int = Field(description="Most non-empty lines among the references.")
    markdown: Literal["never", "allowed", "bullets"] = Field(
        description="never: no reference uses markdown; bullets: every reference is a bullet list."
    )
    terminal_punctuation: bool = Field(description="Every reference ends with . ! ? or a closing quote.")


class TopicCalibration(BaseModel):
    model_config = ConfigDict(frozen=True)
    input_level: float = Field(description="Share of a reference's content words found in its input (0.9 x 10th pct).")
    common: list[str] = Field(
        default_factory=list,
        description="Task boilerplate: content words in over a quarter of the references, ignored by T.",
    )


class Weights(BaseModel):
    model_config = ConfigDict(frozen=True)
    t: float
    c: float
    l: float  # noqa: E741


class Checks(BaseModel):
    """The verifier's verdict on one output. ``None`` marks a check that does not apply."""

    model_config = ConfigDict(frozen=True)
    t: float | None
    c: float
    l: float | None  # noqa: E741
    k: float = Field(description="Weighted mean of the applicable checks, 0..1.")
    passed: bool


class Verifier(BaseModel):
    """Scores outputs of one task; built by ``synthesize``, stored as JSON in the artifact."""

    model_config = ConfigDict(frozen=True)
    format_version: int = VERIFIER_FORMAT_VERSION
    instruction: str
    kind: Kind
    labels: list[str] | None = None
    json_schema: dict[str, Any] | None = None
    json_text_fields: list[str] | None = None
    text_rules: TextRules | None = None
    length: LengthBand | None = None
    topic: TopicCalibration | None = None
    weights: Weights
    pass_threshold: float = Field(0.75, description="A row passes at k >= this, with no applicable check < 0.5.")
    n_references: int
    notes: list[str] = Field(default_factory=list)

    _validator: Any = PrivateAttr(default=None)
    _label_set: frozenset[str] = PrivateAttr(default=frozenset())
    _common: frozenset[str] = PrivateAttr(default=frozenset())

    def model_post_init(self, __context: Any) -> None:
        if self.topic is not None:
            self._common = frozenset(self.topic.common)
        if self.json_schema is not None:
            self._validator = jsonschema.Draft202012Validator(self.json_schema)
        if self.labels:
            self._label_set = frozenset(normalize_label(x) for x in self.labels)

    # ----- serialization ------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str, *, source: str = "verifier") -> "Verifier":
        """Raises: InputError if ``text`` is not a verifier of a known format version."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"verifier is not valid JSON ({e.msg}, line {e.lineno})", path=source) from None
        version = data.get("format_version") if isinstance(data, dict) else None
        if version != VERIFIER_FORMAT_VERSION:
            raise InputError(
                f"verifier format_version {version!r} is not supported (expected {VERIFIER_FORMAT_VERSION})",
                path=source,
            )
        try:
            return cls.model_validate(data)
        except Exception as e:  # pydantic.ValidationError: report, do not guess
            raise InputError(f"not a valid verifier: {e}", path=source) from None

    # ----- describing the rules (for the teacher's system prompt) --------------------------
    def describe_rules(self) -> list[str]:
        """The learned output rules in plain words, for the teacher's system prompt."""
        rules: list[str] = []
        if self.kind == "label" and self.labels:
            rules.append("Answer with exactly one of these labels and nothing else: " + ", ".join(self.labels) + ".")
        if self.kind == "json" and self.json_schema is not None:
            rules.append(
                "Answer with one JSON object and nothing else, matching this JSON Schema: "
                + json.dumps(self.json_schema, sort_keys=True)
            )
        if self.text_rules is not None:
            r = self.text_rules
            if r.min_lines == r.max_lines == 1:
                rules.append("Write a single paragraph.")
            else:
                rules.append(f"Write between {r.min_lines} and {r.max_lines} non-empty lines.")
            if r.markdown == "never":
                rules.append("Plain text: no markdown, headings or bullet points.")
            elif r.markdown == "bullets":
                rules.append("Format the answer as a bullet list.")
        if self.length is not None and self.kind != "label":
            rules.append(f"Length: {int(self.length.lo)} to {int(self.length.hi)} words.")
        rules.append("Output only the answer, with no preamble or commentary.")
        return rules

    # ----- scoring -------------------------------------------------------------------------
    def score(self, output: str, input: str | None = None, reference: str | None = None) -> Checks:
        """Score one output; ``input`` feeds topic overlap, ``reference`` adds agreement."""
        output = output if isinstance(output, str) else ""
        if self.kind == "label":
            c = self._conformance_label(output, reference)
            t = l = None
        elif self.kind == "json":
            obj = parse_json_object(output)
            c = self._conformance_json(obj, reference)
            free = self._json_free_text(obj) if obj is not None else ""
            t = self._topic(free, input, self._json_free_text(parse_json_object(reference) or {}) if reference else None)
            l = self._length(free) if self.length is not None else None
        else:
            c = self._conformance_text(output)
            t = self._topic(output, input, reference)
            l = self._length(output) if self.length is not None else None
        if self.weights.t == 0:
            t = None
        if self.weights.l == 0:
            l = None
        total = self.weights.c
        acc = self.weights.c * c
        if t is not None:
            total += self.weights.t
            acc += self.weights.t * t
        if l is not None:
            total += self.weights.l
            acc += self.weights.l * l
        k = acc / total if total else 0.0
        floor_ok = all(x is None or x >= 0.5 for x in (t, c, l))
        return Checks(t=t, c=c, l=l, k=k, passed=bool(k >= self.pass_threshold and floor_ok))

    def _conformance_label(self, output: str, reference: str | None) -> float:
        norm = normalize_label(output)
        target = {normalize_label(reference)} if reference else self._label_set
        if norm in target:
            return 1.0
        # "Category: billing" names the label inside chatter: half credit.
        words = set(_WORD.findall(norm))
        hits = [lab for lab in self._label_set if lab in norm and set(_WORD.findall(lab)) <= words]
        if len(hits) == 1 and hits[0] in target:
            return 0.5
        return 0.0

    def _conformance_json(self, obj: dict | None, reference: str | None) -> float:
        if obj is None:
            return 0.0
        props = (self.json_schema or {}).get("properties", {})
        n_checks = max(1, len(props))
        errors = {tuple(e.absolute_path)[:1] or ("$",) for e in self._validator.iter_errors(obj)}
        validity = max(0.0, 1.0 - len(errors) / n_checks)
        ref = parse_json_object(reference) if reference else None
        if ref is None:
            return validity
        return 0.5 * validity + 0.5 * _json_agreement(obj, ref, set(self.json_text_fields or []))

    def _conformance_text(self, output: str) -> float:
        if not output.strip():
            return 0.0
        r = self.text_rules
        if r is None:
            return 1.0
        lines = [ln for ln in output.splitlines() if ln.strip()]
        rules = [
            r.min_lines <= len(lines) <= r.max_lines,
            not _PREAMBLE.match(output),
        ]
        if r.markdown == "never":
            rules.append(not _MARKDOWN.search(output))
        elif r.markdown == "bullets":
            rules.append(bool(_BULLET.search(output)))
        if r.terminal_punctuation:
            rules.append(output.rstrip()[-1:] in ".!?\"')]")
        return sum(rules) / len(rules)

    def _length(self, text: str) -> float:
        band = self.length
        assert band is not None
        wc = word_count(text)
        if wc == 0:
            return 0.0
        if wc < band.lo:
            return wc / band.lo
        if wc > band.hi:
            return max(0.0, 1.0 - (wc - band.hi) / band.hi)
        return 1.0

    def _topic(self, text: str, input: str | None, reference: str | None) -> float | None:
        if self.topic is None:
            return None
        out = content_words(text) - self._common
        if not out:
            return 0.0
        parts: list[float] = []
        if input:
            share = len(out & content_words(input)) / len(out)
            parts.append(min(1.0, share / self.topic.input_level))
        if reference:
            ref = content_words(reference) - self._common
            if ref:
                f1 = 2 * len(out & ref) / (len(out) + len(ref))
                parts.append(min(1.0, f1 / _REFERENCE_OVERLAP_FULL))
        return sum(parts) / len(parts) if parts else None

    def _json_free_text(self, obj: dict) -> str:
        return " ".join(str(obj.get(k, "")) for k in (self.json_text_fields or []) if isinstance(obj.get(k), str))


def _json_agreement(obj: dict, ref: dict, text_fields: set[str]) -> float:
    if not ref:
        return 1.0
    scores = []
    for key, want in ref.items():
        got = obj.get(key)
        if key in text_fields and isinstance(want, str) and isinstance(got, str):
            a, b = content_words(got), content_words(want)
            f1 = 2 * len(a & b) / (len(a) + len(b)) if a or b else 1.0
            scores.append(min(1.0, f1 / _REFERENCE_OVERLAP_FULL))
        elif isinstance(want, list) and isinstance(got, list):
            sa, sb = {json.dumps(x, sort_keys=True) for x in got}, {json.dumps(x, sort_keys=True) for x in want}
            scores.append(len(sa & sb) / len(sa | sb) if sa | sb else 1.0)
        elif isinstance(want, str) and isinstance(got, str):
            scores.append(1.0 if normalize_label(got) == normalize_label(want) else 0.0)
        else:
            scores.append(1.0 if got == want else 0.0)
    return sum(scores) / len(scores)


# ----- synthesis -----------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return 0.0
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _json_type(v: Any) -> str:
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


def infer_kind(references: Sequence[str]) -> Kind:
    """``json`` if most references are JSON objects, ``label`` for a small repeated set, else ``text``."""
    n = len(references)
    if sum(parse_json_object(r) is not None for r in references) >= 0.8 * n:
        return "json"
    norms = [normalize_label(r) for r in references]
    short = all(word_count(r) <= 5 and len(r.strip()) <= 48 for r in references)
    distinct = len(set(norms))
    if short and n >= 4 and distinct <= max(2, min(32, n // 2)):
        return "label"
    return "text"


def _infer_json_schema(objs: list[dict]) -> tuple[dict, list[str]]:
    n = len(objs)
    keys = Counter(k for o in objs for k in o)
    required = sorted(k for k, c in keys.items() if c == n)
    props: dict[str, Any] = {}
    text_fields: list[str] = []
    for key in sorted(keys):
        values = [o[key] for o in objs if key in o]
        types = sorted({_json_type(v) for v in values})
        if set(types) == {"integer", "number"}:
            types = ["number"]
        prop: dict[str, Any] = {"type": types[0] if len(types) == 1 else types}
        if types == ["string"]:
            distinct = sorted(set(values))
            if len(values) >= 4 and len(distinct) <= max(2, min(12, len(values) // 3)):
                prop["enum"] = distinct
            elif sum(word_count(v) for v in values) / len(values) >= 3:
                text_fields.append(key)
        props[key] = prop
    schema = {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": not all(set(o) == set(keys) for o in objs),
    }
    return schema, text_fields


def _length_band(instruction: str, counts: list[int]) -> LengthBand | None:
    m = _LENGTH_IN_INSTRUCTION.search(instruction)
    ref_band = None
    if counts:
        ref_band = (max(1.0, _percentile(counts, 0.05) * 0.8), max(1.0, _percentile(counts, 0.95) * 1.2))
    if m:
        n = float(m.group(2))
        if m.group(1):  # an upper limit: "under 100 words"
            lo, hi = (ref_band[0] if ref_band else max(1.0, 0.3 * n)), n
        else:  # a target: "a 60-word TLDR"
            lo, hi = 0.7 * n, 1.2 * n
        if ref_band:
            return LengthBand(lo=min(lo, ref_band[0]), hi=max(hi, ref_band[1]), source="instruction+references")
        return LengthBand(lo=lo, hi=hi, source="instruction")
    if ref_band:
        return LengthBand(lo=ref_band[0], hi=ref_band[1], source="references")
    return None


def synthesize(instruction: str, references: Sequence[str], inputs: Sequence[str] | None = None) -> Verifier:
    """Build a verifier for ``instruction`` from reference outputs (and their inputs, for T).

    ``references`` are the rows' reference outputs, or the teacher's samples where the rows
    have none. ``inputs``, aligned with ``references``, calibrate topic overlap.

    Raises:
        InputError: no non-empty reference to learn from, or a blank instruction.
    """
    if not instruction.strip():
        raise InputError("the task instruction is empty")
    pairs = [(r, (inputs[i] if inputs else None)) for i, r in enumerate(references) if isinstance(r, str) and r.strip()]
    if not pairs:
        raise InputError("no reference outputs to learn the verifier from: give rows with \"output\"")
    refs = [p[0] for p in pairs]
    kind = infer_kind(refs)
    notes: list[str] = [f"kind {kind!r} inferred from {len(refs)} references"]
    labels = schema = text_fields = rules = None

    if kind == "label":
        seen: dict[str, str] = {}
        for r in refs:
            seen.setdefault(normalize_label(r), r.strip().strip("\"'`.!").strip())
        labels = sorted(seen.values())
        notes.append("T not applicable: topic overlap of a one-word label says nothing")
        notes.append("L not applicable: a label's length is fixed by the label set")
        length = topic = None
        weights = Weights(t=0.0, c=1.0, l=0.0)
        texts: list[str] = []
    elif kind == "json":
        objs = [o for o in (parse_json_object(r) for r in refs) if o is not None]
        schema, text_fields = _infer_json_schema(objs)
        texts = [" ".join(str(o.get(k, "")) for k in text_fields if isinstance(o.get(k), str)) for o in objs]
        if not text_fields:
            notes.append("T and L not applicable: the JSON has no free-text field")
        weights = Weights(t=0.2, c=0.6, l=0.2)
        pairs = [(texts[i], pairs[i][1]) for i in range(min(len(texts), len(pairs)))]
    else:
        texts = refs
        line_counts = [len([ln for ln in r.splitlines() if ln.strip()]) for r in refs]
        md = [bool(_MARKDOWN.search(r)) for r in refs]
        bullets = all(_BULLET.search(r) for r in refs)
        rules = TextRules(
            min_lines=min(line_counts),
            max_lines=max(line_counts),
            markdown="bullets" if bullets else ("never" if not any(md) else "allowed"),
            terminal_punctuation=all(r.rstrip()[-1:] in ".!?\"')]" for r in refs),
        )
        weights = Weights(t=0.4, c=0.3, l=0.3)

    if kind != "label":
        counts = [word_count(t) for t in texts if t]
        length = _length_band(instruction, counts) if counts else None
        # Words in over a quarter of the references are the task's boilerplate ("the move
        # affects"), not the row's topic: with them, another row's output would look on-topic.
        df = Counter(w for t in texts for w in content_words(t))
        common = sorted(w for w, c in df.items() if len(texts) >= 8 and c > 0.25 * len(texts))
        shares = []
        for text, inp in pairs:
            out = content_words(text) - set(common)
            if out and inp:
                shares.append(len(out & content_words(inp)) / len(out))
        # The 10th percentile, less a margin: nearly every reference scores T = 1, and an
        # output that borrows half as much of its input's vocabulary still scores about 0.5.
        level = 0.9 * _percentile(shares, 0.1) if shares else 0.0
        if shares and level >= _TOPIC_MIN_LEVEL:
            topic = TopicCalibration(input_level=round(level, 4), common=common)
        else:
            topic = None
            if kind == "text" or text_fields:
                notes.append(
                    "T not applicable: references share too few content words with their inputs"
                    if shares else "T not applicable: no inputs to calibrate against"
                )
        if length is None:
            notes.append("L not applicable: no free text to measure")
        weights = Weights(
            t=weights.t if topic is not None else 0.0,
            c=weights.c,
            l=weights.l if length is not None else 0.0,
        )
    return Verifier(
        instruction=instruction.strip(),
        kind=kind,
        labels=labels,
        json_schema=schema,
        json_text_fields=text_fields,
        text_rules=rules,
        length=length,
        topic=topic,
        weights=weights,
        n_references=len(refs),
        notes=notes,
    )
