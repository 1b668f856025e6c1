"""Estimators: masked fractions against METHOD.md §1.4-§1.6 theory, detach-carrier equivalence (§0, §4.1), LSQ/PACT
gradients and state (§1.9, §7.1, §7.6)."""

import math

import pytest
import torch
import torch.distributed as dist

from quest_pl import estimators, quantizers

ALPHA = quantizers.OPTIMAL_GAUSSIAN_SCALES


def tail2(t: float) -> float:
    """P(|Z| > t), independent of the package's integrator."""
    return math.erfc(t / math.sqrt(2))


@pytest.fixture(scope="module")
def gaussian_rows() -> torch.Tensor:
    return torch.randn(512, 4096, generator=torch.Generator().manual_seed(0))


def build(est, grid, bits=None, **kw):
    return estimators.build(est, quantizer=quantizers.build(grid, bits=bits), **kw)


def zero_grad_fraction(estimator, x) -> float:
    x = x.clone().requires_grad_()
    estimator(x).backward(torch.ones_like(x))
    return float((x.grad == 0).double().mean())


# METHOD.md §1.4 table (trust default tau; clip c = 1), §1.4 W1A1 clip scales
SPEC_MASKED = [
    ("trust", "gaussian_mse", 1, {}, 0.1105),
    ("trust", "gaussian_mse", 2, {}, 0.0464),
    ("trust", "gaussian_mse", 3, {}, 0.0191),
    ("trust", "gaussian_mse", 4, {}, 0.00733),
    ("clip", "gaussian_mse", 1, {}, 0.425),
    ("clip", "gaussian_mse", 2, {}, 0.135),
    ("clip", "gaussian_mse", 3, {}, 0.0403),
    ("clip", "gaussian_mse", 4, {}, 0.0120),
    ("clip", "gaussian_mse", 1, {"clip_scale": 1.3}, 0.2996),
    ("clip", "gaussian_mse", 1, {"clip_scale": 1.25}, 0.3186),
    ("trust", "lloyd_max", 2, {}, 0.0414),
    ("clip", "lloyd_max", 2, {}, 0.131),
    ("clip", "fp4", 4, {}, 0.00347),
]


@pytest.mark.parametrize(("est", "grid", "bits", "kw", "spec"), SPEC_MASKED)
def test_masked_fraction_matches_spec(gaussian_rows, est, grid, bits, kw, spec):
    estimator = build(est, grid, bits, **kw)
    assert estimator.expected_masked_fraction() == pytest.approx(spec, rel=0.01)  # spec rounds to 3 digits
    assert zero_grad_fraction(estimator, gaussian_rows) == pytest.approx(spec, rel=0.10)


@pytest.mark.parametrize(("bits", "spec"), [(5, 0.00261), (6, 0.000873), (7, 0.000284), (8, 0.0000961)])
def test_trust_expected_fraction_high_bits(bits, spec):
    assert build("trust", "gaussian_mse", bits).expected_masked_fraction() == pytest.approx(spec, rel=0.01)


@pytest.mark.parametrize(
    ("est", "grid", "bits", "threshold"),
    [
        ("trust", "fp4", 4, 7 * 0.487079484),  # tau = a: only |z| > 6a + a is masked, no interior gaps (§1.6)
        ("trust", "ternary", None, 1.5 * 1.2240089519030855),
        ("clip", "lloyd_max", 4, 2.7326),
        ("trust", "gaussian_mse", 8, ALPHA[8] * 256 / 255),
    ],
)
def test_expected_fraction_is_gaussian_tail(gaussian_rows, est, grid, bits, threshold):
    estimator = build(est, grid, bits)
    assert estimator.expected_masked_fraction() == pytest.approx(tail2(threshold), rel=2e-4)
    if tail2(threshold) > 1e-3:
        assert zero_grad_fraction(estimator, gaussian_rows) == pytest.approx(tail2(threshold), rel=0.10)


