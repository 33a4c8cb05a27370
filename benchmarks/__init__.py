"""Developer benchmarks of a source checkout (see README, "Benchmarks"): the scan paths against memory
bandwidth (bench_scan.py) and the converter's time and memory (bench_convert.py). The comparison with
mlx-lm and Hugging Face ships with the package as `rg-mlx bench` (`rg_mlx.bench`); `python -m
benchmarks.bench` is the same command."""
