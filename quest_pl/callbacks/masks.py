"""Masked fraction and mask persistence of the quantizers (paper Figs. 8 and 9; METHOD.md §1.4, §4.3).

M_t is the MASKED set at step t: the elements whose gradient the estimator zeroes (``~last_mask``; STE and
full-precision operands mask nothing). Masks are recorded (``Estimator.record_mask``) only on the steps this
callback measures, during the training forward itself, so nothing is recomputed; with gradient accumulation the
last micro-batch's masks are the ones read (weight masks are the same on every micro-batch).

* Every ``every_n_steps``: ``mask/frac/<layer>/weight|act`` = |M_t| / numel, and ``mask/expected`` = the fraction a
  N(0,1) row gives for the configured grid, bits and estimator (``expected_masked_fraction()``, the paper's
  reference line; ``mask/expected/act`` too when the activation quantizer differs). Activation fractions are
  averaged over DDP ranks.
* Every ``persist_every``: a bit-packed snapshot of each weight's M_t (one bit per element, kept on the host).
  Against the previous snapshot it logs ``mask/persist/<layer>`` = |M_old & M_new| / |M_old| and
  ``mask/jaccard/<layer>`` = |M_old & M_new| / |M_old | M_new| (not logged when the denominator is 0). The raw
  counts of every snapshot pair (upper triangle) go to ``<run dir>/mask_persistence.csv``
  (layer, old_step, new_step, n_old, n_new, overlap), from which Fig. 9 rebuilds exactly.

Files: ``mask_fraction.csv`` (step, layer, operand, fraction), ``mask_persistence.csv``, and the figures
``masked_fraction.png`` and ``mask_persistence.png`` (pooled over layers unless ``heatmap_layer`` names one).
Snapshots are not part of checkpoints: a resumed run starts a new persistence history.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from quest_pl.cadence import AUTO, check_every, resolve_every
from quest_pl.callbacks.base import Diagnostic, all_reduce_mean, diagnosed_layers, operands, run_dir, to_host, write_csv

BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)
POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def pack_bits(mask: Tensor) -> Tensor:
    """Bool tensor -> uint8 bytes on the host, 8 elements per byte, most significant bit first (``np.packbits``)."""
    flat = mask.flatten().to(torch.uint8)
    flat = F.pad(flat, (0, (-flat.numel()) % 8))
    weights = torch.tensor(BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(-1, dtype=torch.uint8).cpu()


def popcount(packed: Tensor) -> int:
    return int(POPCOUNT[packed.long()].sum())


def persistence(old: Tensor, new: Tensor) -> tuple[int, int, int]:
    """(|M_old|, |M_new|, |M_old & M_new|) of two packed masks."""
    return popcount(old), popcount(new), popcount(old & new)


class MaskStatistics(Diagnostic):
    POINTS = 8  # cheap: one mean per layer and operand
    PERSIST_POINTS = 4

    def __init__(
        self,
        every_n_steps: int | str = 50,
        persist_every: int | str = 200,
        figure_every_n_steps: int | None = None,
        heatmap_layer: str | None = None,
    ):
        super().__init__(every_n_steps, figure_every_n_steps)
        check_every("persist_every", persist_every)
        self.persist_every_spec = persist_every
        self.persist_every = None if persist_every == AUTO else persist_every
        self.heatmap_layer = heatmap_layer
        self.fractions: list[tuple[int, str, str, float]] = []
        self.snapshots: dict[str, list[tuple[int, Tensor]]] = {}
        self.pairs: list[tuple[str, int, int, int, int, int]] = []
        self.expected: dict[str, float] = {}
        self._recording: list = []
        self._step: int | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.persist_every = resolve_every(self.persist_every_spec, trainer.max_steps, self.PERSIST_POINTS)

    def _measured(self, step: int) -> bool:
        return self.due(step) or step % self.persist_every == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self._measured(step) or self._step == step:
            return
        self._step = step
        self._recording = [
            (name, op, est)
            for name, layer in diagnosed_layers(pl_module.model).items()
            for op, est in operands(layer).items()
            if hasattr(est, "record_mask")
        ]
        for _, _, est in self._recording:
            est.record_mask = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        if self._step != step:
            return
        if not self.expected:
            self.expected = self._expected(self._recording)
        masks = {}
        for name, op, est in self._recording:
            est.record_mask = False
            if est.last_mask is not None:
                masks[(name, op)] = est.last_mask
            est.last_mask = None
        self._recording, self._step = [], None
        if self.due(step):
            self._log_fractions(trainer, step, masks)
        if step % self.persist_every == 0:
            self._snapshot(trainer, step, {name: m for (name, op), m in masks.items() if op == "weight"})

    def _log_fractions(self, trainer, step: int, masks: dict) -> None:
        fractions = {f"mask/frac/{name}/{op}": 1.0 - mask.float().mean() for (name, op), mask in masks.items()}
        all_reduce_mean(trainer, [v for k, v in fractions.items() if k.endswith("/act")])
        values = to_host(fractions)
        for tag, value in values.items():
            _, _, rest = tag.partition("mask/frac/")
            name, _, op = rest.rpartition("/")
            self.fractions.append((step, name, op, value))
        expected = self.expected
        if expected:
            values["mask/expected"] = expected.get("weight", expected.get("act"))
        if "weight" in expected and "act" in expected and expected["act"] != expected["weight"]:
            values["mask/expected/act"] = expected["act"]
        self.log_scalars(trainer, values, step)

    @staticmethod
    def _expected(recording: list) -> dict[str, float]:
        """Operand -> Gaussian expectation of the masked fraction (one spec per operand: the first layer's)."""
        found = {}
        for _, op, est in recording:
            if op not in found and hasattr(est, "expected_masked_fraction"):
                value = est.expected_masked_fraction()
                if value is not None:
                    found[op] = float(value)
        return found

    def _snapshot(self, trainer, step: int, weight_masks: dict[str, Tensor]) -> None:
        metrics = {}
        for name, mask in weight_masks.items():
            new = pack_bits(~mask)
            history = self.snapshots.setdefault(name, [])
            for old_step, old in history:
                n_old, n_new, overlap = persistence(old, new)
                self.pairs.append((name, old_step, step, n_old, n_new, overlap))
            if history:
                _, _, _, n_old, n_new, overlap = self.pairs[-1]  # the previous snapshot, the last pair written
                if n_old:
                    metrics[f"mask/persist/{name}"] = overlap / n_old
                if n_old + n_new - overlap:
                    metrics[f"mask/jaccard/{name}"] = overlap / (n_old + n_new - overlap)
            history.append((step, new))
        self.log_scalars(trainer, metrics, step)

    # -- output -------------------------------------------------------------------------------------------------
    def write_tables(self, trainer) -> None:
        if self.fractions:
            write_csv(run_dir(trainer) / "mask_fraction.csv", ["step", "layer", "operand", "fraction"], self.fractions)
        if self.pairs:
            header = ["layer", "old_step", "new_step", "n_old", "n_new", "overlap"]
            write_csv(run_dir(trainer) / "mask_persistence.csv", header, self.pairs)

    def figures(self) -> dict:
        from quest_pl.callbacks import figures

        out = {}
        if self.fractions:
            out["masked_fraction"] = figures.masked_fraction(self.fractions, self.expected)
        if self.pairs:
            out["mask_persistence"] = figures.persistence_matrix(self.pairs, self.heatmap_layer)
        return out
