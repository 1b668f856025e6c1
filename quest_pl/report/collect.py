"""Reading a sweep directory: one record per finished job (final metrics, config, the curves the figures need), the
PTQ rows of each seed's BF16 checkpoint, and the grid/bits/estimator columns of a ``quant`` group."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

from omegaconf import OmegaConf

from quest_pl.config import ConfigError
from quest_pl.report.statistics import mean as _mean
from quest_pl.sweep_plan import JOB_DIR

log = logging.getLogger(__name__)

LAYER_ORDER = ("attn.c_attn", "attn.c_proj", "mlp.w12", "mlp.c_proj")
STATUSES = ("ok", "diverged", "failed")


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
    """Every scalar of a run: tag -> [(step, value), ...] in step order, from the run's own metrics log
    (:mod:`quest_pl.callbacks.metrics_log`, written whatever the Lightning logger), or from its TensorBoard event
    files for a run written before the log existed (and for PTQ evaluations)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from quest_pl.callbacks.metrics_log import read_metrics_log

    series = read_metrics_log(run_dir)
    if series is not None:
        return series

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
            r["_job_dir"] = where / "ptq" / r["arm"]  # quest_pl.ptq._sweep_row's run directory
            out.append(r)
    return out
