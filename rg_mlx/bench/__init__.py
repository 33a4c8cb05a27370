"""The benchmarks behind `rg-mlx bench`: rg_mlx against mlx-lm and Hugging Face transformers.

- `speed`: prompt and decode speed, memory, on one random-weight checkpoint (`checkpoint`); each runtime
  runs in its own process (`worker.py`, run as a script so that the peers run without rg_mlx's fast path).
- `long_chat`: memory and per-token latency over one chat of tens of thousands of tokens (`--memory`).

The developer benchmarks of the scan kernels and the converter stay in the source checkout's `benchmarks/`.
"""
