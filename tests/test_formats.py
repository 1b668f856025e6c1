"""Group scales for every grid, and the block-scaled FP4 formats (MXFP4, NVFP4) against their definitions: E2M1 values
and rounding, E8M0 / E4M3 scale encodings and rounding, saturation, underflow, and the relative MSE on N(0,1) rows
against a numerically integrated theory: the absmax rules and NVFP4's four-over-six through the law of the group
maximum, QuEST's Gaussian fit (`gaussian` rule) through the closed-form MSE at a known scale and the law of the group
RMS."""

import itertools
import math

import pytest
import torch

from quest_pl import estimators, quantizers
from quest_pl.config import ConfigError
from quest_pl.quantizers.e2m1 import (
    e4m3_nearest,
    e4m3_up,
    e8m0_floor,
    e8m0_nearest,
    round_e2m1,
    stochastic_round_e2m1,
)


# ---- the formats' definitions, decoded from bit patterns
def e2m1_codes() -> list[tuple[float, int]]:
    """(value, code) for the 16 E2M1 codes: sign | 2 exponent bits (bias 1) | 1 mantissa bit; exponent 0 subnormal."""
    out = []
    for code in range(16):
        sign, exp, man = code >> 3, (code >> 1) & 3, code & 1
        mag = man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2)
        out.append((-mag if sign else mag, code))
    return out


def e4m3_values() -> torch.Tensor:
    """All finite non-negative E4M3 (fn) values from the bit layout: bias 7, 3 mantissa bits, S.1111.111 = NaN only."""
    vals = []
    for exp in range(16):
        for man in range(8):
            if exp == 15 and man == 7:
                continue
            vals.append(man / 8 * 2.0**-6 if exp == 0 else 2.0 ** (exp - 7) * (1 + man / 8))
    return torch.tensor(sorted(vals), dtype=torch.float64)


def nearest_even(v: float, table: list[tuple[float, int]]) -> float:
    """Nearest value of `table` ((value, code) pairs) to v, ties to the even code."""
    best = min(abs(t - v) for t, _ in table)
    ties = [(t, c) for t, c in table if abs(t - v) == best]
    return next(t for t, c in ties if c % 2 == 0) if len(ties) > 1 else ties[0][0]


def test_e2m1_values_and_round_to_nearest_even_with_saturation():
    codes = e2m1_codes()
    assert sorted({v for v, _ in codes}) == sorted({s * m for m in quantizers.e2m1.E2M1_MAGNITUDES for s in (1, -1)})
    ys = torch.cat(
        (
            torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 6.5, 100.0, 0.0]),
            torch.linspace(-8, 8, 1601),
        )
    )
    ys = torch.cat((ys, -ys))
    got = round_e2m1(ys)
    want = torch.tensor([nearest_even(min(max(float(y), -6.0), 6.0), codes) for y in ys])
    assert torch.equal(got, want)


def test_e2m1_stochastic_rounding_is_unbiased_between_neighbours():
    torch.manual_seed(0)
    y = torch.tensor([0.1, 0.3, 0.7, 1.2, 1.9, 2.2, 3.3, 4.5, 5.9, -2.6, 6.0, 0.0])
    draws = stochastic_round_e2m1(y.expand(20000, -1).contiguous())
    values = set(round_e2m1(torch.linspace(-6, 6, 200)).tolist())
    assert set(draws.unique().tolist()) <= values
    lo = torch.tensor([0, 0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 4.0, -2.0, 6.0, 0.0])
    hi = torch.tensor([0.5, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 6.0, -3.0, 6.0, 0.0])
    assert ((draws == lo) | (draws == hi)).all()  # only the two neighbours
    var = (hi - y).abs() * (y - lo).abs()
    bound = 5 * (var / draws.shape[0]).sqrt() + 1e-7
    assert ((draws.mean(0) - y).abs() <= bound).all()


def test_e4m3_torch_dtype_matches_bit_definition_and_rounding():
    table = e4m3_values()
    decoded = torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    assert torch.equal(decoded[~decoded.isnan()], table)  # torch's float8_e4m3fn is the format we define
    assert table.max() == 448
    torch.manual_seed(1)
    v = torch.cat(
        (
            torch.rand(3000) * 500,
            torch.rand(1000) * 2**-5,
            table[1:].float() * 1.0,
            (table[1:] + table[:-1]).float() / 2,
        )
    )
    codes = [(float(t), i) for i, t in enumerate(table)]
    want = torch.tensor([nearest_even(min(float(x), 448.0), codes) for x in v.double()], dtype=torch.float32)
    assert torch.equal(e4m3_nearest(v), want)
    up = e4m3_up(v.clamp_max(448))
    idx = torch.searchsorted(table, v.clamp_max(448).double())  # smallest table value >= v
    assert torch.equal(up, table[idx].float())


