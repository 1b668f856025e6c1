"""`lloyd_max`: converged Lloyd-Max levels for N(0,1) (Max 1960), bits 1-4 (METHOD.md §1.5, fixing §7.10).

Lloyd's iteration in float64: boundaries = midpoints (+-inf at the ends), each level moves to its cell's conditional
mean E[Z | a < Z < b] = (phi(a) - phi(b)) / (Phi(b) - Phi(a)), until no level moves by more than 1e-12 (the
reference stops after 20 iterations, which is not converged for b >= 3). Computed lazily, once per bits.
Quantization: nearest level via bucketize, see `quantizers.levels`.
"""

from __future__ import annotations

import itertools
import math
from functools import cache

import torch

from quest_pl.quantizers.base import register_grid
from quest_pl.quantizers.gaussian import normal_cdf, normal_pdf
from quest_pl.quantizers.levels import LevelGrid

LLOYD_MAX_TOLERANCE = 1e-12


@cache
def lloyd_max_levels(bits: int, tol: float = LLOYD_MAX_TOLERANCE, max_iter: int = 100_000) -> tuple[float, ...]:
    """Converged Lloyd-Max levels for N(0,1), ascending, starting from linspace(-3, 3, n)."""
    n = 2**bits
    levels = [-3 + 6 * i / (n - 1) for i in range(n)]
    for _ in range(max_iter):
        edges = [-math.inf, *((a + b) / 2 for a, b in itertools.pairwise(levels)), math.inf]
        new = [(normal_pdf(a) - normal_pdf(b)) / (normal_cdf(b) - normal_cdf(a)) for a, b in itertools.pairwise(edges)]
        moved = max(abs(a - b) for a, b in zip(new, levels))
        levels = new
        if moved < tol:
            return tuple(levels)
    raise RuntimeError(f"Lloyd-Max for {bits} bits did not converge to {tol} in {max_iter} iterations")


@register_grid("lloyd_max")
class LloydMax(LevelGrid):
    allowed_bits = (1, 2, 3, 4)

    def __init__(self, bits: int | None = None) -> None:
        super().__init__(bits)
        self._set_levels(torch.tensor(lloyd_max_levels(self.bits), dtype=torch.float64))
