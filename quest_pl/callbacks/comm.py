"""Compressed gradient communication for a DDP run (``grad_comm.hook``; the hooks are in :mod:`quest_pl.comm`)."""

from __future__ import annotations

import logging

import lightning as L
from torch.nn.parallel import DistributedDataParallel

from quest_pl import comm

log = logging.getLogger(__name__)


class GradientCommunication(L.Callback):
    """Registers a DDP communication hook on the wrapped model before the first step and logs the bytes each rank
    sent in the last optimizer step (``comm/bytes_per_step``): for the compressed hooks what the hook put on the wire
    (with MARINA, a full fp32 step or a compressed one), for ``fp16`` and ``none`` :func:`quest_pl.comm.wire_bytes`."""

    def __init__(self, hook: str = "none", bits: int = 4, chunk: int = 1024, marina_p: float = 1.0, seed: int = 0):
        self.hook, self.bits, self.chunk, self.marina_p, self.seed = hook, bits, chunk, marina_p, seed
        self.bytes_per_step: float | None = None
        self.state: comm.CompressionState | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = trainer.strategy.model
        if not isinstance(model, DistributedDataParallel):
            raise RuntimeError(
                f"grad_comm.hook={self.hook}: needs a DDP strategy, got {type(trainer.strategy).__name__}"
            )
        self.state = comm.register(
            model, self.hook, bits=self.bits, chunk=self.chunk, seed=self.seed, marina_p=self.marina_p
        )
        numel = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        self.bytes_per_step = comm.wire_bytes(
            numel, trainer.world_size, self.hook, self.bits, self.chunk, self.marina_p
        )["sent"]
        if trainer.is_global_zero:
            log.info(
                "gradient communication: %s%s, %.1f MB sent per rank and step (expected; fp32 all-reduce: %.1f MB)",
                self.hook,
                f" {self.bits}-bit" + (f", MARINA p={self.marina_p:g}" if self.marina_p < 1 else "")
                if self.hook in ("quantized", "correlated")
                else "",
                self.bytes_per_step / 1e6,
                comm.wire_bytes(numel, trainer.world_size, "none")["sent"] / 1e6,
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.bytes_per_step is not None and trainer.global_step % trainer.log_every_n_steps == 0:
            sent = self.bytes_per_step
            if self.state is not None and self.state.last_step_bytes is not None:
                sent = self.state.last_step_bytes  # what the hook moved, bucket padding and MARINA's coin included
            pl_module.log("comm/bytes_per_step", sent, rank_zero_only=True)
