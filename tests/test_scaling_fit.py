"""The scaling-law fit (quest_pl.scaling, METHOD.md §9): the laws' Jacobians against finite differences, the Huber
objective against its definition, the paper's published runs giving the paper's eff(P), the multi-start finding the
best optimum where one polish stays in a worse one, and known parameters recovered within their bootstrap intervals."""

import json

import numpy as np
import pytest

from quest_pl.scaling import PAPER_RUNS
from quest_pl.scaling.__main__ import main
from quest_pl.scaling.bootstrap import bootstrap
from quest_pl.scaling.fit import DELTA, GRID, Problem, fit, huber
from quest_pl.scaling.laws import make_law, predict

# QuEST (arXiv 2502.05003) Table 2 and its scaling-law fit: eff(P) of QuEST at 1, 2, 3, 4 and 8 bits, and the fitted
# law (A, alpha, B, beta, E and every precision's eff) whose objective ours must not exceed.
PAPER_EFF = {"quest_w1a1": 0.02, "quest_w2a2": 0.15, "quest_w3a3": 0.43, "quest_w4a4": 0.69, "quest_w8a8": 1.0}
PAPER_LAW = {"A": 8.134, "alpha": 0.06273, "B": 86.41, "beta": 0.2413, "E": 0.001423}
PAPER_ALL_EFF = {
    "quest_w1a1": 0.02050, "quest_w2a2": 0.1519, "quest_w3a3": 0.4331, "quest_w4a4": 0.6918, "quest_w8a8": 1.0162,
    "fp4_w4a4": 0.6296, "sparse48_w4a4": 0.3812, "clip_w1a1": 0.01558, "trust_w2a2": 0.07841, "trust_w3a3": 0.3221,
    "trust_w4a4": 0.6033, "trust_w8a8": 0.9376, "quest_w1a16": 0.1384, "quest_w2a16": 0.4137, "quest_w3a16": 0.6531,
    "quest_w4a16": 0.8404,
}  # fmt: skip


def synthetic(law_name="quest", seed=0, noise=0.003, sizes=6, short=(25, 50)):
    """Runs drawn from a known law: 3 precisions (bf16, eff 0.7, eff 0.15), ``sizes`` sizes at 100 tokens per
    parameter, and the quantized precisions also at ``short`` tokens per parameter for the 3 smallest sizes."""
    rng = np.random.default_rng(seed)
    law = make_law(law_name, 3, 0)
    params = {"A": 8.0, "alpha": 0.07, "B": 90.0, "beta": 0.25, "E": 0.5}
    eff = {1: (0.7,), 2: (0.15,)}
    if law_name == "quartet":
        params = {"A": 3e5, "alpha": 0.3, "B": 4e6, "beta": 0.35, "E": 1.0, "gamma": 0.6}
        eff = {1: (0.7, 0.9), 2: (0.15, 0.6)}
    truth = law.from_natural(params, eff)
    n_grid = np.geomspace(3e7, 8e8, sizes)
    rows = [(n, 100 * n, p) for n in n_grid for p in range(3)]
    rows += [(n, r * n, p) for n in n_grid[:3] for r in short for p in (1, 2)]
    n, d, idx = (np.array(v) for v in zip(*rows))
    loss = predict(law, truth, n, d, idx) * np.exp(rng.normal(0, noise, len(n)))
    return law, truth, Problem(law, np.log(n), np.log(d), np.log(loss), idx)


@pytest.mark.parametrize("law_name", ["quest", "quartet"])
def test_jacobian_matches_finite_differences(law_name):
    law, truth, problem = synthetic(law_name)
    theta = problem.from_law(truth) + np.random.default_rng(1).normal(0, 0.05, law.n_theta)
    jac = problem.jacobian(theta)
    for k in range(law.n_theta):
        step = np.zeros(law.n_theta)
        step[k] = 1e-6
        numeric = (problem.residuals(theta + step) - problem.residuals(theta - step)) / 2e-6
        np.testing.assert_allclose(jac[:, k], numeric, rtol=1e-5, atol=1e-8)


def test_huber_definition():
    r = np.array([-3e-3, -1e-3, -2e-4, 0.0, 5e-4, 1e-3, 0.02])
    loss, grad = huber(r)
    expected = [0.5 * x * x if abs(x) <= DELTA else DELTA * (abs(x) - DELTA / 2) for x in r]
    np.testing.assert_allclose(loss, expected, rtol=1e-12)
    np.testing.assert_allclose(grad, np.clip(r, -DELTA, DELTA), rtol=1e-12)


