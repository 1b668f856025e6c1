"""`pact`: learned clip level alpha (PACT, Choi et al. 2018) on the centered INT grid; the working form of the
reference's PACTQuantizer, which passes no gradient to its input (METHOD.md §1.9, §7.1).

    values = centered INT-b grid with outermost levels +-alpha (step = 2 alpha / (n - 1))
    d out/dx     = 1 if |x| <= alpha else 0           (straight-through inside, zero when clipped)
    d out/dalpha = sign(x) if |x| > alpha else 0       (PACT's clip form), times g

g = 1 / sqrt(N Q_p) by default (N = numel(x), Q_p = max(n/2 - 1, 1): LSQ's gradient scale, `grad_scale=True`), so the
clip level's gradient is comparable to a weight's; `grad_scale=False` (`quant.pact_grad_scale=false`) is the authors'
unscaled sum over the clipped elements, whose norm can dwarf the whole model's (issue #11). One alpha per tensor,
initialised on the first forward to alpha0 = alpha_b * RMS(x) over the whole tensor. The parameter is log alpha
(`log_clip`; `clip` is alpha): the optimizer changes alpha relative to its size, and alpha stays >= 1e-3 alpha0
(`estimators.learned`); `optim.quant_weight_decay` is PACT's L2 decay on alpha, in decoupled form.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from quest_pl.estimators.base import apply_mask, register_estimator
from quest_pl.estimators.learned import LearnedScale
from quest_pl.quantizers import OPTIMAL_GAUSSIAN_SCALES, Grid
from quest_pl.quantizers.gaussian import normal_tail2


class _PACTGrad(torch.autograd.Function):
    """Forward: the precomputed values. Backward: STE inside [-alpha, alpha]; alpha collects sign(x) g outside."""

    @staticmethod
    def forward(ctx, x: Tensor, clip: Tensor, values: Tensor, in_range: Tensor, grad_scale: float):
        ctx.save_for_backward(x, clip, in_range)
        ctx.grad_scale = grad_scale
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, clip, in_range = ctx.saved_tensors
        # sign(x) g over the clipped elements, as a product with the complement mask (torch.where is several times
        # slower on CPU). The sum is torch.where's whenever g is finite (up to the sign of an all-zero sum); a
        # non-finite g inside the range reaches alpha's gradient too, as it reaches x's, and training stops on it.
        outside = torch.logical_not(in_range)
        grad_clip = apply_mask(grad.float() * torch.sign(x.float()), outside).sum().reshape(clip.shape)
        return apply_mask(grad, in_range), (grad_clip * ctx.grad_scale).to(clip.dtype), None, None, None


@register_estimator("pact")
class PACT(LearnedScale):
    def __init__(self, quantizer: Grid, grad_scale: bool = True) -> None:
        super().__init__(quantizer, (1,), "clip")
        self.alpha_b = OPTIMAL_GAUSSIAN_SCALES[self.bits]
        self.grad_scale = grad_scale
        self.q_p = max(self.levels // 2 - 1, 1)

    @property
    def clip(self) -> Tensor:
        """The clip level alpha = exp(log_clip)."""
        return self.learned

    def extra_repr(self) -> str:
        return f"bits={self.bits}, grad_scale={self.grad_scale}"

    def initial_value(self, x32: Tensor) -> Tensor:
        return self.alpha_b * x32.square().mean().sqrt().reshape(1)

    def forward(self, x: Tensor) -> Tensor:
        self.maybe_initialize(x)
        self.project()
        clip = self.clip
        with torch.no_grad():
            x32 = x.float()
            values = self.quantizer.quantize_with_scale(x32, clip).values.to(x.dtype)
            in_range = x32.abs() <= clip.float()
        self.remember(in_range)
        if not self.needs_grad(x):
            return values
        scale = 1 / math.sqrt(x.numel() * self.q_p) if self.grad_scale else 1.0
        return _PACTGrad.apply(x, clip, values, in_range, scale)

    def expected_masked_fraction(self) -> float:
        """P(|z| > alpha_b) for N(0,1): the masked fraction at the init clip level (= clip with c = 1)."""
        return normal_tail2(self.alpha_b)
