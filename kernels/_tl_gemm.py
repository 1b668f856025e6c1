"""Triton kernels of the low-precision GEMM path (METHOD.md §5): an INT8 GEMM with the per-row scales in its
epilogue, the same epilogue alone (after `torch._int_mm`), and the dequantization of codes for the backward.

INT8 GEMM: C = (A_int8 · B_int8^T) ⊙ (s_a s_b^T), exact int32 accumulation, fp32 epilogue, one rounding to C's dtype.
"""

import torch
import triton
import triton.language as tl

from quest_pl.kernels._spec import interpreting
from quest_pl.kernels._tl_common import round_bf16, to_output


def _int8_configs():
    if interpreting():  # the interpreter runs one config only
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4)]
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): large tiles for long K, then smaller tiles and shorter K steps, which
    # keep more programs per multiprocessor when K (640-2048) gives each program only a few iterations.
    shapes = [(128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (256, 128, 128, 8, 3), (64, 128, 128, 4, 4)]
    shapes += [(128, 128, 64, 4, 4), (128, 64, 128, 4, 3), (128, 256, 64, 8, 4), (64, 256, 64, 4, 4)]
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
        tl.store(c_ptrs, to_output(out, c_ptr.dtype.element_ty, ROUND_BF16), mask=ok)
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
        SCALED=scaled, ROUND_BF16=round_bf16(c.dtype),
    )  # fmt: skip
    return c


@triton.jit
def _scale_rows_cols_kernel(
    src_ptr, row_ptr, col_ptr, out_ptr, n_rows, n_cols, stride_sm, stride_om,
    HAS_COL: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out = src · row[m] (· col[n]) in fp32, one rounding to out's dtype: the dequantization of codes, and the
    scale epilogue of an int32 product."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    src = tl.load(src_ptr + rows64 * stride_sm + cols[None, :], mask=ok).to(tl.float32)  # masked lanes: not stored
    out = src * tl.load(row_ptr + rows, mask=rows < n_rows, other=0.0)[:, None]
    if HAS_COL:
        out = out * tl.load(col_ptr + cols, mask=cols < n_cols, other=0.0)[None, :]
    tl.store(out_ptr + rows64 * stride_om + cols[None, :], to_output(out, out_ptr.dtype.element_ty, ROUND_BF16),
             mask=ok)  # fmt: skip


def scale_rows_cols(src: torch.Tensor, row: torch.Tensor, col: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """src (rows, cols) with a unit column stride (int8 or FP8 codes, or an int32 product), row (rows,) and col
    (cols,) fp32 -> src · row[:, None] (· col[None, :]) in dtype."""
    n_rows, n_cols = src.shape
    out = torch.empty((n_rows, n_cols), dtype=dtype, device=src.device)
    if out.numel() == 0:
        return out
    block_m, block_n = (64, 128) if not interpreting() else (max(16, min(256, triton.next_power_of_2(n_rows))), 512)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    _scale_rows_cols_kernel[grid](
        src, row, row if col is None else col, out, n_rows, n_cols, src.stride(0), out.stride(0),
        HAS_COL=col is not None, ROUND_BF16=round_bf16(dtype), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return out
