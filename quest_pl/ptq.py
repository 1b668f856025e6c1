"""Post-training quantization (PTQ) of a trained checkpoint: data-free HIGGS-style grids, or calibrated AQLM (below).

Every linear that QAT would quantize (those inside the transformer blocks, :func:`quest_pl.quant.quantize_model`) gets
its weight replaced, once and without data, by ``Q(W H)``: the block Hadamard H along ``in_features`` (optional; block
``ptq.hadamard_block``, 128 by default), then any ``quantizers`` grid, built by the same ``quantizers.build(grid, bits,
group_size=..., scale_rule=...)`` call as a QAT arm's operand (``quest_pl.quant.OperandSpec``) and applied as
QAT's ``QuantLinear`` applies it (fp32 rotation, then the grid), so a PTQ weight is bit for bit the weight a QAT arm
of the same format would see: per-row scales, per group of ``g`` elements along the row (``ptq.group_size``, as
``quant.group_size``; or, PTQ only, a multiple of 128), the block formats' groups (mxfp4: 32, nvfp4: 16) with their
``ptq.scale_rule``. At inference the input is rotated the same way, ``y = Qa(x H) Q(W H)^T``: QuantLinear's half form
(METHOD.md §1.8), with the activation quantizer ``Qa`` optional (W4A16 or W4A4; per token, or per group of
``ptq.act_group_size``). Embeddings, ``lm_head`` and norms stay as trained.

Command line (``experiments/config.yaml``, group ``ptq``)::

    python run.py ptq.from=outputs/bf16/<time>/checkpoints/last.ckpt ptq.grid=gaussian_mse ptq.bits=4 \
        ptq.hadamard=true [ptq.act_bits=4] [ptq.group_size=128]
    python run.py ptq.from=<ckpt> ptq.grid=nvfp4 ptq.scale_rule=four_over_six ptq.hadamard_block=16 ptq.act_bits=4

evaluates on the validation split of the run that wrote the checkpoint (its ``.hydra/config.yaml``; else the composed
``data`` group), logs ``val/loss`` and ``val/ppl`` to TensorBoard at the checkpoint's step and writes ``metrics.json``.

``ptq.method=aqlm`` replaces the scalar grid by additive vector quantization (AQLM, :mod:`quest_pl.quantizers.aqlm`),
which is **calibrated, not data-free**: each block linear's weight is coded in groups of ``ptq.aqlm.group_size`` = g
input weights as a sum of ``ptq.aqlm.num_codebooks`` = M codewords from learned codebooks of ``2^B`` vectors, with
``B = ptq.bits * g / M`` (``ptq.bits=2``: the paper's 2x8 at g = 8 by default, 1x16 with ``ptq.aqlm.num_codebooks=1``),
minimising the layer's output error on the inputs it sees on the first ``ptq.calib_batches`` training batches of the
run, block by block (later blocks calibrated on the outputs of the already quantized ones)::

    python run.py ptq.from=<ckpt> ptq.method=aqlm ptq.bits=2 [ptq.aqlm.num_codebooks=1] [ptq.aqlm.finetune_steps=200]

``ptq.aqlm.finetune_steps`` > 0 adds the end-to-end fine-tuning of all codebooks and scales (codes fixed) by Adam on
the KL divergence to the full-precision model's next-token distribution, on the same calibration batches.
``metrics.json`` reports the bits per weight including the fp16 codebooks and scales (``aqlm.bits_per_weight``): on
small layers the codebooks cost more than the codes (2x8 adds ``2 * 256 * 8 * 16`` bits per layer, 1x16 ``2^16 * 8 *
16``; on the tiny model 2x8 is about 3 bits per weight in all). 1x16 is slow on CPU (every code choice scores 65,536
codewords); it runs on the GPU when ``trainer.accelerator`` allows.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from quest_pl import quantizers
from quest_pl.config import ConfigError
from quest_pl.io import atomic_write_json
from quest_pl.quantizers.base import GROUP_SIZES

log = logging.getLogger(__name__)


METHODS = ("scalar", "aqlm")


@dataclass(frozen=True)
class AQLMSettings:
    """``ptq.aqlm.*``: the AQLM arm's code layout and optimisation (:func:`quest_pl.quantizers.aqlm.quantize`)."""

    group_size: int = 8  # g consecutive input weights per code group
    num_codebooks: int = 2  # M; each has 2^B vectors, B = bits * g / M
    beam_size: int = 8
    rounds: int = 6  # alternations of beam search and Adam
    adam_steps: int = 100  # Adam steps on codebooks and scales per round
    lr: float = 1e-3  # relative to each tensor's mean magnitude
    kmeans_iters: int = 10  # residual k-means initialisation
    tolerance: float = 0.01  # stop a layer's rounds once one improves its relative error by less than this fraction
    finetune_steps: int = 0  # end-to-end fine-tuning of codebooks and scales (0: off)
    finetune_lr: float = 1e-4
    seed: int = 0

    @classmethod
    def from_cfg(cls, a) -> AQLMSettings:
        a = a or {}
        unknown = sorted(set(a) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"ptq.aqlm.{unknown[0]}: unknown key; known: {', '.join(f.name for f in fields(cls))}")
        values = {}
        for f in fields(cls):
            v = a.get(f.name, f.default)
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if f.name in ("lr", "finetune_lr"):
                ok, allowed = number and v > 0, "a number > 0"
            elif f.name == "tolerance":
                ok, allowed = number and 0 <= v < 1, "a number in [0, 1)"
            elif f.name == "seed":
                ok, allowed = isinstance(v, int) and not isinstance(v, bool), "an integer"
            else:
                least = 0 if f.name in ("adam_steps", "kmeans_iters", "finetune_steps") else 1
                ok, allowed = isinstance(v, int) and not isinstance(v, bool) and v >= least, f"an integer >= {least}"
            if not ok:
                raise ConfigError(f"ptq.aqlm.{f.name}={v!r}: expected {allowed}")
            values[f.name] = float(v) if f.name in ("lr", "finetune_lr", "tolerance") else v
        return cls(**values)


