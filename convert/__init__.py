"""Checkpoint conversion: HF safetensors, DeepMind .pt (and Flax) -> MLX folders, with quantization."""
