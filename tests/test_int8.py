"""The INT8 forward (kernels.int8, METHOD.md §5): exact integer products, codes that dequantize to the fused
quantizer's values, the INT8 linear against the fake-quantized bf16 path, and the quant.matmul wiring.

Theory the tests check. Codes c = 2k + 1 are odd with |c| <= 2^b - 1 and values = c·Δ/2 exactly in fp32, so the
integer GEMM's int32 sum Σ c_x c_w is the exact sum of the fake-quantized product divided by s_x s_w; the only
roundings left are the fp32 epilogue (two products) and the output cast. CPU runs use Triton's interpreter.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quest_pl import kernels, quantizers
from quest_pl.config import ConfigError
from quest_pl.kernels import int8
from quest_pl.model import LlamaConfig
from quest_pl.quant import QuantConfig, quantize_model
from tests.conftest import compose

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.*")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ARGS = dict(bits=4, grid="gaussian_mse", hadamard=True, estimator="trust", trust=None, clip_scale=1.0)


def _randn(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype)


def _randint8(shape, seed, low=-128, high=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, shape, generator=g, dtype=torch.int8).to(DEVICE)


AWKWARD = [(1, 1, 1), (5, 7, 3), (17, 24, 9), (33, 130, 20), (16, 8, 8)]  # (M, K, N): none or all of _int_mm's rules


@pytest.mark.parametrize(("m", "k", "n"), AWKWARD, ids=str)
def test_int_matmul_is_exact_on_awkward_shapes(m, k, n):
    a, b = _randint8((m, k), seed=m), _randint8((n, k), seed=n + 100)
    out = int8.int_matmul(a, b)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out.cpu().long(), a.cpu().long() @ b.cpu().long().t())


def test_int_matmul_extremes_and_empty():
    """-128·-128 summed K times: the largest int8 products, no overflow below 2^31."""
    a = torch.full((3, 4096), -128, dtype=torch.int8, device=DEVICE)
    assert (int8.int_matmul(a, a) == 4096 * 128 * 128).all()
    assert int8.int_matmul(a[:0], a).shape == (0, 3)
    assert int8.int_matmul(a[:, :0], a[:, :0]).eq(0).all()


def test_int_matmul_rejects_bad_operands():
    a = _randint8((4, 8), seed=1)
    with pytest.raises(ValueError, match="int8 operands"):
        int8.int_matmul(a.float(), a)
    with pytest.raises(ValueError, match=r"\(M, K\) and b \(N, K\)"):
        int8.int_matmul(a, _randint8((4, 16), seed=2))


@pytest.mark.parametrize(("m", "k", "n"), [(5, 24, 7), (40, 130, 33)], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scaled_int_matmul_epilogue(m, k, n, out_dtype):
    """Triton INT8 GEMM: the exact integer sum times s_a s_b with fp32 roundings, then one cast to out_dtype."""
    a, b = _randint8((m, k), seed=3, low=-127), _randint8((n, k), seed=4, low=-127)
    sa, sb = _randn((m,), 5).abs() + 0.1, _randn((n,), 6).abs() + 0.1
    out = int8.scaled_int_matmul(a, b, sa, sb, out_dtype)
    assert out.dtype == out_dtype
    exact = (a.cpu().double() @ b.cpu().double().t()) * sa.cpu().double()[:, None] * sb.cpu().double()[None, :]
    ulp = torch.finfo(out_dtype).eps
    assert ((out.cpu().double() - exact).abs() <= (ulp + 4 * 2**-24) * exact.abs() + 1e-30).all()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_codes_dequantize_to_the_fused_values(bits, dtype):
    x = _randn((6, 384), seed=bits, dtype=dtype)
    codes, packed, scales = int8.quantize_codes(x, bits=bits)
    values, mask = kernels.fused_quantize(x, bits=bits)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (6,)
    c = codes.long()
    assert (c % 2 != 0).all() and (c.abs() <= 2**bits - 1).all()
    # The codes and values kernels are compiled separately: on a GPU their σ sums may round differently (an fp32 ulp),
    # so equality is to 2 ulps, codes and mask bits flipping only at a decision boundary (tests/test_kernels.py).
    deq = int8.dequantize(codes, scales, dtype)
    tol = 2 * torch.finfo(dtype).eps * values.float().abs()
    assert ((deq.float() - values.float()).abs() > tol).float().mean() <= 1e-3
    assert (kernels.unpack_mask(packed, 384) != mask).float().mean() <= 1e-3
    if DEVICE == "cpu":  # one interpreter, one arithmetic: exactly the same values
        assert torch.equal(deq, values) and torch.equal(kernels.unpack_mask(packed, 384), mask)
    # and the grid of the PyTorch reference: Δ/2 = α_b σ / (2^b - 1)
    sigma = x.float().pow(2).mean(-1).sqrt()
    expected = quantizers.OPTIMAL_GAUSSIAN_SCALES[bits] * sigma / (2**bits - 1)
    torch.testing.assert_close(scales, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dequantize_kernel_rounds_once(dtype):
    """The eager backward's one-pass dequantization: codes · scale in fp32, one round-to-nearest-even cast."""
    from quest_pl.kernels._tl_gemm import scale_rows_cols

    codes, scales = _randint8((37, 300), seed=8, low=-127), _randn((37,), 9).abs() * 3
    expected = (codes.cpu().float() * scales.cpu()[:, None]).to(dtype)
    assert torch.equal(scale_rows_cols(codes, scales, None, dtype).cpu(), expected)


