"""Quantized backward pass of a linear layer: the operands of both backward GEMMs in a 4- or 8-bit format.

For y = x W^T with output gradient G (tokens x out), the backward GEMMs are dX = G W (contraction over `out`) and
dW = G^T X (contraction over tokens). Each operand is quantized in groups along its GEMM's contraction dimension, as
FP4/INT8 tensor cores need: G along `out` for dX and along tokens for dW; with `operands="all"` also W along `out`
(dX = Q(G) Q(W)) and X along tokens (dW = Q(G^T) Q(X)). The bias gradient is exact.

Formats (`quant.backward_format`), each element e = code * d with one scale d per group:
* `nvfp4` (default): E2M1 codes, groups of 16, d = an E4M3 scale times an fp32 scale per matrix (`quantizers.nvfp4`).
* `mxfp4`: E2M1 codes, groups of 32, d an E8M0 power of two (`quantizers.mx`).
* `int8`: integer codes -127..127 (255 levels, symmetric), groups of 32, d = max|x| / 127 in fp32.
* `fp8`: FP8 E4M3 codes (±448), one fp32 scale per row along the contraction dimension, d = max|x| / 448, as float8
  training with row-wise scales; round to nearest only (`rtn`, `rtn_rht`). With the low-precision forward
  (`quant.matmul=int8`, grids of at most 4 bits, `operands="grad"`) both GEMMs run on FP8 tensor cores
  (`kernels.fp8`: the saved operands enter as their exact codes, their per-row steps folded into the gradient before
  it is rounded); on the bf16 path this module emulates them.
Modes (`quant.backward`):
* `none`: the full-precision backward (plain `F.linear`).
* `sr`: stochastic rounding of the gradient, unbiased: the scale is chosen so that no element exceeds the largest code
  (NVFP4: E4M3 rounded up; MXFP4: the power of two at or above max|x| / 6; INT8: max|x| / 127 exactly), then each
  element rounds up with probability (y - lo) / (hi - lo) between its neighbouring codes: E[Q(G)] = G, with variance
  (hi - y)(y - lo) d^2 per element.
* `rtn`: round to nearest with the format's absmax scale, no rotation (biased; the cheapest, what FP8 training does).
* `rtn_rht`: a random Hadamard transform (fresh random signs D each call, block 128 along the contraction dimension),
  round-to-nearest with the format's absmax scale (NVFP4: E4M3 nearest; MXFP4: the OCP rule 2^(floor(log2 max|x|)
  - 2), which may saturate; INT8: max|x| / 127), then the inverse rotation: Q(G) = RTN(G D H) H D. Lower error than
  `sr` but not exactly unbiased (the rotation only decorrelates the rounding errors); tests measure both.
With `operands="all"` W and X are rounded to nearest (the format's absmax rule), never stochastically, as in NVIDIA's
NVFP4 training recipe: stochastic rounding buys unbiasedness with variance (per element, round-to-nearest's error is the
smaller of SR's two outcomes), and the gradient is the tensor whose rounding errors the optimizer sums over steps; a
W·A forward already computes with rounded W and X. The price: under `sr` each GEMM is unbiased for G Q(W) and
G^T Q(X), not for G W and G^T X; that deterministic part of the error shows in the gradient-alignment diagnostic
(METHOD.md §4.2). Under `rtn_rht` both operands of a GEMM share one rotation, (D H)(D H)^T = I, so each GEMM is
RTN(G D H) RTN(W^T D H)^T in the rotated basis, as a rotated low-precision GEMM computes.
Dimensions that are not a multiple of the group or block (128) are zero-padded for the quantization only.
The matmuls run in fp32 (an emulation: values are exact codes times scales, not a faster GEMM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from quest_pl.quantizers import hadamard_transform
from quest_pl.quantizers.e2m1 import (
    E2M1_MAX,
    E4M3_MAX,
    e4m3_nearest,
    e4m3_up,
    e8m0_floor,
    e8m0_up,
    round_e2m1,
    stochastic_round_e2m1,
)
from quest_pl.quantizers.mx import E2M1_EMAX, MX_BLOCK
from quest_pl.quantizers.nvfp4 import NV_BLOCK, tensor_scale

BACKWARD_MODES = ("none", "sr", "rtn", "rtn_rht")
BACKWARD_FORMATS = ("nvfp4", "mxfp4", "int8", "fp8")
SR_FORMATS = ("nvfp4", "mxfp4", "int8")  # the formats with stochastic rounding
BACKWARD_OPERANDS = ("grad", "all")
FORMAT_GROUP = {"nvfp4": NV_BLOCK, "mxfp4": MX_BLOCK, "int8": 32, "fp8": 1}  # fp8: one scale per whole row
INT8_MAX = 127.0
RHT_BLOCK = 128


def _pad_last(x: Tensor, multiple: int) -> Tensor:
    pad = -x.shape[-1] % multiple
    return F.pad(x, (0, pad)) if pad else x


def _check(mode: str, fmt: str, operands: str = "grad") -> None:
    for what, value, allowed in (("mode", mode, BACKWARD_MODES), ("format", fmt, BACKWARD_FORMATS),
                                 ("operands", operands, BACKWARD_OPERANDS)):  # fmt: skip
        if value not in allowed:
            raise ValueError(f"backward {what} {value!r}: expected one of {', '.join(allowed)}")
    if mode == "sr" and fmt not in SR_FORMATS:
        formats = ", ".join(SR_FORMATS)
        raise ValueError(f"backward format {fmt!r} rounds to nearest: use mode rtn or rtn_rht, or format {formats}")


def _groups_and_tensor_scale(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x (..., rows, cols) as NVFP4 groups (..., rows, cols / 16, 16), their max |x|, and the fp32 tensor scale
    G = max|x| / (6 * 448) per matrix (leading dims are independent tensors)."""
    groups = x.unflatten(-1, (-1, NV_BLOCK))
    amax = groups.abs().amax(-1, keepdim=True)
    return groups, amax, tensor_scale(amax.amax(dim=(-3, -2, -1), keepdim=True), E2M1_MAX * E4M3_MAX)


