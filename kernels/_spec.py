"""What the fused kernels serve, and the checks at their boundary: grids, estimators, dtypes, group sizes, default τ.

The bottom of `kernels`: imported by the package and by every Triton module, so none of them imports the package's
`__init__` (the import graph stays a tree). Imports neither Triton nor a GPU library.
"""

from __future__ import annotations

import os

import torch

from quest_pl.quantizers import OPTIMAL_GAUSSIAN_SCALES, build

GRIDS = ("gaussian_mse", "fp4")
ESTIMATORS = ("trust", "clip")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HADAMARD_BLOCK = 128
GROUP_SIZES = (16, 32, 64, 128)
"""Group sizes of the fused forward (`group_size`): each group lies inside one 128-column block, so its σ comes from
the block's rotated values in registers. Larger groups, other Hadamard blocks and the block formats' rounded scales
(mxfp4, nvfp4) use the PyTorch path."""
# Default τ per (grid, bits), the reference grids' own (half a step on gaussian_mse, α_b/(n-1); half the outermost gap
# on fp4, a). A table built at import (about 2 ms), so that compiled code never builds a grid.
DEFAULT_TRUST = {("gaussian_mse", b): build("gaussian_mse", bits=b).default_trust for b in OPTIMAL_GAUSSIAN_SCALES}
DEFAULT_TRUST["fp4", 4] = build("fp4", bits=4).default_trust


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def config_error(grid: str, bits: int, estimator: str) -> str | None:
    if grid not in GRIDS:
        return f"grid {grid!r} has no kernel (supported: {', '.join(GRIDS)})"
    if grid == "gaussian_mse" and bits not in OPTIMAL_GAUSSIAN_SCALES:
        return f"gaussian_mse kernel supports bits 1..8, got {bits!r}"
    if grid == "fp4" and bits != 4:
        return f"fp4 grid has 4 bits, got bits={bits!r}"
    if estimator not in ESTIMATORS:
        return f"estimator {estimator!r} has no kernel (supported: {', '.join(ESTIMATORS)})"
    return None


def width_error(width: int, hadamard: bool, group_size: int | None = None) -> str | None:
    if width < 1:
        return f"quantized dimension must be non-empty, got width {width}"
    if hadamard and width % HADAMARD_BLOCK:
        return f"block-{HADAMARD_BLOCK} Hadamard needs the last dimension to be a multiple of 128, got {width}"
    if group_size is not None:
        if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
            sizes = ", ".join(map(str, GROUP_SIZES))
            return f"the fused kernel's group sizes are {sizes} (or per row), got group_size={group_size!r}"
        if width % group_size:
            return f"group_size={group_size} does not divide the last dimension {width}"
    return None


def resolve(x: torch.Tensor, bits: int, grid: str, hadamard: bool, estimator: str, trust, group_size=None) -> float:
    """Validate a kernel call at the boundary; return the trust threshold τ (in σ units)."""
    width = x.shape[-1] if x.dim() else 0
    reason = config_error(grid, bits, estimator) or width_error(width, hadamard, group_size)
    if reason:
        raise ValueError(reason)
    if x.dtype not in DTYPES:
        raise ValueError(f"kernel inputs must be float32, bfloat16 or float16, got {x.dtype}")
    return float(DEFAULT_TRUST[grid, bits] if trust is None else trust)


def require_runnable(x: torch.Tensor) -> None:
    """CPU tensors run only under Triton's interpreter: say so instead of failing inside Triton."""
    if x.device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "kernels: CPU tensors run only under Triton's interpreter; set TRITON_INTERPRET=1 before Triton is "
            "imported, or use the PyTorch reference quantizers"
        )