def test_codes_reject_non_integer_grids():
    x = _randn((2, 128), seed=1)
    with pytest.raises(ValueError, match="centered integer grid"):
        int8.quantize_codes(x, bits=4, grid="fp4")
    with pytest.raises(ValueError, match="at most 7 bits"):
        int8.quantize_codes(x, bits=8)


def _fake_quant_operands(x, w, bits=4):
    return kernels.fused_quantize(x, bits=bits)[0].double(), kernels.fused_quantize(w, bits=bits)[0].double()


@pytest.mark.parametrize(("m", "k", "n"), [(3, 128, 5), (19, 384, 40)], ids=str)
def test_int8_linear_is_the_exact_product_to_output_rounding(m, k, n):
    """fp32 operands: the integer path equals the float64 product of the fake-quantized values to fp32 rounding;
    in bf16 it is at least as close to that product as the bf16 fake-quantized path."""
    x, w = _randn((m, k), seed=m), _randn((n, k), seed=n)
    qx, qw = _fake_quant_operands(x, w)
    exact = (qx @ qw.t()).cpu()
    y32 = int8.quest_int8_linear(x, w, ARGS, ARGS).cpu().double()
    assert ((y32 - exact).abs() <= 4 * 2**-24 * exact.abs() + 1e-6 * exact.abs().max()).all()

    y16 = int8.quest_int8_linear(x, w, ARGS, ARGS, out_dtype=torch.bfloat16).cpu().double()
    bf16_path = F.linear(qx.bfloat16().float(), qw.bfloat16().float()).bfloat16().cpu().double()
    err_int, err_bf16 = (y16 - exact).norm(), (bf16_path - exact).norm()
    assert ((y16 - exact).abs() <= 2**-8 * exact.abs() + 1e-6 * exact.abs().max()).all()  # one bf16 rounding
    assert err_int <= err_bf16 * 1.01


def test_int8_linear_gradients_equal_the_fake_quant_path():
    """The backward is the QuEST estimator backward of both operands on the dequantized values."""
    x = _randn((2, 3, 256), seed=1).requires_grad_()
    w = _randn((24, 256), seed=2).requires_grad_()
    grad = _randn((2, 3, 24), seed=3)
    int8.quest_int8_linear(x, w, ARGS, dict(ARGS, bits=3)).backward(grad)
    got = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    F.linear(kernels.quest_quantize(x, bits=4), kernels.quest_quantize(w, bits=3)).backward(grad)
    torch.testing.assert_close(got, (x.grad, w.grad), rtol=1e-5, atol=1e-6)


def _layer(*overrides):
    cfg = QuantConfig.from_cfg(
        compose("quant=quest_w4a4", "quant.kernel=triton", *overrides).quant,
        LlamaConfig(vocab_size=300, n_layer=1, d_model=128, n_head=1, seq_len=16),
    )
    model = nn.Sequential(nn.Linear(256, 40, bias=False, device=DEVICE))
    model.blocks = [model]
    quantize_model(model, cfg)
    return model[0]


def test_quant_linear_matmul_int8_matches_bf16_and_caches_weight_codes():
    torch.manual_seed(0)
    layer_int8, layer_bf16 = _layer("quant.matmul=int8"), _layer("quant.matmul=bf16")
    assert layer_int8.matmul == "int8" and layer_bf16.matmul == "bf16"
    layer_bf16.weight.data.copy_(layer_int8.weight.data)
    x = _randn((4, 256), seed=9)
    ys = [layer(x) for layer in (layer_int8, layer_bf16)]
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-5)

    with torch.no_grad():  # inference: the weight's codes computed once per weight version
        y_frozen = layer_int8(x)
        cached = layer_int8._frozen_weight_codes
        assert cached is not None and torch.equal(y_frozen, ys[0].detach())
        layer_int8(x)
        assert layer_int8._frozen_weight_codes is cached
        layer_int8.weight.mul_(2.0)
        y_scaled = layer_int8(x)
        assert layer_int8._frozen_weight_codes is not cached
    torch.testing.assert_close(y_scaled, 2 * ys[0].detach(), rtol=1e-5, atol=1e-5)  # Q(2W) = 2 Q(W) on this grid