@pytest.mark.parametrize(("grid", "bits"), [("lloyd_max", 3), ("lloyd_max", 4), ("int_sparse24", 4), ("ternary", None)])
def test_other_trust_fractions_match_own_theory(gaussian_rows, grid, bits):
    estimator = build("trust", grid, bits)
    assert zero_grad_fraction(estimator, gaussian_rows) == pytest.approx(estimator.expected_masked_fraction(), rel=0.1)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_default_trust_mask_is_clip_at_half_step_beyond_s(gaussian_rows, bits):
    """METHOD.md §1.4: the default trust mask is exactly |x| <= alpha_b sigma n/(n-1) (up to rounding at the edge)."""
    x = gaussian_rows[:64]
    trust = build("trust", "gaussian_mse", bits, trust=None)
    trust.record_mask = True
    trust(x)
    sigma = x.square().mean(-1, keepdim=True).sqrt()
    threshold = ALPHA[bits] * sigma * 2**bits / (2**bits - 1)
    clear = ((x.abs() - threshold).abs() > 1e-5 * sigma).expand_as(x)
    assert torch.equal(trust.last_mask[clear], (x.abs() <= threshold)[clear])


def carrier(x, q, m):
    """METHOD.md §0 detach-carrier form: x*m + sg(q - x*m)."""
    return x * m + (q - x * m).detach()


@pytest.mark.parametrize(("grid", "bits"), [("gaussian_mse", 2), ("gaussian_mse", 4), ("lloyd_max", 3), ("fp4", 4)])
def test_trust_equals_detach_carrier(grid, bits):
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(1)) * 3
    g = torch.randn_like(x)
    trust = build("trust", grid, bits)
    q = trust.quantizer(x)
    sigma = x.square().mean(-1, keepdim=True).sqrt()
    m = ((q - x).abs() <= trust.quantizer.default_trust * sigma).float()
    assert 0 < m.mean() < 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = trust(xa), carrier(xb, q, m)
    ya.backward(g)
    yb.backward(g)
    assert torch.allclose(ya, yb, atol=1e-6)
    assert torch.equal(ya, q)
    assert torch.equal(xa.grad, xb.grad)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_clip_equals_ste_through_clamp(bits):
    """METHOD.md §4.1 grad_flow check: Clip (c = 1) == STE round inside a clamp with the scale detached."""
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(2)) * 1.5
    g = torch.randn_like(x)
    n = 2**bits
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = build("clip", "gaussian_mse", bits)(xa)
    s = (ALPHA[bits] * xb.square().mean(-1, keepdim=True).sqrt()).detach()
    step = s * 2 / (n - 1)
    y = torch.clamp(xb, -s, s) / step + 0.5
    yb = ((y + (torch.round(y) - y).detach()) - 0.5) * step
    ya.backward(g)
    yb.backward(g)
    assert torch.allclose(ya, yb, atol=1e-5)
    assert torch.equal(xa.grad == 0, xb.grad == 0)
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-6, atol=0)  # the reference path divides and multiplies by step


def test_ste_and_none_pass_everything():
    x = torch.randn(4, 128, requires_grad=True)
    g = torch.randn(4, 128)
    ste = build("ste", "gaussian_mse", 1)
    ste(x).backward(g)
    assert torch.equal(x.grad, g)
    assert ste.last_mask is None
    ste.record_mask = True
    with torch.no_grad():
        ste(x)
    assert ste.last_mask.dtype == torch.bool and ste.last_mask.all()
    identity = estimators.build("none")
    assert identity(x) is x
    assert identity.expected_masked_fraction() == 0.0


