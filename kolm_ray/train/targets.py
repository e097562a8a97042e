"""LoRA target modules, read from a base model's architecture.

``skeleton(config)`` builds the causal LM on PyTorch's meta device: every module, no weights and
no memory, so the names a LoRA adapter can attach to are known for a model of any size in about a
second. ``lora_targets(model, requested)`` checks the names a user gave (each must name a Linear
layer, as PEFT matches them: the whole name or its last dotted parts), or, with none given, picks
the architecture's attention projections: the Linear layers of its first attention block, in
definition order (``q_proj, k_proj, v_proj, o_proj`` on Qwen2 and Llama, ``o_proj, qkv_proj`` on
Phi-3, ``c_attn, c_proj`` on GPT-2), falling back to PEFT's table by model type.

Must not load weights or download anything: callers hand in a config that is already local.
"""

from __future__ import annotations

from typing import Any, Sequence

from kolm_ray.errors import InputError
from kolm_ray.train.config import FitConfig


def base_config(folder: str) -> Any:
    """The ``transformers`` config in ``folder`` (or of a hub id, from the cache or the hub).

    Raises:
        InputError: transformers cannot read it (an unknown ``model_type``, a malformed file).
    """
    from transformers import AutoConfig

    from kolm_ray.train.base import split_source

    try:
        path, revision = split_source(folder)  # a pinned hub base: ID@COMMIT
        return AutoConfig.from_pretrained(path, revision=revision)
    except (ValueError, KeyError, OSError) as e:
        raise InputError(f"cannot read the model config ({_one_line(e)}): is this a model transformers supports?",
                         path=folder) from None


def skeleton(config: Any) -> Any:
    """The causal LM of ``config`` on the meta device (its modules, no weights).

    Raises:
        InputError: transformers has no causal LM for this config, or cannot build it.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a skeleton's config warnings are not the user's business
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError, AssertionError, TypeError alike
        kind = getattr(config, "model_type", None) or type(config).__name__
        raise InputError(f"cannot build a causal LM of model type {kind!r} from its config "
                         f"({type(e).__name__}: {_one_line(e)}): kolm fits causal LMs transformers can build") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def architecture(model: Any) -> str:
    """A short name for the model's architecture: ``Qwen2`` for ``Qwen2ForCausalLM``."""
    return type(model).__name__.removesuffix("ForCausalLM").removesuffix("LMHeadModel") or type(model).__name__


def _adaptable(module: Any) -> bool:
    """A layer PEFT's LoRA wraps as a Linear one: ``nn.Linear``, or GPT-2's ``Conv1D``."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def linear_names(model: Any) -> list[str]:
    """The full names of the model's Linear layers, in definition order."""
    return [name for name, module in model.named_modules() if name and _adaptable(module)]


def _matches(name: str, target: str) -> bool:
    # PEFT's rule for a list of names: the whole module name, or its last dotted parts.
    return name == target or name.endswith("." + target)


def attention_projections(model: Any) -> tuple[str, ...]:
    """The last names of the Linear layers in the model's first attention block, in order."""
    for _, module in model.named_modules():
        if "Attention" not in type(module).__name__:
            continue
        names = [name.rsplit(".", 1)[-1] for name, sub in module.named_modules() if name and _adaptable(sub)]
        if names:
            return tuple(dict.fromkeys(names))
    return ()


def lora_targets(model: Any, requested: Sequence[str] | None) -> tuple[str, ...]:
    """The module names a LoRA adapter goes on: ``requested``, checked against the model, or
    its attention projections when none were requested.

    Raises:
        InputError: a requested name matches no Linear layer (the message lists those there are),
            or none were requested and the architecture has no attention projections kolm can find.
    """
    linears = linear_names(model)
    present = ", ".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linears))
    if requested:
        missing = [t for t in requested if not any(_matches(n, t) for n in linears)]
        if missing:
            raise InputError(f"--target-modules {','.join(missing)}: no Linear layer of {architecture(model)} has "
                             f"that name; its Linear layers are {present}")
        return tuple(requested)
    found = attention_projections(model)
    if not found:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

        kind = getattr(model.config, "model_type", None)
        found = tuple(t for t in PEFT_DEFAULTS.get(kind, ()) if any(_matches(n, t) for n in linears))
    if not found:
        raise InputError(f"cannot tell which layers of {architecture(model)} are its attention projections: "
                         f"give --target-modules (its Linear layers are {present})")
    return found


def with_targets(cfg: FitConfig, base_path: str) -> FitConfig:
    """``cfg`` with its target modules resolved from the base at ``base_path`` (as it is when
    they are given: ``lora_targets`` checked them in the preflight).

    Raises:
        InputError: as ``base_config``, ``skeleton`` and ``lora_targets``.
    """
    if cfg.target_modules is not None:
        return cfg
    model = skeleton(base_config(base_path))
    return cfg.model_copy(update={"target_modules": lora_targets(model, None)})


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]
