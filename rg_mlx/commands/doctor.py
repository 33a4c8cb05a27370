"""`rg-mlx doctor`: a report to paste into a bug report; exit status 0 when every check agrees."""

from __future__ import annotations

import argparse
import json

from . import human_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from ..doctor import run as run_doctor

    report = run_doctor()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
    return 0 if report.ok else 1


def _mark(ok: bool) -> str:
    return "ok" if ok else "FAILED"


def _shape(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def format_report(report) -> str:
    """The report as text, one check per line."""
    cpu = report.cpu
    blas = report.blas["library"] + ("; malloc reuses freed memory" if report.blas["malloc_reuses_memory"] else "")
    device = report.default_device + (f" ({report.device['device_name']})" if report.device.get("device_name") else "")
    memory = human_bytes(report.memory_bytes) if report.memory_bytes else "unknown"
    lines = [
        f"rg-mlx doctor (rg_mlx {report.rg_mlx}): please paste all of this into your bug report",
        "",
        "system",
        f"  platform    {report.platform}",
        f"  cpu         {cpu['model']} ({cpu['cores']} logical cores; SIMD: {' '.join(cpu['simd']) or 'none found'})",
        f"  memory      {memory}",
        f"  python      {report.python}",
        f"  mlx         {report.mlx}, mlx-lm {report.mlx_lm or 'not installed'}",
        f"  device      {device}",
        f"  blas        {blas}",
        f"  native      {report.native['status']}",
        f"  bandwidth   {report.bandwidth_bytes_per_second / 1e9:.1f} GB/s (reading a 256 MiB float32 array)",
        "",
        f"scan paths: {', '.join(p.path for p in report.paths)}",
    ]
    for p in report.paths:
        lines.append(f"  {p.path}: against the float64 reference")
        for c in p.accuracy:
            error = f"error {c.error:.2g} (tolerance {c.tolerance:.0e})" if c.error is not None else c.failure
            lines.append(f"    {c.name:<36} {_shape(c.shape):<16} {c.dtype:<9} {c.variant:<10} {error}  {_mark(c.ok)}")
        if p.speed is not None:
            s = p.speed
            lines.append(
                f"  {p.path}: speed {_shape(s.shape)} {s.dtype}: {s.seconds * 1e3:.1f} ms, "
                f"{s.bytes_per_second / 1e9:.2f} GB/s, {100 * s.fraction_of_bandwidth:.0f}% of the bandwidth"
            )
        for s in p.self_check or []:
            result = "agrees with the ops path" if s.ok else s.failure
            lines.append(f"  {p.path}: self-check {s.dtypes}: {result} ({s.seconds * 1e3:.0f} ms)  {_mark(s.ok)}")
    if report.native["products"]:
        lines += ["", "native CPU products against float64 (error relative to the sum of the terms' magnitudes)"]
    for c in report.native["products"]:
        error = f"error {c.error:.2g} (tolerance {c.tolerance:.0e})" if c.error is not None else c.failure
        lines.append(f"  {c.isa:<11} {c.product:<30} {error}  {_mark(c.ok)}")
    lines += ["", "tiny random model, logits against the ops path in float32 (recurrent state dtype)"]
    for m in report.model + report.bfloat16_model:
        error = f"error {m.error:.2g} (tolerance {m.tolerance:.0e})" if m.error is not None else m.failure
        lines.append(f"  {m.path:<6} {m.dtype:<9} {error}, state {m.state_dtype}  {_mark(m.ok)}")
    failed = {k: v["failure"] for k, v in report.self_check_cache["entries"].items() if v.get("failure")}
    cache = report.self_check_cache
    lines += ["", f"self-check cache: {cache['file']} ({len(cache['entries'])} entries; delete it to check again)"]
    lines += [f"  remembered failure: {key}: {failure}" for key, failure in failed.items()]
    verdict = "everything agrees" if report.ok else "SOME CHECKS FAILED: please report this output"
    lines += ["", f"{verdict} ({report.seconds:.1f} s)"]
    return "\n".join(lines)
