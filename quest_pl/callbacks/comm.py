"""Compressed gradient communication for a DDP run (``grad_comm.hook``; the hooks are in :mod:`quest_pl.comm`)."""

from __future__ import annotations

import logging

import lightning as L
from torch.nn.parallel import DistributedDataParallel

from quest_pl import comm

log = logging.getLogger(__name__)


class GradientCommunication(L.Callback):
    """Registers a DDP communication hook on the wrapped model before the first step and logs the bytes each rank
    moves per optimizer step (``comm/bytes_per_step``, computed by :func:`quest_pl.comm.wire_bytes`)."""

    def __init__(self, hook: str = "none", bits: int = 4, chunk: int = 1024, marina_p: float = 1.0, seed: int = 0):
        self.hook, self.bits, self.chunk, self.marina_p, self.seed = hook, bits, chunk, marina_p, seed
        self.bytes_per_step: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = trainer.strategy.model
        if not isinstance(model, DistributedDataParallel):
            raise RuntimeError(
                f"grad_comm.hook={self.hook}: needs a DDP strategy, got {type(trainer.strategy).__name__}"
            )
        comm.register(model, self.hook, bits=self.bits, chunk=self.chunk, seed=self.seed, marina_p=self.marina_p)
        numel = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        self.bytes_per_step = comm.wire_bytes(numel, trainer.world_size, self.hook, self.bits, self.chunk)["sent"]
        if trainer.is_global_zero:
            log.info(
                "gradient communication: %s%s, %.1f MB sent per rank and step (fp32 all-reduce: %.1f MB)",
                self.hook,
                f" {self.bits}-bit" if self.hook in ("quantized", "correlated") else "",
                self.bytes_per_step / 1e6,
                comm.wire_bytes(numel, trainer.world_size, "none")["sent"] / 1e6,
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.bytes_per_step is not None and trainer.global_step % trainer.log_every_n_steps == 0:
            pl_module.log("comm/bytes_per_step", self.bytes_per_step, rank_zero_only=True)
