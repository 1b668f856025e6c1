"""INT8 forward for QuEST linears on a centered integer grid (METHOD.md §1.3, §1.8, §5).

A gaussian_mse grid of b <= 7 bits has the values (k + ½)Δ, k in [-2^(b-1), 2^(b-1) - 1], i.e. the odd integers
c = 2k + 1 in [-(2^b - 1), 2^b - 1] times Δ/2. The fused quantizer emits c as int8 and Δ/2 per row (fp32) for each
operand, both quantized along the inner dimension K, so the half-form product is

    y = Q(x H) Q(W H)^T = (C_x C_w^T) ⊙ (s_x s_w^T),      s = Δ/2 per row,

an integer GEMM with exact int32 accumulation (|c| <= 127, exact for K <= 2^31 / 127^2 = 133,144) and the two scales
applied in fp32 in the epilogue, then one rounding to the output dtype. The bf16 fake-quantized path computes the same
sum from the values rounded to bf16 (Δ/2 has 24 significant bits, its bf16 copy 8), so it is the less exact of the
two: both agree up to the bf16 rounding of the operands' scales and of the result (tests/test_int8.py).

The backward is the paper's estimator backward on the dequantized operands, as in the bf16 path: grad_{x_h} =
grad_y · Q_w, grad_{W_h} = grad_y^T · Q_x in the gradient's dtype, then the masked transposed Hadamard kernel. Only the
int8 codes (1 byte per element), the per-row scales and the bit-packed masks are saved for it.

Public API:
  int_matmul(a, b)              int8 (M, K) · int8 (N, K)^T -> int32 (M, N), exact (torch._int_mm on CUDA, padded to
                                its shape constraints; an exact float64 product elsewhere)
  scaled_int_matmul(a, b, s_a, s_b, out_dtype)   the same with the scales in the epilogue (Triton INT8 GEMM)
  quantize_codes(x, ...)        (int8 codes, bit-packed mask, fp32 Δ/2 per row): the fused quantizer's codes form
  dequantize(codes, scales, dtype)               codes · Δ/2, the fake-quantized values
  quest_int8_linear(x, weight, act, weight_args) the differentiable W·A INT8 linear (custom op under torch.compile)
  int8_unsupported(grid, bits, estimator, group_size) -> reason or None
"""

from __future__ import annotations

import torch

from quest_pl import kernels as _kernels
from quest_pl.quantizers import OPTIMAL_GAUSSIAN_SCALES

__all__ = [
    "MAX_BITS",
    "dequantize",
    "int8_unsupported",
    "int_matmul",
    "quantize_codes",
    "quest_int8_linear",
    "scaled_int_matmul",
]

MAX_BITS = 7  # odd codes up to 2^7 - 1 = 127 fit int8
MAX_EXACT_K = 2**31 // (127 * 127)  # int32 accumulation of 7-bit codes cannot overflow up to this K
_INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA: rows > 16, K and N multiples of 8


def int8_unsupported(grid: str, bits, estimator: str, group_size: int | None = None) -> str | None:
    """Why the INT8 forward cannot serve an operand quantized this way, or None if it can. Group scales cannot: the
    GEMM's epilogue multiplies each output by one scale per row of each operand (a group scale varies along K)."""
    if grid != "gaussian_mse":
        return f"the int8 matmul needs a centered integer grid (gaussian_mse), got {grid!r}"
    if bits not in OPTIMAL_GAUSSIAN_SCALES or bits > MAX_BITS:
        return f"the int8 matmul needs at most {MAX_BITS} bits (odd codes up to 127), got {bits!r}"
    if estimator not in _kernels.ESTIMATORS:
        return f"estimator {estimator!r} has no kernel (supported: {', '.join(_kernels.ESTIMATORS)})"
    if group_size is not None:
        return f"the int8 matmul needs one scale per row of each operand (its epilogue), got group_size={group_size!r}"
    return None


