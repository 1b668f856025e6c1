"""What to quantize, as data: :class:`OperandSpec` (one operand's grid, bits, estimator, scale) and
:class:`QuantConfig` (both operands, the Hadamard, the kernels and the backward), built from the ``quant`` group and
checked before any work (METHOD.md §2)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from quest_pl import estimators, quantizers
from quest_pl.config import ConfigError
from quest_pl.estimators.backward import (
    BACKWARD_FORMATS,
    BACKWARD_MODES,
    BACKWARD_OPERANDS,
)

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
