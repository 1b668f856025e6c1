"""Block-128 Hadamard transform (METHOD.md §1.8, fixing §7.12 and §7.15); smaller power-of-two blocks (16, 32, 64)
for block-scaled formats (`block=`).

Each contiguous block of 128 along the last dim is multiplied by the orthonormal Sylvester Hadamard H_128 =
S / sqrt(128), S the +-1 Sylvester matrix, as a (..., d/128, 128) @ (128, 128) product (never a d x d
block-diagonal matmul). S is exact in any dtype; the product and the 1/sqrt(128) scale run in fp32 for fp32/bf16/fp16
inputs (float64 stays float64), with autocast off, and the result is cast back to the input dtype. H is symmetric and
orthonormal, so the transform is its own inverse, and it is differentiable (a matmul).

Caveat: with TF32 matmuls enabled on CUDA (torch.backends.cuda.matmul.allow_tf32 / "high" float32 matmul precision)
fp32 inputs are rounded to TF32 inside the product; bf16 inputs are exact either way.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

HADAMARD_BLOCK = 128
HADAMARD_SCALE = 1 / math.sqrt(HADAMARD_BLOCK)
HADAMARD_BLOCKS = (16, 32, 64, 128)
"""Allowed block sizes; 128 is QuEST's, 16 and 32 match NVFP4 and MXFP4 groups."""


@cache
def _sylvester_signs(dtype: torch.dtype, device: torch.device, block: int = HADAMARD_BLOCK) -> Tensor:
    """The +-1 Sylvester matrix S_block (S_{2m} = [[S, S], [S, -S]])."""
    if block not in HADAMARD_BLOCKS:
        raise ValueError(f"Hadamard block {block!r}: expected one of {', '.join(map(str, HADAMARD_BLOCKS))}")
    signs = torch.ones(1, 1, dtype=torch.float64)
    while signs.shape[0] < block:
        signs = torch.cat((torch.cat((signs, signs), 1), torch.cat((signs, -signs), 1)), 0)
    return signs.to(device=device, dtype=dtype)


@cache
def hadamard_matrix(
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", block: int = HADAMARD_BLOCK
) -> Tensor:
    """Orthonormal H_block = S_block / sqrt(block), built in float64 then cast; cached per (dtype, device, block)."""
    signs = _sylvester_signs(torch.float64, torch.device("cpu"), block)
    return (signs / math.sqrt(block)).to(device=device, dtype=dtype)


def hadamard_transform(x: Tensor, block: int = HADAMARD_BLOCK) -> Tensor:
    """x -> x @ blockdiag(H_block, ...) along the last dim, computed block-wise; output in x's dtype."""
    d = x.shape[-1]
    if d % block:
        raise ValueError(f"Hadamard transform needs a last dim that is a multiple of {block}, got {d}")
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        blocks = x.to(compute_dtype).unflatten(-1, (d // block, block))
        rotated = (blocks @ _sylvester_signs(compute_dtype, x.device, block)) * (1 / math.sqrt(block))
    return rotated.flatten(-2).to(x.dtype)
