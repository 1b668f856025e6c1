"""Compressed gradient communication for data-parallel training: DDP communication hooks.

In data-parallel QAT the gradient all-reduce is the part of a step that grows with the number of GPUs. The hooks here
replace DDP's fp32 all-reduce of each gradient bucket (``DistributedDataParallel.register_comm_hook``, the mechanism of
PowerSGD and the fp16 hook) by an exchange of b-bit codes (b = 2, 4 or 8):

1. Every chunk of ``chunk`` consecutive gradient entries gets one range M = max |g| over the chunk, taken over all
   ranks (an all-reduce MAX of ``numel / chunk`` floats), so every rank uses the same uniform grid of L = 2^b levels
   on [-M, M] with step D = 2M / (L - 1).
2. Each rank rounds y = (g + M) / D to one of its two neighbouring levels at random: up with probability frac(y).
   Rounding up iff u < frac(y) for a uniform u makes the code unbiased, E[code] = y.
3. The codes are packed (8 / b per byte) and all-gathered; every rank decodes the mean of the n ranks' codes into the
   averaged gradient, identically on every rank.

``quantized`` draws each rank's u independently. ``correlated`` is the correlated quantizer of Suresh et al. (2022),
as analysed for MARINA by Panferov et al.: for every coordinate the ranks share a random bijection pi of {0..n-1}
(uniform over all n! permutations, drawn independently for every coordinate) and rank i uses u_i = (pi(i) + gamma_i) / n
with its own gamma_i ~ U[0, 1). Each u_i is still uniform (the code stays unbiased), but the n values are stratified,
one in each interval [k/n, (k+1)/n), so the ranks' rounding errors partly cancel in the mean: for n ranks holding the
same value the error of the mean is at most one level spacing divided by n, against a sum of n independent errors.
For any inputs the error is never larger than with independent rounding: under a uniform permutation the pair of
strata of two ranks is uniform over the n (n - 1) distinct pairs, and the covariance of their round-up indicators,
(n a b - sum_k h_a(k) h_b(k)) / (n (n - 1)) with h_a(k) = clamp(n a - k, 0, 1) nonincreasing in k, is <= 0 by
Chebyshev's sum inequality (docs/METHOD.md §3.1). A cheaper random cyclic shift of the
strata lacks that property: two ranks keep a fixed offset of strata, and some inputs get a larger error than independent
rounding.

Optionally (``marina_p`` < 1), MARINA's compressed gradient differences: with probability ``marina_p`` (a coin shared
by all ranks) a step exchanges the full fp32 gradient; otherwise each rank sends Q(g_t - g_{t-1}) and every rank
updates the shared estimate G_t = G_{t-1} + mean_i Q(g_i,t - g_i,t-1). The estimate is unbiased given the previous
one; its variance grows between full exchanges, which ``marina_p`` bounds.

Bytes on the wire per step and rank, for N gradient entries and n ranks: a ring all-gather of N b / 8 bytes of codes
per rank ((n - 1) N b / 8 sent and received) plus an all-reduce of 4 N / chunk bytes of ranges; an fp32 ring
all-reduce moves about 2 (n - 1) / n * 4 N bytes, fp16 half of that; with MARINA a step is a full fp32 exchange with
probability ``marina_p``. :func:`wire_bytes` computes the expected bytes; :class:`CompressionState` counts the bytes its
hook actually moved in the last step (``last_step_bytes``), which is what the training log reports.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from quest_pl.config.validation import BITS  # the grad_comm keys' values, checked with the config


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes < 2^bits into bytes, 8 / bits per byte, first code in the lowest bits (length padded)."""
    per = 8 // bits
    pad = (-codes.numel()) % per
    c = torch.nn.functional.pad(codes.flatten(), (0, pad)).view(-1, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2)[..., :numel]


def _shared_generator(device: torch.device, seed: int, *key: int) -> torch.Generator:
    """A generator seeded identically on every rank from (seed, key...)."""
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)


