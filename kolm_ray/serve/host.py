"""One base model in memory with many LoRA adapters loaded onto it, generating for a batch of
requests that may each name a different adapter (PEFT's mixed-adapter batches).

This is the model half of serving, free of Ray: the Serve deployment (``deployments.py``) wraps
it, and the serving benchmark calls it in-process as its baseline. Must not verify artifacts
(the caller hands it adapter folders it already verified) nor write receipts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


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


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"


class AdapterHost:
    """A base model with LoRA adapters by name; thread-safe (one generation or load at a time)."""

    def __init__(self, base_path: str, device: str | None = None, dtype: str | None = None) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.utils.logging.disable_progress_bar()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.tok = AutoTokenizer.from_pretrained(base_path)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"
        self.model: Any = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype).to(self.device).eval()
        self._peft = False
        self._lock = threading.Lock()
        self.adapters: dict[str, str] = {}  # name -> folder it was loaded from

    # ----- adapters ---------------------------------------------------------------------------

    def load_adapter(self, name: str, folder: str | Path) -> None:
        """Load a PEFT adapter folder under ``name`` (a no-op when already loaded from there)."""
        from peft import PeftModel

        with self._lock:
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
        with self._lock:
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
        if not g.temperature:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": g.temperature, "top_p": g.top_p or 1.0}

    def _adapter_names(self, gens: Sequence[Generation]) -> list[str]:
        names = [g.adapter for g in gens]
        unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in self.adapters})
        if unknown:
            raise KeyError(f"adapter(s) not loaded: {', '.join(unknown)}")
        return names

    def generate(self, gens: Sequence[Generation], *, strict: bool = True) -> list[Completion | None]:
        """One batch; requests with different adapters share it, grouped by sampling settings.

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
                groups.setdefault((gens[i].temperature or 0.0, gens[i].top_p or 1.0), []).append(i)
            for idx in groups.values():
                for i, c in zip(idx, self._generate_group([gens[i] for i in idx])):
                    out[i] = c
        return out

    def _generate_group(self, gens: Sequence[Generation]) -> list[Completion]:
        import torch

        names = self._adapter_names(gens)
        enc = self._encode(gens)
        kwargs: dict[str, Any] = {}
        if self._peft:
            kwargs["adapter_names"] = names
        with torch.no_grad():
            ids = self.model.generate(
                **enc, max_new_tokens=max(g.max_new_tokens for g in gens), pad_token_id=self.tok.pad_token_id,
                eos_token_id=self.tok.eos_token_id, **self._sampling(gens[0]), **kwargs,
            )
        prompt_len = enc["input_ids"].shape[1]
        results = []
        for row, g, mask in zip(ids, gens, enc["attention_mask"]):
            new = row[prompt_len:].tolist()
            finish = "length"
            if self.tok.eos_token_id in new:
                new = new[: new.index(self.tok.eos_token_id)]
                finish = "stop"
            if self.tok.pad_token_id in new:
                new = new[: new.index(self.tok.pad_token_id)]
                finish = "stop"
            if len(new) > g.max_new_tokens:
                new, finish = new[: g.max_new_tokens], "length"
            text = self.tok.decode(new, skip_special_tokens=True)
            text, stopped = _apply_stop(text, g.stop)
            results.append(Completion(text=text.strip(), prompt_tokens=int(mask.sum()), completion_tokens=len(new),
                                      finish_reason="stop" if stopped else finish))
        return results

    def stream(self, g: Generation) -> Iterator[str | Completion]:
        """Text deltas for one request as the model produces them; the last item is a Completion.
        Closing the iterator early (a client gone, a stop string) halts the generation."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        names = self._adapter_names([g])
        enc = self._encode([g])
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        kwargs: dict[str, Any] = {"adapter_names": names} if self._peft else {}
        produced: dict[str, Any] = {}
        halt = threading.Event()

        def run() -> None:
            import torch

            with self._lock, torch.no_grad():
                try:
                    produced["ids"] = self.model.generate(
                        **enc, max_new_tokens=g.max_new_tokens, pad_token_id=self.tok.pad_token_id,
                        eos_token_id=self.tok.eos_token_id, streamer=streamer, **self._sampling(g), **kwargs,
                        stopping_criteria=StoppingCriteriaList([_Halt(halt)]),
                    )
                except BaseException as e:  # noqa: BLE001 - re-raised in the consumer below
                    produced["error"] = e
                    streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        text = ""
        try:
            for piece in streamer:
                if not piece:
                    continue
                cut, stopped = _apply_stop(text + piece, g.stop)
                if cut[len(text):]:
                    yield cut[len(text):]
                text = cut
                if stopped:
                    break
        finally:
            halt.set()
            worker.join()
        if "error" in produced:
            raise produced["error"]
        n_new = int(produced["ids"].shape[1] - enc["input_ids"].shape[1]) if "ids" in produced else 0
        yield Completion(text=text.strip(), prompt_tokens=int(enc["attention_mask"].sum()), completion_tokens=n_new,
                         finish_reason="length" if n_new >= g.max_new_tokens else "stop")


class _Halt:
    """A stopping criterion that ends generation once its event is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _apply_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the first stop string; whether one was found."""
    cuts = [text.index(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)