@pytest.mark.parametrize("est", ["ste", "clip", "trust", "lsq", "pact"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_values_and_grad_dtype(est, dtype):
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_()
    estimator = build(est, "gaussian_mse", 4)
    y = estimator(x)
    assert y.dtype == dtype
    y.sum().backward()
    assert x.grad.dtype == dtype
    if est in ("ste", "clip", "trust"):
        assert torch.equal(y, estimator.quantizer(x))


def test_record_mask_matches_gradient_and_is_off_by_default(gaussian_rows):
    x = gaussian_rows[:32].clone().requires_grad_()
    trust = build("trust", "gaussian_mse", 2)
    trust(x)
    assert trust.last_mask is None
    trust.record_mask = True
    trust(x).backward(torch.ones_like(x))
    assert trust.last_mask.dtype == torch.bool and not trust.last_mask.requires_grad
    assert torch.equal(trust.last_mask, x.grad != 0)


def test_zero_rows_keep_their_gradient():
    x = torch.zeros(2, 256, requires_grad=True)
    for grid, bits in [("gaussian_mse", 4), ("gaussian_mse", 8), ("uniform", 4), ("lloyd_max", 4), ("fp4", 4)]:
        x.grad = None
        build("trust", grid, bits)(x).sum().backward()
        assert (x.grad == 1).all()


def test_uniform_absmax_trust_and_clip_mask_nothing(gaussian_rows):
    for est in ("trust", "clip"):
        estimator = build(est, "uniform", 4)
        assert zero_grad_fraction(estimator, gaussian_rows[:64]) == 0.0
        assert estimator.expected_masked_fraction() == 0.0


# ---- LSQ ---------------------------------------------------------------------------------------------------------


def test_lsq_init_and_state_dict_round_trip():
    lsq = build("lsq", "gaussian_mse", 4)
    assert [name for name, _ in lsq.named_parameters()] == ["log_step"]  # METHOD.md §1.9: the log of the step
    assert set(lsq.state_dict()) == {"log_step", "initialized", "floor"}
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(4))
    lsq(x)
    assert lsq.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-6)
    lsq.set_scale(lsq.step.detach() * 1.37)  # as if trained
    fresh = build("lsq", "gaussian_mse", 4)
    fresh.load_state_dict(lsq.state_dict())
    fresh(5 * x)
    assert torch.equal(fresh.step, lsq.step)
    assert bool(fresh.initialized)


@pytest.mark.parametrize(("est", "key"), [("lsq", "step"), ("pact", "clip")])
def test_checkpoint_holding_the_scale_itself_loads_as_its_log(est, key):
    """A state_dict from before the log form has the scale under `step` / `clip` (and maybe no floor): it loads as
    the same scale, and the floor defaults to SCALE_FLOOR times it."""
    from quest_pl.estimators.learned import SCALE_FLOOR

    old = {key: torch.tensor([0.37]), "initialized": torch.tensor(True)}
    e = build(est, "gaussian_mse", 4)
    e.load_state_dict(old)
    e(torch.randn(4, 64))  # no re-initialisation from this batch
    assert getattr(e, key).item() == pytest.approx(0.37, rel=1e-6)
    assert e.floor.item() == pytest.approx(0.37 * SCALE_FLOOR, rel=1e-6)
    assert set(e.state_dict()) == {f"log_{key}", "initialized", "floor"}


