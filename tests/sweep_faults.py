"""Faults injected into a sweep by the end-to-end resume tests (tests/test_sweep.py), driven by the environment
variable ``QUEST_TEST_FAULT`` so that a resumed sweep (same recorded command, no variable) runs clean:

* ``<job dir>:<step>:sigterm|sigkill|raise``: inside that job, after that optimizer step (:class:`JobFault`);
  ``sigterm-parent|sigkill-parent``: the same signal to the sweep's own process, from inside a job of a parallel
  sweep (``sweep.workers`` > 1: each job is a child of the sweep's process); ``ctrl-c-after-training``: a Ctrl-C
  at the end of training (the step is not read), outside the window where the job saves a checkpoint;
* ``between:<job dir>``: SIGTERM once that job has ended, before the next starts (:class:`SweepFault`);
* ``report``: SIGKILL while the sweep's report is being written, after its first file (:class:`SweepFault`).
"""

import os
import signal
import threading
import time
from pathlib import Path

import lightning as L
from hydra.experimental.callback import Callback

VARIABLE = "QUEST_TEST_FAULT"


class JobFault(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        spec = os.environ.get(VARIABLE, "").split(":")
        if len(spec) != 3 or Path(trainer.default_root_dir).name != spec[0]:
            return
        if trainer.global_step != int(spec[1]):
            return
        if spec[2] == "raise":
            raise RuntimeError("injected failure")
        os.environ.pop(VARIABLE)  # SIGTERM stops at the next clean step boundary: signal once
        action, _, target = spec[2].partition("-")
        pid = os.getppid() if target == "parent" else os.getpid()
        os.kill(pid, signal.SIGKILL if action == "sigkill" else signal.SIGTERM)

    def on_train_end(self, trainer, pl_module) -> None:
        spec = os.environ.get(VARIABLE, "").split(":")
        if len(spec) == 3 and Path(trainer.default_root_dir).name == spec[0] and spec[2] == "ctrl-c-after-training":
            raise KeyboardInterrupt  # as a Ctrl-C after the last step, once SaveOnInterrupt gave the signal back


class SweepFault(Callback):
    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        spec = os.environ.get(VARIABLE, "")
        if spec.startswith("between:") and Path(HydraConfig.get().runtime.output_dir).name == spec.split(":", 1)[1]:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_multirun_end(self, config, **kwargs) -> None:
        # Called before the report's on_multirun_end (Hydra calls *_end callbacks in reverse order): kill the process
        # as soon as the report's first file appears.
        if os.environ.get(VARIABLE) != "report":
            return
        first = Path(str(config.hydra.sweep.dir)) / "summary.csv"
        first.unlink(missing_ok=True)

        def watch():
            while not first.exists():
                time.sleep(0.001)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, daemon=True).start()
