"""FP4 E2M1 elements and the scale encodings of the block formats (OCP MX v1.0; NVIDIA NVFP4), all in fp32.

E2M1: sign, 2 exponent bits (bias 1), 1 mantissa bit, no inf/NaN. Magnitudes 0, 0.5 (subnormal), 1, 1.5, 2, 3, 4, 6.
    round_e2m1(y): round to nearest, ties to even (the code with mantissa bit 0), saturating at +-6.
    stochastic_round_e2m1(y, u): up with probability (|y| - lo) / (hi - lo) between the neighbours lo <= |y| <= hi,
    so E[q] = y exactly for |y| <= 6 (the caller scales so that nothing exceeds 6).
Scale encodings:
    E8M0 (MX): 2^k, k in [-127, 127]; `e8m0_floor(v)` = 2^floor(log2 v) (the OCP rule), `e8m0_nearest(v)` the
    nearest power of two in log2, `e8m0_up(v)` = 2^ceil(log2 v) (so a scaled block never exceeds 6: the unbiased
    stochastic rounding of the quantized backward).
    E4M3 (NVFP4, torch.float8_e4m3fn): `e4m3_nearest(v)` rounds to nearest even and saturates at 448;
    `e4m3_up(v)` rounds up (so a scaled block never exceeds 6: used by the unbiased stochastic rounding).
"""

from __future__ import annotations

import torch
from torch import Tensor

from quest_pl.quantizers.base import Grid, QuantOutput

E2M1_MAX = 6.0
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_TIES_UP = (0.75, 1.75, 3.5)
"""Midpoints whose upper neighbour has the even code (1.0, 2.0, 4.0); the others round down to the even code."""
E4M3_MAX = 448.0
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127

_TABLES: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}


