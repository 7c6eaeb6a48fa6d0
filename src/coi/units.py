"""Units as people write and read them: sizes ('100MiB', '1.2 MB') and Go-style durations."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_IUNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"(\d+)([KMGT]?)(i?)B")


def parse_bytes(text: str) -> int:
    """'100MiB' -> 104857600, '500KB' -> 500000, '1048576B' -> 1048576.

    :raises ValueError: not a size in that form.
    """
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(m.group(1)) * (_IUNITS if m.group(3) else _UNITS)[m.group(2)]


def size_text(n: float) -> str:
    """Decimal units, for amounts sent and held: 1234567 -> '1.2 MB', 100000 -> '100 KB'."""
    if n >= 10**9:
        return f"{n / 1e9:.1f} GB"
    if n >= 10**6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.0f} KB"


def binary_text(n: float, sep: str = " ") -> str:
    """Binary units, for memory and disks: 512 -> '512 B', 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{sep}{unit}" if unit == "B" else f"{n:.1f}{sep}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """Go-style duration (`90s`, `1h30m`, `1.5h`) in seconds.

    :raises ValueError: not a duration, or not positive.
    """
    text = text.strip()
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if not m:
            raise ValueError(text)
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not text or total <= 0:
        raise ValueError(text)
    return total
