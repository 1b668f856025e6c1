"""`gaussian_mse`: QuEST's grid, the MSE-optimal centered INT grid for Gaussian rows (METHOD.md §1.2, §1.3).

    sigma     = sqrt(mean(x^2)) over the row (fp32);  sigma_hat = max(sigma, 1e-30)
    s         = fp32(alpha_b) * sigma_hat
    step      = s * 2 / (n - 1)
    k         = clamp(floor(x / step), -n/2, n/2 - 1);  values = (k + 0.5) * step

The 1e-30 floor (instead of the authors' s = alpha_b sigma + 1e-8) only matters for all-zero rows; it keeps them
finite and leaves every other row scale-equivariant. Default trust tau = alpha_b / (n - 1): half a step
(METHOD.md §1.4).
"""

from __future__ import annotations

from torch import Tensor

from quest_pl.quantizers.base import register_grid, safe_rms
from quest_pl.quantizers.integer import IntGrid, int_grid_levels

OPTIMAL_GAUSSIAN_SCALES = {
    1: 0.7978845587140913,
    2: 1.4935346200015913,
    3: 2.051068354131873,
    4: 2.513930578568423,
    5: 2.9160938834961225,
    6: 3.276597282593217,
    7: 3.6010497188221655,
    8: 3.884938678807525,
}
"""alpha_b: half-width of the MSE-optimal uniform n-level grid for N(0,1), the hard-coded table of METHOD.md §1.2."""


@register_grid("gaussian_mse")
class GaussianMSE(IntGrid):
    def __init__(self, bits: int | None = None) -> None:
        super().__init__(bits)
        alpha = OPTIMAL_GAUSSIAN_SCALES[self.bits]
        self.levels = int_grid_levels(alpha, self.bits)
        self.clip_level = alpha
        self.default_trust = alpha / (2**self.bits - 1)

    def row_scale(self, x32: Tensor, rms: Tensor) -> Tensor:
        return self.clip_level * safe_rms(rms)
