"""Sweep report: one row per arm of a multirun directory (mean over seeds, paired difference to BF16 with a 95 %
confidence interval), as ``summary.csv``, ``summary.md``, ``runs.csv`` (one row per job) and figures (PDF and PNG).

Run automatically when an experiment's multirun ends (:class:`quest_pl.sweep.SweepReport`), or again on an existing
sweep directory::

    python -m quest_pl.report multirun/2026-11-22_16-30-00 [--no-ptq]

Each job directory ``<num>_<arm>_s<seed>`` (or ``<num>_<arm>`` from older sweeps, e.g. ``-m seed=0,1``: the seed is
read from the job's config) holds ``metrics.json`` (final metrics; ``"status": "diverged"`` for a run that diverged, a
missing status counts as ok), ``.hydra/config.yaml`` (what the job trained) and ``tensorboard/``. Jobs are grouped by
arm. Columns of ``summary.csv``:

* ``seeds``: number of seeds with a finished job; ``status``: ``ok``, ``diverged`` or ``diverged k/n`` (seeds);
* ``val_loss``, ``val_loss_std``: mean and sample standard deviation over the arm's non-diverged seeds of the final
  validation loss (nats/token); ``val_ppl``: exp of the mean loss;
* ``delta_bf16``, ``delta_std``, ``delta_ci_low``, ``delta_ci_high``: the **paired** difference to the BF16 arm (same
  seed: same initialisation and data order), d_s = loss(arm, s) - loss(BF16, s) over the seeds both finished without
  diverging: mean, standard deviation, and the 95 % Student-t interval mean +- t(0.975, n - 1) std / sqrt(n);
  ``verdict``: ``significant`` / ``not significant`` (the interval contains 0) / ``1 seed: pipeline check`` (no
  interval from one seed);
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
import datetime
import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from quest_pl.config import ConfigError

log = logging.getLogger(__name__)

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
JOB_DIR = re.compile(r"^(\d+)_(.+?)(?:_s(\d+))?$")
LAYER_ORDER = ("attn.c_attn", "attn.c_proj", "mlp.w12", "mlp.c_proj")
STATUSES = ("ok", "diverged")
SINGLE_SEED = "1 seed: pipeline check"


# -- statistics -----------------------------------------------------------------------------------------------------
def t_two_sided_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` >= 1, exact (Abramowitz & Stegun 26.7.3-4): with
    theta = atan(t / sqrt(df)), odd df: (2/pi)(theta + sin(theta) sum_k c_k cos^(2k-1)(theta)), c_1 = 1,
    c_k = c_(k-1) (2k-2)/(2k-1); even df: sin(theta) sum_k d_k cos^(2k)(theta), d_0 = 1, d_k = d_(k-1)(2k-1)/(2k)."""
    if df < 1:
        raise ValueError(f"df={df}: expected an integer >= 1")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:
        total, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c * c * (2 * k) / (2 * k + 1)
        return (2 / math.pi) * (theta + s * total) if df > 1 else 2 * theta / math.pi
    total, term = 0.0, 1.0
    for k in range(df // 2):
        total += term
        term *= c * c * (2 * k + 1) / (2 * k + 2)
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p in (1/2, 1)) of Student's t with ``df`` degrees of freedom, by bisection of the exact CDF
    to 1e-12 (no scipy needed). ``t_quantile(0.975, 2)`` = 4.3027."""
    if not 0.5 < p < 1:
        raise ValueError(f"p={p}: expected 0.5 < p < 1")
    target = 2 * p - 1
    lo, hi = 0.0, 1.0
    while t_two_sided_cdf(hi, df) < target:
        hi *= 2
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_cdf(mid, df) < target else (lo, mid)
    return (lo + hi) / 2


def paired_summary(diffs: list[float], level: float = 0.95) -> dict:
    """Mean, sample std, ``level`` t-interval and verdict of paired differences (one per seed). One difference: no
    interval (``SINGLE_SEED``); none: every field None."""
    n = len(diffs)
    out = {"n": n, "mean": None, "std": None, "low": None, "high": None, "verdict": None}
    if n == 0:
        return out
    mean = sum(diffs) / n
    out["mean"] = mean
    if n == 1:
        out["verdict"] = SINGLE_SEED
        return out
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    out.update(std=std, low=mean - half, high=mean + half)
    out["verdict"] = "not significant" if out["low"] <= 0 <= out["high"] else "significant"
    return out


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
    """The arm of a job directory: ``3_quest_w4a4_s1`` -> ``quest_w4a4``."""
    m = JOB_DIR.match(job_dir.name)
    return m.group(2) if m else job_dir.name


def load_config(job_dir: Path) -> dict:
    """A job's resolved ``.hydra/config.yaml`` ({} when absent)."""
    path = job_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    cfg = OmegaConf.load(path)
    return OmegaConf.to_container(cfg, resolve=True) or {}


