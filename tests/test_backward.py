"""Quantized backward (`quant.backward`, `quant.backward_format`, `quant.backward_operands`; METHOD.md §1.13): for each
format (NVFP4, MXFP4, INT8) stochastic rounding is unbiased with the variance its definition gives and never saturates;
random-Hadamard round-to-nearest has lower error and a small, measured bias; codes and scales are those of the format;
the layer's gradients are the products of the quantized operands; the alignment diagnostic sees the backward."""

import math

import pytest
import torch
import torch.nn.functional as F

from quest_pl.estimators.backward import (
    BACKWARD_FORMATS,
    SR_FORMATS,
    QuantizedBackwardLinear,
    backward_gemm,
    quantize_gradient,
    quantize_groups,
    quantize_operand,
    quantized_backward_linear,
)
from quest_pl.quantizers import hadamard_transform
from quest_pl.quantizers.e2m1 import E2M1_MAGNITUDES, e4m3_nearest, e4m3_up

DRAWS = 1000
GROUP = {"nvfp4": 16, "mxfp4": 32, "int8": 32}  # the formats' definitions (NVFP4; OCP MX; our INT8)
E2M1 = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float64)


@pytest.fixture(scope="module")
def gradient():
    torch.manual_seed(0)
    g = torch.randn(32, 256) * torch.exp(torch.randn(32, 1))
    g[:, 3] *= 20  # an outlier column
    g[5] = 0.0  # an all-zero row
    return g


def draws(g: torch.Tensor, mode: str, fmt: str = "nvfp4") -> torch.Tensor:
    """DRAWS independent quantizations of g (a stack of copies: each is its own tensor)."""
    torch.manual_seed(1)
    return quantize_gradient(g.expand(DRAWS, *g.shape), mode, fmt)


def bias2_and_mse(qs: torch.Tensor, g: torch.Tensor) -> tuple[float, float]:
    """||mean Q - g||^2 / ||g||^2 and E||Q - g||^2 / ||g||^2. For an unbiased Q, E[bias2] = mse / DRAWS."""
    norm = g.square().sum()
    return float((qs.mean(0) - g).square().sum() / norm), float((qs - g).square().sum((1, 2)).mean() / norm)


def sr_scale(groups: torch.Tensor, fmt: str) -> torch.Tensor:
    """The non-saturating group scale d of the stochastic rounding, from the formats' definitions (float64):
    NVFP4 the E4M3 value at or above max|x| / 6 / G times G = max|x|_tensor / (6 * 448); MXFP4 the power of two at or
    above max|x| / 6; INT8 max|x| / 127."""
    amax = groups.abs().amax(-1, keepdim=True)
    if fmt == "nvfp4":
        tensor = amax.max() / (6 * 448)
        return (e4m3_up(amax / 6 / tensor) * tensor).double()
    if fmt == "mxfp4":
        return torch.exp2(torch.ceil(torch.log2(amax.double() / 6)))
    return amax.double() / 127


