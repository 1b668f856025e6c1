"""Standard-normal helpers for the grids' theory (METHOD.md §1.2, §1.4, §1.5): float64, no scipy, nothing at import."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from functools import cache

import torch
from torch import Tensor

INTEGRATION_RANGE = 12.0
"""N(0,1) mass beyond |z| = 12 is 3.6e-33: negligible for every quantity we integrate."""


def normal_pdf(z: float) -> float:
    """phi(z); 0 at +-inf."""
    return 0.0 if math.isinf(z) else math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def normal_cdf(z: float) -> float:
    """Phi(z) via math.erf."""
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2)))


def normal_tail2(t: float) -> float:
    """P(|Z| > t) = 2 Q(t) = erfc(t / sqrt 2) for t >= 0 (METHOD.md §1.4 masked fractions)."""
    return math.erfc(t / math.sqrt(2))


@cache
def _gauss_legendre(n: int) -> tuple[Tensor, Tensor]:
    """Nodes and weights of n-point Gauss-Legendre on [-1, 1] (Golub-Welsch, float64)."""
    k = torch.arange(1, n, dtype=torch.float64)
    off = k / torch.sqrt(4 * k * k - 1)
    jacobi = torch.diag(off, 1) + torch.diag(off, -1)
    nodes, vecs = torch.linalg.eigh(jacobi)
    return nodes, 2 * vecs[0].square()


def gaussian_expectation(
    integrand: Callable[[Tensor], Tensor], breakpoints: Iterable[float] = (), max_width: float = 0.25, order: int = 16
) -> float:
    """E[f(Z)], Z ~ N(0,1), for f smooth between `breakpoints` (float64 piecewise Gauss-Legendre on [-12, 12]).

    Pieces are split at every breakpoint and to at most `max_width`, so jumps of f (grid decision boundaries, mask
    thresholds) fall on piece ends and the quadrature is accurate to ~1e-12.
    """
    lim = INTEGRATION_RANGE
    edges = sorted({-lim, lim, *(float(b) for b in breakpoints if -lim < b < lim)})
    pieces = []
    for lo, hi in itertools.pairwise(edges):
        parts = max(1, math.ceil((hi - lo) / max_width))
        pieces.append(torch.linspace(lo, hi, parts + 1, dtype=torch.float64))
    cuts = torch.cat([torch.stack((p[:-1], p[1:]), dim=1) for p in pieces])
    nodes, weights = _gauss_legendre(order)
    half = (cuts[:, 1:] - cuts[:, :1]) / 2
    z = (cuts[:, :1] + half + half * nodes).flatten()
    w = (half * weights).flatten() * torch.exp(-0.5 * z.square()) / math.sqrt(2 * math.pi)
    return float((w * integrand(z).to(torch.float64)).sum())
