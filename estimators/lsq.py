"""`lsq`: learned step size (LSQ, Esser et al. 2020) on QuEST's centered half-integer grid (METHOD.md §1.9).

With step alpha, n = 2^b, Q_p = max(n/2 - 1, 1), s = alpha (n - 1)/2:

    v = clamp(x/alpha - 1/2, -n/2, n/2 - 1);  out = (round(v) + 1/2) alpha     (= the grid's values with clip level s)
    d out/dx     = 1 if |x| <= s else 0
    d out/dalpha = g * (round(v) + 1/2 - x/alpha) in range,  g * (q_clip + 1/2) when clamped,
                   i.e. g * (out - x * in_range) / alpha;   g = 1 / sqrt(N Q_p)

N = numel(x) (per tensor, batch included) or the row length (`per_row=True`, one step per row of shape (rows, 1),
needs `rows`; meant for weights: `quant.lsq_per_row` gives activations a per-tensor step). Init on the first forward:
alpha0 = 2 mean|x| / sqrt(Q_p) (LSQ paper), per tensor or per row. The parameter is log alpha (`log_step`; `step` is
alpha): the optimizer changes alpha relative to its size, and alpha stays >= 1e-3 alpha0 (`estimators.learned`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from quest_pl.estimators.base import apply_mask, register_estimator
from quest_pl.estimators.learned import LearnedScale
from quest_pl.quantizers import Grid
from quest_pl.quantizers.gaussian import normal_tail2


def lsq_forward(x32: Tensor, step: Tensor, grid: Grid) -> tuple[Tensor, Tensor]:
    """(values, in_range) in fp32 for step `step`: the grid with clip level s = step (n - 1) / 2."""
    clip = step.float() * ((2**grid.bits - 1) / 2)
    return grid.quantize_with_scale(x32, clip).values, x32.abs() <= clip


class _LSQGrad(torch.autograd.Function):
    """Forward: the precomputed values. Backward: LSQ gradients (values recomputed from x, nothing big saved)."""

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, values: Tensor, in_range: Tensor, grid: Grid, grad_scale: float):
        ctx.save_for_backward(x, step, in_range)
        ctx.grid, ctx.grad_scale = grid, grad_scale
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, step, in_range = ctx.saved_tensors
        x32 = x.float()
        values, _ = lsq_forward(x32, step, ctx.grid)
        step_coeff = (values - apply_mask(x32, in_range)) / step.float()
        grad_step = (grad.float() * step_coeff * ctx.grad_scale).sum_to_size(step.shape)
        return apply_mask(grad, in_range), grad_step.to(step.dtype), None, None, None, None


@register_estimator("lsq")
class LSQ(LearnedScale):
    def __init__(self, quantizer: Grid, per_row: bool = False, rows: int | None = None) -> None:
        if per_row and rows is None:
            raise ValueError("lsq with per_row=True needs `rows` (the number of rows, e.g. out_features)")
        super().__init__(quantizer, (rows, 1) if per_row else (1,), "step")
        self.per_row = per_row
        self.q_p = max(self.levels // 2 - 1, 1)

    @property
    def step(self) -> Tensor:
        """The step alpha = exp(log_step)."""
        return self.learned

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_row={self.per_row}"

    def initial_value(self, x32: Tensor) -> Tensor:
        mean_abs = x32.abs().mean(dim=-1, keepdim=True) if self.per_row else x32.abs().mean().reshape(1)
        return 2 * mean_abs / math.sqrt(self.q_p)

    def forward(self, x: Tensor) -> Tensor:
        self.maybe_initialize(x)
        self.project()
        step = self.step
        with torch.no_grad():
            values, in_range = lsq_forward(x.float(), step, self.quantizer)
        self.remember(in_range)
        values = values.to(x.dtype)
        if not self.needs_grad(x):
            return values
        n = x.shape[-1] if self.per_row else x.numel()
        return _LSQGrad.apply(x, step, values, in_range, self.quantizer, 1 / math.sqrt(n * self.q_p))

    def expected_masked_fraction(self) -> float:
        """P(|z| > s0) for N(0,1) at the init scale: s0 = alpha0 (n-1)/2, alpha0 = 2 sqrt(2/pi) / sqrt(Q_p)."""
        alpha0 = 2 * math.sqrt(2 / math.pi) / math.sqrt(self.q_p)
        return normal_tail2(alpha0 * (self.levels - 1) / 2)
