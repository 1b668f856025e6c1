"""Fused Triton quantizer kernels against the PyTorch reference (`quantizers`, `estimators`).

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); on a CUDA machine the same
tests run the compiled kernels on the GPU, and the CUDA-only tests (large shapes, torch.compile) skip without one.
Reference: x_h = hadamard_transform(x in fp32), the grid's `quantize` and the estimator's `pass_mask`, gradients by
autograd through the detach carrier x_h⊙m + sg(q - x_h⊙m) (METHOD.md §0, §1.8).

Tolerances. The kernel takes σ from x (= RMS(x_h), H orthonormal) and sums in another order, and computes x/Δ as
x·(1/Δ): fp32 values move by a few ulps, and a code can change only where x_h/Δ lies within ~1e-7 of a decision
boundary. So values must match to 4 fp32 ulps (1 ulp of bf16/fp16 after rounding), and at most 0.1% of elements may
differ by more (a boundary flip; none occur with these seeds, the allowance only keeps the test seed-independent).
"""

import pytest
import torch

from quest_pl import estimators, kernels, quantizers

triton = pytest.importorskip("triton")
# Triton 3.6's interpreter converts loop bounds with a NumPy call that NumPy 2.x deprecates.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.*")
from quest_pl.kernels import _tl_backward, _tl_quantize  # noqa: E402  (after the importorskip: needs Triton)

CONFIGS = [
    ("gaussian_mse", 1, "trust", {}),
    ("gaussian_mse", 2, "trust", {}),
    ("gaussian_mse", 4, "trust", {}),
    ("gaussian_mse", 8, "trust", {}),
    ("gaussian_mse", 1, "clip", {"clip_scale": 1.3}),
    ("gaussian_mse", 3, "trust", {"trust": 0.2}),
    ("fp4", 4, "trust", {}),
    ("fp4", 4, "clip", {}),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 128), (3, 1792), (7, 640)]
