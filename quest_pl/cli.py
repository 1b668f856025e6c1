"""The command line: ``quest-pl [group=option ...] [key=value ...]`` (or ``python run.py ...`` in a checkout).

Config groups live in ``experiments/`` (model, data, optim, trainer, callbacks, logger, quant, debug, experiment).
Before Hydra creates a run directory, every override is checked against the composed config and every job the command
would start is validated (:mod:`quest_pl.overrides`), so a bad input leaves nothing behind.

Exit status: 0 done; 2 a user error (one ``error: ...`` line naming the key); 3 training diverged (``metrics.json`` says
``"status": "diverged"``; in a sweep the other arms still run and the sweep exits 3 at the end); 1 a sweep's job
failed (recorded in its ``metrics.json``; the other jobs still ran); 130 Ctrl-C and 143 SIGTERM
(``checkpoints/last.ckpt`` written at the last completed step; a sweep prints the ``sweep.resume=`` command that
finishes it).
"""

import logging
import os
import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict

from quest_pl.config import CONFIG_DIR, ConfigError

log = logging.getLogger("quest_pl")

EXIT_CONFIG = 2
EXIT_DIVERGED = 3
EXIT_SIGINT = 130

EXIT_FAILED = 1

_state: dict = {"diverged": [], "failed": [], "new_dirs": []}
# What Hydra itself writes into a run directory before the job starts: a directory holding only these was created
# by this command, and is removed again when the job fails on a user error.
HYDRA_ARTIFACTS = {".hydra", "run.log"}
# Lines that say nothing about the run: advertisements, and Lightning noting the model summary train.py asked for.
NOISE = ("💡", "litmodels", "LitLogger", "litlogger", "Skipping setting a default `ModelSummary`")


