"""The verifier: synthesized from a task's instruction and example outputs, it scores one output.

Pipeline::

    read_instruction(instruction) -> InstructionSpec        (kolm_ray.instruction)
        what the instruction states outright: a label set, JSON keys and types, word, sentence
        and bullet counts, the output language. Conservative: ordinary prose yields nothing.
    synthesize(instruction, references, inputs)            rows with reference outputs:
        the references win; the instruction fills in what they do not show.
    synthesize_from_samples(instruction, samples, inputs)  rows without: the instruction
        first; the rest from the teacher samples' consensus (each row's majority shape, then
        the majority across rows), so a wrong-shaped minority of samples fails C. A stated
        count, length band or language that nearly all consensus samples break is dropped
        with a note: there, the samples win.
    -> Verifier (a versioned, JSON-serializable pydantic model that goes into the artifact;
       ``sources`` and ``learned()`` say what was learned from where)
    -> Verifier.score(output, input, reference) -> Checks (T, C, L in 0..1 and a pass/fail)
    -> kolm_ray.kscore.score_rows aggregates rows into a K-score.

The three checks:

* **C, conformance** to the output kind: ``label`` (a small closed set), ``json`` (a JSON
  Schema) or ``text`` (structural rules: lines, markdown, preamble, punctuation, and where
  stated, sentence and bullet counts). An output language, where stated, is a C rule too.
  Breaking a rule the instruction states (sentences, bullets, language) fails the row. With a
  reference, agreement with it counts too.
* **L, length band**: a word-count band learned from the references or samples, or read from
  the instruction ("a 60-word TLDR"); 1 inside, falling off linearly outside.
* **T, topic overlap**: content-word overlap of the output with its input (and with the
  reference where given), calibrated so that references (or consensus samples) score near 1.

The text measures the checks use (words, content words, sentences, bullets, language) live in
``kolm_ray.measures``. A check that does not fit the kind gets weight 0 and a note saying why.
This module must not call a model or the network, and must stay deterministic and fast
(thousands of outputs a second on one core): it scores live traffic too.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from kolm_ray.errors import InputError
from kolm_ray.instruction import CountRange, InstructionSpec, JsonKey, Kind, language_name, read_instruction
from kolm_ray.measures import (
    bullet_count, content_words, detect_language, has_bullet, is_label_shaped, json_type, normalize_label,
    parse_json_object, sentence_count, word_count, word_tokens,
)
# Read from here by code written before the instruction reader and the measures moved out.
from kolm_ray.measures import strip_fence  # noqa: F401

VERIFIER_FORMAT_VERSION = 2
# Version 1 had no instruction reading: its files load with the new fields at their defaults.
_READABLE_FORMAT_VERSIONS = frozenset({1, 2})

# Indentation is horizontal whitespace: "^\s*" could cross lines and is retried at every line start,
# quadratic over a reply of blank lines (``^`` matches at each line anyway).
_MARKDOWN = re.compile(
    r"(^[^\S\n]{0,3}#{1,6}\s)|(^[^\S\n]*[-*+]\s)|(^[^\S\n]*\d+[.)]\s)|(\*\*[^*]+\*\*)|(^```)", re.M
)
_PREAMBLE = re.compile(
    r"^\s*(here(?:'s| is| are)\b|sure\b|certainly\b|of course\b|as an ai\b|i (?:can|will|would)\b|okay\b)",
    re.I,
)
_TERMINAL = ".!?\"')]"

# Reference agreement for free text: a faithful paraphrase shares about half of its content
# words with the reference, so F1 of 0.5 already counts as full agreement.
_REFERENCE_OVERLAP_FULL = 0.5
# Below this share of content words taken from the input, references do not "talk about" their
# input (creative text, fixed phrasing), and topic overlap says nothing.
_TOPIC_MIN_LEVEL = 0.12
# A stated rule (sentences, bullets, language) broken caps C below the 0.5 floor: the row fails.
_BROKEN_STATED_RULE_C = 0.4
# Teacher samples: a rule or key holds when this share of the consensus-shape samples shows it
# (references need all of them; samples are noisier).
_SAMPLE_QUORUM = 0.8


# ----- the verifier --------------------------------------------------------------------------


class LengthBand(BaseModel):
    """The word counts that score L = 1; outside, L falls off linearly.

    Raises:
        pydantic.ValidationError: ``hi <= 0``, ``lo < 0`` or ``lo > hi`` (no output could keep the band,
            and L would divide by zero).
    """

    model_config = ConfigDict(frozen=True)
    lo: float = Field(ge=0, description="Fewest words for full L score.")
    hi: float = Field(gt=0, description="Most words for full L score.")
    source: str = Field(description="Where the band came from: references, samples, instruction, or a mix.")

    @model_validator(mode="after")
    def _lo_within_hi(self) -> "LengthBand":
        if self.lo > self.hi:
            raise ValueError(f"length band lo {self.lo:g} is above hi {self.hi:g}")
        return self


class TextRules(BaseModel):
    model_config = ConfigDict(frozen=True)
    min_lines: int = Field(description="Fewest non-empty lines among the references.")
    max_lines: int = Field(description="Most non-empty lines among the references.")
    markdown: Literal["never", "allowed", "bullets"] = Field(
        description="never: no reference uses markdown; bullets: every reference is a bullet list."
    )
    terminal_punctuation: bool = Field(description="Every reference ends with . ! ? or a closing quote.")
    sentences: CountRange | None = Field(
        None, description="Sentence count the instruction states (widened to the references'); breaking it fails."
    )
    bullets: CountRange | None = Field(
        None, description="Bullet count the instruction states (widened to the references'); breaking it fails."
    )


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
    """Scores outputs of one task; built by ``synthesize`` or ``synthesize_from_samples``,
    stored as JSON in the artifact."""

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
    language: str | None = Field(
        None, description="Output language (ISO 639-1) the instruction states; a C rule for text and JSON free text."
    )
    weights: Weights
    pass_threshold: float = Field(0.75, description="A row passes at k >= this, with no applicable check < 0.5.")
    n_references: int
    n_samples: int = Field(0, description="Teacher samples read when learned without references (0: from references).")
    sources: dict[str, str] = Field(
        default_factory=dict,
        description="Where each learned part came from (kind, labels, json_schema, text_rules, length, sentences, "
        "bullets, language, topic -> instruction, references, samples, or a '+' mix).",
    )
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
        """Load a verifier; a version 1 file loads with the newer fields at their defaults.

        Raises:
            InputError: ``text`` is not a verifier of a known format version.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"verifier is not valid JSON ({e.msg}, line {e.lineno})", path=source) from None
        version = data.get("format_version") if isinstance(data, dict) else None
        if version not in _READABLE_FORMAT_VERSIONS:
            raise InputError(
                f"verifier format_version {version!r} is not supported "
                f"(expected one of {sorted(_READABLE_FORMAT_VERSIONS)})",
                path=source,
            )
        try:
            return cls.model_validate({**data, "format_version": VERIFIER_FORMAT_VERSION})
        except Exception as e:  # pydantic.ValidationError: report, do not guess
            raise InputError(f"not a valid verifier: {e}", path=source) from None

    # ----- what was learned ---------------------------------------------------------------
    def learned(self) -> list[str]:
        """What the verifier learned and from where, one line each, e.g. ``kind label
        (instruction)``; ``kolm sample`` and ``kolm compile`` print these."""

        def where(part: str) -> str:
            return f" ({self.sources[part]})" if self.sources.get(part) else ""

        lines = [f"kind {self.kind}{where('kind')}"]
        if self.labels:
            lines.append(f"labels {', '.join(self.labels)}{where('labels')}")
        if self.json_schema is not None:
            required = set(self.json_schema.get("required", []))
            keys = [
                f"{k}{'' if k in required else '?'}: {_describe_property(p)}"
                for k, p in self.json_schema.get("properties", {}).items()
            ]
            lines.append(f"json keys {', '.join(keys) or 'any'}{where('json_schema')}")
        if self.text_rules is not None:
            r = self.text_rules
            lines.append(
                f"text {r.min_lines}-{r.max_lines} lines, markdown {r.markdown}"
                + (", ends with punctuation" if r.terminal_punctuation else "") + where("text_rules")
            )
            if r.sentences is not None:
                lines.append(f"sentences {r.sentences}{where('sentences')}")
            if r.bullets is not None:
                lines.append(f"bullets {r.bullets}{where('bullets')}")
        if self.length is not None:
            lines.append(f"length {self.length.lo:.0f}-{self.length.hi:.0f} words ({self.length.source})")
        if self.language is not None:
            lines.append(f"language {self.language}{where('language')}")
        if self.topic is not None:
            lines.append(f"topic overlap with the input, full at {self.topic.input_level:g}{where('topic')}")
        return lines

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
            if r.sentences is not None:
                rules.append(f"Write {_count_phrase(r.sentences, 'sentence')}.")
            if r.bullets is not None:
                rules.append(f"Use {_count_phrase(r.bullets, 'bullet')}, one per line.")
        if self.length is not None and self.kind != "label":
            rules.append(f"Length: {int(self.length.lo)} to {int(self.length.hi)} words.")
        if self.language is not None:
            name = language_name(self.language)
            what = "the free-text fields" if self.kind == "json" else "the answer"
            rules.append(f"Write {what} in {name}.")
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
            if self.language is not None and free and not self._in_language(free):
                c = min(c, _BROKEN_STATED_RULE_C)
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
        said = set(word_tokens(norm))
        hits = [lab for lab in self._label_set if lab in norm and set(word_tokens(lab)) <= said]
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
        shape: list[bool] = []
        stated: list[bool] = []  # rules the instruction states: breaking one fails the row
        if r is not None:
            lines = [ln for ln in output.splitlines() if ln.strip()]
            shape += [r.min_lines <= len(lines) <= r.max_lines, not _PREAMBLE.match(output)]
            if r.markdown == "never":
                shape.append(not _MARKDOWN.search(output))
            elif r.markdown == "bullets":
                shape.append(has_bullet(output))
            if r.terminal_punctuation:
                shape.append(output.rstrip()[-1:] in _TERMINAL)
            if r.sentences is not None:
                stated.append(r.sentences.contains(sentence_count(output)))
            if r.bullets is not None:
                stated.append(r.bullets.contains(bullet_count(output)))
        if self.language is not None:
            stated.append(self._in_language(output))
        rules = shape + stated
        if not rules:
            return 1.0
        c = sum(rules) / len(rules)
        return c if all(stated) else min(c, _BROKEN_STATED_RULE_C)

    def _in_language(self, text: str) -> bool:
        detected = detect_language(text)
        return detected is None or detected == self.language

    def _length(self, text: str) -> float:
        band = self.length
        assert band is not None
        wc = word_count(text)
        if wc == 0:
            return 0.0
        if wc < band.lo:  # here lo > wc > 0
            return wc / band.lo
        if wc > band.hi:
            # A band built without validation (model_construct) may have hi <= 0: no output keeps it.
            return max(0.0, 1.0 - (wc - band.hi) / band.hi) if band.hi > 0 else 0.0
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