def sr_neighbours(y: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes lo <= |y| <= hi around the magnitude of y (E2M1 magnitudes, or consecutive integers)."""
    mag = y.abs()
    if fmt == "int8":
        lo = mag.floor().clamp_max(126)
        return lo, lo + 1
    i = (torch.searchsorted(E2M1, mag.contiguous(), right=True) - 1).clamp(0, 6)
    return E2M1[i], E2M1[i + 1]


def sr_variance(g: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element (g's shape, float64): the variance (hi - |y|)(|y| - lo) d^2 of stochastic rounding between the
    neighbouring codes of y = g / d, and the probability p = (|y| - lo) / (hi - lo) of rounding up."""
    groups = g.unflatten(-1, (-1, GROUP[fmt]))
    d = sr_scale(groups, fmt)
    y = groups.double() / torch.where(d > 0, d, 1)
    lo, hi = sr_neighbours(y, fmt)
    mag = y.abs()
    var = (hi - mag).clamp_min(0) * (mag - lo) * d.square()
    return var.flatten(-2), ((mag - lo) / (hi - lo)).flatten(-2)


@pytest.mark.parametrize("fmt", SR_FORMATS)
def test_sr_is_unbiased_with_its_theoretical_variance(gradient, fmt):
    qs = draws(gradient, "sr", fmt)
    var, p = sr_variance(gradient, fmt)
    bias2, mse = bias2_and_mse(qs, gradient)
    assert bias2 <= 2 * mse / DRAWS  # E[bias2] = mse / DRAWS for an unbiased estimator (its noise floor)
    assert mse == pytest.approx(float(var.sum() / gradient.double().square().sum()), rel=0.05)
    # Per element: the mean of the draws within a few standard errors of g, where the count of "up" draws is close to
    # normal (DRAWS p (1 - p) >= 10; rarer roundings are covered by the sums above).
    z = (qs.double().mean(0) - gradient.double()) / (var / DRAWS).sqrt()
    normal = DRAWS * p * (1 - p) >= 10
    assert normal.float().mean() > 0.5 and z[normal].abs().max() < 5.5
    assert z[normal].square().mean() == pytest.approx(1.0, abs=0.1)  # the standard errors are the right size
    assert z[normal].mean().abs() < 5 / math.sqrt(normal.sum())  # no systematic sign
    assert qs[:, 5].eq(0).all() and torch.isfinite(qs).all()


@pytest.mark.parametrize("fmt", SR_FORMATS)
def test_rtn_rht_has_lower_error_than_sr_and_a_small_bias(gradient, fmt):
    mse_sr = bias2_and_mse(draws(gradient, "sr", fmt), gradient)[1]
    bias2, mse = bias2_and_mse(draws(gradient, "rtn_rht", fmt), gradient)
    # Same grid, nearest instead of a random neighbour: for uniform fractional positions d^2 / 12 against d^2 / 6.
    assert mse < 0.7 * mse_sr
    assert bias2 < 0.1 * mse  # a bias (above the noise floor for NVFP4 and MXFP4) small next to one draw's error
    if fmt != "int8":  # not unbiased: the bias stands above the noise floor (INT8's 255 levels: at it, 1000 draws)
        assert bias2 > 3 * mse / DRAWS


def test_sr_default_is_nvfp4_bit_for_bit(gradient):
    """The default format is today's NVFP4 stochastic rounding, bit for bit, against its definition written out:
    d = e4m3_up(max|x| / 6 / G) G, one uniform draw per element, up with probability (|y| - lo) / (hi - lo)."""
    x = torch.nn.functional.pad(gradient[:, :250], (0, 6))  # padded to the group as quantize_gradient does
    groups = x.unflatten(-1, (-1, 16))
    amax = groups.abs().amax(-1, keepdim=True)
    tensor = amax.max() / (6 * 448)
    d = e4m3_up(amax / 6 / tensor) * tensor
    safe = torch.where(d > 0, d, torch.ones_like(d))
    mag = (groups / safe).abs()
    levels = E2M1.float()
    i = (torch.searchsorted(levels, mag, right=True) - 1).clamp(0, 6)
    lo, hi = levels[i], levels[i + 1]
    torch.manual_seed(7)
    u = torch.rand_like(mag)
    expected = torch.where(d > 0, torch.copysign(torch.where(u < (mag - lo) / (hi - lo), hi, lo), groups) * safe, 0)
    torch.manual_seed(7)
    assert torch.equal(quantize_gradient(gradient[:, :250], "sr"), expected.flatten(-2)[:, :250])


@pytest.mark.parametrize("fmt", SR_FORMATS)
@pytest.mark.parametrize("stochastic", [True, False])
def test_codes_and_scales_are_the_formats(gradient, fmt, stochastic):
    torch.manual_seed(2)
    codes, d = quantize_groups(gradient, fmt, stochastic)
    groups = gradient.unflatten(-1, (-1, GROUP[fmt]))
    amax = groups.abs().amax(-1, keepdim=True)
    nonzero = amax.squeeze(-1) > 0
    assert codes.shape == groups.shape and d.shape == amax.shape
    assert torch.equal(d == 0, amax == 0) and codes[~nonzero].eq(0).all()
    if fmt == "int8":  # integers in [-127, 127], scale max|x| / 127: the group maximum is +-127 (both roundings)
        assert torch.equal(codes, codes.round()) and codes.abs().max() <= 127
        assert codes.abs().amax(-1)[nonzero].eq(127).all()
        assert torch.allclose(d, amax / 127, rtol=1e-6)
    else:  # E2M1 codes
        assert torch.isin(codes.abs(), E2M1.float()).all()
    if fmt == "mxfp4":  # E8M0: powers of two
        mantissa, _ = torch.frexp(d[nonzero])
        assert mantissa.eq(0.5).all()
    if fmt == "nvfp4":  # E4M3 times the fp32 tensor scale G = max|x| / (6 * 448)
        s = d[nonzero] / (amax.max() / (6 * 448))
        assert torch.allclose(s, e4m3_nearest(s), rtol=1e-6)
    ratio = (amax / torch.where(d > 0, d, 1))[nonzero]
    if stochastic:  # no saturation: every element fits the largest code, so E[Q] = x
        top = 127 if fmt == "int8" else 6
        assert ratio.max() <= top * (1 + 1e-6)
    elif fmt == "mxfp4":  # the OCP rule 2^(floor(log2 max|x|) - 2): max|x| / d in [4, 8), saturating above 6
        assert ratio.min() >= 4 and ratio.max() < 8


def test_mxfp4_saturation_of_round_to_nearest_and_not_of_sr():
    """A group whose maximum is 7 * 2^k: the OCP scale 2^k saturates it to 6 * 2^k under round-to-nearest; stochastic
    rounding takes the scale 2^(k + 1) (the power of two at or above 7/6 2^k), so 7 = 3.5 * 2 stays reachable."""
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = 7 * 2.0**-3, 0.5 * 2.0**-3
    codes, d = quantize_groups(x, "mxfp4", stochastic=False)
    assert d.item() == 2.0**-3 and codes[0, 0, 0] == 6 and codes[0, 0, 1] == 0.5
    torch.manual_seed(3)
    codes, d = quantize_groups(x.expand(2000, 1, 32), "mxfp4", stochastic=True)
    assert d.eq(2.0**-2).all() and set(codes[:, 0, 0, 0].tolist()) == {3.0, 4.0}
    assert (codes[:, 0, 0, 0] * d[:, 0, 0, 0]).mean().item() == pytest.approx(7 * 2.0**-3, rel=0.02)


def test_unpadded_shapes_and_bad_names():
    torch.manual_seed(2)
    g = torch.randn(37, 41)
    for fmt in BACKWARD_FORMATS:
        for mode in ("sr", "rtn", "rtn_rht") if fmt in SR_FORMATS else ("rtn", "rtn_rht"):
            q = quantize_gradient(g, mode, fmt)
            assert q.shape == g.shape and torch.isfinite(q).all()
        assert quantize_operand(g, fmt).shape == g.shape
    assert torch.equal(quantize_gradient(g, "none"), g)
    with pytest.raises(ValueError, match="backward mode"):
        quantize_gradient(g, "fp8")
    with pytest.raises(ValueError, match="backward format 'fp16'"):
        quantize_gradient(g, "sr", "fp16")
    with pytest.raises(ValueError, match="'fp8' rounds to nearest"):
        quantize_gradient(g, "sr", "fp8")
    with pytest.raises(ValueError, match="backward operands 'both'"):
        backward_gemm(g, g, "sr", "int8", "both")


def linear_grads(x, w, b, gy, *args):
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    quantized_backward_linear(x, w, b, *args).backward(gy)
    return x.grad, w.grad, b.grad


@pytest.fixture(scope="module")
def layer_data():
    torch.manual_seed(3)
    return torch.randn(2, 24, 64), torch.randn(48, 64) / 8, torch.randn(48), torch.randn(2, 24, 48)


@pytest.mark.parametrize("fmt", SR_FORMATS)
def test_layer_backward_is_both_gemms_with_the_quantized_gradient(layer_data, fmt):
    x, w, b, gy = layer_data
    exact = linear_grads(x, w, b, gy, "none")
    assert torch.allclose(QuantizedBackwardLinear.apply(x, w, b, "sr", fmt), F.linear(x, w, b))  # forward untouched
    for mode in ("sr", "rtn_rht"):
        torch.manual_seed(4)
        gx, gw, gb = linear_grads(x, w, b, gy, mode, fmt)
        torch.manual_seed(4)
        g2 = gy.reshape(-1, 48)
        q_dx = quantize_gradient(g2, mode, fmt)  # groups along out (dX = G W), drawn first
        q_dw = quantize_gradient(g2.t(), mode, fmt)  # groups along tokens (dW = G^T X)
        assert torch.allclose(gx, (q_dx @ w).reshape(x.shape), atol=1e-5)
        assert torch.allclose(gw, q_dw @ x.reshape(-1, 64), atol=1e-5)
        assert torch.equal(gb, exact[2])  # the bias gradient is exact
        assert 0 < (gw - exact[1]).norm() < 0.3 * exact[1].norm()


def rotated_rtn_product(a: torch.Tensor, b: torch.Tensor, fmt: str) -> torch.Tensor:
    """RTN(a D H) RTN(b D H)^T, both zero-padded along K to the block 128, with the random signs D drawn as one
    vector of K (the rotation a rotated low-precision GEMM applies to both operands)."""
    pad = -a.shape[-1] % 128
    a, b = F.pad(a, (0, pad)), F.pad(b, (0, pad))
    signs = torch.randint(0, 2, (1, a.shape[-1])).float() * 2 - 1
    return (
        quantize_operand(hadamard_transform(a * signs), fmt) @ quantize_operand(hadamard_transform(b * signs), fmt).t()
    )


@pytest.mark.parametrize("fmt", SR_FORMATS)
@pytest.mark.parametrize("mode", ["sr", "rtn_rht"])
def test_all_operands_is_the_product_of_the_quantized_operands(layer_data, fmt, mode):
    """operands=all: dX = Q(G along out) Q(W along out) and dW = Q(G^T along tokens) Q(X along tokens), W and X rounded
    to nearest (under rtn_rht in the basis the gradient is rotated to); the bias gradient stays exact."""
    x, w, b, gy = layer_data
    exact = linear_grads(x, w, b, gy, "none")
    torch.manual_seed(5)
    gx, gw, gb = linear_grads(x, w, b, gy, mode, fmt, "all")
    g2, x2 = gy.reshape(-1, 48), x.reshape(-1, 64)
    torch.manual_seed(5)
    if mode == "sr":
        dx = quantize_gradient(g2, "sr", fmt) @ quantize_operand(w.t(), fmt).t()
        dw = quantize_gradient(g2.t(), "sr", fmt) @ quantize_operand(x2.t(), fmt).t()
    else:
        dx, dw = rotated_rtn_product(g2, w.t(), fmt), rotated_rtn_product(g2.t(), x2.t(), fmt)
    assert torch.allclose(gx, dx.reshape(x.shape), atol=1e-5) and torch.allclose(gw, dw, atol=1e-5)
    assert torch.equal(gb, exact[2])
    # W and X quantized too: a different gradient from operands=grad's, still close to the exact one
    torch.manual_seed(5)
    gw_grad = linear_grads(x, w, b, gy, mode, fmt, "grad")[1]
    assert not torch.allclose(gw, gw_grad)
    assert (gw - exact[1]).norm() < 0.3 * exact[1].norm()


def test_sr_weight_gradient_variance_is_propagated_theory(layer_data):
    """E||Q(G^T) X - G^T X||^2 = sum_{i,j} sum_t var(G^T_it) X_tj^2 (independent zero-mean rounding errors):
    the backward GEMM's noise is the SR variance of its gradient operand, nothing else."""
    x, _, _, gy = layer_data
    gt, x2 = gy.reshape(-1, 48).t(), x.reshape(-1, 64)
    for fmt in SR_FORMATS:
        torch.manual_seed(6)
        errors = quantize_gradient(gt.expand(400, *gt.shape), "sr", fmt) @ x2 - gt @ x2
        var = sr_variance(F.pad(gt, (0, -48 % GROUP[fmt])), fmt)[0][:, :48]
        theory = (var @ x2.double().square()).sum().item()
        assert errors.square().sum((1, 2)).mean().item() == pytest.approx(theory, rel=0.1), fmt


def test_quantized_layer_uses_the_quantized_backward_only_when_enabled():
    from quest_pl.quant import QuantLinear, full_precision

    torch.manual_seed(4)
    x, gy = torch.randn(8, 32, requires_grad=True), torch.randn(8, 16)
    for kw in ({}, dict(backward_format="int8", backward_operands="all")):
        layer = QuantLinear(32, 16, backward="sr", **kw)
        layer(x).backward(gy)
        quantized = layer.weight.grad.clone()
        layer.weight.grad = None
        model = torch.nn.Sequential(layer)
        with full_precision(model):
            model(x).backward(gy)
        exact = gy.t() @ x.detach()
        assert torch.allclose(layer.weight.grad, exact)
        assert not torch.allclose(quantized, exact) and (quantized - exact).norm() < 0.3 * exact.norm()
    layer = QuantLinear(32, 16)  # backward=none: exactly F.linear's gradient
    layer(x).backward(gy)
    assert torch.equal(layer.weight.grad, (gy.t() @ x.detach()))


def test_config_keys_reach_the_layers_with_defaults_and_one_line_errors():
    from quest_pl.config import ConfigError
    from quest_pl.model import Llama, LlamaConfig
    from quest_pl.quant import QuantConfig, quant_layers, quantize_model

    default = QuantConfig.quest(4, backward="sr")
    assert (default.backward_format, default.backward_operands) == ("nvfp4", "grad")
    cfg = QuantConfig.quest(4, backward="rtn_rht", backward_format="mxfp4", backward_operands="all")
    torch.manual_seed(0)
    model = quantize_model(Llama(LlamaConfig(vocab_size=64, n_layer=1, d_model=128, n_head=1, seq_len=8)), cfg)
    for layer in quant_layers(model).values():
        assert (layer.backward, layer.backward_format, layer.backward_operands) == ("rtn_rht", "mxfp4", "all")
        assert "backward_format=mxfp4, backward_operands=all" in repr(layer)
    for key, value, allowed in (
        ("backward_format", "fp16", "nvfp4, mxfp4, int8, fp8"),
        ("backward_operands", "both", "grad, all"),
        ("backward", "rtn_sr", "none, sr, rtn, rtn_rht"),
    ):
        with pytest.raises(ConfigError, match=f"^quant.{key}='{value}': expected one of {allowed}$"):
            QuantConfig.quest(4, **{key: value})
        with pytest.raises(ConfigError, match=f"^quant.{key}="):  # a typo is an error in a full-precision arm too
            QuantConfig.validate({"grid": None, key: value})
    with pytest.raises(ConfigError, match=r"quant\.matmul=int8: the quantized backward"):  # INT8 has its own backward
        QuantConfig.quest(4, backward="sr", matmul="int8")
    for kw in (dict(backward_format="int8"), dict(backward_operands="all")):  # its own: rtn, fp8, grad only
        with pytest.raises(ConfigError, match=r"quant\.matmul=int8: the quantized backward"):
            QuantConfig.quest(4, backward="rtn", matmul="int8", **{"backward_format": "fp8", **kw})
    with pytest.raises(ConfigError, match=r"quant\.matmul=int8: the fp8 backward .* at most 4 bits"):
        QuantConfig.quest(5, backward="rtn", backward_format="fp8", matmul="int8")
    QuantConfig.quest(4, backward="rtn", backward_format="fp8", matmul="int8")  # the FP8 tensor-core backward


def test_fp8_rtn_is_rowwise_e4m3_round_to_nearest(gradient):
    """fp8: one scale per row, max|row| / 448, the elements rounded to the nearest E4M3 value (torch's cast); the row
    maximum maps to ±448, an all-zero row stays zero; rtn is deterministic and biased (no draws)."""
    q = quantize_gradient(gradient, "rtn", "fp8")
    d = gradient.abs().amax(1, keepdim=True) / 448
    safe = torch.where(d > 0, d, torch.ones_like(d))
    expected = (gradient / safe).to(torch.float8_e4m3fn).float() * d
    assert torch.equal(q, expected) and q[5].eq(0).all()
    torch.testing.assert_close(q.abs().amax(1), gradient.abs().amax(1), rtol=1e-6, atol=0)  # the maximum: ±448 d
    rel = ((q - gradient).abs() / gradient.abs().clamp_min(1e-30))[gradient.abs() > d * 2**-6]  # normal range
    assert rel.max() <= 2**-4  # half an E4M3 ulp (3 mantissa bits) relative
    assert torch.equal(quantize_gradient(gradient, "rtn", "fp8"), q)


def alignment_with_quantized_backward(tmp_path, **backward) -> dict[str, float]:
    """One measured step of the gradient-alignment diagnostic on a tiny Llama whose linears are QuantLinear layers
    with no quantizer (the forward is full precision) and the given quantized backward."""
    from quest_pl.callbacks import GradientAlignment
    from quest_pl.quant import QuantConfig, quant_layers, quantize_model
    from tests.test_callbacks import batches, fake_trainer, module, train_step

    pl_module = module(None)
    quantize_model(pl_module.model, QuantConfig("bwd", weight=None, act=None, hadamard=None, **backward))
    assert len(quant_layers(pl_module.model)) == 8  # 2 blocks x (c_attn, c_proj, w12, c_proj)
    cb, trainer = GradientAlignment(every_n_steps=1), fake_trainer(tmp_path)
    train_step([cb], trainer, pl_module, batches(1))
    return {k: v for k, v in trainer.logger.logged[0].items() if "/cos/" in k or k == "align/model"}


def test_alignment_diagnostic_measures_the_quantized_backward(tmp_path):
    """Same forward, same weights: with the full-precision backward g_Q = g_FP (cosine 1); with stochastic rounding
    every gradient is g_FP plus zero-mean noise of positive variance (its elements are not all on the grid), so every
    cosine is below 1, and INT8 (255 levels) stays closer to 1 than 4-bit NVFP4."""
    exact = alignment_with_quantized_backward(tmp_path, backward="none")
    assert len(exact) == 17 and all(v == pytest.approx(1.0, abs=1e-9) for v in exact.values())
    nvfp4 = alignment_with_quantized_backward(tmp_path, backward="sr")
    int8 = alignment_with_quantized_backward(tmp_path, backward="sr", backward_format="int8", backward_operands="all")
    assert nvfp4.keys() == exact.keys() == int8.keys()
    for tag in exact:
        assert 0.5 < nvfp4[tag] < 1 - 1e-6 and nvfp4[tag] < int8[tag] < 1 - 1e-9, tag
