"""The fit and eval stages of a compile: base models, training data, the LoRA fit under Ray
Train with DeepSpeed, its checkpoints, and the holdout eval.

Pipeline: ``base.resolve_base`` (``--base`` -> a hub id or a local folder; ``build_tiny_base``
for offline runs) -> ``targets.lora_targets`` (the LoRA target modules, from the architecture on
the meta device) -> ``data`` (chat-template prompts, response-only labels, length-bucketed
batches) -> ``fit.fit`` (a TorchTrainer of ZeRO workers over a PEFT adapter, resuming from the
newest usable checkpoint, ``checkpoints``) -> ``eval`` (the student and the base generate
through serving's own ``AdapterHost`` and the verifier scores them into a K-score).

Each stage is configured by ``config.FitConfig``. Nothing here calls the teacher or signs.
"""
