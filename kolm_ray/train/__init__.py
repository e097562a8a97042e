"""Base models, training data, the LoRA fit under Ray Train with DeepSpeed, and the eval."""
