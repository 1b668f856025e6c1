"""quant.learned_init_steps (METHOD.md §1.9): for the first K optimizer steps every learned scale (LSQ step, PACT clip
level; weights and activations) is set from each training batch by its usual init rule and not trained; afterwards it is
learned from a fresh optimizer state. Driven through a real Lightning Trainer on a one-block model (a few seconds)."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from quest_pl.config import ConfigError, validate
from quest_pl.estimators.learned import SCALE_EPS, SCALE_FLOOR, LearnedScale
from quest_pl.model import LlamaConfig
from quest_pl.module import LMModule
from quest_pl.quant import QuantConfig
from tests.conftest import compose

TINY = dict(vocab_size=256, n_layer=1, d_model=128, n_head=1, seq_len=16)
OPTIM = dict(lr=3e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, quant_lr_scale=1.0, quant_weight_decay=0.0,
             warmup_frac=0.1, init_div=100.0, final_lr_frac=0.1)  # fmt: skip
pytestmark = pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch")
LSQ = dict(name="lsq", grid="gaussian_mse", bits=4, w_bits=4, a_bits=4, estimator="lsq")


def quant(estimator: str = "lsq", **options) -> dict:
    return {**LSQ, "estimator": estimator, **options}


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 256, (2, 16), generator=g), torch.randint(0, 256, (2, 16), generator=g)) for _ in range(n)
    ]


class Forwards:
    """Every forward of every learned scale: (name, training, initialised before it, its input, log-scale before)."""

    def __init__(self, module: LMModule):
        self.calls: list[tuple[str, bool, bool, torch.Tensor, torch.Tensor]] = []
        for name, m in scales(module).items():
            m.register_forward_pre_hook(self.hook(name))

    def hook(self, name: str):
        def record(m, args):
            self.calls.append(
                (name, m.training, bool(m.initialized), args[0].detach().clone(), m.log_scale.detach().clone())
            )

        return record

    def of(self, name: str, training: bool) -> list:
        return [c for c in self.calls if c[0] == name and c[1] == training]


def scales(module: LMModule) -> dict[str, LearnedScale]:
    return {n: m for n, m in module.model.named_modules() if isinstance(m, LearnedScale)}


def fit(module, data, max_steps, tmp_path, accumulate=1, ckpt_path=None, val_every=None, save=None):
    """Train to ``max_steps`` optimizer steps (resuming from ``ckpt_path``), validating on one batch every
    ``val_every`` steps; ``save``: write a checkpoint there at the end."""
    trainer = L.Trainer(
        max_steps=max_steps, accumulate_grad_batches=accumulate, gradient_clip_val=1.0, accelerator="cpu", devices=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=1 if val_every else 0,
        val_check_interval=(val_every or 1) * accumulate, check_val_every_n_epoch=None, default_root_dir=tmp_path,
    )  # fmt: skip
    loader = DataLoader(data, batch_size=None)
    trainer.fit(module, loader, val_dataloaders=DataLoader(data[:1], batch_size=None), ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    return trainer


def new_module(q: dict) -> LMModule:
    torch.manual_seed(0)
    return LMModule(TINY, OPTIM, quant=q)


def quantizer_state(trainer) -> list[dict]:
    """The optimizer's state of each parameter of the quantizer group (an empty dict: none, as never stepped)."""
    opt = trainer.optimizers[0]
    (group,) = [g for g in opt.param_groups if g["name"] == "quantizer"]
    return [opt.state.get(p, {}) for p in group["params"]]


