"""Non-uniform grids given by a fixed level table in sigma units (Lloyd-Max, FP4, ternary; METHOD.md §1.3, §1.5, §1.6).

Nearest-level rounding via decision boundaries (midpoints of consecutive levels), all in fp32:

    sigma_hat = max(sqrt(mean(x^2)), 1e-30);  z = x / sigma_hat
    i = #{boundaries <= z}        (torch.bucketize(z, boundaries, right=True): ties go to the larger level)
    values = levels[i] * sigma_hat;   s = levels[-1] * sigma_hat

`levels` and `boundaries` are the float64 tables rounded to fp32. Never an argmin over a (..., d, n) tensor (§7.16).
Default trust tau is half the outermost gap, (l_max - l_{max-1}) / 2 (METHOD.md §1.5 for Lloyd-Max; FP4 gives a, not
the reference's 0.3186 accident of §1.6; ternary gives s/2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from quest_pl.quantizers.base import Grid, QuantOutput, safe_rms


class LevelGrid(Grid):
    """A grid with fixed sorted levels (float64, sigma units) set by the subclass before calling `_set_levels`."""

    def _set_levels(self, levels: Tensor) -> None:
        self.levels = levels
        self.clip_level = float(levels[-1])
        self.default_trust = float(levels[-1] - levels[-2]) / 2
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def fp32_tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(boundaries, levels) in fp32 on `device`, cached per device (not buffers: `.to(bf16)` cannot cast them)."""
        if device not in self._tables:
            self._tables[device] = (
                self.decision_boundaries.to(device=device, dtype=torch.float32),
                self.levels.to(device=device, dtype=torch.float32),
            )
        return self._tables[device]

    def _quantize(self, x32: Tensor, rms: Tensor) -> QuantOutput:
        boundaries, levels = self.fp32_tables(x32.device)
        sigma = safe_rms(rms)
        index = torch.bucketize(x32 / sigma, boundaries, right=True)
        return QuantOutput(levels[index] * sigma, rms, levels[-1] * sigma)
