"""Triton forward kernels of the fused QuEST quantizer (METHOD.md §1.3, §1.4, §1.6, §1.8; §8 "Triton kernels").

Two variants with the same arithmetic, both persistent (a grid of a few programs per multiprocessor, each looping over
row tiles, so the ±1 Sylvester operand is built once per program, not once per tile, and the next tile's loads can be
issued while the current one is computed):
  resident   rows of up to `MAX_RESIDENT_BLOCKS`·128 columns: a tile is `BLOCK_M` whole rows held as one
             (BLOCK_M·NB, 128) tile of Hadamard blocks, so each element is read from memory exactly once;
  two-pass   wider rows: pass 1 sums x² over the row, pass 2 re-reads it (from L2) block by block.
Per 128-column block: x_h = x·H on the tensor cores with fp32 accumulation, σ (per row: RMS over the row's x_h, as
the reference computes it; with group scales, GROUP = g in 16..128, one σ per g consecutive columns of x_h), the
grid, the trust / clip mask, and the outputs: the dequantized values in x's dtype (rotated basis), or the codes.

Codes (the low-precision GEMM's operand, `kernels.int8`): the odd integers c = 2k + 1 of a centered grid, stored as
int8 (CODES=1) or as FP8 E4M3 bytes (CODES=2, |c| <= 15: 4-bit grids), and Δ/2 per row in fp32; values = c·Δ/2.
The mask is bit-packed (column j in bit j % 8 of byte j // 8).

Versus the PyTorch reference (`quantizers`): σ is summed in another order and x/Δ is x·(1/Δ); each moves a value by
about an fp32 ulp, so a code differs only for the ~1e-7 of elements that lie within an ulp of a decision boundary.
"""

import torch
import triton
import triton.language as tl

from quest_pl.kernels._spec import GROUP_SIZES, interpreting
from quest_pl.kernels._tl_common import dot_mode, dot_signs, e4m3_bits, num_programs, pack_bits, rotate, round_bf16
from quest_pl.kernels._tl_common import to_output as _to_output
from quest_pl.quantizers import RMS_EPS
from quest_pl.quantizers.fp4 import FP4_SCALE

GRID_CODES = {"gaussian_mse": 0, "fp4": 1}
ESTIMATOR_CODES = {"trust": 0, "clip": 1}
CODE_FORMATS = {None: 0, "int8": 1, "fp8": 2}
_RMS_EPS = tl.constexpr(RMS_EPS)
# Launch choices. The resident kernel only when the row is a power-of-two number of blocks (no padded lanes), up to
# 4096 columns (a sweep on H100, bf16, 2048-65536 rows x 640-16384 columns); otherwise the two-pass kernel.
MAX_RESIDENT_BLOCKS = 32
# (tile rows of 128 columns per program iteration, warps, programs per SM, pipeline stages) per kernel; `LAUNCH` is
# read at each call, so a benchmark can sweep it.
# Resident: measured on H100 (2026-12-07, BENCHMARKS.md), 65536x2048 bf16 forward 1.86x the copy with one program
# per tile, 1.37x persistent with 2 stages, 1.23x with 3. Two-pass: not re-measured. fp32 inputs (three products per
# block) take one stage: deeper pipelines overflow shared memory.
LAUNCH = {"resident": (64, 4, 4, 3), "two_pass": (64, 8, 2, 1)}


