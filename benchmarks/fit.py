"""Fit throughput: kolm's LoRA fit (Ray Train + DeepSpeed ZeRO-2, length-bucketed batches)
against a plain PEFT + transformers ``Trainer`` loop on the same model, data, batch size, step
count and worker count, in the same run. Tokens/s counts real (non-pad) tokens; both sides time
their training loop only (model load and Ray start-up are reported apart).

    python benchmarks/fit.py [--steps 60] [--hidden 256] [--layers 4] [--write]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _machine import machine  # noqa: E402


def pairs(n: int):
    from kolm_ray.testing.corpus import TLDR_TASK, tldr_rows

    return TLDR_TASK, [(r.input, r.output) for r in tldr_rows(n, seed=5)]


def trainer_baseline(base: Path, system: str, data, steps: int, batch: int, max_length: int) -> tuple[float, int]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from kolm_ray.train.data import build_examples

    tok = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    exs = build_examples(tok, system, data, max_length)
    ds = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)} for e in exs]
    seen = {"tokens": 0}
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)

    def counting(features):
        seen["tokens"] += sum(len(f["input_ids"]) for f in features)
        return collator(features)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=2e-4,
                                 report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                 dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=counting)
        t = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t, seen["tokens"]


def kolm_fit(base: Path, system: str, data, steps: int, batch: int, max_length: int) -> tuple[float, int, float]:
    from kolm_ray.cluster import connect
    from kolm_ray.train.base import resolve_base
    from kolm_ray.train.config import FitConfig
    from kolm_ray.train.fit import fit

    connect(None)
    cfg = FitConfig(max_steps=steps, batch_size=batch, max_length=max_length, checkpoint_every=10**6, workers=1,
                    lora_r=16, lora_alpha=32)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        res = fit(resolve_base(str(base)), system, data, cfg, Path(d) / "store", Path(d) / "adapter")
        wall = time.perf_counter() - t
    return res.train_seconds, res.tokens, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    from kolm_ray.train.base import build_tiny_base

    with tempfile.TemporaryDirectory() as d:
        base = build_tiny_base(Path(d) / "base", hidden_size=args.hidden, layers=args.layers,
                               intermediate_size=args.hidden * 2)
        system, data = pairs(args.steps * args.batch)
        b_s, b_tok = trainer_baseline(base, system, data, args.steps, args.batch, args.max_length)
        k_s, k_tok, k_wall = kolm_fit(base, system, data, args.steps, args.batch, args.max_length)
    lines = [
        f"fit: {args.steps} steps x batch {args.batch}, random-init Qwen2 (hidden {args.hidden}, {args.layers} layers), "
        f"LoRA r=16 on q/k/v/o, TL;DR pairs, 1 CPU worker, fp32",
        f"  PEFT + Trainer loop            {b_tok / b_s:9.0f} tokens/s  ({b_tok} tokens in {b_s:.1f} s)",
        f"  kolm (Ray Train + DeepSpeed)   {k_tok / k_s:9.0f} tokens/s  ({k_tok} tokens in {k_s:.1f} s; "
        f"{k_wall:.1f} s with Ray start-up and model load)",
        f"  ratio kolm / Trainer           {(k_tok / k_s) / (b_tok / b_s):.2f}",
        f"  machine: {machine()}",
    ]
    from _report import record

    record("fit", lines, args.write)


if __name__ == "__main__":
    main()
