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
    norms are not linears and always stay in full precision. ``config=None`` leaves the model unchanged.

    Every check runs, and every replacement layer is built, before the model is changed: an error leaves it as it was.
    Refused with a ``ValueError`` (:class:`ConfigError`): a model that already holds :class:`QuantLinear` layers
    (quantizing twice would keep the first config's layers; start from the full-precision model), a model in which
    nothing is chosen (no ``nn.Linear``, e.g. GPT-2's ``Conv1D`` projections, or a ``filter_fn`` choosing none), and
    with a Hadamard or group scales a chosen layer whose ``in_features`` is not a multiple of the block or group."""
    if config is None:
        return model
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"quantize_: config={config!r}: expected a QuantConfig (e.g. QuantConfig.quest(bits=4))")
    done = [n or type(model).__name__ for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if done:
        raise ConfigError(
            f"quantize_: the model is already quantized ({len(done)} QuantLinear layers, e.g. {done[0]}); quantize_ "
            "swaps full-precision nn.Linear layers: apply it once, to a model without QuantLinear layers"
        )
    if filter_fn is None:
        heads = output_heads(model)

        def filter_fn(module: nn.Module, name: str) -> bool:
            return name not in heads

    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    chosen = [(n, m) for n, m in linears if filter_fn(m, n)]
    if not chosen:
        if linears:
            why = f"filter_fn chose none of its {len(linears)} nn.Linear layers"
        else:
            other = sorted({type(m).__name__ for m in model.modules() if getattr(m, "weight", None) is not None})
            why = "it has no nn.Linear layer" + (f" (layers with weights: {', '.join(other)})" if other else "")
        raise ConfigError(f"quantize_: nothing to quantize in {type(model).__name__}: {why}")
    block = config.hadamard_block
    groups = [spec.build_grid().group_size or 0 for spec in (config.weight, config.act) if spec is not None]
    for name, module in chosen:
        if config.hadamard and module.in_features % block:
            raise ConfigError(
                f"quant.hadamard=true: layer {name} has in_features = {module.in_features}, not a multiple of {block} "
                f"(the Hadamard block size); leave it out with filter_fn or quantize without the Hadamard"
            )
        for group in groups:
            if group and module.in_features % group:
                raise ConfigError(
                    f"quant.group_size: layer {name} has in_features = {module.in_features}, not a multiple of the "
                    f"group size {group}; leave it out with filter_fn or choose another group size"
                )
    swaps = [(name, _quant_linear(config, module)) for name, module in chosen]  # may raise: nothing changed yet
    for name, q in swaps:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], q)
    return model


def _quant_linear(config: QuantConfig, module: nn.Linear) -> QuantLinear:
    """The :class:`QuantLinear` that replaces ``module``, holding its weight and bias (the same parameters)."""
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
    return q


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
