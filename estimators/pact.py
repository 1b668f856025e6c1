"""`pact`: learned clip level alpha (PACT, Choi et al. 2018) on the centered INT grid; the working form of the
reference's PACTQuantizer, which passes no gradient to its input (METHOD.md §1.9, §7.1).

    values = centered INT-b grid with outermost levels +-alpha (step = 2 alpha / (n - 1))
    d out/dx     = 1 if |x| <= alpha else 0           (straight-through inside, zero when clipped)
    d out/dalpha = sign(x) if |x| > alpha else 0       (PACT's clip form)

One alpha per tensor, initialised on the first forward to alpha0 = alpha_b * RMS(x) over the whole tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quest_pl.estimators.base import register_estimator
from quest_pl.estimators.learned import LearnedScale
from quest_pl.quantizers import OPTIMAL_GAUSSIAN_SCALES, Grid
from quest_pl.quantizers.gaussian import normal_tail2


class _PACTGrad(torch.autograd.Function):
    """Forward: the precomputed values. Backward: STE inside [-alpha, alpha]; alpha collects sign(x) g outside."""

    @staticmethod
    def forward(ctx, x: Tensor, clip: Tensor, values: Tensor, in_range: Tensor):
        ctx.save_for_backward(x, clip, in_range)
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, clip, in_range = ctx.saved_tensors
        grad_clip = torch.where(in_range, 0.0, grad.float() * torch.sign(x.float())).sum().reshape(clip.shape)
        return grad * in_range, grad_clip.to(clip.dtype), None, None


@register_estimator("pact")
class PACT(LearnedScale):
    def __init__(self, quantizer: Grid) -> None:
        super().__init__(quantizer, (1,), "clip")
        self.alpha_b = OPTIMAL_GAUSSIAN_SCALES[self.bits]

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    def initial_value(self, x32: Tensor) -> Tensor:
        return self.alpha_b * x32.square().mean().sqrt().reshape(1)

    def forward(self, x: Tensor) -> Tensor:
        self.maybe_initialize(x)
        with torch.no_grad():
            x32 = x.float()
            values = self.quantizer.quantize_with_scale(x32, self.clip).values.to(x.dtype)
            in_range = x32.abs() <= self.clip.float()
        self.remember(in_range)
        if not self.needs_grad(x):
            return values
        return _PACTGrad.apply(x, self.clip, values, in_range)

    def expected_masked_fraction(self) -> float:
        """P(|z| > alpha_b) for N(0,1): the masked fraction at the init clip level (= clip with c = 1)."""
        return normal_tail2(self.alpha_b)