def test_paper_runs_give_the_papers_eff(tmp_path):
    """``python -m quest_pl.scaling fit <the paper's CSV>``: eff(P) of QuEST within 0.03 of the paper's, eff / bits
    largest at 4 bits, an objective no larger than the paper's own fitted law's."""
    assert main(["fit", str(PAPER_RUNS), "--out", str(tmp_path), "--bootstrap", "0"]) == 0
    summary = json.loads((tmp_path / "scaling.json").read_text())
    assert summary["n_runs"] == 104 and summary["converged"]
    for precision, paper in PAPER_EFF.items():
        assert summary["eff"][precision] == pytest.approx(paper, abs=0.03), precision
    quest = ["bf16", *PAPER_EFF]
    assert max(quest, key=lambda p: summary["eff"][p] / summary["bits"][p]) == "quest_w4a4"
    # the paper's law on the same runs, through the same objective
    names = list(summary["eff"])
    law = make_law("quest", len(names), names.index("bf16"))
    runs = summary["runs"]
    idx = [names.index(r["precision"]) for r in runs]
    problem = Problem(law, *(np.log([r[k] for r in runs]) for k in ("params", "tokens", "loss")), idx)
    paper_theta = law.from_natural(PAPER_LAW, {names.index(p): (v,) for p, v in PAPER_ALL_EFF.items()})
    paper_objective = problem.objective(problem.from_law(paper_theta))
    assert summary["objective"] <= paper_objective
    assert (tmp_path / "scaling.md").read_text().count("quest_w4a4") >= 1
    assert {p.name for p in tmp_path.iterdir()} >= {"scaling_frontier.pdf", "scaling_eff.png", "scaling_loss.png"}


def test_multistart_finds_the_best_optimum():
    """The landscape has a worse stationary region: the D term switched off (B at its floor, E taking its place),
    where the gradient in B vanishes. A polish started there stops there, at a much worse objective; the fit, from
    its grid of starts, finds the better optimum, at or below the true parameters' objective."""
    law, truth, problem = synthetic(short=(25,))
    result = fit(problem)
    assert result.converged
    assert result.objective <= problem.objective(problem.from_law(truth))
    assert law.natural(problem.to_law(result.theta))["B"] > 1.0  # the fit kept the data term
    b, beta = law.shared.index("b"), law.shared.index("beta")
    # starts where least squares put B at its floor (no D term), with the grid's steepest beta
    off = [s for s in problem.grid_starts() if s[b] < -20 and s[beta] >= GRID["beta"].max()]
    ends = [problem.objective(problem.polish(s)[0]) for s in off]
    assert max(ends) > 5 * result.objective  # the nearest optimum of such a start is a bad one
    assert min(ends) >= result.objective * (1 - 1e-9)
    # and no polish from random starts around the fit does better than the fit
    rng = np.random.default_rng(0)
    lo, hi = np.array(problem.bounds).T
    for _ in range(3):
        theta, _, _ = problem.polish(np.clip(result.theta + rng.normal(0, 0.5, law.n_theta), lo, hi))
        assert problem.objective(theta) >= result.objective * (1 - 1e-9)


def test_known_parameters_recovered_within_intervals():
    law, truth, problem = synthetic(seed=3)
    result = fit(problem)
    boot = bootstrap(problem, result, replicates=60, seed=0)
    assert boot.failed == 0 and len(boot.thetas) == 60
    for p in (1, 2):
        lo, hi = boot.interval(np.exp(boot.thetas[:, len(law.shared) + p - 1]))
        true_eff = np.exp(law.log_eff(truth)[p])
        assert lo <= true_eff <= hi, (p, lo, true_eff, hi)
        assert hi - lo < 0.5 * true_eff  # informative: far from eff = 1 and from the other precision
    for name in ("alpha", "beta"):
        values = [law.natural(t)[name] for t in boot.thetas]
        lo, hi = boot.interval(np.array(values))
        assert lo <= law.natural(truth)[name] <= hi, name
    again = bootstrap(problem, result, replicates=60, seed=0)
    np.testing.assert_array_equal(again.thetas, boot.thetas)  # the seed fixes the intervals