def test_default_is_the_first_batch_init_then_learned(tmp_path):
    """learned_init_steps absent or 0: today's behaviour, bit for bit. Each scale is initialised on its first forward
    only and trained from the first optimizer step (the optimizer holds state for it after step 1)."""
    data = batches(3)
    runs = []
    for q in (quant(), quant(learned_init_steps=0)):
        module = new_module(q)
        forwards = Forwards(module)
        trainer = fit(module, data, 3, tmp_path)
        runs.append((module, trainer))
        for name in scales(module):
            assert [c[2] for c in forwards.of(name, True)] == [False, True, True], name
        assert all(s["step"] == 3 for s in quantizer_state(trainer))
    (a, ta), (b, tb) = runs
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    for sa, sb in zip(ta.optimizers[0].state.values(), tb.optimizers[0].state.values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def init_rule(m: LearnedScale, x: torch.Tensor) -> torch.Tensor:
    """METHOD.md §1.9: LSQ alpha0 = 2 mean|x| / sqrt(Q_p) (per tensor), PACT alpha0 = alpha_b RMS(x)."""
    return m.initial_value(x.float()).clamp_min(SCALE_EPS)


@pytest.mark.parametrize("estimator", ["lsq", "pact"])
def test_scales_after_the_window_are_the_init_rule_on_its_last_batch(tmp_path, estimator):
    """K = 2 with 2 micro-batches per step: all 4 training forwards re-initialise every scale (weights and
    activations); after step K each scale is the init rule on the last micro-batch's input (its floor 1e-3 of it) and
    the optimizer holds no state for it; resumed at K it is never re-initialised, and learned from a fresh state."""
    k, accumulate = 2, 2
    module = new_module(quant(estimator, learned_init_steps=k))
    forwards = Forwards(module)
    ckpt = tmp_path / "k.ckpt"
    trainer = fit(module, batches(8), k, tmp_path, accumulate=accumulate, save=ckpt)
    assert len(scales(module)) == 8  # 4 linears x (weight, activation)
    at_k = {}
    for name, m in scales(module).items():
        calls = forwards.of(name, True)
        assert [c[2] for c in calls] == [False] * (k * accumulate), name  # every micro-batch of the window re-inits
        value = init_rule(m, calls[-1][3])
        assert torch.equal(m.log_scale.detach(), value.log()), name
        assert torch.equal(m.floor, (value * SCALE_FLOOR).clamp_min(SCALE_EPS)), name
        at_k[name] = m.log_scale.detach().clone()
    assert quantizer_state(trainer) == [{}] * 8  # Adam moments reset: the learned phase starts clean
    # Resume at step K (past the window): no re-initialisation, the scales learned from step K on.
    resumed = new_module(quant(estimator, learned_init_steps=k))
    forwards = Forwards(resumed)
    trainer = fit(resumed, batches(8), k + 2, tmp_path, accumulate=accumulate, ckpt_path=str(ckpt))
    for name, m in scales(resumed).items():
        calls = forwards.of(name, True)
        assert len(calls) == 2 * accumulate and all(c[2] for c in calls), name
        assert torch.equal(calls[0][4], at_k[name]), name  # the checkpoint's scale, untouched by the first forward
        assert not torch.equal(m.log_scale.detach(), at_k[name]), name  # and trained afterwards
    assert all(s["step"] == 2 for s in quantizer_state(trainer))  # two updates since the window: a fresh state


def test_resume_inside_the_window_continues_it(tmp_path):
    """K = 3, checkpoint at step 1: the resumed run re-initialises on steps 1 and 2."""
    module = new_module(quant(learned_init_steps=3))
    ckpt = tmp_path / "one.ckpt"
    fit(module, batches(3), 1, tmp_path, save=ckpt)
    resumed = new_module(quant(learned_init_steps=3))
    forwards = Forwards(resumed)
    trainer = fit(resumed, batches(3), 3, tmp_path, ckpt_path=str(ckpt))
    for name, m in scales(resumed).items():
        calls = forwards.of(name, True)
        assert [c[2] for c in calls] == [False, False], name
        assert torch.equal(m.log_scale.detach(), init_rule(m, calls[-1][3]).log()), name
    assert quantizer_state(trainer) == [{}] * 8


def test_validation_never_reinitialises(tmp_path):
    """Validating after every step of a K = 3 window and after it: a validation forward finds each scale initialised
    and holding the value the preceding training forward set (the window's scales are not trained in between)."""
    module = new_module(quant(estimator="pact", learned_init_steps=3))
    forwards = Forwards(module)
    fit(module, batches(4), 4, tmp_path, val_every=1)
    for name, m in scales(module).items():
        calls = [c for c in forwards.calls if c[0] == name]
        assert [c[1] for c in calls] == [True, False] * 4, name
        for step, (train, val) in enumerate(zip(calls[0::2], calls[1::2])):
            assert val[2], (name, step)  # initialised: this forward does not initialise
            if step < 3:
                assert torch.equal(val[4], init_rule(m, train[3]).log()), (name, step)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (dict(learned_init_steps=-1), "quant.learned_init_steps=-1: expected an integer >= 0"),
        (dict(learned_init_steps=2.5), "quant.learned_init_steps=2.5: expected an integer >= 0"),
        (dict(learned_init_steps=True), "quant.learned_init_steps=True: expected an integer >= 0"),
        (dict(learned_init_steps="abc"), "quant.learned_init_steps='abc': expected an integer >= 0"),
        (dict(estimator="trust", learned_init_steps=40), "quant.learned_init_steps=40: expected 0"),
        (dict(grid=None, learned_init_steps=-3), "quant.learned_init_steps=-3: expected an integer >= 0"),
    ],
)
def test_bad_values_are_one_line(options, needle):
    with pytest.raises(ConfigError) as err:
        QuantConfig.from_cfg(quant(**options), LlamaConfig(**TINY))
    assert str(err.value).startswith(needle) and "\n" not in str(err.value)


def test_an_operand_with_a_learned_scale_is_enough():
    """LSQ weights with trust activations: the weights' steps are set through the window."""
    q = QuantConfig.from_cfg(quant(a_estimator="trust", learned_init_steps=5), LlamaConfig(**TINY))
    assert q.learned_init_steps == 5 and q.weight.estimator == "lsq" and q.act.estimator == "trust"


def test_config_default_and_compile():
    """The default is 0 (experiments/quant/bf16.yaml); with compile=true a value > 0 is refused in one line."""
    assert compose("quant=lsq_w4a4").quant.learned_init_steps == 0
    validate(compose("quant=lsq_w4a4", "compile=true"))
    with pytest.raises(ConfigError) as err:
        validate(compose("quant=lsq_w4a4", "quant.learned_init_steps=40", "compile=true"))
    assert str(err.value).startswith("quant.learned_init_steps=40: ") and "compile=false" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="compile=false"):  # a module built in Python, without the config check
        LMModule(TINY, OPTIM, quant=quant(learned_init_steps=40), compile=True)


def test_checkpoint_written_before_the_option_resumes_with_zero():
    """A checkpoint whose stored config has no quant.learned_init_steps was trained with 0: it resumes with the default
    and refuses another value like any changed key."""
    from quest_pl.config import check_resume
    from quest_pl.train import run_config

    cfg = compose("quant=lsq_w4a4", "ckpt_path=old.ckpt")
    saved = run_config(cfg)
    del saved["quant"]["learned_init_steps"]
    assert check_resume(cfg, {"global_step": 0, "quest_pl_config": saved}) == {}
    new = compose("quant=lsq_w4a4", "quant.learned_init_steps=4", "ckpt_path=old.ckpt")
    with pytest.raises(ConfigError) as err:
        check_resume(new, {"global_step": 0, "quest_pl_config": saved})
    assert "trained with quant.learned_init_steps=0, this run has quant.learned_init_steps=4" in str(err.value)