def cuda_int8_available(device: torch.device | str | None = None) -> bool:
    """INT8 tensor cores (sm_80 or newer) on this CUDA device."""
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _check_int8_operands(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise ValueError(f"int_matmul needs int8 operands, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"int_matmul needs a (M, K) and b (N, K), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"int_matmul operands on different devices: {a.device} and {b.device}")


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if t.shape == (rows, cols):
        return t
    return torch.nn.functional.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) int8 · b (N, K)^T int8 -> (M, N) int32, exact (no overflow for K·max|a|·max|b| < 2^31).

    CUDA: ``torch._int_mm`` (cuBLASLt INT8 tensor cores); its constraints (M > 16, K and N multiples of 8) are met by
    zero padding, which leaves the sums unchanged. Elsewhere: the product in float64, exact for these sizes (each
    partial sum is an integer below 2^53), converted to int32."""
    _check_int8_operands(a, b)
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((m, n), dtype=torch.int32, device=a.device)
    if a.is_cuda:
        rows = max(m, _INT_MM_MIN_ROWS)
        rows += -rows % 8
        kp, np_ = k + (-k % 8), n + (-n % 8)
        a_p = _pad_to(a.contiguous(), rows, kp)
        b_p = _pad_to(b.contiguous(), np_, kp)
        return torch._int_mm(a_p, b_p.t())[:m, :n]
    return (a.double() @ b.double().t()).to(torch.int32)


def scaled_int_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """(a · b^T) ⊙ (scale_a[:, None] · scale_b[None, :]) in ``out_dtype``: int32 accumulation, fp32 epilogue.

    CUDA (or CPU under Triton's interpreter): one Triton INT8 GEMM with the scales in its epilogue. CPU otherwise:
    ``int_matmul`` then the same fp32 epilogue."""
    _check_int8_operands(a, b)
    if a.is_cuda or (a.device.type == "cpu" and _kernels._interpreting()):
        from quest_pl.kernels import _triton

        return _triton.int8_matmul(a, b, scale_a.float().contiguous(), scale_b.float().contiguous(), out_dtype)
    acc = int_matmul(a, b).float()
    return (acc * scale_a.float()[:, None] * scale_b.float()[None, :]).to(out_dtype)


def quantize_codes(
    x: torch.Tensor,
    bits: int = 4,
    grid: str = "gaussian_mse",
    hadamard: bool = True,
    estimator: str = "trust",
    trust: float | None = None,
    clip_scale: float = 1.0,
    group_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused quantizer's codes form for x (..., K): (int8 codes 2k + 1 (..., K), bit-packed mask (..., ceil(K/8))
    uint8, fp32 Δ/2 (...)), with ``dequantize(codes, scales)`` equal to ``kernels.fused_quantize``'s values in fp32.
    Takes ``kernels.quest_quantize``'s keywords; ``group_size`` must be None (per-row scales: ``int8_unsupported``)."""
    reason = int8_unsupported(grid, bits, estimator, group_size)
    if reason:
        raise ValueError(reason)
    trust = _kernels._resolve(x, bits, grid, hadamard, estimator, trust, clip_scale)
    return _codes_impl(x, bits, hadamard, estimator, trust, float(clip_scale))


def _codes_impl(x, bits, hadamard, estimator, trust, clip_scale):
    if x.device.type == "cpu" and not _kernels._interpreting():
        raise RuntimeError(
            "kernels: CPU tensors run only under Triton's interpreter; set TRITON_INTERPRET=1 before Triton is imported"
        )
    from quest_pl.kernels import _triton

    width = x.shape[-1]
    codes, mask, scales = _triton.quantize_forward(
        x.reshape(-1, width),
        grid="gaussian_mse",
        n_levels=2**bits,
        scale_coef=OPTIMAL_GAUSSIAN_SCALES[bits],
        hadamard=hadamard,
        estimator=estimator,
        trust=trust,
        clip_scale=clip_scale,
        codes=True,
    )
    return codes.view(x.shape), mask.view(*x.shape[:-1], mask.shape[-1]), scales.view(x.shape[:-1])


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes · Δ/2 per row in fp32, rounded once to ``dtype``: the fake-quantized values of the bf16 path. One Triton
    pass in eager mode on CUDA (three PyTorch passes otherwise; under torch.compile Inductor fuses them)."""
    # A plain tensor only: under torch.compile (also while AOT autograd traces a custom op's backward, where
    # is_compiling() can be False) the operands are fake or functional tensors that a Triton launch cannot read.
    eager = type(codes) is torch.Tensor and not torch.compiler.is_compiling()
    if eager and codes.is_cuda and codes.stride(-1) == 1 and codes.dim() == 2:
        from quest_pl.kernels import _triton

        return _triton.dequantize(codes, scales.float().contiguous(), dtype)
    return (codes.float() * scales.unsqueeze(-1)).to(dtype)


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


_T = torch.Tensor


def _linear_forward(
    x: _T, weight: _T, a_bits: int, a_estimator: str, a_trust: float, a_clip: float,
    w_bits: int, w_estimator: str, w_trust: float, w_clip: float, hadamard: bool, out_dtype: torch.dtype,
) -> tuple[_T, _T, _T, _T, _T, _T, _T]:  # fmt: skip
    """(y, x codes, x mask, x scales, W codes, W mask, W scales)."""
    ca, ma, sa = _codes_impl(x, a_bits, hadamard, a_estimator, a_trust, a_clip)
    cw, mw, sw = _codes_impl(weight, w_bits, hadamard, w_estimator, w_trust, w_clip)
    k = x.shape[-1]
    y = scaled_int_matmul(ca.reshape(-1, k), cw, sa.reshape(-1), sw, out_dtype)
    return y.view(*x.shape[:-1], weight.shape[0]), ca, ma, sa, cw, mw, sw


def _linear_backward(grad_y, ca, ma, sa, cw, mw, sw, hadamard, x_dtype, w_dtype, backward_rotation):
    """grad_x = ((grad_y · Q_w) ⊙ m_x) H, grad_W = ((grad_y^T · Q_x) ⊙ m_w) H, products in grad_y's dtype."""
    k = cw.shape[1]
    g = grad_y.reshape(-1, cw.shape[0])
    dtype = g.dtype
    grad_xh = g @ dequantize(cw, sw, dtype)
    grad_wh = g.t() @ dequantize(ca.reshape(-1, k), sa.reshape(-1), dtype)
    grad_x = backward_rotation(grad_xh, ma.reshape(-1, ma.shape[-1]), hadamard)
    grad_w = backward_rotation(grad_wh, mw, hadamard)
    return grad_x.reshape(ca.shape).to(x_dtype), grad_w.to(w_dtype)


_linear_op = torch.library.custom_op("quest_kernels::int8_linear", _linear_forward, mutates_args=())


@_linear_op.register_fake
def _linear_fake(x, weight, a_bits, a_estimator, a_trust, a_clip, w_bits, w_estimator, w_trust, w_clip, hadamard,
                 out_dtype):  # fmt: skip
    k = x.shape[-1]
    n = weight.shape[0]
    byte_cols = (k + 7) // 8
    return (
        x.new_empty((*x.shape[:-1], n), dtype=out_dtype),
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty((*x.shape[:-1], byte_cols), dtype=torch.uint8),
        x.new_empty(x.shape[:-1], dtype=torch.float32),
        weight.new_empty(weight.shape, dtype=torch.int8),
        weight.new_empty((n, byte_cols), dtype=torch.uint8),
        weight.new_empty((n,), dtype=torch.float32),
    )


def _op_setup_context(ctx, inputs, output):
    x, weight = inputs[0], inputs[1]
    ctx.hadamard = inputs[10]
    ctx.dtypes = (x.dtype, weight.dtype)
    ctx.save_for_backward(*output[1:])


def _op_backward(ctx, grad_y, *unused):
    grad_x, grad_w = _linear_backward(
        grad_y, *ctx.saved_tensors, ctx.hadamard, *ctx.dtypes, torch.ops.quest_kernels.quantize_backward
    )
    return (grad_x, grad_w) + (None,) * 10


_linear_op.register_autograd(_op_backward, setup_context=_op_setup_context)


class _Int8Linear(torch.autograd.Function):
    """Eager path: the same kernels without the custom-op dispatch."""

    @staticmethod
    def forward(ctx, x, weight, *args):
        y, *saved = _linear_forward(x, weight, *args)
        ctx.hadamard = args[8]
        ctx.dtypes = (x.dtype, weight.dtype)
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        grad_x, grad_w = _linear_backward(
            grad_y, *ctx.saved_tensors, ctx.hadamard, *ctx.dtypes, _kernels._quantize_backward_impl
        )
        return (grad_x, grad_w) + (None,) * 10


def _operand_args(args: dict, x: torch.Tensor) -> tuple:
    """(bits, estimator, τ, clip_scale) from a ``kernels.quest_quantize`` keyword dict, validated."""
    bits, grid, estimator = args.get("bits", 4), args.get("grid", "gaussian_mse"), args.get("estimator", "trust")
    reason = int8_unsupported(grid, bits, estimator, args.get("group_size"))
    if reason:
        raise ValueError(reason)
    hadamard = args.get("hadamard", True)
    trust = _kernels._resolve(x, bits, grid, hadamard, estimator, args.get("trust"), args.get("clip_scale", 1.0))
    return int(bits), estimator, trust, float(args.get("clip_scale", 1.0))


def quest_int8_linear(
    x: torch.Tensor, weight: torch.Tensor, act: dict, weight_args: dict, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """y = Q(x H) Q(W H)^T through the INT8 GEMM, differentiable with the QuEST backward of both operands.

    ``act`` / ``weight_args``: ``kernels.quest_quantize`` keyword dicts (bits, grid, hadamard, estimator, trust,
    clip_scale; group_size None) of a centered integer grid (``int8_unsupported``); both must agree on ``hadamard``.
    x (..., K) and weight (N, K) in any float dtype (an fp32 master weight is read once, no bf16 copy); the output is in
    ``out_dtype`` (default: autocast's dtype inside autocast, else x's)."""
    hadamard = bool(act.get("hadamard", True))
    if bool(weight_args.get("hadamard", True)) != hadamard:
        raise ValueError("quest_int8_linear: both operands must be rotated, or neither")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"quest_int8_linear: x (..., {weight.shape[-1]}) and weight (N, K), got {tuple(x.shape)}")
    if x.shape[-1] > MAX_EXACT_K:
        raise ValueError(f"quest_int8_linear: K = {x.shape[-1]} could overflow int32 accumulation (max {MAX_EXACT_K})")
    args = (*_operand_args(act, x), *_operand_args(weight_args, weight), hadamard, out_dtype or _output_dtype(x))
    if torch.compiler.is_compiling():
        return torch.ops.quest_kernels.int8_linear(x, weight, *args)[0]
    return _Int8Linear.apply(x, weight, *args)


def quest_int8_linear_frozen(
    x: torch.Tensor,
    weight_codes: torch.Tensor,
    weight_scales: torch.Tensor,
    act: dict,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Inference: y = Q(x H) · (codes_w · s_w)^T with the weight's codes computed once (``quantize_codes``), no
    gradient. Only the activation is quantized per call."""
    bits, estimator, trust, clip = _operand_args(act, x)
    k = x.shape[-1]
    ca, _, sa = _codes_impl(x, bits, bool(act.get("hadamard", True)), estimator, trust, clip)
    y = scaled_int_matmul(ca.reshape(-1, k), weight_codes, sa.reshape(-1), weight_scales, out_dtype or _output_dtype(x))
    return y.view(*x.shape[:-1], weight_codes.shape[0])