def _describe_property(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return "one of " + "|".join(str(v) for v in prop["enum"])
    t = prop.get("type", "any")
    return "|".join(t) if isinstance(t, list) else str(t)


def _count_phrase(band: CountRange, unit: str) -> str:
    if band.lo is not None and band.lo == band.hi:
        return f"exactly {band.lo} {unit}{'' if band.lo == 1 else 's'}"
    if band.lo is not None and band.hi is not None:
        return f"between {band.lo} and {band.hi} {unit}s"
    if band.lo is not None:
        return f"at least {band.lo} {unit}{'' if band.lo == 1 else 's'}"
    return f"at most {band.hi} {unit}{'' if band.hi == 1 else 's'}"


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
    """Linear interpolation between the closest ranks (numpy's default); 0.0 for no values.

    Not ``statistics.quantiles(method="inclusive")``, the same definition: it takes only cut
    points i/n (no q=0 or 1, and on Python 3.11 not one value), and it computes them exactly
    where this multiplies by the float q, so learned bands would move. Sample rules learn lines
    at q = (1 - 0.8) / 2 = 0.09999999999999998: over 40,000 random line-count cases, 812 got
    another min_lines or max_lines (16 counts: 2.999999999999999 -> floor 2 here, 3.0 -> 3 there),
    and 9,224 length bands moved in the last digits (183.47999999999993 vs 183.48).
    """
    s = sorted(values)
    if not s:
        return 0.0
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)



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



