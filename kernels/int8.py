"""INT8 forward for QuEST linears on a centered integer grid (METHOD.md §1.3, §1.8, §5).

A gaussian_mse grid of b <= 7 bits has the values (k + ½)Δ, k in [-2^(b-1), 2^(b-1) - 1], i.e. the odd integers
c = 2k + 1 in [-(2^b - 1), 2^b - 1] times Δ/2. The fused quantizer emits c as int8 and Δ/2 per row (fp32) for each
operand, both quantized along the inner dimension K, so the half-form product is

    y = Q(x H) Q(W H)^T = (C_x C_w^T) ⊙ (s_x s_w^T),      s = Δ/2 per row,

an integer GEMM with exact int32 accumulation (|c| <= 127, exact for K <= 2^31 / 127^2 = 133,144) and the two scales
applied in fp32 in the epilogue, then one rounding to the output dtype. The bf16 fake-quantized path computes the same
sum from the values rounded to bf16 (Δ/2 has 24 significant bits, its bf16 copy 8), so it is the less exact of the
two: both agree up to the bf16 rounding of the operands' scales and of the result (tests/test_int8.py).

The GEMM runs on whichever exact tensor-core path is fastest for the shape (`kernels.gemm`: the Triton INT8 GEMM,
torch._int_mm + a scale epilogue, or torch._scaled_mm on FP8 E4M3 codes for grids of at most 4 bits). The weight's
codes are computed once per weight version (`kernels.weight_cache`: once per optimizer step under gradient
accumulation). The backward is the paper's estimator backward on the dequantized operands, as in the bf16 path:
grad_{x_h} = grad_y · Q_w, grad_{W_h} = grad_y^T · Q_x in the gradient's dtype, or with `backward="fp8"` both GEMMs on
FP8 tensor cores (`kernels.fp8`), then the masked transposed Hadamard kernel. Only the codes (1 byte per element), the
per-row scales and the bit-packed masks are saved for it.

Public API:
  int_matmul(a, b)              int8 (M, K) · int8 (N, K)^T -> int32 (M, N), exact (`kernels.gemm`)
  scaled_int_matmul(a, b, s_a, s_b, out_dtype)   the same with the scales in the epilogue (Triton INT8 GEMM)
  quantize_codes(x, ..., codes="int8")           (codes, bit-packed mask, fp32 Δ/2 per row): the fused quantizer's
                                codes form, int8 or FP8 E4M3
  dequantize(codes, scales, dtype)               codes · Δ/2, the fake-quantized values
  quest_int8_linear(x, weight, act, weight_args) the differentiable W·A INT8 linear (custom op under torch.compile)
  int8_unsupported(grid, bits, estimator, group_size) -> reason or None
"""

from __future__ import annotations

import torch

from quest_pl.kernels import _spec, gemm, weight_cache
from quest_pl.kernels.fp8 import fp8_backward_gemms
from quest_pl.kernels.gemm import int_matmul
from quest_pl.quantizers import OPTIMAL_GAUSSIAN_SCALES

