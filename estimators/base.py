"""Estimator base class, the masked straight-through function and the estimator registry (METHOD.md §0, §1.4).

An estimator wraps a grid: the forward returns the grid's values (in x's dtype), the backward its gradient rule.
Masked estimators (STE, clip, trust) realise the detach-carrier form out = x*m + sg(q - x*m): value q,
gradient g*m. We return q exactly and save only a bool mask for the backward.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from quest_pl.quantizers import Grid, QuantOutput


def apply_mask(t: Tensor, mask: Tensor) -> Tensor:
    """``t * mask`` for a bool ``mask``: the same values (t * 1 and t * 0, signed zeros and NaN as the product gives
    them), through a uint8 view of the mask; on CPU a bool operand of a product takes a conversion path about 3x slower
    than the uint8 one (BENCHMARKS.md, CPU training)."""
    return t * (mask.view(torch.uint8) if mask.dtype == torch.bool else mask)


class MaskedStraightThrough(torch.autograd.Function):
    """Forward: `values`. Backward: grad * mask to x (identity if mask is None)."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, mask: Tensor | None) -> Tensor:
        ctx.save_for_backward(mask)
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        return (grad if mask is None else apply_mask(grad, mask)), None, None


class Estimator(nn.Module):
    """Quantize with `quantizer` forward; pass the gradient where `pass_mask` is True backward.

    `record_mask = True` makes each forward store `last_mask` (bool, True where the gradient passes, detached); when
    False nothing extra is computed or kept. Subclasses implement `pass_mask` (None: everything passes) and
    `expected_masked_fraction`.
    """

    name: ClassVar[str] = "estimator"

    def __init__(self, quantizer: Grid) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.record_mask = False
        self.last_mask: Tensor | None = None

    def extra_repr(self) -> str:
        return f"name={self.name!r}"

    def pass_mask(self, x32: Tensor, out: QuantOutput) -> Tensor | None:
        """Bool mask, True where the gradient passes; None when it passes everywhere."""
        raise NotImplementedError

    def expected_masked_fraction(self) -> float | None:
        """Fraction of zero-gradient elements for N(0,1) rows (float64 integration); None when undefined."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        with torch.no_grad():
            x32 = x.float()
            out = self.quantizer.quantize(x32)  # in the grid's rows: per row, or (..., d // g, g) per group
            mask = self.pass_mask(self.quantizer.rows(x32), out) if needs_grad or self.record_mask else None
            mask = None if mask is None else mask.reshape(x.shape)
        if self.record_mask:
            self.last_mask = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
        values = out.values.reshape(x.shape).to(x.dtype)
        return MaskedStraightThrough.apply(x, values, mask) if needs_grad else values


ESTIMATORS: dict[str, type[nn.Module]] = {}
"""Registry: estimator name -> class. Add one with one file and `@register_estimator("name")`."""


def register_estimator(name: str):
    """Class decorator adding an estimator class to `ESTIMATORS` under `name`."""

    def decorate(cls):
        if name in ESTIMATORS:
            raise ValueError(f"estimator {name!r} is already registered")
        cls.name = name
        ESTIMATORS[name] = cls
        return cls

    return decorate


def build(name: str, quantizer: Grid | None = None, **kwargs) -> nn.Module:
    """Build the estimator registered as `name` over `quantizer` (ValueError for an unknown name)."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; registered estimators: {', '.join(sorted(ESTIMATORS))}")
    return ESTIMATORS[name](quantizer=quantizer, **kwargs)