@dataclass(frozen=True)
class PTQConfig:
    """What PTQ does to every block linear: weight grid and bits, Hadamard (and its block), scale granularity and
    scale rule, activations; or, with ``method="aqlm"``, additive vector quantization calibrated on ``calib_batches``
    training batches. The grids are ``quantizers.build(grid, bits, group_size=..., scale_rule=...)``, the call QAT's
    ``quest_pl.quant.OperandSpec.build_grid`` makes, so every format a QAT arm trains has its PTQ setting."""

    grid: str = "gaussian_mse"
    bits: float = 4
    hadamard: bool = True
    group_size: int | None = None  # None: one scale per row; g: one per g consecutive elements of a row
    act_bits: float | None = None  # None: activations in full precision (WxA16)
    act_grid: str | None = None  # None: the weight grid
    method: str = "scalar"  # scalar (a data-free grid) | aqlm (calibrated additive quantization)
    calib_batches: int = 16  # aqlm: training batches whose activations calibrate every layer
    aqlm: AQLMSettings = field(default_factory=AQLMSettings)
    scale_rule: str | None = None  # block formats (mxfp4, nvfp4): the group scale rule; None: the format's default
    act_group_size: int | None = None  # None: one scale per token (row); g: one per g elements (as quant.group_size)
    hadamard_block: int = quantizers.HADAMARD_BLOCK  # the Hadamard's block size (as quant.hadamard_block)

    @property
    def name(self) -> str:
        """``ptq_<grid>[_<scale rule>][_nohad][_h<block>][_g<g>][_ag<g>]_w<b>a<b>``, e.g. ``ptq_gaussian_mse_w4a16``,
        ``ptq_nvfp4_4over6_h16_w4a4`` (the format ablation's ``nvfp4_4over6`` arm), ``ptq_gaussian_mse_g32_w4a4``
        (``int4_g32``: weight and activation groups of 32; ``_ag<g>`` only when the activation group differs); the
        format's default scale rule and the block-128 Hadamard are unnamed. For AQLM
        ``aqlm[_<M>x<B>][_g<g>][_nohad][_ft]_w<b>[a<b>]`` (the paper's 2x8 at g = 8 unnamed), e.g. ``aqlm_w2``."""
        a = "16" if self.act_bits is None else f"{float(self.act_bits):g}"
        if self.method == "aqlm":
            s = self.aqlm
            parts = ["aqlm"] + ([] if (s.num_codebooks, self.codebook_bits) == (2, 8) else [self.codebook_layout])
            parts += ([] if s.group_size == 8 else [f"g{s.group_size}"]) + ([] if self.hadamard else ["nohad"])
            parts += ["ft"] if s.finetune_steps else []
            return "_".join(parts) + f"_w{float(self.bits):g}" + ("" if self.act_bits is None else f"a{a}")
        rule = named_scale_rule(self.grid, self.scale_rule)
        parts = ["ptq", self.grid] + ([SCALE_RULE_TAGS.get(rule, rule)] if rule else [])
        parts += ["nohad"] if not self.hadamard else []
        block = self.hadamard_block
        parts += [f"h{block}"] if self.hadamard and block != quantizers.HADAMARD_BLOCK else []
        parts += [f"g{self.group_size}"] if self.group_size else []
        act_group = self.act_group_size if self.act_bits is not None else None
        parts += [f"ag{act_group}"] if act_group and act_group != self.group_size else []
        return "_".join(parts) + f"_w{float(self.bits):g}a{a}"

    @property
    def codebook_bits(self) -> float:
        """AQLM's B: ``bits * g / M`` (an integer for a valid setting)."""
        return float(self.bits) * self.aqlm.group_size / self.aqlm.num_codebooks

    @property
    def codebook_layout(self) -> str:
        """``<M>x<B>``, the paper's notation (``2x8``, ``1x16``)."""
        return f"{self.aqlm.num_codebooks}x{self.codebook_bits:g}"

    def settings(self) -> dict:
        """What this setting is, for ``metrics.json``, TensorBoard and the sweep cache: the scalar keys for a scalar
        grid, and the method, calibration and AQLM keys for AQLM."""
        d = asdict(self)
        if self.method == "scalar":
            return {k: d[k] for k in SCALAR_KEYS}
        for k in ("grid", "group_size", "scale_rule", "act_group_size", "hadamard_block"):
            d.pop(k)
        return d | {"codebook_bits": int(self.codebook_bits)}

    @classmethod
    def name_of(cls, p) -> str:
        """The name of a ``ptq`` config group's setting, without validating it (``run_name`` of a PTQ job)."""
        keys = (*SCALAR_KEYS, "method", "calib_batches")
        nullable = ("group_size", "act_bits", "act_grid", "scale_rule", "act_group_size")
        values = {k: p.get(k) for k in keys if p.get(k) is not None or k in nullable}
        aqlm = p.get("aqlm") or {}
        names = {f.name for f in fields(AQLMSettings)}
        try:
            return cls(**values, aqlm=AQLMSettings(**{k: v for k, v in aqlm.items() if k in names})).name
        except (TypeError, ValueError, ZeroDivisionError):
            return "ptq_invalid"  # ptq.run reports the bad value

    @classmethod
    def from_cfg(cls, p) -> PTQConfig:
        """From the ``ptq`` config group, with one-line errors naming the ``ptq.*`` key."""
        method = p.get("method", "scalar")
        if method not in METHODS:
            raise ConfigError(f"ptq.method={method!r}: expected {' or '.join(METHODS)}")
        if not isinstance(p.get("hadamard", True), bool):
            raise ConfigError(f"ptq.hadamard={p.get('hadamard')!r}: expected true or false")
        g = p.get("group_size")
        if g is not None and (not _is_int(g) or g < 1 or (g % quantizers.HADAMARD_BLOCK and g not in GROUP_SIZES)):
            raise ConfigError(
                f"ptq.group_size={g!r}: expected null (per row), a power of two 2-1024 (as quant.group_size) or a "
                f"multiple of {quantizers.HADAMARD_BLOCK}"
            )
        act_g = p.get("act_group_size")
        if act_g is not None and (not _is_int(act_g) or act_g not in GROUP_SIZES):
            raise ConfigError(
                f"ptq.act_group_size={act_g!r}: expected null (one scale per token) or a power of two 2-1024 "
                "(as quant.group_size)"
            )
        if act_g is not None and p.get("act_bits") is None:
            raise ConfigError(
                f"ptq.act_group_size={act_g!r}: expected null while ptq.act_bits is null (full-precision activations)"
            )
        block = p.get("hadamard_block", quantizers.HADAMARD_BLOCK)
        if not _is_int(block) or block not in quantizers.HADAMARD_BLOCKS:
            raise ConfigError(
                f"ptq.hadamard_block={block!r}: expected one of {', '.join(map(str, quantizers.HADAMARD_BLOCKS))}"
            )
        rule = p.get("scale_rule")
        if rule is not None and not isinstance(rule, str):
            raise ConfigError(f"ptq.scale_rule={rule!r}: expected null (the format's default) or a rule name")
        calib = p.get("calib_batches", 16)
        if not _is_int(calib) or calib < 1:
            raise ConfigError(f"ptq.calib_batches={calib!r}: expected an integer >= 1")
        cfg = cls(
            grid=p.get("grid"),
            bits=p.get("bits"),
            hadamard=p.get("hadamard", True),
            group_size=g,
            act_bits=p.get("act_bits"),
            act_grid=p.get("act_grid"),
            method=method,
            calib_batches=calib,
            aqlm=AQLMSettings.from_cfg(p.get("aqlm")),
            scale_rule=rule,
            act_group_size=act_g,
            hadamard_block=block,
        )
        if method == "aqlm":
            cfg.check_aqlm()
        cfg.build_quantizers()
        return cfg

    def check_aqlm(self) -> None:
        from quest_pl.quantizers.aqlm import MAX_CODEBOOK_BITS

        if self.group_size is not None:
            raise ConfigError(
                f"ptq.group_size={self.group_size}: ptq.method=aqlm has one scale per row "
                "(its code groups: ptq.aqlm.group_size)"
            )
        if self.hadamard_block != quantizers.HADAMARD_BLOCK:
            raise ConfigError(
                f"ptq.hadamard_block={self.hadamard_block}: ptq.method=aqlm calibrates in the block-"
                f"{quantizers.HADAMARD_BLOCK} Hadamard basis; expected {quantizers.HADAMARD_BLOCK}"
            )
        bits = self.bits
        if not isinstance(bits, (int, float)) or isinstance(bits, bool) or bits <= 0:
            raise ConfigError(f"ptq.bits={bits!r}: expected a number > 0")
        b = self.codebook_bits
        if b != int(b) or not 1 <= b <= MAX_CODEBOOK_BITS:
            s = self.aqlm
            raise ConfigError(
                f"ptq.bits={bits!r}: ptq.method=aqlm needs codebooks of 2^B vectors with B = bits * "
                f"ptq.aqlm.group_size / ptq.aqlm.num_codebooks = {bits:g} * {s.group_size} / {s.num_codebooks} = {b:g} "
                f"an integer in 1..{MAX_CODEBOOK_BITS}"
            )

    def build_quantizers(self) -> tuple[quantizers.Grid | None, quantizers.Grid | None]:
        """The weight grid (None for AQLM) and the activation grid (or None): ``quantizers.build(grid, bits,
        group_size=..., scale_rule=...)`` as QAT builds an operand's grid (``quest_pl.quant.OperandSpec``), with
        one-line errors naming the ``ptq.*`` key. A weight group that is a multiple of 128 but no power of two (PTQ
        only) is applied by :func:`quantize_weight` on a per-row grid."""
        weight = None
        if self.method != "aqlm":
            g = self.group_size if self.group_size in GROUP_SIZES else None
            weight = self._build("", self.grid, self.bits, "group_size", g)
            if self.group_size and g is None and weight.fixed_group_size is not None:
                raise ConfigError(
                    f"ptq.group_size={self.group_size!r} with grid {self.grid!r}: the format has groups of "
                    f"{weight.fixed_group_size} by its spec; expected null"
                )
        act = None
        if self.act_bits is not None:
            act = self._build("act_", self.act_grid or self.grid, self.act_bits, "act_group_size", self.act_group_size)
        return weight, act

    def _build(self, key: str, grid: str, bits, group_key: str, group_size: int | None) -> quantizers.Grid:
        if grid not in quantizers.GRIDS:
            raise ConfigError(f"ptq.{key}grid={grid!r}: unknown grid; available: {', '.join(sorted(quantizers.GRIDS))}")
        try:
            quantizers.build(grid, bits=bits)
        except ValueError as e:
            raise ConfigError(f"ptq.{key}bits={bits!r} with grid {grid!r}: {e}") from None
        rule = {} if self.scale_rule is None else {"scale_rule": self.scale_rule}
        try:
            quantizers.build(grid, bits=bits, **rule)
        except (ValueError, TypeError):
            rules = getattr(quantizers.GRIDS[grid], "scale_rules", ())
            allowed = f"null or one of {', '.join(rules)}" if rules else "null (the grid has no scale rule)"
            raise ConfigError(f"ptq.scale_rule={self.scale_rule!r} with grid {grid!r}: expected {allowed}") from None
        try:
            return quantizers.build(grid, bits=bits, group_size=group_size, **rule)
        except ValueError as e:
            raise ConfigError(f"ptq.{group_key}={group_size!r} with grid {grid!r}: {e}") from None

    def bits_per_element(self, row_length: int) -> str | None:
        """Storage bits per element including scales, ``"W4.5A4.5"``, as the report counts a QAT arm's
        (:func:`quest_pl.quant.format_bits_per_element`, rows of ``row_length``); None for AQLM (its ``metrics.json``
        counts codebooks and scales: :func:`ptq_row`)."""
        from quest_pl.quant import format_bits_per_element

        if self.method == "aqlm":
            return None
        weight, act = self.build_quantizers()
        if not self.group_size or weight.group_size is not None:
            return format_bits_per_element(weight, act, row_length)
        # a PTQ-only weight group (e.g. 384): the per-row grid's "row" is the group; activations stay per token
        w = format_bits_per_element(weight, None, self.group_size).partition("A")[0]
        return w + "A" + format_bits_per_element(None, act, row_length).partition("A")[2]