def stochastic_codes(
    y: Tensor, levels: int, rank: int, world: int, correlated: bool, shared: torch.Generator, local: torch.Generator
) -> Tensor:
    """Unbiased random rounding of y in [0, levels - 1] to integer codes (uint8); see the module docstring."""
    low = y.floor().clamp_(0, levels - 2)
    frac = y - low
    gamma = torch.rand(y.shape, generator=local, device=y.device, dtype=torch.float32)
    u = (shared_strata(y.shape, rank, world, shared).to(torch.float32) + gamma) / world if correlated else gamma
    return (low + (u < frac).to(low.dtype)).to(torch.uint8)


def shared_strata(shape: torch.Size, rank: int, world: int, shared: torch.Generator) -> Tensor:
    """pi(rank) for an independent uniform random permutation pi of {0..world-1} per coordinate, the same pi on every
    rank (``shared`` is seeded identically everywhere). Each rank j draws a key k_j ~ U[0, 1) per coordinate from the
    shared stream, and pi(rank) is the rank of k_rank among the keys (ties broken by rank index), so pi is uniform.
    The keys are drawn one rank at a time, memory O(numel) whatever the world size."""
    start = shared.get_state()
    for _ in range(rank + 1):
        own = torch.rand(shape, generator=shared, device=shared.device)
    shared.set_state(start)
    stratum = torch.zeros(shape, dtype=torch.int64, device=shared.device)
    for j in range(world):
        key = torch.rand(shape, generator=shared, device=shared.device)
        stratum += (key < own) if j >= rank else (key <= own)
    return stratum


@dataclass
class CompressionState:
    """State of a compressed all-reduce: the process group, the code width and the randomness.

    ``seed`` must be the same on every rank (the shared randomness of ``correlated`` and MARINA's coin); each rank's own
    rounding uses a generator seeded from (seed, rank)."""

    hook: str = "quantized"
    bits: int = 4
    chunk: int = 1024
    seed: int = 0
    marina_p: float = 1.0
    process_group: dist.ProcessGroup | None = None
    step: int = 0
    last_step_bytes: float | None = None  # bytes this rank sent in the last completed step (all buckets)
    _step_bytes: float = 0.0
    _local: dict = field(default_factory=dict, repr=False)
    _marina: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.hook not in ("quantized", "correlated"):
            raise ValueError(f"hook={self.hook!r}: expected quantized or correlated")
        if self.bits not in BITS:
            raise ValueError(f"bits={self.bits!r}: expected one of {BITS}")
        if not 0 < self.marina_p <= 1:
            raise ValueError(f"marina_p={self.marina_p!r}: expected a number in (0, 1]")

    def local_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._local:
            rank = dist.get_rank(self.process_group)
            self._local[device] = _shared_generator(device, self.seed, -1, rank)
        return self._local[device]


def compressed_mean(state: CompressionState, g: Tensor, key: int = 0) -> Tensor:
    """The mean over ranks of a flat gradient, exchanged as b-bit codes (synchronous; every rank gets the same)."""
    group = state.process_group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    g32 = g.detach().to(torch.float32).flatten()
    n = g32.numel()
    pad = (-n) % state.chunk
    chunks = torch.nn.functional.pad(g32, (0, pad)).view(-1, state.chunk)
    rng = chunks.abs().amax(dim=1)
    dist.all_reduce(rng, op=dist.ReduceOp.MAX, group=group)
    rng = torch.where(rng > 0, rng, torch.ones_like(rng))
    levels = 1 << state.bits
    step = (2 * rng / (levels - 1)).unsqueeze(1)
    y = ((chunks + rng.unsqueeze(1)) / step).clamp_(0, levels - 1)
    shared = _shared_generator(g.device, state.seed, state.step, key)
    codes = stochastic_codes(
        y, levels, rank, world, state.hook == "correlated", shared, state.local_generator(g.device)
    )
    packed = pack_codes(codes, state.bits)
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=group)
    state._step_bytes += (world - 1) * packed.numel() + _allreduce_bytes(rng.numel() * 4, world)
    total = sum(unpack_codes(p, state.bits, codes.numel()).to(torch.float32) for p in gathered)
    mean = (total.view_as(chunks) / world) * step - rng.unsqueeze(1)
    return mean.flatten()[:n].to(g.dtype)


