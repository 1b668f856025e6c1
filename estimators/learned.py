"""Shared state of the learned-scale estimators (LSQ, PACT; METHOD.md §1.9, fixing §7.6).

The learned scale (LSQ's step, PACT's clip level) is stored as its logarithm: the `nn.Parameter` is `log_step` /
`log_clip`, and the scale is exp of it (`learned`, and the subclasses' `step` / `clip`). Adam moves a parameter by
about its learning rate per step whatever the size of its gradient, so a scale stored as itself moved by ~lr in
absolute units: 3e-3 per step against weight steps of 0.006 to 0.012 at the CPU size, which drove weight and
small-activation scales to the positivity floor within 10 to 30 steps, clipping nearly every entry (RESULTS.md). In
log form the same optimizer changes a scale by a factor of about exp(+-lr) per step, i.e. relative to its own size and
independently of the tensor's units: the LSQ paper's rule that a step size's update be proportional to its magnitude.
The gradient reaching the log is the scale's own (LSQ's or PACT's formula) times the scale (chain rule).

The parameter is created at construction (never in forward) and initialised from the first batch it sees. A
persistent `initialized` buffer records that, so a state_dict round trip restores the scale exactly and a resumed run
never re-initialises. Under torch.distributed the initial value is averaged over ranks, so all DDP replicas start from
the same scale. `reinitialize_learned_scales` clears that mark, so the next forward initialises again, floor included:
the training module calls it before each training forward of the first `quant.learned_init_steps` optimizer steps
(`quest_pl.module`), so during that window every scale is set from the current batch by its init rule.

Floor (issue #11): every forward first clamps the log in place, without gradient, onto [log floor, inf), where `floor`
(a persistent buffer, in the scale's units) is SCALE_FLOOR times the initial value (never below SCALE_EPS). The log
form keeps the scale positive by itself; the floor keeps it from underflowing to 0 (a step of 0 would divide by 0).
The optimizer's own state is left alone (projected gradient descent).

Decay: AdamW's decoupled decay of the log would pull every scale towards 1 (weights' up, activations' down), so the
quantizer group gets no AdamW decay; `decay_learned_scales` instead multiplies each scale by exp(-lr wd) after each
step (= PACT's L2 decay on the clip level in decoupled form, 1 - lr wd, to first order).

Checkpoints written before the log form (keys `step` / `clip` holding the scale itself) load as log of that value;
those written before the floor existed load with floor = SCALE_FLOOR x the scale.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from quest_pl.quantizers import Grid

SCALE_EPS = 1e-8
"""Floor on an initial scale (an all-zero first batch would otherwise give 0)."""
SCALE_FLOOR = 1e-3
"""The learned scale never goes below this fraction of its initial value (see the module docstring)."""


class LearnedScale(nn.Module):
    """Base for estimators owning one learned scale parameter of a fixed shape, named `parameter`."""

    name = "learned"

    def __init__(self, quantizer: Grid, shape: tuple[int, ...], parameter: str) -> None:
        super().__init__()
        if not getattr(quantizer, "supports_learned_scale", False):
            raise ValueError(
                f"estimator {self.name!r} needs a grid with an external scale; {quantizer.name!r} has none"
            )
        self.quantizer = quantizer
        self.bits = quantizer.bits
        self.levels = 2**quantizer.bits
        self.scale_name = parameter  # the scale's name: `step` (LSQ) or `clip` (PACT)
        self.parameter_name = f"log_{parameter}"
        self.register_parameter(self.parameter_name, nn.Parameter(torch.zeros(shape)))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("floor", torch.full(shape, SCALE_EPS))
        self._initialized_seen = False  # host-side copy of `initialized`, so steady-state forwards never sync
        self.record_mask = False
        self.last_mask: Tensor | None = None

    @property
    def log_scale(self) -> nn.Parameter:
        """The trained parameter: the log of the scale."""
        return getattr(self, self.parameter_name)

    @property
    def learned(self) -> Tensor:
        """The scale itself, exp(log_scale), differentiable (its gradient reaches `log_scale`)."""
        return self.log_scale.exp()

    @torch.no_grad()
    def set_scale(self, value: float | Tensor) -> None:
        """Set the scale to `value` (> 0) and mark it initialised (no data-dependent init follows)."""
        value = torch.as_tensor(value, dtype=self.log_scale.dtype).expand_as(self.log_scale)
        if not bool((value > 0).all()):
            raise ValueError(f"{self.name}: a {self.scale_name} must be > 0, got {value.min().item()}")
        self.log_scale.copy_(value.log())
        self.initialized.fill_(True)
        self._initialized_seen = True

    def initial_value(self, x32: Tensor) -> Tensor:
        """Data-dependent initial value of the learned parameter, shaped like it."""
        raise NotImplementedError

    @torch.no_grad()
    def maybe_initialize(self, x: Tensor) -> None:
        """Initialise the learned parameter from x on the first forward, unless `initialized` says it was."""
        if self._initialized_seen:
            return
        if not bool(self.initialized):
            value = self.initial_value(x.detach().float()).clamp_min(SCALE_EPS)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(value)
                value /= dist.get_world_size()
            self.log_scale.copy_(value.log())
            self.floor.copy_((value * SCALE_FLOOR).clamp_min(SCALE_EPS))
            self.initialized.fill_(True)
        self._initialized_seen = True

    @torch.no_grad()
    def project(self) -> None:
        """Clamp the log of the scale onto [log floor, inf) in place (see the module docstring).

        Through ``.data``: the value changes only after an optimizer step, before any graph holds the scale, so the
        autograd version counter is left alone (a second forward of the same step, e.g. a diagnostic's, is a no-op).
        Skipped inside ``torch.compile``; there ``project_learned_scales`` after each optimizer step does it
        (``quest_pl.module`` registers it)."""
        if torch.compiler.is_compiling():
            return
        data = self.log_scale.data
        torch.maximum(data, self.floor.log().to(data.dtype), out=data)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self._initialized_seen = False
        old_key, key = prefix + self.scale_name, prefix + self.parameter_name
        if old_key in state_dict and key not in state_dict:  # checkpoint from before the log form: the scale itself
            scale = state_dict.pop(old_key)
            if prefix + "floor" not in state_dict:  # and from before the floor
                state_dict[prefix + "floor"] = (scale.abs() * SCALE_FLOOR).clamp_min(SCALE_EPS)
            state_dict[key] = torch.maximum(scale, state_dict[prefix + "floor"].to(scale.dtype)).log()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def needs_grad(self, x: Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or self.log_scale.requires_grad)

    def remember(self, in_range: Tensor) -> None:
        if self.record_mask:
            self.last_mask = in_range


@torch.no_grad()
def reinitialize_learned_scales(model: nn.Module) -> None:
    """Mark every learned scale of ``model`` uninitialised: its next forward sets it (and its floor) from that forward's
    input by the usual init rule, as on a first batch (``quant.learned_init_steps``, METHOD.md §1.9)."""
    for module in model.modules():
        if isinstance(module, LearnedScale):
            module.initialized.fill_(False)
            module._initialized_seen = False


@torch.no_grad()
def project_learned_scales(model: nn.Module) -> None:
    """Project every learned scale of ``model`` onto its positive range (call after each optimizer step)."""
    for module in model.modules():
        if isinstance(module, LearnedScale):
            module.project()


@torch.no_grad()
def decay_learned_scales(params: list[Tensor], factor: float) -> None:
    """Multiply the scales whose logs are ``params`` by ``factor`` (> 0): the quantizer group's decay, exp(-lr wd)."""
    if factor != 1.0:
        shift = math.log(factor)
        for p in params:
            p.add_(shift)
