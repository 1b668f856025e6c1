"""The LightningModule: next-token loss, AdamW with the paper's schedule, logging (METHOD.md §3)."""

from __future__ import annotations

import atexit
import math
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from quest_pl.model import Llama, LlamaConfig


def warmup_cosine(
    step: int, total: int, warmup_frac: float = 0.1, init_div: float = 100.0, final_frac: float = 0.1
) -> float:
    """LR multiplier of METHOD.md §3: torch's OneCycleLR with cosine annealing, ``div_factor = init_div`` and
    ``pct_start = floor(warmup_frac * total) / total``: a cosine warmup from ``1/init_div`` that peaks at step
    ``warmup - 1``, then a cosine decay to ``final_frac`` at the last step ``total - 1``."""

    def anneal(start: float, end: float, pct: float) -> float:
        return end + (start - end) * (1.0 + math.cos(math.pi * min(1.0, pct))) / 2.0

    peak = math.floor(warmup_frac * total) - 1
    if step <= peak and peak > 0:
        return anneal(1.0 / init_div, 1.0, step / peak)
    peak = max(peak, 0)
    return anneal(1.0, final_frac, (step - peak) / max(1, total - 1 - peak))


_EXIT_HANDLER = False  # destroy_process_group_at_exit registered its handler in this process


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the process exits, if it is still alive then (registered once).

    A ``ddp_spawn`` worker returns from ``fit`` and exits with its gloo group alive; gloo's worker threads are then
    torn down during the interpreter's finalisation and can abort the process ("terminate called without an active
    exception", SIGABRT) after a successful run. An ``atexit`` handler runs while the interpreter is still whole."""
    global _EXIT_HANDLER
    if not _EXIT_HANDLER and torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.register(_destroy_process_group)
        _EXIT_HANDLER = True


class Diverged(RuntimeError):
    """Training stopped on a non-finite loss, gradient norm or validation loss (``run.py`` exits with status 3)."""

    def __init__(self, step: int, what: str, value: float):
        self.step, self.what, self.value = step, what, value
        super().__init__(f"training diverged at step {step} ({what}={value:g})")


