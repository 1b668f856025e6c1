"""Quantized backward pass of a linear layer: the output gradient entering both backward GEMMs in NVFP4.

For y = x W^T with output gradient G (tokens x out), the backward GEMMs are dX = G W (contraction over `out`) and
dW = G^T X (contraction over tokens). Each GEMM gets G quantized along its own contraction dimension, in NVFP4 groups
of 16 (E2M1 elements, E4M3 group scales, an fp32 tensor scale; `quantizers.nvfp4`), as FP4 tensor cores would need:
along `out` for dX, along tokens for dW. W and X stay as the forward used them; the bias gradient is exact.

Modes (`quant.backward`):
* `none`: the full-precision backward (plain `F.linear`).
* `sr`: stochastic rounding, unbiased: the group scale is rounded *up* to E4M3 so no element exceeds 6, then each
  element rounds up with probability (|y| - lo) / (hi - lo): E[Q(G)] = G.
* `rtn_rht`: a random Hadamard transform (fresh random signs D each call, block 128 along the contraction dimension),
  NVFP4 round-to-nearest (absmax scales), then the inverse rotation: Q(G) = RTN(G D H) H D. Lower error than `sr`
  but not exactly unbiased (the rotation only decorrelates the rounding errors); tests measure both.
Dimensions that are not a multiple of the group (16) or block (128) are zero-padded for the quantization only.
The matmuls run in fp32 (an emulation: values are exact FP4 times scales, not a faster GEMM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from quest_pl.quantizers import hadamard_transform
from quest_pl.quantizers.e2m1 import E2M1_MAX, E4M3_MAX, e4m3_nearest, e4m3_up, scaled_e2m1, stochastic_round_e2m1
from quest_pl.quantizers.nvfp4 import NV_BLOCK, tensor_scale

BACKWARD_MODES = ("none", "sr", "rtn_rht")
RHT_BLOCK = 128


def _pad_last(x: Tensor, multiple: int) -> Tensor:
    pad = -x.shape[-1] % multiple
    return F.pad(x, (0, pad)) if pad else x


def _groups_and_tensor_scale(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x (..., rows, cols) as NVFP4 groups (..., rows, cols / 16, 16), their max |x|, and the fp32 tensor scale
    G = max|x| / (6 * 448) per matrix (leading dims are independent tensors)."""
    groups = x.unflatten(-1, (-1, NV_BLOCK))
    amax = groups.abs().amax(-1, keepdim=True)
    return groups, amax, tensor_scale(amax.amax(dim=(-3, -2, -1), keepdim=True), E2M1_MAX * E4M3_MAX)


def sr_nvfp4(x: Tensor) -> Tensor:
    """Unbiased NVFP4 stochastic rounding of fp32 matrices (..., rows, cols) along cols (a multiple of 16)."""
    groups, amax, g = _groups_and_tensor_scale(x)
    d = e4m3_up(amax / E2M1_MAX / g) * g
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.where(d > 0, stochastic_round_e2m1(groups / safe) * safe, torch.zeros_like(groups))
    return q.flatten(-2)


def rtn_nvfp4(x: Tensor) -> Tensor:
    """NVFP4 round-to-nearest with absmax scales (the `nvfp4` grid's rule), per matrix of (..., rows, cols)."""
    groups, amax, g = _groups_and_tensor_scale(x)
    return scaled_e2m1(groups, e4m3_nearest(amax / E2M1_MAX / g) * g).flatten(-2)


def rtn_rht_nvfp4(x: Tensor) -> Tensor:
    """Random-Hadamard NVFP4 round-to-nearest of fp32 matrices (..., rows, cols) along cols (a multiple of 128); one
    random sign vector per matrix."""
    signs = torch.randint(0, 2, (*x.shape[:-2], 1, x.shape[-1]), device=x.device).float().mul_(2).sub_(1)
    return hadamard_transform(rtn_nvfp4(hadamard_transform(x * signs, RHT_BLOCK)), RHT_BLOCK) * signs


def quantize_gradient(g: Tensor, mode: str) -> Tensor:
    """Q(g) along the last dim of a gradient matrix (rows, cols), or of a stack (..., rows, cols) of independent ones
    (fp32 out, same shape); `mode` in BACKWARD_MODES."""
    if mode == "none":
        return g.float()
    cols = g.shape[-1]
    if mode == "sr":
        return sr_nvfp4(_pad_last(g.float(), NV_BLOCK))[..., :cols]
    if mode == "rtn_rht":
        return rtn_rht_nvfp4(_pad_last(g.float(), RHT_BLOCK))[..., :cols]
    raise ValueError(f"backward mode {mode!r}: expected one of {', '.join(BACKWARD_MODES)}")


class QuantizedBackwardLinear(torch.autograd.Function):
    """Forward: F.linear(x, weight, bias). Backward: dX = Q(G) W and dW = Q(G^T) X (module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, mode: str) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.mode, ctx.has_bias = mode, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (quantize_gradient(g, ctx.mode) @ weight.float()).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1]).float()
            grad_w = (quantize_gradient(g.t(), ctx.mode) @ x2).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(grad.dtype)
        return grad_x, grad_w, grad_b, None


def quantized_backward_linear(x: Tensor, weight: Tensor, bias: Tensor | None, mode: str) -> Tensor:
    """y = x W^T + b whose backward quantizes the output gradient (`mode` in BACKWARD_MODES; "none": F.linear)."""
    if mode == "none":
        return F.linear(x, weight, bias)
    return QuantizedBackwardLinear.apply(x, weight, bias, mode)
