"""Typed config of the fit stage; the CLI's flags map onto these fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class FitConfig(BaseModel):
    """LoRA fit with DeepSpeed under Ray Train."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    epochs: int = Field(3, ge=1, description="Passes over the distillation set.")
    max_steps: int | None = Field(None, ge=0, description="Stop after this many optimizer steps (0: no training).")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (linear warm-up, then linear decay).")
    warmup_steps: int = Field(10, ge=0, description="Learning-rate warm-up steps.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    # None: the base's attention projections, read from its architecture (kolm_ray/train/targets.py):
    # q_proj, k_proj, v_proj, o_proj on Qwen2 and Llama, but qkv_proj, o_proj on Phi-3, so no one
    # fixed list fits every base. The preflight resolves it before the fit, and the fit's run name
    # hashes the resolved names: the default on Qwen2 resumes runs made with the old fixed list.
    target_modules: tuple[str, ...] | None = Field(
        None, min_length=1,
        description="Module names that get LoRA adapters (default: the base's attention projections).",
    )
    workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU; CPU workers where there is none).")
    use_gpu: bool | None = Field(None, description="Train on GPUs (default: when the cluster has them).")
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs each worker takes (default: granted by the compile queue, else a node's free share).")
    batch_size: int = Field(8, ge=1, description="Examples per worker per step.")
    max_length: int = Field(1024, ge=16, description="Longest example in tokens; prompts are cut from the left.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints to the run's storage.")
    max_failures: int = Field(2, ge=0, description="Worker failures survived by resuming from the last checkpoint.")
    seed: int = Field(0, description="Seed for LoRA init and batch order.")
