"""Turning (input, output) pairs into training batches for a causal LM.

The prompt is the base's chat template over ``[system: task, user: input]`` (a plain
instruction format where the tokenizer has none); the loss covers the response tokens only
(prompt tokens are labeled -100). Batches are length-bucketed: examples of similar length share
a batch, so little compute goes to padding. The same prompt is used at eval and serving time
(``prompt_text``). Must not load model weights.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

IGNORE = -100
_PLAIN_FORMAT = "### Task\n{system}\n\n### Input\n{input}\n\n### Response\n"


def prompt_text(tokenizer: Any, system: str, user_input: str) -> str:
    """The text a Specialist sees before its answer, in training, eval and serving alike."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": user_input}],
            tokenize=False, add_generation_prompt=True,
        )
    return _PLAIN_FORMAT.format(system=system, input=user_input)


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_response_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def build_examples(
    tokenizer: Any, system: str, pairs: Sequence[tuple[str, str]], max_length: int
) -> list[Example]:
    """Tokenize pairs; a prompt too long for ``max_length`` is cut from the left so the
    response (what the loss is on) survives."""
    eos = tokenizer.eos_token or ""
    out = []
    for user_input, response in pairs:
        p = tokenizer(prompt_text(tokenizer, system, user_input), add_special_tokens=False).input_ids
        r = tokenizer(response + eos, add_special_tokens=False).input_ids[:max_length]
        p = p[-(max_length - len(r)):] if len(p) + len(r) > max_length else p
        if len(r) == 0:
            continue
        out.append(Example(input_ids=p + r, labels=[IGNORE] * len(p) + r))
    return out


def bucket_batches(lengths: Sequence[int], batch_size: int, seed: int, window: int = 64) -> list[list[int]]:
    """Indices grouped into batches of similar length, in a seeded random order.

    Shuffle, cut into windows of ``batch_size * window``, sort each window by length, split
    into batches, shuffle the batches: random enough for SGD, padded little.
    """
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    span = batch_size * window
    batches: list[list[int]] = []
    for start in range(0, len(idx), span):
        chunk = sorted(idx[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collator(tokenizer: Any) -> Callable[[Sequence[Example]], dict[str, Any]]:
    """What turns a batch of examples into right-padded tensors (``input_ids`` padded with the
    tokenizer's pad token, ``attention_mask``, ``labels`` padded with -100): transformers'
    ``DataCollatorForSeq2Seq``. Right-padded whatever side ``tokenizer`` pads on for generation
    (a causal LM's positions count from the left); ``tokenizer`` itself is left as it is."""
    import copy

    from transformers import DataCollatorForSeq2Seq

    if tokenizer.padding_side != "right":
        tokenizer = copy.copy(tokenizer)
        tokenizer.padding_side = "right"
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE, return_tensors="pt")

    def collate(examples: Sequence[Example]) -> dict[str, Any]:
        batch = pad([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    return collate
