"""Fitting a scaling law: Huber loss of log residuals, a grid of starts, an L-BFGS-B polish of the best
(docs/METHOD.md §9.2).

The objective is ``sum_i w_i Huber_delta(log L_hat_i - log L_i)`` with ``delta = 1e-3``, as in Hoffmann et al.
(arXiv 2203.15556, App. D.2) and the QuEST paper. Its landscape has local optima: with every run at about 100 tokens
per parameter only the shorter runs separate the N and D terms, and a power law with a small exponent trades ``A``
against ``alpha`` and ``E``. So the fit does not polish one start. For every point of a grid over the exponents and
``E`` it solves the two coefficients by least squares and each precision's efficiency by the median of its runs (all
closed form, cheap), keeps the ``starts`` best distinct points and polishes each with L-BFGS-B (analytic gradient);
the best polished point is the fit. ``tests/test_scaling_fit.py`` checks that it matches the best of polishes from
every grid point.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from quest_pl.scaling.laws import Law

DELTA = 1e-3
GRID = {  # exponents and E as a fraction of the smallest loss
    "alpha": np.geomspace(0.02, 1.5, 8),
    "beta": np.geomspace(0.02, 1.5, 8),
    "gamma": np.array([0.5, 1.0, 2.0]),
    "e_frac": np.array([0.0, 0.3, 0.6, 0.8, 0.9]),
}
STARTS = 12
MAXITER = 2000  # function evaluations of one polish
CHUNK = 200  # evaluations between stationarity checks
# least_squares' tolerances. The objective's: a relative change below 1e-8 per step is converged (where the runs
# leave a direction flat, e.g. eff -> 0 with alpha -> 0, a stricter one crawls along the valley for ever); theta's and
# the gradient's: 1e-10.
FTOL = 1e-8
TOL = 1e-10
# ... or stationary: no coordinate moves the objective / delta by more than this per unit (projected onto the box).
# A polish stopped early has gradients of order 1; a flat valley's floor, below 1e-3.
GRAD_TOL = 1e-3


class NotConverged(RuntimeError):
    """The optimizer stopped before an optimum (iteration limit, line-search failure with a large gradient)."""


@dataclass
class FitResult:
    law: Law
    theta: np.ndarray
    objective: float  # sum of Huber losses (delta 1e-3) at theta, unweighted
    converged: bool
    message: str
    starts: list[float] = field(default_factory=list)  # objective of every polished start, best first
    at_bounds: list[int] = field(default_factory=list)  # coordinates of theta on a bound


def huber(r: np.ndarray, delta: float = DELTA) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals and its derivative: r^2 / 2 inside [-delta, delta], delta (|r| - delta / 2) outside."""
    a = np.abs(r)
    inside = a <= delta
    loss = np.where(inside, 0.5 * r * r, delta * (a - 0.5 * delta))
    grad = np.where(inside, r, delta * np.sign(r))
    return loss, grad


