"""The scaling-law study: runs in, ``scaling.json``, ``scaling.md`` and figures out (docs/METHOD.md §9).

:func:`fit_runs` fits a law with intervals and returns the summary (the content of ``scaling.json``);
:func:`write_study` writes it. The CLI (``python -m quest_pl.scaling fit``) and the end of an ``experiment=scaling_law``
sweep (:func:`sweep_study`) both go through them, so refitting a sweep directory gives the same numbers.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from quest_pl.scaling import frontier as fr
from quest_pl.scaling.bootstrap import bootstrap
from quest_pl.scaling.data import InputError, Runs, read_inputs
from quest_pl.scaling.fit import MAXITER, STARTS, NotConverged, Problem, fit
from quest_pl.scaling.laws import LAWS, make_law

log = logging.getLogger(__name__)

FORMULA = {
    "quest": "L(N, D, P) = A / (N eff(P))^alpha + B / D^beta + E",
    "quartet": "L(N, D, P) = ((A / (N eff(P)))^alpha + (B / (D eff_data(P)))^beta)^gamma + E",
}


@dataclass
class Options:
    """Settings of a study; the same defaults in the CLI and the ``scaling`` block of ``experiment=scaling_law``."""

    law: str = "quest"
    bootstrap: int = 200  # replicates (0: no intervals)
    seed: int = 0  # the bootstrap's generator
    reference: str = "bf16"  # the precision with eff = 1
    tokens_per_param: float | None = None  # of the frontier; None: the median D/N of the reference's runs

    def check(self) -> None:
        """Raise :class:`InputError` naming the first bad setting."""
        if self.law not in LAWS:
            raise InputError(f"law={self.law!r}: expected one of {', '.join(LAWS)}")
        for key in ("bootstrap", "seed"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InputError(f"{key}={value!r}: expected an integer >= 0")
        if not isinstance(self.reference, str) or not self.reference:
            raise InputError(f"reference={self.reference!r}: expected a precision name, e.g. bf16")
        r = self.tokens_per_param
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not np.isfinite(r) or r <= 0):
            raise InputError(f"tokens_per_param={r!r}: expected null or a number > 0")


def check_settings(block, multirun: bool = True) -> None:
    """The ``scaling`` block of a sweep's config (``experiment=scaling_law``), as a one-line
    :class:`quest_pl.config.ConfigError` naming the key."""
    from omegaconf import OmegaConf

    from quest_pl.config import ConfigError

    if not multirun:
        raise ConfigError(
            "scaling: the scaling-law study is a sweep (experiment=scaling_law); run it without hydra.mode=RUN"
        )
    settings = OmegaConf.to_container(block, resolve=True) if OmegaConf.is_config(block) else dict(block)
    label = settings.pop("pipeline_check", None)
    if label is not None and not isinstance(label, str):
        raise ConfigError(f"scaling.pipeline_check={label!r}: expected null or a text")
    known = {f.name for f in fields(Options)}
    for key in settings:
        if key not in known:
            raise ConfigError(f"scaling.{key}: unknown key (known: {', '.join(sorted(known | {'pipeline_check'}))})")
    try:
        Options(**settings).check()
    except InputError as e:
        raise ConfigError(f"scaling.{e}") from None


def check_runs(runs: Runs, options: Options, strict: bool = True) -> Runs:
    """The runs a fit can use: the reference present, every precision with at least 2 runs (``strict``: else an
    :class:`InputError`; not strict: the precision is left out with a note), at least as many runs as parameters."""
    names = runs.precisions()
    if options.reference not in names:
        raise InputError(
            f"no runs of the reference precision {options.reference!r} (eff = 1), found: {', '.join(names)}"
        )
    single = [p for p in names if runs.precision.count(p) < 2]
    if single and strict:
        where = runs.source[runs.precision.index(single[0])]
        raise InputError(f"precision {single[0]!r} has one run ({where}): its efficiency needs at least 2")
    if single:
        keep = [i for i, p in enumerate(runs.precision) if p not in single]
        runs = runs.subset(keep)
        runs.notes.append(f"left out, one run each (an efficiency needs at least 2): {', '.join(single)}")
        if options.reference in single:
            raise InputError(f"the reference precision {options.reference!r} has one run: a fit needs at least 2")
    law = make_law(options.law, len(runs.precisions()), 0)
    if len(runs) < law.n_theta:
        raise InputError(
            f"{len(runs)} runs for {law.n_theta} parameters of the {options.law} law over {len(runs.precisions())} "
            "precisions: a fit needs at least as many runs as parameters"
        )
    return runs


def fit_runs(runs: Runs, options: Options, maxiter: int = MAXITER, starts: int = STARTS) -> dict:
    """Fit, bootstrap and frontier of checked runs: the ``scaling.json`` summary. Raises :class:`NotConverged`."""
    names = runs.precisions()
    idx = np.array([names.index(p) for p in runs.precision])
    law = make_law(options.law, len(names), names.index(options.reference))
    log_n, log_d, log_loss = runs.arrays()
    problem = Problem(law, log_n, log_d, log_loss, idx)
    result = fit(problem, starts=starts, maxiter=maxiter)
    if not result.converged:
        raise NotConverged(f"the fit did not converge: {result.message}")
    theta = problem.to_law(result.theta)
    boot = bootstrap(problem, result, options.bootstrap, options.seed)
    bits = [runs.bits_of(p) for p in names]
    ratio = options.tokens_per_param
    if ratio is None:  # the reference runs' own tokens per parameter
        ratio = float(np.median(np.exp(log_d - log_n)[idx == law.ref]))
    memory = fr.memory_grid(np.array(runs.params) * np.array(runs.bits))
    segs = fr.segments(fr.frontier(law, theta, bits, memory, ratio)[1], memory)

    summary = {"law": law.name, "formula": FORMULA[law.name], "params": law.natural(theta)}
    replicas = [law.natural(t) for t in boot.thetas]
    summary["params_ci"] = {k: _ci(boot, [r[k] for r in replicas]) for k in summary["params"]}
    for k, key in enumerate(law.efficiencies):
        reps = np.exp(np.array([law.log_eff(t, k) for t in boot.thetas]).reshape(len(boot.thetas), len(names)))
        summary[key] = dict(zip(names, map(float, np.exp(law.log_eff(theta, k)))))
        summary[f"{key}_ci"] = {p: _ci(boot, reps[:, i]) for i, p in enumerate(names)}
    summary["bits"] = dict(zip(names, bits))
    summary["eff_per_bit"] = {p: summary["eff"][p] * 16 / b for p, b in zip(names, bits)}  # the paper's eff(P) 16 / P
    labels = list(law.shared) + names_of_eff(law, names)
    summary["objective"] = result.objective
    summary["n_runs"] = len(runs)
    summary["n_parameters"] = law.n_theta
    summary["converged"] = True
    summary["optimizer"] = {
        "message": result.message,
        "starts": len(result.starts),
        "start_objectives": result.starts,
        "at_bounds": [labels[i] for i in result.at_bounds],
    }
    summary["bootstrap"] = {
        "replicates": boot.replicates,
        "failed": boot.failed,
        "seed": boot.seed,
        "level": boot.level,
        "unit": "configurations within each precision, then seeds within each configuration",
    }
    summary["frontier"] = {
        "tokens_per_param": ratio,
        "optimal": [{"precision": names[p], "bits": bits[p], "from_bits": a, "to_bits": b} for p, a, b in segs],
        "answer": fr.answer(names, bits, segs, ratio),
    }
    columns = ("precision", "params", "tokens", "loss", "bits", "seed", "source")
    summary["runs"] = [dict(zip(columns, row)) for row in zip(*(getattr(runs, c) for c in columns))]
    summary["notes"] = list(runs.notes)
    return summary


def _ci(boot, values) -> list[float] | None:
    """The bootstrap interval of per-replicate ``values``; None without replicates."""
    return None if not boot.replicates else boot.interval(np.asarray(values, dtype=float))


def names_of_eff(law, names: list[str]) -> list[str]:
    """Labels of theta's efficiency coordinates: ``eff[quest_w4a4]``, ..."""
    others = [p for i, p in enumerate(names) if i != law.ref]
    return [f"{key}[{p}]" for key in law.efficiencies for p in others]


