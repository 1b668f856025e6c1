"""Freeze a QAT model for inference: :func:`convert_` replaces every ``QuantLinear`` of any ``nn.Module`` by a
:class:`PackedLinear` holding the quantized weight as codes and scales (``quest_pl.packing``) and keeping the
activation quantizer, the Hadamard transform and the bias.

The lifecycle (README, "Your own model"): ``quantize_`` (QAT) -> train with any loop -> ``convert_`` ->
``save_quantized`` / ``load_quantized`` (``quest_pl.saving``) or, for a ``transformers`` model, ``save_pretrained`` /
``AutoModelForCausalLM.from_pretrained`` (``quest_pl.hub``). A converted model's outputs equal the QAT model's eval
forward (PyTorch path) at the same latent weights to the last bit on CPU in fp32: the weight decodes to the quantizer's
own output bit for bit (checked while converting), and the activation path makes the same calls as ``QuantLinear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quest_pl import quantizers
from quest_pl.intpath import int_linear
from quest_pl.packing import (
    FORMAT,
    FORMAT_VERSION,
    decode_weight,
    encode_weight,
    is_int_estimator,
    odd_codes,
    packed_shapes,
)

QUANT_METHOD = "quest_pl"
"""The ``quant_method`` of the ``quantization_config`` a converted ``transformers`` model carries."""


def act_meta(est: nn.Module | None) -> dict | None:
    """What rebuilds an activation estimator (:func:`build_act_quant`): estimator, grid, bits, options, grid options
    and, for per-row LSQ, the number of rows."""
    if est is None:
        return None
    grid = getattr(est, "quantizer", None)
    grid_options = {}
    if grid is not None and grid.group_size is not None and grid.fixed_group_size is None:
        grid_options["group_size"] = grid.group_size
    if getattr(grid, "scale_rule", None) is not None:
        grid_options["scale_rule"] = grid.scale_rule
    return {
        "estimator": est.name,
        "grid": None if grid is None else grid.name,
        "bits": None if grid is None else grid.bits,
        "options": {k: v for k, v in vars(est).items() if k in ("trust", "clip_scale", "per_row")},
        "grid_options": grid_options,
        "rows": est.log_step.shape[0] if est.name == "lsq" and est.per_row else None,
    }


def build_act_quant(meta: dict | None) -> nn.Module | None:
    """The activation estimator described by :func:`act_meta` (its state loads with the layer), in eval mode."""
    from quest_pl.quant import OperandSpec

    if meta is None:
        return None
    spec = OperandSpec(meta["grid"], meta["bits"], meta["estimator"], meta["options"], meta.get("grid_options", {}))
    return spec.build(rows=meta.get("rows") or None).eval()


class PackedLinear(nn.Module):
    """A frozen quantized linear: the packed weight tensors of ``quest_pl.packing`` as buffers (named as in the file),
    the activation estimator, the Hadamard form and the bias; ``forward`` computes what ``QuantLinear.forward``
    computes in eval mode (PyTorch path). The dequantized weight is decoded on first use and kept until a buffer
    changes.

    ``int_path = True`` (INT grids with per-row scales on both operands) computes the layer as the exact integer
    matmul of the odd codes times per-row scales instead (``quest_pl.intpath``; equal up to fp32 rounding).

    ``meta``: the layer's entry of the file's layer table (format, grid, bits, group size, rows, cols, Hadamard form
    and block, whether the weight is quantized, the activation quantizer, bias). Built from ``meta`` alone, the
    buffers are allocated empty (on ``device``) for a loader to fill.
    """

    def __init__(self, meta: dict, tensors: dict[str, Tensor] | None = None, act_quant: nn.Module | None = None,
                 bias: Tensor | None = None, device=None):  # fmt: skip
        super().__init__()
        self.meta = dict(meta)
        self.in_features, self.out_features = meta["cols"], meta["rows"]
        self.hadamard = meta["hadamard"]
        self.hadamard_block = meta.get("hadamard_block", quantizers.HADAMARD_BLOCK)
        for name, (shape, dtype) in packed_shapes(meta).items():
            value = torch.empty(shape, dtype=dtype, device=device) if tensors is None else tensors[name]
            if tuple(value.shape) != shape or value.dtype != dtype:
                raise ValueError(f"packed tensor {name}: {value.dtype} {list(value.shape)}, expected {dtype} {shape}")
            self.register_buffer(name, value)
        self.packed_names = tuple(packed_shapes(meta))
        if bias is None and meta.get("bias"):
            bias = torch.empty(meta["rows"], dtype=getattr(torch, meta["bias"]), device=device)
        self.register_buffer("bias", bias)
        self.act_quant = build_act_quant(meta.get("act")) if act_quant is None else act_quant
        self.int_path = False
        self._cache: tuple | None = None

    @classmethod
    @torch.no_grad()
    def from_quant_linear(cls, layer: nn.Module) -> PackedLinear:
        """The frozen form of a ``QuantLinear`` (its activation estimator moves over, state and all)."""
        if not layer.enabled:
            raise ValueError("convert_: a QuantLinear has its quantizers turned off (enabled = False)")
        for est in (layer.weight_quant, layer.act_quant):
            if est is not None and hasattr(est, "initialized") and not bool(est.initialized):
                raise ValueError(
                    f"convert_: the learned {est.name} scale was never initialised; run a forward pass (training or "
                    "a calibration batch) before converting"
                )
        enc = encode_weight(layer)
        meta = enc.meta | {
            "hadamard": layer.hadamard,
            "hadamard_block": layer.hadamard_block,
            "weight_quantized": layer.weight_quant is not None,
            "act": act_meta(layer.act_quant),
            "bias": None if layer.bias is None else str(layer.bias.dtype).removeprefix("torch."),
        }
        device = layer.weight.device
        tensors = {k: v.to(device).contiguous() for k, v in enc.tensors.items()}
        bias = None if layer.bias is None else layer.bias.detach().clone()
        act = layer.act_quant.eval() if layer.act_quant is not None else None
        return cls(meta, tensors, act, bias)

    @property
    def supports_int_path(self) -> bool:
        ints = self.meta["format"] in ("int", "int_sparse24") and not self.meta.get("group_size")
        return ints and is_int_estimator(self.act_quant)

    def extra_repr(self) -> str:
        block = f", hadamard_block={self.hadamard_block}" if self.hadamard and self.hadamard_block != 128 else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.meta['format']}, hadamard={self.hadamard}{block}"
        )

    def packed_tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self.packed_names}

    def _decoded(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(weight as the matmul uses it, odd codes, step / 2 per row), decoded once per version of the buffers."""
        tensors = self.packed_tensors()
        key = tuple((t.data_ptr(), t._version, t.device) for t in tensors.values())
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                weight_q = decode_weight(tensors, self.meta)
                codes = half = None
                if self.meta["format"] in ("int", "int_sparse24") and not self.meta.get("group_size"):
                    step = tensors["scale"].float()
                    codes, half = odd_codes(weight_q, step.reshape(-1, 1)), step / 2  # exact halving
                if self.hadamard == "full" and self.meta["weight_quantized"]:
                    weight_q = quantizers.hadamard_transform(weight_q, self.hadamard_block)
            self._cache = (key, weight_q, codes, half)
        return self._cache[1:]

    def dequantized_weight(self) -> Tensor:
        """The fp32 matrix the float path multiplies by: ``Qw(W H)`` (half form), ``Qw(W H) H`` (full form)."""
        return self._decoded()[0]

    def _quantize_act(self, x: Tensor) -> Tensor:
        """``QuantLinear._quantize(x, act_quant, "act")``, PyTorch path."""
        if self.act_quant is None:
            return x
        if self.hadamard is None:
            return self.act_quant(x)
        block = self.hadamard_block
        q = self.act_quant(quantizers.hadamard_transform(x.to(torch.promote_types(x.dtype, torch.float32)), block))
        if self.hadamard == "full":
            q = quantizers.hadamard_transform(q, block)
        return q.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        weight, codes, half = self._decoded()
        if self.int_path:
            y = int_linear(x, self.act_quant, self.hadamard, self.hadamard_block, codes, half)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(self._quantize_act(x), weight.to(x.dtype), bias)


