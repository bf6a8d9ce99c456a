"""CKKS parameters from a plan's multiplicative depth and value range.

The coefficient modulus is ``[outer, scale × depth, outer]`` (the TenSEAL tutorial's
layout): one ``scale``-bit prime is consumed per level, the first prime holds the
integer part of the output and the last is SEAL's special key-switching prime. The ring
degree N is the smallest whose total modulus stays within the HomomorphicEncryption.org
standard's bound for 128-bit classical security (the table SEAL enforces, Albrecht et
al. 2018).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from modelshield.core.errors import InvalidConfigError

SEAL_128_MAX_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
"""Largest total coeff-modulus bit count per N at 128-bit security (SEAL's table)."""

MIN_SCALE_BITS = 25
MAX_SCALE_BITS = 40


@dataclass(frozen=True)
class CKKSParams:
    """Ring degree, coefficient-modulus bit sizes and scale (2**scale_bits)."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    depth: int
    security_bits: int = 128

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def total_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        d.update(
            slots=self.slots,
            total_bits=self.total_bits,
            max_bits_at_128=SEAL_128_MAX_BITS[self.poly_modulus_degree],
            security=(
                f"{self.security_bits}-bit classical (HomomorphicEncryption.org standard, "
                f"N={self.poly_modulus_degree}: ≤{SEAL_128_MAX_BITS[self.poly_modulus_degree]} "
                f"modulus bits; this chain uses {self.total_bits})"
            ),
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CKKSParams:
        return cls(
            int(d["poly_modulus_degree"]),
            tuple(int(b) for b in d["coeff_mod_bit_sizes"]),
            int(d["scale_bits"]),
            int(d["depth"]),
            int(d.get("security_bits", 128)),
        )


def choose_params(
    depth: int, max_abs: float = 1.0, *, min_scale_bits: int = 26, min_slots: int = 0
) -> CKKSParams:
    """Smallest 128-bit-secure N (and the largest scale there) for ``depth`` levels.

    ``max_abs`` bounds every intermediate value: the outer primes get its integer bits
    on top of the scale. ``min_scale_bits`` is the precision floor (about
    ``scale_bits - 10`` bits of precision survive a layer); ``min_slots`` is the packing
    need (the latency mode's vector length, or the batch).
    """
    if depth < 1:
        raise InvalidConfigError(f"depth must be ≥ 1, got {depth}")
    if not MIN_SCALE_BITS <= min_scale_bits <= MAX_SCALE_BITS:
        raise InvalidConfigError(
            f"min_scale_bits must be in [{MIN_SCALE_BITS}, {MAX_SCALE_BITS}], got {min_scale_bits}"
        )
    int_bits = max(1, math.ceil(math.log2(max(max_abs, 1.0) + 1.0))) + 1
    for n, limit in SEAL_128_MAX_BITS.items():
        if n // 2 < min_slots:
            continue
        for scale in range(MAX_SCALE_BITS, min_scale_bits - 1, -1):
            outer = min(60, scale + int_bits)
            if outer - scale < int_bits and outer == 60:
                continue
            bits = (outer, *([scale] * depth), outer)
            if sum(bits) <= limit:
                return CKKSParams(n, bits, scale, depth)
    raise InvalidConfigError(
        f"no 128-bit-secure CKKS parameters hold depth {depth} at ≥{min_scale_bits}-bit scale "
        f"(N ≤ 32768): use fewer layers or activations"
    )
