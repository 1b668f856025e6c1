"""Bootstrap confidence intervals of a fitted law (docs/METHOD.md §9.3).

A replicate resamples the data and refits. The unit is a *configuration*: the runs of one (precision, parameters,
tokens). Within each precision, configurations are drawn with replacement (so every precision keeps its number of
configurations and stays fitted), and within each drawn configuration its seeds are drawn with replacement: with one
seed per configuration this is the bootstrap over runs, with several it also carries the seed-to-seed spread. Each
replicate is polished from the full fit; intervals are the 2.5 and 97.5 percentiles of the replicates that converged.
The generator is seeded, so the same data and seed give the same intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quest_pl.scaling.fit import FitResult, Problem, refit


@dataclass
class Bootstrap:
    thetas: np.ndarray  # replicates x n_theta (law coordinates), converged replicates only
    replicates: int  # drawn
    failed: int  # did not converge (left out of the intervals)
    seed: int
    level: float = 0.95

    def interval(self, values: np.ndarray) -> tuple[float, float] | None:
        """Percentile interval of per-replicate ``values``; None without replicates."""
        if not len(values):
            return None
        tail = 100 * (1 - self.level) / 2
        lo, hi = np.percentile(values, [tail, 100 - tail])
        return float(lo), float(hi)


def configurations(precision_idx, log_n, log_d) -> list[np.ndarray]:
    """Row indices of each configuration (same precision, parameters and tokens), in first-appearance order."""
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(precision_idx, np.round(log_n, 9), np.round(log_d, 9))):
        groups.setdefault(key, []).append(i)
    return [np.array(rows) for rows in groups.values()]


def resample(groups: list[np.ndarray], precision_of_group: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows of one replicate: configurations drawn within each precision, then seeds within each configuration."""
    rows = []
    for prec in np.unique(precision_of_group):
        mine = np.nonzero(precision_of_group == prec)[0]
        for g in rng.choice(mine, size=len(mine), replace=True):
            rows.append(rng.choice(groups[g], size=len(groups[g]), replace=True))
    return np.concatenate(rows)


def bootstrap(problem: Problem, result: FitResult, replicates: int = 200, seed: int = 0) -> Bootstrap:
    """``replicates`` refits of resampled data (module docstring), each from the full fit ``result``."""
    if replicates < 0:
        raise ValueError(f"replicates={replicates}: expected an integer >= 0")
    rng = np.random.default_rng(seed)
    groups = configurations(problem.idx, problem.log_n, problem.log_d)
    precision_of_group = np.array([problem.idx[g[0]] for g in groups])
    thetas, failed = [], 0
    for _ in range(replicates):
        fit = refit(problem.take(resample(groups, precision_of_group, rng)), result.theta)
        if fit.converged:
            thetas.append(problem.to_law(fit.theta))
        else:
            failed += 1
    shape = (len(thetas), len(result.theta))
    return Bootstrap(np.array(thetas).reshape(shape), replicates, failed, seed)
