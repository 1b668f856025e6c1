"""Shared state of the learned-scale estimators (LSQ, PACT; METHOD.md §1.9, fixing §7.6).

The learned scale is an `nn.Parameter` created at construction (never in forward) and initialised from the first
batch it sees. A persistent `initialized` buffer records that, so a state_dict round trip restores the scale exactly
and a resumed run never re-initialises. Under torch.distributed the initial value is averaged over ranks, so all DDP
replicas start from the same scale.

Positivity (issue #11): the scale is kept positive by projection. Every forward first clamps the parameter, in place
and without gradient, onto [floor, inf), where `floor` (a persistent buffer) is SCALE_FLOOR times the initial value
(never below SCALE_EPS). An optimizer step that overshoots below the floor is thus undone before the scale is used:
the forward never quantizes on a mirrored grid, a step of 0 cannot divide, and the range test stays meaningful, so the
input gradient keeps flowing. The optimizer's own state is left alone (projected gradient descent). A checkpoint
written before the floor existed loads with floor = SCALE_FLOOR x |its scale|.
"""

from __future__ import annotations

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
        self.parameter_name = parameter
        self.register_parameter(parameter, nn.Parameter(torch.ones(shape)))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("floor", torch.full(shape, SCALE_EPS))
        self._initialized_seen = False  # host-side copy of `initialized`, so steady-state forwards never sync
        self.record_mask = False
        self.last_mask: Tensor | None = None

    @property
    def learned(self) -> nn.Parameter:
        return getattr(self, self.parameter_name)

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
            self.learned.copy_(value)
            self.floor.copy_((value * SCALE_FLOOR).clamp_min(SCALE_EPS))
            self.initialized.fill_(True)
        self._initialized_seen = True

    @torch.no_grad()
    def project(self) -> None:
        """Clamp the learned parameter onto [floor, inf) in place (positivity; see the module docstring).

        Through ``.data``: the value changes only after an optimizer step, before any graph holds the scale, so the
        autograd version counter is left alone (a second forward of the same step, e.g. a diagnostic's, is a no-op).
        Skipped inside ``torch.compile``; there ``project_learned_scales`` after each optimizer step does it
        (``quest_pl.module`` registers it)."""
        if torch.compiler.is_compiling():
            return
        data = self.learned.data
        torch.maximum(data, self.floor.to(data.dtype), out=data)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self._initialized_seen = False
        scale = state_dict.get(prefix + self.parameter_name)
        if prefix + "floor" not in state_dict and scale is not None:  # checkpoint from before the floor
            state_dict[prefix + "floor"] = (scale.abs() * SCALE_FLOOR).clamp_min(SCALE_EPS)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def needs_grad(self, x: Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or self.learned.requires_grad)

    def remember(self, in_range: Tensor) -> None:
        if self.record_mask:
            self.last_mask = in_range


@torch.no_grad()
def project_learned_scales(model: nn.Module) -> None:
    """Project every learned scale of ``model`` onto its positive range (call after each optimizer step)."""
    for module in model.modules():
        if isinstance(module, LearnedScale):
            module.project()