def quantize_groups(x: Tensor, fmt: str, stochastic: bool) -> tuple[Tensor, Tensor]:
    """(codes, d) of fp32 matrices x (..., rows, cols) quantized along cols (a multiple of the format's group):
    codes (..., rows, cols / g, g) on the element grid (E2M1 values, integers -127..127, E4M3 values with one group of
    g = cols per row for fp8), d (..., rows, cols / g, 1)
    the group scales (0 for an all-zero group, or one whose scale underflowed: its codes are 0); Q(x) = codes * d.
    `stochastic`: the unbiased rounding with non-saturating scales; else round to nearest with the format's absmax
    scale (module docstring)."""
    if fmt == "fp8":
        if stochastic:
            raise ValueError("the fp8 backward format rounds to nearest only")
        groups = x.unsqueeze(-2)
        amax = groups.abs().amax(-1, keepdim=True)
        d = amax / E4M3_MAX
        safe = torch.where(d > 0, d, torch.ones_like(d))
        codes = (groups / safe).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
        return codes, d
    if fmt == "nvfp4":
        groups, amax, g = _groups_and_tensor_scale(x)
        d = (e4m3_up if stochastic else e4m3_nearest)(amax / E2M1_MAX / g) * g
    else:
        groups = x.unflatten(-1, (-1, FORMAT_GROUP[fmt]))
        amax = groups.abs().amax(-1, keepdim=True)
        if fmt == "mxfp4":
            d = e8m0_up(amax / E2M1_MAX) if stochastic else e8m0_floor(amax / 2**E2M1_EMAX)
            d = torch.where(amax > 0, d, torch.zeros_like(d))  # an all-zero group: scale 0, codes 0
        else:
            d = amax / INT8_MAX
    safe = torch.where(d > 0, d, torch.ones_like(d))
    y = groups / safe
    if fmt == "int8":
        y = y.clamp(-INT8_MAX, INT8_MAX)  # max|x| / (max|x| / 127) may round a hair above 127
        if stochastic:
            lo = y.floor()
            codes = lo + (torch.rand_like(y) < y - lo).float()
        else:
            codes = y.round()
    else:
        codes = stochastic_round_e2m1(y) if stochastic else round_e2m1(y)
    codes = torch.where(d > 0, codes, torch.zeros_like(codes))
    return codes, torch.where(d > 0, d, torch.zeros_like(d))


def _quantize(x: Tensor, fmt: str, stochastic: bool) -> Tensor:
    """Q(x) = codes * d of fp32 matrices (..., rows, cols) along cols (a multiple of the group), flattened back."""
    codes, d = quantize_groups(x, fmt, stochastic)
    safe = torch.where(d > 0, d, torch.ones_like(d))
    return torch.where(d > 0, codes * safe, torch.zeros_like(codes)).flatten(-2)


