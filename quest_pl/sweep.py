"""Sweeps that survive the night: the plan written before the first job, resume in place, progress between jobs, and
the report when the multirun ends.

* Before Hydra starts a multirun, the command line records the sweep's plan in ``<sweep dir>/sweep.json``
  (:func:`plan_sweep`; the format is :mod:`quest_pl.sweep_plan`'s).
* ``python run.py sweep.resume=DIR [overrides]`` re-runs the command recorded in ``DIR/sweep.json``, with the new
  overrides on top (:func:`expand_resume`), in DIR: a finished job (``ok`` or ``diverged``) is skipped, an interrupted
  one resumes from its own ``checkpoints/last.ckpt`` as a single run does (``ckpt_path``), a failed or never started
  one runs; new seeds or arms add only their jobs. A job whose configuration differs from the one in its directory is
  refused before anything runs, naming the key. Works for every experiment (and for plain ``-m`` sweeps).
* Each job prints ``job i of n: <arm> seed s`` with the sweep's ETA (:func:`start_job`); a job that raises is recorded
  as failed (:func:`record_failure`) and the sweep goes on; the command exits non-zero at the end.
* ``sweep.workers`` jobs run at once, each in its own process (:mod:`quest_pl.workers`; ``auto``: as many as the
  cores hold on CPU, one on a GPU); the report waits for all of them.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from quest_pl import sweep_plan
from quest_pl.config import RESUME_IGNORED, RESUME_KEYS, ConfigError
from quest_pl.config.budget import budgeted_max_steps
from quest_pl.config.names import arm_name, quant_arm_name, seed_list  # noqa: F401  (where earlier code imports them)
from quest_pl.sweep_plan import register_resolvers  # noqa: F401

log = logging.getLogger(__name__)

RESUME_KEY = "sweep.resume"
# What a job restarted from scratch (no checkpoint to resume from) leaves behind from its earlier attempt.
ATTEMPT_OUTPUTS = ("metrics.json", "metrics.jsonl", "tensorboard", "csv", "checkpoints", "figures")
_progress: dict = {"started": None, "durations": []}


def resume_command(sweep_dir: Path) -> str:
    return f"python run.py {RESUME_KEY}={sweep_dir}"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def expand_resume(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` with ``sweep.resume=DIR`` replaced by the command recorded in ``DIR/sweep.json`` (the new overrides
    win where they set the same key), ``hydra.sweep.dir=DIR`` and multirun mode, and whether it resumes. Unchanged
    without ``sweep.resume``. A directory that is missing, holds no sweep, or a sweep of another experiment is a
    :class:`ConfigError`."""
    resumes = [a for a in argv if _key(a) == RESUME_KEY]
    if not resumes:
        return argv, False
    value = resumes[-1].split("=", 1)[1]
    rest = [a for a in argv if _key(a) != RESUME_KEY]
    if value in ("", "null"):
        return rest, False
    sweep_dir = Path(value).expanduser()
    if not sweep_dir.exists():
        raise ConfigError(f"{RESUME_KEY}={value!r}: no such directory")
    if not sweep_dir.is_dir():
        raise ConfigError(f"{RESUME_KEY}={value!r}: a file, not a sweep directory")
    plan = sweep_plan.read_plan(sweep_dir)
    if plan is None:
        raise ConfigError(
            f"{RESUME_KEY}={value!r}: not a sweep directory (no {sweep_plan.PLAN_FILE}; expected the directory a "
            "multirun such as experiment=estimator_ablation created)"
        )
    if any(_key(a) == "hydra.sweep.dir" for a in rest):
        raise ConfigError(f"{RESUME_KEY}={value!r}: resumes in DIR itself; drop hydra.sweep.dir")
    experiments = [a.split("=", 1)[1] for a in rest if _key(a) == "experiment"]
    if experiments and experiments[-1] != plan.get("experiment"):
        raise ConfigError(
            f"{RESUME_KEY}={value!r}: a sweep of experiment={plan.get('experiment')}, not experiment={experiments[-1]}"
        )
    new_keys = {_key(a) for a in rest}
    merged = [o for o in plan.get("overrides", []) if _key(o) not in new_keys] + rest
    return [*merged, f"hydra.sweep.dir={sweep_dir}", "hydra.mode=MULTIRUN"], True


def recorded_overrides(argv: list[str]) -> list[str]:
    """The command line as the plan records it: without the sweep directory and mode (given on resume)."""
    return [a for a in argv if _key(a) not in ("hydra.sweep.dir", "hydra.mode", RESUME_KEY)]


