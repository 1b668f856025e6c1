"""`fp4`: E2M1 grid scaled to the row, MSE-optimal for N(0,1) (METHOD.md §1.6). 4 bits only.

    levels = a * {0, +-0.5, +-1, +-1.5, +-2, +-3, +-4, +-6}  (15 distinct values; a = 0.487079484)
    sigma_hat = max(sqrt(mean(x^2)), 1e-30);  z = x / sigma_hat
    i = #{boundaries <= z}, boundaries = a * {+-0.25, +-0.75, +-1.25, +-1.75, +-2.5, +-3.5, +-5} (midpoints)
    values = levels[i] * sigma_hat;  s = 6 a sigma_hat

Tables are float64 products rounded to fp32. Default trust tau = (6 - 4) a / 2 = a = 0.48708 (half the outermost
gap), not the reference's 0.3186 taken from the Gaussian grid (§1.6, §7.5).
"""

from __future__ import annotations

import torch

from quest_pl.quantizers.base import register_grid
from quest_pl.quantizers.levels import LevelGrid

FP4_SCALE = 0.487079484
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@register_grid("fp4")
class FP4(LevelGrid):
    allowed_bits = (4,)
    default_bits = 4

    def __init__(self, bits: int | None = None) -> None:
        super().__init__(bits)
        magnitudes = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float64)
        self._set_levels(FP4_SCALE * torch.cat((-magnitudes[1:].flip(0), magnitudes)))
