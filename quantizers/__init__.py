"""Per-row quantization grids (METHOD.md §1.2-§1.7) and the block-128 Hadamard transform (§1.8).

`build(name, bits=b)` returns a stateless `Grid`: `q(x)` gives dequantized values in x's dtype, `q.quantize(x)` a
fp32 `QuantOutput(values, rms, scale)`. Registered grids: uniform, gaussian_mse, lloyd_max, fp4, int_sparse24,
ternary, and the block-scaled formats mxfp4 and nvfp4. Any grid takes `group_size=g` (one scale per g
elements). Gradient rules live in the `estimators` package.
"""

from quest_pl.quantizers import fp4, gaussian_mse, int_sparse24, lloyd_max, mx, nvfp4, ternary, uniform
from quest_pl.quantizers.base import GRIDS, RMS_EPS, Grid, QuantOutput, build, register_grid, row_rms
from quest_pl.quantizers.gaussian_mse import OPTIMAL_GAUSSIAN_SCALES
from quest_pl.quantizers.hadamard import HADAMARD_BLOCK, HADAMARD_BLOCKS, hadamard_matrix, hadamard_transform

__all__ = [
    "GRIDS",
    "HADAMARD_BLOCK",
    "HADAMARD_BLOCKS",
    "OPTIMAL_GAUSSIAN_SCALES",
    "RMS_EPS",
    "Grid",
    "QuantOutput",
    "build",
    "fp4",
    "gaussian_mse",
    "hadamard_matrix",
    "hadamard_transform",
    "int_sparse24",
    "lloyd_max",
    "mx",
    "nvfp4",
    "register_grid",
    "row_rms",
    "ternary",
    "uniform",
]
