"""Sweep report: one row per arm of a multirun directory (mean over seeds, paired difference to BF16 with a 95 %
confidence interval), as ``summary.csv``, ``summary.md``, ``runs.csv`` (one row per job) and figures (PDF and PNG).

Run automatically when an experiment's multirun ends (:class:`quest_pl.sweep.SweepReport`), or again on an existing
sweep directory::

    python -m quest_pl.report multirun/2026-11-22_16-30-00 [--no-ptq]

Each job directory ``<num>_<arm>_s<seed>`` (or ``<num>_<arm>`` from older sweeps, e.g. ``-m seed=0,1``: the seed is
read from the job's config) holds ``metrics.json`` (final metrics; ``"status"``: ``ok``, ``diverged`` or ``failed``,
a missing status counts as ok), ``.hydra/config.yaml`` (what the job trained) and ``metrics.jsonl`` (every logged
scalar, whatever the logger: :mod:`quest_pl.callbacks.metrics_log`; older runs: ``tensorboard/``). The sweep's plan,
``sweep.json`` (:mod:`quest_pl.sweep_plan`), lists every planned job: the report names those not finished
(:mod:`quest_pl.report.completeness`). Jobs are grouped by arm (:mod:`quest_pl.report.statistics`; a repeated arm
and seed counts once). Columns of ``summary.csv``:

* ``status``: ``ok``, or ``<status> k/n`` per status (diverged, failed); ``seeds``: the arm's jobs; ``pairs``: the
  seeds both the arm and the BF16 run of that seed finished. Every statistic below is over those paired seeds (the
  arm's own finished seeds without a BF16 arm or without any pair);
* ``val_loss``, ``val_loss_std``: mean and sample standard deviation of the final validation loss (nats/token);
  ``val_ppl``: exp of the mean loss;
* ``delta_bf16``, ``delta_std``, ``delta_ci_low``, ``delta_ci_high``: the **paired** difference to the BF16 arm (same
  seed: same initialisation and data order), d_s = loss(arm, s) - loss(BF16, s): mean, standard deviation, and the
  95 % Student-t interval mean +- t(0.975, n - 1) std / sqrt(n) (``scipy.stats.t``); ``verdict``: ``significant`` /
  ``not significant`` (the interval contains 0) / ``1 pair: pipeline check`` / ``no spread: identical differences``
  (no interval: it needs 2 pairs and a non-zero spread);
* ``align_mean``: cosine of the quantized and full-precision gradients over the whole model (``align/model``,
  METHOD.md §4.2), mean over logged steps after step 0 and over seeds; ``align_block0``: the same for block 0;
* ``mask_frac``: fraction of entries whose gradient the estimator masks (``mask/frac/*``), mean over layers, operands,
  logged steps and seeds;
* ``wall_s``, ``tokens_per_s``, ``steps``: mean job wall time, mean logged throughput, final step.

Rows named ``ptq_*`` are data-free post-training quantizations of each seed's BF16 checkpoint at the quantized arms'
formats (grid, bits, groups, scale rule, Hadamard block; one row per distinct format:
:func:`quest_pl.ptq.sweep_configs`), evaluated on the same validation batches, and paired with that seed's BF16; their
``bits_per_elem`` counts the scales as a QAT arm's does.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from quest_pl.config import ConfigError
from quest_pl.report.collect import collect, describe_quant, ptq_jobs, read_metrics, read_scalars
from quest_pl.report.completeness import incomplete_line, jobs_table, planned_jobs, unfinished_lines
from quest_pl.report.statistics import group, paired_summary, t_quantile
from quest_pl.report.tables import RUN_COLUMNS, text_table, what_was_run, write_csv, write_markdown

__all__ = ["collect", "describe_quant", "group", "main", "paired_summary", "ptq_jobs", "read_metrics",
           "read_scalars", "t_quantile", "write_report", "write_tensorboard_hparams"]  # fmt: skip

log = logging.getLogger(__name__)


def write_tensorboard_hparams(jobs: list[dict]) -> list[Path]:
    """TensorBoard's hparams tab for the whole sweep (:func:`quest_pl.hparams.write_sweep_hparams`): each job (PTQ
    runs included) lists its arm, its seed and the keys that differ across the jobs. A trained job's keys are its
    ``model``/``optim``/``data``/``quant``/``trainer`` config; a PTQ run's are its ``ptq.*`` setting and the config of
    the BF16 run it quantized (without ``quant.*``). Returns the event files written."""
    from quest_pl import hparams

    base = {j["seed"]: j for j in jobs if j["method"] == "BF16" and j.get("_config")}
    entries, tb_dirs = [], []
    for j in jobs:
        job_dir = j.get("_job_dir")
        if job_dir is None:
            continue
        if j["method"] == "PTQ":
            try:
                settings = json.loads((job_dir / "metrics.json").read_text()).get("ptq") or {}
            except (OSError, ValueError):
                continue
            cfg = base[j["seed"]]["_config"] if j["seed"] in base else {}
            values = {k: v for k, v in hparams.config_values(cfg).items() if not k.startswith("quant.")}
            values |= hparams.flatten(settings, "ptq")
        else:
            values = hparams.config_values(j.get("_config") or {})
        entries.append(
            {"arm": j["arm"], "seed": j["seed"], "kind": "ptq" if j["method"] == "PTQ" else "train", "values": values}
        )
        tb_dirs.append(Path(job_dir) / "tensorboard")
    return hparams.write_sweep_hparams(tb_dirs, hparams.sweep_values(entries))


def write_report(sweep_dir: str | Path, echo: bool = False, ptq: bool = True) -> list[dict]:
    """Collect every finished job of ``sweep_dir`` and write ``summary.csv``, ``summary.md``, ``runs.csv`` and the
    figures there. With ``ptq``, add the PTQ rows of each seed's BF16 arm. Returns the arm rows."""
    from quest_pl.callbacks.figures import sweep_figures
    from quest_pl.sweep_plan import register_resolvers

    register_resolvers()
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"{str(sweep_dir)!r}: no such sweep directory")
    planned = planned_jobs(sweep_dir)
    incomplete = incomplete_line(sweep_dir, planned)
    jobs = [j for j in collect(sweep_dir) if j["status"] != "failed"]  # a failed job is listed with the plan
    if not jobs:
        if incomplete:
            print(incomplete, file=sys.stderr)
        raise ConfigError(f"{str(sweep_dir)!r}: no finished job (no <num>_<arm>_s<seed>/metrics.json)")
    if ptq:
        jobs += ptq_jobs(jobs, sweep_dir)
    rows = group(jobs)
    tensorboard = write_tensorboard_hparams(jobs)
    write_csv(rows, sweep_dir / "summary.csv")
    write_csv(jobs, sweep_dir / "runs.csv", RUN_COLUMNS)
    figures = [p.name for p in sweep_figures(rows, sweep_dir) if p.suffix == ".png"]
    write_markdown(
        rows, jobs, sweep_dir / "summary.md", sweep_dir, [f.removesuffix(".png") for f in figures],
        incomplete=incomplete, planned=jobs_table(planned) if planned else None,
    )  # fmt: skip
    if echo:
        header = "\n".join(f"  {label}: {value}" for label, value in what_was_run(jobs))
        top = f"{incomplete}\n" + "\n".join(unfinished_lines(planned)) + "\n" if incomplete else ""
        print(f"\n{top}Sweep summary ({sweep_dir}):\n{header}\n\n{text_table(rows)}\n")
        print(f"wrote {sweep_dir / 'summary.csv'}, summary.md, runs.csv, " + ", ".join(figures) + " (and PDFs)")
        print(f"TensorBoard hparams of {len(tensorboard)} runs: arm, seed and the keys that differ across them")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quest_pl.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a multirun directory (with <num>_<arm>_s<seed>/ job directories)")
    parser.add_argument("--no-ptq", action="store_true", help="skip the post-training-quantization rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        write_report(args.sweep_dir, echo=True, ptq=not args.no_ptq)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
