"""Centered uniform INT grid shared by `uniform`, `gaussian_mse` and `int_sparse24` (METHOD.md §1.3).

With n = 2^b levels and clip level s (outermost level magnitude), all in fp32:

    step   = s * 2 / (n - 1)                       # (s * 2) then IEEE division by (n - 1)
    k      = clamp(floor(x / step), -n/2, n/2 - 1)  # signed b-bit integer code
    values = (k + 0.5) * step

Levels are (k + 1/2) * step, k = -n/2 ... n/2 - 1: symmetric, outermost +-s, no zero level. Kernels store k.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from quest_pl.quantizers.base import Grid, QuantOutput, row_rms


def int_grid_values(x32: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Centered INT-b dequantized values with outermost levels +-scale (formula in the module docstring)."""
    n = 2**bits
    step = scale * 2 / (n - 1)
    k = torch.floor(x32 / step).clamp_(-n // 2, n // 2 - 1)
    return (k + 0.5) * step


def int_grid_levels(clip_level: float, bits: int) -> Tensor:
    """The 2^b levels (k + 1/2) * 2 * clip_level / (n - 1) in float64, ascending."""
    n = 2**bits
    k = torch.arange(-n // 2, n // 2, dtype=torch.float64)
    return (k + 0.5) * (2 * clip_level / (n - 1))


class IntGrid(Grid):
    """Centered INT grid; subclasses choose the per-row scale rule in `row_scale`."""

    allowed_bits: ClassVar[tuple] = tuple(range(1, 9))
    supports_learned_scale: ClassVar[bool] = True

    def row_scale(self, x32: Tensor, rms: Tensor) -> Tensor:
        """Per-row clip level s, shape (..., 1)."""
        raise NotImplementedError

    def _quantize(self, x32: Tensor, rms: Tensor) -> QuantOutput:
        scale = self.row_scale(x32, rms)
        return QuantOutput(int_grid_values(x32, scale, self.bits), rms, scale)

    def quantize_with_scale(self, x: Tensor, scale: Tensor) -> QuantOutput:
        """Same grid with a given clip level s (broadcastable to (..., 1), e.g. a learned (1,) step), METHOD.md §1.9."""
        if self.group_size is not None:
            raise ValueError(f"grid {self.name!r}: an external (learned) scale is per tensor or per row, not per group")
        x32 = x.float()
        rms = row_rms(x32)
        scale = scale.float().expand_as(rms)
        return QuantOutput(int_grid_values(x32, scale, self.bits), rms, scale)
