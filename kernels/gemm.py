"""The low-precision forward GEMM on integer codes (METHOD.md §5), on whichever tensor-core path is fastest per shape.

Both operands arrive as the odd integer codes c = 2k + 1 of a centered grid, quantized along K, with Δ/2 per row:
y = (C_a C_b^T) ⊙ (s_a s_b^T). Each backend computes the integer sums exactly (int32 accumulation; FP8 products of
|c| <= 15 are exact and their fp32 sums exact below 2^24, i.e. K·225 < 2^24: K < 74,565) and applies the scales in
fp32 before one rounding to the output dtype, so they agree up to the order of the two scale products (an fp32 ulp
before that rounding):
  triton   the Triton INT8 GEMM with the scales in its epilogue (`_tl_gemm.int8_matmul`), int8 codes;
  int_mm   torch._int_mm (cuBLASLt INT8) to int32, then the Triton scale epilogue: one extra pass over C;
  fp8      torch._scaled_mm on FP8 E4M3 codes with row-wise scales (cuBLASLt / CUTLASS, sm_89+), codes |c| <= 15
           (grids of at most 4 bits), bf16 output, K and N multiples of 16.
`choose_backend` times the eligible backends once per (M, N, K, ...) on the device and caches the fastest; set
`FORCE_BACKEND` (or pass `backend=`) to pin one. On CPU (tests) "fp8" is emulated exactly (fp32 products of the
decoded FP8 values) and the others run the Triton GEMM under the interpreter.
"""

from __future__ import annotations

import torch

from quest_pl.kernels._spec import interpreting

BACKENDS = ("triton", "int_mm", "fp8")
CODE_FORMAT = {"triton": "int8", "int_mm": "int8", "fp8": "fp8"}
FP8_MAX_BITS = 4  # odd codes up to 15: exact in E4M3 (3 mantissa bits)
FORCE_BACKEND: str | None = None
_INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA: rows > 16, K and N multiples of 8
_CHOICES: dict[tuple, str] = {}


def _fp8_ok(n: int, k: int, bits: int, device: torch.device, out_dtype: torch.dtype) -> bool:
    if bits > FP8_MAX_BITS:
        return False
    if device.type != "cuda":
        return True  # the exact emulation
    return torch.cuda.get_device_capability(device) >= (8, 9) and out_dtype == torch.bfloat16 and n % 16 == 0 == k % 16


def eligible_backends(m: int, n: int, k: int, bits: int, device: torch.device, out_dtype: torch.dtype) -> list[str]:
    """The backends that can serve this product exactly, in the order preferred when no measurement is possible."""
    found = ["fp8"] if _fp8_ok(n, k, bits, device, out_dtype) else []
    if device.type == "cuda":
        found += ["triton", "int_mm"]
    elif interpreting():
        found.append("triton")
    return found


def _time_ms(fn, reps: int = 5) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def choose_backend(
    m: int, n: int, k: int, bits: int, device: torch.device, out_dtype: torch.dtype, backend: str | None = None
) -> str:
    """`backend` (or `FORCE_BACKEND`) if given and eligible; else the fastest eligible backend for this shape, timed
    once on random codes and cached (the first eligible on CPU, while torch.compile traces, or while a CUDA graph is
    captured, unless an eager call measured this shape before)."""
    eligible = eligible_backends(m, n, k, bits, device, out_dtype)
    if not eligible:
        raise ValueError(f"no low-precision GEMM serves {bits}-bit codes on {device} (need CUDA or TRITON_INTERPRET=1)")
    pinned = backend or FORCE_BACKEND
    if pinned is not None:
        if pinned not in eligible:
            raise ValueError(f"GEMM backend {pinned!r} cannot serve {bits}-bit codes, K={k}, N={n}, {out_dtype} on "
                             f"{device} (eligible: {', '.join(eligible)})")  # fmt: skip
        return pinned
    key = (m, n, k, bits, str(device), out_dtype)
    if len(eligible) == 1 or device.type != "cuda" or torch.compiler.is_compiling():
        return _CHOICES.get(key, eligible[0])
    if torch.cuda.is_current_stream_capturing():
        return _CHOICES.get(key, eligible[0])
    if key not in _CHOICES:
        codes_a = torch.randint(-7, 8, (m, k), device=device, dtype=torch.int8) * 2 + 1
        codes_b = torch.randint(-7, 8, (n, k), device=device, dtype=torch.int8) * 2 + 1
        sa, sb = torch.rand(m, device=device), torch.rand(n, device=device)
        times = {}
        for name in eligible:
            a, b = to_format(codes_a, CODE_FORMAT[name]), to_format(codes_b, CODE_FORMAT[name])
            times[name] = _time_ms(lambda name=name, a=a, b=b: scaled_matmul(a, b, sa, sb, out_dtype, name))
        _CHOICES[key] = min(times, key=times.get)
    return _CHOICES[key]


