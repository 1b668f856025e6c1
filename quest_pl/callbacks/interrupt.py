from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException


class SaveOnInterrupt(L.Callback):
    """On Ctrl-C or SIGTERM, write ``last.ckpt`` before the process exits, so ``ckpt_path=.../last.ckpt`` resumes
    from the last completed optimizer step."""

    def __init__(self, dirpath: str | Path):
        self.path = Path(dirpath) / "last.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            trainer.save_checkpoint(self.path)
            print(f"\nInterrupted at step {trainer.global_step}: saved {self.path}", flush=True)
