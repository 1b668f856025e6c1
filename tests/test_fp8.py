"""The low-precision GEMM paths on integer codes (`kernels.gemm`), the FP8 backward (`kernels.fp8`) and the weight's
codes cached per version (`kernels.weight_cache`), against their definitions (METHOD.md §5).

On CPU the Triton kernels run under the interpreter and the FP8 GEMM is emulated exactly (decoded E4M3 values, fp32
sums); the `gpu` tests run torch._scaled_mm / torch._int_mm on CUDA against the same exact integer products."""

import pytest
import torch
import torch.nn.functional as F

from quest_pl import kernels
from quest_pl.kernels import gemm, int8, weight_cache
from quest_pl.kernels.fp8 import fp8_backward_gemms, rowwise_e4m3

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.*")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ARGS = dict(bits=4, grid="gaussian_mse", hadamard=True, estimator="trust")


def _randn(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype)


def _odd_codes(shape, seed, bits=4):
    g = torch.Generator().manual_seed(seed)
    half = 2 ** (bits - 1)
    return (torch.randint(-half, half, shape, generator=g, dtype=torch.int8) * 2 + 1).to(DEVICE)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_fp8_codes_are_the_e4m3_bytes_of_the_int8_codes(bits):
    """The kernel writes E4M3 bytes by integer arithmetic: they decode to the same odd integers as the int8 codes
    (torch's own conversion), with the same mask and scales; more than 4 bits is refused (17 is not E4M3)."""
    x = _randn((9, 384), seed=bits)
    c8, m8, s8 = int8.quantize_codes(x, **dict(ARGS, bits=bits))
    cf, mf, sf = int8.quantize_codes(x, **dict(ARGS, bits=bits), codes="fp8")
    assert cf.dtype == torch.float8_e4m3fn
    assert torch.equal(cf.view(torch.uint8), c8.float().to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(mf, m8) and torch.equal(sf, s8)
    with pytest.raises(ValueError, match="at most 4 bits"):
        int8.quantize_codes(x, **dict(ARGS, bits=5), codes="fp8")


@pytest.mark.parametrize("backend", gemm.BACKENDS)
def test_every_backend_is_the_exact_integer_product_then_the_scales(backend):
    """(C_a C_b^T) s_a s_b^T: exact integer sums, then the fp32 scales and one rounding (bf16 here)."""
    m, k, n = 37, 256, 48
    ca, cb = _odd_codes((m, k), 1), _odd_codes((n, k), 2)
    sa, sb = _randn((m,), 3).abs(), _randn((n,), 4).abs()
    exact = (ca.cpu().long() @ cb.cpu().long().t()).double() * sa.cpu().double()[:, None] * sb.cpu().double()[None]
    fmt = gemm.CODE_FORMAT[backend]
    got = gemm.scaled_matmul(gemm.to_format(ca, fmt), gemm.to_format(cb, fmt), sa, sb, torch.bfloat16, backend)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert ((got.cpu().double() - exact).abs() <= 2**-8 * exact.abs()).all()  # one bf16 rounding


def test_backend_choice_pins_and_refuses(monkeypatch):
    """On CPU the exact FP8 emulation comes first; a pinned backend is used where eligible and refused where not; with
    neither CUDA nor Triton's interpreter, grids of more than 4 bits have no backend. The same on a CUDA machine (where
    the tests run without the interpreter) as on CPU."""
    device = torch.device(DEVICE)
    assert gemm.choose_backend(8, 16, 128, 4, torch.device("cpu"), torch.bfloat16) == "fp8"
    assert gemm.choose_backend(8, 16, 128, 5, device, torch.bfloat16, "triton") == "triton"
    with pytest.raises(ValueError, match="cannot serve 5-bit codes"):
        gemm.choose_backend(8, 16, 128, 5, device, torch.bfloat16, "fp8")
    monkeypatch.setattr(gemm, "interpreting", lambda: False)
    assert gemm.eligible_backends(8, 16, 128, 4, torch.device("cpu"), torch.bfloat16) == ["fp8"]
    with pytest.raises(ValueError, match="no low-precision GEMM serves 5-bit codes on cpu"):
        gemm.choose_backend(8, 16, 128, 5, torch.device("cpu"), torch.bfloat16)


def test_rowwise_e4m3_and_the_fp8_backward_gemms_are_their_definitions():
    """dX_h = d1 ⊙ (R(G ⊙ s_w / d1) C_w), dW_h = d2 ⊙ (R((G ⊙ s_x)^T / d2) C_x), R = nearest E4M3, d = max / 448."""
    m, k, n = 40, 128, 24
    g = _randn((m, n), 5)
    g[3] = 0.0
    cx, cw = _odd_codes((m, k), 6), _odd_codes((n, k), 7)
    sx, sw = _randn((m,), 8).abs(), _randn((n,), 9).abs()
    q, d = rowwise_e4m3(g)
    assert q.dtype == torch.float8_e4m3fn and d[3] == 1 and q[3].float().eq(0).all()
    assert torch.equal(q.float().abs().amax(1)[d != 1], torch.full_like(d[d != 1], 448.0))
    gx, gw = fp8_backward_gemms(g, cx, sx, cw, sw)

    def rounded(t):  # fp64 reference of R(t / d) d per row
        t = t.double().cpu()
        d = t.abs().amax(1, keepdim=True) / 448
        d = torch.where(d > 0, d, torch.ones_like(d))
        return (t / d).float().to(torch.float8_e4m3fn).double() * d

    ref_x = rounded(g * sw[None, :]) @ cw.cpu().double()
    ref_w = rounded((g * sx[:, None]).t()) @ cx.cpu().double()
    for got, ref in ((gx, ref_x), (gw, ref_w)):
        assert ((got.cpu().double() - ref).abs() <= 1e-5 * ref.abs().max()).all()
    # and close to the exact backward products: one E4M3 rounding of the gradient (2^-4 relative at most)
    exact_x = g.double().cpu() @ (cw.double() * sw.double()[:, None]).cpu()
    assert (gx.cpu().double() - exact_x).norm() < 2**-4 * exact_x.norm()


def test_fp8_backward_linear_gradients():
    """quest_int8_linear(backward="fp8"): the masked transposed Hadamard of the FP8 GEMMs; within an E4M3 rounding of
    the bf16-backward gradients; the forward is unchanged. bf16 output: torch._scaled_mm's row-wise scaling on CUDA
    writes bf16 only (an fp32 output pinned to the fp8 backend is refused: test_fp8_backend_refuses_fp32_output)."""
    x = _randn((2, 24, 256), 10).requires_grad_()
    w = _randn((32, 256), 11).requires_grad_()
    grad = _randn((2, 24, 32), 12, torch.bfloat16)
    grads, outs = {}, {}
    for backward in ("bf16", "fp8"):
        outs[backward] = int8.quest_int8_linear(
            x, w, ARGS, ARGS, out_dtype=torch.bfloat16, backward=backward, backend="fp8"
        )
        grads[backward] = torch.autograd.grad(outs[backward], (x, w), grad)
    assert torch.equal(outs["bf16"], outs["fp8"])
    for got, ref in zip(grads["fp8"], grads["bf16"]):
        assert not torch.equal(got, ref) and (got - ref).norm() < 2**-4 * ref.norm()
    with pytest.raises(ValueError, match="at most 4 bits"):
        int8.quest_int8_linear(x, w, ARGS, dict(ARGS, bits=5), backward="fp8")


@pytest.mark.gpu
@cuda
def test_fp8_backend_refuses_fp32_output():
    """torch._scaled_mm with row-wise scales writes bf16 only: pinning the fp8 backend for an fp32 output is one clear
    ValueError naming what is eligible; unpinned, an fp32 output takes an INT8 backend."""
    x, w = _randn((4, 256), 14), _randn((32, 256), 15)
    with pytest.raises(ValueError, match=r"GEMM backend 'fp8' cannot serve 4-bit codes.*float32.*eligible: triton"):
        int8.quest_int8_linear(x, w, ARGS, ARGS, backend="fp8")
    assert int8.quest_int8_linear(x, w, ARGS, ARGS).dtype == torch.float32


def test_weight_codes_are_computed_once_per_weight_version(monkeypatch):
    """Micro-batches of one optimizer step reuse the weight's codes (the quantizer runs for the activation only); an
    optimizer step or any in-place write bumps the weight's version and recomputes them; results equal uncached."""
    calls = []
    codes_impl = int8._codes_impl
    monkeypatch.setattr(int8, "_codes_impl", lambda t, *a: calls.append(tuple(t.shape)) or codes_impl(t, *a))
    weight_cache.clear()
    w = torch.nn.Parameter(_randn((32, 256), 13))
    opt = torch.optim.SGD([w], lr=0.1)
    xs = [_randn((16, 256), 20 + i) for i in range(3)]
    for x in xs:  # gradient accumulation: three micro-batches, one step
        int8.quest_int8_linear(x, w, ARGS, ARGS).sum().backward()
    assert calls.count((32, 256)) == 1 and calls.count((16, 256)) == 3
    opt.step()
    y = int8.quest_int8_linear(xs[0], w, ARGS, ARGS)
    assert calls.count((32, 256)) == 2
    fresh = F.linear(kernels.quest_quantize(xs[0], bits=4), kernels.quest_quantize(w.detach(), bits=4))
    torch.testing.assert_close(y, fresh, rtol=1e-5, atol=1e-5)  # the stepped weight's codes, not the stale ones
    with torch.no_grad():
        w.mul_(2.0)
    int8.quest_int8_linear(xs[0], w, ARGS, ARGS)
    assert calls.count((32, 256)) == 3
    int8.quest_int8_linear(xs[0], w, ARGS, dict(ARGS, bits=3))  # other quantizer arguments: another entry
    assert calls.count((32, 256)) == 4
    int8.quest_int8_linear(xs[0], w.detach(), ARGS, ARGS)  # no gradient wanted: not cached
    assert calls.count((32, 256)) == 5
    weight_cache.clear()


@pytest.mark.gpu
@cuda
def test_cuda_backends_exact_and_fp8_backward_on_tensor_cores():
    """On the GPU every eligible backend (torch._scaled_mm FP8 with row-wise scales, torch._int_mm + epilogue, the
    Triton INT8 GEMM) gives the exact integer product to one bf16 rounding at a training shape, and the FP8 backward
    GEMMs match their emulation."""
    m, k, n = 4096, 2048, 1792
    ca, cb = _odd_codes((m, k), 1), _odd_codes((n, k), 2)
    sa, sb = _randn((m,), 3).abs(), _randn((n,), 4).abs()
    exact = (ca.double() @ cb.double().t()) * sa.double()[:, None] * sb.double()[None]
    assert gemm.eligible_backends(m, n, k, 4, ca.device, torch.bfloat16)[0] == "fp8"
    for backend in gemm.BACKENDS:
        fmt = gemm.CODE_FORMAT[backend]
        got = gemm.scaled_matmul(gemm.to_format(ca, fmt), gemm.to_format(cb, fmt), sa, sb, torch.bfloat16, backend)
        assert ((got.double() - exact).abs() <= 2**-8 * exact.abs() + 1e-30).all(), backend
    g = _randn((m, n), 5, torch.bfloat16)
    gx, gw = fp8_backward_gemms(g, ca, sa, cb, sb)
    emulated = [t.cpu() for t in fp8_backward_gemms(g.cpu(), ca.cpu(), sa.cpu(), cb.cpu(), sb.cpu())]
    for got, ref in zip((gx, gw), emulated):
        assert got.dtype == torch.bfloat16
        assert (got.cpu().float() - ref.float()).norm() <= 2**-7 * ref.float().norm()
