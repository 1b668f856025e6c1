"""The diagnostics' figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend):
alignment by depth (paper Fig. 2), masked fraction over time (Fig. 8), mask persistence matrix (Fig. 9).

Each function takes plain rows (as in the run dir's CSVs), so a report can redraw them from several runs' files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _figure(width: float = 6.4, height: float = 4.2):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def render(fig, path: Path) -> np.ndarray:
    """Save ``fig`` as a PNG at ``path``; return its pixels (H, W, 3 uint8) for TensorBoard."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def alignment_by_depth(rows: list[tuple], max_curves: int = 6):
    """Row-mean cosine (band: +- row std at the latest step) against depth from the top, one curve per measured step.

    ``rows``: (step, operand, layer, cos, row_mean, row_std) with layers in depth order (``alignment.csv``)."""
    weight = [r for r in rows if r[1] == "weight"]
    steps = sorted({r[0] for r in weight})
    if len(steps) > max_curves:
        steps = [steps[round(i * (len(steps) - 1) / (max_curves - 1))] for i in range(max_curves)]
    layers = list(dict.fromkeys(r[2] for r in weight))
    depth = {name: len(layers) - 1 - i for i, name in enumerate(layers)}  # 0 = the layer next to the head
    fig = _figure()
    ax = fig.add_subplot()
    colors = _colors(len(steps))
    for color, step in zip(colors, steps):
        points = sorted((depth[r[2]], r[4], r[5]) for r in weight if r[0] == step)
        x, mean, std = (np.array(v) for v in zip(*points))
        ax.plot(x, mean, "o-", color=color, label=f"step {step}")
        if step == steps[-1]:
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2)
    ax.set_xticks(range(len(layers)), [name for name in reversed(layers)], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("depth from top")
    ax.set_ylabel("cos(g_Q, g_FP), mean over rows")
    ax.set_title("Gradient alignment with full precision (Fig. 2)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def masked_fraction(rows: list[tuple], expected: dict[str, float]):
    """Masked fraction f_t of each quantizer over steps (one panel per operand), with the Gaussian expectation.

    ``rows``: (step, layer, operand, fraction) (``mask_fraction.csv``); ``expected``: operand -> fraction."""
    operands = [op for op in ("weight", "act") if any(r[2] == op for r in rows)]
    fig = _figure(6.4 * max(1, len(operands)) * 0.75, 4.2)
    for i, op in enumerate(operands):
        ax = fig.add_subplot(1, len(operands), i + 1)
        layers = list(dict.fromkeys(r[1] for r in rows if r[2] == op))
        for color, layer in zip(_colors(len(layers)), layers):
            points = sorted((r[0], r[3]) for r in rows if r[2] == op and r[1] == layer)
            ax.plot(*zip(*points), ".-", color=color, label=layer, lw=1)
        if expected.get(op) is not None:
            ax.axhline(expected[op], color="k", ls="--", label="expectation over N(0,1)")
        if any(r[3] > 0 for r in rows if r[2] == op):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("masked fraction")
        ax.set_title(f"{op} masks (Fig. 8)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return fig


def persistence_matrix(pairs: list[tuple], layer: str | None = None):
    """P(old, new) = |M_old and M_new| / |M_new| (the paper's Fig. 9 quantity, METHOD.md §4.3), upper triangle.

    ``pairs``: (layer, old_step, new_step, n_old, n_new, overlap) (``mask_persistence.csv``); counts of all layers
    are pooled unless ``layer`` names one."""
    pooled: dict[tuple[int, int], list[int]] = {}
    for name, old, new, _, n_new, overlap in pairs:
        if layer is None or name == layer:
            acc = pooled.setdefault((old, new), [0, 0])
            acc[0] += overlap
            acc[1] += n_new
    steps = sorted({s for key in pooled for s in key})
    index = {s: i for i, s in enumerate(steps)}
    matrix = np.full((len(steps), len(steps)), np.nan)
    for (old, new), (overlap, n_new) in pooled.items():
        if n_new:
            matrix[index[old], index[new]] = overlap / n_new
    fig = _figure(5.6, 4.8)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    fig.colorbar(image, ax=ax, label="|M_old ∩ M_new| / |M_new|")
    if len(steps) <= 16:
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(len(steps)), steps, rotation=60, fontsize=7)
    ax.set_yticks(range(len(steps)), steps, fontsize=7)
    ax.set_xlabel("new step")
    ax.set_ylabel("old step")
    ax.set_title(f"Weight-mask persistence (Fig. 9): {layer or 'all layers'}", fontsize=9)
    return fig


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.85 * i / max(1, n - 1)) for i in range(n)]
