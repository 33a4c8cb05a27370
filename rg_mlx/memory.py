"""Process memory and sizes for people: the one place that reads RSS and formats byte and parameter counts."""

from __future__ import annotations

import os
import sys

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def peak_rss_bytes() -> int:
    """The most resident memory this process has used so far, in bytes."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def rss_bytes() -> int:
    """Resident memory of this process now, in bytes (the peak where the current value cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def human_bytes(n: int | float, unit: str | None = None) -> str:
    """`n` bytes for people: `512 B`, `4.1 KiB`, `16.4 MiB`; `unit` fixes the unit (`0.041 MiB`).

    Values of at least one unit get one decimal, smaller ones three.
    """
    if unit is None:
        unit = next((u for i, u in enumerate(_UNITS) if abs(n) < 1024 ** (i + 1)), _UNITS[-1])
    if unit not in _UNITS:
        raise ValueError(f"unit={unit!r}: use one of {', '.join(_UNITS)}")
    size = n / 1024 ** _UNITS.index(unit)
    if unit == "B":
        return f"{size:.0f} B"
    return f"{size:.1f} {unit}" if abs(size) >= 1 else f"{size:.3f} {unit}"


def human_count(n: int | float) -> str:
    """A count (of parameters, say) for people, to three digits: `950`, `12.3K`, `2.93M`, `1.03B`."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.{2 if abs(value) < 10 else 1 if abs(value) < 100 else 0}f}{suffix}"
    return f"{n:.0f}"