def run(inputs: list, out_dir: Path, options: Options, strict: bool = True, maxiter: int = MAXITER) -> dict:
    """Read, check, fit, write. Bad input raises :class:`InputError` and a fit that does not converge
    :class:`NotConverged`, both before anything is written. A sweep labelled a pipeline check
    (``scaling.pipeline_check``) keeps its label."""
    options.check()
    runs = check_runs(read_inputs(inputs), options, strict)
    summary = fit_runs(runs, options, maxiter=maxiter)
    summary["inputs"] = [str(p) for p in inputs]
    summary["out"] = str(out_dir)
    summary["options"] = asdict(options)
    summary["pipeline_check"] = runs.pipeline_check
    write_study(summary, Path(out_dir), runs)
    return summary


def write_study(summary: dict, out_dir: Path, runs: Runs) -> list[Path]:
    """``scaling.json``, ``scaling.md`` and the figures (PDF and PNG) in ``out_dir``."""
    from quest_pl.io import atomic_write_json, atomic_write_text
    from quest_pl.scaling.figures import study_figures
    from quest_pl.scaling.report import markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    figures = study_figures(summary, runs, out_dir)
    atomic_write_json(out_dir / "scaling.json", summary)
    atomic_write_text(out_dir / "scaling.md", markdown(summary, [p.stem for p in figures if p.suffix == ".png"]))
    return [out_dir / "scaling.json", out_dir / "scaling.md", *figures]


def sweep_study(sweep_dir: Path, settings: dict) -> None:
    """End of an ``experiment=scaling_law`` sweep: the study of its finished jobs, in the sweep directory. Never
    raises: a study that cannot be fitted (too few runs, a precision with one size) still writes ``scaling.md``
    saying why, and a precision with one run is left out with a note."""
    from quest_pl.io import atomic_write_text
    from quest_pl.scaling.report import refit_command

    settings = dict(settings)
    label = settings.pop("pipeline_check", None)
    options = Options(**settings)
    try:
        summary = run([sweep_dir], sweep_dir, options, strict=False)
    except (InputError, NotConverged) as e:
        log.error("scaling study: %s", e)
        lines = [f"# Scaling-law study: `{sweep_dir}`", ""]
        if label:
            lines += [f"**Pipeline check**: {label}", ""]
        lines += [
            f"No fit: {e}.",
            "",
            f"Refit when more jobs have finished: `{refit_command([sweep_dir], sweep_dir, asdict(options))}`",
            "",
        ]
        atomic_write_text(sweep_dir / "scaling.md", "\n".join(lines))
        return
    log.info("scaling study: %s", summary["frontier"]["answer"])
    print(f"\nScaling law ({summary['law']}): {summary['frontier']['answer']}\nwrote {sweep_dir / 'scaling.json'}, "
          "scaling.md and figures")  # fmt: skip
