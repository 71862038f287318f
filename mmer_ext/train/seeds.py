"""Seeds derived from a run's seed and a position (stage, epoch, stream): every random draw of a run is a pure
function of its config, which is what makes resumption exact."""

from __future__ import annotations

__all__ = ["derive_seed"]


def derive_seed(*parts: int) -> int:
    # A fixed mixing of the parts: Python's hash() of a tuple is salted per process for str, not for int, but be explicit.
    value = 0x9E3779B1
    for p in parts:
        value = (value * 1_000_003 + int(p) + 1) % (2**63 - 1)
    return value
