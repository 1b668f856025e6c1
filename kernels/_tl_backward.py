"""Triton backward kernel of the fused QuEST quantizer: grad_x = (grad ⊙ mask)·H (H symmetric), one pass over the
gradient (METHOD.md §1.8, §8 "Triton kernels"). Persistent: each program builds the ±1 Sylvester operand once and loops
over (row block, column chunk) tiles."""

import torch
import triton
import triton.language as tl

from quest_pl.kernels._spec import interpreting
from quest_pl.kernels._tl_common import dot_mode, dot_signs, num_programs, rotate, round_bf16, to_output, unpack_bits

# (rows per tile, 128-column blocks per tile, warps, programs per SM); read at each call, so a benchmark can sweep it.
# Measured on H100 (2026-12-07): 65536x2048 bf16, 2.06x the copy with one program per tile (64 x 4 blocks), 1.22x with
# 64 x 2 blocks, 8 programs per SM. fp32 gradients are not pipelined (shared memory).
LAUNCH = (64, 2, 4, 8)


@triton.jit
def _quantize_bwd_kernel(
    grad_ptr, mask_ptr, out_ptr, n_rows, n_cols, stride_gm, stride_gn, stride_mm, stride_om,
    HADAMARD: tl.constexpr, DOT_MODE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCKS_PER_TILE: tl.constexpr,
):  # fmt: skip
    """(grad ⊙ mask)·H for tiles of BLOCK_M rows x BLOCKS_PER_TILE 128-column blocks."""
    if HADAMARD:
        signs = dot_signs(grad_ptr.dtype.element_ty, DOT_MODE)
    n_chunks = tl.cdiv(tl.cdiv(n_cols, 128), BLOCKS_PER_TILE)
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M) * n_chunks, tl.num_programs(0)):
        rows = (tile // n_chunks) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = (rows < n_rows)[:, None]
        rows64 = rows.to(tl.int64)[:, None]
        for b in tl.static_range(BLOCKS_PER_TILE):
            col0 = ((tile % n_chunks) * BLOCKS_PER_TILE + b) * 128
            cols = col0 + tl.arange(0, 128)[None, :]
            ok = row_ok & (cols < n_cols)
            byte_cols = col0 // 8 + tl.arange(0, 16)[None, :]
            packed = tl.load(mask_ptr + rows64 * stride_mm + byte_cols,
                             mask=row_ok & (byte_cols < (n_cols + 7) // 8), other=0)  # fmt: skip
            grad = tl.load(grad_ptr + rows64 * stride_gm + cols * stride_gn, mask=ok, other=0.0)
            # Masking before the rotation is exact in any dtype.
            grad = tl.where(unpack_bits(packed, BLOCK_M) != 0, grad, tl.zeros_like(grad))
            if HADAMARD:
                grad_x = rotate(grad, signs, DOT_MODE)
            else:
                grad_x = grad.to(tl.float32)
            tl.store(out_ptr + rows64 * stride_om + cols, to_output(grad_x, out_ptr.dtype.element_ty, ROUND_BF16),
                     mask=ok)  # fmt: skip


def quantize_backward(
    grad2d: torch.Tensor,
    mask: torch.Tensor,
    hadamard: bool,
    *,
    launch: tuple[int, int, int, int] | None = None,
    programs: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """grad (rows, cols), any strides, and the packed mask -> (grad ⊙ mask)·H in grad's dtype, contiguous.
    `launch`: (rows per tile, blocks per tile, warps, programs per SM), default `LAUNCH`; `programs`: the grid."""
    n_rows, n_cols = grad2d.shape
    if out is None:
        out = torch.empty((n_rows, n_cols), dtype=grad2d.dtype, device=grad2d.device)
    if n_rows == 0:
        return out
    n_blocks = triton.cdiv(n_cols, 128)
    block_m, per_tile, warps, per_sm = launch or LAUNCH
    if interpreting() and not launch:
        block_m, per_tile = max(16, min(256, triton.next_power_of_2(n_rows))), n_blocks
    per_tile = min(per_tile, n_blocks)
    n_tiles = triton.cdiv(n_rows, block_m) * triton.cdiv(n_blocks, per_tile)
    args = (grad2d, mask, out, n_rows, n_cols, grad2d.stride(0), grad2d.stride(1), mask.stride(0), out.stride(0))
    _quantize_bwd_kernel[(programs or num_programs(n_tiles, grad2d.device, per_sm),)](
        *args, HADAMARD=hadamard, DOT_MODE=dot_mode(grad2d.dtype), ROUND_BF16=round_bf16(grad2d.dtype),
        BLOCK_M=block_m, BLOCKS_PER_TILE=per_tile, num_warps=warps,
        num_stages=1 if grad2d.dtype == torch.float32 else 3,
    )  # fmt: skip
    return out
