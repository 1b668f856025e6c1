"""The two scaling laws the fit knows, as log-predictions with their Jacobian (docs/METHOD.md §9.1).

* ``quest`` (QuEST, arXiv 2502.05003): ``L(N, D, P) = A / (N eff(P))^alpha + B / D^beta + E``. A precision P trains
  like a full-precision model with ``eff(P)`` times its ``N`` non-embedding parameters.
* ``quartet`` (Quartet, arXiv 2505.14669): ``L = ((A / (N effN(P)))^alpha + (B / (D effD(P)))^beta)^gamma + E``,
  a parameter efficiency for the forward pass and a data efficiency for the backward pass.

The reference precision (``bf16``) has every efficiency 1. Internally a law is a vector ``theta``: the shared
parameters first, in the coordinates the optimizer moves (``a = log A``, ``alpha``, ``b = log B``, ``beta``,
``e = log E``; for quartet ``a = alpha log A``, ``b = beta log B`` and ``gamma``), then one log-efficiency per
(efficiency, non-reference precision), so every positive quantity stays positive and ``log L`` is a log-sum-exp, as
in Hoffmann et al. (arXiv 2203.15556, App. D.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Bounds of the optimizer's coordinates: wide enough for any language-model loss in nats, finite so that a
# direction the data cannot pin down ends at a bound that the result reports, instead of running off.
LOG_EFF_BOUNDS = (np.log(1e-6), np.log(1e3))
SHARED_BOUNDS = {
    "a": (-50.0, 50.0),  # the fit moves a and b centred (quest_pl.scaling.fit.Problem): bounds of either form
    "alpha": (1e-3, 4.0),
    "b": (-50.0, 50.0),
    "beta": (1e-3, 4.0),
    "e": (-25.0, 5.0),
    "gamma": (0.05, 20.0),
}


def _softmax_rows(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise log-sum-exp and softmax of ``u`` (runs x terms), stable."""
    m = u.max(axis=1, keepdims=True)
    z = np.exp(u - m)
    total = z.sum(axis=1, keepdims=True)
    return (m + np.log(total))[:, 0], z / total