def _random_signs(x: Tensor) -> Tensor:
    """One random sign vector (..., 1, cols) per matrix of x (..., rows, cols)."""
    return torch.randint(0, 2, (*x.shape[:-2], 1, x.shape[-1]), device=x.device).float().mul_(2).sub_(1)


def rtn_rht(x: Tensor, fmt: str = "nvfp4") -> Tensor:
    """Random-Hadamard round-to-nearest of fp32 matrices (..., rows, cols) along cols (a multiple of 128); one
    random sign vector per matrix."""
    signs = _random_signs(x)
    return hadamard_transform(_quantize(hadamard_transform(x * signs, RHT_BLOCK), fmt, False), RHT_BLOCK) * signs


def quantize_gradient(g: Tensor, mode: str, fmt: str = "nvfp4") -> Tensor:
    """Q(g) along the last dim of a gradient matrix (rows, cols), or of a stack (..., rows, cols) of independent ones
    (fp32 out, same shape); `mode` in BACKWARD_MODES, `fmt` in BACKWARD_FORMATS."""
    _check(mode, fmt)
    if mode == "none":
        return g.float()
    cols = g.shape[-1]
    if mode in ("sr", "rtn"):
        return _quantize(_pad_last(g.float(), FORMAT_GROUP[fmt]), fmt, mode == "sr")[..., :cols]
    return rtn_rht(_pad_last(g.float(), RHT_BLOCK), fmt)[..., :cols]


def quantize_operand(x: Tensor, fmt: str = "nvfp4") -> Tensor:
    """Round-to-nearest Q(x) along the last dim (the format's absmax rule; fp32 out, same shape): how a saved weight
    or activation enters a backward GEMM under `operands="all"` and `mode="sr"`."""
    _check("rtn", fmt)
    cols = x.shape[-1]
    return _quantize(_pad_last(x.float(), FORMAT_GROUP[fmt]), fmt, False)[..., :cols]


def backward_gemm(a: Tensor, b: Tensor, mode: str, fmt: str = "nvfp4", operands: str = "grad") -> Tensor:
    """Q(a) Q(b)^T (fp32) for a gradient a (m, K) and a saved operand b (n, K), both along K: dX = G W is
    backward_gemm(G, W^T) and dW = G^T X is backward_gemm(G^T, X^T). `operands="grad"`: b enters exact; `"all"`: b
    rounded to nearest too, under `rtn_rht` in the rotated basis the gradient is quantized in (module docstring)."""
    _check(mode, fmt, operands)
    if operands == "grad" or mode == "none":
        return quantize_gradient(a, mode, fmt) @ b.float().t()
    if mode in ("sr", "rtn"):
        return quantize_gradient(a, mode, fmt) @ quantize_operand(b, fmt).t()
    a, b = _pad_last(a.float(), RHT_BLOCK), _pad_last(b.float(), RHT_BLOCK)  # zero columns add nothing to the product
    signs = _random_signs(a)
    qa = _quantize(hadamard_transform(a * signs, RHT_BLOCK), fmt, False)
    qb = _quantize(hadamard_transform(b * signs, RHT_BLOCK), fmt, False)
    return qa @ qb.t()


class QuantizedBackwardLinear(torch.autograd.Function):
    """Forward: F.linear(x, weight, bias). Backward: dX = Q(G) Q(W) and dW = Q(G^T) Q(X), W and X exact unless
    operands="all" (`backward_gemm`, module docstring)."""

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, bias: Tensor | None, mode: str, fmt: str = "nvfp4", operands: str = "grad"
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.mode, ctx.fmt, ctx.operands, ctx.has_bias = mode, fmt, operands, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # dX = G W: contraction over out (drawn first)
            grad_x = backward_gemm(g, weight.t(), ctx.mode, ctx.fmt, ctx.operands).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:  # dW = G^T X: contraction over tokens
            x2 = x.reshape(-1, x.shape[-1])
            grad_w = backward_gemm(g.t(), x2.t(), ctx.mode, ctx.fmt, ctx.operands).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(grad.dtype)
        return grad_x, grad_w, grad_b, None, None, None


def quantized_backward_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, mode: str, fmt: str = "nvfp4", operands: str = "grad"
) -> Tensor:
    """y = x W^T + b whose backward quantizes the operands of its GEMMs (`mode` in BACKWARD_MODES, `fmt` in
    BACKWARD_FORMATS, `operands` in BACKWARD_OPERANDS; mode "none": F.linear)."""
    if mode == "none":
        return F.linear(x, weight, bias)
    _check(mode, fmt, operands)
    return QuantizedBackwardLinear.apply(x, weight, bias, mode, fmt, operands)
