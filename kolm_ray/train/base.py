"""Base models: resolving ``--base`` and building a tiny one offline.

``resolve_base`` maps a short name (``qwen-2.5-3b-instruct``, ``phi-3-mini``) to its Hugging
Face hub id, accepts a hub id (``org/name``, optionally ``org/name@REVISION``: a branch, tag or
commit) or a local directory, and refuses anything else at the edge. It makes no network call.

``pin_base`` (the compile's preflight) resolves a hub base's branch or tag to its commit, once:
with ``HfApi().model_info(id, revision=...)``, or from the Hugging Face cache's ``refs/`` when
offline (``HF_HUB_OFFLINE``) or when the hub cannot be reached. The commit is what the manifest
records and what the fit, the eval and serving load, as ``ID@COMMIT`` (``BaseRef.source``,
``split_source``), passed to ``from_pretrained(ID, revision=COMMIT)``: a branch moved later does
not change what an artifact loads. A local folder has no revision: its content hash is its identity.

``build_tiny_base`` writes a randomly initialized causal LM of a real architecture (Qwen2) with
a byte-level BPE tokenizer trained on the spot (on text shipped with the package) and a ChatML
chat template, so tests, examples and a newcomer without a GPU or hub access can run a whole
compile on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from kolm_ray.errors import InputError, ServiceUnreachable

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
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")  # a branch, tag or commit, as the hub names them
COMMIT = re.compile(r"^[0-9a-f]{40}$")
HUB_TIMEOUT_S = 10.0  # per request to the hub: a reachable hub answers in well under a second


@dataclass(frozen=True)
class BaseRef:
    """A resolved base model: what ``from_pretrained`` takes, and how to pin it."""

    name: str  # what the user wrote
    path: str  # hub id or local directory
    local: bool
    revision: str | None = None  # hub only: the branch, tag or commit; a commit once pinned (``pin_base``)
    requested: str | None = None  # hub only, once pinned: the revision that was asked for (e.g. ``main``)

    @property
    def pinned(self) -> bool:
        """A hub base whose revision is a commit (a local folder is pinned by its content)."""
        return not self.local and self.revision is not None and bool(COMMIT.match(self.revision))

    @property
    def source(self) -> str:
        """What the fit, the eval and serving load: the folder, the hub id, or ``ID@COMMIT``
        for a pinned hub base (``split_source`` takes it apart for ``from_pretrained``)."""
        return f"{self.path}@{self.revision}" if self.pinned else self.path

    def fingerprint(self) -> dict[str, str]:
        """Hub id and revision, or a content hash of a local directory's config and weights."""
        if not self.local:
            return {"id": self.path, "revision": self.revision or "main"}
        return {"id": self.name, "sha256": directory_digest(Path(self.path))}

    def manifest_entry(self) -> dict[str, str]:
        """The manifest's ``base``: the name as given, the fingerprint, and for a pinned hub
        base the revision that was asked for (the branch ``revision``'s commit was on)."""
        entry = {"name": self.name, **self.fingerprint()}
        if self.requested and self.requested != self.revision:
            entry["requested"] = self.requested
        return entry


def split_source(source: str) -> tuple[str, str | None]:
    """``ID@COMMIT`` -> (``ID``, ``COMMIT``); anything else (a folder, a bare hub id) -> (it, None).
    What ``from_pretrained(path, revision=revision)`` takes for a ``BaseRef.source``."""
    head, at, rev = source.rpartition("@")
    if at and COMMIT.match(rev) and _HUB_ID.match(head) and not Path(source).exists():
        return head, rev
    return source, None


def resolve_base(name: str) -> BaseRef:
    """No network call: a hub base's revision is pinned later (``pin_base``).

    Raises: InputError for a name that is not a known short name, hub id or model folder, or a
    revision (``NAME@REVISION``) given to a local folder or malformed.
    """
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise InputError("not a model folder: no config.json", path=str(p))
        return BaseRef(name=name, path=str(p.resolve()), local=True)
    head, at, rev = name.rpartition("@")
    if at and head:
        if "@" in head:
            raise InputError(f"invalid base {name!r}: one '@' at most, before the revision, as in "
                             "Qwen/Qwen2.5-3B-Instruct@main")
        if not _REVISION.match(rev) or ".." in rev:
            raise InputError(f"invalid revision {rev!r} in base {name!r}: give a branch, tag or commit of the hub "
                             "repository, as in Qwen/Qwen2.5-3B-Instruct@main")
        ref = resolve_base(head)
        if ref.local:
            raise InputError(f"base {name!r}: a local folder has no revision (its content hash pins it): "
                             f"drop @{rev}, or give a hub id")
        if COMMIT.match(rev.lower()):
            rev = rev.lower()  # the hub names commits in lowercase hex: an uppercase one is the same commit
        return replace(ref, name=name, revision=rev)
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


# ----- pinning a hub base to a commit ---------------------------------------------------------


