"""The integer path of a W·A layer (docs/METHOD.md §5): an exact integer matmul of the odd integer codes times
per-row scales.

For a centered INT grid on both operands, ``W_q = (c_w / 2) step_w`` and ``Qa(x) = (c_a / 2) step_a`` with odd integer
codes ``c`` (0 for a pruned 2:4 element), so a W4A4 layer is ``y = (c_a c_w^T) * (step_a / 2) * (step_w / 2)^T``: one
exact integer matmul times per-row scales, with the rotation of both operands cancelling in the full form as well.
:func:`int_matmul` is the single place where a CUDA INT8 GEMM serves it; elsewhere it runs an exact float64 reference.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quest_pl import quantizers
from quest_pl.packing import int_step, odd_codes


def int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact ``a @ b^T`` of integer codes ``a [M, K]``, ``b [N, K]`` (|code| <= 255), as float64 integers ``[M, N]``.

    The single place the CUDA INT8 GEMM plugs in: on CUDA, with codes that fit int8,
    ``quest_pl.kernels.int8.int_matmul`` (int32 accumulation) when it exists. Elsewhere a float64 matmul, which is
    exact here: every product is an integer below 2^16 and every partial sum an integer below K * 2^16 < 2^53 (for
    K < 2^37), all exactly representable, so any summation order gives the exact integer result.
    """
    if a.is_cuda and a.abs().max() <= 127 and b.abs().max() <= 127:
        try:
            from quest_pl.kernels.int8 import int_matmul as cuda_int_matmul
        except ImportError:
            cuda_int_matmul = None
        if cuda_int_matmul is not None:
            return cuda_int_matmul(a.to(torch.int8).contiguous(), b.to(torch.int8).contiguous()).double()
    return a.double() @ b.double().T


def int_linear(
    x: Tensor, act_quant: nn.Module, hadamard: str | None, block: int, weight_codes: Tensor, weight_half_step: Tensor
) -> Tensor:
    """``y = (c_a c_w^T) (step_a / 2) (step_w / 2)^T`` for a layer whose weight has odd codes ``weight_codes``
    ``[N, K]`` and half steps ``weight_half_step`` ``[N]``; the activation codes come from ``act_quant`` (rotated
    first when ``hadamard`` is set: the rotation cancels in both forms)."""
    x32 = x.float()
    if hadamard is not None:
        x32 = quantizers.hadamard_transform(x32, block)
    values = act_quant(x32).float()
    half_step = int_step(act_quant, x32) / 2  # exact halving
    codes = odd_codes(values, 2 * half_step)
    acc = int_matmul(codes.flatten(0, -2), weight_codes)
    y = acc * half_step.flatten(0, -2).double() * weight_half_step.double().reshape(1, -1)
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)
