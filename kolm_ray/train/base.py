"""Base models: resolving ``--base`` and building a tiny one offline.

``resolve_base`` maps a short name (``qwen-2.5-3b-instruct``, ``phi-3-mini``) to its Hugging
Face hub id, accepts a hub id (``org/name``) or a local directory, and refuses anything else at
the edge. Weights are loaded later, by the fit, with ``from_pretrained`` of what this returns.

``build_tiny_base`` writes a randomly initialized causal LM of a real architecture (Qwen2) with
a byte-level BPE tokenizer trained on the spot (on text shipped with the package) and a ChatML
chat template, so tests, examples and a newcomer without a GPU or hub access can run a whole
compile on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from kolm_ray.errors import InputError

SHORT_NAMES: dict[str, str] = {
    "qwen-2.5-0.5b-instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen-2.5-1.5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen-2.5-3b-instruct": "Qwen/Qwen2.5-3B-Instruct",
    "qwen-2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "phi-3-mini-128k": "microsoft/Phi-3-mini-128k-instruct",
    "llama-3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class BaseRef:
    """A resolved base model: what ``from_pretrained`` takes, and how to pin it."""

    name: str  # what the user wrote
    path: str  # hub id or local directory
    local: bool

    def fingerprint(self) -> dict[str, str]:
        """Hub id and revision, or a content hash of a local directory's config and weights."""
        if not self.local:
            return {"id": self.path, "revision": "main"}
        return {"id": self.name, "sha256": directory_digest(Path(self.path))}


def resolve_base(name: str) -> BaseRef:
    """Raises: InputError for a name that is not a known short name, hub id or model folder."""
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise InputError("not a model folder: no config.json", path=str(p))
        return BaseRef(name=name, path=str(p.resolve()), local=True)
    key = name.lower()
    if key in SHORT_NAMES:
        return BaseRef(name=name, path=SHORT_NAMES[key], local=False)
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        return BaseRef(name=name, path=name, local=False)
    # A name written as a path: say what is (not) there, not only what a name may be.
    there = ("is a file, not a model folder; " if p.exists() else
             "no such folder; " if name.startswith((".", "/", "~")) else "")
    raise InputError(
        f"unknown base model {name!r}: {there}give a short name ({', '.join(sorted(SHORT_NAMES))}), "
        "a Hugging Face hub id like Qwen/Qwen2.5-3B-Instruct, or a local model folder "
        "(`kolm base tiny DIR` writes one)"
    )


def directory_digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(x for x in root.rglob("*") if x.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# The text the tiny base's tokenizer is trained on, one string a line (gzip): the inputs and
# outputs of 200 rows each of three synthetic tasks (article TL;DRs, message routing, lead
# extraction; seed 101) and one line of kolm's own instruction wording. Shipped as package data
# so the tokenizer, and every tiny base built from it, is the same everywhere; the tests check
# it still matches the generators it was made from (kolm_ray/testing/corpus.py).
TOKENIZER_CORPUS = "tiny_tokenizer_corpus.txt.gz"


def tokenizer_corpus() -> list[str]:
    """The strings the tiny base's tokenizer is trained on, in order."""
    import gzip
    from importlib.resources import files

    text = gzip.decompress(files(__package__).joinpath(TOKENIZER_CORPUS).read_bytes()).decode("utf-8")
    return text.split("\n")[:-1]  # every line ends with a newline; no string holds one


def build_tiny_base(
    out: str | Path,
    *,
    hidden_size: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 256,
    vocab_size: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a random-init Qwen2 causal LM with an offline-trained tokenizer to ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(fast), hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate_size, max_position_embeddings=2048,
        # 0.1, not the usual 0.02: a random tiny model with tiny embeddings cannot reach confident
        # logits through the final norm, and a LoRA fit on it could not show learning.
        initializer_range=0.1, tie_word_embeddings=True, eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=fast.pad_token_id, bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one small shard: a progress bar is noise
    model.save_pretrained(out)
    (out / "kolm_tiny.json").write_text(json.dumps({"kind": "tiny random-init base", "seed": seed}))
    return out