def swept_keys(parsed: list, composed: DictConfig) -> list[str]:
    """The keys a sweep varies: the experiment's ``hydra.sweeper.params`` and the command line's sweeps."""
    keys = list(OmegaConf.select(composed, "hydra.sweeper.params", default=None) or {})
    keys += [o.key_or_group for o in parsed if o.is_sweep_override()]
    return list(dict.fromkeys(keys))


def _resume_values(cfg: DictConfig) -> dict:
    """The keys a resume compares (:data:`quest_pl.config.RESUME_KEYS`), flattened."""
    flat: dict = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = node

    for group in ("model", "quant", "optim", "data", "seed", "trainer"):
        node = cfg.get(group)
        walk(OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node, f"{group}.")
    return {
        k: v
        for k, v in flat.items()
        if any(k == p or k.startswith(p + ".") for p in RESUME_KEYS) and k not in RESUME_IGNORED
    }


def check_same_config(job_dir: Path, cfg: DictConfig, sweep_dir: Path) -> None:
    """A job already in the directory continues only with the configuration it ran with (first difference named)."""
    saved_path = job_dir / ".hydra" / "config.yaml"
    if not saved_path.is_file():
        return
    old, new = _resume_values(OmegaConf.load(saved_path)), _resume_values(cfg)
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a != b:
            raise ConfigError(
                f"{RESUME_KEY}={sweep_dir}: job {job_dir.name} ran with {key}={a!r}, this command has {key}={b!r}; "
                "resume with the same value (or start a new sweep)"
            )


def plan_sweep(
    sweep_dir: Path, argv: list[str], swept: list[str], jobs: list[tuple[list[str], DictConfig]], resuming: bool
) -> dict:
    """The plan of this command merged into the directory's (jobs matched by their swept values), checked against
    the jobs on disk, then written to ``sweep.json``. ``jobs``: (override list, composed config) per job, in launch
    order. Raises :class:`ConfigError` before writing anything."""
    old = sweep_plan.read_plan(sweep_dir) if sweep_dir.is_dir() else None
    if old is not None and not resuming:
        raise ConfigError(
            f"hydra.sweep.dir={sweep_dir}: holds a sweep already; finish or extend it with {RESUME_KEY}={sweep_dir}"
        )
    earlier = (
        sorted(p.name for p in sweep_dir.iterdir() if sweep_plan.JOB_DIR.match(p.name))
        if old is None and sweep_dir.is_dir()
        else []
    )
    if earlier:  # jobs of a sweep without a plan: this one would write into them and count them as its own
        raise ConfigError(
            f"hydra.sweep.dir={sweep_dir}: holds job directories of an earlier sweep ({earlier[0]}, ...); "
            "use a new directory"
        )
    experiment = next((a.split("=", 1)[1] for a in reversed(argv) if _key(a) == "experiment"), None)
    plan = old or {"version": sweep_plan.PLAN_VERSION, "experiment": experiment, "jobs": []}
    swept = list(dict.fromkeys([*plan.get("swept", []), *swept]))
    for job in plan["jobs"]:  # the older jobs' identities over the (possibly wider) set of swept keys
        job["overrides"] = sweep_plan.identity(job["overrides"], swept)
    known = {tuple(j["overrides"]): j for j in plan["jobs"]}
    taken = {int(m.group(1)) for j in plan["jobs"] if (m := sweep_plan.JOB_DIR.match(j["dir"]))}
    launch = []
    for overrides, cfg in jobs:
        key = sweep_plan.identity(overrides, swept)
        arm, seed = str(cfg.run_name), int(cfg.seed)
        job = known.get(tuple(key))
        if job is None:
            num = next(n for n in range(len(taken) + len(jobs) + 1) if n not in taken)
            taken.add(num)
            job = {"dir": f"{num}_{arm}_s{seed}", "arm": arm, "seed": seed, "overrides": key, "status": "not started"}
            plan["jobs"].append(job)
            known[tuple(key)] = job
        else:
            check_same_config(sweep_dir / job["dir"], cfg, sweep_dir)
        job["max_steps"] = int(budgeted_max_steps(cfg)) if cfg.trainer.get("max_steps") is not None else None
        launch.append(job["dir"])
    plan.update(overrides=recorded_overrides(argv), swept=swept, launch=launch)
    sweep_plan.write_plan(sweep_dir, plan)
    return plan