SCALAR_KEYS = ("grid", "bits", "hadamard", "group_size", "act_bits", "act_grid", "scale_rule", "act_group_size",
               "hadamard_block")  # fmt: skip
SCALE_RULE_TAGS = {"four_over_six": "4over6"}
"""Short forms of scale rules in PTQ names (``ptq_nvfp4_4over6_h16_w4a4`` for the ``nvfp4_4over6`` arm)."""


def named_scale_rule(grid: str | None, rule: str | None) -> str | None:
    """The scale rule a PTQ name shows: None for none or the format's default (``absmax`` for mxfp4/nvfp4)."""
    rules = getattr(quantizers.GRIDS.get(grid), "scale_rules", ())
    return None if rule is None or (rules and rule == rules[0]) else rule


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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


class PTQLinear(nn.Module):
    """A linear layer with frozen quantized weights in the (optionally) rotated basis: ``y = Qa(x H) W_q^T``; the
    input is rotated (block ``hadamard_block``) and quantized in fp32, as QAT's ``QuantLinear`` does."""

    def __init__(
        self,
        weight_q: torch.Tensor,
        bias: torch.Tensor | None,
        hadamard: bool,
        act_quant: nn.Module | None,
        hadamard_block: int = quantizers.HADAMARD_BLOCK,
    ):
        super().__init__()
        self.weight = nn.Parameter(weight_q, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.hadamard = hadamard
        self.hadamard_block = hadamard_block
        self.act_quant = act_quant

    def extra_repr(self) -> str:
        out, cols = self.weight.shape
        block = f", hadamard_block={self.hadamard_block}" if self.hadamard_block != quantizers.HADAMARD_BLOCK else ""
        return f"in_features={cols}, out_features={out}, hadamard={self.hadamard}{block}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hadamard or self.act_quant is not None:
            t = x.to(torch.promote_types(x.dtype, torch.float32))  # no rounding between the rotation and the grid
            t = quantizers.hadamard_transform(t, self.hadamard_block) if self.hadamard else t
            x = (t if self.act_quant is None else self.act_quant(t)).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


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
class AQLMLinear(nn.Module):
    """A linear layer whose weight is additive-quantized (:mod:`quest_pl.quantizers.aqlm`): codes (buffer), codebooks
    and per-row scales (parameters, frozen except during end-to-end fine-tuning), in the (optionally) Hadamard-rotated
    basis: ``y = Qa(x H) W_hat^T`` with ``W_hat = dequantize(codes, codebooks, scales)``."""

    def __init__(self, q, bias: torch.Tensor | None, hadamard: bool, act_quant: nn.Module | None):
        super().__init__()
        self.register_buffer("codes", q.codes)
        self.codebooks = nn.Parameter(q.codebooks, requires_grad=False)
        self.scales = nn.Parameter(q.scales, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.hadamard = hadamard
        self.act_quant = act_quant

    @property
    def weight(self) -> torch.Tensor:
        from quest_pl.quantizers.aqlm import dequantize

        return dequantize(self.codes, self.codebooks, self.scales)

    def extra_repr(self) -> str:
        (out, groups, m), (_, k, g) = self.codes.shape, self.codebooks.shape
        return f"in_features={groups * g}, out_features={out}, codebooks={m}x{k.bit_length() - 1}, group_size={g}, " \
            f"hadamard={self.hadamard}"  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hadamard:
            x = quantizers.hadamard_transform(x)
        if self.act_quant is not None:
            x = self.act_quant(x)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


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
def load_checkpoint(path: str | Path, key: str = "ptq.from") -> dict:
    """A checkpoint this project wrote (an ``LMModule``'s), with one-line errors for a missing or foreign file."""
    from quest_pl.config import check_checkpoint

    try:
        ckpt = check_checkpoint(str(path))
    except ConfigError as e:
        raise ConfigError(str(e).replace("ckpt_path=", f"{key}=", 1)) from None
    hp = ckpt.get("hyper_parameters") or {}
    if not isinstance(hp.get("model"), dict) or not isinstance(hp.get("optim"), dict):
        raise ConfigError(f"{key}={str(path)!r}: not a QuEST-PL checkpoint (no model hyper-parameters)")
    return ckpt


def module_from_checkpoint(ckpt: dict, path: str | Path, key: str = "ptq.from"):
    """The full-precision ``LMModule`` of a checkpoint: latent weights only (LSQ/PACT scales of a QAT run dropped)."""
    from quest_pl.module import LMModule
    from quest_pl.quant import is_quantizer_param

    hp = ckpt["hyper_parameters"]
    q = hp.get("quant") or {}
    if q.get("grid") and q.get("hadamard") and q.get("hadamard_mode", "half") == "half" and q.get("a_bits") is None:
        raise ConfigError(
            f"{key}={str(path)!r}: a weight-only half-Hadamard QAT checkpoint (quant={q.get('name')}) computes "
            "x (W H)^T, not x W^T; its latent weights are no full-precision model to post-train-quantize"
        )
    try:
        module = LMModule(hp["model"], hp["optim"], quant=None, max_steps=hp.get("max_steps", 1))
    except TypeError as e:
        raise ConfigError(f"{key}={str(path)!r}: incompatible model hyper-parameters ({e})") from None
    state = {k: v for k, v in ckpt["state_dict"].items() if not is_quantizer_param(k)}
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        what = (
            (missing and f"missing {missing[0]}")
            or (unexpected and f"unexpected {unexpected[0]}")
            or (f"{bad_shape[0]} has shape {tuple(state[bad_shape[0]].shape)}")
        )
        raise ConfigError(f"{key}={str(path)!r}: incompatible checkpoint ({what})")
    module.load_state_dict(state)
    return module


def run_config_of(ckpt_path: str | Path) -> DictConfig | None:
    """The composed config of the run that wrote ``<run dir>/checkpoints/x.ckpt`` (its ``.hydra/config.yaml``)."""
    path = Path(ckpt_path).resolve().parent.parent / ".hydra" / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else None


# -- evaluation -----------------------------------------------------------------------------------------------------
def evaluate(
    ckpt_path: str | Path,
    ptq: PTQConfig,
    data_cfg: DictConfig,
    run_dir: str | Path,
    accelerator: str = "auto",
    precision: str | None = None,
    tensorboard: bool = True,
) -> dict:
    """PTQ a checkpoint and evaluate it on the validation split of ``data_cfg`` (a config with ``data``,
    ``model.seq_len``, ``seed``, ``trainer``) exactly as training validates; returns and writes ``metrics.json``."""
    import lightning as L

    from quest_pl.train import resolve_precision, validation_datamodule

    start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(ckpt_path)
    module = module_from_checkpoint(ckpt, ckpt_path)
    model_hp = ckpt["hyper_parameters"]["model"]
    if data_cfg.model.seq_len != model_hp["seq_len"]:
        data_cfg = OmegaConf.merge(data_cfg, {"model": {"seq_len": model_hp["seq_len"]}})
    dm = validation_datamodule(data_cfg, model_hp["vocab_size"], f"ptq.from={str(ckpt_path)!r}")
    aqlm_stats = None
    if ptq.method == "aqlm":
        on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        module.to("cuda" if on_gpu else "cpu")
        log.info("AQLM %s calibrated on %d training batches", ptq.codebook_layout, ptq.calib_batches)
        aqlm_stats = quantize_model_aqlm(module.model, ptq, calibration_batches(dm, ptq.calib_batches))
        log.info(
            "AQLM: %.3f bits per weight with codebooks and scales (codes %.3f), mean relative output error %.4f",
            aqlm_stats["bits_per_weight"], aqlm_stats["code_bits_per_weight"], aqlm_stats["mean_rel_output_error"],
        )  # fmt: skip
    else:
        quantize_model_ptq(module.model, ptq)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=resolve_precision(precision, accelerator),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(run_dir),
    )
    results = trainer.validate(module, datamodule=dm, verbose=False)[0]
    step = int(ckpt.get("global_step", 0))
    metrics = {
        "val/loss": float(results["val/loss"]),
        "val/ppl": float(results["val/ppl"]),
        "step": step,
        "wall_s": time.perf_counter() - start,
        "checkpoint": str(Path(ckpt_path).resolve()),
        "ptq": ptq.settings(),
    }
    if aqlm_stats is not None:
        metrics["aqlm"] = aqlm_stats
    if tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        from quest_pl import hparams

        logger = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)
        hparams.write(logger, {"arm": ptq.name, "seed": data_cfg.get("seed"), **ptq_values(ptq, ckpt_path)})
        scalars = {"val/loss": metrics["val/loss"], "val/ppl": metrics["val/ppl"]}
        if aqlm_stats is not None:
            scalars["ptq/bits_per_weight"] = aqlm_stats["bits_per_weight"]
            scalars["ptq/rel_output_error"] = aqlm_stats["mean_rel_output_error"]
        logger.log_metrics(scalars, step=step)
        logger.finalize("success")
    atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics


