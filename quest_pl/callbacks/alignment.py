"""Gradient alignment between the quantized and the full-precision model (paper Fig. 2; METHOD.md §4.2).

On a measured step, on the same micro-batches and the same latent weights theta:

* g_Q = the gradient the optimizer is about to apply (quantized forward, the estimator's backward, accumulated over
  the step's micro-batches, averaged over DDP ranks; read in ``on_before_optimizer_step``, before Lightning clips:
  a global-norm clip rescales every gradient by one factor, which no cosine sees);
* g_FP = the gradient of the same loss with every quantizer and rotation bypassed
  (:func:`quest_pl.quant.full_precision`), recomputed in fp32 without autocast, from the RNG state each micro-batch
  started with.

Logged per layer (depth order, names from :func:`quest_pl.quant.quant_layers`): ``align/cos/<layer>`` (whole weight
gradient), ``align/row_mean|row_std/<layer>`` (cosine per output row, mean and std over rows: the paper's format),
``align/block/<i>`` (all weights of block i as one vector), ``align/model``, and with ``activations=True`` the same
for the gradient with respect to each linear's input (``align/act/cos|row_mean|row_std/<layer>``, rows = tokens).

Under bf16-mixed precision g_Q carries the bf16 autocast's rounding while g_FP does not. ``recompute_quantized=True``
recomputes g_Q too, in fp32 on the same micro-batches, so that both sides are fp32 as METHOD.md §4.2 asks (and the
measurement sees the estimator's error alone); by default the optimizer's own gradient is used.

A full-precision run has no QuantLinear; there every linear of the blocks is measured, and the alignment is 1.

The measurement leaves training untouched: every ``.grad`` tensor is put back (the same tensor objects), quantizer
flags and the torch RNG states (CPU and CUDA) are restored, and no parameter, buffer or optimizer state is written.
Under DDP the FP pass runs outside the DDP wrapper (``no_sync``) and its gradients are averaged over ranks
explicitly, so every rank logs the same numbers. Under ``compile=true`` the activation gradients are not measured
(hooks would force recompilation); weight alignment is.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import Tensor

from quest_pl.callbacks.base import (
    Diagnostic,
    all_reduce_mean,
    all_reduce_sum,
    block_of,
    diagnosed_layers,
    extra_forward,
    run_dir,
    to_host,
    write_csv,
)
from quest_pl.quant import full_precision as bypass_quantizers

log = logging.getLogger(__name__)


def rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def cosine_parts(a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """Sufficient statistics of the cosine of two gradients, rows along the last dimension, in float64:
    ``dot``, ``aa``, ``bb`` (whole tensors) and ``row_sum``, ``row_sq``, ``rows`` (of the per-row cosines)."""
    a = a.detach().double().reshape(-1, a.shape[-1])
    b = b.detach().double().reshape(-1, b.shape[-1])
    dot, aa, bb = (a * b).sum(-1), a.square().sum(-1), b.square().sum(-1)
    row_cos = dot / (aa * bb).sqrt().clamp_min(1e-300)
    return {
        "dot": dot.sum(),
        "aa": aa.sum(),
        "bb": bb.sum(),
        "row_sum": row_cos.sum(),
        "row_sq": row_cos.square().sum(),
        "rows": torch.tensor(float(a.shape[0]), dtype=torch.float64, device=a.device),
    }


def cosine(parts: dict[str, Tensor]) -> Tensor:
    return (parts["dot"] / (parts["aa"] * parts["bb"]).sqrt().clamp_min(1e-300)).clamp(-1.0, 1.0)


def row_mean_std(parts: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    mean = parts["row_sum"] / parts["rows"]
    return mean, (parts["row_sq"] / parts["rows"] - mean.square()).clamp_min(0.0).sqrt()


class GradientAlignment(Diagnostic):
    """Cosine between the optimizer's gradient and the full-precision gradient, every ``every_n_steps`` steps.

    Writes ``<run dir>/alignment.csv`` (step, operand, layer, cos, row_mean, row_std) and the figure
    ``figures/alignment_by_depth.png`` (row-mean cosine against depth from the top, paper Fig. 2).
    """

    def __init__(
        self,
        every_n_steps: int = 200,
        activations: bool = True,
        recompute_quantized: bool = False,
        figure_every_n_steps: int | None = None,
    ):
        super().__init__(every_n_steps, figure_every_n_steps)
        self.activations = activations
        self.recompute_quantized = recompute_quantized
        self.history: dict[int, dict[str, float]] = {}
        self._step: int | None = None
        self._batches: list[tuple] = []
        self._act_grads: dict[str, dict[str, list[Tensor]]] = {}
        self._mode = "quant"
        self._hooks: list = []

    # -- capture (measured steps only) ----------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.due(step):
            return
        if self._step != step:  # first micro-batch of this step
            self._teardown()
            self._step = step
            if self.activations and getattr(pl_module, "compiled", None) is None:
                self._install_hooks(diagnosed_layers(pl_module.model))
        self._batches.append((batch, rng_state()))

    def _install_hooks(self, layers) -> None:
        self._act_grads = {"quant": {}, "fp": {}}
        for name, layer in layers.items():

            def capture(module, args, name=name):
                x = args[0]
                if torch.is_grad_enabled() and x.requires_grad:
                    grads = self._act_grads[self._mode].setdefault(name, [])
                    x.register_hook(lambda g: grads.append(g.detach()))

            self._hooks.append(layer.register_forward_pre_hook(capture))

    def _teardown(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._batches, self._act_grads, self._mode = [], [], {}, "quant"

    # -- measure ------------------------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._batches or self._step != trainer.global_step:
            return
        try:
            metrics = self.measure(trainer, pl_module)
        finally:
            self._teardown()
            self._step = None
        values = to_host(metrics)
        self.history[trainer.global_step] = values
        self.log_scalars(trainer, values, trainer.global_step)

    def measure(self, trainer, pl_module) -> dict[str, Tensor]:
        model = pl_module.model
        layers = diagnosed_layers(model)
        params = list(pl_module.parameters())
        saved = [p.grad for p in params]
        state = rng_state()
        try:
            if self.recompute_quantized:
                self._act_grads.get("quant", {}).clear()
                self._backward(trainer, pl_module, params, full_precision=False)
            quant_grads = {n: layer.weight.grad for n, layer in layers.items() if layer.weight.grad is not None}
            if self.recompute_quantized:
                all_reduce_mean(trainer, list(quant_grads.values()))
            self._mode = "fp"
            self._backward(trainer, pl_module, params, full_precision=True)
            fp_grads = {n: layers[n].weight.grad for n in quant_grads}
            all_reduce_mean(trainer, [g for g in fp_grads.values() if g is not None])
            return self._weight_metrics(quant_grads, fp_grads) | self._activation_metrics(trainer)
        finally:
            for p, g in zip(params, saved):
                p.grad = g
            set_rng_state(state)

    def _backward(self, trainer, pl_module, params, full_precision: bool) -> None:
        """Fresh fp32 gradients (no autocast, outside DDP's reducer) of the stored micro-batches' loss."""
        for p in params:
            p.grad = None
        model = pl_module.model
        no_sync = getattr(trainer.strategy.model, "no_sync", None)
        with contextlib.ExitStack() as stack:
            stack.enter_context(extra_forward(model))
            if full_precision:
                stack.enter_context(bypass_quantizers(model))
            stack.enter_context(torch.autocast(device_type=self._batches[0][0][0].device.type, enabled=False))
            if no_sync is not None:
                stack.enter_context(no_sync())
            for (inputs, targets), micro_state in self._batches:
                set_rng_state(micro_state)
                (pl_module.loss_fn(model(inputs), targets) / len(self._batches)).backward()

    @staticmethod
    def _weight_metrics(quant_grads: dict[str, Tensor], fp_grads: dict[str, Tensor]) -> dict[str, Tensor]:
        metrics, blocks, total = {}, {}, None
        for name, g_q in quant_grads.items():
            g_fp = fp_grads[name]
            if g_fp is None:
                g_fp = torch.zeros_like(g_q)
            parts = cosine_parts(g_q, g_fp)
            metrics[f"align/cos/{name}"] = cosine(parts)
            metrics[f"align/row_mean/{name}"], metrics[f"align/row_std/{name}"] = row_mean_std(parts)
            block = block_of(name)
            whole = {k: parts[k] for k in ("dot", "aa", "bb")}
            if block is not None:
                blocks[block] = whole if block not in blocks else {k: blocks[block][k] + v for k, v in whole.items()}
            total = whole if total is None else {k: total[k] + v for k, v in whole.items()}
        for block, parts in sorted(blocks.items()):
            metrics[f"align/block/{block}"] = cosine(parts)
        if total is not None:
            metrics["align/model"] = cosine(total)
        return metrics

    def _activation_metrics(self, trainer) -> dict[str, Tensor]:
        if not self._act_grads:
            return {}
        metrics = {}
        quant, fp = self._act_grads["quant"], self._act_grads["fp"]
        for name, grads in quant.items():
            if len(grads) != len(fp.get(name, ())):
                continue
            a = torch.cat([g.reshape(-1, g.shape[-1]) for g in grads])
            b = torch.cat([g.reshape(-1, g.shape[-1]) for g in fp[name]])
            parts = cosine_parts(a, b)
            packed = all_reduce_sum(trainer, torch.stack(list(parts.values())))  # activations differ per rank
            parts = dict(zip(parts, packed.unbind()))
            metrics[f"align/act/cos/{name}"] = cosine(parts)
            metrics[f"align/act/row_mean/{name}"], metrics[f"align/act/row_std/{name}"] = row_mean_std(parts)
        return metrics

    # -- output -------------------------------------------------------------------------------------------------
    def rows(self) -> list[tuple]:
        out = []
        for step, values in sorted(self.history.items()):
            for tag, cos in values.items():
                for operand, prefix in (("weight", "align/cos/"), ("act", "align/act/cos/")):
                    if tag.startswith(prefix):
                        name = tag[len(prefix) :]
                        base = "align/act/" if operand == "act" else "align/"
                        mean, std = values[f"{base}row_mean/{name}"], values[f"{base}row_std/{name}"]
                        out.append((step, operand, name, cos, mean, std))
        return out

    def write_tables(self, trainer) -> None:
        if self.history:
            header = ["step", "operand", "layer", "cos", "row_mean", "row_std"]
            write_csv(run_dir(trainer) / "alignment.csv", header, self.rows())

    def figures(self) -> dict:
        from quest_pl.callbacks.figures import alignment_by_depth

        return {"alignment_by_depth": alignment_by_depth(self.rows())} if self.history else {}
