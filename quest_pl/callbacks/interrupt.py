import signal
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException


class SaveOnInterrupt(L.Callback):
    """On Ctrl-C or SIGTERM, stop at the next clean step boundary and write ``last.ckpt``, so
    ``ckpt_path=.../last.ckpt`` resumes with the same logged scalars at the same steps as an uninterrupted run.

    A signal only records the request; the stop happens at the end of the first optimizer step that is not inside
    gradient accumulation and after which no validation is due (a checkpoint taken between a step and its
    validation, or inside one, resumes with the logging step shifted by one or the validation lost). So a signal costs
    at most one more step and a validation. A second Ctrl-C stops at once, without a checkpoint. The exit status is
    128 + the signal (130 for Ctrl-C, 143 for SIGTERM): ``requested`` holds it.

    Under DDP (several processes) Lightning's own SIGTERM handling is kept, and a checkpoint is written only when the
    stop lands between optimizer steps; otherwise the latest periodic checkpoint stays the place to resume from.
    """

    def __init__(self, dirpath: str | Path):
        self.path = Path(dirpath) / "last.ckpt"
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    # -- signals ----------------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.requested is None:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(
                f"\n{name}: stopping at the end of the current step and saving {self.path}"
                + (" (Ctrl-C again: stop at once, no checkpoint)" if signum == signal.SIGINT else ""),
                file=sys.stderr,
                flush=True,
            )
        self.requested = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.requested = None
        if trainer.world_size > 1:
            return
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread: signals stay as they were
            self._previous = {}

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.requested is None or trainer.received_sigterm:
            return
        loop = trainer.fit_loop.epoch_loop
        if loop._should_accumulate():
            return  # inside an optimizer step
        try:
            validation_due = loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
        except Exception:  # Lightning internals moved: be conservative
            validation_due = trainer.global_step % max(1, int(trainer.val_check_batch)) == 0
        if not validation_due:
            trainer._signal_connector.received_sigterm = True  # Lightning raises SIGTERMException right after

    # -- saving -----------------------------------------------------------------------------------------------------
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            return
        if isinstance(exception, KeyboardInterrupt):
            print(f"\nStopped at once: {self.path} not updated", file=sys.stderr, flush=True)
            return
        micro_batches = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if micro_batches % trainer.accumulate_grad_batches:
            print(
                f"\nInterrupted inside optimizer step {trainer.global_step + 1} (gradient accumulation): "
                f"{self.path} not updated; resume from the latest periodic checkpoint",
                file=sys.stderr,
                flush=True,
            )
            return
        trainer.save_checkpoint(self.path)
        print(f"\nInterrupted at step {trainer.global_step}: saved {self.path}", file=sys.stderr, flush=True)
