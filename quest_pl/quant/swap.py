"""Swapping layers: :func:`quantize_` puts :class:`~quest_pl.quant.linear.QuantLinear` in place of any module's
``nn.Linear`` layers, :func:`quantize_model` on the project's Llama; helpers to find, bypass and count them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from quest_pl.config import ConfigError
from quest_pl.quant.linear import QuantLinear
from quest_pl.quant.spec import (
    BACKWARD_KEYS,
    QUANT_PARAM_MARKERS,
    OperandSpec,
    QuantConfig,
    _int8_config_error,
    kernel_unsupported,
)
from quest_pl.quantizers.base import format_bits_per_element

log = logging.getLogger(__name__)

HEAD_NAMES = ("lm_head", "output", "head", "classifier", "score", "embed_out")


def output_heads(model: nn.Module) -> set[str]:
    """Names of the ``nn.Linear`` layers that :func:`quantize_` leaves in full precision by default: the output head.

    A linear is the head when it is ``model.get_output_embeddings()`` (Hugging Face models), shares its weight with an
    ``nn.Embedding`` (a tied head), is named one of :data:`HEAD_NAMES` (the last part of its name), or is the last
    element of an ``nn.Sequential`` model."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = None
    if callable(getattr(model, "get_output_embeddings", None)):
        try:
            head = model.get_output_embeddings()
        except (NotImplementedError, AttributeError):  # a model class that declares no output embedding
            head = None
    names = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if module is head or id(module.weight) in embedding_weights or name.rsplit(".", 1)[-1] in HEAD_NAMES:
            names.add(name)
    if isinstance(model, nn.Sequential) and len(model) and isinstance(model[-1], nn.Linear):
        names.add(str(len(model) - 1))
    return names


def quantize_(
    model: nn.Module, config: QuantConfig | None, filter_fn: Callable[[nn.Module, str], bool] | None = None
) -> nn.Module:
    """Replace, in place, the chosen ``nn.Linear`` layers of any ``model`` by :class:`QuantLinear` layers holding the
    same weight and bias, and return ``model``. Each layer gets its own weight and activation estimators.

    ``filter_fn(module, name)`` is asked about every module whose type is exactly ``nn.Linear`` (``name`` relative to
    ``model``); subclasses such as ``nn.MultiheadAttention``'s ``out_proj``, whose weight the attention reads directly,
    are never swapped. The default keeps the output head in full precision (:func:`output_heads`); embeddings and
    norms are not linears and always stay in full precision. ``config=None`` leaves the model unchanged. With a
    Hadamard every swapped layer's ``in_features`` must be a multiple of 128: checked before anything is swapped."""
    if config is None:
        return model
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"quantize_: config={config!r}: expected a QuantConfig (e.g. QuantConfig.quest(bits=4))")
    if filter_fn is None:
        heads = output_heads(model)

        def filter_fn(module: nn.Module, name: str) -> bool:
            return name not in heads

    chosen = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and filter_fn(m, n)]
    block = config.hadamard_block
    for name, module in chosen:
        if config.hadamard and module.in_features % block:
            raise ConfigError(
                f"quant.hadamard=true: layer {name} has in_features = {module.in_features}, not a multiple of {block} "
                f"(the Hadamard block size); leave it out with filter_fn or quantize without the Hadamard"
            )
    for name, module in chosen:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        q = QuantLinear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            weight_quant=config.weight.build(rows=module.out_features) if config.weight else None,
            act_quant=config.act.build() if config.act else None,
            hadamard=config.hadamard,
            device=module.weight.device,
            dtype=module.weight.dtype,
            hadamard_block=config.hadamard_block,
            backward=config.backward,
            backward_format=config.backward_format,
            backward_operands=config.backward_operands,
        )
        q.kernel_mode = config.kernel
        q.kernel_args = {
            "weight": _kernel_args(config, config.weight, module.in_features),
            "act": _kernel_args(config, config.act, module.in_features),
        }
        q.matmul = _resolve_matmul(config, q.kernel_args)
        q.weight = module.weight
        if module.bias is not None:
            q.bias = module.bias
        setattr(parent, name.rsplit(".", 1)[-1], q)
    return model


def quantize_model(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """The project's Llama: :func:`quantize_` on every ``nn.Linear`` inside ``model.blocks`` (``lm_head`` stays)."""
    for block in model.blocks:
        quantize_(block, cfg, filter_fn=lambda module, name: True)
    return model


def _resolve_matmul(cfg: QuantConfig, kernel_args: dict) -> str:
    """quant.matmul for one layer: int8 where both operands are kernel-served on a centered integer grid (and, for
    auto, CUDA has INT8 tensor cores), else bf16."""
    backward = {key: getattr(cfg, key) for key in BACKWARD_KEYS}
    if cfg.matmul == "bf16" or _int8_config_error({"w": cfg.weight, "a": cfg.act}, cfg.kernel, **backward):
        return "bf16"
    if kernel_args["weight"] is None or kernel_args["act"] is None:
        return "bf16"
    if cfg.matmul == "int8":
        return "int8"
    from quest_pl.kernels.int8 import cuda_int8_available

    return "int8" if cuda_int8_available() else "bf16"


def _kernel_args(cfg: QuantConfig, spec: OperandSpec | None, width: int) -> dict | None:
    if spec is None or cfg.kernel == "torch":
        return None
    reason = kernel_unsupported(spec, width, cfg.hadamard is not None, cfg.hadamard_block)
    if reason:
        if cfg.kernel == "triton":  # from_cfg checked the grid; a layer width can still be unsupported
            raise ConfigError(f"quant.kernel=triton: {reason}")
        if torch.cuda.is_available():
            log.info(
                "quant.kernel=auto: %s %s-bit %s uses the PyTorch path (%s)",
                spec.grid,
                spec.bits,
                spec.estimator,
                reason,
            )
        return None
    return dict(
        bits=spec.bits,
        grid=spec.grid,
        hadamard=cfg.hadamard is not None,
        estimator=spec.estimator,
        trust=spec.options.get("trust"),
        clip_scale=spec.options.get("clip_scale", 1.0),
        group_size=spec.build_grid().group_size,
    )


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Name -> QuantLinear, in depth order (names relative to ``model``)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@contextmanager
def full_precision(model: nn.Module) -> Iterator[None]:
    """Bypass every quantizer and rotation of ``model`` (``QuantLinear.enabled = False``) inside the block: the
    full-precision model at the same latent weights (METHOD.md §4.2). Each layer's flag is restored on exit."""
    layers = list(quant_layers(model).values())
    flags = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer, flag in zip(layers, flags):
            layer.enabled = flag


def is_quantizer_param(name: str) -> bool:
    """Whether a parameter belongs to a quantizer (LSQ step, PACT clip) rather than to the model."""
    return any(marker in f".{name}" for marker in QUANT_PARAM_MARKERS)


def bits_per_element(q, row_length: int) -> str:
    """Storage bits per element including scales, per operand, from a ``quant`` config: ``"W4.25A4.25"`` (MXFP4),
    ``"W16A16"`` in full precision. Per-row (per-group) scales count ``quantizers.base.SCALE_BITS`` over a row of
    ``row_length`` elements (the group); MX/NV scales their own 8 bits per group (NVFP4's 32-bit tensor scale is not
    counted: under 0.001 bits per element in any layer of the presets). (``Grid.bits_per_element``.)"""
    cfg = QuantConfig.from_cfg(q, None)
    if cfg is None:
        return "W16A16"
    return format_bits_per_element(*(s and s.build_grid() for s in (cfg.weight, cfg.act)), row_length)