class LMModule(L.LightningModule):
    """Wraps a :class:`~quest_pl.model.Llama` (optionally quantized by ``quest_pl.quant``).

    All arguments are plain dicts and numbers, so checkpoints load with ``weights_only=True``: ``model`` holds
    :class:`~quest_pl.model.LlamaConfig` fields, ``quant`` the ``quant`` config group (``None`` or ``grid: null``:
    full precision). LSQ/PACT parameters get their own optimizer group (``optim.quant_lr_scale``,
    ``optim.quant_weight_decay``).

    ``quant.learned_init_steps = K`` (METHOD.md §1.9): while ``global_step < K`` (optimizer steps, so every micro-batch
    of an accumulated step counts as inside), each training forward first re-initialises every learned scale from its
    own input (``estimators.learned.reinitialize_learned_scales``), and the scales' gradients are dropped before the
    optimizer step, which then neither moves nor decays them and keeps no Adam state for them. After step K each scale
    is the init rule applied to the last micro-batch of step K, and its first learned update starts from fresh Adam
    moments. Validation forwards never re-initialise. The window is a function of ``global_step``, which a checkpoint
    restores: a resume inside it continues it, one past it never re-initialises.
    """

    def __init__(
        self,
        model: dict,
        optim: dict,
        quant: dict | None = None,
        compile: bool = False,
        max_steps: int = 1000,
        batch_tokens: int = 1,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        from quest_pl.quant import QuantConfig, quantize_model

        model_cfg = LlamaConfig(**model)
        self.model = Llama(model_cfg)
        self.quant = QuantConfig.from_cfg(quant, model_cfg)
        if self.quant is not None:
            quantize_model(self.model, self.quant)
            if compile and self.quant.learned_init_steps:  # also checked by config.validate, before any work
                from quest_pl.config import learned_init_compile_error

                raise learned_init_compile_error(self.quant.learned_init_steps)
        # Not a submodule attribute: the checkpoint holds the eager model's keys only, compiled or not.
        object.__setattr__(self, "compiled", torch.compile(self.model) if compile else None)
        self.val_loss = MeanMetric(nan_strategy="disable")  # a NaN loss makes the mean NaN, never dropped
        self.last_val_step: int | None = None  # global step of the latest validation (train.py adds a final one)
        self._last_log: tuple[float, int] | None = None
        self._scales_held = False  # this optimizer step is inside quant.learned_init_steps: the scales are not stepped

    @property
    def net(self) -> nn.Module:
        return self.compiled if self.compiled is not None else self.model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    @staticmethod
    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()  # under DDP: the group goes before the interpreter does

    # -- training -----------------------------------------------------------------------------------------------
    def in_learned_init(self) -> bool:
        """Whether the current optimizer step is one of the first ``quant.learned_init_steps``."""
        steps = self.quant.learned_init_steps if self.quant is not None else 0
        return steps > 0 and self.trainer.global_step < steps

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        if self.in_learned_init():  # this forward sets every learned scale from its input (see the class docstring)
            from quest_pl.estimators.learned import reinitialize_learned_scales

            reinitialize_learned_scales(self.model)
        loss = self.loss_fn(self(inputs), targets)
        # One process: stop before the backward. Under DDP a rank alone must not stop (the others would wait in the
        # all-reduce): a non-finite loss there shows up in the all-reduced gradient norm on every rank.
        if self.trainer.world_size == 1 and not torch.isfinite(loss):
            self._diverged("loss", loss)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _diverged(self, what: str, value: torch.Tensor) -> None:
        raise Diverged(self.trainer.global_step, what, float(value))

    def on_before_optimizer_step(self, optimizer) -> None:
        """A non-finite gradient norm stops training before the optimizer touches the weights (16-mixed excepted:
        its gradient scaler skips such steps by design). Inside ``quant.learned_init_steps`` the learned scales'
        gradients are dropped first: the optimizer leaves those scales (set from the batch) as they are."""
        self._scales_held = self.in_learned_init()
        if self._scales_held:
            for group in optimizer.param_groups:
                if group.get("name") == "quantizer":
                    for p in group["params"]:
                        p.grad = None
        if self.trainer.precision == "16-mixed":
            return
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            if not torch.isfinite(norm):
                self._diverged("grad_norm", norm)

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step over all ranks: ``batch_tokens`` (one micro-batch) x accumulation x ranks."""
        return self.hparams.batch_tokens * self.trainer.accumulate_grad_batches * self.trainer.world_size

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        step = self.trainer.global_step
        tokens = step * self.tokens_per_step
        if step % self.trainer.log_every_n_steps:
            return
        now = time.perf_counter()
        if self._last_log is not None and step > self._last_log[1]:
            last_time, last_step = self._last_log
            self.log("train/tokens_per_sec", (step - last_step) * self.tokens_per_step / (now - last_time))
        self._last_log = (now, step)
        self.log("train/tokens", float(tokens))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self._log_learned_scales()

    def _log_learned_scales(self) -> None:
        """``quant_scale/<layer>/weight|act``: each LSQ step / PACT clip level (mean over rows for per-row steps)."""
        from quest_pl.estimators.learned import LearnedScale

        for name, m in self.model.named_modules():
            if isinstance(m, LearnedScale):
                layer, _, operand = name.rpartition(".")
                self.log(f"quant_scale/{layer}/{operand.removesuffix('_quant')}", m.learned.detach().mean())

    # -- validation ---------------------------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int) -> None:
        inputs, targets = batch
        self.val_loss.update(self.loss_fn(self(inputs), targets), weight=targets.numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        if not torch.isfinite(loss):
            self._diverged("val/loss", loss)
        self.last_val_step = self.trainer.global_step
        # MeanMetric.compute() already reduced over ranks; sync_dist only averages identical values.
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(loss), prog_bar=True, sync_dist=True)

    # -- optimisation -------------------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Decay (0.1) on linear weights, including ``lm_head`` (the authors' exclusion is an artefact, §7.21);
        none on embeddings, norms and biases; LSQ/PACT parameters (logs of the scales) in their own group, whose decay
        ``optim.quant_weight_decay`` multiplies each scale by exp(-lr wd) per step (``configure_optimizers``)."""
        from quest_pl.quant import is_quantizer_param

        cfg = self.hparams.optim
        linear_weights = {id(m.weight) for m in self.model.modules() if isinstance(m, nn.Linear)}
        decay, no_decay, quant = [], [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if is_quantizer_param(name):
                quant.append(p)
            elif id(p) in linear_weights:
                decay.append(p)
            else:
                no_decay.append(p)
        groups = [
            {"params": decay, "weight_decay": cfg["weight_decay"], "lr_scale": 1.0, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "name": "no_decay"},
        ]
        if quant:  # logs of the scales: AdamW's decay would pull them to 0 (the scales to 1); see scale_decay
            groups.append(
                {
                    "params": quant,
                    "weight_decay": 0.0,
                    "scale_decay": cfg["quant_weight_decay"],
                    "lr_scale": cfg["quant_lr_scale"],
                    "name": "quantizer",
                }
            )
        for g in groups:
            g["lr"] = cfg["lr"] * g["lr_scale"]
        return groups

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Norm clipping with the model's parameters and the quantizers' (LSQ steps, PACT clip levels) as two separate
        groups, each clipped to ``gradient_clip_val``: a quantizer's gradient can never shrink the model's update
        through the global norm, nor the reverse. Value clipping is Lightning's, over everything."""
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm not in (None, "norm"):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        from quest_pl.quant import is_quantizer_param

        model, quant = [], []
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                (quant if is_quantizer_param(name) else model).append(p)
        for params in (model, quant):
            if params:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def configure_optimizers(self):
        cfg = self.hparams.optim
        opt = torch.optim.AdamW(self.param_groups(), lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"])
        if self.quant is not None:  # learned scales: decay, then the floor (estimators.learned), also under compile
            from quest_pl.estimators.learned import decay_learned_scales, project_learned_scales

            def after_step(optimizer, *_) -> None:
                held, self._scales_held = self._scales_held, False
                for group in optimizer.param_groups:
                    if group.get("scale_decay") and not held:  # inside quant.learned_init_steps: no decay either
                        decay_learned_scales(group["params"], math.exp(-group["lr"] * group["scale_decay"]))
                project_learned_scales(self.model)

            opt.register_step_post_hook(after_step)
        total = self.hparams.max_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda step: warmup_cosine(step, total, cfg["warmup_frac"], cfg["init_div"], cfg["final_lr_frac"]),
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


def silence_known_warnings() -> None:
    """Drop two warnings of Lightning that say nothing to our users, in every process that runs a Trainer (training,
    PTQ, evaluation): its own deprecated ``LeafSpec`` check under newer torch, and the note that a resumed run's
    checkpoint callbacks differ (resuming with another checkpoint cadence is fine: that callback has no state that
    matters)."""
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint need to be provided.*")
