"""What the diagnostics callbacks share: when to measure, which layers, where to log and write (METHOD.md §4, §8).

A diagnostic observes on its own steps only (``step % every_n_steps == 0``, ``step`` = ``trainer.global_step`` while
the update is being computed, the step ``train/loss`` is logged at). ``every_n_steps: auto`` (the sweeps' default)
spreads a diagnostic's points over the run: ``max(1, max_steps // points)`` with the diagnostic's ``POINTS`` (8 for
the masked fraction, 4 for the costlier alignment, quantization error and persistence snapshots), resolved when
training starts; a fixed cadence that would measure nothing after step 0 is refused at launch
(:func:`quest_pl.cadence.check_cadences`). Off those steps its hooks return at once: no
tensor is touched and nothing syncs with the device. Scalars go through ``trainer.logger.log_metrics`` at that step;
figures are PNGs in ``<run dir>/figures/`` and TensorBoard images; tables are CSVs in the run dir. The run dir is
``trainer.default_root_dir`` (``quest_pl.train`` sets it to the Hydra run directory), so no callback needs Hydra.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn

from quest_pl.cadence import AUTO, check_every, resolve_every
from quest_pl.quant import QuantLinear, quant_layers

BLOCK_INDEX = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def diagnosed_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Name -> layer in depth order: every :class:`QuantLinear`; for a full-precision model (no QuantLinear), every
    ``nn.Linear`` inside ``model.blocks``, the layers a quantized run would quantize (names: ``blocks.0.attn.c_proj``).
    """
    layers = quant_layers(model)
    if layers:
        return layers
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and BLOCK_INDEX.search(n)}


def block_of(name: str) -> int | None:
    match = BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


def operands(layer: nn.Module) -> dict[str, nn.Module]:
    """``{"weight": estimator, "act": estimator}`` of a QuantLinear, quantized operands only."""
    if not isinstance(layer, QuantLinear):
        return {}
    found = {"weight": layer.weight_quant, "act": layer.act_quant}
    return {op: est for op, est in found.items() if est is not None}


_EXTRA_FORWARD = [0]  # depth of nested extra_forward() blocks (diagnostic forwards that are not the training one)


@contextmanager
def extra_forward(model: nn.Module) -> Iterator[None]:
    """Mark forwards a diagnostic runs itself (alignment's full-precision and fp32 recompute passes): other
    diagnostics' hooks ignore them (:func:`in_extra_forward`), and every estimator's mask recording is switched off
    and its ``last_mask`` (the training forward's) restored on exit, so each diagnostic sees only the training forward
    of its step."""
    estimators = [m for m in model.modules() if hasattr(m, "record_mask")]
    saved = [(m.record_mask, m.last_mask) for m in estimators]
    for m in estimators:
        m.record_mask = False
    _EXTRA_FORWARD[0] += 1
    try:
        yield
    finally:
        _EXTRA_FORWARD[0] -= 1
        for m, (record, last) in zip(estimators, saved):
            m.record_mask, m.last_mask = record, last


def in_extra_forward() -> bool:
    """Whether a diagnostic's own forward (:func:`extra_forward`) is running."""
    return _EXTRA_FORWARD[0] > 0


def distributed(trainer: L.Trainer) -> bool:
    return trainer.world_size > 1 and dist.is_available() and dist.is_initialized()


def all_reduce_mean(trainer: L.Trainer, tensors: list[Tensor]) -> None:
    """In place: the mean over ranks of each tensor (no-op on one process)."""
    if distributed(trainer):
        for t in tensors:
            dist.all_reduce(t)
            t /= trainer.world_size


def all_reduce_sum(trainer: L.Trainer, tensor: Tensor) -> Tensor:
    if distributed(trainer):
        dist.all_reduce(tensor)
    return tensor


def to_host(values: dict[str, Tensor]) -> dict[str, float]:
    """One device-to-host copy for a whole dict of 0-d tensors."""
    if not values:
        return {}
    stacked = torch.stack([v.detach().double().reshape(()) for v in values.values()]).cpu().tolist()
    return dict(zip(values, stacked))


def run_dir(trainer: L.Trainer) -> Path:
    return Path(trainer.default_root_dir)


def write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


class Diagnostic(L.Callback):
    """Base class: ``every_n_steps`` gating (an integer, or ``auto``: about :attr:`POINTS` measurements per run),
    scalar logging and figure output (``figure_every_n_steps``: also draw during training; ``None``: only at the
    end)."""

    POINTS = 4

    def __init__(self, every_n_steps: int | str, figure_every_n_steps: int | None = None):
        check_every("every_n_steps", every_n_steps)
        self.every_n_steps_spec = every_n_steps
        self.every_n_steps = None if every_n_steps == AUTO else every_n_steps
        self.figure_every_n_steps = figure_every_n_steps
        self._figure_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.every_n_steps = resolve_every(self.every_n_steps_spec, trainer.max_steps, self.POINTS)

    def due(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    @staticmethod
    def log_scalars(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        if metrics:  # every logger, not only trainer.logger (the first): the run's metrics log is one of them
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    # -- figures and tables -------------------------------------------------------------------------------------
    def figures(self) -> dict:
        """Name -> matplotlib Figure of the history so far (empty when there is nothing to draw)."""
        return {}

    def write_tables(self, trainer: L.Trainer) -> None:
        """Write this diagnostic's CSV(s) to the run dir (called on rank zero)."""

    def emit_figures(self, trainer: L.Trainer, step: int) -> None:
        """Save each figure as ``<run dir>/figures/<name>.png``; log it as the TensorBoard image ``figures/<name>``."""
        if not trainer.is_global_zero:
            return
        from quest_pl.callbacks.figures import render

        experiment = getattr(trainer.logger, "experiment", None)
        for name, fig in self.figures().items():
            image = render(fig, run_dir(trainer) / "figures" / f"{name}.png")
            if experiment is not None and hasattr(experiment, "add_image"):
                experiment.add_image(f"figures/{name}", image, step, dataformats="HWC")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.figure_every_n_steps
        step = trainer.global_step  # already past the update this batch completed, if it completed one
        if every and step and step % every == 0 and step != self._figure_step:
            self._figure_step = step
            if trainer.is_global_zero:
                self.write_tables(trainer)
            self.emit_figures(trainer, step)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.write_tables(trainer)
        self.emit_figures(trainer, trainer.global_step)
