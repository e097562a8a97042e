"""LoRA fit under Ray Train with DeepSpeed (not yet built)."""
