"""A sweep's jobs side by side (``sweep.workers``): each job in a forked process, at most N at once.

**Why fork.** A child forked inside the job Hydra has just set up (its run directory and ``.hydra/`` files, its
``run.log`` handler, ``HydraConfig``, ``OMP_NUM_THREADS`` from ``hydra.job.env_set``) runs exactly the code the job
runs in a sequential sweep, so its results are the same bit for bit (``tests/test_sweep_workers.py``). The parent
dispatches the jobs in the plan's order, a new one as soon as a slot is free, records each job's end in
``sweep.json`` and writes the report when every job has ended.

**How many.** ``auto`` (the default): on CPU, the usable cores divided by the threads one job uses
(``OMP_NUM_THREADS`` x ``trainer.devices``), at most the number of jobs: on 2 cores with the CPU configs' one thread
per job, two jobs at once. One at a time when a job runs on a GPU or on several devices (DDP), or under another Hydra
launcher or sweeper (they own the jobs' processes, or read each job's return value); an explicit number above 1 is
refused there. ``1``: the jobs one after another in the sweep's own process.

**Signals.** Jobs run in their own process group, so a terminal's Ctrl-C reaches the parent only, which passes it (and
SIGTERM) on to every running job once: each stops at its next step boundary with ``checkpoints/last.ckpt``; the
parent waits for them and exits 130 or 143 with the command that finishes the sweep. A second Ctrl-C is passed on too
(the jobs stop at once, as a single run does). A job interrupted on its own (its process got SIGTERM) stops the sweep
the same way, as in a sequential sweep. A job's process killed outright (SIGKILL, the kernel's out-of-memory killer)
is recorded as failed and the sweep goes on. When the parent dies, the kernel kills its jobs (``PR_SET_PDEATHSIG``),
so no orphan keeps writing into the sweep.

**Output.** Each job's console lines start with ``[<job dir>]`` (its ``run.log`` is unchanged), and a job reports
progress in lines, never a terminal bar (two bars would overwrite each other).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from quest_pl.config import ConfigError

KEY = "sweep.workers"
AUTO = "auto"
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
PR_SET_PDEATHSIG = 1  # <sys/prctl.h>
# A job's exit status -> its status in the sweep (a child exits with the single run's codes, quest_pl.cli)
EXIT_STATUS = {0: "ok", 1: "failed", 3: "diverged"}
INTERRUPTS = {128 + signal.SIGINT: signal.SIGINT, 128 + signal.SIGTERM: signal.SIGTERM}


# -- how many -------------------------------------------------------------------------------------------------------
def _value(cfg: DictConfig):
    return OmegaConf.select(cfg, KEY, default=AUTO)


def check_value(cfg: DictConfig, multirun: bool) -> None:
    """``sweep.workers`` is ``auto`` or an integer >= 1, and only a sweep sets it."""
    value = _value(cfg)
    if value != AUTO and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(f"{KEY}={value!r}: expected auto or an integer >= 1 (jobs of a sweep run at once)")
    if value != AUTO and not multirun:
        raise ConfigError(f"{KEY}={value!r}: acts only in a sweep (an experiment=... or -m command); a single run "
                          "is one job")  # fmt: skip


def threads_per_job(job_threads: str | int | None, cfg: DictConfig) -> int:
    """The cores one job keeps busy: its intra-op threads (``OMP_NUM_THREADS``; unset: torch's default, every core)
    times its devices."""
    text = str(job_threads or "").strip()
    threads = int(text) if text.isdigit() and int(text) > 0 else (os.cpu_count() or 1)
    devices = cfg.trainer.get("devices")
    return threads * (devices if isinstance(devices, int) and devices > 0 else 1)


def sequential_reason(cfg: DictConfig) -> str | None:
    """Why this job must run alone (None: it may share the machine with other jobs)."""
    t = cfg.trainer
    if str(t.get("accelerator")) in ("gpu", "cuda", "mps", "tpu", "hpu", "xla"):
        return f"trainer.accelerator={t.accelerator} (one job at a time on a device)"
    if str(t.get("accelerator")) == "auto" and _cuda_available():
        return "trainer.accelerator=auto on a machine with a GPU (one job at a time on a device)"
    devices = t.get("devices")
    if not (devices in (1, "1", "auto") or (OmegaConf.is_list(devices) and len(devices) == 1)):
        return f"trainer.devices={devices} (a job on several devices)"
    if int(t.get("num_nodes") or 1) > 1:
        return f"trainer.num_nodes={t.num_nodes}"
    if str(t.get("strategy") or "auto") != "auto":
        return f"trainer.strategy={t.strategy}"
    return None


@functools.cache
def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _hydra_reason(hydra_cfg: DictConfig) -> str | None:
    launcher = OmegaConf.select(hydra_cfg, "launcher._target_", default=BASIC_LAUNCHER)
    sweeper = OmegaConf.select(hydra_cfg, "sweeper._target_", default=BASIC_SWEEPER)
    if launcher != BASIC_LAUNCHER:
        return f"hydra/launcher={launcher} (it starts the jobs' processes itself)"
    if sweeper != BASIC_SWEEPER:
        return f"hydra/sweeper={sweeper} (it reads each job's result before the next)"
    return None


def resolve(cfg: DictConfig, hydra_cfg: DictConfig, jobs: list[DictConfig], cpus: int | None = None) -> int:
    """How many jobs run at once: ``sweep.workers``, ``auto`` resolved (module docstring). ``cfg``: the command's
    config, ``hydra_cfg``: its ``hydra`` node, ``jobs``: every job's composed config. An explicit number above 1 where
    jobs must run alone is a :class:`ConfigError`."""
    value = _value(cfg)
    reason = _hydra_reason(hydra_cfg) or next((r for r in map(sequential_reason, jobs) if r), None)
    if value != AUTO:
        if value > 1 and reason:
            raise ConfigError(f"{KEY}={value}: jobs run one at a time with {reason}; use {KEY}=1 or auto")
        return int(value)
    if reason or len(jobs) < 2:
        return 1
    if cpus is None:
        cpus = usable_cpus()
    threads = max(threads_per_job(OmegaConf.select(hydra_cfg, "job.env_set.OMP_NUM_THREADS"), j) for j in jobs)
    return max(1, min(len(jobs), cpus // threads))


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a container's ``--cpus``,
    which affinity does not show; cgroup v2 ``cpu.max`` or v1 ``cpu/cpu.cfs_quota_us``)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for path, parse in ((cgroup / "cpu.max", _quota_v2), (cgroup / "cpu" / "cpu.cfs_quota_us", _quota_v1)):
        try:
            quota = parse(path)
        except (OSError, ValueError, IndexError):
            continue
        if quota is not None:
            return max(1, min(cpus, int(quota)))
    return cpus


def _quota_v2(path: Path) -> float | None:
    quota, period = path.read_text().split()[:2]  # "max 100000" or "200000 100000"
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1(path: Path) -> float | None:
    quota = int(path.read_text())
    return None if quota <= 0 else quota / int((path.parent / "cpu.cfs_period_us").read_text())


# -- the pool -------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    run_dir: Path
    started: float


@dataclass
class Pool:
    """The running jobs of this process's sweep (one pool per process; :func:`pool`)."""

    size: int = 1
    # on_end(run_dir, status, seconds, error): a job ended (called in the parent); error: why a job whose process
    # could not record its own end failed (killed by a signal, an unexpected exit status), else None
    on_end: Callable[[Path, str, float, str | None], None] | None = None
    running: dict[int, Job] = field(default_factory=dict)
    interrupted: int | None = None  # the signal that stops the sweep
    sweep_dir: Path | None = None
    _previous: dict = field(default_factory=dict)

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def free_slot(self) -> None:
        """Wait until fewer than ``size`` jobs run; raise the sweep's interrupt if one came meanwhile."""
        self.wait(below=self.size)
        self.check_interrupt()

    def check_interrupt(self) -> None:
        """Raise the sweep's interrupt (``KeyboardInterrupt`` or ``SystemExit(143)``) if a signal stopped it."""
        if self.interrupted:
            raise _interrupt(self.interrupted)

    def start(self, run_dir: Path, job: Callable[[], int]) -> None:
        """Run ``job()`` (returning the job's exit status) in a forked child once a slot is free."""
        self.free_slot()
        self._install_handlers()
        _flush()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the job
            code = 1
            try:
                _become_job(parent, run_dir.name)
                code = job()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except KeyboardInterrupt:  # outside training (which saves and exits 130 itself): nothing to save
                code = 128 + signal.SIGINT
            except BaseException:
                traceback.print_exc()
            finally:
                _flush()
                logging.shutdown()
                os._exit(code if isinstance(code, int) else 1)
        self.running[pid] = Job(run_dir, time.monotonic())
        self.sweep_dir = run_dir.parent

    def wait(self, below: int = 1) -> None:
        """Reap ended jobs until fewer than ``below`` run (``below=1``: all of them)."""
        while len(self.running) >= below:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:  # none left (e.g. reaped elsewhere)
                self.running.clear()
                break
            except KeyboardInterrupt:  # a second Ctrl-C while waiting: already passed on by the handler
                continue
            job = self.running.pop(pid, None)
            if job is None:
                continue
            self._ended(job, status)
        if not self.running:
            self._restore_handlers()

    def _ended(self, job: Job, status: int) -> None:
        seconds = time.monotonic() - job.started
        on_end = self.on_end or (lambda *args: None)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) in INTERRUPTS.values():
            # Ctrl-C or SIGTERM outside the job's training (which saves and exits 130/143 itself), e.g. while it
            # prepares its data: interrupted with nothing to save, and the sweep stops, as a sequential one does
            on_end(job.run_dir, "interrupted", seconds, None)
            if not self.interrupted:
                self.stop(os.WTERMSIG(status))
            return
        if os.WIFSIGNALED(status):
            name = signal.Signals(os.WTERMSIG(status)).name
            print(f"error: job {job.run_dir.name}: its process was killed by {name}; the sweep goes on",
                  file=sys.stderr, flush=True)  # fmt: skip
            on_end(job.run_dir, "failed", seconds, f"the job's process was killed by {name}")
            return
        code = os.WEXITSTATUS(status)
        if code in INTERRUPTS:  # the job was interrupted: the sweep stops, as a sequential one does
            on_end(job.run_dir, "interrupted", seconds, None)
            if not self.interrupted:
                self.stop(INTERRUPTS[code])
            return
        error = None if code in EXIT_STATUS else f"exit status {code}"
        on_end(job.run_dir, EXIT_STATUS.get(code, "failed"), seconds, error)

    def stop(self, signum: int) -> None:
        """Pass ``signum`` on to every running job and remember that the sweep stops."""
        self.interrupted = signum
        for pid in list(self.running):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _on_signal(self, signum, frame) -> None:
        self.stop(signum)
        raise _interrupt(signum)

    def _install_handlers(self) -> None:
        if self._previous:
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _interrupt(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)


