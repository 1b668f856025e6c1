"""Grids against Gaussian theory (METHOD.md §1.2-§1.7, §1.11) and their contracts (dtype, shapes, errors)."""

import math

import pytest
import torch

from quest_pl import quantizers
from quest_pl.quantizers.int_sparse24 import two_four_keep_mask

ALPHA = quantizers.OPTIMAL_GAUSSIAN_SCALES
FP4_A = 0.487079484
TERNARY_S = 1.2240089519030855

# (grid, bits, relative MSE on N(0,1) rows from METHOD.md §1.2 / §1.5 (converged) / §1.6 / §1.3)
THEORY_MSE = [
    ("gaussian_mse", 1, 0.36338023),
    ("gaussian_mse", 2, 0.11884605),
    ("gaussian_mse", 3, 0.03743966),
    ("gaussian_mse", 4, 0.01154288),
    ("gaussian_mse", 8, 8.7821e-5),
    ("lloyd_max", 2, 0.11748),
    ("lloyd_max", 3, 0.034548),
    ("lloyd_max", 4, 0.009501),
    ("fp4", 4, 0.01268490),
    ("ternary", None, 0.19017404),
]

ALL_GRIDS = [
    ("uniform", 1),
    ("uniform", 4),
    ("uniform", 8),
    ("gaussian_mse", 1),
    ("gaussian_mse", 2),
    ("gaussian_mse", 4),
    ("gaussian_mse", 8),
    ("lloyd_max", 1),
    ("lloyd_max", 3),
    ("lloyd_max", 4),
    ("fp4", 4),
    ("int_sparse24", 4),
    ("ternary", None),
]


def relative_mse(q: torch.Tensor, x: torch.Tensor) -> float:
    return float((q.double() - x.double()).square().sum() / x.double().square().sum())


@pytest.fixture(scope="module")
def gaussian_rows() -> torch.Tensor:
    return torch.randn(512, 4096, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("name", "bits", "theory"), THEORY_MSE)
def test_relative_mse_matches_gaussian_theory(gaussian_rows, name, bits, theory):
    grid = quantizers.build(name, bits=bits)
    assert relative_mse(grid(gaussian_rows), gaussian_rows) == pytest.approx(theory, rel=0.03)
    assert grid.gaussian_mse == pytest.approx(theory, rel=1e-3)


def test_int_sparse24_mse_matches_its_theory(gaussian_rows):
    grid = quantizers.build("int_sparse24", bits=4)
    assert relative_mse(grid(gaussian_rows), gaussian_rows) == pytest.approx(grid.gaussian_mse, rel=0.03)


@pytest.mark.parametrize(
    ("bits", "positive_levels"),
    [
        (1, [0.7979]),
        (2, [0.4528, 1.5104]),
        (3, [0.2451, 0.7560, 1.3440, 2.1520]),
        (4, [0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6180, 2.0690, 2.7326]),
    ],
)
def test_lloyd_max_levels_are_converged(bits, positive_levels):
    levels = quantizers.build("lloyd_max", bits=bits).levels
    assert torch.allclose(levels, -levels.flip(0), atol=1e-12)
    assert torch.allclose(levels[2 ** (bits - 1) :], torch.tensor(positive_levels, dtype=torch.float64), atol=1e-3)


@pytest.mark.parametrize(
    ("bits", "tau"),
    [(1, 0.797885), (2, 0.497845), (3, 0.293010), (4, 0.167595), (5, 0.094068), (8, 0.015235)],
)
def test_gaussian_mse_constants(bits, tau):
    grid = quantizers.build("gaussian_mse", bits=bits)
    assert grid.clip_level == ALPHA[bits]
    assert grid.default_trust == pytest.approx(tau, abs=1e-6)
    assert grid.levels[-1] == pytest.approx(ALPHA[bits], rel=1e-12)
    assert len(grid.levels) == 2**bits


def test_non_uniform_constants():
    fp4 = quantizers.build("fp4")
    assert fp4.bits == 4
    assert len(fp4.levels.unique()) == 15
    assert fp4.clip_level == pytest.approx(6 * FP4_A)
    assert fp4.default_trust == pytest.approx(FP4_A)
    ternary = quantizers.build("ternary")
    assert ternary.bits == 1.585
    assert ternary.levels.tolist() == [-TERNARY_S, 0.0, TERNARY_S]
    assert ternary.default_trust == pytest.approx(TERNARY_S / 2)
    lloyd = quantizers.build("lloyd_max", bits=2)
    assert lloyd.default_trust == pytest.approx(0.5288, abs=1e-4)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_gaussian_mse_integer_view(gaussian_rows, bits):
    x = gaussian_rows[:16]
    out = quantizers.build("gaussian_mse", bits=bits).quantize(x)
    n = 2**bits
    rms = x.square().mean(-1, keepdim=True).sqrt()
    assert torch.equal(out.rms, rms)
    assert torch.equal(out.scale, ALPHA[bits] * rms)
    step = out.scale * 2 / (n - 1)
    k = torch.floor(x / step).clamp(-n // 2, n // 2 - 1)
    assert torch.equal(out.values, (k + 0.5) * step)
    assert (out.values.abs() <= out.scale * (1 + 1e-6)).all()


@pytest.mark.parametrize(("name", "bits"), ALL_GRIDS)
def test_output_contract(name, bits):
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(1))
    out = quantizers.build(name, bits=bits).quantize(x)
    assert out.values.shape == x.shape
    assert out.rms.shape == out.scale.shape == (3, 5, 1)
    assert all(t.dtype == torch.float32 for t in out)
    assert (out.values.abs() <= out.scale * (1 + 1e-6)).all()


