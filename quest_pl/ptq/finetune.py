"""AQLM's end-to-end fine-tuning: codebooks and scales (codes fixed) trained by Adam on the KL divergence to the
full-precision model (METHOD.md §5)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from quest_pl.ptq.layers import AQLMLinear

log = logging.getLogger(__name__)


def finetune_aqlm(model: nn.Module, teacher: nn.Module, calib: list[torch.Tensor], steps: int, lr: float,
                  progress: bool = True) -> list[float]:  # fmt: skip
    """End-to-end fine-tuning of every :class:`AQLMLinear`'s codebooks and scales (codes fixed), by Adam on the KL
    divergence from the full-precision ``teacher``'s next-token distribution to the model's, cycling over the
    calibration batches; afterwards codebooks and scales are rounded to fp16 again. Each tensor's step size is ``lr``
    times its mean magnitude. Returns the KL (nats/token) of the first and the last step."""
    from tqdm.auto import tqdm

    layers = [m for m in model.modules() if isinstance(m, AQLMLinear)]
    frozen = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    groups = []
    for m in layers:
        for p in (m.codebooks, m.scales):
            p.requires_grad_(True)
            groups.append({"params": [p], "lr": lr * float(p.detach().abs().mean())})
    opt = torch.optim.Adam(groups)
    kl = []
    with torch.enable_grad():
        for step in tqdm(range(steps), desc="AQLM fine-tuning", unit="step", disable=not progress):
            idx = calib[step % len(calib)]
            with torch.no_grad():
                target = F.log_softmax(teacher(idx).float(), -1).flatten(0, 1)
            logp = F.log_softmax(model(idx).float(), -1).flatten(0, 1)
            loss = F.kl_div(logp, target, log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step in (0, steps - 1):
                kl.append(loss.item())
    with torch.no_grad():
        for m in layers:
            m.codebooks.copy_(m.codebooks.half().float())
            m.scales.copy_(m.scales.half().float())
    for p, flag in frozen.items():
        p.requires_grad_(flag)
    for m in layers:
        m.codebooks.requires_grad_(False)
        m.scales.requires_grad_(False)
    return kl


# -- checkpoints ----------------------------------------------------------------------------------------------------