def _sample_shape(text: str) -> Kind:
    if parse_json_object(text) is not None:
        return "json"
    return "label" if is_label_shaped(text) else "text"


def _display_label(text: str) -> str:
    return text.strip().strip("\"'`.!").strip()


def _is_enum(n_values: int, n_distinct: int) -> bool:
    return n_values >= 4 and n_distinct <= max(2, min(12, n_values // 3))


def _schema_of_references(objs: list[dict]) -> tuple[dict, list[str]]:
    n = len(objs)
    keys = Counter(k for o in objs for k in o)
    required = sorted(k for k, c in keys.items() if c == n)
    props: dict[str, Any] = {}
    text_fields: list[str] = []
    for key in sorted(keys):
        values = [o[key] for o in objs if key in o]
        types = sorted({json_type(v) for v in values})
        if set(types) == {"integer", "number"}:
            types = ["number"]
        prop: dict[str, Any] = {"type": types[0] if len(types) == 1 else types}
        if types == ["string"]:
            distinct = sorted(set(values))
            if _is_enum(len(values), len(distinct)):
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


def _schema_of_consensus(objs: list[tuple[int, dict]]) -> tuple[dict, list[str]]:
    """Keys, types and values most samples agree on; ``objs`` are (row, object) pairs."""
    n = len(objs)
    keys = Counter(k for _, o in objs for k in o)
    kept = sorted(k for k, c in keys.items() if c > 0.5 * n)
    props: dict[str, Any] = {}
    text_fields: list[str] = []
    for key in kept:
        values = [(row, o[key]) for row, o in objs if key in o]
        types = Counter(json_type(v) for _, v in values)
        if "integer" in types and "number" in types:
            types["number"] += types.pop("integer")
        main = min(types, key=lambda t: (-types[t], t))
        allowed = [main] + (["null"] if main != "null" and types.get("null", 0) >= 0.2 * len(values) else [])
        prop: dict[str, Any] = {"type": main if len(allowed) == 1 else allowed}
        if main == "string":
            strings = [(row, v) for row, v in values if isinstance(v, str)]
            per_row: dict[int, Counter] = {}
            for row, v in strings:
                per_row.setdefault(row, Counter())[v] += 1
            # One value per row (its majority), so k samples of one row do not fake a closed set.
            majority = sorted({min(c, key=lambda v: (-c[v], v)) for c in per_row.values()})
            if _is_enum(len(per_row), len(majority)):
                prop["enum"] = majority
            elif sum(word_count(v) for _, v in strings) / max(1, len(strings)) >= 3:
                text_fields.append(key)
        props[key] = prop
    schema = {
        "type": "object",
        "properties": props,
        "required": [k for k in kept if keys[k] >= _SAMPLE_QUORUM * n],
        "additionalProperties": sum(set(o) <= set(kept) for _, o in objs) < _SAMPLE_QUORUM * n,
    }
    return schema, text_fields


def _with_stated_keys(
    schema: dict, keys: list[JsonKey], values: list[dict], *, stated_first: bool, notes: list[str]
) -> dict:
    """``schema`` with the instruction's keys: added where the examples lack them; types and
    values overriding the examples' when ``stated_first`` (samples), else only filling gaps."""
    props = {k: dict(p) for k, p in schema.get("properties", {}).items()}
    required = list(schema.get("required", []))
    for key in keys:
        prop = props.get(key.name)
        if prop is None:
            props[key.name] = {"type": key.type} if key.type else {}
            if key.enum:
                props[key.name]["enum"] = list(key.enum)
            if stated_first or not values:
                required.append(key.name)
            else:
                notes.append(f"key {key.name!r} named by the instruction is in no reference: optional")
            continue
        if key.type and prop.get("type") != key.type and not (key.type == "integer" and prop.get("type") == "number"):
            if stated_first:
                prop["type"] = key.type
                if key.type != "string":
                    prop.pop("enum", None)
            else:
                notes.append(f"key {key.name!r}: the instruction says {key.type}, the references say "
                             f"{prop.get('type')}: the references win")
        if key.enum:
            seen = [o[key.name] for o in values if isinstance(o.get(key.name), str)]
            if stated_first:
                prop["enum"] = list(key.enum)
            elif all(normalize_label(v) in {normalize_label(e) for e in key.enum} for v in seen):
                prop["enum"] = list(key.enum) + sorted(set(seen) - set(key.enum))
        if stated_first and key.name not in required:
            required.append(key.name)
    return {**schema, "properties": props, "required": required}


def _text_rules_of(texts: Sequence[str], quorum: float) -> TextRules:
    """Structural rules that a ``quorum`` share of ``texts`` keeps (1.0: every one of them)."""
    n = len(texts)
    line_counts = [len([ln for ln in t.splitlines() if ln.strip()]) for t in texts]
    tail = (1 - quorum) / 2
    plain = sum(not _MARKDOWN.search(t) for t in texts) / n
    bullets = sum(has_bullet(t) for t in texts) / n
    punctuated = sum(t.rstrip()[-1:] in _TERMINAL for t in texts) / n
    return TextRules(
        min_lines=math.floor(_percentile(line_counts, tail)),
        max_lines=math.ceil(_percentile(line_counts, 1 - tail)),
        markdown="bullets" if bullets >= quorum else ("never" if plain >= quorum else "allowed"),
        terminal_punctuation=punctuated >= quorum,
    )


def _length_band(
    words: CountRange | None, counts: list[int], learned_from: str, *, stated_first: bool
) -> LengthBand | None:
    learned = None
    if counts:
        learned = (max(1.0, _percentile(counts, 0.05) * 0.8), max(1.0, _percentile(counts, 0.95) * 1.2))
    stated = None
    if words is not None and words.lo is not None and words.lo == words.hi:  # a target: "a 60-word TLDR"
        stated = (0.7 * words.lo, 1.2 * words.hi)
    elif words is not None and words.lo is not None and words.hi is not None:
        stated = (float(words.lo), float(words.hi))
    elif words is not None and words.hi is not None:  # an upper limit: "under 100 words"
        stated = (learned[0] if learned and not stated_first else max(1.0, 0.3 * words.hi), float(words.hi))
    elif words is not None and words.lo is not None:  # a lower limit: "at least 50 words"
        stated = (float(words.lo), 3.0 * words.lo)
    if stated and stated[1] <= 0:
        stated = None  # "0 words" is no band: L would divide by zero
    if stated and learned and not stated_first:
        lo, hi = min(stated[0], learned[0]), max(stated[1], learned[1])
        return LengthBand(lo=lo, hi=hi, source=f"instruction+{learned_from}")
    if stated:
        return LengthBand(lo=stated[0], hi=stated[1], source="instruction")
    if learned:
        return LengthBand(lo=learned[0], hi=learned[1], source=learned_from)
    return None


def _topic_calibration(
    texts: Sequence[str], inputs: Sequence[str | None], groups: Sequence[int]
) -> TopicCalibration | None:
    """T's scale: ``groups`` (a row per text) so that k samples of one row count once as boilerplate."""
    # Words in over a quarter of the rows are the task's boilerplate ("the move affects"), not
    # the row's topic: with them, another row's output would look on-topic.
    per_group: dict[int, set[str]] = {}
    for text, g in zip(texts, groups):
        per_group.setdefault(g, set()).update(content_words(text))
    df = Counter(w for words in per_group.values() for w in words)
    n_groups = len(per_group)
    common = sorted(w for w, c in df.items() if n_groups >= 8 and c > 0.25 * n_groups)
    shares = []
    for text, inp in zip(texts, inputs):
        out = content_words(text) - set(common)
        if out and inp:
            shares.append(len(out & content_words(inp)) / len(out))
    # The 10th percentile, less a margin: nearly every reference scores T = 1, and an output
    # that borrows half as much of its input's vocabulary still scores about 0.5.
    level = 0.9 * _percentile(shares, 0.1) if shares else 0.0
    if shares and level >= _TOPIC_MIN_LEVEL:
        return TopicCalibration(input_level=round(level, 4), common=common)
    return None


@dataclass
class _Draft:
    """A verifier being learned: each stage fills its parts and says where they came from."""

    kind: Kind
    sources: dict[str, str]
    notes: list[str]
    labels: list[str] | None = None
    schema: dict | None = None
    text_fields: list[str] | None = None
    rules: TextRules | None = None
    length: LengthBand | None = None
    topic: TopicCalibration | None = None
    language: str | None = None
    free_texts: list[str] = field(default_factory=list)
    free_inputs: list[str | None] = field(default_factory=list)
    free_groups: list[int] = field(default_factory=list)


def _stated_text_rules(
    d: _Draft, spec: InstructionSpec, texts: Sequence[str], learned_from: str, *, stated_first: bool
) -> None:
    """Add the instruction's sentence and bullet counts to ``d.rules``.

    The examples win unless ``stated_first`` (samples); even then, a count that nearly every
    sample breaks (``_samples_break``) is dropped with a note: the samples win for it.
    """
    assert d.rules is not None
    rules = d.rules
    if spec.sentences is not None:
        band, src = spec.sentences, "instruction"
        broken = sum(not band.contains(sentence_count(t)) for t in texts)
        if stated_first and _samples_break(broken, len(texts)):
            d.notes.append(f"sentences: the instruction says {spec.sentences}, {broken} of {len(texts)} "
                           f"{learned_from} break it: they win")
        else:
            if not stated_first and texts:
                wider = band.covering([sentence_count(t) for t in texts])
                if wider != band:
                    band, src = wider, f"instruction+{learned_from}"
                    d.notes.append(f"sentences: the instruction says {spec.sentences}, the {learned_from} show {wider}")
            rules = rules.model_copy(update={"sentences": band})
            d.sources["sentences"] = src
    if spec.bullets is not None or spec.bullet_list:
        # Stated first, the samples break a bullet count by their count, a bare bullet list by having none.
        broken = sum(
            not spec.bullets.contains(bullet_count(t)) if spec.bullets is not None else not has_bullet(t)
            for t in texts
        )
        if not stated_first and texts and rules.markdown != "bullets":
            d.notes.append(f"the instruction asks for bullets, the {learned_from} are not bullet lists: they win")
        elif stated_first and _samples_break(broken, len(texts)):
            asked = f"{spec.bullets} bullets" if spec.bullets is not None else "a bullet list"
            d.notes.append(f"bullets: the instruction asks for {asked}, {broken} of {len(texts)} "
                           f"{learned_from} break it: they win")
        else:
            update: dict[str, Any] = {"markdown": "bullets"}
            if spec.bullets is not None:
                band, src = spec.bullets, "instruction"
                if not stated_first and texts:
                    wider = band.covering([bullet_count(t) for t in texts])
                    if wider != band:
                        band, src = wider, f"instruction+{learned_from}"
                update["bullets"] = band
                update["min_lines"] = min(rules.min_lines, band.lo or rules.min_lines)
                update["max_lines"] = max(rules.max_lines, band.hi or rules.max_lines)
                d.sources["bullets"] = src
            rules = rules.model_copy(update=update)
    d.rules = rules


def _samples_break(broken: int, n: int) -> bool:
    """Whether the teacher's consensus breaks a rule the instruction states: ``broken`` of its
    ``n`` samples fail it. Then the samples win for that rule, as references do: a hard rule
    that every sample fails would leave the compile nothing to distill."""
    return n > 0 and broken >= _SAMPLE_QUORUM * n


def _free_text_checks(d: _Draft, spec: InstructionSpec, learned_from: str, *, stated_first: bool) -> None:
    """L, T and the language rule over the free text (a text output, or JSON's text fields)."""
    texts = d.free_texts
    has_free_text = d.kind == "text" or bool(d.text_fields)
    if not has_free_text:
        d.notes.append("T and L not applicable: the JSON has no free-text field")
    counts = [word_count(t) for t in texts if t]
    if has_free_text and (counts or stated_first):
        d.length = _length_band(spec.words, counts, learned_from, stated_first=stated_first)
        band = d.length
        if stated_first and band is not None and band.source == "instruction" and spec.words is not None:
            broken = sum(not band.lo <= c <= band.hi for c in counts)
            if _samples_break(broken, len(counts)):
                d.notes.append(f"length: the instruction says {spec.words} words, {broken} of {len(counts)} "
                               f"{learned_from} fall outside {band.lo:.0f}-{band.hi:.0f}: they win")
                d.length = _length_band(None, counts, learned_from, stated_first=True)
    if d.length is not None:
        d.sources["length"] = d.length.source
    d.topic = _topic_calibration(texts, d.free_inputs, d.free_groups) if texts else None
    if d.topic is not None:
        d.sources["topic"] = learned_from
    elif d.kind == "text" or d.text_fields:
        d.notes.append(
            f"T not applicable: {learned_from} share too few content words with their inputs"
            if any(d.free_inputs) else "T not applicable: no inputs to calibrate against"
        )
    if d.length is None:
        d.notes.append("L not applicable: no free text to measure")
    if spec.language is not None and has_free_text:
        said = [detect_language(t) for t in texts if t]
        detected = [x for x in said if x]
        # Stated first, a sample breaks the language as the scorer sees it: detected, and another one.
        others = sum(x is not None and x != spec.language for x in said)
        if stated_first and _samples_break(others, len(said)):
            d.notes.append(f"the instruction asks for language {spec.language}, {others} of {len(said)} "
                           f"{learned_from} are not in it: they win")
        elif not stated_first and detected and sum(x != spec.language for x in detected) > len(detected) / 2:
            d.notes.append(f"the instruction asks for language {spec.language}, the {learned_from} are not: they win")
        else:
            d.language = spec.language
            d.sources["language"] = "instruction"


def _finish(d: _Draft, instruction: str, *, n_references: int, n_samples: int) -> Verifier:
    if d.kind == "label":
        d.notes.append("T not applicable: topic overlap of a one-word label says nothing")
        d.notes.append("L not applicable: a label's length is fixed by the label set")
        weights = Weights(t=0.0, c=1.0, l=0.0)
    else:
        base = Weights(t=0.2, c=0.6, l=0.2) if d.kind == "json" else Weights(t=0.4, c=0.3, l=0.3)
        weights = Weights(
            t=base.t if d.topic is not None else 0.0,
            c=base.c,
            l=base.l if d.length is not None else 0.0,
        )
    return Verifier(
        instruction=instruction.strip(),
        kind=d.kind,
        labels=d.labels,
        json_schema=d.schema,
        json_text_fields=d.text_fields,
        text_rules=d.rules,
        length=d.length,
        topic=d.topic,
        language=d.language,
        weights=weights,
        n_references=n_references,
        n_samples=n_samples,
        sources=d.sources,
        notes=d.notes,
    )


def _with_stated_labels(stated: list[str] | None, learned: list[str], learned_from: str) -> tuple[list[str], str]:
    """The instruction's labels (spelled as the examples spell them), then the examples' others."""
    if not stated:
        return learned, learned_from
    spelled = {normalize_label(x): x for x in learned}
    named = {normalize_label(s) for s in stated}
    labels = [spelled.get(normalize_label(s), s) for s in stated]
    labels += sorted(x for norm, x in spelled.items() if norm not in named)
    return labels, (f"instruction+{learned_from}" if learned else "instruction")


def _json_free_text_of(obj: dict, text_fields: Sequence[str]) -> str:
    return " ".join(str(obj.get(k, "")) for k in text_fields if isinstance(obj.get(k), str))


def synthesize(instruction: str, references: Sequence[str], inputs: Sequence[str] | None = None) -> Verifier:
    """Build a verifier for ``instruction`` from reference outputs (and their inputs, for T).

    ``references`` are the rows' reference outputs. The instruction is read too
    (``read_instruction``): the references win where the two conflict (kind, labels seen,
    key types, a wider length or sentence band, another language); the instruction fills in
    what they do not show (a label or key it names that no reference uses, a stated word,
    sentence or bullet count, the output language). ``inputs``, aligned with ``references``,
    calibrate topic overlap. Rows without references: ``synthesize_from_samples``.

    Raises:
        InputError: no non-empty reference to learn from, or a blank instruction.
    """
    if not instruction.strip():
        raise InputError("the task instruction is empty")
    pairs = [(r, (inputs[i] if inputs else None)) for i, r in enumerate(references) if isinstance(r, str) and r.strip()]
    if not pairs:
        raise InputError("no reference outputs to learn the verifier from: give rows with \"output\"")
    spec = read_instruction(instruction)
    refs = [p[0] for p in pairs]
    kind, kind_source, conflict = _kind_with_references(spec, refs)
    also = " and the instruction" if kind_source != "references" else ""
    d = _Draft(kind=kind, sources={"kind": kind_source}, notes=[f"kind {kind!r} inferred from {len(refs)} references{also}"])
    if conflict:
        d.notes.append(conflict)
    if kind == "label":
        seen: dict[str, str] = {}
        for r in refs:
            seen.setdefault(normalize_label(r), _display_label(r))
        d.labels, d.sources["labels"] = _with_stated_labels(spec.labels, sorted(seen.values()), "references")
    elif kind == "json":
        parsed = [(o, inp) for o, inp in ((parse_json_object(r), inp) for r, inp in pairs) if o is not None]
        objs = [o for o, _ in parsed]
        schema, d.text_fields = _schema_of_references(objs)
        d.schema = _with_stated_keys(schema, spec.json_keys, objs, stated_first=False, notes=d.notes)
        d.sources["json_schema"] = "instruction+references" if spec.json_keys else "references"
        d.free_texts = [_json_free_text_of(o, d.text_fields) for o in objs]
        d.free_inputs = [inp for _, inp in parsed]
    else:
        d.rules = _text_rules_of(refs, quorum=1.0)
        d.sources["text_rules"] = "references"
        _stated_text_rules(d, spec, refs, "references", stated_first=False)
        d.free_texts, d.free_inputs = refs, [p[1] for p in pairs]
    if kind != "label":
        d.free_groups = list(range(len(d.free_texts)))
        _free_text_checks(d, spec, "references", stated_first=False)
    return _finish(d, instruction, n_references=len(refs), n_samples=0)


def _kind_with_references(spec: InstructionSpec, refs: list[str]) -> tuple[Kind, str, str | None]:
    learned = infer_kind(refs)
    stated = spec.kind
    if stated is None:
        return learned, "references", None
    if stated == learned:
        return learned, "instruction+references", None
    if stated == "label" and learned == "text" and all(is_label_shaped(r) for r in refs):
        return "label", "instruction+references", None  # too few references to see the set
    return learned, "references", f"the instruction suggests {stated} output, the references are {learned}: they win"


def synthesize_from_samples(
    instruction: str, samples: Sequence[Sequence[str | None]], inputs: Sequence[str | None]
) -> Verifier:
    """Build a verifier for ``instruction`` from the teacher's samples, for rows without references.

    ``samples[i]`` holds row i's k sample texts (None: a failed call); ``inputs[i]`` is row
    i's input. The instruction comes first: a label set, JSON keys and types, a word, sentence
    or bullet count, a language it states are the rules, except that a count, length band or
    language broken by at least ``_SAMPLE_QUORUM`` of the consensus-shape samples is learned
    from the samples as if unstated, with a note (a rule every sample fails would leave the
    compile nothing to distill). The rest is learned by consensus:
    each sample's shape (a bare label, a JSON object, or text), each row's majority shape,
    then the majority across rows is the kind (the instruction's kind where it states one);
    labels, schema, text rules, length band and topic scale come only from samples of that
    shape, so a minority shape (a chatty sentence in a label task, prose in a JSON task)
    fails C. A label recurring across rows is valid even where wrong for its row: choosing
    the right one is the selection's job.

    Raises:
        InputError: a blank instruction, ``samples`` and ``inputs`` of different lengths, or
            no sample text at all.
    """
    if not instruction.strip():
        raise InputError("the task instruction is empty")
    if len(samples) != len(inputs):
        raise InputError(f"{len(samples)} rows of samples but {len(inputs)} inputs: give one input per row")
    rows = [[s for s in row if isinstance(s, str) and s.strip()] for row in samples]
    n_samples = sum(len(r) for r in rows)
    if not n_samples:
        raise InputError("no teacher sample to learn the verifier from: every call failed or came back empty")
    spec = read_instruction(instruction)
    shaped = [[(s, _sample_shape(s)) for s in row] for row in rows]
    row_shapes = [_majority([sh for _, sh in row]) for row in shaped]

    d = _kind_of_samples(spec, shaped, row_shapes)
    text_shapes = {"text"}
    if d.kind == "label" and not _labels_of_samples(d, spec, shaped, row_shapes):
        # Bare answers that do not recur across rows (names, numbers): free text, not a set.
        d.kind, d.sources["kind"] = "text", "samples"
        d.notes.append("no closed label set among the rows' bare answers: text")
        text_shapes = {"text", "label"}
    if d.kind == "json":
        _json_of_samples(d, spec, shaped, inputs)
    elif d.kind == "text":
        _text_of_samples(d, spec, shaped, inputs, text_shapes)
    used = sum(sh == d.kind or (d.kind == "text" and sh in text_shapes) for row in shaped for _, sh in row)
    d.notes.append(f"learned from {used} of {n_samples} samples: those of the consensus shape")
    if d.kind != "label":
        _free_text_checks(d, spec, "samples", stated_first=True)
    return _finish(d, instruction, n_references=0, n_samples=n_samples)


_Shaped = list[list[tuple[str, Kind]]]  # per row, each sample text with its shape


def _kind_of_samples(spec: InstructionSpec, shaped: _Shaped, row_shapes: list[Kind | None]) -> _Draft:
    """The instruction's kind, else the majority across rows of each row's majority shape."""
    if spec.kind is not None:
        note = f"kind {spec.kind!r} stated by the instruction"
        return _Draft(kind=spec.kind, sources={"kind": "instruction"}, notes=[note])
    votes = Counter(s for s in row_shapes if s is not None)
    # A tie across rows falls back to every sample's shape, then to text (the least strict).
    kind = _majority(list(votes.elements())) or _majority([sh for row in shaped for _, sh in row]) or "text"
    note = f"kind {kind!r}: the majority shape of {votes[kind]} of {sum(votes.values())} rows' samples"
    return _Draft(kind=kind, sources={"kind": "samples"}, notes=[note])


def _labels_of_samples(d: _Draft, spec: InstructionSpec, shaped: _Shaped, row_shapes: list[Kind | None]) -> bool:
    """Fill ``d.labels``: the instruction's set, else the rows' recurring bare answers.

    Returns False where the bare answers form no closed set.
    """
    if spec.labels:
        d.labels, d.sources["labels"] = list(spec.labels), "instruction"
        return True
    learned, label_rows = _labels_of_consensus(shaped, row_shapes)
    if not learned or not (spec.label_only or len(learned) <= max(2, min(32, label_rows // 2))):
        return False
    d.labels, d.sources["labels"] = learned, "samples"
    return True


def _json_of_samples(d: _Draft, spec: InstructionSpec, shaped: _Shaped, inputs: Sequence[str | None]) -> None:
    """Fill ``d.schema`` from the JSON samples' consensus, the instruction's keys and types first."""
    objs = [(i, o) for i, row in enumerate(shaped) for s, sh in row if sh == "json"
            for o in [parse_json_object(s)] if o is not None]
    if objs:
        schema, d.text_fields = _schema_of_consensus(objs)
        d.sources["json_schema"] = "instruction+samples" if spec.json_keys else "samples"
    else:
        schema, d.text_fields = {"type": "object", "properties": {}, "required": []}, []
        d.sources["json_schema"] = "instruction"
        d.notes.append("no sample is a JSON object: the schema is the instruction's alone")
    d.schema = _with_stated_keys(schema, spec.json_keys, [o for _, o in objs], stated_first=True, notes=d.notes)
    d.free_texts = [_json_free_text_of(o, d.text_fields) for _, o in objs]
    d.free_inputs = [inputs[i] for i, _ in objs]
    d.free_groups = [i for i, _ in objs]


def _text_of_samples(
    d: _Draft, spec: InstructionSpec, shaped: _Shaped, inputs: Sequence[str | None], text_shapes: set[str]
) -> None:
    """Fill ``d.rules`` from the text samples' consensus, the instruction's counts first."""
    picked = [(i, s) for i, row in enumerate(shaped) for s, sh in row if sh in text_shapes]
    if not picked:  # the instruction says text, the samples are all bare answers
        picked = [(i, s) for i, row in enumerate(shaped) for s, sh in row if sh != "json"]
    texts = [s for _, s in picked]
    if texts:
        d.rules = _text_rules_of(texts, quorum=_SAMPLE_QUORUM)
        d.sources["text_rules"] = "samples"
    else:
        d.rules = TextRules(min_lines=1, max_lines=1000, markdown="allowed", terminal_punctuation=False)
        d.sources["text_rules"] = "instruction"
        d.notes.append("no sample is text: the text rules are the instruction's alone")
    _stated_text_rules(d, spec, texts, "samples", stated_first=True)
    d.free_texts = texts
    d.free_inputs = [inputs[i] for i, _ in picked]
    d.free_groups = [i for i, _ in picked]


def _majority(shapes: Sequence[Kind]) -> Kind | None:
    """The most common shape, or None on a tie or when there is none."""
    counts = Counter(shapes).most_common()
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return None
    return counts[0][0]


def _labels_of_consensus(shaped: _Shaped, row_shapes: list[Kind | None]) -> tuple[list[str], int]:
    """Labels: a row's strict-majority bare answer, or a bare answer recurring across rows.

    Returns the labels (sorted) and how many rows gave bare answers.
    """
    support: Counter[str] = Counter()
    spellings: dict[str, Counter[str]] = {}
    tops: set[str] = set()
    label_rows = 0
    for row, row_shape in zip(shaped, row_shapes):
        bare = [s for s, sh in row if sh == "label"]
        if not bare:
            continue
        label_rows += 1
        counts = Counter(normalize_label(s) for s in bare)
        for s in bare:
            spellings.setdefault(normalize_label(s), Counter())[_display_label(s)] += 1
        support.update(counts.keys())
        best, n = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if row_shape == "label" and n > len(bare) / 2:
            tops.add(best)
    recurring = {v for v, c in support.items() if c >= max(2, math.ceil(0.1 * label_rows))}
    labels = sorted(min(spellings[v], key=lambda x: (-spellings[v][x], x)) for v in tops | recurring)
    return labels, label_rows
