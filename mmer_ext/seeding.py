"""The one place seeds are derived: every random stream of a run (data order, dropout, corruption noise, missing
patterns, synthetic data, sampler noise) is seeded from the run's seed and a position, so a run is a pure function of
its config — which is what makes resumption exact and results reproducible.

Three mixings are in use, each kept bit-exact because every published number of the package (the demo's tables,
checkpoints' fingerprints) depends on the streams it produced:

- ``"stream"`` (the default): the trainer's positions ``(seed, stage[, epoch[, stream]])``, a polynomial mix of
  any number of integer parts;
- ``"splitmix"``: ``(seed, epoch)`` pairs of the protocol views and the synthetic generators, through the splitmix64
  finaliser so that nearby pairs give unrelated streams;
- ``"rate"``: ``(seed, missing_rate)`` of IMDer's missing-rate evaluation, ``seed * 1000 + round(10 * rate)``, one
  stream per rate whatever other rates are evaluated and in whatever order.

A new caller should use the default.
"""

from __future__ import annotations

__all__ = ["derive_seed", "SCHEMES"]

SCHEMES = ("stream", "splitmix", "rate")
_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


def derive_seed(seed: int, *position: int | float, scheme: str = "stream") -> int:
    """A non-negative seed for the stream at ``position`` of a run seeded with ``seed`` (see the module docstring for
    the schemes and what each position means)."""
    if scheme == "stream":
        value = 0x9E3779B1
        for p in (seed, *position):
            value = (value * 1_000_003 + int(p) + 1) % _MASK63
        return value
    if scheme == "splitmix":
        if len(position) != 1:
            raise ValueError(f"derive_seed: scheme 'splitmix' takes (seed, epoch), got {len(position)} position(s)")
        x = (int(seed) * 0x9E3779B97F4A7C15 + int(position[0]) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        return (x ^ (x >> 31)) & _MASK63
    if scheme == "rate":
        if len(position) != 1:
            raise ValueError(f"derive_seed: scheme 'rate' takes (seed, missing_rate), got {len(position)} position(s)")
        return int(seed) * 1000 + round(float(position[0]) * 10)
    raise ValueError(f"derive_seed: scheme must be one of {SCHEMES}, got {scheme!r}")