MAX_FLIP_FRACTION = 1e-3
ULPS = {torch.float32: 4.0, torch.bfloat16: 1.0, torch.float16: 1.0}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _randn(shape, dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def _estimator(grid, bits, estimator, kwargs):
    return estimators.build(estimator, quantizer=quantizers.build(grid, bits=bits), **kwargs)


def _reference(x, grid, bits, estimator, kwargs, hadamard=True):
    """(values in x's dtype, bool mask) of the PyTorch path on the fp32 rotation."""
    x32 = x.float()
    xh = quantizers.hadamard_transform(x32) if hadamard else x32
    est = _estimator(grid, bits, estimator, kwargs)
    out = est.quantizer.quantize(xh)
    return out.values.to(x.dtype), est.pass_mask(xh, out)


def _kernel_args(grid, bits, estimator, kwargs, hadamard=True):
    return dict(
        grid=grid,
        n_levels=2**bits,
        scale_coef=quantizers.OPTIMAL_GAUSSIAN_SCALES.get(bits, 0.0),
        hadamard=hadamard,
        estimator=estimator,
        trust=kwargs.get("trust", quantizers.build(grid, bits=bits).default_trust),
        clip_scale=kwargs.get("clip_scale", 1.0),
    )


def _poisoned_forward(x2d, **kwargs):
    """The forward kernel into outputs filled with NaN / 0xAA, so an unwritten element shows."""
    rows, cols = x2d.shape
    values = torch.full((rows, cols), float("nan"), dtype=x2d.dtype, device=x2d.device)
    packed = torch.full((rows, (cols + 7) // 8), 0xAA, dtype=torch.uint8, device=x2d.device)
    _tl_quantize.quantize_forward(x2d, out=(values, packed), **kwargs)
    return values, kernels.unpack_mask(packed, cols), packed


def _assert_close_values(values, ref):
    assert not values.isnan().any(), "unwritten (NaN-poisoned) elements"
    tol = ULPS[ref.dtype] * torch.finfo(ref.dtype).eps * ref.float().abs()
    off = (values.float() - ref.float()).abs() > tol
    assert off.float().mean().item() <= MAX_FLIP_FRACTION, f"{off.sum().item()} of {off.numel()} values differ"


def _assert_masks(mask, ref):
    flips = mask != ref
    assert flips.float().mean().item() <= MAX_FLIP_FRACTION, f"{flips.sum().item()} of {flips.numel()} mask bits differ"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("grid", "bits", "estimator", "kwargs"), CONFIGS, ids=lambda c: str(c))
def test_forward_matches_reference(grid, bits, estimator, kwargs, dtype, shape):
    x = _randn(shape, dtype, seed=shape[0] * 1000 + bits)
    values, mask, packed = _poisoned_forward(x, **_kernel_args(grid, bits, estimator, kwargs))
    ref_values, ref_mask = _reference(x, grid, bits, estimator, kwargs)
    _assert_close_values(values, ref_values)
    _assert_masks(mask, ref_mask)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], shape[1] // 8)


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("shape", [(5, 128), (3, 640)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_both_forward_kernels(resident, shape, persistent):
    """The resident kernel (whole rows in registers, padded to a power of two of blocks) and the two-pass kernel;
    `persistent`: two programs looping over tiles of 16 tile rows (several tiles each, the last one partial)."""
    x = _randn((shape[0] * 7, shape[1]), torch.bfloat16, seed=7) if persistent else _randn(shape, torch.bfloat16, 7)
    args = _kernel_args("gaussian_mse", 4, "trust", {})
    launch = dict(launch=(16, 4, 1, 1), programs=2) if persistent else {}
    values, mask, _ = _poisoned_forward(x, resident=resident, **launch, **args)
    ref_values, ref_mask = _reference(x, "gaussian_mse", 4, "trust", {})
    _assert_close_values(values, ref_values)
    _assert_masks(mask, ref_mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_and_batched_input(dtype):
    base = _randn((640, 6), dtype, seed=3)
    x = base.t()  # (6, 640), column stride 6
    assert not x.is_contiguous()
    values, mask = kernels.fused_quantize(x, bits=4)
    ref_values, ref_mask = _reference(x, "gaussian_mse", 4, "trust", {})
    _assert_close_values(values, ref_values)
    _assert_masks(mask, ref_mask)

    x3 = _randn((2, 5, 384), dtype, seed=4)[:, ::2]  # (2, 3, 384), a strided slice of a batch
    values, mask = kernels.fused_quantize(x3, bits=2)
    ref_values, ref_mask = _reference(x3, "gaussian_mse", 2, "trust", {})
    assert values.shape == mask.shape == x3.shape and mask.dtype == torch.bool
    _assert_close_values(values, ref_values)
    _assert_masks(mask, ref_mask)


@pytest.mark.parametrize("width", [100, 256])
def test_without_hadamard(width):
    """hadamard=False quantizes x itself; any width (a partial last mask byte at 100)."""
    x = _randn((3, width), torch.float32, seed=5) * 3.0
    values, mask, _ = _poisoned_forward(x, **_kernel_args("gaussian_mse", 3, "trust", {}, hadamard=False))
    ref_values, ref_mask = _reference(x, "gaussian_mse", 3, "trust", {}, hadamard=False)
    _assert_close_values(values, ref_values)
    _assert_masks(mask, ref_mask)


def test_all_zero_row():
    """A zero row is quantized as the reference does (σ̂ = 1e-30) and keeps its gradient."""
    x = _randn((3, 256), torch.float32, seed=6)
    x[1] = 0.0
    for grid, bits in [("gaussian_mse", 4), ("fp4", 4)]:
        values, mask = kernels.fused_quantize(x, bits=bits, grid=grid)
        ref_values, ref_mask = _reference(x, grid, bits, "trust", {})
        assert torch.equal(values[1], ref_values[1]) and mask[1].all() and ref_mask[1].all()


GROUP_CONFIGS = [
    ("gaussian_mse", 1, "clip", {"clip_scale": 1.3}, torch.float32),
    ("gaussian_mse", 2, "trust", {}, torch.bfloat16),
    ("gaussian_mse", 4, "trust", {}, torch.float16),
    ("gaussian_mse", 4, "clip", {}, torch.float32),
    ("fp4", 4, "trust", {"trust": 0.3}, torch.bfloat16),
]
# (rows, cols): resident kernel (power-of-two blocks) and two-pass kernel (3 or 5 blocks), awkward row counts.
GROUP_SHAPES = [(1, 128), (7, 256), (3, 384), (17, 640)]


def _group_reference(x, grid, bits, estimator, kwargs, group_size, hadamard=True):
    """(values in x's dtype, bool mask) of `quantizers.build(grid, bits, group_size=g)` wrapped by the estimator, on
    the fp32 rotation: σ, the scale and the trust threshold per group of g elements of x_h."""
    x32 = x.float()
    xh = quantizers.hadamard_transform(x32) if hadamard else x32
    est = estimators.build(estimator, quantizer=quantizers.build(grid, bits=bits, group_size=group_size), **kwargs)
    out = est.quantizer.quantize(xh)
    mask = est.pass_mask(est.quantizer.rows(xh), out)
    return out.values.reshape(x.shape).to(x.dtype), mask.reshape(x.shape)


@pytest.mark.parametrize("group_size", kernels.GROUP_SIZES)
@pytest.mark.parametrize(("grid", "bits", "estimator", "kwargs", "dtype"), GROUP_CONFIGS, ids=str)
def test_group_scales_match_reference(grid, bits, estimator, kwargs, dtype, group_size):
    """One scale per group of g elements of x_h (inside the 128-block): the grouped grid's values to rounding, the
    same mask bit for bit, every element of the poisoned outputs written, in both forward kernels."""
    for rows, cols in GROUP_SHAPES:
        x = _randn((rows, cols), dtype, seed=rows * 100 + group_size + bits) * 2.0
        args = _kernel_args(grid, bits, estimator, kwargs)
        values, mask, _ = _poisoned_forward(x, group_size=group_size, **args)
        ref_values, ref_mask = _group_reference(x, grid, bits, estimator, kwargs, group_size)
        assert not values.isnan().any(), "unwritten (NaN-poisoned) elements"
        tol = ULPS[dtype] * torch.finfo(dtype).eps * ref_values.float().abs()
        assert ((values.float() - ref_values.float()).abs() <= tol).all(), (rows, cols)
        assert torch.equal(mask, ref_mask), (rows, cols)
        if cols > group_size:  # the group scales are not the row's: some element differs from the per-row grid's
            assert not torch.equal(values, _reference(x, grid, bits, estimator, kwargs)[0])


@pytest.mark.parametrize("group_size", [16, 128])
def test_group_scales_without_hadamard_and_zero_groups(group_size):
    """hadamard=False on a width that is not a multiple of 128 (a partial last tile), and all-zero groups: quantized
    as the reference does (σ̂ = 1e-30) and, under trust, keeping their gradient."""
    x = _randn((5, 3 * 128 + 2 * group_size), torch.float32, seed=17 + group_size)
    x[1, group_size : 2 * group_size] = 0.0  # one zero group (not rotated)
    x[3] = 0.0
    args = _kernel_args("gaussian_mse", 4, "trust", {}, hadamard=False)
    values, mask, _ = _poisoned_forward(x, group_size=group_size, **args)
    ref_values, ref_mask = _group_reference(x, "gaussian_mse", 4, "trust", {}, group_size, hadamard=False)
    _assert_close_values(values, ref_values)
    assert torch.equal(mask, ref_mask)
    assert mask[1, group_size : 2 * group_size].all() and mask[3].all() and not mask.all()

    x = _randn((3, 256), torch.float32, seed=18)
    x[0, 128:] = 0.0  # a zero Hadamard block rotates to zero groups
    values, mask = kernels.fused_quantize(x, bits=2, group_size=group_size)
    ref_values, ref_mask = _group_reference(x, "gaussian_mse", 2, "trust", {}, group_size)
    assert torch.equal(values[0, 128:], ref_values[0, 128:]) and mask[0, 128:].all()
    assert torch.equal(mask, ref_mask)


@pytest.mark.parametrize(("grid", "bits", "estimator", "kwargs"), [CONFIGS[1], CONFIGS[4]], ids=str)
def test_group_gradient_matches_detach_carrier(grid, bits, estimator, kwargs):
    """The backward applies the grouped forward's mask: grad_x = (grad ⊙ m_group)·H, through the eager path and
    through the registered custom op's autograd (its extra group_size argument gets no gradient)."""
    x = _randn((640, 5), torch.float32, seed=19).t()
    grad = _randn((5, 640), torch.float32, seed=20)
    _, ref_mask = _group_reference(x, grid, bits, estimator, kwargs, 32)
    ref = quantizers.hadamard_transform(grad * ref_mask)
    x_kernel = x.detach().clone().requires_grad_()
    kernels.quest_quantize(x_kernel, bits=bits, grid=grid, estimator=estimator, group_size=32, **kwargs).backward(grad)
    torch.testing.assert_close(x_kernel.grad, ref, rtol=1e-5, atol=1e-6)

    trust = kwargs.get("trust", kernels.DEFAULT_TRUST[grid, bits])
    x_op = x.detach().clone().requires_grad_()
    op_args = (grid, bits, True, estimator, trust, kwargs.get("clip_scale", 1.0))
    values, packed = torch.ops.quest_kernels.quantize(x_op, *op_args, 32)
    values.backward(grad)
    torch.testing.assert_close(x_op.grad, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(kernels.unpack_mask(packed, 640), ref_mask)
    per_row = torch.ops.quest_kernels.quantize(x.detach(), *op_args)  # group_size defaults to per row
    assert torch.equal(per_row[0], kernels.fused_quantize(x, bits=bits, grid=grid, estimator=estimator, **kwargs)[0])


def test_group_fake_implementation():
    """The custom op's fake (shape) implementation accepts the group_size argument and gives the real shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 256)
        values, packed = torch.ops.quest_kernels.quantize(x, "gaussian_mse", 4, True, "trust", 0.1, 1.0, 64)
        assert values.shape == x.shape and values.dtype == x.dtype
        assert packed.shape == (2, 3, 32) and packed.dtype == torch.uint8


def test_mask_bit_layout():
    """Column j of the mask is bit j % 8 of byte j // 8."""
    packed = torch.tensor([[0b00000101, 0b10000000]], dtype=torch.uint8)
    expected = torch.zeros(1, 16, dtype=torch.bool)
    expected[0, [0, 2, 15]] = True
    assert torch.equal(kernels.unpack_mask(packed, 16), expected)
    assert torch.equal(kernels.unpack_mask(packed, 10), expected[:, :10])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("grid", "bits", "estimator", "kwargs"), [CONFIGS[2], CONFIGS[4], CONFIGS[6]], ids=str)
def test_gradient_matches_detach_carrier(grid, bits, estimator, kwargs, dtype):
    x = _randn((640, 5), dtype, seed=11).t()  # non-contiguous input
    grad = _randn((640, 5), dtype, seed=12).t()  # non-contiguous upstream gradient

    x_kernel = x.detach().clone().requires_grad_()
    kernels.quest_quantize(x_kernel, bits=bits, grid=grid, estimator=estimator, **kwargs).backward(grad)

    x32 = x.detach().float().requires_grad_()
    xh = quantizers.hadamard_transform(x32)
    est = _estimator(grid, bits, estimator, kwargs)
    with torch.no_grad():
        out = est.quantizer.quantize(xh)
        mask = est.pass_mask(xh, out)
    carrier = xh * mask
    (carrier + (out.values - carrier).detach()).backward(grad.float())
    ref = x32.grad.to(dtype).float()

    got = x_kernel.grad.float()
    assert x_kernel.grad.dtype == dtype
    tol = ULPS[dtype] * torch.finfo(dtype).eps * ref.abs() + 1e-5 * ref.abs().max()
    assert ((got - ref).abs() <= tol).all(), (got - ref).abs().max()


@pytest.mark.parametrize("persistent", [False, True])
def test_backward_kernel_poisoned_and_unmasked(persistent):
    """Backward with an all-ones mask is the plain transposed Hadamard; every element is written (`persistent`: two
    programs looping over tiles of 16 rows x 2 blocks, the last ones partial)."""
    rows = 37 if persistent else 3
    grad = _randn((rows, 384), torch.float32, seed=13)
    packed = torch.full((rows, 48), 0xFF, dtype=torch.uint8, device=DEVICE)
    out = torch.full_like(grad, float("nan"))
    launch = dict(launch=(16, 2, 4, 1), programs=2) if persistent else {}
    _tl_backward.quantize_backward(grad, packed, True, out=out, **launch)
    torch.testing.assert_close(out, quantizers.hadamard_transform(grad), rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise_value_error():
    x = torch.randn(2, 256, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of 128"):
        kernels.fused_quantize(torch.randn(2, 100, device=DEVICE))
    with pytest.raises(ValueError, match=r"bits 1\.\.8"):
        kernels.fused_quantize(x, bits=9)
    with pytest.raises(ValueError, match="fp4"):
        kernels.fused_quantize(x, bits=2, grid="fp4")
    with pytest.raises(ValueError, match="lloyd_max"):
        kernels.quest_quantize(x, grid="lloyd_max")
    with pytest.raises(ValueError, match="estimator"):
        kernels.fused_quantize(x, estimator="lsq")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        kernels.fused_quantize(x.double())
    with pytest.raises(ValueError, match="group sizes are 16, 32, 64, 128"):
        kernels.fused_quantize(x, group_size=256)
    with pytest.raises(ValueError, match="group sizes"):
        kernels.quest_quantize(x, group_size=8)
    with pytest.raises(ValueError, match="does not divide"):
        kernels.fused_quantize(torch.randn(2, 100, device=DEVICE), hadamard=False, group_size=16)
    with pytest.raises(ValueError, match="without codes"):
        _tl_quantize.quantize_forward(x, codes="int8", group_size=32, **_kernel_args("gaussian_mse", 4, "trust", {}))


def test_is_supported():
    assert kernels.is_supported("gaussian_mse", 4, "trust", 2048, DEVICE) == (True, "ok")  # CPU: interpreter on
    ok, reason = kernels.is_supported("gaussian_mse", 4, "trust", 200, DEVICE)
    assert not ok and "multiple of 128" in reason
    assert kernels.is_supported("gaussian_mse", 4, "trust", 200, DEVICE, hadamard=False)[0]
    assert not kernels.is_supported("lloyd_max", 4, "trust", 256, DEVICE)[0]
    assert not kernels.is_supported("gaussian_mse", 4, "lsq", 256, DEVICE)[0]
    for g in kernels.GROUP_SIZES:
        assert kernels.is_supported("fp4", 4, "clip", 256, DEVICE, group_size=g) == (True, "ok")
    ok, reason = kernels.is_supported("gaussian_mse", 4, "trust", 512, DEVICE, group_size=256)
    assert not ok and "group_size=256" in reason
    assert not kernels.is_supported("gaussian_mse", 4, "trust", 48, DEVICE, hadamard=False, group_size=32)[0]


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not kernels.is_supported("gaussian_mse", 4, "trust", 256, "cpu")[0]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.fused_quantize(torch.randn(2, 256))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_forward_backward_match_reference(dtype):
    x = _randn((1027, 2048), dtype, seed=21)
    values, mask = kernels.fused_quantize(x, bits=4)
    ref_values, ref_mask = _reference(x, "gaussian_mse", 4, "trust", {})
    _assert_close_values(values, ref_values)
    _assert_masks(mask, ref_mask)

    x_kernel = x.clone().requires_grad_()
    grad = _randn((1027, 2048), dtype, seed=22)
    kernels.quest_quantize(x_kernel, bits=4).backward(grad)
    ref = quantizers.hadamard_transform(grad.float() * ref_mask).to(dtype).float()
    err = (x_kernel.grad.float() - ref).norm() / ref.norm()
    assert err < 2 * torch.finfo(dtype).eps


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("group_size", [16, 128])
@pytest.mark.parametrize(("grid", "bits", "estimator", "kwargs"), [CONFIGS[2], CONFIGS[4], CONFIGS[6]], ids=str)
def test_cuda_group_scales_match_reference(grid, bits, estimator, kwargs, group_size):
    """The compiled group path (both forward kernels, bf16 on the tensor cores) against the grouped reference."""
    for shape in [(1027, 2048), (515, 640)]:
        x = _randn(shape, torch.bfloat16, seed=23)
        values, mask = kernels.fused_quantize(x, bits=bits, grid=grid, estimator=estimator, group_size=group_size,
                                              **kwargs)  # fmt: skip
        ref_values, ref_mask = _group_reference(x, grid, bits, estimator, kwargs, group_size)
        _assert_close_values(values, ref_values)
        _assert_masks(mask, ref_mask)

        x_kernel = x.clone().requires_grad_()
        grad = _randn(shape, torch.bfloat16, seed=24)
        kernels.quest_quantize(x_kernel, bits=bits, grid=grid, estimator=estimator, group_size=group_size,
                               **kwargs).backward(grad)  # fmt: skip
        ref = quantizers.hadamard_transform(grad.float() * ref_mask).to(torch.bfloat16).float()
        assert (x_kernel.grad.float() - ref).norm() / ref.norm() < 2 * torch.finfo(torch.bfloat16).eps


@pytest.mark.gpu
@cuda
def test_torch_compile_fullgraph():
    """The custom ops trace without a graph break (per-row and group scales); compiled values and gradients equal
    eager ones."""

    def quest_matmul(x, w):
        return kernels.quest_quantize(x, bits=4) @ kernels.quest_quantize(w, bits=4, group_size=32).t()

    x = _randn((256, 512), torch.bfloat16, seed=31).requires_grad_()
    w = _randn((384, 512), torch.bfloat16, seed=32).requires_grad_()
    compiled = torch.compile(quest_matmul, fullgraph=True)
    y = compiled(x, w)
    y.sum().backward()
    grads = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    y_eager = quest_matmul(x, w)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(grads, (x.grad, w.grad))
