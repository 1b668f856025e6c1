"""`clip`: gradient passes where |x| <= c * s, s the grid's per-row clip level (METHOD.md §1.4 ClipQuantizer).

c = `clip_scale` (default 1; QuEST's 1-bit runs use 1.3). For c = 1 this equals STE through round + clamp with the
scale detached (the METHOD.md §4.1 grad_flow check).
"""

from __future__ import annotations

from torch import Tensor

from quest_pl.estimators.base import Estimator, register_estimator
from quest_pl.quantizers import Grid, QuantOutput


@register_estimator("clip")
class Clip(Estimator):
    def __init__(self, quantizer: Grid, clip_scale: float = 1.0) -> None:
        super().__init__(quantizer)
        self.clip_scale = clip_scale

    def extra_repr(self) -> str:
        return f"clip_scale={self.clip_scale}"

    def pass_mask(self, x32: Tensor, out: QuantOutput) -> Tensor:
        return x32.abs() <= self.clip_scale * out.scale

    def expected_masked_fraction(self) -> float | None:
        """P(|z| > c * s/sigma) on N(0,1). Absmax grids: 0 for c >= 1 (nothing exceeds the row max), else None."""
        if self.quantizer.clip_level is None:
            return 0.0 if self.clip_scale >= 1 and self.quantizer.absmax_covers_row else None
        threshold = self.clip_scale * self.quantizer.clip_level
        return self.quantizer.gaussian_expectation(lambda z, q: z.abs() > threshold, (-threshold, threshold))
