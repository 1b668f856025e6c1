"""Data-free PTQ: each block linear's weight replaced once by ``Q(W H)`` (:class:`PTQLinear`), the grid and the
rotation applied exactly as a QAT arm's ``QuantLinear`` applies them (METHOD.md §5)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from quest_pl import quantizers
from quest_pl.config import ConfigError
from quest_pl.config.ptq import PTQConfig
from quest_pl.ptq.layers import PTQLinear

log = logging.getLogger(__name__)


def quantize_weight(
    weight: torch.Tensor,
    grid: nn.Module,
    hadamard: bool,
    group_size: int | None = None,
    hadamard_block: int = quantizers.HADAMARD_BLOCK,
) -> torch.Tensor:
    """``Q(W H)`` (or ``Q(W)``) in the weight's dtype, computed as QAT's ``QuantLinear`` quantizes its weight: the
    block-``hadamard_block`` rotation in fp32, then the grid (its own per-row or per-group scales). ``group_size``
    only for a PTQ-only group that the grid cannot take (a multiple of 128 that is no power of two, e.g. 384): each
    run of ``group_size`` elements of a row is then a row of the per-row grid."""
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    w = quantizers.hadamard_transform(w, hadamard_block) if hadamard else w
    if group_size is None or getattr(grid, "group_size", None) == group_size:
        return grid(w).to(weight.dtype)
    rows, cols = w.shape
    return grid(w.reshape(rows, cols // group_size, group_size)).reshape(rows, cols).to(weight.dtype)


@torch.no_grad()
def quantize_model_ptq(model: nn.Module, cfg: PTQConfig) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` inside ``model.blocks`` by a :class:`PTQLinear` holding ``Q(W H)``
    (the data-free grids; AQLM needs calibration data: :func:`quantize_model_aqlm`)."""
    if cfg.method != "scalar":
        raise ValueError(f"quantize_model_ptq: method {cfg.method!r} needs calibration data (quantize_model_aqlm)")
    grid, act_grid = cfg.build_quantizers()
    block = cfg.hadamard_block
    for b in model.blocks:
        for name, module in list(b.named_modules()):
            if type(module) is not nn.Linear:
                continue
            cols = module.in_features
            if cfg.hadamard and cols % block:
                key = "ptq.hadamard=true" if block == quantizers.HADAMARD_BLOCK else f"ptq.hadamard_block={block}"
                raise ConfigError(f"{key}: {name} has in_features = {cols}, not a multiple of {block}")
            for key, g in (("group_size", cfg.group_size), ("act_group_size", act_grid and act_grid.group_size)):
                if g and cols % g:
                    raise ConfigError(f"ptq.{key}={g}: does not divide {name}'s in_features = {cols}")
            weight_q = quantize_weight(module.weight.detach(), grid, cfg.hadamard, cfg.group_size, block)
            parent = b.get_submodule(name.rsplit(".", 1)[0]) if "." in name else b
            layer = PTQLinear(weight_q, module.bias, cfg.hadamard, act_grid, hadamard_block=block)
            setattr(parent, name.rsplit(".", 1)[-1], layer)
    return model


# -- AQLM (calibrated additive quantization) ------------------------------------------------------------------------
