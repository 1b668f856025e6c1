"""`mxfp4`: OCP Microscaling MXFP4 (OCP MX v1.0): E2M1 elements, groups of 32, one E8M0 (power-of-two) scale each.

scale_rule (`quant.scale_rule`):
* `absmax` (the spec): d = 2^(floor(log2 max|x|) - 2), 2 = the exponent of E2M1's largest value 6 = 1.5 * 2^2;
  max|x| / d lies in [4, 8), so the group maximum can saturate at 6.
* `gaussian` (QuEST's fit, the Quartet forward): d = the power of two nearest in log2 to a * sigma_group, a = 0.48708
  the MSE-optimal E2M1 unit for N(0,1) (the `fp4` grid's constant).
values = round_e2m1(x / d) * d (nearest, ties to even, saturating); scale bits per element 8 / 32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quest_pl.quantizers.base import register_grid, safe_rms
from quest_pl.quantizers.e2m1 import BlockFP4, e8m0_floor, e8m0_nearest
from quest_pl.quantizers.fp4 import FP4_SCALE

MX_BLOCK = 32
E2M1_EMAX = 2


@register_grid("mxfp4")
class MXFP4(BlockFP4):
    fixed_group_size = MX_BLOCK
    scale_rules = ("absmax", "gaussian")

    def scale_parts(self, x32: Tensor, rms: Tensor) -> tuple[Tensor, Tensor]:
        if self.scale_rule == "gaussian":
            s = e8m0_nearest(FP4_SCALE * safe_rms(rms))
        else:
            s = e8m0_floor(x32.abs().amax(dim=-1, keepdim=True) / 2**E2M1_EMAX)
        return s, torch.ones((), dtype=s.dtype, device=s.device)  # no tensor scale: d = s * 1 = s exactly
