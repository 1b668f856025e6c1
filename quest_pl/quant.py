"""Quantization wiring: what to quantize is data (:class:`QuantConfig`), how is code (``quantizers``, ``estimators``).

:func:`quantize_` swaps the ``nn.Linear`` layers of any ``nn.Module`` for :class:`QuantLinear` (by default all but the
output head; ``filter_fn`` chooses). :func:`quantize_model` is its use on the project's Llama: every ``nn.Linear``
inside the transformer blocks (attention ``c_attn`` and ``c_proj``, MLP ``w12`` = w1‖w2 and ``c_proj``); embeddings,
``lm_head`` and norms stay in full precision (METHOD.md §2). The model file knows nothing of this.

Hadamard placement (METHOD.md §1.8). Each quantized operand is rotated along ``in_features`` by the block-128 Hadamard H
before its quantizer: ``half`` multiplies in the rotated basis, ``y = Qa(x H) Qw(W H)^T``; ``full`` rotates back
after quantizing, ``y = (Qa(x H) H) (Qw(W H) H)^T``. With both operands quantized the two are equal (H H = I); masks
live in the rotated basis and gradients flow back through H. As in the authors' code the rotation belongs to the
quantizer, so a weight-only ``half`` run computes ``y = x Qw(W H)^T``: a fixed orthogonal re-parametrisation of the
latent weight that needs no Hadamard at inference (the paper's W*A16 runs). ``quant.hadamard_block`` (16-128) sets
the block; group scales (``quant.group_size``, and the MXFP4/NVFP4 grids) nest with it (``quantizers.base``).

``quant.backward`` = ``sr`` | ``rtn`` | ``rtn_rht`` quantizes the output gradient entering both backward GEMMs, in
``quant.backward_format`` (``nvfp4``, ``mxfp4``, ``int8`` or ``fp8``; ``rtn`` + ``fp8`` runs on FP8 tensor cores
with ``quant.matmul=int8``), and with ``quant.backward_operands=all`` the saved weight
and activation too (``estimators.backward``); ``none`` keeps the full-precision backward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from quest_pl import estimators, quantizers
from quest_pl.config import ConfigError
from quest_pl.estimators.backward import (
    BACKWARD_FORMATS,
    BACKWARD_MODES,
    BACKWARD_OPERANDS,
    quantized_backward_linear,
)

log = logging.getLogger(__name__)

QUANT_PARAM_MARKERS = (".weight_quant.", ".act_quant.")
HADAMARD_MODES = ("half", "full")
KERNEL_MODES = ("auto", "triton", "torch")
MATMUL_MODES = ("auto", "int8", "bf16")
# The quantized backward's keys (estimators.backward): allowed values, and defaults (experiments/quant/bf16.yaml).
BACKWARD_KEYS = dict(backward=BACKWARD_MODES, backward_format=BACKWARD_FORMATS, backward_operands=BACKWARD_OPERANDS)
BACKWARD_DEFAULTS = {"backward": "none", "backward_format": "nvfp4", "backward_operands": "grad"}


@dataclass(frozen=True)
class OperandSpec:
    """How one operand (weight or activation) of every quantized linear is quantized."""

    grid: str
    bits: float | None
    estimator: str
    options: dict = field(default_factory=dict)  # estimator keyword arguments (trust, clip_scale, per_row, ...)
    grid_options: dict = field(default_factory=dict)  # grid keyword arguments (group_size, scale_rule)

    def build_grid(self) -> quantizers.Grid:
        return quantizers.build(self.grid, bits=self.bits, **self.grid_options)

    def build(self, rows: int | None = None) -> nn.Module:
        kw = dict(self.options)
        if self.estimator == "lsq" and kw.get("per_row"):
            kw["rows"] = rows
        return estimators.build(self.estimator, quantizer=self.build_grid(), **kw)


@dataclass(frozen=True)
class QuantConfig:
    name: str
    weight: OperandSpec | None
    act: OperandSpec | None
    hadamard: str | None  # None, "half" or "full"
    kernel: str = "auto"
    matmul: str = "auto"  # forward GEMM of a W·A layer: int8 (integer codes, METHOD.md §5), bf16, or auto
    hadamard_block: int = quantizers.HADAMARD_BLOCK
    backward: str = "none"  # "none" | "sr" | "rtn_rht" (estimators.backward)
    backward_format: str = "nvfp4"  # "nvfp4" | "mxfp4" | "int8"
    backward_operands: str = "grad"  # "grad" (the output gradient) | "all" (also the saved weight and activation)
    # Optimizer steps during which every learned scale is set from each training batch by its init rule, not trained
    # (quest_pl.module; METHOD.md §1.9); 0: initialised on the first batch only.
    learned_init_steps: int = 0

    def __post_init__(self) -> None:
        """Checks for a config built directly in Python (``from_cfg`` and ``make`` build valid ones)."""
        check_backward({key: getattr(self, key) for key in BACKWARD_KEYS}, "QuantConfig.")
        learned_init_error(self.learned_init_steps, [self.weight, self.act], "QuantConfig.learned_init_steps")
        if self.hadamard not in (None, *HADAMARD_MODES):
            raise ConfigError(f"QuantConfig.hadamard={self.hadamard!r}: expected None, 'half' or 'full'")
        if self.kernel not in KERNEL_MODES:
            raise ConfigError(f"QuantConfig.kernel={self.kernel!r}: expected one of {', '.join(KERNEL_MODES)}")
        for op in ("weight", "act"):
            spec = getattr(self, op)
            if spec is not None and not isinstance(spec, OperandSpec):
                raise ConfigError(f"QuantConfig.{op}={spec!r}: expected an OperandSpec or None (full precision)")
            if spec is None:
                continue
            if spec.grid not in quantizers.GRIDS:
                raise ConfigError(
                    f"QuantConfig.{op}.grid={spec.grid!r}: unknown grid; "
                    f"available: {', '.join(sorted(quantizers.GRIDS))}"
                )
            if spec.estimator not in estimators.ESTIMATORS:
                raise ConfigError(
                    f"QuantConfig.{op}.estimator={spec.estimator!r}: unknown estimator; "
                    f"available: {', '.join(sorted(estimators.ESTIMATORS))}"
                )
            try:
                spec.build(rows=1)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"QuantConfig.{op}={spec}: {e}") from None

    @classmethod
    def make(cls, **options) -> QuantConfig:
        """A config from the keys of the ``quant`` config group, without Hydra: ``QuantConfig.make(grid="fp4",
        bits=4, hadamard=True)``. Keys and defaults are those of ``experiments/quant/bf16.yaml`` (``w_bits``/``a_bits``
        default to ``bits``; ``a_bits=None`` leaves activations in full precision). Errors are :class:`ConfigError`."""
        from omegaconf import OmegaConf

        from quest_pl.config import CONFIG_DIR

        base = OmegaConf.load(CONFIG_DIR / "quant" / "bf16.yaml")
        unknown = sorted(set(options) - set(base))
        if unknown:
            raise ConfigError(
                f"QuantConfig.make({unknown[0]}=...): unknown option; expected some of {', '.join(sorted(base))}"
            )
        q = OmegaConf.merge(base, {"name": "quant"}, options)
        grids = ", ".join(sorted(quantizers.GRIDS))
        for key in ("grid", "w_grid", "a_grid"):
            if q[key] is not None and q[key] not in quantizers.GRIDS:
                raise ConfigError(f"QuantConfig.make({key}={q[key]!r}): unknown grid; available: {grids}")
        config = cls.from_cfg(q, None)
        if config is None:
            raise ConfigError(
                f"QuantConfig.make(grid={q.grid!r}, bits={q.bits!r}): nothing to quantize; "
                "give a grid and bits for at least one operand"
            )
        return config

    @classmethod
    def quest(cls, bits: float = 4, **options) -> QuantConfig:
        """QuEST at ``bits`` (METHOD.md §1.10): Gaussian-MSE INT grid, trust estimator, block-128 Hadamard (half form),
        weights and activations; at 1 bit the clip estimator with c = 1.3, as the paper's W1A1 runs. ``options``
        override any ``quant`` key, e.g. ``a_bits=None`` for weight-only, ``hadamard_mode="full"``."""
        w_bits, a_bits = options.get("w_bits", bits), options.get("a_bits", bits)
        name = f"quest_w{w_bits or 16}a{a_bits or 16}"
        preset = dict(grid="gaussian_mse", bits=bits, estimator="trust", hadamard=True, name=name)
        if bits == 1:
            preset.update(estimator="clip", clip_scale=1.3)
        return cls.make(**{**preset, **options})

    @staticmethod
    def validate(q) -> None:
        """Config-level checks with one-line errors (``quant.*`` keys)."""
        QuantConfig.from_cfg(q, None)

    @classmethod
    def from_cfg(cls, q, model_cfg) -> QuantConfig | None:
        if q is None:
            return None
        get = q.get
        backward = {key: get(key, default) for key, default in BACKWARD_DEFAULTS.items()}
        check_backward(backward, "quant.")  # first: a typo is an error even in a full-precision arm
        learned_init_steps = get("learned_init_steps", 0)
        learned_init_error(learned_init_steps, [])  # the type, also in a full-precision arm
        if get("grid") is None:
            return None
        estimator_names = sorted(estimators.ESTIMATORS)
        kernel = get("kernel", "auto")
        if kernel not in KERNEL_MODES:
            raise ConfigError(f"quant.kernel={kernel!r}: expected one of {', '.join(KERNEL_MODES)}")
        mode = get("hadamard_mode", "half")
        if mode not in HADAMARD_MODES:
            raise ConfigError(f"quant.hadamard_mode={mode!r}: expected one of {', '.join(HADAMARD_MODES)}")
        if not isinstance(get("hadamard", False), bool):
            raise ConfigError(f"quant.hadamard={get('hadamard')!r}: expected true or false")
        block = get("hadamard_block", quantizers.HADAMARD_BLOCK)
        if block not in quantizers.HADAMARD_BLOCKS or isinstance(block, bool):
            blocks = ", ".join(map(str, quantizers.HADAMARD_BLOCKS))
            raise ConfigError(f"quant.hadamard_block={block!r}: expected one of {blocks}")
        grid_options = {k: get(k) for k in ("group_size", "scale_rule") if get(k) is not None}
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
            if grid_options:
                spec = OperandSpec(grid, bits, est, options, grid_options)
                keys = ", ".join(f"quant.{k}={v!r}" for k, v in grid_options.items())
                if est in ("lsq", "pact") and "group_size" in grid_options:
                    raise ConfigError(f"{keys}: the learned-scale estimator {est!r} has no group scales")
                try:
                    spec.build(rows=1)
                except ValueError as e:
                    raise ConfigError(f"{keys} with quant.grid={grid!r}: {e}") from None
            specs[op] = spec
        if specs["w"] is None and specs["a"] is None:
            return None
        learned_init_error(learned_init_steps, list(specs.values()))
        hadamard = mode if get("hadamard", False) else None
        matmul = get("matmul", "auto")
        if matmul not in MATMUL_MODES:
            raise ConfigError(f"quant.matmul={matmul!r}: expected one of {', '.join(MATMUL_MODES)}")
        if matmul == "int8":
            reason = _int8_config_error(specs, kernel, **backward)
            if reason:
                raise ConfigError(f"quant.matmul=int8: {reason}; use quant.matmul=auto or bf16")
        if kernel == "triton":
            for op, spec in specs.items():
                reason = spec and kernel_unsupported(spec, quantizers.HADAMARD_BLOCK, hadamard is not None, block)
                if reason:
                    raise ConfigError(
                        f"quant.kernel=triton: the {'weight' if op == 'w' else 'activation'} "
                        f"quantizer has no kernel ({reason}); use quant.kernel=auto or torch"
                    )
        if hadamard and model_cfg is not None:
            for key, width in (("model.d_model", model_cfg.d_model), ("SwiGLU hidden size", model_cfg.ffn_hidden)):
                if width % block:
                    raise ConfigError(
                        f"quant.hadamard=true: {key} = {width} is not a multiple of {block} "
                        f"(the Hadamard block size); choose a width divisible by {block}"
                    )
        group = max((spec.build_grid().group_size or 0) for spec in specs.values() if spec)
        if group and model_cfg is not None:
            for key, width in (("model.d_model", model_cfg.d_model), ("SwiGLU hidden size", model_cfg.ffn_hidden)):
                if width % group:
                    raise ConfigError(f"quant.group_size: {key} = {width} is not a multiple of the group size {group}")
        return cls(
            name=get("name", "quant"),
            weight=specs["w"],
            act=specs["a"],
            hadamard=hadamard,
            kernel=kernel,
            matmul=matmul,
            hadamard_block=block,
            learned_init_steps=learned_init_steps,
            **backward,
        )


def check_backward(values: dict, prefix: str) -> None:
    """Each quantized-backward key of ``values`` (:data:`BACKWARD_KEYS`) is one of its allowed values."""
    for key, value in values.items():
        if value not in BACKWARD_KEYS[key]:
            raise ConfigError(f"{prefix}{key}={value!r}: expected one of {', '.join(BACKWARD_KEYS[key])}")


def has_learned_scale(estimator: str) -> bool:
    """Whether the registered estimator ``estimator`` owns a learned scale (LSQ's step, PACT's clip level)."""
    from quest_pl.estimators.learned import LearnedScale

    cls = estimators.ESTIMATORS.get(estimator)
    return isinstance(cls, type) and issubclass(cls, LearnedScale)


def learned_init_error(steps, specs: list, key: str = "quant.learned_init_steps") -> None:
    """``quant.learned_init_steps``: an integer >= 0, and > 0 only when an operand of ``specs`` (OperandSpec or None;
    an empty list skips this part) has a learned scale."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ConfigError(
            f"{key}={steps!r}: expected an integer >= 0 (optimizer steps during which the learned scales are set "
            "from each batch; 0: from the first batch only)"
        )
    quantized = [spec for spec in specs if spec is not None]
    if steps and quantized and not any(has_learned_scale(spec.estimator) for spec in quantized):
        used = " and ".join(sorted({spec.estimator for spec in quantized}))
        learned = " or ".join(sorted(name for name in estimators.ESTIMATORS if has_learned_scale(name)))
        raise ConfigError(
            f"{key}={steps!r}: expected 0, as no quantized operand has a learned scale (estimator {used}); "
            f"a value > 0 needs {learned} on an operand"
        )