def test_e8m0_scales_are_powers_of_two_in_the_dtype():
    torch.manual_seed(2)
    v = torch.exp2(torch.rand(5000) * 200 - 100) * (1 + torch.rand(5000))
    s = e8m0_floor(v)
    assert torch.equal(s, torch.exp2(torch.floor(torch.log2(v.double()))).float())
    assert (s <= v).all() and (v < 2 * s).all()
    if hasattr(torch, "float8_e8m0fnu"):
        assert torch.equal(s.to(torch.float8_e8m0fnu).float(), s)  # exactly representable in E8M0
    n = e8m0_nearest(v)
    assert ((torch.log2(n.double()) - torch.log2(v.double())).abs() <= 0.5 + 1e-9).all()


def test_e8m0_nearest_switches_exactly_at_the_log2_midpoint():
    """2^k is nearer in log2 than 2^(k+1) iff v < 2^(k + 1/2) = sqrt(2) 2^k; no fp32 value equals that threshold, so the
    fp32 values either side of it (fp32 rounds 2^-0.5 down, below the threshold) must round to 2^k and 2^(k+1)."""
    k = torch.arange(-20, 21, dtype=torch.float64)
    mid = torch.exp2(k + 0.5)
    below = mid.float()  # fp32 rounding of sqrt(2) 2^k is below it: its nearest power of two is 2^k
    assert (below.double() < mid).all()
    above = torch.nextafter(below, torch.tensor(float("inf")))
    assert (above.double() > mid).all()
    assert torch.equal(e8m0_nearest(below), torch.exp2(k).float())
    assert torch.equal(e8m0_nearest(above), torch.exp2(k + 1).float())


# ---- MXFP4 and NVFP4 against their specs
def e2m1_set(t: torch.Tensor) -> bool:
    allowed = torch.tensor([v for v, _ in e2m1_codes()])
    return torch.isin(t, allowed).all().item()


def test_mxfp4_spec_scale_elements_and_saturation():
    torch.manual_seed(3)
    x = (torch.randn(8, 4, 32) * torch.exp2(torch.randint(-20, 20, (8, 4, 1)).float())).flatten(1)
    x[0, :32] = 0.0
    x[1, 32:64] = torch.randn(32).clamp(-3, 3)
    x[1, 32] = 7.9  # d = 2^(2 - 2) = 1, so 7.9 saturates at 6
    grid = quantizers.build("mxfp4")
    assert grid.group_size == 32
    out = grid.quantize(x)
    d = out.scale / 6
    amax = x.unflatten(-1, (4, 32)).abs().amax(-1, keepdim=True)
    nz = amax > 0
    want_d = torch.exp2(torch.floor(torch.log2(amax.double())) - 2).float()  # OCP: 2^(floor(log2 amax) - emax)
    assert torch.equal(d[nz], want_d[nz])
    y = out.values / d
    assert e2m1_set(y)
    xr = x.unflatten(-1, (4, 32)) / d
    codes = e2m1_codes()
    want = torch.tensor([nearest_even(min(max(float(v), -6.0), 6.0), codes) for v in xr.flatten()]).reshape(xr.shape)
    assert torch.equal(y, want)
    assert y[1, 1].abs().max() == 6 and (out.values[0, 0] == 0).all()
    assert torch.equal(grid(x), out.values.reshape(x.shape))


def test_nvfp4_spec_tensor_and_group_scales_and_underflow():
    torch.manual_seed(4)
    x = torch.randn(4, 64)
    x[2, :16] *= 1e-9  # its E4M3 group scale underflows: quantized to zeros, never NaN
    grid = quantizers.build("nvfp4")
    out = grid.quantize(x)
    assert grid.group_size == 16 and out.values.shape == (4, 4, 16)
    g = x.abs().max() / (6 * 448)
    block = out.scale / 6 / g  # each group's scale is an E4M3 value times the fp32 G (up to fp32 rounding here)
    amax = x.unflatten(-1, (4, 16)).abs().amax(-1, keepdim=True)
    assert torch.allclose(block, e4m3_nearest(amax / 6 / g), rtol=1e-6, atol=0)
    assert torch.allclose(block, e4m3_nearest(block), rtol=1e-6, atol=0)
    assert float(block.max()) == pytest.approx(448, rel=1e-6)  # the tensor's largest group uses the top scale
    d = e4m3_nearest(amax / 6 / g) * g
    nonzero = (d > 0).expand_as(out.values)
    y = (out.values / torch.where(d > 0, d, 1))[nonzero]  # E2M1 values up to the rounding of (q d) / d
    assert torch.allclose(y, round_e2m1(y), rtol=1e-6, atol=0) and not (d[2, 0] > 0)
    assert out.values[2, 0].eq(0).all() and torch.isfinite(out.values).all()


