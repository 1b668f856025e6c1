"""The study's figures (PDF and PNG, readable at paper size), drawn with matplotlib's object API like the sweep's
(:mod:`quest_pl.callbacks.figures`): loss against parameters with the fitted curves, eff(P) with intervals, and the
memory frontier (docs/METHOD.md §9.4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quest_pl.callbacks.figures import _figure, arm_colors, save_both
from quest_pl.scaling.data import Runs
from quest_pl.scaling.frontier import frontier, memory_grid
from quest_pl.scaling.laws import make_law, predict


def _law(summary: dict, names: list[str]):
    """The fitted law and its theta, rebuilt from the summary."""
    law = make_law(summary["law"], len(names), names.index(summary["options"]["reference"]))
    keys = law.efficiencies
    eff = {i: tuple(summary[k][p] for k in keys) for i, p in enumerate(names)}
    return law, law.from_natural(summary["params"], eff)


def loss_vs_params(summary: dict, runs: Runs, colors: dict[str, str]):
    """Runs and the fitted curve of each precision at the frontier's tokens per parameter (log N axis). Runs at that
    ratio (within 20 %) are filled, others hollow (their curve would sit elsewhere)."""
    names = list(summary["eff"])
    law, theta = _law(summary, names)
    ratio = summary["frontier"]["tokens_per_param"]
    fig = _figure(6.8, 4.6)
    ax = fig.add_subplot()
    n = np.array(runs.params)
    grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 200)
    for i, p in enumerate(names):
        mine = [j for j, q in enumerate(runs.precision) if q == p]
        on = [j for j in mine if abs(runs.tokens[j] / runs.params[j] / ratio - 1) <= 0.2]
        off = [j for j in mine if j not in on]
        c = colors[p]
        ax.plot(grid, predict(law, theta, grid, ratio * grid, i), "-", color=c, lw=1.2, label=p)
        ax.plot([runs.params[j] for j in on], [runs.loss[j] for j in on], "o", color=c, ms=4)
        if off:
            ax.plot([runs.params[j] for j in off], [runs.loss[j] for j in off], "o", mfc="none", color=c, ms=4)
    ax.set_xscale("log")
    title = f"Loss vs size; lines: fitted {summary['law']} law at D = {ratio:.3g} N (hollow: other D/N)"
    ax.set(xlabel="non-embedding parameters N", ylabel="validation loss (nats/token)", title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return fig


def efficiencies(summary: dict, colors: dict[str, str]):
    """eff(P) and eff(P) x 16 / bits per precision, with the bootstrap intervals, ordered by bits."""
    names = sorted(summary["eff"], key=lambda p: (-summary["bits"][p], p))
    fig = _figure(9.5, 4.2)
    for k, (key, scale, label) in enumerate((("eff", None, "eff(P)"), ("eff", 16, "eff(P) x 16 / bits"))):
        ax = fig.add_subplot(1, 2, k + 1)
        for x, p in enumerate(names):
            factor = scale / summary["bits"][p] if scale else 1.0
            value, ci = summary[key][p] * factor, summary[f"{key}_ci"][p]
            err = None if ci is None else [[value - ci[0] * factor], [ci[1] * factor - value]]
            ax.errorbar([x], [value], yerr=err, fmt="o", color=colors[p], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set(ylabel=label, title=f"{label} with 95 % bootstrap interval")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        if scale:
            ax.axhline(1.0, color="k", lw=0.8, ls="--")  # the reference: eff 1 at 16 bits
    return fig


def memory_frontier(summary: dict, runs: Runs, colors: dict[str, str]):
    """Loss against model memory (N x bits) per precision at the frontier's tokens per parameter; the black line is
    the lowest loss, labelled with the optimal precision of each stretch; points are the runs."""
    names = list(summary["eff"])
    law, theta = _law(summary, names)
    ratio = summary["frontier"]["tokens_per_param"]
    bits = [summary["bits"][p] for p in names]
    run_memory = np.array(runs.params) * np.array(runs.bits)
    memory = memory_grid(run_memory)
    loss, best = frontier(law, theta, bits, memory, ratio)
    fig = _figure(6.8, 4.6)
    ax = fig.add_subplot()
    for i, p in enumerate(names):
        ax.plot(memory, loss[i], "-", color=colors[p], lw=1, label=f"{p} ({bits[i]:g} bits)")
        mine = [j for j, q in enumerate(runs.precision) if q == p]
        ax.plot(run_memory[mine], [runs.loss[j] for j in mine], "o", color=colors[p], ms=3)
    envelope = loss[best, np.arange(len(memory))]
    ax.plot(memory, envelope, "-", color="k", lw=2.2, alpha=0.5, label="optimal")
    for seg in summary["frontier"]["optimal"]:
        mid = np.sqrt(seg["from_bits"] * seg["to_bits"])
        y = np.interp(np.log(mid), np.log(memory), envelope)
        ax.annotate(seg["precision"], (mid, y), textcoords="offset points", xytext=(0, -12), ha="center", fontsize=7)
    ax.set_xscale("log")
    ax.set(xlabel="model memory (bits): N x bits per parameter", ylabel="validation loss (nats/token)",
           title=f"Memory frontier at {ratio:.3g} tokens per parameter")  # fmt: skip
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return fig


def study_figures(summary: dict, runs: Runs, out_dir: Path) -> list[Path]:
    """``scaling_loss``, ``scaling_eff``, ``scaling_frontier`` as PDF and PNG in ``out_dir``."""
    colors = arm_colors(list(summary["eff"]))
    written = []
    for name, fig in (
        ("scaling_loss", loss_vs_params(summary, runs, colors)),
        ("scaling_eff", efficiencies(summary, colors)),
        ("scaling_frontier", memory_frontier(summary, runs, colors)),
    ):
        written += save_both(fig, Path(out_dir) / name)
    return written