def test_quant_linear_auto_is_bf16_on_cpu():
    assert _layer().matmul == ("int8" if torch.cuda.is_available() else "bf16")


def test_group_scales_resolve_to_the_bf16_matmul(monkeypatch):
    """The INT8 epilogue scales whole rows of each operand, so group-scaled operands (served by the fused kernel)
    take the bf16 matmul even where auto would pick int8; asking for int8 is a config error."""
    monkeypatch.setattr(int8, "cuda_int8_available", lambda device=None: True)  # auto as on an sm_80+ GPU
    per_row, grouped = _layer("quant.matmul=auto"), _layer("quant.matmul=auto", "quant.group_size=32")
    assert per_row.matmul == "int8" and grouped.matmul == "bf16"
    assert grouped.kernel_args["act"]["group_size"] == grouped.kernel_args["weight"]["group_size"] == 32
    assert "one scale per row" in int8.int8_unsupported("gaussian_mse", 4, "trust", group_size=32)
    with pytest.raises(ValueError, match="group_size=32"):
        int8.quantize_codes(_randn((2, 128), seed=1), group_size=32)
    with pytest.raises(ValueError, match="group_size=32"):
        int8.quest_int8_linear(_randn((2, 128), seed=1), _randn((8, 128), seed=2), dict(ARGS, group_size=32), ARGS)
    x = _randn((3, 256), seed=5)
    torch.testing.assert_close(grouped(x), F.linear(*(_group_operand(t) for t in (x, grouped.weight))))


def _group_operand(t):
    """The grouped fake-quantized operand of the PyTorch path: g = 32 scales of H·t, default trust."""
    grid = quantizers.build("gaussian_mse", bits=4, group_size=32)
    return grid(quantizers.hadamard_transform(t.detach().float()))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["quant.matmul=fp8"], "quant.matmul='fp8': expected one of auto, int8, bf16"),
        (["quant.group_size=32", "quant.matmul=int8"], "one scale per row of each operand"),
        (["quant=fp4", "quant.matmul=int8"], "centered integer grid"),
        (["quant.bits=8", "quant.matmul=int8"], "at most 7 bits"),
        (["quant=quest_w4a16", "quant.matmul=int8"], "both operands"),
        (["quant.kernel=torch", "quant.matmul=int8"], "quant.kernel=torch"),
        (["quant=lsq_w4a4", "quant.matmul=int8"], "estimator"),
    ],
)
def test_matmul_config_errors(overrides, needle):
    base = [] if overrides[0].startswith("quant=") else ["quant=quest_w4a4"]
    with pytest.raises(ConfigError, match=r"quant\.matmul") as err:
        QuantConfig.from_cfg(compose(*base, *overrides).quant, None)
    assert needle in str(err.value)


@pytest.mark.gpu
@cuda
def test_cuda_int_mm_path_and_compile_fullgraph():
    """torch._int_mm behind int_matmul, and the custom op traced without a graph break under bf16 autocast: compiled
    output and gradients equal the eager ones up to bf16 rounding. Not bit for bit: while torch.compile traces, the
    forward GEMM is the first eligible backend unless this shape was timed before, and the eager call times the shape
    and may pick another (equal up to one bf16 rounding of y); the backward GEMMs run in bf16 (autocast's gradient
    dtype), so a one-ulp change of y moves them by bf16 ulps, many fp32 ulps of the fp32 x.grad and w.grad."""
    a, b = _randint8((1000, 2048), seed=1, low=-127), _randint8((130, 2048), seed=2, low=-127)
    assert torch.equal(int8.int_matmul(a, b).cpu().long(), a.cpu().long() @ b.cpu().long().t())

    def layer(x, w):
        return int8.quest_int8_linear(x, w, ARGS, ARGS)

    x = _randn((4, 64, 512), seed=3).requires_grad_()
    w = _randn((384, 512), seed=4).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = torch.compile(layer, fullgraph=True)(x, w)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    grads = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_eager = layer(x, w)
    y_eager.float().pow(2).sum().backward()
    torch.testing.assert_close(y, y_eager)
    for got, ref in zip(grads, (x.grad, w.grad)):  # a dropped mask or rotation would be off by O(1), not 2^-7
        assert torch.isfinite(got).all() and (got - ref).norm() <= 2**-7 * ref.norm()
