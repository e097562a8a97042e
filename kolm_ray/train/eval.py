"""The eval: a model (the student: base + adapter; or the untouched base) generates an output
for every holdout row, and the verifier scores them into a K-score.

Generation goes through serving's own stack, ``serve.host.AdapterHost`` (the adapter loaded by
name, as a serving replica loads it), with the ``Decoding`` the compile writes into the
artifact's manifest and serving reads back: so the outputs scored here are the answers
``kolm serve`` gives for the same inputs. The rows are spread over Ray (one task holding the
node's free cores, or a Ray Data actor pool of ``workers``, one host each, one GPU each where
the cluster has GPUs). Must not train, nor decode any other way than the host does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from kolm_ray.kscore import KScore, score_rows
from kolm_ray.serve.host import BASE_ADAPTER, AdapterHost, Decoding
from kolm_ray.verifier import Verifier

# Part of a cached eval's key: a change to how outputs are generated must not reuse old outputs.
# 2: generated through serve.host.AdapterHost, the serving path (1 had its own generator).
EVAL_PATH_VERSION = 2
EVAL_ADAPTER = "student"  # the adapter's name inside the eval's host (names do not change the numbers)


def max_new_tokens_for(verifier: Verifier) -> int:
    """Room for the longest acceptable answer: ~2 tokens a word past the length band's top."""
    if verifier.kind == "label":
        return 16
    if verifier.length is not None:
        return int(verifier.length.hi * 2.5) + 16
    return 512


def decoding_for(verifier: Verifier) -> Decoding:
    """How a Specialist for this verifier decodes: greedy, no stop strings, the verifier's limit."""
    return Decoding(max_new_tokens=max_new_tokens_for(verifier))


class HoldoutWorker:
    """One ``AdapterHost`` with the adapter under test loaded (or none: the base alone); answers
    batches of inputs as a serving replica would. Also a Ray Data batch UDF."""

    def __init__(self, base_path: str, adapter_dir: str | None, system: str, decoding: Decoding,
                 use_gpu: bool = False) -> None:
        # With a GPU, the host's own choice (CUDA where visible, bf16), as a serving replica makes it.
        self.host = AdapterHost(base_path, device=None if use_gpu else "cpu")
        self.adapter = BASE_ADAPTER
        if adapter_dir:
            self.host.load_adapter(EVAL_ADAPTER, adapter_dir)
            self.adapter = EVAL_ADAPTER
        self.system = system
        self.decoding = decoding

    def generate(self, inputs: Sequence[str]) -> list[str]:
        done = self.host.generate([self.decoding.request(self.adapter, self.system, x) for x in inputs])
        return [c.text for c in done]  # type: ignore[union-attr]  # strict: every request is answered

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"id": list(batch["id"]), "output": self.generate(list(batch["input"]))}


def _generate_all(base_path: str, adapter_dir: str | None, system: str, inputs: list[str], decoding: Decoding,
                  batch_size: int, use_gpu: bool) -> Iterator[list[str]]:
    """Every input's output, one batch at a time (a streaming Ray task: the caller counts rows as they come)."""
    worker = HoldoutWorker(base_path, adapter_dir, system, decoding, use_gpu)
    for i in range(0, len(inputs), batch_size):
        yield worker.generate(inputs[i:i + batch_size])


@dataclass(frozen=True)
class EvalResult:
    score: KScore
    outputs: list[str]


def generate_outputs(
    base_path: str, adapter_dir: str | None, system: str, ids: Sequence[str], inputs: Sequence[str],
    decoding: Decoding, *, workers: int = 1, batch_size: int = 8, use_gpu: bool = False,
    cpus_per_worker: float | None = None, on_rows: Callable[[int], None] = lambda n: None,
) -> list[str]:
    """Outputs aligned with ``ids``. On one CPU worker the generation runs as one Ray task holding
    ``cpus_per_worker`` cores of one node (default: the freest node's free cores; Ray sizes
    torch's threads by a task's CPUs, and a driver such as a ``ray job submit`` entrypoint gets
    one thread); otherwise a Ray Data actor pool of ``workers``, one worker's share each.
    How the rows are split into batches does not change the outputs (the host decodes each
    greedy row alone). ``on_rows`` is told of each batch's rows as they are generated.
    """
    import ray

    from kolm_ray.cluster import cpus_per_worker as size

    cpus = cpus_per_worker or size(1 if len(ids) <= batch_size else workers, 1.0 if use_gpu else 0.0)
    if workers == 1 and not use_gpu or len(ids) <= batch_size:
        task = ray.remote(_generate_all).options(num_cpus=cpus, num_gpus=1 if use_gpu else 0, num_returns="streaming")
        outputs: list[str] = []
        for ref in task.remote(base_path, adapter_dir, system, list(inputs), decoding, batch_size, use_gpu):
            batch = ray.get(ref)
            outputs += batch
            on_rows(len(batch))
        return outputs
    ds = ray.data.from_items([{"id": i, "input": x} for i, x in zip(ids, inputs)]).map_batches(
        HoldoutWorker,
        fn_constructor_kwargs={"base_path": base_path, "adapter_dir": adapter_dir, "system": system,
                               "decoding": decoding, "use_gpu": use_gpu},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=1 if use_gpu else 0,
        num_cpus=cpus,
    )
    got: dict[str, str] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        got.update(zip(batch["id"].tolist(), batch["output"].tolist()))
        on_rows(len(batch["id"]))
    return [got[i] for i in ids]


def evaluate(
    verifier: Verifier, base_path: str, adapter_dir: str | None, system: str,
    ids: Sequence[str], inputs: Sequence[str], references: Sequence[str], **kw: Any,
) -> EvalResult:
    outputs = generate_outputs(base_path, adapter_dir, system, ids, inputs, decoding_for(verifier), **kw)
    return EvalResult(score=score_rows(verifier, list(ids), outputs, list(inputs), list(references)), outputs=outputs)
