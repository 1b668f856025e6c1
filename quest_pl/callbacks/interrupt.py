from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException


class SaveOnInterrupt(L.Callback):
    """On Ctrl-C or SIGTERM, write ``last.ckpt`` before the process exits, so ``ckpt_path=.../last.ckpt`` resumes
    from the last completed optimizer step.

    With gradient accumulation an interrupt can land between the micro-batches of a step, whose partial gradients a
    checkpoint cannot hold; resuming there would shift every later step's micro-batches. Then nothing is written and
    the latest periodic checkpoint (at a step boundary) stays the place to resume from.
    """

    def __init__(self, dirpath: str | Path):
        self.path = Path(dirpath) / "last.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            return
        micro_batches = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if micro_batches % trainer.accumulate_grad_batches:
            print(
                f"\nInterrupted inside optimizer step {trainer.global_step + 1} (gradient accumulation): "
                f"{self.path} not updated; resume from the latest periodic checkpoint",
                flush=True,
            )
            return
        trainer.save_checkpoint(self.path)
        print(f"\nInterrupted at step {trainer.global_step}: saved {self.path}", flush=True)