def test_lsq_values_and_input_gradient():
    lsq = build("lsq", "gaussian_mse", 3)
    lsq.set_scale(0.25)
    x = (torch.randn(101, generator=torch.Generator().manual_seed(10)) * 0.7).requires_grad_()
    g = torch.randn(101)
    y = lsq(x)
    v = torch.clamp(x.detach() / 0.25 - 0.5, -4, 3)
    assert torch.allclose(y, (torch.round(v) + 0.5) * 0.25, atol=1e-6)
    y.backward(g)
    in_range = x.detach().abs() <= 0.25 * 3.5
    assert 0 < in_range.sum() < 101
    assert torch.equal(x.grad, torch.where(in_range, g, 0.0))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_lsq_step_gradient_matches_hand_formula(bits):
    """§1.9: d out/d alpha = g (round(v) + 1/2 - x/alpha) in range, g (q_clip + 1/2) clamped; g = 1/sqrt(N Q_p).
    The parameter is log alpha, whose gradient is alpha times that (chain rule)."""
    n = 2**bits
    q_p = max(n // 2 - 1, 1)
    lsq = build("lsq", "gaussian_mse", bits)
    lsq.set_scale(0.3)
    alpha = lsq.step.item()  # 0.3 up to the rounding of exp(log 0.3)
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(5))
    upstream = torch.randn(3, 40, generator=torch.Generator().manual_seed(6))
    lsq(x).backward(upstream)
    v_raw = x / alpha - 0.5
    v = v_raw.clamp(-n // 2, n // 2 - 1)
    clamped = (v_raw < -n // 2) | (v_raw > n // 2 - 1)
    coeff = torch.where(clamped, v + 0.5, torch.round(v) + 0.5 - x / alpha)
    expected = (upstream * coeff).sum() / math.sqrt(x.numel() * q_p)
    assert lsq.log_step.grad.item() == pytest.approx(alpha * expected.item(), rel=1e-5)


def test_lsq_per_row():
    with pytest.raises(ValueError, match="rows"):
        build("lsq", "gaussian_mse", 2, per_row=True)
    lsq = build("lsq", "gaussian_mse", 2, per_row=True, rows=3)
    assert lsq.step.shape == (3, 1)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(7))
    lsq(x).sum().backward()
    assert torch.allclose(lsq.step.detach(), 2 * x.abs().mean(-1, keepdim=True))
    alpha = lsq.step.detach()
    v_raw = x / alpha - 0.5
    v = v_raw.clamp(-2, 1)
    coeff = torch.where((v_raw < -2) | (v_raw > 1), v + 0.5, torch.round(v) + 0.5 - x / alpha)
    assert torch.allclose(lsq.log_step.grad, alpha * coeff.sum(-1, keepdim=True) / math.sqrt(64), rtol=1e-5)


def test_lsq_initial_value_is_averaged_across_ranks(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        lsq = build("lsq", "gaussian_mse", 4)
        x = torch.randn(8, 128)
        lsq(x)
        assert lsq.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-6)
    finally:
        dist.destroy_process_group()


# ---- PACT --------------------------------------------------------------------------------------------------------


def test_pact_gradients():
    pact = build("pact", "gaussian_mse", 2)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(8))
    pact(x)
    assert pact.clip.item() == pytest.approx(ALPHA[2] * x.square().mean().sqrt().item(), rel=1e-6)
    pact.set_scale(1.0)
    x = x.requires_grad_()
    g = torch.randn(4, 128, generator=torch.Generator().manual_seed(9))
    y = pact(x)
    assert torch.allclose(y.detach().unique(), torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
    y.backward(g)
    inside = x.detach().abs() <= 1.0
    assert 0 < inside.float().mean() < 1
    assert torch.equal(x.grad, torch.where(inside, g, 0.0))
    expected = (torch.sign(x.detach()) * g)[~inside].sum() / math.sqrt(x.numel())  # Q_p = 1 at 2 bits
    assert pact.log_clip.grad.item() == pytest.approx(pact.clip.item() * expected.item(), rel=1e-5)  # alpha = 1


def test_pact_state_dict_round_trip():
    pact = build("pact", "uniform", 4)
    pact(torch.randn(8, 128))
    fresh = build("pact", "uniform", 4)
    fresh.load_state_dict(pact.state_dict())
    fresh(torch.randn(8, 128) * 10)
    assert torch.equal(fresh.clip, pact.clip)


@pytest.mark.parametrize(("est", "bits", "spec"), [("pact", 4, 0.0120), ("pact", 1, 0.425)])
def test_learned_expected_fraction_at_init(est, bits, spec):
    assert build(est, "gaussian_mse", bits).expected_masked_fraction() == pytest.approx(spec, rel=0.01)
    assert 0 < build("lsq", "gaussian_mse", bits).expected_masked_fraction() < 1


# ---- build errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("est", "grid", "bits"), [("lsq", "lloyd_max", 2), ("pact", "fp4", 4), ("lsq", "ternary", None)]
)
def test_learned_scale_needs_integer_grid(est, grid, bits):
    with pytest.raises(ValueError, match=f"{est}.*{grid}"):
        build(est, grid, bits)


