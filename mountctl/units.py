"""Sizes as people type them (``64M``, ``10G``) and as they read them."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number with an optional binary suffix K, M, G, T, P (``KiB``, ``MB`` too)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 512, 64M, 10G)")
    number, unit = m.groups()
    value = float(number) * _UNITS[unit.upper()]
    if value != int(value):
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def human_bytes(n: int) -> str:
    """``4KiB``, ``1.5GiB``: short and exact where possible."""
    if n < 1024:
        return f"{n}B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.0f}{unit}" if n == int(n) else f"{n:.1f}{unit}"
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.1f} ms"
    return f"{s:.2f} s"
