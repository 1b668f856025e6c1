"""What a sweep is: its record of its plan (``sweep.json``), its jobs' directories and each job's state on disk.

The bottom of the studies layer: the sweep driver (:mod:`quest_pl.sweep`), the report (:mod:`quest_pl.report`) and
studies built on sweeps read a sweep directory through this module.

**Job names.** A job's directory is ``<num>_<arm>_s<seed>``; the arm (:func:`quest_pl.config.names.arm_name`) states
the bits actually trained (``quest_w4a4`` becomes ``quest_w3a3`` under ``quant.bits=3``), so TensorBoard pointed at
the sweep directory lists runs by arm and seed.

**The plan, ``<sweep dir>/sweep.json``** (written atomically before the first job starts and after each job; format
version 1, stable)::

    {"version": 1,
     "experiment": "estimator_ablation",        # the experiment=... choice, null for a plain `-m` sweep
     "overrides": ["experiment=estimator_ablation", "trainer.max_steps=10", ...],   # the command line
     "swept": ["quant", "seed"],                # the keys the sweep varies
     "jobs": [{"dir": "0_bf16_s0", "arm": "bf16", "seed": 0, "overrides": ["quant=bf16", "seed=0"],
               "max_steps": 10, "status": "ok"}, ...]}

``jobs`` lists every job ever planned in the directory (a resume that adds seeds appends to it); a job's
``overrides`` (its swept values) identify it. ``status`` is what the sweep last recorded; :func:`job_states` derives
the authoritative one from the job directory, as a killed sweep may not have recorded it:

* ``ok`` / ``diverged`` / ``failed``: ``<job>/metrics.json`` says so (final metrics: ``val/loss``, ``val/ppl``,
  ``step``, ``wall_s``, ...; a failed job has ``error``);
* ``interrupted``: the directory exists without final metrics (``step`` from its metrics log, ``metrics.jsonl``:
  :mod:`quest_pl.callbacks.metrics_log`); it resumes from ``checkpoints/last.ckpt`` when that exists (a failed job
  too);
* ``not started``: no directory yet.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from omegaconf import OmegaConf

from quest_pl.config import ConfigError

PLAN_FILE = "sweep.json"
PLAN_VERSION = 1
FINISHED = ("ok", "diverged")  # a resume skips these: rerunning them gives the same result
STATUSES = ("ok", "diverged", "failed", "interrupted", "not started")
JOB_DIR_RESOLVER = "sweep_job_dir"
JOB_DIR = re.compile(r"^(\d+)_(.+?)(?:_s(\d+))?$")


# -- the job directory resolver ---------------------------------------------------------------------------------
def job_dir_name(sweep_dir, num, run_name, seed, task_overrides) -> str:
    """``hydra.sweep.subdir`` of a job: the directory the sweep's plan gave the job with these swept values (a
    resumed or extended sweep keeps its jobs' directories), else ``<num>_<arm>_s<seed>``."""
    default = f"{num}_{run_name}_s{seed}"
    try:
        plan = read_plan(Path(str(sweep_dir)))
    except ConfigError:
        return default
    if plan is None:
        return default
    key = identity(list(task_overrides or []), plan["swept"])
    for job in plan["jobs"]:
        if job["overrides"] == key:
            return job["dir"]
    return default


def register_resolvers() -> None:
    """The config's resolvers (:func:`quest_pl.config.names.register_resolvers`: ``run_name``, ``seeds``) and
    ``${sweep_job_dir:...}`` for ``hydra.sweep.subdir`` (``experiments/config.yaml``). Idempotent; called by the
    command line before Hydra composes."""
    from quest_pl.config.names import register_resolvers as register_config_resolvers

    register_config_resolvers()
    if not OmegaConf.has_resolver(JOB_DIR_RESOLVER):
        OmegaConf.register_new_resolver(JOB_DIR_RESOLVER, job_dir_name)


# -- the plan -------------------------------------------------------------------------------------------------------
def identity(overrides: list[str], swept: list[str]) -> list[str]:
    """A job's swept values as ``key=value`` strings in the order of ``swept``, normalised by Hydra's parser (so
    ``seed=0`` from the command line and from the sweeper compare equal)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([o for o in overrides if "=" in o])
    values = {o.key_or_group: o.value() for o in parsed if not o.is_sweep_override()}
    return [f"{k}={values[k]}" for k in swept if k in values]


def read_plan(sweep_dir: Path) -> dict | None:
    """``sweep.json`` of a sweep directory, checked; ``None`` when there is none (a sweep from before it existed)."""
    path = Path(sweep_dir) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        plan = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: malformed {PLAN_FILE} ({type(e).__name__}: {e})") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("jobs"), list) or plan.get("version") != PLAN_VERSION:
        raise ConfigError(f"{path}: malformed {PLAN_FILE} (expected version {PLAN_VERSION} with a list of jobs)")
    plan.setdefault("swept", [])
    return plan


def write_plan(sweep_dir: Path, plan: dict) -> None:
    from quest_pl.io import atomic_write_json

    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(sweep_dir) / PLAN_FILE, plan)


def record_status(sweep_dir: Path, job_dir: str, status: str) -> None:
    """Set a job's ``status`` in ``sweep.json`` (no-op without a plan or for a job it does not list)."""
    plan = read_plan(sweep_dir)
    if plan is None:
        return
    for job in plan["jobs"]:
        if job["dir"] == job_dir:
            job["status"] = status
            write_plan(sweep_dir, plan)
            return


def job_state(job_dir: Path) -> dict:
    """A job's state from its directory (see the module docstring): ``status``, ``step`` reached (``None`` unknown),
    ``val/loss`` (finished jobs), ``error`` (failed jobs), ``checkpoint`` (``last.ckpt`` to resume from, or None)."""
    from quest_pl.callbacks.metrics_log import last_step

    job_dir = Path(job_dir)
    ckpt = job_dir / "checkpoints" / "last.ckpt"
    state = {"status": "not started", "step": None, "val/loss": None, "error": None, "checkpoint": None}
    if not job_dir.is_dir():
        return state
    metrics_path = job_dir / "metrics.json"
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text())
        except (OSError, ValueError):
            metrics = None
        if isinstance(metrics, dict) and metrics.get("status", "ok") in ("ok", "diverged", "failed"):
            return state | {
                "status": metrics.get("status", "ok"),
                "step": metrics.get("step"),
                "val/loss": metrics.get("val/loss"),
                "error": metrics.get("error"),
                "checkpoint": str(ckpt) if ckpt.is_file() else None,
            }
    checkpoint = str(ckpt) if ckpt.is_file() else None
    return state | {"status": "interrupted", "step": last_step(job_dir), "checkpoint": checkpoint}


def job_states(sweep_dir: Path) -> list[dict]:
    """Every job the plan lists, in plan order, with its state on disk (:func:`job_state`) merged in; ``[]`` without
    a plan."""
    plan = read_plan(sweep_dir)
    if plan is None:
        return []
    return [{**job, **job_state(Path(sweep_dir) / job["dir"])} for job in plan["jobs"]]