def ptq_values(ptq: PTQConfig, ckpt_path: str | Path | None = None) -> dict:
    """The ``ptq.*`` keys of a setting for TensorBoard's hparams tab (and ``ptq.from``)."""
    values = {f"ptq.{k}": v for k, v in ptq.settings().items() if k != "aqlm"}
    values |= {f"ptq.aqlm.{k}": v for k, v in asdict(ptq.aqlm).items()} if ptq.method == "aqlm" else {}
    return values | ({"ptq.from": str(ckpt_path)} if ckpt_path is not None else {})


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """``python run.py ptq.from=CKPT ...``: PTQ evaluation of one checkpoint (see the module docstring)."""
    from quest_pl.config import validate

    ckpt_path = cfg.ptq["from"]
    ptq = PTQConfig.from_cfg(cfg.ptq)
    load_checkpoint(ckpt_path)  # fail early, before any data work
    data_cfg = run_config_of(ckpt_path)
    if data_cfg is None:
        log.info("no .hydra/config.yaml beside %s: evaluating on the composed data config", ckpt_path)
        validate(cfg)
        data_cfg = cfg
    else:
        log.info("evaluating on the validation split of the run that wrote %s", ckpt_path)
    t = cfg.trainer
    metrics = evaluate(
        ckpt_path, ptq, data_cfg, run_dir, accelerator=t.accelerator, precision=t.precision,
        tensorboard=bool((cfg.get("logger") or {}).get("tensorboard")),
    )  # fmt: skip
    return {**metrics, "rank": 0}