def packed_layers(model: nn.Module) -> dict[str, PackedLinear]:
    """Name -> PackedLinear, in depth order (names relative to ``model``)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def layer_table(model: nn.Module) -> dict:
    """The format's description of a converted model: format, version, and each packed layer's metadata."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layers": {name: m.meta for name, m in packed_layers(model).items()},
    }


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


@torch.no_grad()
def convert_(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``QuantLinear`` of ``model`` by its :class:`PackedLinear` and return ``model``.

    Every layer is encoded (and checked to decode bit for bit) before any is replaced, so a refusal leaves the model as
    it was. A ``transformers`` model (one with a ``config`` and ``save_pretrained``) also gets
    ``config.quantization_config``, so ``save_pretrained`` writes a directory that ``from_pretrained`` reloads after
    ``import quest_pl`` (``quest_pl.hub``). Raises ``ValueError`` when there is no ``QuantLinear`` to convert, a
    layer's quantizers are turned off, or a learned scale was never initialised; ``ConfigError`` for a weight grid the
    packed format has no layout for."""
    from quest_pl.quant import QuantLinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_: model={type(model).__name__}: expected a torch.nn.Module")
    if isinstance(model, QuantLinear):
        raise ValueError("convert_: model is a single QuantLinear; use PackedLinear.from_quant_linear(layer)")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        already = " (it is already converted)" if packed_layers(model) else ""
        raise ValueError(
            f"convert_: {type(model).__name__} has no QuantLinear layer{already}; quantize it with "
            "quest_pl.quantize_(model, config) and train it first"
        )
    packed = {name: PackedLinear.from_quant_linear(layer) for name, layer in layers.items()}
    for name, layer in packed.items():
        replace_module(model, name, layer)
    config = getattr(model, "config", None)
    if callable(getattr(model, "save_pretrained", None)) and hasattr(config, "to_dict"):
        config.quantization_config = {"quant_method": QUANT_METHOD} | layer_table(model)
    return model


def set_int_path(model: nn.Module, enabled: bool = True) -> int:
    """Switch every :class:`PackedLinear` that supports it to the integer path; returns how many were switched."""
    n = 0
    for m in packed_layers(model).values():
        m.int_path = enabled and m.supports_int_path
        n += m.int_path
    return n