def _int8_config_error(
    specs: dict, kernel: str, backward: str = "none", backward_format: str = "nvfp4", backward_operands: str = "grad"
) -> str | None:
    """Why the INT8 forward GEMM cannot serve these operands (both quantized, centered integer grid <= 7 bits with one
    scale per row, a kernel estimator, kernels allowed, the full-precision backward or the FP8 one on the exact codes
    of grids of at most 4 bits), or None."""
    from quest_pl.kernels.gemm import FP8_MAX_BITS
    from quest_pl.kernels.int8 import int8_unsupported

    fp8 = (backward, backward_format, backward_operands) == ("rtn", "fp8", "grad")
    if backward != "none" and not fp8:  # the INT8 path's own backward is bf16 or FP8 (kernels.fp8)
        return (
            f"the quantized backward (quant.backward={backward}, backward_format={backward_format}, "
            f"backward_operands={backward_operands}) runs with the bf16 matmul; the int8 path's is rtn, fp8, grad"
        )
    if fp8 and any(spec is not None and spec.bits > FP8_MAX_BITS for spec in specs.values()):
        return f"the fp8 backward takes the saved codes exact in E4M3: grids of at most {FP8_MAX_BITS} bits"

    if specs["w"] is None or specs["a"] is None:
        return "it needs both operands quantized (a W·A configuration)"
    if kernel == "torch":
        return "it runs on the fused kernels, and quant.kernel=torch turns them off"
    for op, spec in specs.items():
        reason = int8_unsupported(spec.grid, spec.bits, spec.estimator, spec.build_grid().group_size)
        if reason:
            return f"{'weight' if op == 'w' else 'activation'}: {reason}"
    return None


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
        hadamard_block: int = quantizers.HADAMARD_BLOCK,
        backward: str = "none",
        backward_format: str = "nvfp4",
        backward_operands: str = "grad",
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight_quant = weight_quant
        self.act_quant = act_quant
        self.hadamard = hadamard
        self.hadamard_block = hadamard_block
        self.backward = backward
        self.backward_format = backward_format
        self.backward_operands = backward_operands
        self.enabled = True
        # Per operand: keyword arguments for kernels.quest_quantize when the fused Triton path serves it on CUDA
        # (set by quantize_model from quant.kernel), or None for the PyTorch path.
        self.kernel_args: dict[str, dict | None] = {"weight": None, "act": None}
        self.kernel_mode = "torch"
        # "int8": the forward GEMM on integer codes when both operands are kernel-served (kernels.int8); "bf16": the
        # fake-quantized product. Set by quantize_model (quant.matmul=auto resolves to int8 on CUDA sm_80+).
        self.matmul = "bf16"
        self._frozen_weight_codes = None  # (key, codes, scales): inference reuses the weight's codes

    def extra_repr(self) -> str:
        extra = f", hadamard_block={self.hadamard_block}" if self.hadamard and self.hadamard_block != 128 else ""
        if self.backward != "none":
            extra += f", backward={self.backward}, backward_format={self.backward_format}"
            extra += f", backward_operands={self.backward_operands}"
        return super().extra_repr() + f", hadamard={self.hadamard}" + extra

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
        block = self.hadamard_block
        q = quant(quantizers.hadamard_transform(t.to(torch.promote_types(t.dtype, torch.float32)), block))
        if self.hadamard == "full":
            q = quantizers.hadamard_transform(q, block)
        return q.to(t.dtype)

    def _rotate(self, t: torch.Tensor, quant: nn.Module | None) -> torch.Tensor:
        """The operand with its quantizer replaced by the identity: rotated only where the half form leaves it
        rotated, so a disabled weight-only half layer is ``x (W H)^T``, the same function of the latent weight."""
        if quant is None or self.hadamard != "half" or (self.act_quant is not None and self.weight_quant is not None):
            return t  # full form, or both operands rotated: H H^T = I cancels
        return quantizers.hadamard_transform(t, self.hadamard_block)

    def _uses_int8(self, x: torch.Tensor) -> bool:
        """Whether this call runs the INT8 forward (METHOD.md §5): both operands on the fused kernels, no mask
        recording (the diagnostics read masks from the estimator modules), and int8 asked for or auto on sm_80+."""
        if self.matmul == "bf16" or self.kernel_args["act"] is None or self.kernel_args["weight"] is None:
            return False
        if self.act_quant.record_mask or self.weight_quant.record_mask:
            return False
        return self.matmul == "int8" and (x.is_cuda or self.kernel_mode == "triton")  # CPU: Triton's interpreter

    def _int8_forward(self, x: torch.Tensor) -> torch.Tensor:
        from quest_pl.kernels import int8

        act, weight_args = self.kernel_args["act"], self.kernel_args["weight"]
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            backward = "bf16" if self.backward == "none" else "fp8"  # _int8_config_error admits rtn / fp8 only
            y = int8.quest_int8_linear(x, self.weight, act, weight_args, backward=backward)
        else:  # inference: the weight's codes once per weight version
            w = self.weight
            fmt = int8.inference_codes(x, w, act, weight_args)
            key = (w.data_ptr(), w._version, w.device, w.dtype, fmt)
            if self._frozen_weight_codes is None or self._frozen_weight_codes[0] != key:
                codes, _, scales = int8.quantize_codes(w, **weight_args, codes=fmt)
                self._frozen_weight_codes = (key, codes, scales)
            _, codes, scales = self._frozen_weight_codes
            y = int8.quest_int8_linear_frozen(x, codes, scales, act)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(self._rotate(x, self.act_quant), self._rotate(self.weight, self.weight_quant), self.bias)
        if self._uses_int8(x):
            return self._int8_forward(x)
        x = self._quantize(x, self.act_quant, "act")
        weight = self._quantize(self.weight, self.weight_quant, "weight")
        if self.backward != "none":
            return quantized_backward_linear(
                x, weight, self.bias, self.backward, self.backward_format, self.backward_operands
            )
        return F.linear(x, weight, self.bias)


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