# -- sweeps ---------------------------------------------------------------------------------------------------------
def sweep_configs(rows: list[dict]) -> list[PTQConfig]:
    """PTQ settings matching a sweep's quantized arms, one per distinct format, in arm order: each arm's weight grid
    and bits, group size (weights, and activations when quantized), scale rule and Hadamard block, with the arm's
    activation quantization (WbAb) and weight-only (WbA16); always with the Hadamard rotation (HIGGS), at the arm's
    block. What only shapes a QAT arm's gradient (estimator, trust threshold, quantized backward) makes no separate
    PTQ setting: PTQ does not train. When an arm has 2-bit weights, AQLM at 2 bits (``aqlm_w2``, the default 2x8
    layout, calibrated) follows the 2-bit rows."""
    configs = []
    for r in rows:
        q = r.get("_quant") or {}
        if r.get("method") != "QAT" or q.get("w_bits") is None:
            continue
        w_grid = q.get("w_grid") or q.get("grid")
        a_grid = q.get("a_grid") or q.get("grid")
        group = q.get("group_size")
        for act_bits in (q.get("a_bits"), None):
            c = PTQConfig(
                grid=w_grid,
                bits=q["w_bits"],
                hadamard=True,
                group_size=group,
                act_bits=act_bits,
                act_grid=None if act_bits is None or a_grid == w_grid else a_grid,
                scale_rule=named_scale_rule(w_grid, q.get("scale_rule")),
                act_group_size=None if act_bits is None else group,
                hadamard_block=int(q.get("hadamard_block") or quantizers.HADAMARD_BLOCK),
            )
            if c not in configs:
                configs.append(c)
    two_bit = [i for i, c in enumerate(configs) if float(c.bits) == 2]
    if two_bit:  # the calibrated vector-quantization baseline at 2 bits (aqlm_w2), after the scalar 2-bit rows
        configs.insert(two_bit[-1] + 1, PTQConfig(method="aqlm", bits=2, hadamard=True))
    return configs