__all__ = [
    "BACKWARD_FORMATS",
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
BACKWARD_FORMATS = ("bf16", "fp8")  # the backward GEMMs: in the gradient's dtype, or on FP8 tensor cores


def int8_unsupported(grid: str, bits, estimator: str, group_size: int | None = None) -> str | None:
    """Why the INT8 forward cannot serve an operand quantized this way, or None if it can. Group scales cannot: the
    GEMM's epilogue multiplies each output by one scale per row of each operand (a group scale varies along K)."""
    if grid != "gaussian_mse":
        return f"the int8 matmul needs a centered integer grid (gaussian_mse), got {grid!r}"
    if bits not in OPTIMAL_GAUSSIAN_SCALES or bits > MAX_BITS:
        return f"the int8 matmul needs at most {MAX_BITS} bits (odd codes up to 127), got {bits!r}"
    if estimator not in _spec.ESTIMATORS:
        return f"estimator {estimator!r} has no kernel (supported: {', '.join(_spec.ESTIMATORS)})"
    if group_size is not None:
        return f"the int8 matmul needs one scale per row of each operand (its epilogue), got group_size={group_size!r}"
    return None


def cuda_int8_available(device: torch.device | str | None = None) -> bool:
    """INT8 tensor cores (sm_80 or newer) on this CUDA device."""
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def scaled_int_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """(a · b^T) ⊙ (scale_a[:, None] · scale_b[None, :]) in ``out_dtype`` for int8 a (M, K), b (N, K): int32
    accumulation, fp32 epilogue (the Triton INT8 GEMM on CUDA and under Triton's interpreter)."""
    return gemm.scaled_matmul(a, b, scale_a, scale_b, out_dtype, "triton")


def quantize_codes(
    x: torch.Tensor,
    bits: int = 4,
    grid: str = "gaussian_mse",
    hadamard: bool = True,
    estimator: str = "trust",
    trust: float | None = None,
    clip_scale: float = 1.0,
    group_size: int | None = None,
    codes: str = "int8",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused quantizer's codes form for x (..., K): (codes 2k + 1 (..., K) as int8, or as float8_e4m3fn with
    ``codes="fp8"`` (at most 4 bits), bit-packed mask (..., ceil(K/8)) uint8, fp32 Δ/2 (...)), with
    ``dequantize(codes, scales)`` equal to ``kernels.fused_quantize``'s values in fp32. Takes
    ``kernels.quest_quantize``'s keywords; ``group_size`` must be None (per-row scales: ``int8_unsupported``)."""
    reason = int8_unsupported(grid, bits, estimator, group_size)
    if reason:
        raise ValueError(reason)
    if codes not in ("int8", "fp8"):
        raise ValueError(f"codes={codes!r}: expected 'int8' or 'fp8'")
    if codes == "fp8" and bits > gemm.FP8_MAX_BITS:
        raise ValueError(f"fp8 codes hold grids of at most {gemm.FP8_MAX_BITS} bits (odd codes up to 15), got {bits}")
    trust = _spec.resolve(x, bits, grid, hadamard, estimator, trust)
    return _codes_impl(x, bits, hadamard, estimator, trust, float(clip_scale), codes)


def _codes_impl(x, bits, hadamard, estimator, trust, clip_scale, codes="int8"):
    _spec.require_runnable(x)
    from quest_pl.kernels._tl_quantize import quantize_forward

    width = x.shape[-1]
    c, mask, scales = quantize_forward(
        x.reshape(-1, width),
        grid="gaussian_mse",
        n_levels=2**bits,
        scale_coef=OPTIMAL_GAUSSIAN_SCALES[bits],
        hadamard=hadamard,
        estimator=estimator,
        trust=trust,
        clip_scale=clip_scale,
        codes=codes,
    )
    return c.view(x.shape), mask.view(*x.shape[:-1], mask.shape[-1]), scales.view(x.shape[:-1])


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes (int8 or float8_e4m3fn) · Δ/2 per row in fp32, rounded once to ``dtype``: the fake-quantized values of
    the bf16 path. One Triton pass in eager mode on CUDA (PyTorch passes otherwise; Inductor fuses them)."""
    # A plain tensor only: under torch.compile (also while AOT autograd traces a custom op's backward, where
    # is_compiling() can be False) the operands are fake or functional tensors that a Triton launch cannot read.
    eager = type(codes) is torch.Tensor and not torch.compiler.is_compiling()
    if eager and codes.is_cuda and codes.stride(-1) == 1 and codes.dim() == 2:
        from quest_pl.kernels._tl_gemm import scale_rows_cols

        return scale_rows_cols(codes, scales.float().contiguous(), None, dtype)
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
    backend: str, backward: str,
) -> tuple[_T, _T, _T, _T, _T, _T, _T]:  # fmt: skip
    """(y, x codes, x mask, x scales, W codes, W mask, W scales); codes in `backend`'s format (`gemm.CODE_FORMAT`).
    `backward` ("bf16" or "fp8") only selects the backward GEMMs."""
    fmt = gemm.CODE_FORMAT[backend]
    ca, ma, sa = _codes_impl(x, a_bits, hadamard, a_estimator, a_trust, a_clip, fmt)
    w_args = (w_bits, hadamard, w_estimator, w_trust, w_clip, fmt)
    cw, mw, sw = weight_cache.cached(weight, w_args, lambda: _codes_impl(weight, *w_args))
    k = x.shape[-1]
    y = gemm.scaled_matmul(ca.reshape(-1, k), cw, sa.reshape(-1), sw, out_dtype, backend)
    return y.view(*x.shape[:-1], weight.shape[0]), ca, ma, sa, cw, mw, sw


def _linear_backward(grad_y, ca, ma, sa, cw, mw, sw, hadamard, x_dtype, w_dtype, backward, backward_rotation):
    """grad_x = ((grad_y · Q_w) ⊙ m_x) H, grad_W = ((grad_y^T · Q_x) ⊙ m_w) H, the products in grad_y's dtype, or on
    FP8 tensor cores (`backward="fp8"`, `kernels.fp8`)."""
    k = cw.shape[1]
    g = grad_y.reshape(-1, cw.shape[0])
    if backward == "fp8":
        grad_xh, grad_wh = fp8_backward_gemms(g, ca.reshape(-1, k), sa.reshape(-1), cw, sw)
    else:
        grad_xh = g @ dequantize(cw, sw, g.dtype)
        grad_wh = g.t() @ dequantize(ca.reshape(-1, k), sa.reshape(-1), g.dtype)
    grad_x = backward_rotation(grad_xh, ma.reshape(-1, ma.shape[-1]), hadamard)
    grad_w = backward_rotation(grad_wh, mw, hadamard)
    return grad_x.reshape(ca.shape).to(x_dtype), grad_w.to(w_dtype)


_linear_op = torch.library.custom_op("quest_kernels::int8_linear", _linear_forward, mutates_args=())


@_linear_op.register_fake
def _linear_fake(x, weight, a_bits, a_estimator, a_trust, a_clip, w_bits, w_estimator, w_trust, w_clip, hadamard,
                 out_dtype, backend, backward):  # fmt: skip
    k = x.shape[-1]
    n = weight.shape[0]
    byte_cols = (k + 7) // 8
    code_dtype = torch.int8 if gemm.CODE_FORMAT[backend] == "int8" else torch.float8_e4m3fn
    return (
        x.new_empty((*x.shape[:-1], n), dtype=out_dtype),
        x.new_empty(x.shape, dtype=code_dtype),
        x.new_empty((*x.shape[:-1], byte_cols), dtype=torch.uint8),
        x.new_empty(x.shape[:-1], dtype=torch.float32),
        weight.new_empty(weight.shape, dtype=code_dtype),
        weight.new_empty((n, byte_cols), dtype=torch.uint8),
        weight.new_empty((n,), dtype=torch.float32),
    )


_N_ARGS = 14  # inputs of _linear_forward


def _op_setup_context(ctx, inputs, output):
    x, weight = inputs[0], inputs[1]
    ctx.hadamard = inputs[10]
    ctx.dtypes = (x.dtype, weight.dtype)
    ctx.backward_format = inputs[13]
    ctx.save_for_backward(*output[1:])


def _op_backward(ctx, grad_y, *unused):
    grad_x, grad_w = _linear_backward(
        grad_y, *ctx.saved_tensors, ctx.hadamard, *ctx.dtypes, ctx.backward_format,
        torch.ops.quest_kernels.quantize_backward,
    )  # fmt: skip
    return (grad_x, grad_w) + (None,) * (_N_ARGS - 2)


_linear_op.register_autograd(_op_backward, setup_context=_op_setup_context)


class _Int8Linear(torch.autograd.Function):
    """Eager path: the same kernels without the custom-op dispatch."""

    @staticmethod
    def forward(ctx, x, weight, *args):
        y, *saved = _linear_forward(x, weight, *args)
        ctx.hadamard, ctx.backward_format = args[8], args[11]
        ctx.dtypes = (x.dtype, weight.dtype)
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        from quest_pl.kernels import _quantize_backward_impl

        grad_x, grad_w = _linear_backward(
            grad_y, *ctx.saved_tensors, ctx.hadamard, *ctx.dtypes, ctx.backward_format, _quantize_backward_impl
        )
        return (grad_x, grad_w) + (None,) * (_N_ARGS - 2)


def _operand_args(args: dict, x: torch.Tensor) -> tuple:
    """(bits, estimator, τ, clip_scale) from a ``kernels.quest_quantize`` keyword dict, validated."""
    bits, grid, estimator = args.get("bits", 4), args.get("grid", "gaussian_mse"), args.get("estimator", "trust")
    reason = int8_unsupported(grid, bits, estimator, args.get("group_size"))
    if reason:
        raise ValueError(reason)
    trust = _spec.resolve(x, bits, grid, args.get("hadamard", True), estimator, args.get("trust"))
    return int(bits), estimator, trust, float(args.get("clip_scale", 1.0))


def _backend(x, n: int, bits: int, out_dtype: torch.dtype, backend: str | None) -> str:
    k = x.shape[-1]
    return gemm.choose_backend(x.numel() // max(k, 1), n, k, bits, x.device, out_dtype, backend)


def quest_int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    act: dict,
    weight_args: dict,
    out_dtype: torch.dtype | None = None,
    backward: str = "bf16",
    backend: str | None = None,
) -> torch.Tensor:
    """y = Q(x H) Q(W H)^T through the low-precision GEMM, differentiable with the QuEST backward of both operands.

    ``act`` / ``weight_args``: ``kernels.quest_quantize`` keyword dicts (bits, grid, hadamard, estimator, trust,
    clip_scale; group_size None) of a centered integer grid (``int8_unsupported``); both must agree on ``hadamard``.
    x (..., K) and weight (N, K) in any float dtype (an fp32 master weight is read once, no bf16 copy); the output is in
    ``out_dtype`` (default: autocast's dtype inside autocast, else x's). ``backward``: "bf16" (the GEMMs in the
    gradient's dtype) or "fp8" (``kernels.fp8``; both grids of at most 4 bits). ``backend``: pin the forward GEMM
    (``kernels.gemm.BACKENDS``); default: the fastest for the shape."""
    hadamard = bool(act.get("hadamard", True))
    if bool(weight_args.get("hadamard", True)) != hadamard:
        raise ValueError("quest_int8_linear: both operands must be rotated, or neither")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"quest_int8_linear: x (..., {weight.shape[-1]}) and weight (N, K), got {tuple(x.shape)}")
    if x.shape[-1] > MAX_EXACT_K:
        raise ValueError(f"quest_int8_linear: K = {x.shape[-1]} could overflow int32 accumulation (max {MAX_EXACT_K})")
    if backward not in BACKWARD_FORMATS:
        raise ValueError(f"quest_int8_linear: backward={backward!r}, expected one of {', '.join(BACKWARD_FORMATS)}")
    a_args, w_args = _operand_args(act, x), _operand_args(weight_args, weight)
    bits = max(a_args[0], w_args[0])
    if backward == "fp8" and bits > gemm.FP8_MAX_BITS:
        raise ValueError(f"quest_int8_linear: the fp8 backward needs grids of at most {gemm.FP8_MAX_BITS} bits (codes "
                         f"exact in E4M3), got {bits}")  # fmt: skip
    out_dtype = out_dtype or _output_dtype(x)
    backend = _backend(x, weight.shape[0], bits, out_dtype, backend)
    args = (*a_args, *w_args, hadamard, out_dtype, backend, backward)
    if torch.compiler.is_compiling():
        return torch.ops.quest_kernels.int8_linear(x, weight, *args)[0]
    return _Int8Linear.apply(x, weight, *args)


def inference_codes(x: torch.Tensor, weight: torch.Tensor, act: dict, weight_args: dict) -> str:
    """The code format ("int8" or "fp8") of the fastest GEMM for this input and weight shape, for weight codes
    computed once for inference (``quest_int8_linear_frozen``)."""
    bits = max(int(act.get("bits", 4)), int(weight_args.get("bits", 4)))
    return gemm.CODE_FORMAT[_backend(x, weight.shape[0], bits, _output_dtype(x), None)]


def quest_int8_linear_frozen(
    x: torch.Tensor,
    weight_codes: torch.Tensor,
    weight_scales: torch.Tensor,
    act: dict,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Inference: y = Q(x H) · (codes_w · s_w)^T with the weight's codes computed once (``quantize_codes``; int8 or
    fp8, which fixes the GEMM path), no gradient. Only the activation is quantized per call."""
    bits, estimator, trust, clip = _operand_args(act, x)
    k = x.shape[-1]
    out_dtype = out_dtype or _output_dtype(x)
    fmt = "fp8" if weight_codes.dtype == torch.float8_e4m3fn else "int8"
    backend = "fp8" if fmt == "fp8" else _backend(x, weight_codes.shape[0], MAX_BITS, out_dtype, None)
    ca, _, sa = _codes_impl(x, bits, bool(act.get("hadamard", True)), estimator, trust, clip, fmt)
    y = gemm.scaled_matmul(ca.reshape(-1, k), weight_codes, sa.reshape(-1), weight_scales, out_dtype, backend)
    return y.view(*x.shape[:-1], weight_codes.shape[0])
