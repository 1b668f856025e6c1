"""The report's tables: ``summary.csv`` / ``runs.csv`` columns, the Markdown and console tables, and ``summary.md``
with what was run at its top."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

COLUMNS = (
    "arm",
    "method",
    "grid",
    "bits",
    "bits_per_elem",
    "estimator",
    "hadamard",
    "status",
    "seeds",
    "pairs",
    "val_loss",
    "val_loss_std",
    "val_ppl",
    "delta_bf16",
    "delta_std",
    "delta_ci_low",
    "delta_ci_high",
    "verdict",
    "align_mean",
    "align_block0",
    "mask_frac",
    "wall_s",
    "tokens_per_s",
    "steps",
)
RUN_COLUMNS = (
    "arm",
    "seed",
    "status",
    "val_loss",
    "val_ppl",
    "delta_bf16",
    "align_mean",
    "align_block0",
    "mask_frac",
    "wall_s",
    "tokens_per_s",
    "steps",
    "job",
)
FORMATS = {
    "val_loss": "{:.4f}",
    "val_loss_std": "{:.4f}",
    "val_ppl": "{:.2f}",
    "delta_bf16": "{:+.4f}",
    "delta_std": "{:.4f}",
    "delta_ci_low": "{:+.4f}",
    "delta_ci_high": "{:+.4f}",
    "align_mean": "{:.3f}",
    "align_block0": "{:.3f}",
    "mask_frac": "{:.4f}",
    "wall_s": "{:.1f}",
    "tokens_per_s": "{:.0f}",
}


# -- what was run ---------------------------------------------------------------------------------------------------
def _git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + (" (with uncommitted changes)" if dirty else "")) if commit else "unknown"


def _job_size(job: dict) -> dict:
    """A finished job's shape, non-embedding parameters, steps and tokens (``None`` where not recorded)."""
    cfg = job["_config"]
    model, data, trainer = cfg.get("model", {}), cfg.get("data", {}), cfg.get("trainer", {})
    devices = trainer.get("devices")
    world = (devices if isinstance(devices, int) else 1) * (trainer.get("num_nodes") or 1)
    per_step = (
        (data.get("batch_size") or 0) * (model.get("seq_len") or 0) * (trainer.get("accumulate_grad_batches") or 1)
    )
    per_step *= world
    steps = job.get("steps")
    return {"n_layer": model.get("n_layer"), "d_model": model.get("d_model"), "world": world, "per_step": per_step,
            "steps": steps, "tokens": steps * per_step if steps is not None else None,
            "params": job["_metrics"].get("non_embedding_params")}  # fmt: skip


def _span(values: list, fmt: str) -> str:
    """``fmt`` of the value when all agree, else ``min to max``: a sweep over sizes says so in its header."""
    texts = [fmt.format(v) for v in sorted(values)]
    return texts[0] if texts[0] == texts[-1] else f"{texts[0]} to {texts[-1]}"


def what_was_run(jobs: list[dict]) -> list[tuple[str, str]]:
    """(label, value) lines for the top of ``summary.md``: model size, tokens, seeds, steps, data, date, commit."""
    trained = [j for j in jobs if j.get("_config")]
    if not trained:
        return []
    sizes = [_job_size(j) for j in trained]
    cfg = trained[0]["_config"]
    model, data = cfg.get("model", {}), cfg.get("data", {})
    source = data.get("source", "?")
    source += {"hub": f" {data.get('name')}", "text_file": f" {data.get('path')}"}.get(source, "")
    finished = [datetime.datetime.fromtimestamp((j["_job_dir"] / "metrics.json").stat().st_mtime) for j in trained]
    seeds = sorted({j["seed"] for j in trained})
    layers = _span([s["n_layer"] for s in sizes], "{}")
    widths = _span([s["d_model"] for s in sizes], "{}")
    shape = f"{layers} x {widths} (heads {model.get('n_head')}, seq {model.get('seq_len')})"
    params = [s["params"] for s in sizes]
    size = (f"{_span([p / 1e6 for p in params], '{:.2f}')} M non-embedding parameters" if all(params)
            else "non-embedding parameters not recorded")  # fmt: skip
    known = [s for s in sizes if s["tokens"] is not None]
    if known and len(known) == len(sizes):
        world = max(s["world"] for s in sizes)
        devices = f", {world} devices" if world > 1 else ""
        per_job = " per job" if len({s["tokens"] for s in sizes}) > 1 else ""
        tokens_text = (f"{_span([s['tokens'] for s in sizes], '{:,}')} seen{per_job} "
                       f"({_span([s['steps'] for s in sizes], '{}')} steps x "
                       f"{_span([s['per_step'] for s in sizes], '{:,}')} tokens/step{devices})")  # fmt: skip
        ratio = _span([s["tokens"] / s["params"] for s in sizes], "{:.3g}") if all(params) else "unknown"
    else:
        tokens_text, ratio = "unknown", "unknown"
    n = len(seeds)
    seeds_text = f"{', '.join(map(str, seeds))} ({n} seed{'s' if n != 1 else ''}" + (
        ": a pipeline check, no confidence intervals)" if n == 1 else ", arms paired by seed)"
    )
    lines = [
        ("model", f"{shape}, {size}"),
        ("tokens", tokens_text),
        ("tokens per parameter", ratio),
        ("seeds", seeds_text),
        ("data", f"{source} (vocabulary {data.get('vocab_size')}, {data.get('val_batches')} validation batches)"),
        ("runs finished", f"{min(finished):%Y-%m-%d %H:%M} to {max(finished):%Y-%m-%d %H:%M} (local time)"),
        ("report", f"{datetime.datetime.now():%Y-%m-%d %H:%M}, code at git commit {_git_commit()}"),
    ]
    return lines


