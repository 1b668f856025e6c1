"""Quantization wiring: what to quantize is data (:class:`QuantConfig`), how is code (``quantizers``, ``estimators``).

:func:`quantize_model` swaps every ``nn.Linear`` inside the transformer blocks (attention ``c_attn`` and ``c_proj``,
MLP ``w12`` = w1‖w2 and ``c_proj``) for a :class:`QuantLinear`; embeddings, ``lm_head`` and norms stay in full
precision (METHOD.md §2). The model file knows nothing of this.

Hadamard placement (METHOD.md §1.8). Each quantized operand is rotated along ``in_features`` by the block-128 Hadamard H
before its quantizer: ``half`` multiplies in the rotated basis, ``y = Qa(x H) Qw(W H)^T``; ``full`` rotates back
after quantizing, ``y = (Qa(x H) H) (Qw(W H) H)^T``. With both operands quantized the two are equal (H H = I); masks
live in the rotated basis and gradients flow back through H. As in the authors' code the rotation belongs to the
quantizer, so a weight-only ``half`` run computes ``y = x Qw(W H)^T``: a fixed orthogonal re-parametrisation of the
latent weight that needs no Hadamard at inference (the paper's W*A16 runs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from quest_pl import estimators, quantizers
from quest_pl.config import ConfigError

log = logging.getLogger(__name__)

QUANT_PARAM_MARKERS = (".weight_quant.", ".act_quant.")
HADAMARD_MODES = ("half", "full")
KERNEL_MODES = ("auto", "triton", "torch")


@dataclass(frozen=True)
class OperandSpec:
    """How one operand (weight or activation) of every quantized linear is quantized."""

    grid: str
    bits: float | None
    estimator: str
    options: dict = field(default_factory=dict)  # estimator keyword arguments (trust, clip_scale, per_row, ...)

    def build(self, rows: int | None = None) -> nn.Module:
        kw = dict(self.options)
        if self.estimator == "lsq" and kw.get("per_row"):
            kw["rows"] = rows
        return estimators.build(self.estimator, quantizer=quantizers.build(self.grid, bits=self.bits), **kw)


@dataclass(frozen=True)
class QuantConfig:
    name: str
    weight: OperandSpec | None
    act: OperandSpec | None
    hadamard: str | None  # None, "half" or "full"
    kernel: str = "auto"

    @staticmethod
    def validate(q) -> None:
        """Config-level checks with one-line errors (``quant.*`` keys)."""
        QuantConfig.from_cfg(q, None)

    @classmethod
    def from_cfg(cls, q, model_cfg) -> QuantConfig | None:
        if q is None or q.get("grid") is None:
            return None
        get = q.get
        estimator_names = sorted(estimators.ESTIMATORS)
        kernel = get("kernel", "auto")
        if kernel not in KERNEL_MODES:
            raise ConfigError(f"quant.kernel={kernel!r}: expected one of {', '.join(KERNEL_MODES)}")
        mode = get("hadamard_mode", "half")
        if mode not in HADAMARD_MODES:
            raise ConfigError(f"quant.hadamard_mode={mode!r}: expected one of {', '.join(HADAMARD_MODES)}")
        if not isinstance(get("hadamard", False), bool):
            raise ConfigError(f"quant.hadamard={get('hadamard')!r}: expected true or false")
        specs = {}
        for op in ("w", "a"):
            bits = get(f"{op}_bits", get("bits"))
            if bits is None:  # operand left in full precision
                specs[op] = None
                continue
            grid = get(f"{op}_grid") or get("grid")
            est = get(f"{op}_estimator") or get("estimator")
            if grid not in quantizers.GRIDS:
                key = f"quant.{op}_grid" if get(f"{op}_grid") else "quant.grid"
                raise ConfigError(f"{key}={grid!r}: unknown grid; available: {', '.join(sorted(quantizers.GRIDS))}")
            if est not in estimators.ESTIMATORS:
                key = f"quant.{op}_estimator" if get(f"{op}_estimator") else "quant.estimator"
                raise ConfigError(f"{key}={est!r}: unknown estimator; available: {', '.join(estimator_names)}")
            options = {}
            if get("trust") is not None and est == "trust":
                options["trust"] = float(get("trust"))
            if est == "clip":
                options["clip_scale"] = float(get("clip_scale", 1.0))
            if est == "lsq" and get("lsq_per_row") and op == "w":  # per-row steps are for weights only
                options["per_row"] = True
            if est == "pact":
                grad_scale = get("pact_grad_scale", True)
                if not isinstance(grad_scale, bool):
                    raise ConfigError(f"quant.pact_grad_scale={grad_scale!r}: expected true or false")
                options["grad_scale"] = grad_scale
            spec = OperandSpec(grid, bits, est, options)
            try:
                spec.build(rows=1)
            except ValueError as e:
                key = "quant.bits" if bits == get("bits") else f"quant.{op}_bits"
                raise ConfigError(f"{key}={bits!r} with quant.grid={grid!r}, quant.estimator={est!r}: {e}") from None
            specs[op] = spec
        if specs["w"] is None and specs["a"] is None:
            return None
        hadamard = mode if get("hadamard", False) else None
        if kernel == "triton":
            for op, spec in specs.items():
                reason = spec and kernel_unsupported(spec, quantizers.HADAMARD_BLOCK, hadamard is not None)
                if reason:
                    raise ConfigError(
                        f"quant.kernel=triton: the {'weight' if op == 'w' else 'activation'} "
                        f"quantizer has no kernel ({reason}); use quant.kernel=auto or torch"
                    )
        if hadamard and model_cfg is not None:
            block = quantizers.HADAMARD_BLOCK
            for key, width in (("model.d_model", model_cfg.d_model), ("SwiGLU hidden size", model_cfg.ffn_hidden)):
                if width % block:
                    raise ConfigError(
                        f"quant.hadamard=true: {key} = {width} is not a multiple of {block} "
                        f"(the Hadamard block size); choose a width divisible by {block}"
                    )
        return cls(name=get("name", "quant"), weight=specs["w"], act=specs["a"], hadamard=hadamard, kernel=kernel)


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose weight and input pass through estimators (fake quantization) before the matmul.

    ``weight_quant`` and ``act_quant`` are estimator modules (or ``None`` for full precision). ``enabled = False``
    replaces every quantizer by the identity, giving the full-precision layer at the same latent weights (used by the
    gradient-alignment diagnostics): ``x W^T``, or ``x (W H)^T`` for a weight-only half-form layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        weight_quant: nn.Module | None = None,
        act_quant: nn.Module | None = None,
        hadamard: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight_quant = weight_quant
        self.act_quant = act_quant
        self.hadamard = hadamard
        self.enabled = True
        # Per operand: keyword arguments for kernels.quest_quantize when the fused Triton path serves it on CUDA
        # (set by quantize_model from quant.kernel), or None for the PyTorch path.
        self.kernel_args: dict[str, dict | None] = {"weight": None, "act": None}
        self.kernel_mode = "torch"

    def extra_repr(self) -> str:
        return super().extra_repr() + f", hadamard={self.hadamard}"

    def _quantize(self, t: torch.Tensor, quant: nn.Module | None, operand: str) -> torch.Tensor:
        if quant is None:
            return t
        kernel_args = self.kernel_args[operand]
        # Masks for the diagnostics come from the estimator modules: on those steps the PyTorch path runs.
        # auto: on CUDA tensors only; triton: also on CPU tensors (Triton's interpreter, for tests).
        if kernel_args is not None and (t.is_cuda or self.kernel_mode == "triton") and not quant.record_mask:
            from quest_pl import kernels

            q = kernels.quest_quantize(t, **kernel_args)
            return quantizers.hadamard_transform(q) if self.hadamard == "full" else q
        if self.hadamard is None:
            return quant(t)
        # Rotate in fp32 so a bf16 activation is not rounded between the Hadamard and the grid (METHOD.md §7.12).
        q = quant(quantizers.hadamard_transform(t.to(torch.promote_types(t.dtype, torch.float32))))
        if self.hadamard == "full":
            q = quantizers.hadamard_transform(q)
        return q.to(t.dtype)

    def _rotate(self, t: torch.Tensor, quant: nn.Module | None) -> torch.Tensor:
        """The operand with its quantizer replaced by the identity: rotated only where the half form leaves it
        rotated, so a disabled weight-only half layer is ``x (W H)^T``, the same function of the latent weight."""
        if quant is None or self.hadamard != "half" or (self.act_quant is not None and self.weight_quant is not None):
            return t  # full form, or both operands rotated: H H^T = I cancels
        return quantizers.hadamard_transform(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(self._rotate(x, self.act_quant), self._rotate(self.weight, self.weight_quant), self.bias)
        x = self._quantize(x, self.act_quant, "act")
        return F.linear(x, self._quantize(self.weight, self.weight_quant, "weight"), self.bias)


def quantize_model(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` inside ``model.blocks`` by a :class:`QuantLinear` with the same weight.
    Each layer gets its own weight and activation estimators."""
    for block in model.blocks:
        for name, module in list(block.named_modules()):
            if type(module) is not nn.Linear:
                continue
            parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
            q = QuantLinear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                weight_quant=cfg.weight.build(rows=module.out_features) if cfg.weight else None,
                act_quant=cfg.act.build() if cfg.act else None,
                hadamard=cfg.hadamard,
                device=module.weight.device,
                dtype=module.weight.dtype,
            )
            q.kernel_mode = cfg.kernel
            q.kernel_args = {
                "weight": _kernel_args(cfg, cfg.weight, module.in_features),
                "act": _kernel_args(cfg, cfg.act, module.in_features),
            }
            q.weight = module.weight
            if module.bias is not None:
                q.bias = module.bias
            setattr(parent, name.rsplit(".", 1)[-1], q)
    return model


def kernel_unsupported(spec: OperandSpec | None, width: int, hadamard: bool) -> str | None:
    """Why the fused Triton kernel cannot serve this operand here (``kernels.is_supported``), or None if it can."""
    from quest_pl import kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ok, reason = kernels.is_supported(spec.grid, spec.bits, spec.estimator, width, device, hadamard=hadamard)
    return None if ok else reason


def _kernel_args(cfg: QuantConfig, spec: OperandSpec | None, width: int) -> dict | None:
    if spec is None or cfg.kernel == "torch":
        return None
    reason = kernel_unsupported(spec, width, cfg.hadamard is not None)
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
