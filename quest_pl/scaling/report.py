"""``scaling.md``: the study's answer in one line, the efficiencies with intervals, the law's parameters, the
frontier and what was fitted (docs/METHOD.md §9)."""

from __future__ import annotations

import datetime

MEMORY_NOTE = (
    "Memory = parameters x bits per parameter (scales counted where the input says so); a model of M bits in "
    "precision P has N = M / bits(P) parameters and D = (tokens per parameter) x N tokens."
)


def _ci(interval, fmt: str = "{:.3g}") -> str:
    return "-" if interval is None else f"[{fmt.format(interval[0])}, {fmt.format(interval[1])}]"


def refit_command(inputs: list, out: str, options: dict) -> str:
    """The CLI line that reproduces a study (``options``: :class:`quest_pl.scaling.study.Options` as a dict)."""
    out = f"python -m quest_pl.scaling fit {' '.join(map(str, inputs))} --out {out}"
    out += f" --law {options['law']} --bootstrap {options['bootstrap']} --seed {options['seed']}"
    if options["reference"] != "bf16":
        out += f" --reference {options['reference']}"
    if options["tokens_per_param"] is not None:
        out += f" --tokens-per-param {options['tokens_per_param']:g}"
    return out


def markdown(summary: dict, figures: list[str]) -> str:
    names = list(summary["eff"])
    runs = summary["runs"]
    lines = [f"# Scaling-law study ({summary['law']} law)", ""]
    if summary.get("pipeline_check"):
        lines += [f"**Pipeline check**: {summary['pipeline_check']}. These numbers test the pipeline, not the law.", ""]
    lines += [f"**{summary['frontier']['answer']}**", ""]
    if summary.get("notes"):
        lines += [f"Note: {n}" for n in summary["notes"]] + [""]
    boot = summary["bootstrap"]
    lines += [
        f"- **law**: `{summary['formula']}`, fitted to {summary['n_runs']} runs ({summary['n_parameters']} parameters) "
        "by minimising the sum over runs of Huber_1e-3(log L_hat - log L)",
        f"- **objective**: {summary['objective']:.6g} at the best of {summary['optimizer']['starts']} polished starts "
        f"({summary['optimizer']['message']})",
        f"- **intervals**: 95 % percentile bootstrap, {boot['replicates'] - boot['failed']} of {boot['replicates']} "
        f"replicates converged (seed {boot['seed']}; resampling {boot['unit']})"
        if boot["replicates"]
        else "- **intervals**: none (bootstrap off)",
        f"- **inputs**: {', '.join(f'`{p}`' for p in summary.get('inputs', [])) or '-'}",
        f"- **fitted**: {datetime.datetime.now():%Y-%m-%d %H:%M}; refit with "
        f"`{refit_command(summary['inputs'], summary['out'], summary['options'])}`",
    ]
    if summary["optimizer"]["at_bounds"]:
        lines.append(f"- **at a bound** (not determined by these runs): {', '.join(summary['optimizer']['at_bounds'])}")
    lines += ["", "## Efficiencies", ""]
    has_data_eff = "eff_data" in summary
    header = ["precision", "bits", "runs", "sizes", "eff(P) [95% CI]", "eff(P) x 16 / bits"]
    if has_data_eff:
        header.insert(5, "eff_data(P) [95% CI]")
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    order = sorted(names, key=lambda p: (-summary["bits"][p], p))
    for p in order:
        mine = [r for r in runs if r["precision"] == p]
        eff = f"{summary['eff'][p]:.4f} {_ci(summary['eff_ci'][p])}"
        sizes = str(len({r["params"] for r in mine}))
        cells = [p, f"{summary['bits'][p]:.4g}", str(len(mine)), sizes, eff, f"{summary['eff_per_bit'][p]:.3f}"]
        if has_data_eff:
            cells.insert(5, f"{summary['eff_data'][p]:.4f} {_ci(summary['eff_data_ci'][p])}")
        lines.append("| " + " | ".join(cells) + " |")
    best = max((p for p in names if summary["bits"][p] < 16), key=lambda p: summary["eff_per_bit"][p], default=None)
    if best:
        lines += ["", f"eff(P) / bits is largest for {best} ({summary['bits'][best]:g} bits)."]
    lines += ["", "## Law parameters", "", "| parameter | value | 95% CI |", "|---|---|---|"]
    lines += [f"| {k} | {v:.5g} | {_ci(summary['params_ci'].get(k), '{:.4g}')} |" for k, v in summary["params"].items()]
    front = summary["frontier"]
    lines += ["", f"## Frontier at {front['tokens_per_param']:.3g} tokens per parameter", "",
              "| memory from (bits) | to (bits) | optimal precision |", "|---|---|---|"]  # fmt: skip
    for s in front["optimal"]:
        lines.append(f"| {s['from_bits']:.3g} | {s['to_bits']:.3g} | {s['precision']} ({s['bits']:g} bits) |")
    lines += ["", MEMORY_NOTE]
    lines += ["", "Figures (PDF and PNG): " + ", ".join(figures) + ".", ""]
    return "\n".join(lines)