# -- writing --------------------------------------------------------------------------------------------------------
def _cell(row: dict, col: str) -> str:
    v = row.get(col)
    if v is None:
        return ""
    return FORMATS[col].format(v) if col in FORMATS else str(v)


def write_csv(rows: list[dict], path: Path, columns=COLUMNS) -> None:
    from quest_pl.io import atomic_write_csv

    atomic_write_csv(rows, path, columns)


def _loss_cell(row: dict) -> str:
    if row["val_loss"] is None:
        return row["status"]
    std = row.get("val_loss_std")
    return f"{row['val_loss']:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def _delta_cell(row: dict) -> str:
    if row["method"] == "BF16":
        return "0 (reference)"
    if row["delta_bf16"] is None:
        return "-"
    text = f"{row['delta_bf16']:+.4f}"
    if row.get("delta_ci_low") is not None:
        text += f" [{row['delta_ci_low']:+.4f}, {row['delta_ci_high']:+.4f}]"
    return text


DISPLAY = (  # (header, cell) of the human-readable tables
    ("arm", lambda r: r["arm"]),
    ("method", lambda r: r["method"]),
    ("bits", lambda r: r["bits"]),
    ("bits/elem", lambda r: r.get("bits_per_elem") or "-"),
    ("estimator", lambda r: r["estimator"]),
    ("hadamard", lambda r: r["hadamard"]),
    ("seeds", lambda r: str(r["seeds"])),
    ("pairs", lambda r: "-" if r.get("pairs") is None else str(r["pairs"])),
    ("val_loss (mean ± std)", _loss_cell),
    ("Δ BF16 [95% CI]", _delta_cell),
    ("verdict", lambda r: r.get("verdict") or "-"),
    ("align_mean", lambda r: _cell(r, "align_mean") or "-"),
    ("align_block0", lambda r: _cell(r, "align_block0") or "-"),
    ("mask_frac", lambda r: _cell(r, "mask_frac") or "-"),
    ("wall_s", lambda r: _cell(r, "wall_s") or "-"),
    ("status", lambda r: r["status"]),
)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for h, _ in DISPLAY) + " |", "|" + "|".join("---" for _ in DISPLAY) + "|"]
    lines += ["| " + " | ".join(cell(r) for _, cell in DISPLAY) + " |" for r in rows]
    return "\n".join(lines)


def text_table(rows: list[dict]) -> str:
    cells = [[h for h, _ in DISPLAY]] + [[cell(r) or "-" for _, cell in DISPLAY] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(DISPLAY))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def runs_table(jobs: list[dict]) -> str:
    cols = ("arm", "seed", "status", "val_loss", "delta_bf16", "align_mean", "mask_frac", "job")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(j, c) or "-" for c in cols) + " |" for j in jobs]
    return "\n".join(lines)


AQLM_NOTE = (
    "aqlm_* rows: additive vector quantization (AQLM) of the same checkpoint, calibrated on training batches "
    "(not data-free); its grid cell gives the bits per weight including codebooks and scales."
)


def write_markdown(
    rows: list[dict],
    jobs: list[dict],
    path: Path,
    sweep_dir: Path,
    figures: list[str],
    incomplete: str | None = None,
    planned: str | None = None,
) -> None:
    """``summary.md``: the completeness line first (``incomplete``, when the sweep is), what was run, the arm table,
    the legend, the per-job table and, with a plan, the table of every planned job (``planned``)."""
    from quest_pl.io import atomic_write_text

    header = what_was_run(jobs)
    n_seeds = max((r["seeds"] for r in rows), default=0)
    text = [f"**{incomplete}**", ""] if incomplete else []
    text += [f"# Sweep summary: `{sweep_dir}`", ""]
    text += [f"- **{label}**: {value}" for label, value in header]
    if n_seeds < 2:
        text += ["", "**1 seed: pipeline check**: one seed cannot rank arms; rerun with `seeds=[0,1,2]` for intervals."]
    text += [
        "",
        markdown_table(rows),
        "",
        "val_loss: final validation loss (nats/token), mean ± sample std over seeds. bits/elem: "
        "storage bits per element including scales (a 16-bit scale per row of d_model or per group; MXFP4/NVFP4 their "
        "8-bit E8M0/E4M3 group scales, NVFP4's per-tensor scale not counted). Δ BF16: paired "
        "difference to the BF16 arm of the same seed (same initialisation and data order), mean and 95 % Student-t "
        "interval over the seeds both finished (pairs: their number; every statistic of an arm uses the same paired "
        "seeds; an interval needs 2 pairs and some spread); 'not significant' when the interval contains 0. "
        "align_mean / align_block0: mean cosine "
        "of quantized vs full-precision gradient (whole model / block 0) over logged steps after step 0; mask_frac: "
        "mean fraction of masked gradient entries; ptq_* rows: data-free post-training quantization of each seed's "
        "BF16 checkpoint. A diverged run counts in `seeds` but not in the means.",
        # aqlm_* rows (quest_pl.ptq.sweep_configs): say they are calibrated, unlike the ptq_* rows
        *([AQLM_NOTE] if any(str(r.get("arm", "")).startswith("aqlm") for r in rows) else []),
        "",
        "## Runs (one row per job)",
        "",
        runs_table(jobs),
        "",
        *(["## Planned jobs (sweep.json)", "", planned, ""] if planned else []),
        "Figures (PDF and PNG): " + ", ".join(figures) + ".",
        "",
    ]
    atomic_write_text(path, "\n".join(text))
