"""Human sizes on the command line: `8M`, `2G`, `512K`, `1.5G`, `4096` (binary units)."""

from __future__ import annotations

import argparse
import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"invalid size {text!r} (examples: 4096, 512K, 8M, 2G)")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value != int(value) and not m.group(2):
        raise ValueError(f"invalid size {text!r}: bytes must be a whole number")
    return int(value)


def size_arg(text: str) -> int:
    """argparse `type=` for sizes; must be positive."""
    value = size_or_zero_arg(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def size_or_zero_arg(text: str) -> int:
    """argparse `type=` for sizes where 0 means "none" (`--fetch-unit 0`)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
