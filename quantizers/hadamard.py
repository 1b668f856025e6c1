"""Block-128 Hadamard transform (METHOD.md §1.8, fixing §7.12 and §7.15).

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


@cache
def _sylvester_signs(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The +-1 Sylvester matrix S_128 (S_{2m} = [[S, S], [S, -S]])."""
    signs = torch.ones(1, 1, dtype=torch.float64)
    while signs.shape[0] < HADAMARD_BLOCK:
        signs = torch.cat((torch.cat((signs, signs), 1), torch.cat((signs, -signs), 1)), 0)
    return signs.to(device=device, dtype=dtype)


@cache
def hadamard_matrix(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """Orthonormal H_128 = S_128 / sqrt(128), built in float64 then cast; cached per (dtype, device)."""
    return (_sylvester_signs(torch.float64, torch.device("cpu")) * HADAMARD_SCALE).to(device=device, dtype=dtype)


def hadamard_transform(x: Tensor) -> Tensor:
    """x -> x @ blockdiag(H_128, ...) along the last dim, computed block-wise; output in x's dtype."""
    d = x.shape[-1]
    if d % HADAMARD_BLOCK:
        raise ValueError(f"Hadamard transform needs a last dim that is a multiple of {HADAMARD_BLOCK}, got {d}")
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        blocks = x.to(compute_dtype).unflatten(-1, (d // HADAMARD_BLOCK, HADAMARD_BLOCK))
        rotated = (blocks @ _sylvester_signs(compute_dtype, x.device)) * HADAMARD_SCALE
    return rotated.flatten(-2).to(x.dtype)
