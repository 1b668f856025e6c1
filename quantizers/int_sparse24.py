"""`int_sparse24`: `gaussian_mse` INT values with element-wise 2:4 structured sparsity along the row.

In every group of 4 consecutive elements of the last dim, the 2 largest |x| (of the unquantized input) keep their
`gaussian_mse` value and the other 2 become 0 (ties broken by topk); the scale comes from the dense row's sigma.
The last dim must be a multiple of 4.

This is element-wise 2:4, not the authors' pair-wise 4:8 of METHOD.md §1.7 (2 of 4 pairs kept
in each group of 8, for int4 containers), so its Gaussian MSE and masked fractions differ from §1.7/§1.11.
Estimators see pruned elements as q = 0: trust passes a pruned element's gradient only if |x| <= tau sigma.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from quest_pl.quantizers.base import Grid, QuantOutput, register_grid
from quest_pl.quantizers.gaussian_mse import GaussianMSE

GROUP = 4
KEEP = 2
POSITION_BITS = 2  # a kept element's index within its group of 4, as the packed export stores it


def two_four_keep_mask(x: Tensor) -> Tensor:
    """Bool mask keeping the 2 largest |x| in every group of 4 consecutive elements of the last dim."""
    if x.shape[-1] % GROUP:
        raise ValueError(f"2:4 sparsity needs a last dim that is a multiple of {GROUP}, got {x.shape[-1]}")
    groups = x.abs().unflatten(-1, (-1, GROUP))
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(KEEP, dim=-1).indices, True)
    return keep.flatten(-2)


@register_grid("int_sparse24")
class IntSparse24(GaussianMSE):
    supports_learned_scale = False
    quantize_with_scale = Grid.quantize_with_scale

    def _quantize(self, x32: Tensor, rms: Tensor) -> QuantOutput:
        dense = super()._quantize(x32, rms)
        return dense._replace(values=torch.where(two_four_keep_mask(x32), dense.values, 0.0))

    def bits_per_element(self, row_length: int, numel: int | None = None) -> float:
        """What a packed weight stores per element: the ``bits``-bit codes of the 2 kept elements of every 4, and each
        kept element's 2-bit position within its group (``bits / 2 + 1``), plus the scale (``Grid.bits_per_element``).
        At 4 bits 3 bits per element, not 4: the pruned half is not stored."""
        dense = super().bits_per_element(row_length, numel)
        return dense - float(self.bits) + KEEP * (float(self.bits) + POSITION_BITS) / GROUP

    def _theory_integrand(self, fn):
        """An element with |z| = t is kept iff at most one of the 3 others is larger: K = (1-p)^3 + 3p(1-p)^2,
        p = P(|Z| > t); pruned elements have q = 0."""

        def integrand(z: Tensor) -> Tensor:
            p = torch.special.erfc(z.abs() / math.sqrt(2))
            kept = (1 - p) ** 3 + 3 * p * (1 - p) ** 2
            return kept * fn(z, self.reference_q(z)) + (1 - kept) * fn(z, torch.zeros_like(z))

        return integrand
