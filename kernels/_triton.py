"""Triton kernels for the fused QuEST quantizer (METHOD.md §1.3, §1.4, §1.6, §1.8; §8 "Triton kernels").

Imported lazily by `kernels` on the first kernel call: importing `kernels` then costs nothing on a machine without
Triton, and `TRITON_INTERPRET` is read when these functions are defined (the interpreter needs it before `@triton.jit`).

Forward, two variants with the same arithmetic:
  resident   rows of up to `MAX_RESIDENT_BLOCKS`·128 columns: a program loads `BLOCK_M` whole rows as one
             (BLOCK_M·NB, 128) tile of Hadamard blocks, so each element is read from memory once;
  two-pass   wider rows: pass 1 sums x² over the row, pass 2 re-reads it (from L2) block by block.
Both take σ = RMS(x) = RMS(x·H) (H orthonormal), so the reduction needs no matrix product; with group scales
(GROUP = g in 16..128: one σ per g consecutive columns of x_h, each group inside one 128-column block) σ comes from
the block's rotated values in registers instead, and the two-pass kernel skips its first pass. Per 128-column block:
x_h = x·H on the tensor cores with fp32 accumulation, the grid, the trust / clip mask, the dequantized values stored in
x's dtype (rotated basis) and the mask bit-packed (column j in bit j % 8 of byte j // 8).

Backward: grad_x = (grad ⊙ mask)·H (H symmetric), one pass, a 2-D grid of (row block, column chunk) programs.

INT8 path (`kernels.int8`): the forward kernels' `codes` variant stores the odd integers 2k + 1 as int8 and Δ/2 per
row instead of the values; `int8_matmul` is a Triton INT8 GEMM (int32 accumulation) with those scales in its
epilogue; `dequantize` rebuilds the values for the backward in one pass.

Exact Hadamard: H = S/√128 with S the ±1 Sylvester matrix. A bf16 / fp16 element times ±1 is exact, so a 16-bit
tensor-core product with S accumulated in fp32 is the fp32 sum; fp32 inputs are split into three bf16 parts
(hi + mid + lo = x exactly) for the same result. Everything after the rotation is fp32.

Versus the PyTorch reference (`quantizers`): σ is summed in another order (per row: from x instead of x_h), and x/Δ is
x·(1/Δ); each moves a value by about an fp32 ulp, so a code differs only for the ~1e-7 of elements that lie within an
ulp of a decision boundary.
"""

import os

import torch
import triton
import triton.language as tl

from quest_pl.kernels import GROUP_SIZES
from quest_pl.quantizers import RMS_EPS
from quest_pl.quantizers.fp4 import FP4_SCALE

