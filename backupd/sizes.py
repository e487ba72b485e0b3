"""Byte sizes: Kubernetes-style quantities in config and policies, and sizes for people."""

from __future__ import annotations

import re

_SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
               "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?)?\s*$")


def parse_size(value: int | str) -> int:
    """A byte count: an integer, or a Kubernetes quantity such as ``50Gi`` or ``500M``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 512Mi or 50Gi, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"expected a size such as 512Mi or 50Gi, got {value!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2) or ""]


def human_bytes(n: int | None) -> str:
    """``1.5 MiB``-style sizes for people."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
