"""Sizes in bytes as people write them: `512M`, `2GiB`, `1048576`. Units are binary (K is
1024), as for Docker's and Kubernetes' memory limits."""

import re

UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
SIZE_RE = re.compile(r"(\d+)\s*(?:([KMGT])(?:i?B)?|B)?")


def parse_size(text: str | int) -> int:
    """Bytes from `text`; ValueError saying what is accepted otherwise."""
    match = SIZE_RE.fullmatch(str(text).strip())
    if not match:
        raise ValueError(
            f"{str(text)[:40]!r} is not a size: a whole number of bytes, or with a unit K, M,"
            " G or T (binary: 512M, 2G, 1GiB)"
        )
    return int(match.group(1)) * UNITS[match.group(2) or ""]


def format_size(size: int) -> str:
    """The largest unit that divides `size` exactly: 64 MiB, 1536 KiB, 100 bytes."""
    for unit in ("T", "G", "M", "K"):
        if size >= UNITS[unit] and size % UNITS[unit] == 0:
            return f"{size // UNITS[unit]} {unit}iB"
    return f"{size} bytes"
