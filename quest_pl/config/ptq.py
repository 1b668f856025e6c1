"""The ``ptq`` group's schema: :class:`PTQConfig` (a data-free grid or AQLM, METHOD.md §5), built from the config
and checked before any work; its name is the run name of a PTQ job."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields

from quest_pl import quantizers
from quest_pl.config.checks import ConfigError, _is_int
from quest_pl.quantizers.base import GROUP_SIZES, format_bits_per_element

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
            number = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
            if f.name in ("lr", "finetune_lr"):
                ok, allowed = number and v > 0, "a finite number > 0"
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
        if not isinstance(bits, (int, float)) or isinstance(bits, bool) or not 0 < bits < float("inf"):
            raise ConfigError(f"ptq.bits={bits!r}: expected a finite number > 0")
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
        (:func:`quest_pl.quantizers.base.format_bits_per_element`, rows of ``row_length``); None for AQLM (its
        ``metrics.json`` counts codebooks and scales: :func:`quest_pl.ptq.ptq_row`)."""
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
