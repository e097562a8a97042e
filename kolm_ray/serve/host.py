"""The one generation stack: a base model in memory with LoRA adapters loaded onto it by name,
answering ``Generation`` requests. Serving and the compile's eval both generate through it, so
the holdout outputs an artifact's K was scored on are the answers ``kolm serve`` gives: the same
prompt (``train.data.prompt_text``), decoding (greedy unless a temperature is set), stop rules
(eos or pad token, stop strings, surrounding whitespace stripped) and token limit
(``Decoding``, written to the artifact's manifest by the compile and read back by serving).

Greedy requests are generated one at a time: in a padded batch a row's logits depend on its
batch-mates (padding, batch size, PEFT's per-adapter sub-batches), which can flip a near-tie,
so a batch of one is the only shape that gives the same tokens whoever else is asking. Sampled
requests (temperature > 0) share batches, requests for different adapters included.

The model is used by one thread at a time (``_lock``, first come first served). A stream gives
its turn up between decoding steps whenever a batch is waiting, so a batch never waits for a
long stream to end, only for the stream's current step; one stream runs at a time (two paused
generations on the same PEFT model would see each other's adapter hooks), and loading or
unloading an adapter waits for the running stream to end. Generation halts at a stop string
(transformers' ``StopStringCriteria``, each hit confirmed on the row's answer text), so a plain
request no longer decodes past it to ``max_new_tokens``.

This is the model half of serving, free of Ray: the Serve deployment (``deployments.py``) and
the eval's Ray workers (``train/eval.py``) wrap it, and the serving benchmark calls it
in-process. Must not verify artifacts (the caller hands it adapter folders it already verified)
nor write receipts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kolm_ray.errors import InputError

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
# A temperature under this decodes greedily. Sampling there already picks the top token whenever
# the top two logits differ by more than 0.01 (odds e^10 to 1), and dividing the logits by a
# temperature near zero overflows them (below ~1e-38 in float32, far sooner in float16) into a
# distribution of NaNs that torch refuses to sample: a request's valid temperature (OpenAI
# allows any in [0, 2]) must not be a server error.
GREEDY_BELOW = 1e-3


def greedy(g: Generation) -> bool:
    """Whether ``g`` decodes greedily: no temperature, 0, or one under ``GREEDY_BELOW``."""
    return not g.temperature or g.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class Generation:
    """What a request asks of the model. ``temperature`` 0 (or None) decodes greedily."""

    adapter: str
    system: str
    input: str
    max_new_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()


class Decoding(BaseModel):
    """How a Specialist decodes: what its holdout was generated with, written to the artifact
    manifest's ``generation`` entry, and what serving answers with unless a request overrides it."""

    # A newer manifest's fields are ignored, not fatal: an older kolm can still serve the artifact.
    model_config = ConfigDict(frozen=True, extra="ignore")
    max_new_tokens: int = Field(ge=1, description="Most tokens in an answer (a request's max_tokens overrides it).")
    temperature: float | None = Field(None, ge=0, description="None or 0 decodes greedily, as the eval does.")
    stop: tuple[str, ...] = Field((), description="Strings that end an answer: it is cut before the first one.")

    @classmethod
    def from_manifest(cls, generation: Any) -> Decoding:
        """The manifest's ``generation`` entry; fields an older artifact lacks take their defaults.

        Raises:
            InputError: the entry is missing or invalid (no positive ``max_new_tokens``).
        """
        if not isinstance(generation, dict):
            raise InputError("the artifact manifest has no 'generation' entry with max_new_tokens")
        try:
            return cls.model_validate(generation)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise InputError(f"the artifact manifest's generation.{where} is invalid: {err['msg']}") from None

    def manifest(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def request(self, adapter: str, system: str, user_input: str) -> Generation:
        """A request for ``user_input`` decoded with these settings."""
        return Generation(adapter=adapter, system=system, input=user_input, max_new_tokens=self.max_new_tokens,
                          temperature=self.temperature, stop=self.stop)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"


class AdapterHost:
    """A base model with LoRA adapters by name; thread-safe (one generation or load at a time).

    ``batch_greedy`` trades the parity with the eval for throughput: greedy requests then share
    padded batches, and a row's tokens may depend on its batch-mates (see the module docstring).
    """

    def __init__(self, base_path: str, device: str | None = None, dtype: str | None = None, *,
                 batch_greedy: bool = False) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from kolm_ray.train.base import split_source

        transformers.utils.logging.disable_progress_bar()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        base_path, revision = split_source(base_path)  # a hub base as ID@COMMIT: that commit, not the branch
        self.tok = AutoTokenizer.from_pretrained(base_path, revision=revision)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"
        # On CPU, eager attention: SDPA's CPU kernel sums a decode step's attention in an order that
        # depends on torch's thread count, so an eval task and a serving replica with different
        # cores would drift apart (~1e-6 in the logits on the tiny base; eager: bitwise equal).
        attn = "eager" if self.device.type == "cpu" else None
        self.model: Any = AutoModelForCausalLM.from_pretrained(
            base_path, revision=revision, dtype=torch_dtype, attn_implementation=attn).to(self.device).eval()
        self._peft = False
        self._lock = _FairLock()  # the model: one generation step or batch, or one load, at a time
        self._stream_slot = threading.Lock()  # held by the one stream generating, for its whole length
        self._stop_finders: dict[tuple[str, ...], Any] = {}  # stop strings -> StopStringCriteria (built once)
        self.batch_greedy = batch_greedy
        self.adapters: dict[str, str] = {}  # name -> folder it was loaded from

    # ----- adapters ---------------------------------------------------------------------------

    def load_adapter(self, name: str, folder: str | Path) -> None:
        """Load a PEFT adapter folder under ``name`` (a no-op when already loaded from there)."""
        from peft import PeftModel

        with self._stream_slot, self._lock:  # never under a paused stream: it would see its model change
            if self.adapters.get(name) == str(folder):
                return
            if name in self.adapters:
                self.model.delete_adapter(name)
            if not self._peft:
                self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name).eval()
                self._peft = True
            else:
                self.model.load_adapter(str(folder), adapter_name=name)
                self.model.eval()
            self.adapters[name] = str(folder)

    def unload_adapter(self, name: str) -> None:
        with self._stream_slot, self._lock:
            if name in self.adapters:
                if len(self.adapters) > 1:
                    self.model.delete_adapter(name)
                else:  # PEFT keeps at least one adapter: go back to the plain base
                    self.model = self.model.unload()
                    self._peft = False
                del self.adapters[name]

    # ----- generation -------------------------------------------------------------------------

    def _encode(self, gens: Sequence[Generation]) -> Any:
        from kolm_ray.train.data import prompt_text

        prompts = [prompt_text(self.tok, g.system, g.input) for g in gens]
        return self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)

    def _sampling(self, g: Generation) -> dict[str, Any]:
        if greedy(g):
            return {"do_sample": False}
        return {"do_sample": True, "temperature": g.temperature, "top_p": g.top_p or 1.0}

    def _adapter_names(self, gens: Sequence[Generation]) -> list[str]:
        names = [g.adapter for g in gens]
        unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in self.adapters})
        if unknown:
            raise KeyError(f"adapter(s) not loaded: {', '.join(unknown)}")
        return names

    def generate(self, gens: Sequence[Generation], *, strict: bool = True) -> list[Completion | None]:
        """One batch of requests, answered in their order. Greedy requests are generated one at a
        time (unless ``batch_greedy``), so each gets the tokens it would get alone; sampled ones
        share a batch per sampling setting, whatever their adapters.

        Which adapters are loaded is checked under the lock, so a concurrent unload cannot fail
        the batch: with ``strict=False`` a request for an adapter not loaded gets None and the
        rest are served; with ``strict`` it raises KeyError.
        """
        out: list[Completion | None] = [None] * len(gens)
        with self._lock:
            known = [i for i, g in enumerate(gens) if g.adapter == BASE_ADAPTER or g.adapter in self.adapters]
            if strict and len(known) < len(gens):
                self._adapter_names(gens)  # raises, naming the missing adapters
            groups: dict[tuple, list[int]] = {}
            for i in known:
                g = gens[i]
                alone = greedy(g) and not self.batch_greedy
                sampling = (0.0, 1.0) if greedy(g) else (g.temperature, g.top_p or 1.0)
                groups.setdefault(("alone", i) if alone else sampling, []).append(i)
            for idx in groups.values():
                for i, c in zip(idx, self._generate_group([gens[i] for i in idx])):
                    out[i] = c
        return out

    def _generate_group(self, gens: Sequence[Generation]) -> list[Completion]:
        import torch
        from transformers import StoppingCriteriaList

        names = self._adapter_names(gens)
        enc = self._encode(gens)
        kwargs: dict[str, Any] = {}
        if self._peft:
            kwargs["adapter_names"] = names
        stop = self._stop_criteria(gens, enc["input_ids"].shape[1])
        if stop:
            kwargs["stopping_criteria"] = StoppingCriteriaList(stop)
        with torch.no_grad():
            ids = self.model.generate(
                **enc, max_new_tokens=max(g.max_new_tokens for g in gens), pad_token_id=self.tok.pad_token_id,
                eos_token_id=self.tok.eos_token_id, **self._sampling(gens[0]), **kwargs,
            )
        prompt_len = enc["input_ids"].shape[1]
        return [self._completion(row[prompt_len:].tolist(), g, int(mask.sum()))
                for row, g, mask in zip(ids, gens, enc["attention_mask"])]

    def _stop_criteria(self, gens: Sequence[Generation], prompt_len: int) -> list[Any]:
        """The criterion that halts a row at its stop strings: empty when no row has any."""
        stops = tuple(sorted({s for g in gens for s in g.stop if s}))
        if not stops:
            return []
        finder = self._stop_finders.get(stops)
        if finder is None:
            from transformers import StopStringCriteria

            # What generate(stop_strings=...) builds, but once per set of stop strings: building
            # one walks the tokenizer's whole vocabulary (milliseconds on the tiny base, far more
            # on a 150k-token one), too slow for every request.
            if len(self._stop_finders) >= 64:
                self._stop_finders.pop(next(iter(self._stop_finders)))
            finder = self._stop_finders[stops] = StopStringCriteria(self.tok, list(stops))
        return [_StopAt(finder, self, prompt_len, [g.stop for g in gens])]

    def _answer(self, new: list[int]) -> tuple[list[int], bool]:
        """``new`` up to its first eos or pad token; whether there was one."""
        for end in (self.tok.eos_token_id, self.tok.pad_token_id):
            if end is not None and end in new:
                return new[: new.index(end)], True
        return new, False

    def _completion(self, new: list[int], g: Generation, prompt_tokens: int) -> Completion:
        """One answer from the tokens generated for it: the one place that decides its text, its
        ``completion_tokens`` and why it ended, for plain and streamed requests alike (a stream
        used to count the eos token and the tokens generated past a stop string before the halt
        was seen, so its usage differed from the same request's without streaming).

        The answer ends at the first eos or pad token (not counted) or at ``max_new_tokens``; a
        stop string cuts the text before it, and the tokens counted are those up to the one that
        completed it (a stream halts there; a plain request's later tokens are not the answer).
        """
        new, ended = self._answer(new)
        finish = "stop" if ended else "length"
        if len(new) > g.max_new_tokens:
            new, finish = new[: g.max_new_tokens], "length"
        text, stopped = _apply_stop(self.tok.decode(new, skip_special_tokens=True), g.stop)
        if stopped:
            new, finish = new[: self._tokens_to_stop(new, g.stop)], "stop"
        return Completion(text=text.strip(), prompt_tokens=prompt_tokens, completion_tokens=len(new),
                          finish_reason=finish)

    def _tokens_to_stop(self, new: list[int], stops: Sequence[str]) -> int:
        """The fewest leading tokens of ``new`` whose text holds a stop string (binary search: a
        longer prefix's text extends a shorter one's)."""
        lo, hi = 1, len(new)
        while lo < hi:
            mid = (lo + hi) // 2
            if _apply_stop(self.tok.decode(new[:mid], skip_special_tokens=True), stops)[1]:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def stream(self, g: Generation) -> Iterator[str | Completion]:
        """Text deltas for one request as the model produces them; the last item is a Completion.
        Closing the iterator early (a client gone) halts the generation.

        The generation holds the model only one decoding step at a time while anyone else waits
        for it: a batch that arrives mid-stream is generated between two of the stream's steps."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        self._adapter_names([g])  # an unknown adapter fails here, before anything starts
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        produced: dict[str, Any] = {}
        halt = threading.Event()

        def run() -> None:
            import torch

            try:
                with self._stream_slot:
                    self._lock.acquire()
                    try:
                        names = self._adapter_names([g])  # again: it may have been unloaded meanwhile
                        enc = produced["enc"] = self._encode([g])
                        kwargs: dict[str, Any] = {"adapter_names": names} if self._peft else {}
                        criteria = [_Step(halt, self._lock), *self._stop_criteria([g], enc["input_ids"].shape[1])]
                        with torch.no_grad():
                            produced["ids"] = self.model.generate(
                                **enc, max_new_tokens=g.max_new_tokens, pad_token_id=self.tok.pad_token_id,
                                eos_token_id=self.tok.eos_token_id, streamer=streamer, **self._sampling(g),
                                stopping_criteria=StoppingCriteriaList(criteria), **kwargs,
                            )
                    finally:
                        self._lock.release()
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer below
                produced["error"] = e
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        text, sent = "", 0  # the answer so far (cut at a stop string), and how much of it went out
        try:
            for piece in streamer:
                if not piece:
                    continue
                text, stopped = _apply_stop(text + piece, g.stop)
                # Hold back an ending that may be the start of a stop string: once sent, it could
                # not be taken back when the stop string completes in the next piece.
                ready = len(text) if stopped else len(text) - _stop_prefix_len(text, g.stop)
                if ready > sent:
                    yield text[sent:ready]
                    sent = ready
                if stopped:
                    break  # the generation halts on the same stop string by itself
        finally:
            halt.set()
            worker.join()
        if "error" in produced:
            raise produced["error"]
        if len(text) > sent:
            yield text[sent:]  # it ended on what only looked like the start of a stop string
        enc = produced["enc"]
        done = self._completion(produced["ids"][0, enc["input_ids"].shape[1]:].tolist(), g,
                                int(enc["attention_mask"].sum()))
        # Token count and finish as a plain request reports them; the text is what was streamed
        # (the same text: the streamer decodes the same tokens).
        yield Completion(text=text.strip(), prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                         finish_reason=done.finish_reason)


class _FairLock:
    """A lock taken in the order it was asked for (``threading.Lock`` lets a thread that releases
    it take it straight back), with ``yield_turn``: the holder steps aside for whoever waits."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next = 0  # the next ticket handed out
        self._serving = 0  # the ticket that holds the lock

    def acquire(self) -> None:
        with self._cond:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cond.wait()

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    def waiting(self) -> int:
        """How many threads wait for the lock (besides its holder)."""
        with self._cond:
            return max(0, self._next - self._serving - 1)

    def yield_turn(self) -> None:
        """Held: let everyone already waiting have the lock first, then hold it again."""
        with self._cond:
            if self._next - self._serving <= 1:
                return
            ticket = self._next
            self._next += 1
            self._serving += 1
            self._cond.notify_all()
            while ticket != self._serving:
                self._cond.wait()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Step:
    """A stream's stopping criterion, called once per decoding step: ends the generation once
    ``halt`` is set, and otherwise lets a waiting batch have the model before the next step."""

    def __init__(self, halt: threading.Event, lock: _FairLock) -> None:
        self.halt, self.lock = halt, lock

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        if not self.halt.is_set():
            self.lock.yield_turn()
        return torch.full((input_ids.shape[0],), self.halt.is_set(), dtype=torch.bool, device=input_ids.device)


class _StopAt:
    """Ends a row once its answer holds one of its stop strings. ``finder`` (transformers'
    ``StopStringCriteria`` for every stop string of the batch) spots a candidate in a few tensor
    operations per step; a candidate is confirmed on the row's own answer text, with the rule
    ``_completion`` cuts by (its own stop strings, after the prompt: ``StopStringCriteria`` also
    matches one that straddles the prompt's end), so halting early never changes an answer."""

    def __init__(self, finder: Any, host: AdapterHost, prompt_len: int, stops: list[tuple[str, ...]]) -> None:
        self.finder, self.host, self.prompt_len, self.stops = finder, host, prompt_len, stops

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        hits = self.finder(input_ids, scores)
        for row in hits.nonzero().flatten().tolist():
            new, _ = self.host._answer(input_ids[row, self.prompt_len:].tolist())
            text = self.host.tok.decode(new, skip_special_tokens=True)
            if not _apply_stop(text, self.stops[row])[1]:
                hits[row] = False
        return hits


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest ending of ``text`` that begins some stop string (0 for none)."""
    return max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)


def _apply_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the first stop string; whether one was found."""
    cuts = [text.index(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)