def _tables(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    if device not in _TABLES:
        _TABLES[device] = tuple(
            torch.tensor(t, dtype=torch.float32, device=device) for t in (E2M1_MAGNITUDES, E2M1_MIDPOINTS, E2M1_TIES_UP)
        )
    return _TABLES[device]


def round_e2m1(y: Tensor) -> Tensor:
    """Nearest E2M1 value, ties to even, saturating at +-6 (fp32 in, fp32 out)."""
    levels, midpoints, ties_up = _tables(y.device)
    mag = y.abs().clamp_max(E2M1_MAX).contiguous()
    index = torch.bucketize(mag, midpoints)  # a value on a midpoint goes to the lower level ...
    index += torch.isin(mag, ties_up)  # ... unless the upper one is the even code
    return torch.copysign(levels[index], y)


def stochastic_round_e2m1(y: Tensor, uniform: Tensor | None = None) -> Tensor:
    """Unbiased stochastic rounding to E2M1 for |y| <= 6 (larger magnitudes saturate); `uniform` ~ U[0, 1) like y."""
    levels, _, _ = _tables(y.device)
    mag = y.abs().clamp_max(E2M1_MAX).contiguous()
    lower = (torch.bucketize(mag, levels, right=True) - 1).clamp_(0, len(E2M1_MAGNITUDES) - 2)
    lo, hi = levels[lower], levels[lower + 1]
    u = torch.rand_like(mag) if uniform is None else uniform
    return torch.copysign(torch.where(u < (mag - lo) / (hi - lo), hi, lo), y)


def e8m0_floor(v: Tensor) -> Tensor:
    """2^floor(log2 v) for v > 0 (exactly, via frexp), clamped to the E8M0 range; 1/2 for v = 0 (an all-zero group,
    whose elements are 0 whatever the scale)."""
    _, exponent = torch.frexp(v)  # v = m 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(v), (exponent - 1).clamp_(E8M0_MIN_EXP, E8M0_MAX_EXP))


def e8m0_nearest(v: Tensor) -> Tensor:
    """The power of two nearest to v in log2 (2^floor(log2 v) or twice that), in the E8M0 range.

    With v = m 2^e (m in [0.5, 1)) that is 2^e iff m >= 2^-0.5. The comparison is in float64: fp32 rounds 2^-0.5 down,
    which would send the one fp32 mantissa just below the true midpoint up."""
    mantissa, exponent = torch.frexp(v)
    exponent = exponent - 1 + (mantissa.double() >= 2**-0.5).int()
    return torch.ldexp(torch.ones_like(v), exponent.clamp_(E8M0_MIN_EXP, E8M0_MAX_EXP))


def e8m0_up(v: Tensor) -> Tensor:
    """2^ceil(log2 v) for v > 0 (exactly, via frexp: v itself when it is a power of two), clamped to the E8M0 range;
    1 for v = 0 (an all-zero group)."""
    mantissa, exponent = torch.frexp(v)  # v = m 2^e, m in [0.5, 1): 2^e, or 2^(e - 1) = v when m = 1/2
    exponent = exponent - (mantissa == 0.5).int()
    return torch.ldexp(torch.ones_like(v), exponent.clamp_(E8M0_MIN_EXP, E8M0_MAX_EXP))


def e4m3_nearest(v: Tensor) -> Tensor:
    """v rounded to float8_e4m3fn (nearest, ties to even; subnormals down to 2^-9), saturating at 448."""
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def e4m3_up(v: Tensor) -> Tensor:
    """The smallest float8_e4m3fn value >= v for 0 <= v <= 448 (v is clamped to that range first)."""
    v = v.clamp(0, E4M3_MAX)
    nearest = v.to(torch.float8_e4m3fn)
    below = nearest.float() < v
    bumped = (nearest.view(torch.uint8) + below.to(torch.uint8)).view(torch.float8_e4m3fn)  # next code up
    return bumped.float()


class BlockFP4(Grid):
    """E2M1 elements with one scale per group of `fixed_group_size` (MXFP4, NVFP4); subclasses give the element
    scale d per group (the value of the element 1.0, >= 0) in `element_scale` and list their `scale_rules`.

    values = round_e2m1(x / d) * d (0 where d = 0);  clip level s = 6 d.
    Default trust threshold: half the outermost gap, (6 - 4) / 2 = 1 element unit, i.e. tau = d per group (the same
    rule as `fp4`, where the unit is a sigma); an explicit `trust` is in units of the group's RMS as for every grid.
    """

    allowed_bits = (4,)
    default_bits = 4
    absmax_covers_row = False
    options = ("scale_rule",)
    scale_rules: tuple[str, ...] = ()
    scale_bits: int = 8

    def __init__(self, bits: int | None = None, scale_rule: str | None = None) -> None:
        super().__init__(bits)
        scale_rule = scale_rule or self.scale_rules[0]
        if scale_rule not in self.scale_rules:
            raise ValueError(
                f"grid {self.name!r}: scale_rule={scale_rule!r}; expected one of {', '.join(self.scale_rules)}"
            )
        self.scale_rule = scale_rule
        self.levels = None
        self.clip_level = None
        self.default_trust = None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale_rule={self.scale_rule}"

    def scale_parts(self, x32: Tensor, rms: Tensor) -> tuple[Tensor, Tensor]:
        """(s, G) with the element scale d = s * G (one fp32 product): s per group, shape (..., 1), exactly a value of
        the format's scale encoding (E8M0, E4M3); G the fp32 tensor scale, shape () (1 for MXFP4). x32 in rows
        layout (..., d // g, g). The packed export stores s in its encoding and G (`quest_pl.export`)."""
        raise NotImplementedError

    def element_scale(self, x32: Tensor, rms: Tensor) -> Tensor:
        """Element scale d = s * G per group, shape (..., 1) (`scale_parts`)."""
        s, g = self.scale_parts(x32, rms)
        return s * g

    def quantize_parts(self, x32: Tensor, rms: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(values, s, G) with values = round_e2m1(x / d) * d, d = s * G (`scale_parts`)."""
        s, g = self.scale_parts(x32, rms)
        return scaled_e2m1(x32, s * g), s, g

    def _quantize(self, x32: Tensor, rms: Tensor) -> QuantOutput:
        values, s, g = self.quantize_parts(x32, rms)
        return QuantOutput(values, rms, E2M1_MAX * (s * g))

    def trust_threshold(self, out: QuantOutput, trust: float | None = None) -> Tensor:
        if trust is not None:
            return super().trust_threshold(out, trust)
        return (out.scale / E2M1_MAX).masked_fill(out.rms == 0, float("inf"))

    def bits_per_element(self, row_length: int, numel: int | None = None) -> float:
        return float(self.bits) + self.scale_bits / self.group_size


def scaled_e2m1(x32: Tensor, d: Tensor) -> Tensor:
    """round_e2m1(x / d) * d, with 0 where d = 0 (a block scale that underflowed: never 0/0)."""
    safe = torch.where(d > 0, d, torch.ones_like(d))
    return torch.where(d > 0, round_e2m1(x32 / safe) * safe, torch.zeros_like(x32))
