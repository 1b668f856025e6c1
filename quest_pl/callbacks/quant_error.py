"""Relative quantization error of every quantizer (METHOD.md §1.2, §8 "QuantMSE").

Every ``every_n_steps``: ``quant/relmse/<layer>/weight|act`` = ||Q(x) - x||^2 / ||x||^2 over the whole operand, in
the basis the quantizer sees (after the Hadamard rotation, when there is one; H is orthonormal, so ``full`` mode's
rotated-back error is the same number). Beside it ``quant/expected/weight|act``: the grid's optimum for N(0,1) rows,
E[(q(z) - z)^2] (``Grid.gaussian_mse``; absent for absmax and learned-scale grids, whose error depends on the data).

Weights are re-quantized from the current latent weights in ``on_before_optimizer_step`` (unchanged since the
forward); activations are quantized a second time, under ``no_grad``, by a forward hook installed on the measured
step only and summed over its micro-batches (and over DDP ranks); forwards run by other diagnostics
(``callbacks.base.extra_forward``, e.g. the alignment's full-precision pass) are not counted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quest_pl import quantizers
from quest_pl.callbacks.base import (
    Diagnostic,
    all_reduce_mean,
    diagnosed_layers,
    in_extra_forward,
    operands,
    to_host,
)
from quest_pl.estimators.learned import LearnedScale


@torch.no_grad()
def squared_errors(layer, estimator, x: Tensor) -> Tensor:
    """[||Q(t) - t||^2, ||t||^2] (fp32, on x's device), t = x rotated as the layer rotates it."""
    t = quantizers.hadamard_transform(x.float(), layer.hadamard_block) if layer.hadamard is not None else x
    t32 = t.float()
    return torch.stack(((estimator(t).float() - t32).square().sum(), t32.square().sum()))


class QuantizationError(Diagnostic):
    def __init__(self, every_n_steps: int = 50, figure_every_n_steps: int | None = None):
        super().__init__(every_n_steps, figure_every_n_steps)
        self._step: int | None = None
        self._hooks: list = []
        self._act: dict[str, Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.due(step) or self._step == step:
            return
        self._remove_hooks()
        self._step = step
        for name, layer in diagnosed_layers(pl_module.model).items():
            est = operands(layer).get("act")
            if est is None:
                continue

            def measure(module, args, output, name=name, est=est):
                if in_extra_forward():  # another diagnostic's forward (e.g. alignment's full-precision pass)
                    return
                errors = squared_errors(module, est, args[0])
                self._act[name] = errors if name not in self._act else self._act[name] + errors

            self._hooks.append(layer.register_forward_hook(measure))

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._act = [], {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        if self._step != step:
            return
        errors, expected = {}, {}
        for name, layer in diagnosed_layers(pl_module.model).items():
            for op, est in operands(layer).items():
                if op == "weight":
                    errors[f"{name}/weight"] = squared_errors(layer, est, layer.weight.detach())
                elif name in self._act:
                    errors[f"{name}/act"] = self._act[name]
                grid = None if isinstance(est, LearnedScale) else getattr(est, "quantizer", None)
                gaussian = getattr(grid, "gaussian_mse", None)  # a learned scale has no RMS-scaled optimum
                if gaussian is not None and op not in expected:
                    expected[op] = gaussian
        # Activation sums differ per rank; averaging numerator and denominator alike keeps the global ratio.
        all_reduce_mean(trainer, [v for k, v in errors.items() if k.endswith("/act")])
        self._remove_hooks()
        self._step = None
        metrics = to_host({f"quant/relmse/{k}": e[0] / e[1].clamp_min(1e-30) for k, e in errors.items()})
        metrics.update({f"quant/expected/{op}": float(v) for op, v in expected.items()})
        self.log_scalars(trainer, metrics, step)
