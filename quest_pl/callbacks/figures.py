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
    """Save ``fig`` as a PNG at ``path``; return its pixels (H, W, 3 uint8) for TensorBoard.

    Drawn once: saving a PNG draws on the figure's Agg canvas, whose buffer then holds the same pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def alignment_by_depth(rows: list[tuple], max_curves: int = 6):
    """Row-mean cosine (band: +- row std at the latest step) against depth from the top, one curve per measured step.

    ``rows``: (step, operand, layer, cos, row_mean, row_std) with layers in depth order (``alignment.csv``)."""
    weight = [r for r in rows if r[1] == "weight" and r[0] > 0]  # step 0: the untrained model, no estimator acted yet
    steps = sorted({r[0] for r in weight})
    fig = _figure()
    if not steps:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no alignment measured after step 0 yet", ha="center", va="center", transform=ax.transAxes)
        return fig
    if len(steps) > max_curves:
        steps = [steps[round(i * (len(steps) - 1) / (max_curves - 1))] for i in range(max_curves)]
    layers = list(dict.fromkeys(r[2] for r in weight))
    depth = {name: len(layers) - 1 - i for i, name in enumerate(layers)}  # 0 = the layer next to the head
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
            ax.axhline(expected[op], color="k", ls="--", label=f"N(0,1) expectation ({expected[op]:.2g})")
        if any(r[3] > 0 for r in rows if r[2] == op):
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "every masked fraction is 0: this estimator masks nothing (e.g. STE)", ha="center",
                    va="center", transform=ax.transAxes, fontsize=8)  # fmt: skip
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


# -- sweep figures (quest_pl.report): one colour per arm, seed spread as bands or error bars -----------------------
ARM_COLORS = {  # by arm family (the arm name without its _wXaY suffix): the same colour in every figure and sweep
    "bf16": "#000000",
    "ste": "#7f7f7f",
    "ste_hadamard": "#8c564b",
    "clip": "#ff7f0e",
    "trust": "#1f77b4",
    "quest": "#d62728",
    "lsq": "#2ca02c",
    "pact": "#9467bd",
    "uniform": "#17becf",
    "lloyd_max": "#bcbd22",
    "fp4": "#e377c2",
    "int_sparse24": "#aec7e8",
}
_EXTRA_COLORS = ("#ff9896", "#98df8a", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#ffbb78")


def arm_colors(arms: list[str]) -> dict[str, str]:
    """Arm -> colour: a fixed colour per arm family (``ARM_COLORS``); PTQ rows and other arms get the next free
    colours in order. Several bit widths of one family are told apart by shade."""
    import re

    from matplotlib.colors import to_hex, to_rgb

    out, spare, seen = {}, iter(_EXTRA_COLORS * 4), {}
    for arm in arms:
        family = re.sub(r"_w[0-9.]+a[0-9.]+$", "", arm)
        if family in ARM_COLORS:
            k = seen.get(family, 0)
            seen[family] = k + 1
            rgb = np.array(to_rgb(ARM_COLORS[family]))
            out[arm] = to_hex(rgb + (1 - rgb) * min(0.6, 0.25 * k))  # lighter for the family's next bit widths
        else:
            out[arm] = next(spare)
    return out


def save_both(fig, path_stem: Path) -> list[Path]:
    """Save ``fig`` as ``<stem>.pdf`` and ``<stem>.png`` (200 dpi); returns both paths."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [path_stem.with_suffix(".pdf"), path_stem.with_suffix(".png")]
    fig.savefig(paths[0])
    fig.savefig(paths[1], dpi=200)
    return paths


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8, wrap=True, color="0.3")


