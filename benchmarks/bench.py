"""`python -m benchmarks.bench [OPTIONS]` is `rg-mlx bench [OPTIONS]`: the harness is the package's `rg_mlx.bench`."""

from __future__ import annotations

import sys

from rg_mlx.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