def hub_cache() -> str:
    """The Hugging Face cache as a fresh process would find it now (the library reads it at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    on = {"1", "ON", "YES", "TRUE"}
    return (constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in on
            or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in on)


def who(ref: BaseRef) -> str:
    """A base as messages name it: what the user wrote, and the hub id or folder it stands for."""
    return f"{ref.name} ({ref.path})" if ref.name != ref.path else ref.path


def hub_unreachable(ref: BaseRef, why: str, revision: str | None = None) -> ServiceUnreachable:
    """The error for a hub base that is neither cached nor reachable (``revision``: the one asked
    for, default ``ref.revision``; named, with the download hint, when it is not ``main``)."""
    rev = revision or ref.revision
    at = f" at revision {rev!r}" if rev and rev != "main" else ""
    flag = f" --revision {rev}" if rev and rev != "main" else ""
    return ServiceUnreachable(
        f"cannot reach the Hugging Face hub for {who(ref)}: {why}, and the cache at {hub_cache()} does not have "
        f"it{at}. Download it first (`hf download {ref.path}{flag} --local-dir DIR`) and pass --base DIR, or set "
        "HF_HOME to a cache that has it")


def hub_no_revision(ref: BaseRef, wanted: str) -> InputError:
    """The error for a revision the hub does not have (RevisionNotFoundError)."""
    return InputError(f"base model {who(ref)}: the Hugging Face hub has no revision {wanted!r} of it: give a "
                      "branch, tag or commit the repository has")


def hub_gated(ref: BaseRef) -> ServiceUnreachable:
    """The error for a hub base whose terms this account has not accepted."""
    return ServiceUnreachable(f"{who(ref)} is gated on the Hugging Face hub: accept its terms at "
                              f"https://huggingface.co/{ref.path} and set HF_TOKEN (or `hf auth login`)")


def cached_commit(repo_id: str, revision: str) -> str | None:
    """The commit ``revision`` (a branch, tag or commit) of ``repo_id`` is at in the Hugging Face
    cache (its ``refs/`` file, or the snapshot of that commit); None when the cache has none."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, revision=revision, local_files_only=True, cache_dir=hub_cache())
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError), or an unreadable cache
        return None
    commit = Path(folder).name  # the cache keeps a snapshot under its commit
    return commit if COMMIT.match(commit) else None


def pin_base(ref: BaseRef, *, timeout_s: float = HUB_TIMEOUT_S) -> BaseRef:
    """``ref`` with its hub revision (``main`` when none was given) resolved to a commit, once;
    a commit is kept as it is (offline, once the cache is seen to hold its snapshot) and a local
    folder returned unchanged. Online, the hub says where
    the revision is now (``model_info(id, revision=...).sha``); offline (``HF_HUB_OFFLINE``), or
    when the hub cannot be reached, the cache's ``refs/`` say. A hub that answers without a
    commit (a stand-in) leaves ``ref`` as it is: ``ref.pinned`` says so, and the preflight
    refuses it once its own checks of the repository have run.

    Raises:
        InputError: the hub has no such revision or repository, or, offline by request
            (HF_HUB_OFFLINE), the cache that holds the repository lacks the revision (a branch, a
            tag or a commit); the message names the base and the revision.
        ServiceUnreachable: the hub cannot be reached (or is offline) and the cache lacks it (an
            outage is never reported as a bad revision), or the base is gated.
    """
    if ref.local:
        return ref
    if ref.pinned:  # a commit is used as it is; offline, only when the cache has its snapshot
        if hub_offline() and cached_commit(ref.path, ref.revision) is None:
            _refuse_uncached(ref, ref.revision, "HF_HUB_OFFLINE is set")
        return ref
    wanted = ref.revision or "main"
    if hub_offline():
        commit = cached_commit(ref.path, wanted)
        if commit is None:
            _refuse_uncached(ref, wanted, "HF_HUB_OFFLINE is set")
    else:
        commit = _hub_commit(ref, wanted, timeout_s)
    return replace(ref, revision=commit, requested=wanted) if commit else ref


def _hub_commit(ref: BaseRef, wanted: str, timeout_s: float) -> str | None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        sha = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).model_info(
            ref.path, revision=wanted, timeout=timeout_s).sha
    except RevisionNotFoundError:
        raise hub_no_revision(ref, wanted) from None
    except GatedRepoError:
        raise hub_gated(ref) from None
    except RepositoryNotFoundError:
        raise InputError(f"unknown base model {ref.name!r}: the Hugging Face hub has no model {ref.path} (a private "
                         "one needs HF_TOKEN), and there is no such local folder") from None
    except Exception as e:  # noqa: BLE001 - DNS, refused, timed out: the cache may say
        sha = cached_commit(ref.path, wanted)
        if sha is None:
            # Not offline by request: an outage, not a bad revision (the hub was never asked).
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
            raise hub_unreachable(ref, f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__,
                                  wanted) from None
    return sha if sha and COMMIT.match(sha) else None


def _refuse_uncached(ref: BaseRef, wanted: str, why: str) -> None:
    """Offline by request (HF_HUB_OFFLINE) and ``wanted`` not cached. Raises: InputError when the
    cache holds the repository but not ``wanted``; else ServiceUnreachable (``hub_unreachable``)."""
    from huggingface_hub.file_download import repo_folder_name

    held = Path(hub_cache()) / repo_folder_name(repo_id=ref.path, repo_type="model")
    if (held / "refs").is_dir() or (held / "snapshots").is_dir():
        known = sorted(p.name for p in (held / "refs").glob("*") if p.is_file())
        raise InputError(f"base model {who(ref)}: revision {wanted!r} is not in the Hugging Face cache at "
                         f"{hub_cache()} ({why}; cached refs: {', '.join(known) or 'none'}): give a revision the "
                         f"cache has, or download it (`hf download {ref.path} --revision {wanted}`)")
    raise hub_unreachable(ref, why, wanted)


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
