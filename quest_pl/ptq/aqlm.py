"""Calibrated PTQ by AQLM (:mod:`quest_pl.quantizers.aqlm`): block by block, each linear's weight coded to minimise
its output error on the calibration inputs it sees (METHOD.md §5)."""

from __future__ import annotations

import copy
import logging
import time
from functools import partial

import torch
from torch import nn

from quest_pl import quantizers
from quest_pl.config import ConfigError
from quest_pl.config.ptq import PTQConfig
from quest_pl.ptq.finetune import finetune_aqlm
from quest_pl.ptq.layers import AQLMLinear

log = logging.getLogger(__name__)


def calibration_batches(dm, n: int) -> list[torch.Tensor]:
    """The inputs of the first ``n`` training micro-batches of the run (its seeded batch order, rank 0)."""
    from quest_pl.data import StepBatches, TokenWindows

    hp = dm.hparams
    batches = StepBatches(TokenWindows(dm.train_tokens, hp.seq_len), hp.batch_size, hp.seed)
    return [batches[m][0] for m in range(n)]


def _block_linears(model: nn.Module, cfg: PTQConfig) -> list[list[tuple[str, nn.Linear]]]:
    """Per block, the ``nn.Linear`` layers AQLM replaces, after checking their widths (one-line errors)."""
    out = []
    g = cfg.aqlm.group_size
    for block in model.blocks:
        linears = [(name, m) for name, m in block.named_modules() if type(m) is nn.Linear]
        for name, m in linears:
            if cfg.hadamard and m.in_features % quantizers.HADAMARD_BLOCK:
                raise ConfigError(
                    f"ptq.hadamard=true: {name} has in_features = {m.in_features}, not a multiple of "
                    f"{quantizers.HADAMARD_BLOCK}"
                )
            if m.in_features % g:
                raise ConfigError(f"ptq.aqlm.group_size={g}: does not divide {name}'s in_features = {m.in_features}")
        out.append(linears)
    return out


@torch.no_grad()
def quantize_model_aqlm(model: nn.Module, cfg: PTQConfig, calib: list[torch.Tensor], progress: bool = True) -> dict:
    """Replace, in place, every ``nn.Linear`` inside ``model.blocks`` by an :class:`AQLMLinear` (on the model's
    device). Block by block: the Gram matrix of each linear's inputs ``H = X^T X / n`` over all tokens of ``calib``
    (inputs of the block computed by the already quantized blocks below; rotated ``H^T ... H`` with the Hadamard),
    then :func:`quest_pl.quantizers.aqlm.quantize` of each weight. With ``cfg.aqlm.finetune_steps``, end-to-end
    fine-tuning follows (:func:`finetune_aqlm`). Returns the statistics ``metrics.json`` reports."""
    from tqdm.auto import tqdm

    from quest_pl.quantizers import aqlm

    s = cfg.aqlm
    start = time.perf_counter()
    per_block = _block_linears(model, cfg)
    _, act_quant = cfg.build_quantizers()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    teacher = copy.deepcopy(model) if s.finetune_steps else None
    calib = [idx.to(device) for idx in calib]
    hidden = _block_inputs(model, calib)  # [(x, *rest)] per batch: the first block's arguments
    layers: dict[str, dict] = {}
    total = sum(len(ls) for ls in per_block)
    bar = tqdm(total=total, desc=f"AQLM {cfg.codebook_layout} layers", unit="layer", disable=not progress)
    for b, (block, linears) in enumerate(zip(model.blocks, per_block)):
        grams = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device)
                 for name, m in linears}  # fmt: skip
        tokens = {name: 0 for name, _ in linears}

        hooks = [m.register_forward_pre_hook(partial(_accumulate_gram, grams, tokens, name)) for name, m in linears]
        try:
            for args in hidden:
                block(*args)
        finally:
            for h in hooks:
                h.remove()
        for name, linear in linears:
            gram = (grams[name] / tokens[name]).float()
            weight = linear.weight.detach().float()
            if cfg.hadamard:
                weight = quantizers.hadamard_transform(weight)
                gram = quantizers.hadamard_transform(quantizers.hadamard_transform(gram).T)  # H^T G H (H symmetric)
            rounds = tqdm(total=s.rounds, desc=f"  blocks.{b}.{name}", unit="round", leave=False, disable=not progress)

            def on_round(_r, err, rounds=rounds):
                rounds.update(1)
                rounds.set_postfix(rel_err=f"{err:.3g}")

            q = aqlm.quantize(
                weight, gram, group_size=s.group_size, num_codebooks=s.num_codebooks,
                codebook_bits=int(cfg.codebook_bits), beam_size=s.beam_size, rounds=s.rounds,
                adam_steps=s.adam_steps, lr=s.lr, kmeans_iters=s.kmeans_iters, tolerance=s.tolerance,
                seed=s.seed + len(layers),
                on_round=on_round,
            )  # fmt: skip
            rounds.close()
            rel = aqlm.relative_error(weight, q.dequantize(), gram)
            layers[f"blocks.{b}.{name}"] = {
                "rel_output_error": rel,
                "weights": weight.numel(),
                "bits_per_weight": q.bits_per_weight(),
            }
            parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
            setattr(parent, name.rsplit(".", 1)[-1], AQLMLinear(q, linear.bias, cfg.hadamard, act_quant))
            bar.update(1)
            bar.set_postfix(rel_err=f"{rel:.3g}")
        hidden = [(block(*args), *args[1:]) for args in hidden]
    bar.close()
    weights = sum(v["weights"] for v in layers.values())
    stats = {
        "codebooks": cfg.codebook_layout,
        "group_size": s.group_size,
        "code_bits_per_weight": s.num_codebooks * cfg.codebook_bits / s.group_size,
        "bits_per_weight": sum(v["bits_per_weight"] * v["weights"] for v in layers.values()) / weights,
        "calib_tokens": sum(idx.numel() for idx in calib),
        "mean_rel_output_error": sum(v["rel_output_error"] for v in layers.values()) / len(layers),
        "layers": layers,
    }
    if s.finetune_steps:
        stats["finetune_kl"] = finetune_aqlm(model, teacher, calib, s.finetune_steps, s.finetune_lr, progress)
    stats["quantize_s"] = time.perf_counter() - start
    model.train(was_training)
    return stats


def _accumulate_gram(grams: dict, tokens: dict, name: str, _module, args) -> None:
    x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
    grams[name].addmm_(x.T, x)
    tokens[name] += x.shape[0]


class _BlockInputs(Exception):
    def __init__(self, args: tuple):
        self.args = args


def _block_inputs(model: nn.Module, calib: list[torch.Tensor]) -> list[tuple]:
    """The positional arguments the first block receives for each calibration batch (the model runs up to it)."""

    def stop(_module, args):
        raise _BlockInputs(tuple(a.detach() if torch.is_tensor(a) else a for a in args))

    hook = model.blocks[0].register_forward_pre_hook(stop)
    out = []
    try:
        for idx in calib:
            try:
                model(idx)
            except _BlockInputs as e:
                out.append(e.args)
    finally:
        hook.remove()
    return out