def marina_mean(state: CompressionState, g: Tensor, key: int) -> Tensor:
    """MARINA's estimate of the mean gradient for one bucket (see the module docstring)."""
    group = state.process_group
    prev = state._marina.get(key)
    coin = torch.rand((), generator=_shared_generator(torch.device("cpu"), state.seed, state.step, key, -2)).item()
    if prev is None or prev[0].shape != g.shape or coin < state.marina_p:
        estimate = g.detach().to(torch.float32).clone()
        dist.all_reduce(estimate, group=group)
        state._step_bytes += _allreduce_bytes(estimate.numel() * 4, dist.get_world_size(group))
        estimate /= dist.get_world_size(group)
    else:
        local_prev, estimate_prev = prev
        estimate = estimate_prev + compressed_mean(state, g.to(torch.float32) - local_prev, key).to(torch.float32)
    state._marina[key] = (g.detach().to(torch.float32).clone(), estimate)
    return estimate.to(g.dtype)


def compressed_allreduce_hook(state: CompressionState, bucket):  # no annotations: DDP checks them at run time
    """DDP communication hook: the bucket's mean gradient through b-bit (correlated) codes."""
    g = bucket.buffer()
    key = bucket.index()
    mean = marina_mean(state, g, key) if state.marina_p < 1 else compressed_mean(state, g, key)
    if bucket.is_last():
        state.step += 1
        state.last_step_bytes, state._step_bytes = state._step_bytes, 0.0
    fut = torch.futures.Future()
    fut.set_result(mean)
    return fut


def register(ddp_model, hook: str, bits: int = 4, chunk: int = 1024, seed: int = 0, marina_p: float = 1.0):
    """Register the hook named ``hook`` (one of :data:`HOOKS`) on a ``DistributedDataParallel`` model."""
    if hook == "none":
        return None
    if hook == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

        ddp_model.register_comm_hook(None, fp16_compress_hook)
        return None
    state = CompressionState(hook=hook, bits=bits, chunk=chunk, seed=seed, marina_p=marina_p)
    ddp_model.register_comm_hook(state, compressed_allreduce_hook)
    return state


def _allreduce_bytes(nbytes: int, world: int) -> float:
    """Bytes one rank sends (and receives) in a ring all-reduce of ``nbytes``."""
    return 2 * (world - 1) / world * nbytes


def wire_bytes(
    numel: int, world: int, hook: str, bits: int = 4, chunk: int = 1024, marina_p: float = 1.0
) -> dict[str, float]:
    """Expected bytes one rank sends and receives per step for ``numel`` gradient entries in one bucket (ring
    all-reduce for fp32/fp16; with ``marina_p`` < 1, a full fp32 exchange with probability ``marina_p``)."""
    if hook in ("none", "fp16"):
        sent = _allreduce_bytes(numel * (4 if hook == "none" else 2), world)
        return {"sent": sent, "received": sent}
    chunks = -(-numel // chunk)
    codes = -(-chunks * chunk // (8 // bits))  # the codes of the chunk-padded bucket
    ranges = 4 * chunks
    moved = (world - 1) * codes + _allreduce_bytes(ranges, world)  # ring all-gather + ring all-reduce of ranges
    if marina_p < 1:
        moved = marina_p * _allreduce_bytes(4 * numel, world) + (1 - marina_p) * moved
    return {"sent": moved, "received": moved}
