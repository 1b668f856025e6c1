"""Statistics of a sweep's arms: one row per arm from its jobs, the paired difference to BF16 with a Student-t
interval (:func:`paired_summary`), computed over the same paired seeds for every statistic of the arm."""

from __future__ import annotations

import math

from scipy import stats

SINGLE_PAIR = "1 pair: pipeline check"
NO_SPREAD = "no spread: identical differences"


def mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def std(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (``scipy.stats.t``)."""
    if df < 1:
        raise ValueError(f"df={df}: expected an integer >= 1")
    return float(stats.t.ppf(p, df))


def paired_summary(diffs: list[float], level: float = 0.95) -> dict:
    """Mean, sample std, ``level`` t-interval and verdict of paired differences (one per seed). An interval needs at
    least 2 pairs (one pair: no interval, ``SINGLE_PAIR``); identical differences (zero spread) give a zero-width
    interval that says nothing about the seed-to-seed noise: no interval, ``NO_SPREAD``, never "significant"."""
    n = len(diffs)
    out = {"n": n, "mean": None, "std": None, "low": None, "high": None, "verdict": None}
    if n == 0:
        return out
    mean_ = sum(diffs) / n
    out["mean"] = mean_
    if n == 1:
        out["verdict"] = SINGLE_PAIR
        return out
    spread = math.sqrt(sum((d - mean_) ** 2 for d in diffs) / (n - 1))
    out["std"] = spread
    if spread == 0.0:
        out["verdict"] = NO_SPREAD
        return out
    half = t_quantile(0.5 + level / 2, n - 1) * spread / math.sqrt(n)
    out.update(low=mean_ - half, high=mean_ + half)
    out["verdict"] = "not significant" if out["low"] <= 0 <= out["high"] else "significant"
    return out


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


def deduplicate(jobs: list[dict]) -> list[dict]:
    """One job per (arm, seed, context): a re-run of the same job (a duplicate directory) is never counted twice. The
    job kept is the last finished one (highest job number among the ``ok`` ones, else the last); each kept job's
    ``_duplicates`` counts the others."""
    by_key: dict[tuple, list[dict]] = {}
    for j in jobs:
        by_key.setdefault((j["arm"], j["seed"], j["_context"]), []).append(j)
    kept = []
    for runs in by_key.values():
        ok = [r for r in runs if r["status"] == "ok"]
        keep = (ok or runs)[-1]
        keep["_duplicates"] = len(runs) - 1
        kept.append(keep)
    order = {id(j): i for i, j in enumerate(jobs)}
    return sorted(kept, key=lambda j: order[id(j)])


def group(jobs: list[dict]) -> list[dict]:
    """One row per arm (first-appearance order; arms split by :func:`split_variants`; duplicates dropped by
    :func:`deduplicate`). Where the sweep has a BF16 arm, every statistic of a quantized arm (mean loss, its std, the
    paired difference and its interval, alignment, masks, time) is over the same seeds: those both the arm and the
    BF16 run of the same seed and context finished (``pairs``; with none, its own finished seeds); ``seeds`` counts
    the arm's jobs."""
    split_variants(jobs)
    jobs[:] = deduplicate(jobs)
    base = {
        (j["seed"], j["_context"]): j["val_loss"] for j in jobs if j["method"] == "BF16" and j["val_loss"] is not None
    }
    has_reference = any(j["method"] == "BF16" for j in jobs)
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
        bad = [r["status"] for r in runs if r["status"] != "ok"]
        row = {k: runs[0].get(k) for k in ("arm", "method", "grid", "bits", "bits_per_elem", "estimator", "hadamard")}
        row["status"] = "ok" if not bad else ", ".join(f"{s} {bad.count(s)}/{len(runs)}" for s in dict.fromkeys(bad))
        paired = [r for r in ok if r["delta_bf16"] is not None] if row["method"] != "BF16" and has_reference else ok
        paired = paired or ok  # no BF16 run to pair with (pairs 0): the arm's own seeds, without a difference
        row["seeds"] = len(runs)
        row["pairs"] = len(paired) if row["method"] != "BF16" and has_reference else None
        row["_seeds"] = [r["seed"] for r in paired]
        row["val_loss"] = mean(r["val_loss"] for r in paired)
        row["val_loss_std"] = std([r["val_loss"] for r in paired])
        row["val_ppl"] = math.exp(row["val_loss"]) if row["val_loss"] is not None else None
        summary = paired_summary([r["delta_bf16"] for r in paired if r["delta_bf16"] is not None])
        row.update(
            delta_bf16=summary["mean"],
            delta_std=summary["std"],
            delta_ci_low=summary["low"],
            delta_ci_high=summary["high"],
            verdict=summary["verdict"],
        )
        if row["method"] == "BF16":
            row["verdict"] = "reference"
        for key in ("align_mean", "align_block0", "mask_frac", "wall_s", "tokens_per_s"):
            row[key] = mean(r.get(key) for r in paired)
        row["steps"] = max((r["steps"] for r in runs if r.get("steps") is not None), default=None)
        row["_runs"] = runs
        rows.append(row)
    return rows
