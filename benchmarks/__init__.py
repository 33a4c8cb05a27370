"""Speed and memory benchmarks against mlx-lm and Hugging Face transformers (see README, "Benchmarks")."""
