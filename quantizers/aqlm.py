"""Additive quantization of one linear layer's weight, AQLM-style (Egiazarian et al. 2024, "Extreme compression of
large language models via additive quantization"): a calibrated vector-quantization baseline beside the scalar grids.

A weight ``W`` (``out x in``) is cut into groups of ``g`` consecutive input weights. Group ``j`` of row ``i`` is coded
as a scaled sum of ``M`` codewords, one from each of ``M`` learned codebooks of ``K = 2^B`` vectors of length ``g``::

    W_hat[i, j g:(j+1) g] = s_i * sum_m C_m[b_ijm]

with one scale ``s_i`` per output row. Codes cost ``M B / g`` bits per weight (the paper's 1x16 and 2x8 settings at
``g = 8``: 2 bits); codebooks (``M K g`` values) and scales (``out``) are stored in 16 bits, so the total
(:func:`bits_per_weight`) is higher on small layers. Everything minimises the layer's output error on calibration
inputs ``X`` (rows are tokens), through their Gram matrix ``H = X^T X / n``::

    L = || X W^T - X W_hat^T ||^2 / n = tr((W - W_hat) H (W - W_hat)^T)

:func:`quantize` initialises the codebooks by residual k-means on the row-normalised groups, then alternates

1. a beam search over codes (:func:`beam_search`): each group in turn (seeded random order), the ``M`` codes of all
   rows are re-chosen by a beam search over the codebooks, with the exact change of ``L`` including the cross terms to
   every other group (``H`` is not diagonal); a group update never increases ``L``;
2. Adam steps on codebooks and scales with the codes fixed, on ``L`` itself.

The best state met is kept, then codebooks and scales are rounded to fp16 (their storage format), so
:func:`dequantize` of the returned :class:`AQLMWeight` is exactly the weight the model uses.

Pure torch; deterministic for a given ``seed`` on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

STORAGE_BITS = 16  # codebooks and scales are stored (and rounded) in fp16
MAX_CODEBOOK_BITS = 16
_CHUNK_ELEMENTS = 1 << 24  # bound on rows x beam x K candidate scores held at once
EXACT = 1e-9  # a relative output error below this is exact up to fp32 rounding: no further rounds


@dataclass
class AQLMWeight:
    """Codes ``(out, in / g, M)`` (int64), codebooks ``(M, 2^B, g)`` and per-row scales ``(out, 1)`` (fp32 holding
    fp16 values). ``dequantize(codes, codebooks, scales)`` is the quantized weight."""

    codes: Tensor
    codebooks: Tensor
    scales: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        out, groups, _ = self.codes.shape
        return out, groups * self.codebooks.shape[-1]

    def dequantize(self) -> Tensor:
        return dequantize(self.codes, self.codebooks, self.scales)

    def bits_per_weight(self) -> float:
        (out, cols), (m, k, g) = self.shape, self.codebooks.shape
        return bits_per_weight(out, cols, g, m, int(math.log2(k)))


def dequantize(codes: Tensor, codebooks: Tensor, scales: Tensor) -> Tensor:
    """``W_hat[i, group j] = scales[i] * sum_m codebooks[m, codes[i, j, m]]`` as an ``(out, in)`` matrix.
    Differentiable in ``codebooks`` and ``scales``; the sum runs in codebook order, so it is bitwise reproducible."""
    out, _, num_codebooks = codes.shape
    vectors = codebooks[0][codes[..., 0]]
    for m in range(1, num_codebooks):
        vectors = vectors + codebooks[m][codes[..., m]]
    return vectors.reshape(out, -1) * scales


def bits_per_weight(out_features: int, in_features: int, group_size: int, num_codebooks: int, codebook_bits: int,
                    storage_bits: int = STORAGE_BITS) -> float:  # fmt: skip
    """Storage of one layer per weight: codes ``M B / g`` plus the fp16 codebooks ``M 2^B g`` and row scales."""
    codes = out_features * (in_features // group_size) * num_codebooks * codebook_bits
    codebooks = num_codebooks * (1 << codebook_bits) * group_size * storage_bits
    return (codes + codebooks + out_features * storage_bits) / (out_features * in_features)


def output_error(weight: Tensor, weight_hat: Tensor, gram: Tensor) -> Tensor:
    """``tr((W - W_hat) H (W - W_hat)^T)``: the mean squared output error over the calibration tokens."""
    err = weight - weight_hat
    return ((err @ gram) * err).sum()


def relative_error(weight: Tensor, weight_hat: Tensor, gram: Tensor) -> float:
    """:func:`output_error` divided by ``tr(W H W^T)`` (the output's mean square): 0 is exact, 1 is ``W_hat = 0``."""
    return float(output_error(weight, weight_hat, gram) / output_error(weight, torch.zeros_like(weight), gram))


# -- initialisation -------------------------------------------------------------------------------------------------
def kmeans(points: Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means of ``points`` ``(n, g)``: ``(centroids (k, g), assignment (n,))``. Centroids start at ``k``
    distinct random points; an empty cluster keeps its centroid. With ``n <= k`` (a 2^16 codebook on a small layer)
    every point is its own centroid and the other ``k - n`` are jittered copies. Sums per cluster by sorting (no
    atomics), so the result is deterministic on GPU too."""
    n = points.shape[0]
    if n <= k:
        idx = torch.randint(n, (k - n,), generator=generator, device="cpu").to(points.device)
        noise = torch.randn(k - n, points.shape[1], generator=generator, device="cpu").to(points.device)
        centroids = torch.cat((points, points[idx] + 1e-2 * points.std() * noise))
        return centroids, torch.arange(n, device=points.device)
    idx = torch.randperm(n, generator=generator, device="cpu")[:k].to(points.device)
    centroids = points[idx].clone()
    assign = nearest(points, centroids)
    for _ in range(iters):
        order = torch.argsort(assign, stable=True)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.cumsum(points[order].double(), 0)
        ends = torch.cumsum(counts, 0)
        starts = ends - counts
        padded = torch.cat((sums.new_zeros(1, points.shape[1]), sums))
        cluster_sums = padded[ends] - padded[starts]
        filled = counts > 0
        centroids = torch.where(filled[:, None], (cluster_sums / counts.clamp(min=1)[:, None]).float(), centroids)
        assign = nearest(points, centroids)
    return centroids, assign


def nearest(points: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid of every point (squared Euclidean), in chunks of points."""
    c_sq = (centroids * centroids).sum(-1)
    chunk = max(1, _CHUNK_ELEMENTS // centroids.shape[0])
    return torch.cat([(c_sq - 2 * p @ centroids.T).argmin(-1) for p in points.split(chunk)])


def initialise(weight: Tensor, group_size: int, num_codebooks: int, codebook_bits: int, kmeans_iters: int,
               generator: torch.Generator) -> AQLMWeight:  # fmt: skip
    """Row scales = row RMS; codebooks by residual k-means of the normalised groups (codebook m codes what codebooks
    0..m-1 left)."""
    out, cols = weight.shape
    scales = weight.pow(2).mean(1, keepdim=True).sqrt().clamp(min=1e-8)
    residual = (weight / scales).reshape(-1, group_size)
    codebooks, codes = [], []
    for _ in range(num_codebooks):
        centroids, assign = kmeans(residual, 1 << codebook_bits, kmeans_iters, generator)
        residual = residual - centroids[assign]
        codebooks.append(centroids)
        codes.append(assign)
    codes = torch.stack(codes, -1).reshape(out, cols // group_size, num_codebooks)
    return AQLMWeight(codes, torch.stack(codebooks), scales)


# -- the alternation -------------------------------------------------------------------------------------------------
@torch.no_grad()
def beam_search(weight: Tensor, gram: Tensor, q: AQLMWeight, beam_size: int, generator: torch.Generator) -> Tensor:
    """New codes for ``q`` (codebooks and scales fixed) minimising :func:`output_error`, one group at a time in a
    seeded random order. For group ``J`` with current reconstruction ``r`` and ``G = (W - W_hat) H``, the error as a
    function of the group's new reconstruction ``r' = s sum_m C_m[b_m]`` is (up to a constant)
    ``r'^T H_JJ r' - 2 r'^T (H_JJ r + G_J)``; the beam keeps the ``beam_size`` best code tuples as the codebooks are
    visited in turn (the current tuple among the candidates, so a group update never increases the error)."""
    codes = q.codes.clone()
    codebooks, scales = q.codebooks, q.scales
    num_codebooks, k, g = codebooks.shape
    out, groups, _ = codes.shape
    w_hat = dequantize(codes, codebooks, scales)
    resid_h = (weight - w_hat) @ gram  # G, kept up to date as groups change
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (beam_size * k))
    for j in torch.randperm(groups, generator=generator, device="cpu").tolist():
        cols = slice(j * g, (j + 1) * g)
        h_jj = gram[cols, cols]
        ch = codebooks @ h_jj  # (M, K, g): C_m H_JJ
        c_h_c = (ch * codebooks).sum(-1)  # (M, K): C_m[c]^T H_JJ C_m[c]
        for rows in torch.arange(out, device=weight.device).split(rows_per_chunk):
            s = scales[rows]  # (r, 1)
            current = w_hat[rows, cols]
            b = current @ h_jj + resid_h[rows, cols]  # (r, g)
            beam_codes = codes[rows, j][:, None, :]  # (r, beam, M)
            beam_u = codebooks[0][beam_codes[..., 0]]  # the sum of the beam's codewords, (r, beam, g)
            for m in range(1, num_codebooks):
                beam_u = beam_u + codebooks[m][beam_codes[..., m]]
            for m in range(num_codebooks):
                partial = beam_u - codebooks[m][beam_codes[..., m]]  # the other codebooks' sum
                p_h_p = ((partial @ h_jj) * partial).sum(-1, keepdim=True)
                cross = partial @ ch[m].T  # (r, beam, K)
                p_b = (partial * b[:, None, :]).sum(-1, keepdim=True)
                c_b = (b @ codebooks[m].T)[:, None, :]
                loss = s[:, :, None] ** 2 * (p_h_p + 2 * cross + c_h_c[m]) - 2 * s[:, :, None] * (p_b + c_b)
                width = 1 if m == num_codebooks - 1 else min(beam_size, loss.shape[1] * k)
                best = loss.flatten(1).topk(width, dim=1, largest=False, sorted=True).indices
                parent, code = best // k, best % k
                beam_codes = torch.gather(beam_codes, 1, parent[..., None].expand(-1, -1, num_codebooks)).clone()
                beam_codes[..., m] = code
                beam_u = torch.gather(partial, 1, parent[..., None].expand(-1, -1, g)) + codebooks[m][code]
            new_codes = beam_codes[:, 0]  # topk is sorted: the best tuple
            new = s * beam_u[:, 0]
            codes[rows, j] = new_codes
            delta = new - current
            w_hat[rows, cols] = new
            resid_h[rows] -= delta @ gram[cols]
    return codes


def adam_update(weight: Tensor, gram: Tensor, q: AQLMWeight, steps: int, lr: float) -> AQLMWeight:
    """``steps`` Adam steps on codebooks and scales (codes fixed) minimising the relative :func:`output_error`. Each
    tensor's step size is ``lr`` times its mean magnitude (codebook entries and row scales differ by orders)."""
    if steps == 0:
        return q
    codebooks = q.codebooks.clone().requires_grad_(True)
    scales = q.scales.clone().requires_grad_(True)
    opt = torch.optim.Adam(
        [
            {"params": [codebooks], "lr": lr * float(q.codebooks.abs().mean())},
            {"params": [scales], "lr": lr * float(q.scales.abs().mean())},
        ]
    )
    norm = output_error(weight, torch.zeros_like(weight), gram).detach()
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = output_error(weight, dequantize(q.codes, codebooks, scales), gram) / norm
            loss.backward()
            opt.step()
    return AQLMWeight(q.codes, codebooks.detach(), scales.detach())


def round_to_storage(q: AQLMWeight) -> AQLMWeight:
    """Codebooks and scales rounded to fp16 (kept as fp32 tensors), as they would be stored."""
    return AQLMWeight(q.codes, q.codebooks.half().float(), q.scales.half().float())


def quantize(
    weight: Tensor,
    gram: Tensor,
    group_size: int = 8,
    num_codebooks: int = 2,
    codebook_bits: int = 8,
    beam_size: int = 8,
    rounds: int = 6,
    adam_steps: int = 100,
    lr: float = 1e-3,
    kmeans_iters: int = 10,
    tolerance: float = 0.0,
    seed: int = 0,
    on_round: Callable[[int, float], None] | None = None,
) -> AQLMWeight:
    """AQLM of ``weight`` ``(out, in)`` against the calibration Gram ``gram`` ``(in, in)`` (see the module docstring):
    k-means initialisation, then up to ``rounds`` of beam search + ``adam_steps`` Adam steps, stopping early once a
    round lowers the relative error by less than ``tolerance`` times its value (or the error is below ``EXACT``);
    returns the best state, its codebooks and scales rounded to fp16. ``on_round(round, relative_error)`` is called
    after each round."""
    cols = weight.shape[1]
    if cols % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={cols}")
    if not 1 <= codebook_bits <= MAX_CODEBOOK_BITS:
        raise ValueError(f"codebook_bits={codebook_bits}: expected 1..{MAX_CODEBOOK_BITS}")
    weight, gram = weight.detach().float(), gram.detach().float()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    q = initialise(weight, group_size, num_codebooks, codebook_bits, kmeans_iters, generator)
    best, best_err = q, relative_error(weight, q.dequantize(), gram)
    for r in range(rounds):
        if best_err < EXACT:
            break
        q = AQLMWeight(beam_search(weight, gram, q, beam_size, generator), q.codebooks, q.scales)
        q = adam_update(weight, gram, q, adam_steps, lr)
        err = relative_error(weight, q.dequantize(), gram)
        if on_round is not None:
            on_round(r, err)
        improved = best_err - err
        if err < best_err:
            best, best_err = q, err
        if improved < tolerance * (best_err + improved):
            break
    return round_to_storage(best)