@pytest.mark.parametrize(("name", "bits"), ALL_GRIDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_gives_rounded_fp32_answer(name, bits, dtype):
    x = torch.randn(7, 512, generator=torch.Generator().manual_seed(2)).to(dtype)
    grid = quantizers.build(name, bits=bits)
    out = grid(x)
    assert out.dtype == dtype
    assert torch.equal(out, grid(x.float()).to(dtype))


@pytest.mark.parametrize(("name", "bits"), ALL_GRIDS)
def test_zero_rows_stay_finite(name, bits):
    x = torch.zeros(2, 256)
    out = quantizers.build(name, bits=bits).quantize(x)
    assert torch.isfinite(out.values).all()
    assert out.values.abs().max() < 1e-29


@pytest.mark.parametrize(("name", "bits"), ALL_GRIDS)
def test_grids_scale_equivariant(name, bits):
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(3))
    grid = quantizers.build(name, bits=bits)
    assert torch.equal(grid(4 * x), 4 * grid(x))


def test_uniform_absmax():
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(4))
    amax = x.abs().amax(-1, keepdim=True)
    one_bit = quantizers.build("uniform", bits=1)(x)
    assert torch.equal(one_bit, amax * torch.sign(x))
    out = quantizers.build("uniform", bits=4).quantize(x)
    assert torch.equal(out.scale, amax)
    arg = x.abs().argmax(-1, keepdim=True)
    assert torch.allclose(out.values.gather(-1, arg), x.gather(-1, arg))
    step = 2 * amax / 15
    assert ((out.values - x).abs() <= step / 2 * (1 + 1e-5)).all()


def test_level_grids_round_to_nearest_level(gaussian_rows):
    x = gaussian_rows[:8]
    for name, bits in [("lloyd_max", 4), ("fp4", 4), ("ternary", None)]:
        grid = quantizers.build(name, bits=bits)
        out = grid.quantize(x)
        sigma = out.rms
        levels = grid.levels.float() * sigma.unsqueeze(-1)
        nearest = levels.squeeze(1).gather(-1, (x.unsqueeze(-1) - levels).abs().argmin(-1))
        assert torch.allclose(out.values, nearest, atol=1e-6)


def test_two_four_sparsity_pattern(gaussian_rows):
    x = gaussian_rows[:32, :512]
    values = quantizers.build("int_sparse24", bits=4)(x)
    groups = values.unflatten(-1, (-1, 4))
    assert ((groups != 0).sum(-1) == 2).all()
    kept = groups != 0
    smallest_kept = torch.where(kept, x.abs().unflatten(-1, (-1, 4)), math.inf).amin(-1)
    largest_pruned = torch.where(kept, -math.inf, x.abs().unflatten(-1, (-1, 4))).amax(-1)
    assert (smallest_kept >= largest_pruned).all()
    dense = quantizers.build("gaussian_mse", bits=4)(x)
    assert torch.equal(values, torch.where(kept.flatten(-2), dense, 0.0))


def test_two_four_needs_multiple_of_four():
    with pytest.raises(ValueError, match=r"multiple of 4.*got 6"):
        quantizers.build("int_sparse24", bits=4)(torch.randn(2, 6))
    assert two_four_keep_mask(torch.tensor([[1.0, -3.0, 2.0, 0.5]])).tolist() == [[False, True, True, False]]


def test_quantize_with_scale():
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(5))
    grid = quantizers.build("gaussian_mse", bits=3)
    out = grid.quantize(x)
    assert torch.equal(grid.quantize_with_scale(x, out.scale).values, out.values)
    fixed = grid.quantize_with_scale(x, torch.tensor([0.5]))
    assert fixed.scale.shape == (4, 1)
    grid_points = (torch.arange(-4, 4) + 0.5) / 7
    assert torch.allclose(fixed.values.unique(), grid_points)
    assert quantizers.build("uniform", bits=2).supports_learned_scale
    for name, bits in [("lloyd_max", 2), ("fp4", 4), ("ternary", None), ("int_sparse24", 4)]:
        grid = quantizers.build(name, bits=bits)
        assert not grid.supports_learned_scale
        with pytest.raises(NotImplementedError, match=name):
            grid.quantize_with_scale(x, out.scale)


@pytest.mark.parametrize(
    ("name", "bits", "allowed"),
    [
        ("gaussian_mse", 9, "1, 2, 3, 4, 5, 6, 7, 8"),
        ("gaussian_mse", 0, "1, 2, 3, 4, 5, 6, 7, 8"),
        ("uniform", 1.5, "1, 2"),
        ("lloyd_max", 5, "1, 2, 3, 4"),
        ("fp4", 8, "4"),
        ("ternary", 2, "1.585"),
        ("int_sparse24", None, "1, 2"),
    ],
)
def test_bad_bits_raise(name, bits, allowed):
    with pytest.raises(ValueError, match=f"{name}.*bits={bits}.*{allowed}"):
        quantizers.build(name, bits=bits)


def test_unknown_grid_lists_registry():
    with pytest.raises(ValueError, match=r"'int9'.*fp4.*gaussian_mse.*lloyd_max.*ternary.*uniform"):
        quantizers.build("int9", bits=4)


def test_registry_and_absmax_theory():
    assert set(quantizers.GRIDS) == {
        "uniform",
        "gaussian_mse",
        "lloyd_max",
        "fp4",
        "int_sparse24",
        "ternary",
        "mxfp4",
        "nvfp4",
    }
    uniform = quantizers.build("uniform", bits=4)
    assert uniform.levels is None and uniform.clip_level is None and uniform.gaussian_mse is None