_pool = Pool()


def pool() -> Pool:
    """This process's pool (:func:`configure` sets it up before a sweep's first job)."""
    return _pool


def configure(size: int, on_end: Callable[[Path, str, float, str | None], None]) -> Pool:
    """How many jobs run at once, and what records a job's end."""
    _pool.size, _pool.on_end, _pool.interrupted = size, on_end, None
    return _pool


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    for handler in logging.getLogger().handlers:
        handler.flush()


class _Prefixed(logging.Formatter):
    """The console formatter with ``[<job>] `` in front of every line (a job's lines among other jobs')."""

    def __init__(self, prefix: str, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.prefix, self.inner = prefix, inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(self.prefix + line if line else line for line in self.inner.format(record).split("\n"))


class _PrefixedStream:
    """``sys.stdout`` / ``sys.stderr`` of a job: ``[<job>] `` at the start of every non-empty line it prints."""

    def __init__(self, stream, prefix: str) -> None:
        self._stream, self._prefix, self._line_start = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self._line_start and piece.strip("\r\n"):
                out.append(self._prefix)
            out.append(piece)
            self._line_start = piece.endswith(("\n", "\r"))
        self._stream.write("".join(out))
        return len(text)

    def __getattr__(self, name: str):  # flush, isatty, fileno, encoding, ...: the stream's own
        return getattr(self._stream, name)


def _become_job(parent: int, name: str) -> None:
    """In the forked child: die with the parent, own process group (a terminal's Ctrl-C reaches the parent only),
    default signal handlers (the job's training installs its own), an empty pool, prefixed console lines."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(128 + signal.SIGKILL)
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _pool.size, _pool.running, _pool.interrupted, _pool._previous = 1, {}, None, {}
    prefix = f"[{name}] "
    sys.stdout, sys.stderr = _PrefixedStream(sys.stdout, prefix), _PrefixedStream(sys.stderr, prefix)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setFormatter(_Prefixed(prefix, handler.formatter))
