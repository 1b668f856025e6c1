"""The memory frontier of a fitted law (docs/METHOD.md §9.4): which precision gives the lowest loss at each model
memory, at a fixed number of tokens per parameter.

A model of ``M`` bits in precision P (``bits_P`` bits per parameter, scales counted) has ``N = M / bits_P``
parameters and, at ``r`` tokens per parameter, ``D = r N`` tokens; its loss is the law's ``L(N, D, P)``. The frontier
is the lowest of these over the precisions at each ``M``. With the QuEST law at large ``M`` the N term dominates
when ``alpha < beta``, and the winner is the precision of largest ``eff(P) / bits_P`` (the paper's Pareto argument).
"""

from __future__ import annotations

import numpy as np

from quest_pl.scaling.laws import Law, predict


def frontier(law: Law, theta: np.ndarray, bits: list[float], memory: np.ndarray, tokens_per_param: float):
    """``(loss, best)``: loss[p, m] of precision p at memory[m] bits, and the index of the best precision per m."""
    loss = np.stack([predict(law, theta, memory / b, tokens_per_param * memory / b, p) for p, b in enumerate(bits)])
    return loss, loss.argmin(axis=0)


def segments(best: np.ndarray, memory: np.ndarray) -> list[tuple[int, float, float]]:
    """Runs of one optimal precision along ``memory``: ``[(precision index, from bits, to bits), ...]``."""
    out = []
    start = 0
    for m in range(1, len(best) + 1):
        if m == len(best) or best[m] != best[start]:
            out.append((int(best[start]), float(memory[start]), float(memory[m - 1])))
            start = m
    return out


def memory_grid(run_memory: np.ndarray, points: int = 400) -> np.ndarray:
    """From the smallest run's memory to 100 x the largest, log-spaced."""
    return np.geomspace(run_memory.min(), 100 * run_memory.max(), points)


def answer(names: list[str], bits: list[float], segs: list[tuple[int, float, float]], tokens_per_param: float) -> str:
    """The one line of ``scaling.md``: the precision optimal at the largest budgets, and from which memory on."""
    p, start, end = segs[-1]
    where = "at every budget shown" if len(segs) == 1 else f"from {start:.3g} bits on"
    return (
        f"At {tokens_per_param:.3g} tokens per parameter, P = {bits[p]:g} ({names[p]}) is optimal {where} "
        f"(memory {segs[0][1]:.3g} to {end:.3g} bits)."
    )
