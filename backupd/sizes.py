"""Byte sizes: Kubernetes-style quantities in config, policies and topologies, and sizes for people."""

from __future__ import annotations

import re
from decimal import Decimal

_UNITS = {
    "": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKMGTPE]i?)?\s*$")


def parse_quantity(value: int | str, *, whole: bool = False) -> int:
    """Bytes from an int or a Kubernetes quantity such as ``64Mi``, ``1.5Gi``, ``2G`` or ``512``
    (a fraction of a byte is dropped). With ``whole`` the number must be an integer, as config
    and policy sizes are written (``1.5Gi`` is refused). Raises ValueError naming the value."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 512Mi or 50Gi, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        return value
    m = _QUANTITY.match(str(value))
    if not m or m.group(2) not in (None, *_UNITS) or (whole and "." in m.group(1)):
        raise ValueError(f"expected a size such as 512Mi or 50Gi, got {value!r}")
    return int(Decimal(m.group(1)) * _UNITS[m.group(2) or ""])


def parse_size(value: int | str) -> int:
    """A byte count as config and policies write it: an integer, or an integer quantity such
    as ``50Gi`` or ``500M``."""
    return parse_quantity(value, whole=True)


def human_bytes(n: float | None) -> str:
    """``1.5 MiB``-style sizes for people (``-`` for an unknown size)."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable: the loop returns at TiB")