class Problem:
    """A law and the runs it is fitted to (log N, log D, log L, precision index).

    The optimizer works on log N and log D centred at ``center`` (the law's ``a`` becomes ``a - alpha c_N``, ``b``
    ``b - beta c_D``): at N of 1e7-1e9 the raw coordinates make ``a`` and ``alpha`` almost collinear and L-BFGS-B
    crawl. Every ``theta`` a Problem takes or returns is in these centred coordinates; :meth:`to_law` and
    :meth:`from_law` convert."""

    def __init__(self, law: Law, log_n, log_d, log_loss, idx, center=None) -> None:
        self.law = law
        log_n, log_d = np.asarray(log_n, dtype=float), np.asarray(log_d, dtype=float)
        self.center = (float(log_n.mean()), float(log_d.mean())) if center is None else center
        self.log_n, self.log_d = log_n - self.center[0], log_d - self.center[1]
        self.log_loss = np.asarray(log_loss, dtype=float)
        self.idx = np.asarray(idx, dtype=int)
        self.bounds = law.bounds(float(self.log_loss.min()))

    def take(self, rows) -> Problem:
        """The runs at ``rows`` (repeats allowed: a bootstrap sample), same law and centre."""
        rows = np.asarray(rows, dtype=int)
        out = Problem.__new__(Problem)
        out.__dict__.update({k: v for k, v in self.__dict__.items() if not k.startswith("_cache")})
        out.log_n, out.log_d, out.log_loss, out.idx = (
            self.log_n[rows],
            self.log_d[rows],
            self.log_loss[rows],
            self.idx[rows],
        )
        return out

    def _shift(self, theta: np.ndarray, sign: float) -> np.ndarray:
        out = np.array(theta, dtype=float)
        a, alpha, b, beta = (self.law.shared.index(k) for k in ("a", "alpha", "b", "beta"))
        out[a] += sign * out[alpha] * self.center[0]
        out[b] += sign * out[beta] * self.center[1]
        return out

    def to_law(self, theta: np.ndarray) -> np.ndarray:
        """Centred coordinates -> the law's (:class:`quest_pl.scaling.laws.Law`)."""
        return self._shift(theta, +1.0)

    def from_law(self, theta: np.ndarray) -> np.ndarray:
        return self._shift(theta, -1.0)

    def _evaluate(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(residuals, Jacobian) at ``theta``, cached: the optimizer asks for both at each point."""
        key = theta.tobytes()
        if getattr(self, "_cache_key", None) != key:
            pred, jac = self.law.log_predict(theta, self.log_n, self.log_d, self.idx)
            self._cache_key, self._cache = key, (pred - self.log_loss, jac)
        return self._cache

    def residuals(self, theta: np.ndarray) -> np.ndarray:
        return self._evaluate(theta)[0]

    def jacobian(self, theta: np.ndarray) -> np.ndarray:
        return self._evaluate(theta)[1]

    def objective(self, theta: np.ndarray) -> float:
        """Sum over runs of Huber(log L_hat - log L), delta 1e-3."""
        return float(huber(self.residuals(theta))[0].sum())

    def polish(self, theta0: np.ndarray, maxiter: int = MAXITER):
        """A trust-region Gauss-Newton polish from ``theta0`` of the same objective (scipy's ``least_squares`` with
        ``loss="huber"`` and ``f_scale=delta`` minimises exactly sum Huber_delta(r_i)), inside the bounds:
        ``(theta, converged, message)``. Converged: it stopped on its tolerances, or it ran out of evaluations at a
        stationary point (:data:`GRAD_TOL`: the floor of a valley the runs leave flat)."""
        from scipy.optimize import least_squares

        lo, hi = np.array(self.bounds).T
        x = np.clip(theta0, lo + 1e-12 * (hi - lo), hi - 1e-12 * (hi - lo))  # strictly inside, as trf requires
        used, chunk = 0, min(CHUNK, maxiter)
        while True:  # in chunks, so that a crawl along a flat valley stops once it is stationary
            res = least_squares(self.residuals, x, jac=self.jacobian, bounds=(lo, hi), method="trf", loss="huber",
                                f_scale=DELTA, x_scale=1.0, ftol=FTOL, xtol=TOL, gtol=TOL, max_nfev=chunk)  # fmt: skip
            x, used = res.x, used + res.nfev
            grad = self.projected_gradient(x)
            converged = res.status > 0 or grad <= GRAD_TOL
            if converged or used >= maxiter:
                return x, converged, f"{res.message} ({used} evaluations, gradient {grad:.2g})"
            chunk = min(CHUNK, maxiter - used)

    def projected_gradient(self, theta: np.ndarray) -> float:
        """Largest component of the gradient of objective / delta, zero where a bound blocks the descent."""
        grad = self.jacobian(theta).T @ huber(self.residuals(theta))[1] / DELTA
        lo, hi = np.array(self.bounds).T
        near = 1e-9 * (hi - lo)
        grad = np.where(((theta <= lo + near) & (grad > 0)) | ((theta >= hi - near) & (grad < 0)), 0.0, grad)
        return float(np.abs(grad).max())

    # -- starts ----------------------------------------------------------------------------------------------------
    def grid_starts(self) -> list[np.ndarray]:
        """Every grid point, completed in closed form (module docstring)."""
        law = self.law
        loss = np.exp(self.log_loss)
        gammas = GRID["gamma"] if "gamma" in law.shared else [1.0]
        out = []
        for alpha, beta, gamma, frac in itertools.product(GRID["alpha"], GRID["beta"], gammas, GRID["e_frac"]):
            e_value = frac * loss.min()
            target = np.maximum(loss - e_value, 1e-12) ** (1.0 / gamma)
            x = np.stack([np.exp(-alpha * self.log_n), np.exp(-beta * self.log_d)], axis=1)
            coef = _nonneg_lstsq(x, target)
            shared = {"a": np.log(coef[0]), "alpha": alpha, "b": np.log(coef[1]), "beta": beta, "gamma": gamma}
            shared["e"] = np.log(max(e_value, np.exp(self.bounds[law.shared.index("e")][0])))
            theta = np.zeros(law.n_theta)
            for i, name in enumerate(law.shared):
                theta[i] = np.clip(shared[name], *self.bounds[i])
            out.append(law.init_log_eff(theta, self.log_n, self.log_d, self.log_loss, self.idx))
        return out

    def best_starts(self, k: int = STARTS) -> list[np.ndarray]:
        """The ``k`` grid starts of lowest objective, distinct in their exponents."""
        ranked = sorted(self.grid_starts(), key=self.objective)
        chosen: list[np.ndarray] = []
        n_shared = len(self.law.shared)
        for theta in ranked:
            if all(np.abs(theta[:n_shared] - c[:n_shared]).max() > 1e-9 for c in chosen):
                chosen.append(theta)
            if len(chosen) == k:
                break
        return chosen


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with both coefficients >= a tiny positive value (a 2-column active-set solve)."""
    floor = 1e-12
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    if (coef > floor).all():
        return coef
    best = None
    for j in (0, 1):  # one coefficient at the floor, the other by 1-D least squares
        other = 1 - j
        rest = y - floor * x[:, j]
        c = np.empty(2)
        c[j] = floor
        c[other] = max(floor, float(x[:, other] @ rest) / float(x[:, other] @ x[:, other]))
        err = float(((x @ c - y) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, c)
    return best[1]


def fit(problem: Problem, starts: int = STARTS, maxiter: int = MAXITER) -> FitResult:
    """Polish the ``starts`` best grid starts; the lowest objective wins. ``converged`` is the winner's."""
    results = [problem.polish(t, maxiter) for t in problem.best_starts(starts)]
    objectives = [problem.objective(theta) for theta, *_ in results]
    order = np.argsort(objectives)
    theta, converged, message = results[order[0]]
    return _result(problem, theta, converged, message, sorted(objectives))


def refit(problem: Problem, theta0: np.ndarray, maxiter: int = MAXITER) -> FitResult:
    """One polish from ``theta0`` (a bootstrap replicate starts from the full fit)."""
    theta, converged, message = problem.polish(theta0, maxiter)
    return _result(problem, theta, converged, message, [problem.objective(theta)])


def _result(problem: Problem, theta, converged, message, objectives) -> FitResult:
    lo, hi = np.array(problem.bounds).T
    near = 1e-3 * (hi - lo)  # the polish keeps its iterates strictly inside the box, and crawls near a flat bound
    at_bounds = [int(i) for i in np.nonzero((theta <= lo + near) | (theta >= hi - near))[0]]
    return FitResult(problem.law, theta, problem.objective(theta), converged, message, objectives, at_bounds)
