"""Triton building blocks shared by the quantizer and GEMM kernels (METHOD.md §8 "Triton kernels"): the exact
Sylvester Hadamard product on the tensor cores, fp32 -> 16-bit rounding, mask bit-packing, FP8 E4M3 code bytes.

Exact Hadamard: H = S/√128 with S the ±1 Sylvester matrix. A bf16 / fp16 element times ±1 is exact, so a 16-bit
tensor-core product with S accumulated in fp32 is the fp32 sum; fp32 inputs are split into three bf16 parts
(hi + mid + lo = x exactly) for the same result. Everything after the rotation is fp32.

Imported lazily (Triton reads `TRITON_INTERPRET` when a `@triton.jit` function is defined).
"""

import torch
import triton
import triton.language as tl

from quest_pl.kernels._spec import interpreting

# Dot operand modes. DOT_FP32: fp32 operands at full precision (the interpreter's tl.dot on bf16 is wrong);
# DOT_NATIVE16: the 16-bit input dtype as is; DOT_SPLIT3: an fp32 input split into three exact bf16 parts.
DOT_FP32, DOT_NATIVE16, DOT_SPLIT3 = 0, 1, 2


def dot_mode(dtype: torch.dtype) -> int:
    if interpreting():
        return DOT_FP32
    return DOT_SPLIT3 if dtype == torch.float32 else DOT_NATIVE16


def round_bf16(dtype: torch.dtype) -> bool:
    """The interpreter's fp32 -> bf16 cast truncates: round in the kernel instead (`to_output`)."""
    return interpreting() and dtype == torch.bfloat16


def num_programs(n_tiles: int, device: torch.device, per_sm: int) -> int:
    """A persistent grid: `per_sm` programs per multiprocessor at most, each looping over tiles (the interpreter: one
    program per tile, it pays per program anyway)."""
    if interpreting() or device.type != "cuda":
        return n_tiles
    return max(1, min(n_tiles, per_sm * torch.cuda.get_device_properties(device).multi_processor_count))


@triton.jit
def sylvester_signs(N: tl.constexpr, DTYPE: tl.constexpr):
    """S[i, j] = (-1)^popcount(i & j): the NxN Sylvester Hadamard matrix without its 1/√N (symmetric, N <= 128)."""
    parity = tl.arange(0, N)[:, None] & tl.arange(0, N)[None, :]
    parity = parity ^ (parity >> 4)
    parity = parity ^ (parity >> 2)
    parity = parity ^ (parity >> 1)
    return (1 - 2 * (parity & 1)).to(DTYPE)


@triton.jit
def dot_signs(x_dtype: tl.constexpr, DOT_MODE: tl.constexpr):
    """S_128 in the dot operand dtype of `DOT_MODE`."""
    if DOT_MODE == 1:
        return sylvester_signs(128, x_dtype)
    elif DOT_MODE == 2:
        return sylvester_signs(128, tl.bfloat16)
    else:
        return sylvester_signs(128, tl.float32)


@triton.jit
def rotate(x, signs, DOT_MODE: tl.constexpr):
    """fp32 x·S/√128 for an (R, 128) tile x in its storage dtype; `signs` from `dot_signs`."""
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
    return acc * 0.08838834764831845


@triton.jit
def to_output(v, OUT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Cast fp32 to the output dtype, rounding to nearest even (the interpreter's fp32->bf16 cast truncates)."""
    if ROUND_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + ((bits >> 16) & 1) + 0x7FFF) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(OUT_DTYPE)


@triton.jit
def pack_bits(keep, R: tl.constexpr):
    """(R, 128) int32 0/1 -> (R, 16) uint8, column j in bit j % 8 of byte j // 8."""
    weights = (1 << tl.arange(0, 8)).to(tl.int32)
    return tl.sum(tl.reshape(keep, (R, 16, 8)) * weights[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def unpack_bits(packed, R: tl.constexpr):
    """(R, 16) uint8 -> (R, 128) int32 0/1, the inverse of `pack_bits`."""
    bits = (packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, (R, 128))


@triton.jit
def e4m3_bits(odd):
    """The FP8 E4M3 byte of an odd integer |c| <= 15 held in fp32 (exact: at most 4 significant bits): sign, biased
    exponent p + 7 with p = floor(log2|c|), mantissa |c|·8/2^p - 8. Integer arithmetic, so the interpreter (which
    has no fp8 casts) and the GPU store the same bytes; the caller views them as torch.float8_e4m3fn."""
    a = tl.abs(odd).to(tl.int32)
    p = (a >= 2).to(tl.int32) + (a >= 4).to(tl.int32) + (a >= 8).to(tl.int32)
    mantissa = ((a << 3) >> p) - 8
    return (((odd < 0).to(tl.int32) << 7) | ((p + 7) << 3) | mantissa).to(tl.uint8)