def round_to_table(v: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Nearest entry of `table` to |v|, with v's sign, ties to the even code, beyond the last entry that entry
    (saturation); float64. `table`: sorted non-negative values whose index is their code (E2M1 magnitudes 0..6,
    `e4m3_values()`)."""
    mag = v.double().abs().clamp_max(table[-1])
    mids = (table[1:] + table[:-1]) / 2
    index = torch.bucketize(mag, mids)  # a midpoint goes to the lower entry ...
    tie_up = torch.isin(mag, mids) & (index % 2 == 1)  # ... unless the upper one has the even code
    return torch.copysign(table[index + tie_up], v.double())


E2M1_TABLE = torch.tensor(sorted({abs(v) for v, _ in e2m1_codes()}), dtype=torch.float64)
FP4_UNIT = 0.487079484
"""The E2M1 unit of QuEST's Gaussian fit in sigma units (METHOD.md §1.6); `test_fp4_unit_is_the_mse_optimal_e2m1_scale`
checks it against the argmin of the closed-form MSE."""


def e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """Nearest E4M3 value (ties to even, saturating at 448), float64, from the decoded table."""
    return round_to_table(v, e4m3_values())


def reference_block_values(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The formats' element rule in fp32: nearest-even E2M1 of x / d times d, saturating at +-6 d; 0 where d = 0."""
    safe = torch.where(d > 0, d, torch.ones_like(d))
    return torch.where(d > 0, round_to_table(x / safe, E2M1_TABLE).float() * safe, torch.zeros_like(x))


def test_nvfp4_four_over_six_picks_the_better_scale_per_group():
    """Definition (METHOD.md §1.12): G = max|x| / (6 * 256); per group the candidates s6 = e4m3(max|x| / 6 / G) and
    s4 = e4m3(max|x| / 4 / G); the group keeps the one with the lower squared error."""
    torch.manual_seed(5)
    x = torch.randn(64, 256)
    x[0, :16] *= 40  # the tensor maximum: its candidates are the top E4M3 scales 256 and 384 (<= 448)
    x[1, 16:32] = 0.0
    x[2, 32:48] *= 1e-7  # both candidate scales underflow E4M3: zeros
    grid = quantizers.build("nvfp4", scale_rule="four_over_six")
    xs = grid.rows(x)
    values, s, g = grid.quantize_parts(xs, xs.square().mean(-1, keepdim=True).sqrt())
    assert torch.equal(grid.quantize(x).values, values)
    assert torch.equal(g, x.abs().max() / (6 * 256))
    amax = xs.abs().amax(-1, keepdim=True)
    cands = [e4m3_round(amax / top / g) for top in (6, 4)]
    assert (cands[0][0, 0], cands[1][0, 0]) == (256, 384)
    assert torch.isin(s.double(), e4m3_values()).all()  # an E4M3 value times the fp32 tensor scale
    assert ((s.double() == cands[0]) | (s.double() == cands[1])).all()
    assert torch.equal(values, reference_block_values(xs, s * g))
    errs = [(reference_block_values(xs, c.float() * g).double() - xs).square().sum(-1) for c in cands]
    chosen = (values.double() - xs).square().sum(-1)
    assert torch.allclose(chosen, torch.minimum(*errs), rtol=1e-6, atol=0)
    assert (chosen <= errs[0] * (1 + 1e-6)).all() and (chosen <= errs[1] * (1 + 1e-6)).all()
    assert (errs[1] < errs[0]).sum() > 100 and (errs[0] < errs[1]).sum() > 100  # both choices occur
    assert s[2, 2] == 0 and (values[2, 2] == 0).all() and (values[1, 1] == 0).all()
    plain = quantizers.build("nvfp4").quantize(x)
    rel = lambda v: float((v - xs).square().sum() / xs.square().sum())
    assert rel(values) < rel(plain.values)


# ---- relative MSE on N(0,1) rows against numerical integration
def e2m1_sq_error(z: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(Q(z) - z)^2 for Q = nearest E2M1 value times d, saturating at 6 d (float64; ties do not change the error)."""
    z = z.abs()
    mids = (E2M1_TABLE[1:] + E2M1_TABLE[:-1]) / 2
    return (E2M1_TABLE[torch.bucketize((z / d).clamp_max(6), mids)] * d - z).square()


def normal_pdf(t: torch.Tensor) -> torch.Tensor:
    return torch.exp(-t * t / 2) / math.sqrt(2 * math.pi)


def absmax_group_theory(g: int, scale_of_max, n_m: int = 3000, n_z: int = 1500) -> float:
    """E||Q(z) - z||^2 / E||z||^2 for groups of g iid N(0,1) with element scale d = scale_of_max(max|z|) (float64).

    With M = max|z_i|: density g 2 phi(m) (2 Phi(m) - 1)^(g-1); given M = m the maximum sits at +-m and the other
    g - 1 elements are N(0,1) truncated to |z| < m. Midpoint rule in m on [0, 9] and in z on [0, m].
    """
    m = (torch.arange(n_m, dtype=torch.float64) + 0.5) * (9 / n_m)
    d = scale_of_max(m)[:, None]
    z = m[:, None] * (torch.arange(n_z, dtype=torch.float64) + 0.5) / n_z
    inner = 2 * (e2m1_sq_error(z, d) * normal_pdf(z)).sum(1) * (m / n_z)  # int_{-m}^{m} e(z) phi(z) dz
    cdf = torch.erf(m / math.sqrt(2))  # 2 Phi(m) - 1
    dens = g * 2 * normal_pdf(m)
    total = dens * (cdf ** (g - 1) * e2m1_sq_error(m[:, None], d)[:, 0] + (g - 1) * cdf ** (g - 2) * inner)
    return float(total.sum() * (9 / n_m)) / g


def two_scale_group_theory(g: int, scale_a, scale_b, n_m: int = 600, n_z: int = 900, bins: int = 192):
    """Per-element E||Q_a(z) - z||^2, E||Q_b(z) - z||^2 and E[min of the two] / g for groups of g iid N(0,1), where
    Q_a, Q_b use the element scales scale_a(M), scale_b(M) of the group maximum M = max|z_i| (float64).

    Given M = m (density g 2 phi(m) (2 Phi(m) - 1)^(g-1)) the maximum sits at +-m with errors e_a, e_b, and the other
    g - 1 elements are iid N(0,1) truncated to |z| < m with per-element errors f_a(z), f_b(z). So A = e_a + sum f_a,
    B = e_b + sum f_b and min(A, B) = A - (A - B)^+ with A - B = (e_a - e_b) + sum_i D_i, D_i = f_a(z_i) - f_b(z_i):
    the law of D_i is put on a lattice of `bins` steps (mass split linearly between the two nearest points, which
    keeps its mean), its (g - 1)-fold convolution taken by FFT, and E[(A - B)^+] summed on the lattice. Midpoint rule
    in m on [0.3, 7.3] (P(M < 0.3) < 1e-8 for g = 16, P(M > 7.3) < 1e-11) and in z on [0, m].
    """
    lo_m, hi_m = 0.3, 7.3
    m = lo_m + (torch.arange(n_m, dtype=torch.float64) + 0.5) * ((hi_m - lo_m) / n_m)
    cdf = torch.erf(m / math.sqrt(2))  # 2 Phi(m) - 1
    w_m = g * 2 * normal_pdf(m) * cdf ** (g - 1) * ((hi_m - lo_m) / n_m)
    z = m[:, None] * (torch.arange(n_z, dtype=torch.float64) + 0.5) / n_z
    w_z = 2 * normal_pdf(z) * (m / n_z / cdf)[:, None]  # conditional law of one of the others on [0, m], both signs
    d_a, d_b = scale_a(m)[:, None], scale_b(m)[:, None]
    e_a, e_b = e2m1_sq_error(m[:, None], d_a)[:, 0], e2m1_sq_error(m[:, None], d_b)[:, 0]
    f_a, f_b = e2m1_sq_error(z, d_a), e2m1_sq_error(z, d_b)
    mean_a = e_a + (g - 1) * (w_z * f_a).sum(1)
    mean_b = e_b + (g - 1) * (w_z * f_b).sum(1)
    diff = f_a - f_b
    low = diff.min(1, keepdim=True).values
    step = (diff.max(1, keepdim=True).values - low).clamp_min(1e-300) / bins
    pos = (diff - low) / step
    cell = pos.floor().clamp_max(bins - 1)
    frac = pos - cell
    law = torch.zeros(n_m, bins + 1, dtype=torch.float64)
    law.scatter_add_(1, cell.long(), w_z * (1 - frac)).scatter_add_(1, cell.long() + 1, w_z * frac)
    n = (g - 1) * bins + 1
    size = 1 << (n - 1).bit_length()  # no wrap-around of the (g - 1)-fold sum
    sum_law = torch.fft.irfft(torch.fft.rfft(law, size) ** (g - 1), size)[:, :n]
    lattice = (g - 1) * low + step * torch.arange(n, dtype=torch.float64)
    positive_part = (sum_law * (lattice + (e_a - e_b)[:, None]).clamp_min(0)).sum(1)
    return tuple(float((w_m * v).sum()) / g for v in (mean_a, mean_b, mean_a - positive_part))


def rms_scale_group_theory(g: int, scale_of_rms, n_r: int = 1500, n_u: int = 1000) -> float:
    """E||Q(z) - z||^2 / E||z||^2 for groups of g iid N(0,1) with element scale d = scale_of_rms(r), r = sqrt(mean z^2)
    the group's RMS (float64).

    ||z|| = r sqrt(g) has the chi law with g degrees of freedom, and given it z / ||z|| is uniform on the unit
    sphere, so one coordinate u = z_i / ||z|| has density Gamma(g/2) / (sqrt(pi) Gamma((g-1)/2)) (1 - u^2)^((g-3)/2)
    on [-1, 1], independent of r. d is a deterministic function of r (the encoding's rounding included), so the MSE
    is the 2-D integral of e(||z|| u; d(r)) over (||z||, u). Midpoint rule in ||z|| on [0, sqrt(g) + 12] and in u.
    """
    top = math.sqrt(g) + 12
    radius = (torch.arange(n_r, dtype=torch.float64) + 0.5) * (top / n_r)
    log_chi = (g - 1) * torch.log(radius) - radius.square() / 2 - (g / 2 - 1) * math.log(2) - math.lgamma(g / 2)
    w_r = torch.exp(log_chi) * (top / n_r)
    u = (torch.arange(n_u, dtype=torch.float64) + 0.5) / n_u
    log_u = (g - 3) / 2 * torch.log1p(-u * u) + math.lgamma(g / 2) - math.lgamma((g - 1) / 2) - math.log(math.pi) / 2
    w_u = 2 * torch.exp(log_u) / n_u  # both signs
    d = scale_of_rms(radius / math.sqrt(g))[:, None]
    assert abs(float(w_r.sum()) - 1) < 1e-9 and abs(float(w_u.sum()) - 1) < 1e-6
    return float((w_r[:, None] * w_u * e2m1_sq_error(radius[:, None] * u, d)).sum())


def e2m1_mse_at_known_scale(c: float) -> float:
    """E[(Q(z) - z)^2], z ~ N(0,1), Q = nearest E2M1 value times c (saturating at 6 c), in closed form: on each
    decision cell [a, b] with level l, int (z - l)^2 phi = [Phi]_a^b (1 + l^2) - 2 l [-phi]_a^b - [z phi]_a^b."""
    cdf = lambda t: 1.0 if t == math.inf else 0.5 * (1 + math.erf(t / math.sqrt(2)))
    pdf = lambda t: 0.0 if t == math.inf else math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    zpdf = lambda t: 0.0 if t == math.inf else t * pdf(t)
    levels = [c * float(v) for v in E2M1_TABLE]
    edges = [0.0, *((a + b) / 2 for a, b in itertools.pairwise(levels)), math.inf]
    total = 0.0
    for (a, b), level in zip(itertools.pairwise(edges), levels, strict=True):
        mass, first = cdf(b) - cdf(a), pdf(a) - pdf(b)
        total += mass + zpdf(a) - zpdf(b) - 2 * level * first + level * level * mass
    return 2 * total


@pytest.fixture(scope="module")
def normal_rows():
    torch.manual_seed(6)
    return torch.randn(2048, 1024)


def relative_mse(values: torch.Tensor, x: torch.Tensor) -> float:
    return float((values.double().reshape(x.shape) - x).square().sum() / x.double().square().sum())


def test_mxfp4_relative_mse_matches_theory(normal_rows):
    x = normal_rows
    theory = absmax_group_theory(32, lambda m: torch.exp2(torch.floor(torch.log2(m)) - 2))
    got = float((quantizers.build("mxfp4")(x) - x).square().sum() / x.square().sum())
    assert got == pytest.approx(theory, rel=0.02)


def test_nvfp4_relative_mse_matches_theory(normal_rows):
    x = normal_rows
    g = float(x.abs().max()) / (6 * 448)
    theory = absmax_group_theory(16, lambda m: e4m3_round(m / 6 / g) * g)
    got = float((quantizers.build("nvfp4")(x) - x).square().sum() / x.square().sum())
    assert got == pytest.approx(theory, rel=0.02)


def test_nvfp4_four_over_six_relative_mse_matches_theory(normal_rows):
    """Each candidate alone and the per-group minimum against `two_scale_group_theory` (the group maximum's law)."""
    x = normal_rows
    g = float(x.abs().max()) / (6 * 256)
    scale6, scale4 = (lambda m, top=top: e4m3_round(m / top / g) * g for top in (6, 4))
    theory6, theory4, theory_min = two_scale_group_theory(16, scale6, scale4)
    xs = x.double().unflatten(-1, (-1, 16))
    amax = xs.abs().amax(-1)
    total = float(xs.square().sum())
    errs = [
        e2m1_sq_error(xs, scale(amax.flatten()).reshape(amax.shape)[..., None]).sum(-1) for scale in (scale6, scale4)
    ]
    assert float(errs[0].sum()) / total == pytest.approx(theory6, rel=0.01)
    assert float(errs[1].sum()) / total == pytest.approx(theory4, rel=0.01)
    chosen = (quantizers.build("nvfp4", scale_rule="four_over_six")(x).double() - x).square().unflatten(-1, (-1, 16))
    assert torch.allclose(chosen.sum(-1), torch.minimum(*errs), rtol=1e-5, atol=1e-9)
    assert float(chosen.sum()) / total == pytest.approx(theory_min, rel=0.01)
    assert theory_min < 0.9 * min(theory6, theory4)  # the choice gains > 10 % over either scale alone


def test_fp4_unit_is_the_mse_optimal_e2m1_scale():
    """The unit a of QuEST's Gaussian fit (the `fp4` grid, and the target of the MXFP4 / NVFP4 `gaussian` rule) is the
    argmin over c of the closed-form MSE of E2M1 x c on N(0,1)."""
    coarse = [0.2 + 0.005 * k for k in range(161)]
    best = min(range(len(coarse)), key=lambda k: e2m1_mse_at_known_scale(coarse[k]))
    lo, hi = coarse[best - 1], coarse[best + 1]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):  # golden section on the bracket around the coarse minimum
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, b) if e2m1_mse_at_known_scale(a) < e2m1_mse_at_known_scale(b) else (a, hi)
    c_star = (lo + hi) / 2
    assert quantizers.fp4.FP4_SCALE == FP4_UNIT
    assert c_star == pytest.approx(FP4_UNIT, abs=1e-5)
    assert e2m1_mse_at_known_scale(FP4_UNIT) == pytest.approx(e2m1_mse_at_known_scale(c_star), rel=1e-9)
    assert quantizers.build("fp4").gaussian_mse == pytest.approx(e2m1_mse_at_known_scale(c_star), rel=1e-8)


def test_e2m1_at_a_known_scale_matches_the_integral(normal_rows, monkeypatch):
    """sigma = 1 known: the grids' MSE equals the closed-form integral at the scale their rule gives (fp4: a; mxfp4
    `gaussian`: E8M0 nearest to a in log2 = 1/2; nvfp4 `gaussian`: e4m3(448) G = a), and with the block scale forced
    to a, the E2M1 element path of both formats gives the integral at a."""
    x = normal_rows
    ones = lambda t: torch.ones(*t.shape[:-1], 1)
    fp4 = quantizers.build("fp4")
    assert relative_mse(fp4._quantize(x, ones(x)).values, x) == pytest.approx(
        e2m1_mse_at_known_scale(FP4_UNIT), rel=0.01
    )
    for name, unit in (("mxfp4", 0.5), ("nvfp4", FP4_UNIT)):
        grid = quantizers.build(name, scale_rule="gaussian")
        out = grid._quantize(grid.rows(x), ones(grid.rows(x)))
        assert torch.allclose(out.scale, torch.full_like(out.scale, 6 * unit), rtol=1e-6, atol=0)
        assert relative_mse(out.values, x) == pytest.approx(e2m1_mse_at_known_scale(unit), rel=0.01)
        monkeypatch.setattr(grid, "scale_parts", lambda x32, rms: (torch.full_like(rms, FP4_UNIT), torch.ones(())))
        assert relative_mse(grid(x), x) == pytest.approx(e2m1_mse_at_known_scale(FP4_UNIT), rel=0.01)


def gaussian_rule_scale(name: str, rms: torch.Tensor, target_max: float | None = None) -> torch.Tensor:
    """The `gaussian` rule's element scale d from the group RMS (METHOD.md §1.12), float64: mxfp4 the power of two
    nearest in log2 to a r; nvfp4 e4m3(a r / G) G with G = max(a r) / 448 over the tensor (`target_max` = that max)."""
    target = FP4_UNIT * rms.double()
    if name == "mxfp4":
        return torch.exp2(torch.round(torch.log2(target)))
    g = target_max / 448
    return e4m3_round(target / g) * g


@pytest.mark.parametrize(("name", "group"), [("mxfp4", 32), ("nvfp4", 16)])
def test_gaussian_rule_relative_mse_matches_theory(normal_rows, name, group):
    """Group RMS estimated from g samples, then rounded to the scale encoding: `rms_scale_group_theory`."""
    x = normal_rows
    rms = x.unflatten(-1, (-1, group)).square().mean(-1).sqrt()
    target_max = FP4_UNIT * float(rms.max())
    theory = rms_scale_group_theory(group, lambda r: gaussian_rule_scale(name, r, target_max))
    got = relative_mse(quantizers.build(name, scale_rule="gaussian")(x), x)
    assert got == pytest.approx(theory, rel=0.01)


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_gaussian_rule_scales_values_and_saturation(name):
    """The `gaussian` rule against its definition: scale = the encoding of a r (E8M0: nearest power of two in log2;
    E4M3 nearest-even times G), values in E2M1 x scale, nearest-even, saturated at +-6 scale beyond the clip."""
    torch.manual_seed(12)
    grid = quantizers.build(name, scale_rule="gaussian")
    x = torch.randn(16, 128) * torch.exp2(torch.randint(-6, 6, (16, 1)).float())
    x[:, 5::16] *= 12  # outliers beyond 6 a r: saturated
    x[3, :32] = 0.0
    x[4, :32] *= 1e-9  # NVFP4: its E4M3 scale underflows (zeros); MXFP4: a small power of two
    xs = grid.rows(x)
    rms = xs.square().mean(-1, keepdim=True).sqrt()
    values, s, g = grid.quantize_parts(xs, rms)
    assert torch.equal(grid.quantize(x).values, values)
    target_max = float((FP4_UNIT * rms).max())
    want = gaussian_rule_scale(name, rms, target_max)
    nonzero = rms > 0
    if name == "mxfp4":
        assert g == 1 and torch.equal(s.double()[nonzero], want[nonzero])
        assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # E8M0: a power of two
    else:
        assert float(g) == pytest.approx(target_max / 448, rel=1e-6)
        assert torch.isin(s.double(), e4m3_values()).all() and s.max() == 448
        assert torch.allclose((s * g).double()[nonzero], want[nonzero], rtol=1e-6, atol=0)
    d = s * g
    assert torch.equal(values, reference_block_values(xs, d))
    y = values.double() / torch.where(d > 0, d, 1).double()  # E2M1 values, up to the fp32 rounding of (q d) / d
    assert torch.allclose(y, round_to_table(y, E2M1_TABLE), rtol=1e-6, atol=0)
    beyond = xs.abs() > 6 * d
    assert beyond.sum() > 50
    assert torch.equal(values[beyond], torch.copysign(6 * d.expand_as(xs)[beyond], xs[beyond]))
    assert (values[3, 0] == 0).all() and torch.isfinite(values).all()


# ---- group scales for every grid
@pytest.mark.parametrize("name", ["gaussian_mse", "uniform", "lloyd_max", "fp4", "ternary", "int_sparse24"])
def test_group_scales_are_rows_of_g_for_every_grid(name):
    torch.manual_seed(7)
    x = torch.randn(3, 5, 128) * torch.linspace(0.1, 10, 128)
    bits = None if name == "ternary" else 4
    grouped = quantizers.build(name, bits=bits, group_size=32)
    per_row = quantizers.build(name, bits=bits)
    assert torch.equal(grouped(x), per_row(x.unflatten(-1, (4, 32))).flatten(-2))
    assert grouped.gaussian_mse is None  # the large-row theory does not describe a finite group
    if name == "gaussian_mse":  # group scales follow the data's scale change along the row
        err = lambda y: float((y - x).square().sum())
        assert err(grouped(x)) < err(per_row(x))


def test_trust_mask_is_per_group():
    torch.manual_seed(8)
    x = (torch.randn(6, 64) * torch.tensor([1.0, 10.0]).repeat_interleave(32)).requires_grad_()
    grid = quantizers.build("gaussian_mse", bits=4, group_size=32)
    est = estimators.build("trust", quantizer=grid)
    est.record_mask = True
    est(x).sum().backward()
    xs = x.detach().unflatten(-1, (2, 32))
    sigma = xs.square().mean(-1, keepdim=True).sqrt()
    q = grid(x.detach()).unflatten(-1, (2, 32))
    want = ((q - xs).abs() <= grid.default_trust * sigma).flatten(-2)
    assert torch.equal(est.last_mask, want) and torch.equal(x.grad, want.float())
    assert est.expected_masked_fraction() is None


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_block_format_default_trust_masks_only_saturated_elements(name):
    torch.manual_seed(9)
    x = torch.randn(16, 64)
    x[:, ::16] *= 6  # outliers that saturate
    grid = quantizers.build(name)
    est = estimators.build("trust", quantizer=grid)
    est.record_mask = True
    est(x.requires_grad_())
    out = grid.quantize(x.detach())
    d = out.scale / 6
    beyond = (x.detach().unflatten(-1, (-1, grid.group_size)).abs() > 7 * d).flatten(-2)  # |q - x| > 1 unit
    assert torch.equal(~est.last_mask, beyond)
    assert est.expected_masked_fraction() is None  # not 0: these formats can clip
    assert estimators.build("clip", quantizer=grid).expected_masked_fraction() is None


def test_grid_errors():
    with pytest.raises(ValueError, match="group_size=24"):
        quantizers.build("gaussian_mse", bits=4, group_size=24)
    with pytest.raises(ValueError, match="groups of 32"):
        quantizers.build("mxfp4", group_size=16)
    with pytest.raises(ValueError, match="scale_rule"):
        quantizers.build("nvfp4", scale_rule="six")
    with pytest.raises(ValueError, match="no option scale_rule"):
        quantizers.build("gaussian_mse", bits=4, scale_rule="absmax")
    with pytest.raises(ValueError, match="not per group"):
        quantizers.build("gaussian_mse", bits=4, group_size=32).quantize_with_scale(torch.randn(2, 64), torch.ones(1))
    with pytest.raises(ValueError, match="does not divide"):
        quantizers.build("fp4", group_size=32)(torch.randn(2, 48))


def test_bits_per_element_includes_scales():
    assert quantizers.build("mxfp4").bits_per_element(640) == 4.25
    assert quantizers.build("nvfp4").bits_per_element(640) == 4.5
    assert quantizers.build("nvfp4").bits_per_element(640, numel=1024) == 4.5 + 32 / 1024
    assert quantizers.build("gaussian_mse", bits=4).bits_per_element(640) == 4 + 16 / 640
    assert quantizers.build("gaussian_mse", bits=4, group_size=32).bits_per_element(640) == 4.5


# ---- Hadamard blocks
@pytest.mark.parametrize("block", [16, 32, 64])
def test_small_hadamard_blocks(block):
    torch.manual_seed(10)
    x = torch.randn(3, 128, dtype=torch.float64)
    h = quantizers.hadamard_matrix(torch.float64, "cpu", block)
    assert torch.allclose(h @ h.T, torch.eye(block, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(quantizers.hadamard_transform(x, block), x @ torch.block_diag(*[h] * (128 // block)))
    assert torch.allclose(quantizers.hadamard_transform(quantizers.hadamard_transform(x, block), block), x)
    assert torch.allclose(h.abs(), torch.full_like(h, block**-0.5), rtol=1e-15, atol=0)


# ---- configuration
def quant_cfg(**kw):
    from omegaconf import OmegaConf

    from quest_pl.config import compose

    cfg = compose("quant=quest_w4a4", *(f"quant.{k}={v}" for k, v in kw.items()))
    return OmegaConf.to_container(cfg.quant, resolve=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"group_size": 24}, "quant.group_size=24"),
        ({"scale_rule": "absmax"}, "quant.scale_rule='absmax'"),
        ({"grid": "mxfp4", "group_size": 16}, "groups of 32"),
        ({"estimator": "lsq", "group_size": 32}, "no group scales"),
        ({"hadamard_block": 8}, "quant.hadamard_block=8"),
        ({"backward": "fp8"}, "quant.backward='fp8'"),
    ],
)
def test_config_errors(overrides, message):
    from quest_pl.quant import QuantConfig

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        QuantConfig.from_cfg(quant_cfg(**overrides), None)


def test_config_group_must_divide_widths_and_kernel_falls_back():
    from quest_pl.model import LlamaConfig
    from quest_pl.quant import QuantConfig, kernel_unsupported

    with pytest.raises(ConfigError, match="multiple of the group size 256"):
        QuantConfig.from_cfg(
            quant_cfg(group_size=256, hadamard_block=16), LlamaConfig(n_layer=1, d_model=128, n_head=1)
        )
    cfg = QuantConfig.from_cfg(quant_cfg(grid="nvfp4", scale_rule="four_over_six", hadamard_block=16), None)
    assert cfg.hadamard_block == 16 and cfg.weight.build_grid().scale_rule == "four_over_six"
    assert "group scales" in kernel_unsupported(cfg.weight, 128, True, 16)
    per_row = QuantConfig.from_cfg(quant_cfg(hadamard_block=32), None)
    assert "Hadamard block" in kernel_unsupported(per_row.weight, 128, True, 32)
    for g in (16, 32, 64, 128):  # group RMS scales inside the 128-block are in the fused kernel
        for grid in ("gaussian_mse", "fp4"):
            spec = QuantConfig.from_cfg(quant_cfg(grid=grid, group_size=g), None).weight
            assert kernel_unsupported(spec, 256, True) is None, (grid, g)
    assert "group_size=256" in kernel_unsupported(
        QuantConfig.from_cfg(quant_cfg(group_size=256), None).weight, 512, True
    )
    assert "no kernel" in kernel_unsupported(
        QuantConfig.from_cfg(quant_cfg(grid="uniform", group_size=32), None).act, 128, True
    )
    mx = QuantConfig.from_cfg(quant_cfg(grid="mxfp4"), None).weight
    assert "mxfp4's rounded group scales" in kernel_unsupported(mx, 128, True)
    with pytest.raises(ConfigError, match=r"quant\.kernel=triton.*group_size=256"):
        QuantConfig.from_cfg(quant_cfg(group_size=256, kernel="triton"), None)


@pytest.mark.parametrize("grid", ["mxfp4", "nvfp4"])
def test_quantized_model_trains_with_block_formats(grid):
    from quest_pl.model import Llama, LlamaConfig
    from quest_pl.quant import QuantConfig, full_precision, quant_layers, quantize_model

    torch.manual_seed(11)
    mcfg = LlamaConfig(n_layer=1, d_model=128, n_head=1, vocab_size=64, seq_len=16)
    model = Llama(mcfg)
    qcfg = QuantConfig.from_cfg(quant_cfg(grid=grid, hadamard_block=32 if grid == "mxfp4" else 16), mcfg)
    quantize_model(model, qcfg)
    layer = next(iter(quant_layers(model).values()))
    assert layer.hadamard_block == qcfg.hadamard_block
    idx = torch.randint(0, 64, (2, 16))
    loss = model(idx).float().logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad(), full_precision(model):
        assert torch.isfinite(model(idx)).all()


def test_format_ablation_arms_and_bits_per_element():
    from omegaconf import OmegaConf

    from quest_pl.quant import bits_per_element
    from tests.test_experiments import compose_hydra, sweep_arms

    arms = sweep_arms("format_ablation")
    assert arms == ["bf16", "quest_w4a4", "int4_g32", "mxfp4", "nvfp4", "nvfp4_4over6", "nvfp4_4over6_bwd_sr"]
    seen = {}
    for arm in arms:
        q = OmegaConf.to_container(compose_hydra("experiment=format_ablation", f"quant={arm}").quant, resolve=True)
        seen[arm] = (q["grid"], q["group_size"], q["scale_rule"], q["backward"], bits_per_element(q, 128))
        assert arm == "bf16" or (q["estimator"], q["hadamard"]) == ("trust", True)
    assert seen == {
        "bf16": (None, None, None, "none", "W16A16"),
        "quest_w4a4": ("gaussian_mse", None, None, "none", "W4.125A4.125"),
        "int4_g32": ("gaussian_mse", 32, None, "none", "W4.5A4.5"),
        "mxfp4": ("mxfp4", None, "absmax", "none", "W4.25A4.25"),
        "nvfp4": ("nvfp4", None, "absmax", "none", "W4.5A4.5"),
        "nvfp4_4over6": ("nvfp4", None, "four_over_six", "none", "W4.5A4.5"),
        "nvfp4_4over6_bwd_sr": ("nvfp4", None, "four_over_six", "sr", "W4.5A4.5"),
    }


def test_extra_format_config_builds():
    from quest_pl.quant import QuantConfig

    cfg = QuantConfig.from_cfg(quant_cfg(), None)  # quest_w4a4 as a control
    assert cfg.weight.build_grid().group_size is None
    from omegaconf import OmegaConf

    from quest_pl.config import compose

    q = OmegaConf.to_container(compose("quant=mxfp4_quartet").quant, resolve=True)
    grid = QuantConfig.from_cfg(q, None).weight.build_grid()
    assert (grid.name, grid.scale_rule, grid.group_size) == ("mxfp4", "gaussian", 32)