def _band(curves: list[list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps common to every seed's curve, and the mean, min and max over seeds there."""
    common = set.intersection(*(set(s for s, v in c if v is not None) for c in curves)) if curves else set()
    steps = np.array(sorted(common))
    values = np.array([[dict(c)[s] for s in steps] for c in curves]) if len(steps) else np.zeros((0, 0))
    if not len(steps):
        return steps, steps, steps, steps
    return steps, values.mean(0), values.min(0), values.max(0)


def _ema(values, beta: float = 0.9) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def loss_curves(rows: list[dict], colors: dict[str, str]):
    """Training loss (EMA 0.9) and validation loss against step: mean over seeds, band = min..max over seeds;
    PTQ rows as crosses at the BF16 arm's final step."""
    fig = _figure(11, 4.2)
    ax_train, ax_val = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    n_seeds = max((r["seeds"] for r in rows), default=1)
    for r in rows:
        ok = [j for j in r["_runs"] if j["status"] == "ok"]
        color, label = colors[r["arm"]], r["arm"] + (" (diverged)" if r["status"] != "ok" else "")
        if r["method"] == "PTQ":
            if r["val_loss"] is not None and r.get("steps"):
                err = r.get("val_loss_std") or 0.0
                ax_val.errorbar([r["steps"]], [r["val_loss"]], yerr=[err], fmt="x", color=color, label=label)
            continue
        for ax, key, smooth in ((ax_train, "_train_curve", True), (ax_val, "_val_curve", False)):
            curves = [[(s, v) for s, v in zip([p[0] for p in j[key]], _ema([p[1] for p in j[key]]) if smooth
                       else [p[1] for p in j[key]])] for j in (ok or r["_runs"]) if j.get(key)]  # fmt: skip
            steps, mean, lo, hi = _band(curves)
            if len(steps):
                ax.plot(steps, mean, "-" if smooth else "o-", ms=3, color=color, label=label, lw=1.2)
                if len(curves) > 1:
                    ax.fill_between(steps, lo, hi, color=color, alpha=0.2, lw=0)
    band = f"band: min..max over {n_seeds} seeds" if n_seeds > 1 else "1 seed: pipeline check"
    ax_train.set(title=f"Training loss (EMA 0.9; {band})", xlabel="optimizer step", ylabel="loss (nats/token)")
    ax_val.set(title=f"Validation loss ({band}; ×: PTQ)", xlabel="optimizer step", ylabel="loss (nats/token)")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            _note(ax, "no loss curves logged")
    return fig


def delta_to_bf16(rows: list[dict], colors: dict[str, str]):
    """Left: final validation loss per arm (mean, error bar = std over seeds, dots = seeds). Right: the paired
    difference to BF16 (mean, error bar = 95 % t-interval, dots = per-seed differences); 0 = BF16."""
    fig = _figure(11, 0.9 + 0.38 * max(3, len(rows)))
    ax_loss, ax_delta = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    y = np.arange(len(rows))[::-1]
    for yi, r in zip(y, rows):
        c = colors[r["arm"]]
        seeds = [j["val_loss"] for j in r["_runs"] if j["val_loss"] is not None]
        deltas = [j["delta_bf16"] for j in r["_runs"] if j.get("delta_bf16") is not None]
        if r["val_loss"] is not None:
            ax_loss.errorbar(r["val_loss"], yi, xerr=r.get("val_loss_std") or 0, fmt="o", color=c, capsize=3)
            ax_loss.scatter(seeds, [yi] * len(seeds), s=10, color=c, alpha=0.5, zorder=3)
        else:
            ax_loss.text(0.02, yi, f"{r['arm']}: {r['status']}", va="center", fontsize=7, color=c,
                         transform=ax_loss.get_yaxis_transform())  # fmt: skip
        if r["method"] != "BF16" and r["delta_bf16"] is not None:
            if r.get("delta_ci_low") is not None:
                err = [[r["delta_bf16"] - r["delta_ci_low"]], [r["delta_ci_high"] - r["delta_bf16"]]]
                ax_delta.errorbar(r["delta_bf16"], yi, xerr=err, fmt="o", color=c, capsize=3)
            else:
                ax_delta.plot(r["delta_bf16"], yi, "o", color=c)
            ax_delta.scatter(deltas, [yi] * len(deltas), s=10, color=c, alpha=0.5, zorder=3)
    ax_delta.axvline(0, color="k", lw=1)
    labels = [r["arm"] + (f" ({r['status']})" if r["status"] != "ok" else "") for r in rows]
    n_seeds = max((r["seeds"] for r in rows), default=1)
    for ax in (ax_loss, ax_delta):
        ax.set_yticks(y, labels, fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    from matplotlib.lines import Line2D

    ax_loss.set(title="Final validation loss", xlabel="loss (nats/token)")
    ax_loss.legend(
        [Line2D([], [], marker="o", color="0.3"), Line2D([], [], marker="o", ls="", ms=3, color="0.3", alpha=0.5)],
        [f"mean ± std over seeds (n = {n_seeds})" if n_seeds > 1 else "1 seed: pipeline check", "single seed"],
        fontsize=7,
        loc="best",
    )
    ax_delta.set(title="Difference to BF16 (paired by seed)", xlabel="Δ loss to BF16 (nats/token; < 0: better)")
    ax_delta.legend(
        [Line2D([], [], marker="o", color="0.3"), Line2D([], [], marker="o", ls="", ms=3, color="0.3", alpha=0.5)],
        ["mean, 95 % t-interval" if n_seeds > 1 else "1 seed: no interval", "per-seed difference"],
        fontsize=7,
        loc="best",
    )
    return fig


def sweep_alignment_by_depth(rows: list[dict], colors: dict[str, str]):
    """Per-row mean cosine of quantized vs full-precision gradient (band: +- the std over rows), against depth from
    the top (0 = the layer next to the head), mean over logged steps after step 0 and over seeds; weights, and layer
    inputs when measured. The paper's Fig. 2 format."""
    operands = [op for op in ("weight", "act") if any(j["_align_depth"].get(op) for r in rows for j in r["_runs"]
                                                       if "_align_depth" in j)]  # fmt: skip
    fig = _figure(6.4 * max(1, len(operands)) * 0.85, 4.4)
    if not operands:
        why = "callbacks.grad_alignment off, a run shorter than its every_n_steps, or BF16 only"
        _note(fig.add_subplot(), f"no align/row_mean/* scalars after step 0 ({why})")
        return fig
    for i, op in enumerate(operands):
        ax = fig.add_subplot(1, len(operands), i + 1)
        layers = None
        for r in rows:
            per_seed = [j["_align_depth"][op] for j in r["_runs"] if j.get("_align_depth", {}).get(op)]
            if r["method"] == "BF16" or not per_seed:
                continue
            layers = [layer for layer, *_ in per_seed[0]]
            mean = np.array([np.mean([s[k][1] for s in per_seed]) for k in range(len(layers))])
            std = np.array([np.mean([s[k][2] or 0.0 for s in per_seed]) for k in range(len(layers))])
            depth = np.arange(len(layers))[::-1]  # layers are in forward order: the last is at depth 0
            order = np.argsort(depth)
            c = colors[r["arm"]]
            ax.plot(depth[order], mean[order], "o-", ms=3, color=c, label=r["arm"])
            low, high = np.maximum(mean - std, -1.0), np.minimum(mean + std, 1.0)  # a cosine stays in [-1, 1]
            ax.fill_between(depth[order], low[order], high[order], color=c, alpha=0.15, lw=0)
        if layers:
            ticks = list(reversed(layers))
            ax.set_xticks(range(len(ticks)), [t.replace("blocks.", "b") for t in ticks], rotation=60, ha="right",
                          fontsize=6)  # fmt: skip
            ax.legend(fontsize=7)
        else:
            _note(ax, f"no {op} alignment logged")
        what = "weight gradient" if op == "weight" else "input (activation) gradient"
        ax.set(title=f"Alignment of the {what} by depth", xlabel="layer, depth from the top (left: next to the head)",
               ylabel="cos(g_Q, g_FP) per row: mean ± std over rows")  # fmt: skip
        ax.grid(alpha=0.3)
    fig.suptitle("Gradient alignment with full precision (mean over logged steps > 0 and seeds; BF16 = 1)", fontsize=9)
    return fig


def sweep_masked_fraction(rows: list[dict], colors: dict[str, str]):
    """Masked fraction (mean over layers) against step on a log axis, weights and activations in separate panels;
    band = min..max over seeds; dashed: each arm's N(0,1) expectation (labelled). Arms that mask nothing (STE, BF16)
    cannot appear on a log axis: the panel says so."""
    fig = _figure(11, 4.4)
    for i, op in enumerate(("weight", "act")):
        ax = fig.add_subplot(1, 2, i + 1)
        zero, drawn, expectations = [], False, {}
        for r in rows:
            if r["method"] != "QAT":
                continue
            curves = [j["_mask_curves"].get(op) for j in r["_runs"] if j.get("_mask_curves", {}).get(op)]
            if not curves:
                continue
            steps, mean, lo, hi = _band(curves)
            if not len(steps) or not np.any(mean > 0):
                zero.append(r["arm"])
                continue
            c = colors[r["arm"]]
            ax.plot(steps, mean, ".-", color=c, label=r["arm"], lw=1.2)
            if len(curves) > 1:
                ax.fill_between(steps, np.maximum(lo, 1e-12), hi, color=c, alpha=0.2, lw=0)
            expected = r["_runs"][0].get("_mask_expected", {}).get(op)
            if expected:
                expectations.setdefault(round(expected, 12), []).append(r["arm"])
                ax.axhline(expected, color=c, ls="--", lw=0.9)
            drawn = True
        for value, arms in expectations.items():
            ax.annotate(f"N(0,1): {value:.2g} ({', '.join(arms)})", (0.01, value), xycoords=("axes fraction", "data"),
                        fontsize=6, va="bottom", color="0.25")  # fmt: skip
        if drawn:
            ax.set_yscale("log")
            ax.legend(fontsize=7, title="dashed: N(0,1) expectation", title_fontsize=7)
        notes = []
        if zero:
            notes.append("mask nothing (0 is off a log axis): " + ", ".join(zero))
        if not drawn and not zero:
            notes.append(f"no {op} masks logged (operand not quantized, or callbacks.mask_stats off)")
        if notes:
            ax.text(0.5, 0.02 if drawn else 0.5, "\n".join(notes), ha="center", va="bottom" if drawn else "center",
                    transform=ax.transAxes, fontsize=7, color="0.3")  # fmt: skip
        ax.set(title=f"Masked fraction: {'weights' if op == 'weight' else 'activations'} (mean over layers)",
               xlabel="optimizer step", ylabel="fraction of entries with zero gradient")  # fmt: skip
        ax.grid(alpha=0.3, which="both")
    return fig


def sweep_figures(rows: list[dict], out_dir: Path) -> list[Path]:
    """Every sweep figure as PDF and PNG in ``out_dir``: loss_curves, delta_bf16, alignment_by_depth,
    masked_fraction. Returns the paths written."""
    colors = arm_colors([r["arm"] for r in rows])
    written = []
    for name, draw in (
        ("loss_curves", loss_curves),
        ("delta_bf16", delta_to_bf16),
        ("alignment_by_depth", sweep_alignment_by_depth),
        ("masked_fraction", sweep_masked_fraction),
    ):
        written += save_both(draw(rows, colors), Path(out_dir) / name)
    return written