def sweep_rows(rows: list[dict], sweep_dir: str | Path) -> list[dict]:
    """Report rows (:mod:`quest_pl.report`) for PTQ of the sweep's BF16 arm at the quantized arms' formats
    (:func:`sweep_configs`).
    Each evaluation is kept in ``<sweep dir>/ptq/<name>/`` (TensorBoard and metrics.json) and reused when the report
    is regenerated from the same checkpoint."""
    base = next((r for r in rows if r.get("method") == "BF16"), None)
    if base is None:
        return []
    ckpt_path = base["_job_dir"] / "checkpoints" / "last.ckpt"
    if not ckpt_path.is_file():
        log.warning("no %s: PTQ rows skipped", ckpt_path)
        return []
    data_cfg = OmegaConf.load(base["_job_dir"] / ".hydra" / "config.yaml")
    out = []
    lightning_log = logging.getLogger("lightning.pytorch")  # no "GPU available" banner per evaluation
    level, lightning_log.level = lightning_log.level, logging.WARNING
    try:
        for ptq in sweep_configs(rows):
            out.append(_sweep_row(ptq, ckpt_path, data_cfg, Path(sweep_dir)))
    finally:
        lightning_log.setLevel(level)
    return out


def _sweep_row(ptq: PTQConfig, ckpt_path: Path, data_cfg: DictConfig, sweep_dir: Path) -> dict:
    run_dir = sweep_dir / "ptq" / ptq.name
    cached = run_dir / "metrics.json"
    metrics = json.loads(cached.read_text()) if cached.is_file() else None
    if not metrics or metrics.get("checkpoint") != str(ckpt_path.resolve()) or metrics.get("ptq") != ptq.settings():
        log.info("PTQ %s of %s", ptq.name, ckpt_path)
        metrics = evaluate(
            ckpt_path,
            ptq,
            data_cfg,
            run_dir,
            accelerator=data_cfg.trainer.accelerator,
            precision=data_cfg.trainer.precision,
        )
    return ptq_row(ptq, metrics, row_length=data_cfg.model.d_model)