def start_job(cfg: DictConfig, run_dir: Path, echo, workers: int = 1) -> DictConfig | None:
    """Before a sweep's job: print ``job i of n`` with the sweep's ETA (``workers`` jobs at once); ``None`` when the
    job finished in an earlier attempt (skip it), else the config to run: resuming from the job's ``last.ckpt`` when
    an earlier (interrupted or failed) attempt left one, or from scratch (the earlier attempt's outputs removed)."""
    from quest_pl.callbacks.progress import eta_text

    sweep_dir = run_dir.parent
    plan = sweep_plan.read_plan(sweep_dir) or {"jobs": [], "launch": []}
    launch = plan.get("launch") or []
    i = launch.index(run_dir.name) + 1 if run_dir.name in launch else len(_progress["durations"]) + 1
    n = len(launch) or i
    state = sweep_plan.job_state(run_dir)
    # the swept values the arm name and seed do not show (a scaling ladder's model, a token budget)
    job = next((j for j in plan["jobs"] if j.get("dir") == run_dir.name), {})
    extra = [o for o in job.get("overrides", []) if _key(o) not in ("quant", "seed")]
    label = f"job {i} of {n}: {cfg.run_name} seed {cfg.seed}" + (f" [{' '.join(extra)}]" if extra else "")
    if _progress["started"] is None:
        _progress["started"] = time.monotonic()
    if state["status"] in sweep_plan.FINISHED:
        echo(f"{label}: finished earlier ({state['status']}), skipped")
        return None
    remaining = n - i + 1
    done = _progress["durations"]
    left = math.ceil(remaining / max(1, workers)) * sum(done) / len(done) if done else None
    eta = f"sweep ETA {eta_text(left)}" if done else "sweep ETA after this job"
    cfg = cfg.copy()
    # An interrupted or failed attempt resumes from its last.ckpt (written at a step boundary: exact, as for a single
    # run); without one the job starts afresh.
    resume = state["checkpoint"] if not cfg.get("ckpt_path") else None
    if resume:
        with open_dict(cfg):
            cfg.ckpt_path = resume
        echo(f"{label} ({eta}): resuming from {resume}")
    else:
        if state["status"] != "not started":
            for name in ATTEMPT_OUTPUTS:  # an earlier attempt that left nothing to resume from: start afresh
                path = run_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        echo(f"{label} ({eta})")
    _progress["job_start"] = time.monotonic()
    sweep_plan.record_status(sweep_dir, run_dir.name, "interrupted")
    return cfg


def end_job(run_dir: Path, status: str, seconds: float | None = None) -> None:
    """After a sweep's job ran (not skipped): its time for the ETA (``seconds``, else since :func:`start_job`), its
    status in ``sweep.json``."""
    started = _progress.pop("job_start", None)
    if seconds is None and started is not None:
        seconds = time.monotonic() - started
    if seconds is not None:
        _progress["durations"].append(seconds)
    sweep_plan.record_status(run_dir.parent, run_dir.name, status)


def record_failure(run_dir: Path, error: BaseException) -> None:
    """A job that raised (or whose process died): ``metrics.json`` with ``"status": "failed"`` and the error, so the
    report lists it and a resume runs it again (from its ``last.ckpt`` when it has one). The caller records the end
    (:func:`end_job`)."""
    from quest_pl.callbacks.metrics_log import last_step
    from quest_pl.io import atomic_write_json

    message = f"{type(error).__name__}: {error}".splitlines()[0]
    atomic_write_json(run_dir / "metrics.json", {"status": "failed", "error": message, "step": last_step(run_dir)})


class SweepReport(Callback):
    """Hydra callback (``hydra.callbacks.report`` in ``experiments/config.yaml``): when a multirun ends, write the
    sweep's summary table, plots and PTQ rows into the sweep directory (:func:`quest_pl.report.write_report`), and,
    when the config has a ``scaling`` block (``experiment=scaling_law``), the scaling-law study
    (:func:`quest_pl.scaling.study.sweep_study`)."""

    def __init__(self, enabled: bool = True, ptq: bool = True) -> None:
        self.enabled = enabled
        self.ptq = ptq
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from quest_pl import workers

        jobs = workers.pool()
        jobs.wait()  # jobs still running beside each other (sweep.workers > 1) end first
        jobs.check_interrupt()  # an interrupted sweep writes no report, as a sequential one stopped in its last job
        if not self.enabled:
            return
        from quest_pl.report import write_report

        sweep_dir = self.sweep_dir or Path(str(config.hydra.sweep.dir))
        try:
            write_report(sweep_dir, echo=True, ptq=self.ptq)
        except ConfigError as e:  # e.g. a malformed metrics.json: one line naming the file
            log.error("sweep report failed: %s", e)
        except Exception:  # a report failure must not hide the finished runs
            log.exception("sweep report failed; rerun it with: python -m quest_pl.report %s", sweep_dir)
        if config.get("scaling") is not None:
            from quest_pl.scaling.study import sweep_study

            try:
                sweep_study(sweep_dir, OmegaConf.to_container(config.scaling, resolve=True))
            except Exception:  # never hide the finished runs; the study can be redone from the directory
                log.exception("scaling study failed; redo it with: python -m quest_pl.scaling fit %s --out %s",
                              sweep_dir, sweep_dir)  # fmt: skip
