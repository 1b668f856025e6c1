"""`uniform`: absmax-scaled centered INT grid, s = max|x| per row (the naive baseline of METHOD.md §1.3,
fixed: it works, in train and eval).

    s = max(max_i |x_i|, RMS_EPS);  values = centered INT-b grid with outermost levels +-s (see `quantizers.integer`)

The row maximum maps to itself, so nothing is clipped. Levels in sigma units depend on the row (no `levels`,
`clip_level` or `gaussian_mse`); the default trust threshold is half a step per row, s / (n - 1).
"""

from __future__ import annotations

from torch import Tensor

from quest_pl.quantizers.base import RMS_EPS, QuantOutput, register_grid
from quest_pl.quantizers.integer import IntGrid


@register_grid("uniform")
class UniformAbsmax(IntGrid):
    def __init__(self, bits: int | None = None) -> None:
        super().__init__(bits)
        self.levels = None
        self.clip_level = None
        self.default_trust = None

    def row_scale(self, x32: Tensor, rms: Tensor) -> Tensor:
        return x32.abs().amax(dim=-1, keepdim=True).clamp_min(RMS_EPS)

    def trust_threshold(self, out: QuantOutput, trust: float | None = None) -> Tensor:
        """tau * sigma if `trust` is given, else half a step per row: s / (n - 1) (METHOD.md §1.4, absmax form)."""
        if trust is not None:
            return super().trust_threshold(out, trust)
        return (out.scale / (2**self.bits - 1)).masked_fill(out.rms == 0, float("inf"))