def ptq_bits_per_element(ptq: PTQConfig, metrics: dict, row_length: int) -> str | None:
    """The report's ``bits_per_elem`` of a PTQ row, counted as for a QAT arm (rows of ``row_length`` = d_model):
    :meth:`PTQConfig.bits_per_element`; for AQLM the weights' bits with codebooks and scales from its
    ``metrics.json``."""
    if ptq.method != "aqlm":
        return ptq.bits_per_element(row_length)
    bpw = (metrics.get("aqlm") or {}).get("bits_per_weight")
    if bpw is None:
        return None
    from quest_pl.quant import format_bits_per_element

    _, act = ptq.build_quantizers()
    return f"W{bpw:.4g}A" + format_bits_per_element(None, act, row_length).rpartition("A")[2]


def ptq_row(ptq: PTQConfig, metrics: dict, row_length: int | None = None) -> dict:
    """A report row; an AQLM row's grid cell says it is calibrated and states its bits per weight in all. The grid
    cell names a non-default scale rule and the groups, the Hadamard cell a block other than 128 (as a QAT row's);
    ``bits_per_elem`` (:func:`ptq_bits_per_element`) needs the row length (``model.d_model``)."""
    if ptq.method == "aqlm":
        bpw = (metrics.get("aqlm") or {}).get("bits_per_weight")
        grid = f"aqlm {ptq.codebook_layout} g{ptq.aqlm.group_size}, calibrated ({ptq.calib_batches} batches)"
        grid += "" if bpw is None else f", {bpw:.2f} bits/weight in all"
        if ptq.act_bits is not None:
            grid += f" / {ptq.act_grid or ptq.grid}"
    else:
        grid = ptq.grid if ptq.act_bits is None or not ptq.act_grid else f"{ptq.grid} / {ptq.act_grid}"
        rule = named_scale_rule(ptq.grid, ptq.scale_rule)
        grid += f" {rule}" if rule else ""
        grid += f" g{ptq.group_size}" if ptq.group_size else ""
        act_group = ptq.act_group_size if ptq.act_bits is not None else None
        grid += f", act g{act_group}" if act_group and act_group != ptq.group_size else ""
    a = "16" if ptq.act_bits is None else f"{float(ptq.act_bits):g}"
    hadamard = "half" if ptq.hadamard else "no"
    if ptq.hadamard and ptq.hadamard_block != quantizers.HADAMARD_BLOCK:
        hadamard += f", block {ptq.hadamard_block}"
    return {
        "arm": ptq.name,
        "method": "PTQ",
        "grid": grid,
        "bits": f"W{float(ptq.bits):g}A{a}",
        "bits_per_elem": None if row_length is None else ptq_bits_per_element(ptq, metrics, row_length),
        "estimator": "-",
        "hadamard": hadamard,
        "val_loss": metrics["val/loss"],
        "val_ppl": metrics["val/ppl"],
        "wall_s": metrics.get("wall_s"),
        "steps": metrics.get("step"),
    }
