"""Grid base class, the quantizer output record and the grid registry (METHOD.md §0, §1.2-§1.7, §8).

A grid maps each row (the last dimension) to dequantized values with one scale per row: per output row for a
weight, per token for an activation (METHOD.md §0). Arithmetic is fp32 whatever the input dtype (METHOD.md
§7.12); the module call returns the input dtype. Grids carry no gradient rule: wrap one in an estimator
(`estimators.build`).

Group scales. With `group_size = g` (`build(name, bits, group_size=g)`) every grid quantizes each run of g consecutive
elements of a row as its own row: the scale rule (RMS x constant, absmax, ...) and the trust threshold then act per
group. `Grid.rows(x)` is that view, shape (..., d // g, g); `quantize` returns its `QuantOutput` in it, `forward`
returns x's shape. Block-scaled formats (MXFP4 g = 32, NVFP4 g = 16) set their group size by their spec.

Hadamard and groups. g and the Hadamard block B are powers of two, so groups and blocks nest: for g <= B each group
lies inside one block (the rotation mixes the B inputs of its block into every group of it), for g > B a group spans
g / B whole blocks. Both are exact and allowed; the usual choice (Quartet) is B = g or B = 128 >= g.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from quest_pl.quantizers.gaussian import gaussian_expectation

RMS_EPS = 1e-30
"""Floor on the row RMS used for scales: sigma_hat = max(sigma, RMS_EPS). It only keeps all-zero rows finite (no 0/0);
every row with sigma >= 1e-30 is quantized scale-equivariantly (unlike the authors' `+1e-8`, METHOD.md §7.13)."""


class QuantOutput(NamedTuple):
    """Result of `Grid.quantize`, all fp32.

    values: dequantized values, shape of `Grid.rows(x)` (x's shape without group scales). rms: per-row (per-group)
    sigma = sqrt(mean(x^2)) over the last dim, shape (..., 1), no eps. scale: per-row (per-group) clip level s
    (outermost level magnitude), shape (..., 1).
    """

    values: Tensor
    rms: Tensor
    scale: Tensor


def row_rms(x32: Tensor) -> Tensor:
    """sigma(x) = sqrt(mean_i x_i^2) over the last dim, shape (..., 1) (METHOD.md §0: no mean removed)."""
    return x32.square().mean(dim=-1, keepdim=True).sqrt()


def safe_rms(rms: Tensor) -> Tensor:
    """sigma_hat = max(sigma, RMS_EPS): the sigma that scales are built from."""
    return rms.clamp_min(RMS_EPS)


GROUP_SIZES = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Allowed group sizes: powers of two, so that groups and Hadamard blocks nest (module docstring)."""

SCALE_BITS = 16
"""Storage assumed for a per-row or per-group scale of the grids without a scale format of their own (a bf16/fp16
scale, as INT4 group formats store it); used by `bits_per_element` only."""


class Grid(nn.Module):
    """A stateless per-row (or per-group, see the module docstring) quantization grid.

    Subclasses set `allowed_bits` (and `default_bits` if bits may be omitted), implement `_quantize(x32, rms)`, and
    set in `__init__`: `levels` (sorted float64 levels in sigma units, None for absmax grids), `clip_level` (s/sigma,
    None for absmax) and `default_trust` (tau in sigma units; None means a per-row rule, see `trust_threshold`).
    """

    name: ClassVar[str] = "grid"
    allowed_bits: ClassVar[tuple] = ()
    default_bits: ClassVar[float | None] = None
    supports_learned_scale: ClassVar[bool] = False
    absmax_covers_row: ClassVar[bool] = True
    """For grids without `levels`: True when the clip level s is never below the row's max |x| (nothing is clipped,
    so the default trust rule and clip with c >= 1 mask nothing). Block formats with rounded scales set False."""
    options: ClassVar[tuple[str, ...]] = ()
    """Keyword options of `__init__` beyond bits (e.g. NVFP4's `scale_rule`)."""
    fixed_group_size: ClassVar[int | None] = None
    """Group size fixed by a format's spec (MXFP4: 32, NVFP4: 16); None: per row unless `group_size` is set."""

    levels: Tensor | None
    clip_level: float | None
    default_trust: float | None

    def __init__(self, bits: float | None = None) -> None:
        super().__init__()
        self.bits = self._check_bits(bits)
        self.group_size: int | None = self.fixed_group_size

    def set_group_size(self, group_size: int | None) -> None:
        """One scale per `group_size` consecutive elements of a row (None: per row). ValueError if not allowed."""
        if group_size is None:
            return
        if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
            sizes = ", ".join(str(g) for g in GROUP_SIZES)
            raise ValueError(f"group_size={group_size!r} is not allowed; expected null (per row) or one of {sizes}")
        if self.fixed_group_size is not None and group_size != self.fixed_group_size:
            raise ValueError(
                f"grid {self.name!r} has groups of {self.fixed_group_size} by its spec, not group_size={group_size}"
            )
        self.group_size = group_size

    def rows(self, x: Tensor) -> Tensor:
        """The rows the scales act on: x itself, or the view (..., d // g, g) with group scales."""
        g = self.group_size
        if g is None:
            return x
        if x.shape[-1] % g:
            raise ValueError(f"grid {self.name!r}: group_size={g} does not divide the last dimension {x.shape[-1]}")
        return x.unflatten(-1, (x.shape[-1] // g, g))

    def bits_per_element(self, row_length: int, numel: int | None = None) -> float:
        """Storage bits per element including scales: element bits + SCALE_BITS per row or per group."""
        return float(self.bits) + SCALE_BITS / (self.group_size or row_length)

    @classmethod
    def _check_bits(cls, bits: float | None) -> float:
        bits = cls.default_bits if bits is None else bits
        if bits not in cls.allowed_bits:
            allowed = ", ".join(str(b) for b in cls.allowed_bits)
            raise ValueError(f"grid {cls.name!r} does not support bits={bits}; allowed bits: {allowed}")
        return next(b for b in cls.allowed_bits if b == bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}" + (f", group_size={self.group_size}" if self.group_size else "")

    def forward(self, x: Tensor) -> Tensor:
        """Dequantized values in x's shape and dtype (no gradient rule; see `estimators`)."""
        return self.quantize(x).values.reshape(x.shape).to(x.dtype)

    def quantize(self, x: Tensor) -> QuantOutput:
        """Quantize each row of `self.rows(x)` (per row, or per group) in fp32; see `QuantOutput`."""
        x32 = self.rows(x.float())
        return self._quantize(x32, row_rms(x32))

    def _quantize(self, x32: Tensor, rms: Tensor) -> QuantOutput:
        raise NotImplementedError

    def quantize_with_scale(self, x: Tensor, scale: Tensor) -> QuantOutput:
        """Quantize with an externally given clip level s (learned-scale estimators, METHOD.md §1.9)."""
        raise NotImplementedError(f"grid {self.name!r} has no externally scaled form (supports_learned_scale=False)")

    def trust_threshold(self, out: QuantOutput, trust: float | None = None) -> Tensor:
        """Per-row trust threshold tau*sigma, shape (..., 1) (METHOD.md §1.4: sigma without eps).

        tau = `trust`, else `default_trust`. Rows with sigma = 0 get +inf: an all-zero row is quantized exactly up to
        RMS_EPS, so it keeps its gradient (a zero-initialised weight must be able to leave zero).
        """
        tau = self.default_trust if trust is None else trust
        return (tau * out.rms).masked_fill(out.rms == 0, float("inf"))

    # ---- Gaussian theory (large-row limit: sigma = 1 exactly) ----------------------------------------------------

    @cached_property
    def decision_boundaries(self) -> Tensor | None:
        """Midpoints of consecutive levels (float64, sigma units): nearest-level decision boundaries."""
        if self.levels is None:
            return None
        return (self.levels[1:] + self.levels[:-1]) / 2

    def reference_q(self, z: Tensor) -> Tensor:
        """Float64 reference grid map in sigma units: nearest level, ties to the larger level."""
        return self.levels[torch.bucketize(z, self.decision_boundaries, right=True)]

    def gaussian_expectation(self, fn: Callable[[Tensor, Tensor], Tensor], breakpoints=()) -> float | None:
        """E[fn(z, q(z))] for z ~ N(0,1) (numerical, float64); None for absmax grids (depends on the row length).

        `breakpoints` are extra points where fn jumps (e.g. trust thresholds), so quadrature pieces never straddle one.
        None with group scales too: this is the large-row limit (sigma = 1 exactly), which a group of g does not reach.
        """
        if self.levels is None or self.group_size is not None:
            return None
        points = [*self.decision_boundaries.tolist(), *breakpoints]
        return gaussian_expectation(self._theory_integrand(fn), points)

    def _theory_integrand(self, fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        return lambda z: fn(z, self.reference_q(z))

    @cached_property
    def gaussian_mse(self) -> float | None:
        """Theoretical relative MSE E[(q(z) - z)^2] on N(0,1) rows, integrated numerically (METHOD.md §1.2, §1.5)."""
        return self.gaussian_expectation(lambda z, q: (q - z).square())


GRIDS: dict[str, type[Grid]] = {}
"""Registry: grid name -> class. Add a grid with one file and `@register_grid("name")`."""


def register_grid(name: str):
    """Class decorator adding a Grid subclass to `GRIDS` under `name`."""

    def decorate(cls: type[Grid]) -> type[Grid]:
        if name in GRIDS:
            raise ValueError(f"grid {name!r} is already registered")
        cls.name = name
        GRIDS[name] = cls
        return cls

    return decorate


def build(name: str, bits: float | None = None, group_size: int | None = None, **kwargs) -> Grid:
    """Build the grid registered as `name`, per row or with one scale per `group_size` elements (ValueError for an
    unknown name, unsupported bits or group size, or a keyword the grid does not take)."""
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; registered grids: {', '.join(sorted(GRIDS))}")
    if kwargs and not set(kwargs) <= set(GRIDS[name].options):
        raise ValueError(f"grid {name!r} takes no option {', '.join(sorted(set(kwargs) - set(GRIDS[name].options)))}")
    grid = GRIDS[name](bits=bits, **kwargs)
    grid.set_group_size(group_size)
    return grid


def format_bits_per_element(weight: Grid | None, act: Grid | None, row_length: int) -> str:
    """``"W<b>A<b>"`` from the operands' grids (None: 16, full precision), ``Grid.bits_per_element(row_length)`` to
    4 significant digits: the storage cost a report lists for a quantized model (QAT arms and PTQ rows)."""

    def operand(grid: Grid | None) -> str:
        return "16" if grid is None else f"{grid.bits_per_element(row_length):.4g}"

    return f"W{operand(weight)}A{operand(act)}"
