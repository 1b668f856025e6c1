"""A test instrument for multi-process runs: a callback that records, on every rank, what the diagnostics log and the
learned quantizer scales, and writes them to ``<out>/rank<k>.pt`` at the end (tests/test_ddp.py)."""

import lightning as L
import torch

from quest_pl.callbacks.base import Diagnostic


class RankRecorder(L.Callback):
    def __init__(self, out: str):
        self.out = out
        self.logged: list[tuple[int, dict]] = []

    def setup(self, trainer, pl_module, stage) -> None:
        # Runs in every rank's process: record each diagnostic's scalars there (only rank 0 writes TensorBoard).
        original = Diagnostic.log_scalars
        recorder = self

        def log_scalars(trainer, metrics, step):
            recorder.logged.append((step, dict(metrics)))
            original(trainer, metrics, step)

        Diagnostic.log_scalars = staticmethod(log_scalars)

    def on_train_end(self, trainer, pl_module) -> None:
        scales = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items() if "_quant." in k}
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        out = {"logged": self.logged, "scales": scales, "trainable": trainable}
        torch.save(out, f"{self.out}/rank{trainer.global_rank}.pt")