def to_format(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """int8 or float8_e4m3fn codes in the format `fmt` ("int8" or "fp8"); the integers are exact in both."""
    dtype = torch.int8 if fmt == "int8" else torch.float8_e4m3fn
    if codes.dtype == dtype:
        return codes
    return codes.float().to(dtype)


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if t.shape == (rows, cols):
        return t
    return torch.nn.functional.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) int8 · b (N, K)^T int8 -> (M, N) int32, exact (no overflow for K·max|a|·max|b| < 2^31).

    CUDA: ``torch._int_mm`` (cuBLASLt INT8 tensor cores); its constraints (M > 16, K and N multiples of 8) are met by
    zero padding, which leaves the sums unchanged. Elsewhere: the product in float64, exact for these sizes (each
    partial sum is an integer below 2^53), converted to int32."""
    check_operands(a, b, torch.int8)
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((m, n), dtype=torch.int32, device=a.device)
    if a.is_cuda:
        rows = max(m, _INT_MM_MIN_ROWS)
        rows += -rows % 8
        kp, np_ = k + (-k % 8), n + (-n % 8)
        return torch._int_mm(_pad_to(a.contiguous(), rows, kp), _pad_to(b.contiguous(), np_, kp).t())[:m, :n]
    return (a.double() @ b.double().t()).to(torch.int32)


def check_operands(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    if a.dtype != dtype or b.dtype != dtype:
        raise ValueError(f"the GEMM needs {dtype} operands, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"the GEMM needs a (M, K) and b (N, K), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"GEMM operands on different devices: {a.device} and {b.device}")


def fp8_matmul(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, out_dtype):
    """a (M, K) · b (N, K)^T in FP8 E4M3 times scale_a[:, None] · scale_b[None, :] (fp32), in out_dtype.
    CUDA: torch._scaled_mm with row-wise scales (b passed column-major as its transpose view). CPU: the decoded
    values in fp32, the same sums up to their order."""
    check_operands(a, b, torch.float8_e4m3fn)
    if a.is_cuda and _fp8_ok(b.shape[0], a.shape[1], FP8_MAX_BITS, a.device, out_dtype):
        sa, sb = scale_a.float().reshape(-1, 1).contiguous(), scale_b.float().reshape(1, -1).contiguous()
        return torch._scaled_mm(a.contiguous(), b.contiguous().t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    acc = a.float() @ b.float().t()
    return (acc * scale_a.float()[:, None] * scale_b.float()[None, :]).to(out_dtype)


def scaled_matmul(a, b, scale_a, scale_b, out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """(a · b^T) ⊙ (scale_a[:, None] · scale_b[None, :]) in out_dtype on `backend` (codes in its `CODE_FORMAT`)."""
    if backend == "fp8":
        return fp8_matmul(a, b, scale_a, scale_b, out_dtype)
    check_operands(a, b, torch.int8)
    sa, sb = scale_a.float().contiguous(), scale_b.float().contiguous()
    if a.is_cuda or interpreting():
        from quest_pl.kernels import _tl_gemm

        if backend == "triton":
            return _tl_gemm.int8_matmul(a, b, sa, sb, out_dtype)
        return _tl_gemm.scale_rows_cols(int_matmul(a, b), sa, sb, out_dtype)
    return (int_matmul(a, b).float() * sa[:, None] * sb[None, :]).to(out_dtype)
