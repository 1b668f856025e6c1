"""Sweep report: one row per arm of a multirun directory, as ``summary.csv``, ``summary.md`` and PNG plots.

Run automatically when an experiment's multirun ends (:class:`quest_pl.sweep.SweepReport`), or again on an existing
sweep directory::

    python -m quest_pl.report multirun/2026-11-22_16-30-00 [--no-ptq]

Each job directory ``<num>_<arm>`` holds ``metrics.json`` (final metrics), ``.hydra/config.yaml`` (what the arm
trained) and ``tensorboard/`` (curves and diagnostics). Columns:

* ``val_loss``, ``val_ppl``: final validation loss (nats/token) and perplexity; ``delta_bf16``: ``val_loss`` minus the
  full-precision arm's;
* ``align_mean``: cosine of the quantized and full-precision gradients over the whole model (``align/model``,
  METHOD.md §4.2), averaged over its logged steps; ``align_block0``: the same for the lowest block (``align/block/0``);
* ``mask_frac``: fraction of entries whose gradient the estimator masks (``mask/frac/*``, all layers and operands),
  averaged over layers and logged steps;
* ``wall_s``: the job's wall time; ``tokens_per_s``: mean of the logged training throughput.

Rows named ``ptq_*`` are data-free post-training quantizations of the full-precision arm's final checkpoint at the
quantized arms' grids and bits (:mod:`quest_pl.ptq`), evaluated on the same validation batches.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

COLUMNS = (
    "arm",
    "method",
    "grid",
    "bits",
    "bits_per_elem",
    "estimator",
    "hadamard",
    "val_loss",
    "val_ppl",
    "delta_bf16",
    "align_mean",
    "align_block0",
    "mask_frac",
    "wall_s",
    "tokens_per_s",
    "steps",
)
FORMATS = {
    "val_loss": "{:.4f}",
    "val_ppl": "{:.2f}",
    "delta_bf16": "{:+.4f}",
    "align_mean": "{:.3f}",
    "align_block0": "{:.3f}",
    "mask_frac": "{:.3f}",
    "wall_s": "{:.1f}",
    "tokens_per_s": "{:.0f}",
}
JOB_DIR = re.compile(r"^(\d+)_(.+)$")
LAYER_ORDER = ("attn.c_attn", "attn.c_proj", "mlp.w12", "mlp.c_proj")


# -- reading a sweep ------------------------------------------------------------------------------------------------
def job_dirs(sweep_dir: Path) -> list[Path]:
    """Finished jobs (a ``metrics.json``) in job-number order."""
    jobs = []
    for d in Path(sweep_dir).iterdir():
        m = JOB_DIR.match(d.name)
        if d.is_dir() and m and (d / "metrics.json").is_file():
            jobs.append((int(m.group(1)), d))
    return [d for _, d in sorted(jobs)]


def arm_name(job_dir: Path) -> str:
    m = JOB_DIR.match(job_dir.name)
    return m.group(2) if m else job_dir.name


def load_quant(job_dir: Path) -> dict:
    """The ``quant`` group a job trained with (resolved), from its ``.hydra/config.yaml``."""
    path = job_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    return OmegaConf.to_container(OmegaConf.load(path).quant, resolve=True) or {}


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of a run: tag -> [(step, value), ...] in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = Path(run_dir) / "tensorboard"
    if not tb.is_dir():
        return {}
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "images": 1, "tensors": 1, "histograms": 1})
    quiet = logging.getLogger("tensorboard")  # "No path found after <event file>": normal for a finished run
    level, quiet.level = quiet.level, logging.ERROR
    try:
        acc.Reload()
    finally:
        quiet.setLevel(level)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags().get("scalars", [])}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def describe_quant(q: dict) -> dict:
    """Grid, bits, estimator and Hadamard columns from a ``quant`` group (as in :class:`quest_pl.quant.QuantConfig`)."""
    w_bits, a_bits = (q.get("w_bits"), q.get("a_bits")) if q.get("grid") else (None, None)
    if w_bits is None and a_bits is None:
        return {"method": "BF16", "grid": "-", "bits": "W16A16", "estimator": "-", "hadamard": "-"}

    def per_operand(key: str) -> str:
        base = q.get(key)
        w = (q.get(f"w_{key}") or base) if w_bits is not None else None
        a = (q.get(f"a_{key}") or base) if a_bits is not None else None
        return " / ".join(dict.fromkeys(x for x in (w, a) if x))  # "w / a" only where they differ

    estimator = per_operand("estimator")
    if "clip" in estimator.split(" / "):
        estimator = estimator.replace("clip", f"clip(c={float(q.get('clip_scale', 1.0)):g})")
    bits = "".join(f"{op}{'16' if b is None else f'{float(b):g}'}" for op, b in (("W", w_bits), ("A", a_bits)))
    hadamard = q.get("hadamard_mode", "half") if q.get("hadamard") else "no"
    return {"method": "QAT", "grid": per_operand("grid"), "bits": bits, "estimator": estimator, "hadamard": hadamard}


def _bits_per_element(job_dir: Path, quant: dict) -> str | None:
    """Storage bits per element including scales (:func:`quest_pl.quant.bits_per_element`, rows of model.d_model)."""
    from quest_pl.quant import bits_per_element

    try:
        return bits_per_element(quant, OmegaConf.load(job_dir / ".hydra" / "config.yaml").model.d_model)
    except Exception:  # a job from an older version, or an unreadable config: leave the cell empty
        return None


def _layer_key(tag_layer: str) -> tuple:
    m = re.match(r"(?:.*\.)?blocks\.(\d+)\.(.+)$", tag_layer)
    if not m:
        return (math.inf, 0, tag_layer)
    rest = m.group(2)
    return (int(m.group(1)), LAYER_ORDER.index(rest) if rest in LAYER_ORDER else len(LAYER_ORDER), rest)


def collect(sweep_dir: Path) -> list[dict]:
    """One record per finished job: the summary row plus the curves the plots need (keys starting with ``_``)."""
    arms = []
    for job in job_dirs(sweep_dir):
        from quest_pl.config import ConfigError

        try:
            metrics = json.loads((job / "metrics.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # a damaged file: one line, not a traceback
            raise ConfigError(f"{str(job / 'metrics.json')!r}: not valid JSON ({e})") from None
        if not isinstance(metrics, dict):
            raise ConfigError(f"{str(job / 'metrics.json')!r}: not a JSON object")
        scalars = read_scalars(job)
        quant = load_quant(job)
        row = {"arm": arm_name(job), **describe_quant(quant)}
        row["bits_per_elem"] = _bits_per_element(job, quant)
        row["val_loss"] = metrics.get("val/loss")
        row["val_ppl"] = metrics.get("val/ppl")
        if row["method"] == "BF16":  # its "quantized" and full-precision gradients are the same: nothing to show
            scalars = {k: v for k, v in scalars.items() if not k.startswith(("align/", "mask/"))}
        row["align_mean"] = _mean(v for _, v in scalars.get("align/model", []))
        row["align_block0"] = _mean(v for _, v in scalars.get("align/block/0", []))
        mask_tags = [t for t in scalars if t.startswith("mask/frac/")]
        mask_by_step: dict[int, list[float]] = {}
        for tag in mask_tags:
            for step, v in scalars[tag]:
                mask_by_step.setdefault(step, []).append(v)
        mask_curve = sorted((s, _mean(vs)) for s, vs in mask_by_step.items())
        row["mask_frac"] = _mean(v for _, v in mask_curve)
        row["wall_s"] = metrics.get("wall_s")
        throughput = [v for _, v in scalars.get("train/tokens_per_sec", [])]
        row["tokens_per_s"] = _mean(throughput) if throughput else metrics.get("train/tokens_per_sec")
        row["steps"] = metrics.get("step")
        align_layers = {t[len("align/cos/") :]: t for t in scalars if t.startswith("align/cos/")}
        row["_val_curve"] = scalars.get("val/loss", [])
        row["_train_curve"] = scalars.get("train/loss", [])
        row["_mask_curve"] = mask_curve
        row["_mask_expected"] = _mean(v for _, v in scalars.get("mask/expected", []))
        row["_align_depth"] = [
            (layer, _mean(v for _, v in scalars[tag]))
            for layer, tag in sorted(align_layers.items(), key=lambda kv: _layer_key(kv[0]))
        ]
        row["_job_dir"] = job
        row["_quant"] = quant
        arms.append(row)
    return arms


def add_deltas(rows: list[dict]) -> None:
    """``delta_bf16`` = val_loss minus the (first) full-precision QAT arm's."""
    base = next((r["val_loss"] for r in rows if r["method"] == "BF16" and r["val_loss"] is not None), None)
    for r in rows:
        r["delta_bf16"] = None if base is None or r["val_loss"] is None else r["val_loss"] - base


