"""`none`: no quantization; the input passes through unchanged (BF16 / A16 baselines, METHOD.md §1.10)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quest_pl.estimators.base import register_estimator


@register_estimator("none")
class Identity(nn.Module):
    def __init__(self, quantizer=None) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.record_mask = False
        self.last_mask: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.record_mask:
            self.last_mask = torch.ones_like(x, dtype=torch.bool)
        return x

    def expected_masked_fraction(self) -> float:
        return 0.0
