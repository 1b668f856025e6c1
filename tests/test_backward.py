"""Quantized backward (`quant.backward`): NVFP4 stochastic rounding is unbiased with the variance its definition gives;
random-Hadamard round-to-nearest has lower error and a small, measured bias; the layer's gradients use them."""

import pytest
import torch
import torch.nn.functional as F

from quest_pl.estimators.backward import QuantizedBackwardLinear, quantize_gradient, quantized_backward_linear
from quest_pl.quantizers.e2m1 import E2M1_MAGNITUDES, e4m3_up

DRAWS = 1000


@pytest.fixture(scope="module")
def gradient():
    torch.manual_seed(0)
    g = torch.randn(32, 256) * torch.exp(torch.randn(32, 1))
    g[:, 3] *= 20  # an outlier column
    g[5] = 0.0  # an all-zero row
    return g


def draws(g: torch.Tensor, mode: str) -> torch.Tensor:
    """DRAWS independent quantizations of g (a stack of copies: each is its own tensor)."""
    torch.manual_seed(1)
    return quantize_gradient(g.expand(DRAWS, *g.shape), mode)


def bias2_and_mse(qs: torch.Tensor, g: torch.Tensor) -> tuple[float, float]:
    """||mean Q - g||^2 / ||g||^2 and E||Q - g||^2 / ||g||^2. For an unbiased Q, E[bias2] = mse / DRAWS."""
    norm = g.square().sum()
    return float((qs.mean(0) - g).square().sum() / norm), float((qs - g).square().sum((1, 2)).mean() / norm)


def sr_variance_theory(g: torch.Tensor) -> float:
    """sum (hi - |y|)(|y| - lo) d^2 / ||g||^2: the variance of stochastic rounding between E2M1 neighbours lo, hi of
    y = g / d, with d = the E4M3 group scale rounded up times the tensor scale (estimators.backward)."""
    groups = g.unflatten(-1, (-1, 16))
    amax = groups.abs().amax(-1, keepdim=True)
    tensor = amax.max() / (6 * 448)
    d = e4m3_up(amax / 6 / tensor) * tensor
    y = (groups / torch.where(d > 0, d, 1)).abs().double()
    levels = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float64)
    i = (torch.searchsorted(levels, y, right=True) - 1).clamp(0, 6)
    var = (levels[i + 1] - y).clamp_min(0) * (y - levels[i]) * d.double().square()
    return float(var.sum() / g.double().square().sum())


def test_sr_is_unbiased_with_its_theoretical_variance(gradient):
    qs = draws(gradient, "sr")
    bias2, mse = bias2_and_mse(qs, gradient)
    assert bias2 <= 2 * mse / DRAWS  # E[bias2] = mse / DRAWS for an unbiased estimator (its noise floor)
    assert mse == pytest.approx(sr_variance_theory(gradient), rel=0.05)
    assert qs[:, 5].eq(0).all() and torch.isfinite(qs).all()


def test_rtn_rht_has_lower_error_and_a_small_measured_bias(gradient):
    mse_sr = bias2_and_mse(draws(gradient, "sr"), gradient)[1]
    bias2, mse = bias2_and_mse(draws(gradient, "rtn_rht"), gradient)
    assert mse < 0.6 * mse_sr  # RTN after a random rotation: lower error than SR
    assert bias2 > 3 * mse / DRAWS  # but not unbiased: the bias stands above the noise floor ...
    assert bias2 < 0.05 * mse  # ... and is small next to one draw's error


def test_unpadded_shapes_and_none():
    torch.manual_seed(2)
    g = torch.randn(37, 41)
    for mode in ("sr", "rtn_rht"):
        q = quantize_gradient(g, mode)
        assert q.shape == g.shape and torch.isfinite(q).all()
    assert torch.equal(quantize_gradient(g, "none"), g)
    with pytest.raises(ValueError, match="backward mode"):
        quantize_gradient(g, "fp8")


def linear_grads(mode: str, x, w, b, gy):
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    quantized_backward_linear(x, w, b, mode).backward(gy)
    return x.grad, w.grad, b.grad


def test_layer_backward_is_both_gemms_with_the_quantized_gradient():
    torch.manual_seed(3)
    x, w, b, gy = torch.randn(2, 24, 64), torch.randn(48, 64) / 8, torch.randn(48), torch.randn(2, 24, 48)
    exact = linear_grads("none", x, w, b, gy)
    assert torch.allclose(QuantizedBackwardLinear.apply(x, w, b, "sr"), F.linear(x, w, b))  # forward untouched
    for mode in ("sr", "rtn_rht"):
        torch.manual_seed(4)
        gx, gw, gb = linear_grads(mode, x, w, b, gy)
        torch.manual_seed(4)
        g2 = gy.reshape(-1, 48)
        q_dx = quantize_gradient(g2, mode)  # groups along out (dX = G W), drawn first
        q_dw = quantize_gradient(g2.t(), mode)  # groups along tokens (dW = G^T X)
        assert torch.allclose(gx, (q_dx @ w).reshape(x.shape), atol=1e-5)
        assert torch.allclose(gw, q_dw @ x.reshape(-1, 64), atol=1e-5)
        assert torch.equal(gb, exact[2])  # the bias gradient is exact
        assert 0 < (gw - exact[1]).norm() < 0.3 * exact[1].norm()


def test_quantized_layer_uses_the_quantized_backward_only_when_enabled():
    from quest_pl.quant import QuantLinear, full_precision

    torch.manual_seed(4)
    layer = QuantLinear(32, 16, backward="sr")
    x, gy = torch.randn(8, 32, requires_grad=True), torch.randn(8, 16)
    layer(x).backward(gy)
    quantized = layer.weight.grad.clone()
    layer.weight.grad = None
    model = torch.nn.Sequential(layer)
    with full_precision(model):
        model(x).backward(gy)
    exact = gy.t() @ x.detach()
    assert torch.allclose(layer.weight.grad, exact)
    assert not torch.allclose(quantized, exact) and (quantized - exact).norm() < 0.3 * exact.norm()