def test_unknown_estimator_lists_registry():
    with pytest.raises(ValueError, match=r"'erfclip'.*clip.*lsq.*none.*pact.*ste.*trust"):
        estimators.build("erfclip", quantizer=quantizers.build("gaussian_mse", bits=4))


# ---- learned scales: positivity, PACT's gradient scale, per-row weights only (issue #11) ---------------------------


def _pushed_down(est: str, bits: int = 4):
    """An estimator whose loss (sum of outputs over inputs far above the range) decreases with the scale:
    d loss / d scale > 0 for both LSQ ((q_clip + 1/2) per clamped element) and PACT (sign(x) = +1 per element)."""
    e = build(est, "gaussian_mse", bits)
    e(torch.randn(16, 64, generator=torch.Generator().manual_seed(0)))  # data-dependent init (and floor)
    return e


@pytest.mark.parametrize("est", ["lsq", "pact"])
def test_learned_scale_cannot_cross_zero(est):
    e = _pushed_down(est)
    opt = torch.optim.SGD(e.parameters(), lr=10.0)  # one step would take the scale far below zero
    x = torch.full((4, 64), 100.0)
    inside = torch.linspace(-1e-3, 1e-3, 64).repeat(4, 1)
    for _ in range(5):
        opt.zero_grad()
        e(x).sum().backward()
        assert e.log_scale.grad.item() > 0  # the loss does push the scale down
        opt.step()
        probe = inside.clone().requires_grad_()
        y = e(probe)
        assert e.learned.min().item() > 0
        assert torch.isfinite(y).all()
        y.sum().backward()
        assert probe.grad.abs().sum() > 0  # a tiny input still has a scale to pass through: the layer is not frozen


@pytest.mark.parametrize("est", ["lsq", "pact"])
def test_learned_scale_of_zero_gives_finite_values(est):
    """A scale of 0 (log = -inf, e.g. written by hand into a checkpoint) is lifted to the floor before use."""
    e = build(est, "gaussian_mse", 4)
    with torch.no_grad():
        e.log_scale.fill_(-math.inf)
        e.initialized.fill_(True)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1)).requires_grad_()
    y = e(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(e.log_scale.grad).all()
    assert e.learned.item() > 0


def test_pact_clip_gradient_has_lsq_scale_by_default():
    """PACT's clip gradient is sum_{|x| > alpha} sign(x) g, times 1/sqrt(N Q_p) by default (as LSQ's step); the
    authors' unscaled sum with grad_scale=False."""
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(8))
    g = torch.randn(4, 128, generator=torch.Generator().manual_seed(9))
    unscaled = (torch.sign(x) * g)[x.abs() > 1.0].sum().item()
    for kw, factor in (({}, 1 / math.sqrt(x.numel() * 1)), ({"grad_scale": False}, 1.0)):
        pact = build("pact", "gaussian_mse", 2, **kw)
        pact.set_scale(1.0)
        pact(x).backward(g)
        assert pact.log_clip.grad.item() == pytest.approx(pact.clip.item() * unscaled * factor, rel=1e-5)


def test_lsq_per_row_with_lsq_activations_builds_and_applies_to_weights_only():
    from quest_pl.module import LMModule
    from quest_pl.quant import quant_layers

    quant = dict(name="lsq", grid="gaussian_mse", bits=4, w_bits=4, a_bits=4, estimator="lsq", lsq_per_row=True)
    m = LMModule(dict(vocab_size=256, n_layer=1, d_model=128, n_head=1, seq_len=16), {}, quant=quant)
    for layer in quant_layers(m.model).values():
        assert layer.weight_quant.step.shape == (layer.out_features, 1)
        assert layer.act_quant.step.shape == (1,)
    m(torch.randint(0, 256, (2, 16)))