def kernel_unsupported(
    spec: OperandSpec | None, width: int, hadamard: bool, hadamard_block: int = quantizers.HADAMARD_BLOCK
) -> str | None:
    """Why the fused Triton kernel cannot serve this operand here (``kernels.is_supported``), or None if it can."""
    from quest_pl import kernels

    grid = spec.build_grid()
    if grid.fixed_group_size is not None:
        return f"the block format {spec.grid}'s rounded group scales are not in the fused kernel"
    if hadamard and hadamard_block != quantizers.HADAMARD_BLOCK:
        return f"the fused kernel's Hadamard block is {quantizers.HADAMARD_BLOCK}, not {hadamard_block}"

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ok, reason = kernels.is_supported(
        spec.grid, spec.bits, spec.estimator, width, device, hadamard=hadamard, group_size=grid.group_size
    )
    return None if ok else reason


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


def format_bits_per_element(weight: quantizers.Grid | None, act: quantizers.Grid | None, row_length: int) -> str:
    """``"W<b>A<b>"`` from the operands' grids (None: 16, full precision), ``Grid.bits_per_element(row_length)`` to
    4 significant digits: the report's ``bits_per_elem`` for QAT arms (:func:`bits_per_element`) and PTQ rows."""

    def operand(grid: quantizers.Grid | None) -> str:
        return "16" if grid is None else f"{grid.bits_per_element(row_length):.4g}"

    return f"W{operand(weight)}A{operand(act)}"