@dataclass(frozen=True)
class Law:
    """A law over ``n_prec`` precisions, ``ref`` the index of the reference precision (efficiencies 1)."""

    name: str
    shared: tuple[str, ...]  # optimizer coordinates of the shared parameters
    efficiencies: tuple[str, ...]  # per-precision efficiencies, e.g. ("eff",) or ("eff", "eff_data")
    n_prec: int
    ref: int

    @property
    def n_theta(self) -> int:
        return len(self.shared) + len(self.efficiencies) * (self.n_prec - 1)

    def bounds(self, log_e_max: float) -> list[tuple[float, float]]:
        """Box bounds of theta; ``log E`` stays below ``log_e_max`` (the log of the smallest loss)."""
        out = []
        for name in self.shared:
            lo, hi = SHARED_BOUNDS[name]
            out.append((lo, min(hi, log_e_max)) if name == "e" else (lo, hi))
        return out + [LOG_EFF_BOUNDS] * (len(self.efficiencies) * (self.n_prec - 1))

    def log_eff(self, theta: np.ndarray, k: int = 0) -> np.ndarray:
        """log of efficiency ``k`` (``self.efficiencies[k]``) of every precision, 0 for the reference."""
        start = len(self.shared) + k * (self.n_prec - 1)
        return np.insert(theta[start : start + self.n_prec - 1], self.ref, 0.0)

    def with_log_eff(self, theta: np.ndarray, values: np.ndarray, k: int = 0) -> np.ndarray:
        """``theta`` with efficiency ``k`` of every precision replaced by ``values`` (reference entry ignored)."""
        out = theta.copy()
        start = len(self.shared) + k * (self.n_prec - 1)
        out[start : start + self.n_prec - 1] = np.delete(values, self.ref)
        return out

    def _eff_columns(self, idx: np.ndarray, k: int) -> np.ndarray:
        """Column of theta holding efficiency ``k`` of each run's precision (-1 for the reference)."""
        col = idx - (idx > self.ref)
        return np.where(idx == self.ref, -1, len(self.shared) + k * (self.n_prec - 1) + col)

    def natural(self, theta: np.ndarray) -> dict[str, float]:
        """The shared parameters in the law's own terms: A, alpha, B, beta, E (and gamma)."""
        values = dict(zip(self.shared, (float(v) for v in theta[: len(self.shared)])))
        a, b = values["a"], values["b"]
        if self.name == "quartet":  # (A / N)^alpha: the coordinate is alpha log A
            a, b = a / values["alpha"], b / values["beta"]
        out = {"A": np.exp(a), "alpha": values["alpha"], "B": np.exp(b), "beta": values["beta"]}
        if "gamma" in values:
            out["gamma"] = values["gamma"]
        out["E"] = np.exp(values["e"])
        return {k: float(v) for k, v in out.items()}

    def from_natural(self, params: dict[str, float], eff: dict[int, tuple[float, ...]]) -> np.ndarray:
        """theta from natural parameters and ``{precision index: (eff, [eff_data])}`` (missing: 1)."""
        shared = {"a": np.log(params["A"]), "alpha": params["alpha"], "b": np.log(params["B"])}
        if self.name == "quartet":
            shared["a"], shared["b"] = params["alpha"] * shared["a"], params["beta"] * shared["b"]
        shared |= {"beta": params["beta"], "e": np.log(params["E"]), "gamma": params.get("gamma", 1.0)}
        theta = np.array([shared[name] for name in self.shared] + [0.0] * (self.n_theta - len(self.shared)))
        for k in range(len(self.efficiencies)):
            values = np.array([np.log(eff.get(p, (1.0,) * len(self.efficiencies))[k]) for p in range(self.n_prec)])
            theta = self.with_log_eff(theta, values, k)
        return theta

    def log_predict(self, theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, idx: np.ndarray):
        """``(log L_hat, J)`` for runs of ``log N``, ``log D`` and precision index ``idx``; J is d log L_hat / d theta
        (runs x n_theta)."""
        if self.name == "quest":
            return self._quest(theta, log_n, log_d, idx)
        return self._quartet(theta, log_n, log_d, idx)

    def _quest(self, theta, log_n, log_d, idx):
        a, alpha, b, beta, e = theta[:5]
        x = self.log_eff(theta)[idx]
        u = np.stack([a - alpha * (log_n + x), b - beta * log_d, np.full_like(log_n, e)], axis=1)
        pred, s = _softmax_rows(u)
        jac = np.zeros((len(log_n), self.n_theta))
        jac[:, 0] = s[:, 0]
        jac[:, 1] = -s[:, 0] * (log_n + x)
        jac[:, 2] = s[:, 1]
        jac[:, 3] = -s[:, 1] * log_d
        jac[:, 4] = s[:, 2]
        cols = self._eff_columns(idx, 0)
        rows = np.nonzero(cols >= 0)[0]
        jac[rows, cols[rows]] = -alpha * s[rows, 0]
        return pred, jac

    def _quartet(self, theta, log_n, log_d, idx):
        a, alpha, b, beta, e, gamma = theta[:6]
        xn, xd = self.log_eff(theta, 0)[idx], self.log_eff(theta, 1)[idx]
        inner, t = _softmax_rows(np.stack([a - alpha * (log_n + xn), b - beta * (log_d + xd)], axis=1))
        pred, q = _softmax_rows(np.stack([gamma * inner, np.full_like(log_n, e)], axis=1))
        g1, g2 = q[:, 0] * gamma * t[:, 0], q[:, 0] * gamma * t[:, 1]  # d pred / d (first, second inner term)
        jac = np.zeros((len(log_n), self.n_theta))
        jac[:, 0] = g1
        jac[:, 1] = -g1 * (log_n + xn)
        jac[:, 2] = g2
        jac[:, 3] = -g2 * (log_d + xd)
        jac[:, 4] = q[:, 1]
        jac[:, 5] = q[:, 0] * inner
        for k, (g, rate) in enumerate(((g1, alpha), (g2, beta))):
            cols = self._eff_columns(idx, k)
            rows = np.nonzero(cols >= 0)[0]
            jac[rows, cols[rows]] = -rate * g[rows]
        return pred, jac

    def init_log_eff(self, theta: np.ndarray, log_n, log_d, log_loss, idx) -> np.ndarray:
        """Given the shared parameters of ``theta``, each precision's (parameter) log-efficiency that makes its runs'
        losses exact, median over its runs (runs that no efficiency can fit are skipped): the start of the polish.
        The law solved for ``x = log eff``: ``x = (a - log R) / alpha - log N``, ``R`` the loss left to the N term."""
        p = dict(zip(self.shared, theta[: len(self.shared)]))
        loss = np.exp(log_loss)
        if self.name == "quest":
            rest = loss - np.exp(p["b"] - p["beta"] * log_d) - np.exp(p["e"])
            a, alpha = p["a"], p["alpha"]
        else:
            above = np.maximum(loss - np.exp(p["e"]), 1e-300)
            rest = above ** (1.0 / p["gamma"]) - np.exp(p["b"] - p["beta"] * log_d)
            a, alpha = p["a"], p["alpha"]
        ok = rest > 0
        x = np.full(len(log_n), np.nan)
        x[ok] = (a - np.log(rest[ok])) / alpha - log_n[ok]
        values = np.zeros(self.n_prec)
        lo, hi = LOG_EFF_BOUNDS
        for prec in range(self.n_prec):
            mine = x[(idx == prec) & ok]
            values[prec] = np.clip(np.median(mine), lo, hi) if len(mine) else lo
        return self.with_log_eff(theta, values, 0)


LAWS = ("quest", "quartet")


def make_law(name: str, n_prec: int, ref: int) -> Law:
    """The law ``name`` (one of :data:`LAWS`) over ``n_prec`` precisions with reference index ``ref``."""
    if name == "quest":
        return Law("quest", ("a", "alpha", "b", "beta", "e"), ("eff",), n_prec, ref)
    if name == "quartet":
        return Law("quartet", ("a", "alpha", "b", "beta", "e", "gamma"), ("eff", "eff_data"), n_prec, ref)
    raise ValueError(f"law={name!r}: expected one of {', '.join(LAWS)}")


def predict(law: Law, theta: np.ndarray, params, tokens, idx) -> np.ndarray:
    """Predicted loss (nats/token) at ``params`` non-embedding parameters, ``tokens`` and precision index ``idx``."""
    log_n = np.log(np.asarray(params, dtype=float))
    log_d = np.log(np.asarray(tokens, dtype=float))
    idx = np.broadcast_to(np.asarray(idx), log_n.shape)
    return np.exp(law.log_predict(theta, log_n.ravel(), log_d.ravel(), idx.ravel())[0]).reshape(log_n.shape)
