"""`ternary`: levels {-s, 0, +s}, s = 1.2240089519030855 sigma, thresholds +-s/2, MSE 0.19017 (METHOD.md §1.3).

The reference's 1.585-bit path is broken (n = 2^1.585 is not an integer); this is the correct ternary grid.
Quantization is the nearest-level rule of `quantizers.levels`. `bits` may be None or 1.585 and reads 1.585.
Default trust tau = s/2.
"""

from __future__ import annotations

import torch

from quest_pl.quantizers.base import register_grid
from quest_pl.quantizers.levels import LevelGrid

TERNARY_SCALE = 1.2240089519030855
STORED_CODE_BITS = 2


@register_grid("ternary")
class Ternary(LevelGrid):
    allowed_bits = (1.585,)
    default_bits = 1.585

    def __init__(self, bits: float | None = None) -> None:
        super().__init__(bits)
        self._set_levels(torch.tensor((-TERNARY_SCALE, 0.0, TERNARY_SCALE), dtype=torch.float64))

    def bits_per_element(self, row_length: int, numel: int | None = None) -> float:
        """What a packed weight stores: a 2-bit code per element (three levels take two whole bits; ``bits`` = 1.585
        is the information content, not the storage), plus the scale (``Grid.bits_per_element``)."""
        return super().bits_per_element(row_length, numel) - float(self.bits) + STORED_CODE_BITS
