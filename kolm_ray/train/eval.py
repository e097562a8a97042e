"""The eval: a model (the student: base + adapter; or the untouched base) generates an output
for every holdout row, and the verifier scores them into a K-score.

Generation is batched, greedy, and spread over Ray Data actors (one model copy per actor;
``workers`` of them, one GPU each where the cluster has GPUs). Must not train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from kolm_ray.kscore import KScore, score_rows
from kolm_ray.verifier import Verifier


def max_new_tokens_for(verifier: Verifier) -> int:
    """Room for the longest acceptable answer: ~2 tokens a word past the length band's top."""
    if verifier.kind == "label":
        return 16
    if verifier.length is not None:
        return int(verifier.length.hi * 2.5) + 16
    return 512


class Generator:
    """Loads a base (and optionally a LoRA adapter) once; generates greedily for batches of prompts."""

    def __init__(self, base_path: str, adapter_dir: str | None, system: str, max_new_tokens: int, use_gpu: bool = False):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.utils.logging.disable_progress_bar()  # keep the CLI's stage lines clean
        self.device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tok = AutoTokenizer.from_pretrained(base_path)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
        if adapter_dir:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir)
        self.model = model.to(self.device).eval()
        self.system = system
        self.max_new_tokens = max_new_tokens

    def generate(self, inputs: Sequence[str]) -> list[str]:
        import torch

        from kolm_ray.train.data import prompt_text

        prompts = [prompt_text(self.tok, self.system, x) for x in inputs]
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with torch.no_grad():
            out = self.model.generate(
                **enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id,
            )
        new = out[:, enc["input_ids"].shape[1]:]
        return [t.strip() for t in self.tok.batch_decode(new, skip_special_tokens=True)]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"id": list(batch["id"]), "output": self.generate(list(batch["input"]))}


def _generate_all(base_path: str, adapter_dir: str | None, system: str, inputs: list[str], max_new_tokens: int,
                  batch_size: int, use_gpu: bool) -> list[str]:
    gen = Generator(base_path, adapter_dir, system, max_new_tokens, use_gpu)
    return [o for i in range(0, len(inputs), batch_size) for o in gen.generate(inputs[i:i + batch_size])]


@dataclass(frozen=True)
class EvalResult:
    score: KScore
    outputs: list[str]


def generate_outputs(
    base_path: str, adapter_dir: str | None, system: str, ids: Sequence[str], inputs: Sequence[str],
    max_new_tokens: int, *, workers: int = 1, batch_size: int = 8, use_gpu: bool = False,
) -> list[str]:
    """Outputs aligned with ``ids``. On one CPU worker the generation runs as one Ray task holding
    the node's free cores (Ray sizes torch's threads by a task's CPUs; a driver such as a
    ``ray job submit`` entrypoint gets one thread); otherwise a Ray Data actor pool of ``workers``.
    """
    import ray

    if workers == 1 and not use_gpu or len(ids) <= batch_size:
        cpus = max(1, int(ray.available_resources().get("CPU", 1)))
        task = ray.remote(_generate_all).options(num_cpus=cpus, num_gpus=1 if use_gpu else 0)
        return ray.get(task.remote(base_path, adapter_dir, system, list(inputs), max_new_tokens, batch_size, use_gpu))
    ds = ray.data.from_items([{"id": i, "input": x} for i, x in zip(ids, inputs)]).map_batches(
        Generator,
        fn_constructor_kwargs={"base_path": base_path, "adapter_dir": adapter_dir, "system": system,
                               "max_new_tokens": max_new_tokens, "use_gpu": use_gpu},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )
    got = {r["id"]: r["output"] for r in ds.take_all()}
    return [got[i] for i in ids]


def evaluate(
    verifier: Verifier, base_path: str, adapter_dir: str | None, system: str,
    ids: Sequence[str], inputs: Sequence[str], references: Sequence[str], **kw: Any,
) -> EvalResult:
    outputs = generate_outputs(base_path, adapter_dir, system, ids, inputs, max_new_tokens_for(verifier), **kw)
    return EvalResult(score=score_rows(verifier, list(ids), outputs, list(inputs), list(references)), outputs=outputs)