@triton.jit
def _group_rms(xh, R: tl.constexpr, GROUP: tl.constexpr):
    """Per-group σ = sqrt(mean(x_h²)) over each run of GROUP consecutive columns of an (R, 128) fp32 tile, broadcast
    back to (R, 128). Times 1/GROUP (a power of two: exact) and the IEEE square root."""
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
    and σ̂ on fp4) for an fp32 tile x_h, rms broadcastable to it (METHOD.md §1.3-1.6). values = codes · Δ/2 exactly."""
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
def _store_outputs(values_ptr, mask_ptr, offsets, ok, mask_offsets, mask_ok, values, keep, odd,
                   R: tl.constexpr, CODES: tl.constexpr, ROUND_BF16: tl.constexpr):  # fmt: skip
    if CODES == 1:
        tl.store(values_ptr + offsets, odd.to(tl.int8), mask=ok)
    elif CODES == 2:  # FP8 E4M3: the hardware conversion, or the same bytes by integer arithmetic (interpreter)
        if values_ptr.dtype.element_ty == tl.uint8:
            tl.store(values_ptr + offsets, e4m3_bits(odd), mask=ok)
        else:
            tl.store(values_ptr + offsets, odd.to(values_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(values_ptr + offsets, _to_output(values, values_ptr.dtype.element_ty, ROUND_BF16), mask=ok)
    tl.store(mask_ptr + mask_offsets, pack_bits(keep, R), mask=mask_ok)


@triton.jit
def _quantize_fwd_resident_kernel(
    x_ptr, values_ptr, mask_ptr, scales_ptr, n_rows, n_cols, stride_xm, stride_xn, stride_vm, stride_mm,
    scale_coef, trust, clip_scale,
    GRID: tl.constexpr, N_LEVELS: tl.constexpr, ESTIMATOR: tl.constexpr, A: tl.constexpr, HADAMARD: tl.constexpr,
    DOT_MODE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr, NB: tl.constexpr,
    CODES: tl.constexpr, GROUP: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Tiles of BLOCK_M whole rows as (BLOCK_M·NB, 128): tile row r is block r % NB of row r // NB. CODES > 0:
    values_ptr receives the codes and scales_ptr the per-row fp32 Δ/2. GROUP > 0: one scale per GROUP columns."""
    R: tl.constexpr = BLOCK_M * NB
    r = tl.arange(0, R)
    cols = (r % NB)[:, None] * 128 + tl.arange(0, 128)[None, :]
    byte_cols = (r % NB)[:, None] * 16 + tl.arange(0, 16)[None, :]
    if HADAMARD:
        signs = dot_signs(x_ptr.dtype.element_ty, DOT_MODE)
    for tile in tl.range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0), num_stages=STAGES):
        rows = tile * BLOCK_M + r // NB
        row_ok = (rows < n_rows)[:, None]
        ok = row_ok & (cols < n_cols)
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * stride_xm + cols * stride_xn, mask=ok, other=0.0)
        if HADAMARD:
            xh = rotate(x, signs, DOT_MODE)
        else:
            xh = x.to(tl.float32)
        if GROUP > 0:
            rms = _group_rms(xh, R, GROUP)
        else:
            row_sumsq = tl.sum(tl.reshape(tl.sum(xh * xh, axis=1), (BLOCK_M, NB)), axis=1)[:, None]
            rms = tl.sqrt(tl.reshape(tl.broadcast_to(row_sumsq, (BLOCK_M, NB)), (R,)) / n_cols)[:, None]
        values, keep, odd, half_step = _quantize_tile(xh, rms, scale_coef, trust, clip_scale, GRID, N_LEVELS,
                                                      ESTIMATOR, A)  # fmt: skip
        _store_outputs(values_ptr, mask_ptr, rows64 * stride_vm + cols, ok, rows64 * stride_mm + byte_cols,
                       row_ok & (byte_cols < (n_cols + 7) // 8), values, keep & ok, odd, R, CODES,
                       ROUND_BF16)  # fmt: skip
        if CODES > 0:
            tl.store(scales_ptr + rows64, half_step, mask=row_ok & ((r % NB) == 0)[:, None])


@triton.jit
def _quantize_fwd_two_pass_kernel(
    x_ptr, values_ptr, mask_ptr, scales_ptr, n_rows, n_cols, stride_xm, stride_xn, stride_vm, stride_mm,
    scale_coef, trust, clip_scale,
    GRID: tl.constexpr, N_LEVELS: tl.constexpr, ESTIMATOR: tl.constexpr, A: tl.constexpr, HADAMARD: tl.constexpr,
    DOT_MODE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
    CODES: tl.constexpr, GROUP: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Tiles of BLOCK_M rows of any width: a sum-of-squares pass, then a quantize pass over 128-column blocks.
    GROUP > 0: no first pass; each block's group scales come from its rotated values."""
    block_cols = tl.arange(0, 128)[None, :]
    if HADAMARD:
        signs = dot_signs(x_ptr.dtype.element_ty, DOT_MODE)
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = (rows < n_rows)[:, None]
        rows64 = rows.to(tl.int64)[:, None]
        x_rows = x_ptr + rows64 * stride_xm
        if GROUP == 0:
            sumsq = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
            for col0 in tl.range(0, n_cols, 128, num_stages=STAGES):
                cols = col0 + block_cols
                x = tl.load(x_rows + cols * stride_xn, mask=row_ok & (cols < n_cols), other=0.0).to(tl.float32)
                sumsq += x * x
            row_rms = tl.sqrt(tl.sum(sumsq, axis=1) / n_cols)[:, None]
        else:
            row_rms = tl.zeros((BLOCK_M, 1), dtype=tl.float32)
        for col0 in tl.range(0, n_cols, 128, num_stages=STAGES):
            cols = col0 + block_cols
            ok = row_ok & (cols < n_cols)
            x = tl.load(x_rows + cols * stride_xn, mask=ok, other=0.0)
            if HADAMARD:
                xh = rotate(x, signs, DOT_MODE)
            else:
                xh = x.to(tl.float32)
            if GROUP > 0:
                rms = _group_rms(xh, BLOCK_M, GROUP)
            else:
                rms = row_rms
            values, keep, odd, half_step = _quantize_tile(xh, rms, scale_coef, trust, clip_scale, GRID, N_LEVELS,
                                                          ESTIMATOR, A)  # fmt: skip
            byte_cols = col0 // 8 + tl.arange(0, 16)[None, :]
            _store_outputs(values_ptr, mask_ptr, rows64 * stride_vm + cols, ok, rows64 * stride_mm + byte_cols,
                           row_ok & (byte_cols < (n_cols + 7) // 8), values, keep & ok, odd, BLOCK_M, CODES,
                           ROUND_BF16)  # fmt: skip
            if CODES > 0 and col0 == 0:
                tl.store(scales_ptr + rows64, half_step, mask=row_ok)


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
    codes: str | None = None,
    group_size: int | None = None,
    resident: bool | None = None,
    launch: tuple[int, int, int, int] | None = None,
    programs: int | None = None,
    out: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, ...]:
    """x2d (rows, cols), any strides -> (values (rows, cols) in x's dtype, packed mask (rows, ceil(cols/8)) uint8);
    with `codes` "int8" or "fp8" (gaussian_mse only) -> (codes (rows, cols) int8 or float8_e4m3fn, packed mask,
    fp32 Δ/2 per row (rows,)), values = codes · Δ/2. `group_size` (one of `GROUP_SIZES`, dividing cols): one scale
    per group of that many consecutive columns of x_h instead of one per row (not with `codes`).

    `resident`, `launch` ((tile rows, warps, programs per SM, stages), default `LAUNCH`) and `programs` (the grid)
    override the launch heuristics; `out` takes preallocated contiguous outputs (tests poison them to catch
    unwritten elements)."""
    n_rows, n_cols = x2d.shape
    max_levels = {"int8": 128, "fp8": 16}.get(codes)
    if codes not in CODE_FORMATS:
        raise ValueError(f"codes={codes!r}: expected None, 'int8' or 'fp8'")
    if codes and (grid != "gaussian_mse" or n_levels > max_levels):
        raise ValueError(f"{codes} codes need a gaussian_mse grid of at most {max_levels} levels, got {grid} with "
                         f"{n_levels} levels")  # fmt: skip
    if group_size is not None and (group_size not in GROUP_SIZES or n_cols % group_size or codes):
        raise ValueError(f"group_size={group_size!r}: expected one of {GROUP_SIZES} dividing {n_cols}, without codes")
    fp8_dtype = torch.uint8 if interpreting() else torch.float8_e4m3fn  # the interpreter has no fp8 casts
    code_dtype = {None: x2d.dtype, "int8": torch.int8, "fp8": fp8_dtype}[codes]
    if out is None:
        values = torch.empty((n_rows, n_cols), dtype=code_dtype, device=x2d.device)
        mask = torch.empty((n_rows, (n_cols + 7) // 8), dtype=torch.uint8, device=x2d.device)
        scales = torch.empty((n_rows,), dtype=torch.float32, device=x2d.device) if codes else mask
    else:
        values, mask, *rest = out
        values = values.view(code_dtype)
        scales = rest[0] if codes else mask
    shown = values.view(torch.float8_e4m3fn) if codes == "fp8" else values
    result = (shown, mask, scales) if codes else (shown, mask)
    if n_rows == 0:
        return result
    n_blocks = triton.cdiv(n_cols, 128)
    if resident is None:
        resident = n_blocks <= MAX_RESIDENT_BLOCKS and n_blocks == triton.next_power_of_2(n_blocks)
    tile_rows, warps, per_sm, stages = launch or LAUNCH["resident" if resident else "two_pass"]
    stages = 1 if x2d.dtype == torch.float32 else stages
    meta = dict(
        GRID=GRID_CODES[grid],
        N_LEVELS=n_levels,
        ESTIMATOR=ESTIMATOR_CODES[estimator],
        A=FP4_SCALE,
        HADAMARD=hadamard,
        DOT_MODE=dot_mode(x2d.dtype),
        ROUND_BF16=round_bf16(x2d.dtype),
        CODES=CODE_FORMATS[codes],
        GROUP=group_size or 0,
        STAGES=stages,
    )
    args = (x2d, values, mask, scales, n_rows, n_cols, x2d.stride(0), x2d.stride(1), values.stride(0), mask.stride(0))
    args += (scale_coef, trust, clip_scale)
    if resident:
        nb = triton.next_power_of_2(n_blocks)
        # tl.dot needs at least 16 tile rows; the interpreter pays per program, so it gets the whole tensor in a few.
        target = max(64, nb * triton.next_power_of_2(n_rows)) if interpreting() and not launch else tile_rows
        block_m = max(16 // nb, 1, min(target, 4096) // nb)
        kernel, meta = _quantize_fwd_resident_kernel, dict(meta, BLOCK_M=block_m, NB=nb)
    else:
        block_m = max(16, min(256, triton.next_power_of_2(n_rows))) if interpreting() and not launch else tile_rows
        kernel, meta = _quantize_fwd_two_pass_kernel, dict(meta, BLOCK_M=block_m)
    programs = programs or num_programs(triton.cdiv(n_rows, block_m), x2d.device, per_sm)
    kernel[(programs,)](*args, **meta, num_warps=warps, num_stages=stages)
    return result