class NoTips(logging.Filter):
    """Drops the lines of :data:`NOISE`; attached to Hydra's two handlers by ``hydra.job_logging`` in
    ``experiments/config.yaml``. By text because Lightning has no switch for its tips: they are ``rank_zero_info``
    lines on the logger that also carries the lines worth keeping (devices, why ``fit`` stopped)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(word in record.getMessage() for word in NOISE)


def setup_logging() -> None:
    """Each line once, on the console and in ``run.log`` (Hydra's two handlers, configured by ``hydra.job_logging``);
    warnings through logging."""
    # Lightning's root package adds a console handler of its own at import, whatever the root logger has (and
    # lightning.pytorch / lightning.fabric do when the root has none). It is imported here, after Hydra configured
    # logging (importing it earlier would slow every command that ends on a config error by seconds), so Hydra's
    # configuration cannot reach that handler: remove it, and pass Lightning's records up to Hydra's handlers.
    import lightning  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    logging.captureWarnings(True)  # Python's warnings into run.log too (no Hydra or Lightning setting does this)


def echo(message: str, error: bool = False) -> None:
    """Print a line as is (``error: ...`` on stderr) and put it in ``run.log`` too."""
    print(message, file=sys.stderr if error else sys.stdout, flush=True)
    record = logging.LogRecord("quest_pl", logging.ERROR if error else logging.INFO, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def set_threads() -> None:
    """``OMP_NUM_THREADS`` (``hydra.job.env_set``: 1 unless exported) applied to torch even when torch was imported
    (and its thread pool sized) before Hydra set the variable."""
    n = os.environ.get("OMP_NUM_THREADS", "")
    if n.isdigit() and int(n) > 0:
        import torch

        torch.set_num_threads(int(n))


# glibc's mallopt parameters (<malloc.h>) and the largest mmap threshold it accepts on 64-bit systems
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 << 20
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> None:
    """Let glibc's malloc reuse freed blocks of up to 32 MiB instead of handing them back to the kernel.

    PyTorch's CPU tensors come from malloc. By default glibc maps a large block (128 KiB to a few MiB, adapting) with
    its own mmap and unmaps it on free, so every training step faults in and zeroes its activations and gradients
    afresh: on the 2-core CPU runs that was 2,000-16,000 page faults and 5-30 ms of kernel time per step
    (BENCHMARKS.md). The two settings keep those blocks in the heap for the next step; values are unchanged. Skipped
    off glibc, and when the user set ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (glibc's variables)."""
    if not sys.platform.startswith("linux") or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. a static or musl build without it)
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def remove_if_fresh(run_dir: Path) -> None:
    """After a user error inside the job: remove the run directory if it holds only what Hydra wrote for this
    command, and the parents this command created."""
    logging.shutdown()  # close run.log
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= HYDRA_ARTIFACTS:
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in run_dir.parents:
            if parent not in _state["new_dirs"] or not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    setup_logging()
    set_threads()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return sweep_job(cfg, run_dir)
    return run_job(cfg, run_dir, hydra_cfg)


def sweep_job(cfg: DictConfig, run_dir: Path) -> float | None:
    """One job of a sweep: skipped when an earlier attempt finished it, resumed from its ``last.ckpt`` when one was
    interrupted (:func:`quest_pl.sweep.start_job`); a job that raises is recorded as failed and the sweep goes on.
    Under ``sweep.workers`` > 1 the job runs in a forked process beside the others (:mod:`quest_pl.workers`)."""
    from quest_pl import sweep, workers

    jobs = workers.pool()
    if jobs.parallel:
        jobs.free_slot()  # before the job's "job i of n" line
    job_cfg = sweep.start_job(cfg, run_dir, echo, workers=jobs.size)
    if job_cfg is None:
        return None
    if jobs.parallel:
        if job_cfg.trainer.get("enable_progress_bar") is None:  # lines, not bars: several jobs share the console
            with open_dict(job_cfg):
                job_cfg.trainer.enable_progress_bar = False
        jobs.start(run_dir, lambda: JOB_EXIT[run_sweep_job(job_cfg, run_dir, parallel=True)[0]])
        return None
    status, value = run_sweep_job(job_cfg, run_dir)
    job_ended(run_dir, status, None, None)
    return value


# A sweep job's status -> the exit status of its process under sweep.workers > 1 (quest_pl.workers reads it back)
JOB_EXIT = {"ok": 0, "failed": EXIT_FAILED, "diverged": EXIT_DIVERGED}


def run_sweep_job(cfg: DictConfig, run_dir: Path, parallel: bool = False) -> tuple[str, float | None]:
    """Run a sweep's job; its status (``ok``, ``diverged`` or ``failed``: recorded in its ``metrics.json``, the sweep
    goes on) and final val/loss. An interrupted job raises ``SystemExit`` (130 or 143) after its ``last.ckpt``."""
    from hydra.core.hydra_config import HydraConfig

    from quest_pl import sweep

    try:
        result = run_job(cfg, run_dir, HydraConfig.get())
    except SystemExit as e:
        if e.code in (EXIT_SIGINT, 128 + 15):  # interrupted: the job resumes from its last.ckpt
            if not parallel:  # (in parallel the sweep's own process says it, once)
                echo(f"sweep interrupted; finish it with: {sweep.resume_command(run_dir.parent)}", error=True)
            raise
        sweep.record_failure(run_dir, RuntimeError(f"exit status {e.code}"))
        return "failed", None
    except Exception as e:
        log.exception("job %s failed", run_dir.name)
        echo(f"error: job {run_dir.name} failed ({type(e).__name__}: {e}); the sweep goes on", error=True)
        sweep.record_failure(run_dir, e)
        return "failed", None
    return ("diverged" if str(run_dir) in _state["diverged"] else "ok"), result


def job_ended(run_dir: Path, status: str, seconds: float | None, error: str | None) -> None:
    """A sweep's job ended (in this process, or in a worker's: :mod:`quest_pl.workers`): its status in
    ``sweep.json``, a failure the job could not record itself in its ``metrics.json``, the sweep's exit status."""
    from quest_pl import sweep

    if error is not None:
        sweep.record_failure(run_dir, RuntimeError(error))
    if status == "failed":
        _state["failed"].append(str(run_dir))
    elif status == "diverged" and str(run_dir) not in _state["diverged"]:
        _state["diverged"].append(str(run_dir))
    sweep.end_job(run_dir, status, seconds)


def run_job(cfg: DictConfig, run_dir: Path, hydra_cfg) -> float | None:
    """One run (training, PTQ, evaluation or probe) in ``run_dir``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from quest_pl.train import Diverged, train

    try:
        if cfg.get("probe") is not None and cfg.probe.get("from"):  # alignment probe of a checkpoint (quest_pl.probe)
            from quest_pl.probe import run as run_probe

            run_probe(cfg, run_dir, overrides=list(hydra_cfg.overrides.task))
            return None
        from quest_pl.config import expand_paths

        if cfg.ptq.get("from"):  # data-free PTQ of a checkpoint instead of training
            from quest_pl.ptq import run as run_ptq

            metrics = run_ptq(expand_paths(cfg), run_dir, overrides=list(hydra_cfg.overrides.task))
        elif cfg.get("eval") is not None and cfg.eval.get("from"):  # evaluate a checkpoint (quest_pl.evaluate)
            from quest_pl.evaluate import run as run_eval

            metrics = run_eval(expand_paths(cfg), run_dir, overrides=list(HydraConfig.get().overrides.task))
        else:
            metrics = train(cfg, run_dir)
    except ConfigError as e:
        if hydra_cfg.mode == RunMode.MULTIRUN:  # every job was validated before the sweep: this one failed
            raise
        echo(f"error: {e}", error=True)
        remove_if_fresh(run_dir)
        sys.exit(EXIT_CONFIG)
    except Diverged as e:
        echo(f"error: {e}; metrics.json marks the run as diverged, the checkpoints before it are kept", error=True)
        if hydra_cfg.mode == RunMode.MULTIRUN:  # the other arms still run; the sweep exits 3 at the end
            _state["diverged"].append(str(run_dir))
            return None
        sys.exit(EXIT_DIVERGED)
    if metrics["rank"] == 0:
        echo(
            f"final val/loss={metrics['val/loss']:.4f} val/ppl={metrics['val/ppl']:.2f} after {metrics['step']} steps "
            f"({metrics['wall_s']:.1f} s); run dir: {run_dir}"
        )
    return metrics.get("val/loss")


def precheck(argv: list[str]) -> list[str]:
    """Check the command line and validate every job it starts, before Hydra creates anything. Returns the command
    line to run: a sweep's recorded command for ``sweep.resume=DIR`` (:func:`quest_pl.sweep.expand_resume`), and a
    multirun's directory fixed (``hydra.sweep.dir``), its plan written to ``sweep.json`` (:mod:`quest_pl.sweep`)."""
    from hydra._internal.utils import get_args_parser
    from hydra.types import RunMode

    from quest_pl import sweep, workers
    from quest_pl.config import check_devices, check_rules, validate
    from quest_pl.model import LlamaConfig
    from quest_pl.overrides import compose_checked, job_overrides
    from quest_pl.quant import QuantConfig

    args = get_args_parser().parse_args(argv)
    if any((args.help, args.hydra_help, args.shell_completion, args.info, args.config_path, args.config_name,
            args.config_dir, args.experimental_rerun)):  # fmt: skip
        return argv  # Hydra's own modes, or another primary config: Hydra checks
    overrides, resuming = sweep.expand_resume(args.overrides)
    parsed, jobs, first = job_overrides(overrides)
    if args.cfg:
        return argv  # --cfg job: print the config, run nothing
    multirun = args.multirun or first.hydra.mode == RunMode.MULTIRUN
    workers.check_value(first, multirun)
    composed = []
    for job in jobs if multirun else jobs[:1]:
        # A multirun's jobs each composed from their own overrides: `first` lacks the sweeps an experiment declares
        # itself (hydra.sweeper.params, e.g. scaling_law's models), so it may not be job 0
        cfg = compose_checked(job, parsed) if multirun else first
        validate(cfg)
        check_devices(cfg)
        check_cadence(cfg)
        m = cfg.model
        QuantConfig.from_cfg(cfg.quant, LlamaConfig(n_layer=m.n_layer, d_model=m.d_model, n_head=m.n_head))
        if not multirun:  # after the values' own checks
            check_rules(cfg)
        composed.append((job, cfg))
    if first.get("scaling") is not None:  # experiment=scaling_law: its fit's settings, checked before any job
        from quest_pl.scaling.study import check_settings

        check_settings(first.scaling, multirun)
    out = Path(str(first.hydra.sweep.dir if multirun else first.hydra.run.dir)).expanduser()
    if out.exists() and not out.is_dir():
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        raise ConfigError(f"{key}={str(out)!r}: a file, not a directory")
    _state["new_dirs"] = [p.resolve() for p in [out, *out.parents] if not p.exists()]
    if not multirun:
        return argv
    if not any(o.split("=", 1)[0] == "hydra.sweep.dir" for o in overrides):
        # ${now:...} resolved once: the plan and Hydra use the same directory
        overrides = [*overrides, f"hydra.sweep.dir={out}"]
    size = workers.resolve(first, first.hydra, [cfg for _, cfg in composed])
    sweep.plan_sweep(out, overrides, sweep.swept_keys(parsed, first), composed, resuming)
    workers.configure(size, job_ended)
    return (["-m"] if args.multirun else []) + overrides


def check_cadence(cfg: DictConfig) -> None:
    """Each diagnostic measures after step 0 within the run (:func:`quest_pl.cadence.check_cadences`)."""
    from quest_pl.budget import budgeted_max_steps
    from quest_pl.cadence import check_cadences

    check_cadences(cfg.get("callbacks"), budgeted_max_steps(cfg))


def wait_for_jobs(stop: bool) -> None:
    """Under ``sweep.workers`` > 1, before the command ends: wait for the jobs still running (``stop``: this process
    is ending on an error or a signal, so they first stop at their next step boundary); when the sweep was interrupted,
    print the command that finishes it and exit 130 or 143 (:mod:`quest_pl.workers`)."""
    import signal

    from quest_pl import sweep, workers

    jobs = workers.pool()
    if stop and jobs.running and not jobs.interrupted:
        jobs.stop(signal.SIGTERM)
    if jobs.running:
        print(f"waiting for {len(jobs.running)} running job(s) to save their checkpoints", file=sys.stderr, flush=True)
        jobs.wait()
    if jobs.interrupted and jobs.sweep_dir is not None:
        echo(f"sweep interrupted; finish it with: {sweep.resume_command(jobs.sweep_dir)}", error=True)
        sys.exit(128 + jobs.interrupted)


def cli() -> None:
    """Entry point of ``quest-pl`` and ``run.py``."""
    from quest_pl.sweep_plan import register_resolvers

    keep_freed_memory()
    register_resolvers()  # ${arm_name:...} in run_name, before Hydra composes
    try:
        sys.argv[1:] = precheck(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except KeyboardInterrupt:
        sys.exit(EXIT_SIGINT)
    _state["diverged"], _state["failed"] = [], []
    try:
        try:
            main()
        except BaseException:
            wait_for_jobs(stop=True)
            raise
        wait_for_jobs(stop=False)
    except KeyboardInterrupt:  # outside training (tokenisation, a second Ctrl-C): nothing to save
        print("\ninterrupted", file=sys.stderr)
        sys.exit(EXIT_SIGINT)
    if _state["failed"]:
        print(f"error: {len(_state['failed'])} job(s) failed: {', '.join(_state['failed'])}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    if _state["diverged"]:
        print(f"error: {len(_state['diverged'])} arm(s) diverged: {', '.join(_state['diverged'])}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)


if __name__ == "__main__":
    cli()