def test_quantizer_parameters_are_clipped_apart_from_the_model():
    """A large PACT clip gradient must not shrink the model's gradients through the global norm (module
    configure_gradient_clipping): the model's parameters and the quantizers' are clipped to max_norm separately."""
    from quest_pl.module import LMModule
    from quest_pl.quant import is_quantizer_param

    quant = dict(name="pact", grid="gaussian_mse", bits=4, w_bits=4, a_bits=4, estimator="pact")
    optim = dict(lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, quant_lr_scale=1.0, quant_weight_decay=0.0)
    m = LMModule(dict(vocab_size=256, n_layer=1, d_model=128, n_head=1, seq_len=16), optim, quant=quant)
    named = list(m.named_parameters())
    for name, p in named:
        p.grad = torch.full_like(p, 100.0 if is_quantizer_param(name) else 1e-4)
    model_before = {n: p.grad.clone() for n, p in named if not is_quantizer_param(n)}
    m.configure_gradient_clipping(None, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    for n, p in named:
        if is_quantizer_param(n):
            continue
        assert torch.equal(p.grad, model_before[n])  # the model's norm is far below 1: untouched
    quant_norm = torch.cat([p.grad.flatten() for n, p in named if is_quantizer_param(n)]).norm()
    assert quant_norm.item() == pytest.approx(1.0, rel=1e-4)


# ---- learned scales under the training optimizer (METHOD.md §1.9: update relative to the scale's size) --------------

TRAIN_OPTIM = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
"""AdamW as the quantizer group gets it at the CPU size (model/tiny lr, optim/adamw betas and eps, no decay)."""


def _train_scale(est: str, sigma: float, steps: int, bits: int = 4, seed: int = 0) -> tuple[list[float], list[float]]:
    """Learn only the scale of one estimator on the MSE to its input, inputs sigma * N(0,1) drawn afresh each step,
    with AdamW and the positivity projection after each step as the training module runs them. Returns the scale
    (in units of sigma) at init and after every step, and the clipped fraction at every step."""
    from quest_pl.estimators.learned import project_learned_scales

    e = build(est, "gaussian_mse", bits)
    gen = torch.Generator().manual_seed(seed)
    e(sigma * torch.randn(64, 512, generator=gen))  # data-dependent init
    opt = torch.optim.AdamW(e.parameters(), **TRAIN_OPTIM)
    opt.register_step_post_hook(lambda *_: project_learned_scales(e))
    e.record_mask = True
    scales, clipped = [e.learned.detach().mean().item() / sigma], []
    for _ in range(steps):
        x = sigma * torch.randn(64, 512, generator=gen)
        loss = (e(x) - x).square().mean() / sigma**2  # scale-free: the same loss for every sigma
        opt.zero_grad()
        loss.backward()
        opt.step()
        clipped.append(1 - e.last_mask.float().mean().item())
        scales.append(e.learned.detach().mean().item() / sigma)
    return scales, clipped


@pytest.mark.parametrize("est", ["lsq", "pact"])
def test_learned_scale_trajectory_does_not_depend_on_the_input_units(est):
    """The optimizer moves a learned scale relative to its own size (the LSQ paper's design rule: update magnitude
    proportional to parameter magnitude). Inputs 2^-6 x give the same scale trajectory, in units of the input's
    RMS, as x: a weight of RMS 0.02 is quantized as well as an activation of RMS 1 at the same learning rate."""
    unit, _ = _train_scale(est, 1.0, 40)
    small, _ = _train_scale(est, 2.0**-6, 40)
    assert small == pytest.approx(unit, rel=1e-4)


@pytest.mark.parametrize("sigma", [1.0, 2.0**-6])
def test_lsq_step_on_gaussian_input_settles_at_the_mse_optimum(sigma):
    """For N(0, sigma^2) inputs and the MSE loss, the LSQ step gradient vanishes at the MSE-optimal step
    alpha* = s* / ((n - 1) / 2), s* = OPTIMAL_GAUSSIAN_SCALES[b] sigma (METHOD.md §1.3, §1.9); there a fraction
    P(|z| > s*/sigma) (1.2 % at 4 bits) is clipped. From the LSQ paper's init (1.8 alpha* at 4 bits) the step must
    reach alpha* and stay near it, clipping about that fraction; it must not collapse (all entries clipped)."""
    target = ALPHA[4] / 7.5
    scales, clipped = _train_scale("lsq", sigma, 300)
    assert scales[0] == pytest.approx(1.8 * target, rel=0.05)  # the LSQ init: 2 E|z| / sqrt(7) = 0.603
    late = scales[-50:]
    assert max(abs(s / target - 1) for s in late) < 0.1
    assert sum(clipped[-50:]) / 50 == pytest.approx(tail2(ALPHA[4]), abs=0.006)
    assert max(clipped) < 0.05


def test_quant_weight_decay_shrinks_every_learned_scale():
    """optim.quant_weight_decay is PACT's L2 decay on the clip level in decoupled form: each optimizer step multiplies
    every learned scale by about (1 - lr wd), whether the scale is above 1 (activations) or below (weights)."""
    from quest_pl.module import LMModule

    quant = dict(name="pact", grid="gaussian_mse", bits=4, w_bits=4, a_bits=4, estimator="pact")
    optim = dict(lr=1e-2, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, quant_lr_scale=1.0, quant_weight_decay=0.5,
                 warmup_frac=0.1, init_div=1.0, final_lr_frac=1.0)  # fmt: skip
    m = LMModule(dict(vocab_size=256, n_layer=1, d_model=128, n_head=1, seq_len=16), optim, quant=quant)
    m(torch.randint(0, 256, (2, 16)))  # data-dependent init of the scales
    opt = m.configure_optimizers()["optimizer"]
    (group,) = [g for g in opt.param_groups if g["name"] == "quantizer"]
    scales = {n: e.learned.detach().clone() for n, e in m.model.named_modules() if hasattr(e, "initialized")}
    assert min(s.min() for s in scales.values()) < 1 < max(s.max() for s in scales.values())
    for p in m.parameters():
        p.grad = torch.zeros_like(p)  # Adam's own step is then 0: only the decay acts
    opt.step()
    factor = math.exp(-group["lr"] * 0.5)  # = 1 - lr wd to first order (lr wd = 0.005 here)
    for n, e in m.model.named_modules():
        if n in scales:
            assert torch.allclose(e.learned.detach(), scales[n] * factor, rtol=2e-5), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_mask_is_the_product_with_the_bool_mask(dtype):
    """The uint8 view gives bit for bit ``t * mask``: signed zeros, infinities and NaN included."""
    from quest_pl.estimators.base import apply_mask

    t = torch.randn(3, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    t[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1.0])
    mask = torch.rand(3, 64, generator=torch.Generator().manual_seed(4)) < 0.5
    mask[0, :6] = torch.tensor([True, False, True, False, True, False])
    out, ref = apply_mask(t, mask), t * mask
    as_bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert out.dtype == ref.dtype == dtype
    assert torch.equal(out.view(as_bits), ref.view(as_bits))


def test_pact_clip_gradient_is_the_masked_sum_bit_for_bit():
    """alpha's gradient: the sum over the clipped elements of sign(x) g, bit for bit ``torch.where`` then ``sum``."""
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(5), requires_grad=True)
    g = torch.randn(8, 256, generator=torch.Generator().manual_seed(6))
    pact = build("pact", "gaussian_mse", 4, grad_scale=False)
    with torch.no_grad():
        pact.log_clip.fill_(math.log(1.5))
        pact.initialized.fill_(True)
    alpha = float(pact.clip)
    pact(x).backward(g)
    inside = x.detach().abs() <= alpha
    expected = torch.where(inside, 0.0, g * torch.sign(x.detach())).sum().reshape(1)
    # the parameter is log(alpha): its gradient is alpha times alpha's (METHOD.md §1.9)
    torch.testing.assert_close(pact.log_clip.grad, expected * alpha, rtol=1e-6, atol=0)
    assert torch.equal(x.grad, torch.where(inside, g, 0.0))