def load_quant(job_dir: Path) -> dict:
    """The ``quant`` group a job trained with (resolved), from its ``.hydra/config.yaml``."""
    return load_config(job_dir).get("quant") or {}


def read_metrics(job_dir: Path) -> dict:
    """``metrics.json`` of a job, checked: a malformed file is a one-line :class:`ConfigError` naming it."""
    path = job_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: malformed metrics.json ({type(e).__name__}: {e})") from None
    if not isinstance(metrics, dict):
        raise ConfigError(f"{path}: malformed metrics.json (expected a JSON object)")
    status = metrics.get("status", "ok")
    if status not in STATUSES:
        raise ConfigError(f"{path}: status={status!r}: expected one of {', '.join(STATUSES)}")
    loss = metrics.get("val/loss")
    if status == "ok" and not (isinstance(loss, (int, float)) and math.isfinite(loss)):
        raise ConfigError(f"{path}: malformed metrics.json (status ok but val/loss={loss!r})")
    return metrics


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


def _std(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


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
    if q.get("hadamard") and int(q.get("hadamard_block") or 128) != 128:  # block-scaled formats rotate per group
        hadamard += f", block {int(q['hadamard_block'])}"
    if q.get("backward") not in (None, "none"):  # a quantized backward is part of the arm's gradient estimator
        estimator += f", {q['backward']} backward"
        fmt, operands = q.get("backward_format") or "nvfp4", q.get("backward_operands") or "grad"
        if (fmt, operands) != ("nvfp4", "grad"):  # named where not the default: "sr backward (mxfp4, all)"
            estimator += f" ({fmt}, {operands})"
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


def _after_step0(points) -> list[float]:
    """Values logged after step 0 (step 0 is the untrained model: no estimator has acted yet)."""
    return [v for s, v in points if s > 0]


def collect(sweep_dir: Path) -> list[dict]:
    """One record per finished job: the per-job row plus the curves the figures need (keys starting with ``_``)."""
    jobs = []
    for job in job_dirs(sweep_dir):
        metrics = read_metrics(job)
        cfg = load_config(job)
        quant = cfg.get("quant") or {}
        m = JOB_DIR.match(job.name)
        seed = cfg.get("seed", int(m.group(3)) if m and m.group(3) else 0)
        row = {"arm": arm_name(job), "seed": seed, "job": job.name, **describe_quant(quant)}
        row["bits_per_elem"] = _bits_per_element(job, quant)
        row["status"] = metrics.get("status", "ok")
        ok = row["status"] == "ok"
        row["val_loss"] = metrics.get("val/loss") if ok else None
        row["val_ppl"] = metrics.get("val/ppl") if ok else None
        scalars = read_scalars(job)
        if row["method"] == "BF16":  # its "quantized" and full-precision gradients are the same: nothing to show
            scalars = {k: v for k, v in scalars.items() if not k.startswith(("align/", "mask/"))}
        row["align_mean"] = _mean(_after_step0(scalars.get("align/model", [])))
        row["align_block0"] = _mean(_after_step0(scalars.get("align/block/0", [])))
        mask_by_op: dict[str, dict[int, list[float]]] = {"weight": {}, "act": {}}
        for tag, points in scalars.items():
            if tag.startswith("mask/frac/"):
                op = tag.rpartition("/")[2]
                for step, v in points:
                    mask_by_op.setdefault(op, {}).setdefault(step, []).append(v)
        row["_mask_curves"] = {op: sorted((s, _mean(vs)) for s, vs in by.items()) for op, by in mask_by_op.items()}
        row["mask_frac"] = _mean(v for curve in row["_mask_curves"].values() for _, v in curve)
        expected = _mean(v for _, v in scalars.get("mask/expected", []))
        expected_act = _mean(v for _, v in scalars.get("mask/expected/act", []))
        row["_mask_expected"] = {"weight": expected, "act": expected_act if expected_act is not None else expected}
        row["wall_s"] = metrics.get("wall_s")
        throughput = [v for _, v in scalars.get("train/tokens_per_sec", [])]
        row["tokens_per_s"] = _mean(throughput) if throughput else metrics.get("train/tokens_per_sec")
        row["steps"] = metrics.get("step")
        row["_val_curve"] = scalars.get("val/loss", [])
        row["_train_curve"] = scalars.get("train/loss", [])
        row["_align_depth"] = {}
        for operand, prefix in (("weight", "align/"), ("act", "align/act/")):
            layers = sorted(
                (t[len(prefix) + len("row_mean/") :] for t in scalars if t.startswith(prefix + "row_mean/")),
                key=_layer_key,
            )
            depth = [
                (
                    layer,
                    _mean(_after_step0(scalars[f"{prefix}row_mean/{layer}"])),
                    _mean(_after_step0(scalars.get(f"{prefix}row_std/{layer}", []))),
                    _mean(_after_step0(scalars.get(f"{prefix}cos/{layer}", []))),
                )
                for layer in layers
            ]
            # a run shorter than the alignment interval logged step 0 only: no layer has a value to show
            row["_align_depth"][operand] = [entry for entry in depth if entry[1] is not None]
        row["_job_dir"] = job
        row["_quant"] = quant
        row["_config"] = cfg
        row["_metrics"] = metrics
        jobs.append(row)
    return jobs


def ptq_jobs(jobs: list[dict], sweep_dir: Path) -> list[dict]:
    """PTQ rows (:func:`quest_pl.ptq.sweep_rows`) of each seed's BF16 checkpoint, as per-job records. The first
    BF16 seed's evaluations live in ``<sweep>/ptq/``, another seed's in ``<sweep>/ptq_s<seed>/ptq/``."""
    from quest_pl.ptq import sweep_rows

    quantized = [j for j in jobs if j["method"] == "QAT"]
    out = []
    bf16 = [j for j in jobs if j["method"] == "BF16" and j["status"] == "ok"]
    for i, base in enumerate(bf16):
        where = sweep_dir if i == 0 else sweep_dir / f"ptq_s{base['seed']}"
        for r in sweep_rows([base, *quantized], where):
            r.update(seed=base["seed"], job=f"{base['job']} + {r['arm']}", status="ok")
            r["_job_dir"] = where / "ptq" / r["arm"]  # quest_pl.ptq.rows._sweep_row's run directory
            out.append(r)
    return out


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


def split_variants(jobs: list[dict]) -> None:
    """Jobs of one arm name whose settings differ (a sweep over ``quant.clip_scale=1,1.3`` or ``optim.lr=...``) are
    different arms, not seeds of one: each gets the differing keys in its arm label, ``quest_w4a4 [optim.lr=0.001]``.
    And each job's ``_context`` holds its values of the non-``quant`` keys that differ across the whole sweep, so that
    it is paired with the BF16 run of the same seed *and* the same context (:func:`group`)."""
    from quest_pl.hparams import config_values, differing_keys

    settings = [config_values(j.get("_config") or {}) for j in jobs]
    context = [k for k in differing_keys(settings) if not k.startswith("quant.")]
    for j, s in zip(jobs, settings):
        j["_context"] = tuple(repr(s.get(k)) for k in context)
    by_arm: dict[str, list[int]] = {}
    for i, j in enumerate(jobs):
        by_arm.setdefault(j["arm"], []).append(i)
    for indices in by_arm.values():
        keys = differing_keys([settings[i] for i in indices])
        if not keys:
            continue
        for i in indices:
            values = ", ".join(f"{k}={settings[i].get(k, '-')}" for k in keys)
            jobs[i]["arm"] = f"{jobs[i]['arm']} [{values}]"


def group(jobs: list[dict]) -> list[dict]:
    """One row per arm (first-appearance order; arms split by :func:`split_variants`): means over seeds and the paired
    difference to the BF16 run of the same seed and context."""
    split_variants(jobs)
    base = {
        (j["seed"], j["_context"]): j["val_loss"] for j in jobs if j["method"] == "BF16" and j["val_loss"] is not None
    }
    for j in jobs:
        ref = base.get((j["seed"], j["_context"]))
        j["delta_bf16"] = None if j["val_loss"] is None or ref is None else j["val_loss"] - ref
    arms: dict[str, list[dict]] = {}
    for j in jobs:
        arms.setdefault(j["arm"], []).append(j)
    rows = []
    for runs in arms.values():
        runs = sorted(runs, key=lambda r: r["seed"])
        ok = [r for r in runs if r["status"] == "ok"]
        diverged = len(runs) - len(ok)
        row = {k: runs[0].get(k) for k in ("arm", "method", "grid", "bits", "bits_per_elem", "estimator", "hadamard")}
        row["status"] = "ok" if not diverged else ("diverged" if not ok else f"diverged {diverged}/{len(runs)}")
        row["seeds"] = len(runs)
        row["_seeds"] = [r["seed"] for r in runs]
        row["val_loss"] = _mean(r["val_loss"] for r in ok)
        row["val_loss_std"] = _std([r["val_loss"] for r in ok])
        row["val_ppl"] = math.exp(row["val_loss"]) if row["val_loss"] is not None else None
        stats = paired_summary([r["delta_bf16"] for r in ok if r["delta_bf16"] is not None])
        row.update(
            delta_bf16=stats["mean"],
            delta_std=stats["std"],
            delta_ci_low=stats["low"],
            delta_ci_high=stats["high"],
            verdict=stats["verdict"],
        )
        if row["method"] == "BF16":
            row["verdict"] = "reference"
        for key in ("align_mean", "align_block0", "mask_frac", "wall_s", "tokens_per_s"):
            row[key] = _mean(r.get(key) for r in runs)
        row["steps"] = max((r["steps"] for r in runs if r.get("steps") is not None), default=None)
        row["_runs"] = runs
        rows.append(row)
    return rows


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


def what_was_run(jobs: list[dict]) -> list[tuple[str, str]]:
    """(label, value) lines for the top of ``summary.md``: model size, tokens, seeds, steps, data, date, commit."""
    trained = [j for j in jobs if j.get("_config")]
    if not trained:
        return []
    cfg, metrics = trained[0]["_config"], trained[0]["_metrics"]
    model, data, trainer = cfg.get("model", {}), cfg.get("data", {}), cfg.get("trainer", {})
    steps = max((j["steps"] for j in trained if j.get("steps") is not None), default=None)
    devices = trainer.get("devices")
    world = (devices if isinstance(devices, int) else 1) * (trainer.get("num_nodes") or 1)
    per_step = (
        (data.get("batch_size") or 0) * (model.get("seq_len") or 0) * (trainer.get("accumulate_grad_batches") or 1)
    )
    per_step *= world
    params = metrics.get("non_embedding_params")
    tokens = steps * per_step if steps is not None else None
    source = data.get("source", "?")
    source += {"hub": f" {data.get('name')}", "text_file": f" {data.get('path')}"}.get(source, "")
    finished = [datetime.datetime.fromtimestamp((j["_job_dir"] / "metrics.json").stat().st_mtime) for j in trained]
    seeds = sorted({j["seed"] for j in trained})
    shape = f"{model.get('n_layer')} x {model.get('d_model')} (heads {model.get('n_head')}, seq {model.get('seq_len')})"
    size = f"{params / 1e6:.2f} M non-embedding parameters" if params else "non-embedding parameters not recorded"
    if tokens is not None:
        devices = f", {world} devices" if world > 1 else ""
        tokens_text = f"{tokens:,} seen ({steps} steps x {per_step:,} tokens/step{devices})"
    else:
        tokens_text = "unknown"
    n = len(seeds)
    seeds_text = f"{', '.join(map(str, seeds))} ({n} seed{'s' if n != 1 else ''}" + (
        ": a pipeline check, no confidence intervals)" if n == 1 else ", arms paired by seed)"
    )
    lines = [
        ("model", f"{shape}, {size}"),
        ("tokens", tokens_text),
        ("tokens per parameter", f"{tokens / params:.1f}" if tokens and params else "unknown"),
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


def write_markdown(rows: list[dict], jobs: list[dict], path: Path, sweep_dir: Path, figures: list[str]) -> None:
    from quest_pl.io import atomic_write_text

    header = what_was_run(jobs)
    n_seeds = max((r["seeds"] for r in rows), default=0)
    text = [f"# Sweep summary: `{sweep_dir}`", ""]
    text += [f"- **{label}**: {value}" for label, value in header]
    if n_seeds < 2:
        text += ["", f"**{SINGLE_SEED}**: one seed cannot rank arms; rerun with `seeds=[0,1,2]` for intervals."]
    text += [
        "",
        markdown_table(rows),
        "",
        "val_loss: final validation loss (nats/token), mean ± sample std over seeds. bits/elem: "
        "storage bits per element including scales (a 16-bit scale per row of d_model or per group; MXFP4/NVFP4 their "
        "8-bit E8M0/E4M3 group scales, NVFP4's per-tensor scale not counted). Δ BF16: paired "
        "difference to the BF16 arm of the same seed (same initialisation and data order), mean and 95 % Student-t "
        "interval over seeds; 'not significant' when the interval contains 0. align_mean / align_block0: mean cosine "
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
        "Figures (PDF and PNG): " + ", ".join(figures) + ".",
        "",
    ]
    atomic_write_text(path, "\n".join(text))


def write_report(sweep_dir: str | Path, echo: bool = False, ptq: bool = True) -> list[dict]:
    """Collect every finished job of ``sweep_dir`` and write ``summary.csv``, ``summary.md``, ``runs.csv`` and the
    figures there. With ``ptq``, add the PTQ rows of each seed's BF16 arm. Returns the arm rows."""
    from quest_pl.callbacks.figures import sweep_figures
    from quest_pl.config.names import register_resolvers

    register_resolvers()
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"{str(sweep_dir)!r}: no such sweep directory")
    jobs = collect(sweep_dir)
    if not jobs:
        raise ConfigError(f"{str(sweep_dir)!r}: no finished job (no <num>_<arm>_s<seed>/metrics.json)")
    if ptq:
        jobs += ptq_jobs(jobs, sweep_dir)
    rows = group(jobs)
    tensorboard = write_tensorboard_hparams(jobs)
    write_csv(rows, sweep_dir / "summary.csv")
    write_csv(jobs, sweep_dir / "runs.csv", RUN_COLUMNS)
    figures = [p.name for p in sweep_figures(rows, sweep_dir) if p.suffix == ".png"]
    write_markdown(rows, jobs, sweep_dir / "summary.md", sweep_dir, [f.removesuffix(".png") for f in figures])
    if echo:
        header = "\n".join(f"  {label}: {value}" for label, value in what_was_run(jobs))
        print(f"\nSweep summary ({sweep_dir}):\n{header}\n\n{text_table(rows)}\n")
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
