"""Fused Triton kernels for the QuEST quantizer: block-128 Hadamard, RMS scale (per row, or per group of 16-128 elements
inside the block), grid rounding and trust / clip mask in one pass forward; masked transposed Hadamard in one pass
backward (METHOD.md §1.3-1.8, §8 "Triton kernels").

Public API:
  fused_quantize(x, ...) -> (values, mask)  values in the rotated basis (x's dtype), mask bool, True = gradient passes
  quest_quantize(x, ...) -> values          the same forward with the QuEST backward: grad_x = (grad ⊙ mask)·H
  is_supported(grid, bits, estimator, width, device, hadamard, group_size) -> (ok, reason)
  unpack_mask(packed, width) -> bool mask   the kernel stores masks bit-packed (column j in bit j % 8 of byte j // 8)
The low-precision forward (integer codes + per-row scales on INT8 or FP8 tensor cores) lives in
`quest_pl.kernels.int8`; the Triton kernels in `_tl_quantize`, `_tl_backward`, `_tl_gemm` (helpers: `_tl_common`).

The kernels are registered as `torch.library` custom ops (`quest_kernels::quantize`, `quest_kernels::quantize_backward`)
with fake and autograd implementations, so `torch.compile(fullgraph=True)` traces through them; eager calls skip the
custom-op dispatch (a plain autograd.Function over the same kernels).

They run on CUDA tensors, and on CPU tensors only under Triton's interpreter (`TRITON_INTERPRET=1`, set before Triton
is first imported; the tests' conftest does this). Importing this package imports neither Triton nor a GPU library.
"""

from __future__ import annotations

import torch

from quest_pl.kernels._spec import (
    DEFAULT_TRUST,
    DTYPES,
    ESTIMATORS,
    GRIDS,
    GROUP_SIZES,
    HADAMARD_BLOCK,
    config_error,
    interpreting,
    require_runnable,
    resolve,
    width_error,
)
from quest_pl.quantizers import OPTIMAL_GAUSSIAN_SCALES

__all__ = [
    "DEFAULT_TRUST",
    "DTYPES",
    "ESTIMATORS",
    "GRIDS",
    "GROUP_SIZES",
    "HADAMARD_BLOCK",
    "fused_quantize",
    "is_supported",
    "quest_quantize",
    "unpack_mask",
]


def is_supported(
    grid: str,
    bits: int,
    estimator: str,
    width: int,
    device: torch.device | str,
    hadamard: bool = True,
    group_size: int | None = None,
) -> tuple[bool, str]:
    """Whether `fused_quantize` can run this configuration on `device`: (True, "ok"), or False and a one-line reason."""
    reason = config_error(grid, bits, estimator) or width_error(width, hadamard, group_size)
    if reason:
        return False, reason
    device_type = torch.device(device).type
    if device_type == "cpu" and not interpreting():
        return False, "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before Triton is imported)"
    if device_type not in ("cpu", "cuda"):
        return False, f"no kernel for device type {device_type!r}"
    if device_type == "cuda" and not torch.cuda.is_available():
        return False, "CUDA is not available"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    return True, "ok"


def _quantize_impl(
    x: torch.Tensor,
    grid: str,
    bits: int,
    hadamard: bool,
    estimator: str,
    trust: float,
    clip_scale: float,
    group_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, packed mask (..., ceil(d/8)) uint8) for x (..., d); `group_size` None: one scale per row."""
    require_runnable(x)
    from quest_pl.kernels._tl_quantize import quantize_forward

    width = x.shape[-1]
    values, mask = quantize_forward(
        x.reshape(-1, width),
        grid=grid,
        n_levels=2**bits,
        scale_coef=OPTIMAL_GAUSSIAN_SCALES.get(bits, 0.0),
        hadamard=hadamard,
        estimator=estimator,
        trust=trust,
        clip_scale=clip_scale,
        group_size=group_size,
    )
    return values.view(x.shape), mask.view(*x.shape[:-1], mask.shape[-1])


def _quantize_backward_impl(grad: torch.Tensor, mask: torch.Tensor, hadamard: bool) -> torch.Tensor:
    """(grad ⊙ unpack(mask))·H for grad (..., d): the QuEST gradient with respect to the quantizer's input."""
    from quest_pl.kernels._tl_backward import quantize_backward

    width = grad.shape[-1]
    out = quantize_backward(grad.reshape(-1, width), mask.reshape(-1, mask.shape[-1]), hadamard)
    return out.view(grad.shape)


