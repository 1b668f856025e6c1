"""The layers PTQ puts in place of a block's ``nn.Linear``: :class:`PTQLinear` (a data-free grid's dequantized weight)
and :class:`AQLMLinear` (codes, codebooks and scales); both rotate the input as QAT's ``QuantLinear`` does."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from quest_pl import quantizers

log = logging.getLogger(__name__)


class PTQLinear(nn.Module):
    """A linear layer with frozen quantized weights in the (optionally) rotated basis: ``y = Qa(x H) W_q^T``; the
    input is rotated (block ``hadamard_block``) and quantized in fp32, as QAT's ``QuantLinear`` does."""

    def __init__(
        self,
        weight_q: torch.Tensor,
        bias: torch.Tensor | None,
        hadamard: bool,
        act_quant: nn.Module | None,
        hadamard_block: int = quantizers.HADAMARD_BLOCK,
    ):
        super().__init__()
        self.weight = nn.Parameter(weight_q, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.hadamard = hadamard
        self.hadamard_block = hadamard_block
        self.act_quant = act_quant

    def extra_repr(self) -> str:
        out, cols = self.weight.shape
        block = f", hadamard_block={self.hadamard_block}" if self.hadamard_block != quantizers.HADAMARD_BLOCK else ""
        return f"in_features={cols}, out_features={out}, hadamard={self.hadamard}{block}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hadamard or self.act_quant is not None:
            t = x.to(torch.promote_types(x.dtype, torch.float32))  # no rounding between the rotation and the grid
            t = quantizers.hadamard_transform(t, self.hadamard_block) if self.hadamard else t
            x = (t if self.act_quant is None else self.act_quant(t)).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


class AQLMLinear(nn.Module):
    """A linear layer whose weight is additive-quantized (:mod:`quest_pl.quantizers.aqlm`): codes (buffer), codebooks
    and per-row scales (parameters, frozen except during end-to-end fine-tuning), in the (optionally) Hadamard-rotated
    basis: ``y = Qa(x H) W_hat^T`` with ``W_hat = dequantize(codes, codebooks, scales)``."""

    def __init__(self, q, bias: torch.Tensor | None, hadamard: bool, act_quant: nn.Module | None):
        super().__init__()
        self.register_buffer("codes", q.codes)
        self.codebooks = nn.Parameter(q.codebooks, requires_grad=False)
        self.scales = nn.Parameter(q.scales, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.hadamard = hadamard
        self.act_quant = act_quant

    @property
    def weight(self) -> torch.Tensor:
        from quest_pl.quantizers.aqlm import dequantize

        return dequantize(self.codes, self.codebooks, self.scales)

    def extra_repr(self) -> str:
        (out, groups, m), (_, k, g) = self.codes.shape, self.codebooks.shape
        return f"in_features={groups * g}, out_features={out}, codebooks={m}x{k.bit_length() - 1}, group_size={g}, " \
            f"hadamard={self.hadamard}"  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hadamard:
            x = quantizers.hadamard_transform(x)
        if self.act_quant is not None:
            x = self.act_quant(x)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
