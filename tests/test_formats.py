"""Group scales for every grid, and the block-scaled FP4 formats (MXFP4, NVFP4) against their definitions: E2M1 values
and rounding, E8M0 / E4M3 scale encodings and rounding, saturation, underflow, and the relative MSE on N(0,1) rows
against a numerically integrated theory (the group maximum's distribution)."""

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


def test_nvfp4_four_over_six_picks_the_better_scale_per_group():
    torch.manual_seed(5)
    x = torch.randn(64, 256)
    four6 = quantizers.build("nvfp4", scale_rule="four_over_six").quantize(x)
    xs = x.unflatten(-1, (16, 16))
    g = x.abs().max() / (6 * 256)
    amax = xs.abs().amax(-1, keepdim=True)
    errs = []
    for top in (6, 4):
        d = e4m3_nearest(amax / top / g) * g
        errs.append((round_e2m1(xs / d) * d - xs).square().sum(-1, keepdim=True))
    chosen = (four6.values - xs).square().sum(-1, keepdim=True)
    assert torch.allclose(chosen, torch.minimum(*errs))
    assert (errs[1] < errs[0]).any() and (errs[0] < errs[1]).any()  # both choices occur
    plain = quantizers.build("nvfp4").quantize(x)
    rel = lambda o: float((o.values - xs).square().sum() / xs.square().sum())
    assert rel(four6) < rel(plain)


# ---- relative MSE on N(0,1) rows against numerical integration
def absmax_group_theory(g: int, scale_of_max, n_m: int = 3000, n_z: int = 1500) -> float:
    """E||Q(z) - z||^2 / E||z||^2 for groups of g iid N(0,1) with element scale d = scale_of_max(max|z|) (float64).

    With M = max|z_i|: density g 2 phi(m) (2 Phi(m) - 1)^(g-1); given M = m the maximum sits at +-m and the other
    g - 1 elements are N(0,1) truncated to |z| < m. Midpoint rule in m on [0, 9] and in z on [0, m].
    """
    table = torch.tensor(quantizers.e2m1.E2M1_MAGNITUDES, dtype=torch.float64)
    mids = (table[1:] + table[:-1]) / 2

    def err(z, d):  # (Q(z) - z)^2 with nearest E2M1 magnitude, saturating at 6
        q = table[torch.bucketize((z / d).clamp_max(6), mids)] * d
        return (q - z).square()

    m = (torch.arange(n_m, dtype=torch.float64) + 0.5) * (9 / n_m)
    d = scale_of_max(m)[:, None]
    z = m[:, None] * (torch.arange(n_z, dtype=torch.float64) + 0.5) / n_z
    phi = lambda t: torch.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    inner = 2 * (err(z, d) * phi(z)).sum(1) * (m / n_z)  # int_{-m}^{m} e(z) phi(z) dz
    cdf = torch.erf(m / math.sqrt(2))  # 2 Phi(m) - 1
    dens = g * 2 * phi(m)
    total = dens * (cdf ** (g - 1) * err(m[:, None], d)[:, 0] + (g - 1) * cdf ** (g - 2) * inner)
    return float(total.sum() * (9 / n_m)) / g


@pytest.fixture(scope="module")
def normal_rows():
    torch.manual_seed(6)
    return torch.randn(2048, 1024)


def test_mxfp4_relative_mse_matches_theory(normal_rows):
    x = normal_rows
    theory = absmax_group_theory(32, lambda m: torch.exp2(torch.floor(torch.log2(m)) - 2))
    got = float((quantizers.build("mxfp4")(x) - x).square().sum() / x.square().sum())
    assert got == pytest.approx(theory, rel=0.02)


def test_nvfp4_relative_mse_matches_theory(normal_rows):
    x = normal_rows
    g = float(x.abs().max()) / (6 * 448)
    table = e4m3_values()
    nearest = lambda v: table[(v[:, None] - table).abs().argmin(1)]  # ties: measure zero
    theory = absmax_group_theory(16, lambda m: nearest(m / 6 / g) * g)
    got = float((quantizers.build("nvfp4")(x) - x).square().sum() / x.square().sum())
    assert got == pytest.approx(theory, rel=0.02)


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