GRID_CODES = {"gaussian_mse": 0, "fp4": 1}
ESTIMATOR_CODES = {"trust": 0, "clip": 1}
# Dot operand modes. DOT_FP32: fp32 operands at full precision (the interpreter's tl.dot on bf16 is wrong);
# DOT_NATIVE16: the 16-bit input dtype as is; DOT_SPLIT3: an fp32 input split into three exact bf16 parts.
DOT_FP32, DOT_NATIVE16, DOT_SPLIT3 = 0, 1, 2
_RMS_EPS = tl.constexpr(RMS_EPS)
# Launch choices, from a sweep on H100 (bf16, 2048-65536 rows x 640-16384 columns): the resident kernel (64 Hadamard
# blocks per program, 4 warps) only when the row is a power-of-two number of blocks (no padded lanes), up to 4096
# columns; otherwise the two-pass kernel (64 rows, 8 warps). The backward: 64 rows x 4 blocks per program, 4 warps.
MAX_RESIDENT_BLOCKS = 32
# The Hadamard product: "dense" (one 128x128 tensor-core product per block) or "kron" (S_128 = S_8 ⊗ S_16, two 16-wide
# products, see `_rotate`). Both give the same values to fp32 rounding. Dense is the default: on the H200 (2026-12-01,
# BENCHMARKS.md §a) the Kronecker form ran slower (3.0x vs 2.3x a copy forward at 65536x2048 bf16): its permutes
# between the two products cost more than the 96 multiply-adds per element it saves.
ROTATIONS = {"dense": 0, "kron": 1}
ROTATION = "dense"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _sylvester_signs(N: tl.constexpr, DTYPE: tl.constexpr, BLOCK_DIAGONAL: tl.constexpr = False):
    """S[i, j] = (-1)^popcount(i & j): the NxN Sylvester Hadamard matrix without its 1/√N (symmetric, N <= 128).
    BLOCK_DIAGONAL: I_2 ⊗ S_{N/2} instead (zero where i and j lie in different halves)."""
    i = tl.arange(0, N)[:, None]
    j = tl.arange(0, N)[None, :]
    parity = i & j
    parity = parity ^ (parity >> 4)
    parity = parity ^ (parity >> 2)
    parity = parity ^ (parity >> 1)
    signs = 1 - 2 * (parity & 1)
    if BLOCK_DIAGONAL:
        half: tl.constexpr = N // 2
        parity = (i % half) & (j % half)
        parity = parity ^ (parity >> 4)
        parity = parity ^ (parity >> 2)
        parity = parity ^ (parity >> 1)
        signs = tl.where(i // half == j // half, 1 - 2 * (parity & 1), 0)
    return signs.to(DTYPE)


@triton.jit
def _dot_signs(x_dtype: tl.constexpr, DOT_MODE: tl.constexpr, ROTATION: tl.constexpr):
    """The ±1 operand of the first product: S_128 (dense rotation) or S_16 (Kronecker rotation)."""
    N: tl.constexpr = 128 if ROTATION == 0 else 16
    if DOT_MODE == 1:
        return _sylvester_signs(N, x_dtype)
    elif DOT_MODE == 2:
        return _sylvester_signs(N, tl.bfloat16)
    else:
        return _sylvester_signs(N, tl.float32)


@triton.jit
def _signed_dot(x, signs, DOT_MODE: tl.constexpr):
    """fp32 x·S for a tile x in its storage dtype (or fp32) and a ±1 / 0 matrix S in the dot operand dtype."""
    if DOT_MODE == 0:
        acc = tl.dot(x.to(tl.float32), signs, input_precision="ieee")
    elif DOT_MODE == 1:
        acc = tl.dot(x, signs)
    else:
        # Three exact bf16 parts hi + mid + lo = x (fp32 has 24 significant bits, bf16 8).
        xf = x.to(tl.float32)
        hi = xf.to(tl.bfloat16)
        rest = xf - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(lo, signs)
        acc = tl.dot(mid, signs, acc)
        acc = tl.dot(hi, signs, acc)
    return acc


@triton.jit
def _rotate(x, signs, DOT_MODE: tl.constexpr, ROTATION: tl.constexpr = 0):
    """fp32 x·S/√128 for an (R, 128) tile x in its storage dtype; `signs` from `_dot_signs`.

    ROTATION 0: one dense product with S_128 (128 multiply-adds per element). ROTATION 1: S_128 = S_8 ⊗ S_16 (column
    j = 16a + b, popcount(i & j) = popcount(a & a') + popcount(b & b')): a product with S_16 over b, then one with
    I_2 ⊗ S_8 over a (pairs of columns d share a 16-wide operand row), 16 + 16 multiply-adds per element; the fp32
    partial sums enter the second product as three exact bf16 parts, so the result is the same fp32 sum to rounding."""
    if ROTATION == 0:
        acc = _signed_dot(x, signs, DOT_MODE)
    else:
        R: tl.constexpr = x.shape[0]
        t = _signed_dot(tl.reshape(x, (R * 8, 16)), signs, DOT_MODE)  # rows (r, a), columns d
        t = tl.reshape(tl.permute(tl.reshape(t, (R, 8, 16)), (0, 2, 1)), (R * 8, 16))  # rows (r, d // 2), (d % 2, a)
        if DOT_MODE == 0:
            pair_signs = _sylvester_signs(16, tl.float32, True)
            u = _signed_dot(t, pair_signs, 0)
        else:
            pair_signs = _sylvester_signs(16, tl.bfloat16, True)
            u = _signed_dot(t, pair_signs, 2)  # rows (r, d // 2), columns (d % 2, c)
        acc = tl.reshape(tl.permute(tl.reshape(u, (R, 8, 2, 8)), (0, 3, 1, 2)), (R, 128))  # column 16c + d
    return acc * 0.08838834764831845


@triton.jit
def _to_output(v, OUT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Cast fp32 to the output dtype, rounding to nearest even (the interpreter's fp32->bf16 cast truncates)."""
    if ROUND_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + ((bits >> 16) & 1) + 0x7FFF) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(OUT_DTYPE)


@triton.jit
def _pack_bits(keep, R: tl.constexpr):
    """(R, 128) int32 0/1 -> (R, 16) uint8, column j in bit j % 8 of byte j // 8."""
    weights = (1 << tl.arange(0, 8)).to(tl.int32)
    return tl.sum(tl.reshape(keep, (R, 16, 8)) * weights[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def _unpack_bits(packed, R: tl.constexpr):
    """(R, 16) uint8 -> (R, 128) int32 0/1, the inverse of `_pack_bits`."""
    bits = (packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, (R, 128))


@triton.jit
def _group_rms(xh, R: tl.constexpr, GROUP: tl.constexpr):
    """Per-group σ = sqrt(mean(x_h²)) over each run of GROUP consecutive columns of an (R, 128) fp32 tile, broadcast
    back to (R, 128): the scale statistic of a grid with `group_size` = GROUP (groups inside the Hadamard block).
    Times 1/GROUP (a power of two: exact, = the division) and the IEEE square root: only the sum's order differs from
    `quantizers.base.row_rms`."""
    NG: tl.constexpr = 128 // GROUP
    sumsq = tl.sum(tl.reshape(xh * xh, (R, NG, GROUP)), axis=2)
    rms = tl.sqrt_rn(sumsq * (1.0 / GROUP))
    return tl.reshape(tl.broadcast_to(rms[:, :, None], (R, NG, GROUP)), (R, 128))


@triton.jit
def _fp4_level(az, pos, boundary, level, mag):
    # Nearest-level rounding with ties to the larger level (torch.bucketize(right=True) in `quantizers.levels`).
    return tl.where((az > boundary) | (pos & (az == boundary)), level, mag)


@triton.jit
def _quantize_tile(xh, rms, scale_coef, trust, clip_scale, GRID: tl.constexpr, N_LEVELS: tl.constexpr,
                   ESTIMATOR: tl.constexpr, A: tl.constexpr):  # fmt: skip
    """Grid values, gradient mask (int32 0/1), odd integer codes 2k + 1 and the half step Δ/2 (gaussian_mse; zeros
    and σ̂ on fp4) for an fp32 tile x_h, rms broadcastable to it: per row, or per element with group scales
    (METHOD.md §1.3-1.6). values = codes · Δ/2 exactly."""
    sigma_hat = tl.maximum(rms, _RMS_EPS)
    if GRID == 0:
        # gaussian_mse: s = α_b σ̂, Δ = 2s/(n-1), k = clamp(floor(x_h/Δ), -n/2, n/2-1), values (k + ½)Δ.
        scale = scale_coef * sigma_hat
        step = scale * 2.0 / (N_LEVELS - 1)
        code = tl.floor(xh * (1.0 / step))
        code = tl.minimum(tl.maximum(code, -(N_LEVELS // 2)), N_LEVELS // 2 - 1)
        values = (code + 0.5) * step
        odd = 2.0 * code + 1.0
        half_step = step * 0.5
    else:
        # fp4: nearest of a·{0, ±.5, ±1, ±1.5, ±2, ±3, ±4, ±6} in σ̂ units, decision boundaries at the midpoints.
        z = xh * (1.0 / sigma_hat)
        az = tl.abs(z)
        pos = z >= 0
        mag = tl.zeros_like(z)
        mag = _fp4_level(az, pos, A * 0.25, A * 0.5, mag)
        mag = _fp4_level(az, pos, A * 0.75, A * 1.0, mag)
        mag = _fp4_level(az, pos, A * 1.25, A * 1.5, mag)
        mag = _fp4_level(az, pos, A * 1.75, A * 2.0, mag)
        mag = _fp4_level(az, pos, A * 2.5, A * 3.0, mag)
        mag = _fp4_level(az, pos, A * 3.5, A * 4.0, mag)
        mag = _fp4_level(az, pos, A * 5.0, A * 6.0, mag)
        values = tl.where(pos, mag, -mag) * sigma_hat
        scale = (A * 6.0) * sigma_hat
        odd = tl.zeros_like(z)
        half_step = sigma_hat
    if ESTIMATOR == 0:
        # Trust |q - x_h| <= τσ, σ without eps; an all-zero row keeps its gradient (`Grid.trust_threshold`).
        threshold = tl.where(rms == 0, float("inf"), trust * rms)
        keep = tl.abs(values - xh) <= threshold
    else:
        keep = tl.abs(xh) <= clip_scale * scale
    return values, keep.to(tl.int32), odd, half_step


@triton.jit
def _quantize_fwd_resident_kernel(
    x_ptr, values_ptr, mask_ptr, scales_ptr, n_rows, n_cols, stride_xm, stride_xn, stride_vm, stride_mm,
    scale_coef, trust, clip_scale,
    GRID: tl.constexpr, N_LEVELS: tl.constexpr, ESTIMATOR: tl.constexpr, A: tl.constexpr, HADAMARD: tl.constexpr,
    DOT_MODE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr, NB: tl.constexpr,
    ROTATION: tl.constexpr, CODES: tl.constexpr, GROUP: tl.constexpr = 0,
):  # fmt: skip
    """BLOCK_M whole rows per program as a (BLOCK_M·NB, 128) tile: tile row r is block r % NB of row r // NB.
    CODES: values_ptr receives the int8 codes 2k + 1 and scales_ptr the per-row fp32 Δ/2 instead of the values.
    GROUP > 0: one scale per GROUP columns of x_h (σ of the group), else one per row."""
    R: tl.constexpr = BLOCK_M * NB
    r = tl.arange(0, R)
    rows = tl.program_id(0) * BLOCK_M + r // NB
    cols = (r % NB)[:, None] * 128 + tl.arange(0, 128)[None, :]
    ok = (rows < n_rows)[:, None] & (cols < n_cols)
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_xm + cols * stride_xn, mask=ok, other=0.0)

    xf = x.to(tl.float32)
    if HADAMARD:
        xh = _rotate(x, _dot_signs(x_ptr.dtype.element_ty, DOT_MODE, ROTATION), DOT_MODE, ROTATION)
    else:
        xh = xf
    if GROUP > 0:
        rms = _group_rms(xh, R, GROUP)
    else:
        block_sumsq = tl.reshape(tl.sum(xf * xf, axis=1), (BLOCK_M, NB))
        row_sumsq = tl.sum(block_sumsq, axis=1)[:, None]
        rms = tl.sqrt(tl.reshape(tl.broadcast_to(row_sumsq, (BLOCK_M, NB)), (R,)) / n_cols)[:, None]
    values, keep, odd, half_step = _quantize_tile(xh, rms, scale_coef, trust, clip_scale, GRID, N_LEVELS, ESTIMATOR, A)
    keep = keep & ok

    if CODES:
        tl.store(values_ptr + rows64 * stride_vm + cols, odd.to(tl.int8), mask=ok)
        tl.store(scales_ptr + rows64, half_step, mask=(rows < n_rows)[:, None] & ((r % NB) == 0)[:, None])
    else:
        tl.store(
            values_ptr + rows64 * stride_vm + cols, _to_output(values, values_ptr.dtype.element_ty, ROUND_BF16), mask=ok
        )
    byte_cols = (r % NB)[:, None] * 16 + tl.arange(0, 16)[None, :]
    byte_ok = (rows < n_rows)[:, None] & (byte_cols < (n_cols + 7) // 8)
    tl.store(mask_ptr + rows64 * stride_mm + byte_cols, _pack_bits(keep, R), mask=byte_ok)


@triton.jit
def _quantize_fwd_two_pass_kernel(
    x_ptr, values_ptr, mask_ptr, scales_ptr, n_rows, n_cols, stride_xm, stride_xn, stride_vm, stride_mm,
    scale_coef, trust, clip_scale,
    GRID: tl.constexpr, N_LEVELS: tl.constexpr, ESTIMATOR: tl.constexpr, A: tl.constexpr, HADAMARD: tl.constexpr,
    DOT_MODE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
    ROTATION: tl.constexpr, CODES: tl.constexpr, GROUP: tl.constexpr = 0,
):  # fmt: skip
    """BLOCK_M rows per program of any width: a sum-of-squares pass, then a quantize pass over 128-column blocks.
    GROUP > 0: no first pass; each block's group scales come from its rotated values."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = (rows < n_rows)[:, None]
    rows64 = rows.to(tl.int64)[:, None]
    block_cols = tl.arange(0, 128)[None, :]
    x_rows = x_ptr + rows64 * stride_xm

    if GROUP == 0:
        sumsq = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
        for col0 in range(0, n_cols, 128):
            cols = col0 + block_cols
            x = tl.load(x_rows + cols * stride_xn, mask=row_ok & (cols < n_cols), other=0.0).to(tl.float32)
            sumsq += x * x
        row_rms = tl.sqrt(tl.sum(sumsq, axis=1) / n_cols)[:, None]
    else:
        row_rms = tl.zeros((BLOCK_M, 1), dtype=tl.float32)

    if HADAMARD:
        signs = _dot_signs(x_ptr.dtype.element_ty, DOT_MODE, ROTATION)
    for col0 in range(0, n_cols, 128):
        cols = col0 + block_cols
        ok = row_ok & (cols < n_cols)
        x = tl.load(x_rows + cols * stride_xn, mask=ok, other=0.0)
        if HADAMARD:
            xh = _rotate(x, signs, DOT_MODE, ROTATION)
        else:
            xh = x.to(tl.float32)
        if GROUP > 0:
            rms = _group_rms(xh, BLOCK_M, GROUP)
        else:
            rms = row_rms
        values, keep, odd, half_step = _quantize_tile(xh, rms, scale_coef, trust, clip_scale, GRID, N_LEVELS,
                                                      ESTIMATOR, A)  # fmt: skip
        keep = keep & ok
        if CODES:
            tl.store(values_ptr + rows64 * stride_vm + cols, odd.to(tl.int8), mask=ok)
            if col0 == 0:
                tl.store(scales_ptr + rows64, half_step, mask=row_ok)
        else:
            tl.store(values_ptr + rows64 * stride_vm + cols,
                     _to_output(values, values_ptr.dtype.element_ty, ROUND_BF16), mask=ok)  # fmt: skip
        byte_cols = col0 // 8 + tl.arange(0, 16)[None, :]
        byte_ok = row_ok & (byte_cols < (n_cols + 7) // 8)
        tl.store(mask_ptr + rows64 * stride_mm + byte_cols, _pack_bits(keep, BLOCK_M), mask=byte_ok)


@triton.jit
def _quantize_bwd_kernel(
    grad_ptr, mask_ptr, out_ptr, n_rows, n_cols, stride_gm, stride_gn, stride_mm, stride_om,
    HADAMARD: tl.constexpr, DOT_MODE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr, ROTATION: tl.constexpr,
):  # fmt: skip
    """(grad ⊙ mask)·H for BLOCK_M rows x BLOCKS_PER_PROGRAM 128-column blocks."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = (rows < n_rows)[:, None]
    rows64 = rows.to(tl.int64)[:, None]
    if HADAMARD:
        signs = _dot_signs(grad_ptr.dtype.element_ty, DOT_MODE, ROTATION)
    for b in tl.static_range(BLOCKS_PER_PROGRAM):
        col0 = (tl.program_id(1) * BLOCKS_PER_PROGRAM + b) * 128
        cols = col0 + tl.arange(0, 128)[None, :]
        ok = row_ok & (cols < n_cols)
        byte_cols = col0 // 8 + tl.arange(0, 16)[None, :]
        packed = tl.load(mask_ptr + rows64 * stride_mm + byte_cols, mask=row_ok & (byte_cols < (n_cols + 7) // 8),
                         other=0)  # fmt: skip
        grad = tl.load(grad_ptr + rows64 * stride_gm + cols * stride_gn, mask=ok, other=0.0)
        # Masking before the rotation is exact in any dtype.
        grad = tl.where(_unpack_bits(packed, BLOCK_M) != 0, grad, tl.zeros_like(grad))
        if HADAMARD:
            grad_x = _rotate(grad, signs, DOT_MODE, ROTATION)
        else:
            grad_x = grad.to(tl.float32)
        tl.store(out_ptr + rows64 * stride_om + cols, _to_output(grad_x, out_ptr.dtype.element_ty, ROUND_BF16), mask=ok)


def _launch(kernel, grid, args, meta, rotation, num_warps):
    kernel[grid](*args, **meta, ROTATION=ROTATIONS[rotation or ROTATION], num_warps=num_warps)


def _dot_mode(dtype: torch.dtype) -> int:
    if interpreting():
        return DOT_FP32
    return DOT_SPLIT3 if dtype == torch.float32 else DOT_NATIVE16


def _round_bf16(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def quantize_forward(
    x2d: torch.Tensor,
    *,
    grid: str,
    n_levels: int,
    scale_coef: float,
    hadamard: bool,
    estimator: str,
    trust: float,
    clip_scale: float,
    codes: bool = False,
    group_size: int | None = None,
    rotation: str | None = None,
    resident: bool | None = None,
    tile_rows: int | None = None,
    num_warps: int | None = None,
    out: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, ...]:
    """x2d (rows, cols), any strides -> (values (rows, cols) in x's dtype, packed mask (rows, ceil(cols/8)) uint8);
    with `codes` (gaussian_mse only) -> (int8 codes 2k + 1 (rows, cols), packed mask, fp32 Δ/2 per row (rows,)),
    values = codes · Δ/2. `group_size` (one of `GROUP_SIZES`, dividing cols): one scale per group of that many
    consecutive columns of x_h instead of one per row (not with `codes`, whose scales are per row).

    `rotation` ("dense" or "kron", default `ROTATION`), `resident`, `tile_rows` and `num_warps` override the launch
    heuristics; `out` takes preallocated contiguous outputs (tests poison them to catch unwritten elements)."""
    n_rows, n_cols = x2d.shape
    if codes and (grid != "gaussian_mse" or n_levels > 128):
        raise ValueError(f"int8 codes need a gaussian_mse grid of at most 7 bits, got {grid} with {n_levels} levels")
    if group_size is not None and (group_size not in GROUP_SIZES or n_cols % group_size or codes):
        raise ValueError(f"group_size={group_size!r}: expected one of {GROUP_SIZES} dividing {n_cols}, without codes")
    if out is None:
        values = torch.empty((n_rows, n_cols), dtype=torch.int8 if codes else x2d.dtype, device=x2d.device)
        mask = torch.empty((n_rows, (n_cols + 7) // 8), dtype=torch.uint8, device=x2d.device)
        scales = torch.empty((n_rows,), dtype=torch.float32, device=x2d.device) if codes else mask
    else:
        values, mask, *rest = out
        scales = rest[0] if codes else mask
    result = (values, mask, scales) if codes else (values, mask)
    if n_rows == 0:
        return result
    n_blocks = triton.cdiv(n_cols, 128)
    if resident is None:
        resident = n_blocks <= MAX_RESIDENT_BLOCKS and n_blocks == triton.next_power_of_2(n_blocks)
    common = dict(
        GRID=GRID_CODES[grid],
        N_LEVELS=n_levels,
        ESTIMATOR=ESTIMATOR_CODES[estimator],
        A=FP4_SCALE,
        HADAMARD=hadamard,
        DOT_MODE=_dot_mode(x2d.dtype),
        ROUND_BF16=_round_bf16(x2d.dtype),
        CODES=codes,
        GROUP=group_size or 0,
    )
    args = (x2d, values, mask, scales, n_rows, n_cols, x2d.stride(0), x2d.stride(1), values.stride(0), mask.stride(0))
    args += (scale_coef, trust, clip_scale)
    if resident:
        nb = triton.next_power_of_2(n_blocks)
        # tl.dot needs at least 16 tile rows; the interpreter pays per program, so it gets the whole tensor in a few.
        target = tile_rows or (max(64, nb * triton.next_power_of_2(n_rows)) if interpreting() else 64)
        block_m = max(16 // nb, 1, min(target, 4096) // nb)
        _launch(_quantize_fwd_resident_kernel, (triton.cdiv(n_rows, block_m),), args,
                dict(common, BLOCK_M=block_m, NB=nb), rotation, num_warps or 4)  # fmt: skip
    else:
        block_m = tile_rows or (max(16, min(256, triton.next_power_of_2(n_rows))) if interpreting() else 64)
        _launch(_quantize_fwd_two_pass_kernel, (triton.cdiv(n_rows, block_m),), args,
                dict(common, BLOCK_M=block_m), rotation, num_warps or 8)  # fmt: skip
    return result


def quantize_backward(
    grad2d: torch.Tensor,
    mask: torch.Tensor,
    hadamard: bool,
    *,
    block_m: int | None = None,
    blocks_per_program: int | None = None,
    num_warps: int | None = None,
    rotation: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """grad (rows, cols), any strides, and the packed mask -> (grad ⊙ mask)·H in grad's dtype, contiguous."""
    n_rows, n_cols = grad2d.shape
    if out is None:
        out = torch.empty((n_rows, n_cols), dtype=grad2d.dtype, device=grad2d.device)
    if n_rows == 0:
        return out
    n_blocks = triton.cdiv(n_cols, 128)
    if interpreting():
        block_m = block_m or max(16, min(256, triton.next_power_of_2(n_rows)))
        per_program = blocks_per_program or n_blocks
    else:
        block_m = block_m or 64
        per_program = blocks_per_program or min(4, n_blocks)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_blocks, per_program))
    args = (grad2d, mask, out, n_rows, n_cols, grad2d.stride(0), grad2d.stride(1), mask.stride(0), out.stride(0))
    meta = dict(HADAMARD=hadamard, DOT_MODE=_dot_mode(grad2d.dtype), ROUND_BF16=_round_bf16(grad2d.dtype),
                BLOCK_M=block_m, BLOCKS_PER_PROGRAM=per_program)  # fmt: skip
    _launch(_quantize_bwd_kernel, grid, args, meta, rotation, num_warps or 4)
    return out


# INT8 GEMM with the per-row scales in the epilogue: C = (A_int8 · B_int8^T) ⊙ (s_a s_b^T), exact int32 accumulation.
def _int8_configs():
    if interpreting():  # the interpreter runs one config only
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4)]
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). The first four ran on the H200 (BENCHMARKS.md §b: ~955 TOPS at
    # 16384x2048x5632, slower than cuBLAS bf16 at K=640); the last two, for short K loops, are not yet measured.
    shapes = [(128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (256, 128, 128, 8, 3), (64, 128, 128, 4, 4)]
    shapes += [(128, 128, 64, 4, 4), (128, 64, 128, 4, 3)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


@triton.autotune(configs=_int8_configs(), key=["M", "N", "K", "SCALED"])
@triton.jit
def _int8_matmul_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    SCALED: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M, BLOCK_N) tile of A (M, K) · B (N, K)^T in int32; SCALED: times s_a[m] s_b[n] in fp32, stored in
    C's dtype, else stored as int32. Programs ordered in groups of GROUP_M row tiles (L2 reuse of B)."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    group_size = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % group_size
    pid_n = (pid % (GROUP_M * n_n)) // group_size
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rn.to(tl.int64)[None, :] * stride_bn + rk[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (k0 + rk[None, :] < K), other=0)
        b = tl.load(b_ptrs, mask=(rn[None, :] < N) & (k0 + rk[:, None] < K), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :] * stride_cn
    if SCALED:
        sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
        sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)
        out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        tl.store(c_ptrs, _to_output(out, c_ptr.dtype.element_ty, ROUND_BF16), mask=ok)
    else:
        tl.store(c_ptrs, acc, mask=ok)


def int8_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor | None = None,
    scale_b: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """a (M, K) int8, b (N, K) int8 -> a·b^T as int32 (no scales) or (a·b^T)·s_a[:, None]·s_b[None, :] in
    `out_dtype` (fp32 epilogue, one rounding to out_dtype after two fp32 products)."""
    M, K = a.shape
    N = b.shape[0]
    scaled = scale_a is not None
    c = torch.empty((M, N), dtype=out_dtype if scaled else torch.int32, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    sa = scale_a if scaled else c
    sb = scale_b if scaled else c
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _int8_matmul_kernel[grid](
        a, b, sa, sb, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        SCALED=scaled, ROUND_BF16=_round_bf16(c.dtype),
    )  # fmt: skip
    return c


@triton.jit
def _dequantize_kernel(
    codes_ptr, scales_ptr, out_ptr, n_rows, n_cols, stride_cm, stride_om,
    ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out = codes · scale[row] in fp32, one rounding to out's dtype."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    codes = tl.load(codes_ptr + rows64 * stride_cm + cols[None, :], mask=ok, other=0).to(tl.float32)
    scales = tl.load(scales_ptr + rows, mask=rows < n_rows, other=0.0)
    out = _to_output(codes * scales[:, None], out_ptr.dtype.element_ty, ROUND_BF16)
    tl.store(out_ptr + rows64 * stride_om + cols[None, :], out, mask=ok)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes (rows, cols) int8 with a unit column stride, scales (rows,) fp32 -> codes · scales[:, None] in dtype."""
    n_rows, n_cols = codes.shape
    out = torch.empty((n_rows, n_cols), dtype=dtype, device=codes.device)
    if out.numel() == 0:
        return out
    block_m, block_n = (64, 128) if not interpreting() else (max(16, min(256, triton.next_power_of_2(n_rows))), 512)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    _dequantize_kernel[grid](
        codes, scales, out, n_rows, n_cols, codes.stride(0), out.stride(0),
        ROUND_BF16=_round_bf16(dtype), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return out
