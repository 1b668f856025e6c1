"""`nvfp4`: NVIDIA NVFP4: E2M1 elements, groups of 16, one E4M3 scale each, times one fp32 scale per tensor.

The whole tensor given to the grid (a weight matrix, or one micro-batch of activations) shares the fp32 scale G; each
group's element scale is d = e4m3(target / G) * G (E4M3 nearest-even, so max|x| / d can slightly exceed 6 and
saturate). scale_rule (`quant.scale_rule`):
* `absmax` (NVIDIA's recipe, round to nearest): target = max|x| / 6, G = max|x|_tensor / (6 * 448).
* `four_over_six` (Cook et al. 2025): per group, the better (lower squared error) of target = max|x| / 6 and
  max|x| / 4 (the latter uses the fine top of the grid, 4 instead of 6); G = max|x|_tensor / (6 * 256) so the
  larger scale, 1.5x, still fits E4M3 (256 * 1.5 = 384 <= 448).
* `gaussian` (QuEST's fit): target = a * sigma_group (a = 0.48708, the `fp4` grid's MSE-optimal unit for N(0,1)),
  G = max(target) / 448.
A tensor of zeros gets G = 1. A group whose scale underflows E4M3 (below 2^-10 G) is quantized to zeros (never 0/0).
Scale bits per element: 8 / 16, plus 32 per tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quest_pl.quantizers.base import register_grid, safe_rms
from quest_pl.quantizers.e2m1 import E2M1_MAX, E4M3_MAX, BlockFP4, e4m3_nearest, scaled_e2m1
from quest_pl.quantizers.fp4 import FP4_SCALE

NV_BLOCK = 16
FOUR_OVER_SIX_SCALE_CAP = 256.0


def tensor_scale(target_max: Tensor, cap: float) -> Tensor:
    """Per-tensor fp32 scale G = target_max / cap (1 for an all-zero tensor)."""
    g = target_max / cap
    return torch.where(g > 0, g, torch.ones_like(g))


@register_grid("nvfp4")
class NVFP4(BlockFP4):
    fixed_group_size = NV_BLOCK
    scale_rules = ("absmax", "four_over_six", "gaussian")

    def scale_parts(self, x32: Tensor, rms: Tensor) -> tuple[Tensor, Tensor]:
        if self.scale_rule == "gaussian":
            target = FP4_SCALE * safe_rms(rms)
            g = tensor_scale(target.amax(), E4M3_MAX)
            return e4m3_nearest(target / g), g
        amax = x32.abs().amax(dim=-1, keepdim=True)
        cap = FOUR_OVER_SIX_SCALE_CAP if self.scale_rule == "four_over_six" else E4M3_MAX
        g = tensor_scale(amax.amax(), E2M1_MAX * cap)
        return e4m3_nearest(amax / E2M1_MAX / g), g

    def quantize_parts(self, x32: Tensor, rms: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.scale_rule != "four_over_six":
            return super().quantize_parts(x32, rms)
        s6, g = self.scale_parts(x32, rms)
        s4 = e4m3_nearest(x32.abs().amax(dim=-1, keepdim=True) / 4 / g)
        q6, q4 = scaled_e2m1(x32, s6 * g), scaled_e2m1(x32, s4 * g)
        use4 = (q4 - x32).square().sum(-1, keepdim=True) < (q6 - x32).square().sum(-1, keepdim=True)
        return torch.where(use4, q4, q6), torch.where(use4, s4, s6), g

    def bits_per_element(self, row_length: int, numel: int | None = None) -> float:
        return super().bits_per_element(row_length) + (32 / numel if numel else 0.0)