# torch.compile path: custom ops with fake (shape) and autograd implementations, traced without a graph break.
_quantize_op = torch.library.custom_op("quest_kernels::quantize", _quantize_impl, mutates_args=())
_quantize_backward_op = torch.library.custom_op(
    "quest_kernels::quantize_backward", _quantize_backward_impl, mutates_args=()
)


@_quantize_op.register_fake
def _quantize_fake(x, grid, bits, hadamard, estimator, trust, clip_scale, group_size=None):
    return x.new_empty(x.shape), x.new_empty((*x.shape[:-1], (x.shape[-1] + 7) // 8), dtype=torch.uint8)


@_quantize_backward_op.register_fake
def _quantize_backward_fake(grad, mask, hadamard):
    return grad.new_empty(grad.shape)


def _setup_context(ctx, inputs, output):
    ctx.hadamard = inputs[3]
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_values, grad_mask):
    (mask,) = ctx.saved_tensors
    grad_x = torch.ops.quest_kernels.quantize_backward(grad_values, mask, ctx.hadamard)
    return grad_x, None, None, None, None, None, None, None


_quantize_op.register_autograd(_backward, setup_context=_setup_context)


class _QuestQuantize(torch.autograd.Function):
    """Eager path: the same kernels without the custom-op dispatch, whose Python overhead is several times a
    small kernel's run time."""

    @staticmethod
    def forward(ctx, x, grid, bits, hadamard, estimator, trust, clip_scale, group_size):
        values, mask = _quantize_impl(x, grid, bits, hadamard, estimator, trust, clip_scale, group_size)
        ctx.hadamard = hadamard
        ctx.save_for_backward(mask)
        ctx.mark_non_differentiable(mask)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        (mask,) = ctx.saved_tensors
        return _quantize_backward_impl(grad_values, mask, ctx.hadamard), None, None, None, None, None, None, None


def unpack_mask(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Bit-packed mask (..., ceil(width/8)) uint8 -> bool (..., width); column j is bit j % 8 of byte j // 8."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :width].bool()


def fused_quantize(
    x: torch.Tensor,
    bits: int = 4,
    grid: str = "gaussian_mse",
    hadamard: bool = True,
    estimator: str = "trust",
    trust: float | None = None,
    clip_scale: float = 1.0,
    group_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of x (last dim) in the rotated basis x_h = x·H (block-128, when `hadamard`).

    The arithmetic of `quantizers` (gaussian_mse, fp4) and `estimators` (trust, clip) in fp32, σ̂ = max(σ, 1e-30):
    gaussian_mse s = α_b σ̂, Δ = 2s/(n-1), values (clamp(floor(x_h/Δ), -n/2, n/2-1) + ½)Δ (§1.3); fp4 nearest of
    σ̂·a·{0, ±.5, ±1, ±1.5, ±2, ±3, ±4, ±6}, s = 6aσ̂ (§1.6). Mask (True = gradient passes): trust |values - x_h| <= τσ
    (default τ: the grid's; all-zero rows pass), clip |x_h| <= c·s (§1.4).
    `group_size` g (one of `GROUP_SIZES`): σ, s and the trust threshold per group of g consecutive elements of x_h,
    as `quantizers.build(grid, bits, group_size=g)` (all-zero groups pass); None: per row.
    Returns values in x's dtype (rotated basis, not rotated back: the "Half" form of §1.8) and the bool mask.
    """
    trust = resolve(x, bits, grid, hadamard, estimator, trust, group_size)
    quantize = torch.ops.quest_kernels.quantize if torch.compiler.is_compiling() else _quantize_impl
    values, packed = quantize(x, grid, bits, hadamard, estimator, trust, float(clip_scale), group_size)
    return values, unpack_mask(packed, x.shape[-1])


def quest_quantize(
    x: torch.Tensor,
    bits: int = 4,
    grid: str = "gaussian_mse",
    hadamard: bool = True,
    estimator: str = "trust",
    trust: float | None = None,
    clip_scale: float = 1.0,
    group_size: int | None = None,
) -> torch.Tensor:
    """`fused_quantize`'s values, differentiable: grad_x = (grad ⊙ mask)·H (H symmetric), i.e. the gradient of the
    detach carrier x_h⊙m + sg(q − x_h⊙m) of §0/§1.8. Saves only the bit-packed mask for the backward."""
    trust = resolve(x, bits, grid, hadamard, estimator, trust, group_size)
    args = (x, grid, bits, hadamard, estimator, trust, float(clip_scale), group_size)
    if torch.compiler.is_compiling():
        return torch.ops.quest_kernels.quantize(*args)[0]
    return _QuestQuantize.apply(*args)