# -- writing --------------------------------------------------------------------------------------------------------
def _cell(row: dict, col: str) -> str:
    v = row.get(col)
    if v is None:
        return ""
    return FORMATS[col].format(v) if col in FORMATS else str(v)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in rows:
            writer.writerow(["" if r.get(c) is None else r.get(c) for c in COLUMNS])


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell(r, c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def text_table(rows: list[dict]) -> str:
    cells = [list(COLUMNS)] + [[_cell(r, c) or "-" for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def write_markdown(rows: list[dict], path: Path, sweep_dir: Path) -> None:
    text = [
        f"# Sweep summary: `{sweep_dir}`",
        "",
        markdown_table(rows),
        "",
        "val_loss: final validation loss (nats/token); bits_per_elem: storage bits per element including scales "
        "(per-row scales over rows of d_model, 16-bit); delta_bf16: minus the BF16 arm's; align_mean / align_block0: "
        "mean cosine of quantized vs full-precision gradient (whole model / lowest block); mask_frac: mean fraction "
        "of masked gradient entries; ptq_* rows: data-free post-training quantization of the BF16 arm's checkpoint.",
        # aqlm_* rows (quest_pl.ptq.sweep_configs): say they are calibrated, unlike the ptq_* rows
        "aqlm_* rows: additive vector quantization (AQLM) of the same checkpoint, calibrated on training batches "
        "(not data-free); its grid cell gives the bits per weight including codebooks and scales.",
        "",
        "Plots: val_loss.png, alignment_by_depth.png, masked_fraction.png.",
        "",
    ]
    path.write_text("\n".join(text))


def plot_all(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    qat = [r for r in rows if r["method"] != "PTQ"]
    palette = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    color = {r["arm"]: palette(i % palette.N) for i, r in enumerate(rows)}  # one colour per arm in every plot

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in qat:
        if r["_train_curve"]:
            steps, values = zip(*r["_train_curve"])
            ax_train.plot(steps, _ema(values), color=color[r["arm"]], label=r["arm"])
        if r["_val_curve"]:
            steps, values = zip(*r["_val_curve"])
            ax_val.plot(steps, values, marker="o", color=color[r["arm"]], label=r["arm"])
    for r in rows:
        if r["method"] == "PTQ" and r["val_loss"] is not None and r.get("steps"):
            ax_val.scatter([r["steps"]], [r["val_loss"]], marker="x", color=color[r["arm"]], label=r["arm"])
    ax_train.set(title="train/loss (EMA 0.9)", xlabel="step", ylabel="loss (nats/token)")
    ax_val.set(title="val/loss", xlabel="step", ylabel="loss (nats/token)")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=7, loc="upper right")
    written.append(_save(fig, out_dir / "val_loss.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = None
    for r in qat:
        if r["_align_depth"]:
            labels = [layer for layer, _ in r["_align_depth"]]
            ax.plot(
                range(len(labels)), [v for _, v in r["_align_depth"]], marker="o", color=color[r["arm"]], label=r["arm"]
            )
    if labels:
        ax.set_xticks(range(len(labels)), [_short_layer(x) for x in labels], rotation=45, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no align/cos/* scalars logged", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="gradient alignment by depth (mean over logged steps)", ylabel="cosine to full-precision gradient")
    ax.grid(alpha=0.3)
    written.append(_save(fig, out_dir / "alignment_by_depth.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    any_curve = False
    for r in qat:
        if r["_mask_curve"]:
            steps, values = zip(*r["_mask_curve"])
            ax.plot(steps, values, marker=".", color=color[r["arm"]], label=r["arm"])
            if r["_mask_expected"] is not None:
                ax.axhline(r["_mask_expected"], color=color[r["arm"]], linestyle=":", linewidth=1)
            any_curve = True
    if any_curve:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no mask/frac/* scalars logged", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="masked fraction (mean over layers; dotted: N(0,1) expectation)", xlabel="step", ylabel="fraction")
    ax.grid(alpha=0.3)
    written.append(_save(fig, out_dir / "masked_fraction.png"))
    return written


def _ema(values, beta: float = 0.9) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def _short_layer(name: str) -> str:
    return name.replace("blocks.", "b").replace("attn.", "").replace("mlp.", "mlp.")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(sweep_dir: str | Path, echo: bool = False, ptq: bool = True) -> list[dict]:
    """Collect every finished job of ``sweep_dir`` and write ``summary.csv``, ``summary.md`` and the plots there.
    With ``ptq``, add the PTQ rows of the BF16 arm (:func:`quest_pl.ptq.sweep_rows`). Returns the rows."""
    from quest_pl.config import ConfigError
    from quest_pl.sweep import register_resolvers

    register_resolvers()
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"{str(sweep_dir)!r}: no such sweep directory")
    rows = collect(sweep_dir)
    if not rows:
        raise ConfigError(f"{str(sweep_dir)!r}: no finished job (no <num>_<arm>/metrics.json)")
    if ptq:
        from quest_pl.ptq import sweep_rows

        rows += sweep_rows(rows, sweep_dir)
    add_deltas(rows)
    write_csv(rows, sweep_dir / "summary.csv")
    write_markdown(rows, sweep_dir / "summary.md", sweep_dir)
    plot_all(rows, sweep_dir)
    if echo:
        print(f"\nSweep summary ({sweep_dir}):\n{text_table(rows)}\n")
        print(
            f"wrote {sweep_dir / 'summary.csv'}, summary.md, val_loss.png, alignment_by_depth.png, masked_fraction.png"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quest_pl.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a multirun directory (with <num>_<arm>/ job directories)")
    parser.add_argument("--no-ptq", action="store_true", help="skip the post-training-quantization rows")
    args = parser.parse_args(argv)
    from quest_pl.config import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        write_report(args.sweep_dir, echo=True, ptq=not args.no_ptq)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
