"""Diagnostics callbacks (METHOD.md §4): alignment is 1 without quantization and near 1 at 8 bits, masked fractions
match Gaussian theory, persistence of identical / disjoint masks is 1 / 0, and measuring never changes training."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from quest_pl import estimators, quantizers
from quest_pl.callbacks import GradientAlignment, MaskStatistics, QuantizationError
from quest_pl.callbacks.masks import pack_bits, persistence
from quest_pl.module import LMModule
from quest_pl.quant import QuantLinear, full_precision, quant_layers
from tests.conftest import compose, scalars

TINY = dict(vocab_size=256, n_layer=2, d_model=128, n_head=1, seq_len=32)
OPTIM = dict(lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1)


class Recorder:
    """Stands in for a Lightning logger."""

    def __init__(self):
        self.logged: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics, step):
        self.logged.setdefault(step, {}).update(metrics)


def fake_trainer(tmp_path, step=0):
    recorder = Recorder()
    return SimpleNamespace(
        global_step=step,
        world_size=1,
        strategy=SimpleNamespace(model=None),
        logger=recorder,
        loggers=[recorder],
        is_global_zero=True,
        default_root_dir=str(tmp_path),
    )


def module(quant=None, seed=0):
    torch.manual_seed(seed)
    return LMModule(TINY, OPTIM, quant=quant)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 32)
    return [(torch.randint(0, 256, shape, generator=g), torch.randint(0, 256, shape, generator=g)) for _ in range(n)]


def train_step(callbacks, trainer, pl_module, micro_batches):
    """One optimizer step's hooks as Lightning calls them (accumulating over ``micro_batches``)."""
    for i, batch in enumerate(micro_batches):
        for cb in callbacks:
            cb.on_train_batch_start(trainer, pl_module, batch, i)
        inputs, targets = batch
        (pl_module.loss_fn(pl_module(inputs), targets) / len(micro_batches)).backward()
    for cb in callbacks:
        cb.on_before_optimizer_step(trainer, pl_module, None)


def alignment(tmp_path, quant, micro_batches=1, **kw):
    pl_module, cb, trainer = module(quant), GradientAlignment(every_n_steps=1, **kw), fake_trainer(tmp_path)
    train_step([cb], trainer, pl_module, batches(micro_batches))
    return trainer.logger.logged[0]


def test_alignment_is_one_without_quantization(tmp_path):
    """bf16 config: no QuantLinear, so every linear of the blocks is measured; accumulated over two micro-batches
    (a measurement that used only the last micro-batch would not give 1)."""
    logged = alignment(tmp_path, None, micro_batches=2)
    cos = {k: v for k, v in logged.items() if "row_std" not in k}
    assert len([k for k in cos if k.startswith("align/cos/")]) == 8  # 2 blocks x (c_attn, c_proj, w12, c_proj)
    assert len([k for k in cos if k.startswith("align/act/cos/")]) == 8
    assert {"align/block/0", "align/block/1", "align/model"} <= set(cos)
    for tag, value in cos.items():
        assert value == pytest.approx(1.0, abs=1e-6), tag


def test_alignment_high_at_8_bits_and_lower_at_4(tmp_path):
    ste8 = alignment(tmp_path, dict(grid="gaussian_mse", bits=8, estimator="ste"))
    assert min(v for k, v in ste8.items() if k.startswith(("align/block/", "align/model"))) > 0.99
    # Per layer, mlp.c_proj is lowest (~0.987): its input silu(gate) * up is heavy-tailed, so the 8-bit grid clips
    # its outliers in the forward (which Hadamard would fix).
    assert min(v for k, v in ste8.items() if "/cos/" in k) > 0.98
    ste4 = alignment(tmp_path, dict(grid="gaussian_mse", bits=4, estimator="ste"))
    assert ste4["align/model"] < ste8["align/model"]
    for tag, value in ste4.items():
        assert -1.0 <= value <= 1.0 or "row_std" in tag, tag


def test_recomputed_quantized_gradient_equals_the_optimizers_in_fp32(tmp_path):
    quant = dict(grid="gaussian_mse", bits=4, estimator="trust")
    default = alignment(tmp_path, quant, micro_batches=2)
    recomputed = alignment(tmp_path, quant, micro_batches=2, recompute_quantized=True)
    assert recomputed.keys() == default.keys()
    for tag, value in default.items():
        assert recomputed[tag] == pytest.approx(value, abs=1e-9), tag


def test_measuring_leaves_training_untouched(tmp_path):
    quant = dict(grid="gaussian_mse", bits=4, estimator="trust", hadamard=True)
    pl_module, micro = module(quant), batches(2)
    callbacks = [GradientAlignment(every_n_steps=1), MaskStatistics(1, 1), QuantizationError(1)]
    reference = module(quant)
    train_step([], fake_trainer(tmp_path), reference, micro)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    train_step(callbacks, fake_trainer(tmp_path), pl_module, micro)
    assert torch.equal(torch.get_rng_state(), rng)
    for (name, p), q in zip(pl_module.named_parameters(), reference.parameters()):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad), name
    for layer in quant_layers(pl_module.model).values():
        assert layer.enabled and not layer._forward_pre_hooks and not layer._forward_hooks
        assert not layer.weight_quant.record_mask and layer.weight_quant.last_mask is None


def test_full_precision_context_restores_flags():
    pl_module = module(dict(grid="gaussian_mse", bits=4, estimator="trust"))
    layers = list(quant_layers(pl_module.model).values())
    layers[0].enabled = False
    with full_precision(pl_module.model):
        assert not any(layer.enabled for layer in layers)
    assert [layer.enabled for layer in layers] == [False] + [True] * (len(layers) - 1)


@pytest.mark.parametrize(("estimator", "bits"), [("trust", 4), ("trust", 2), ("clip", 1)])
def test_masked_fraction_of_gaussian_weights_matches_theory(tmp_path, estimator, bits):
    torch.manual_seed(0)
    layer = QuantLinear(
        1024,
        512,
        weight_quant=estimators.build(estimator, quantizer=quantizers.build("gaussian_mse", bits=bits)),
        act_quant=estimators.build(estimator, quantizer=quantizers.build("gaussian_mse", bits=bits)),
    )
    nn.init.normal_(layer.weight)
    pl_module = SimpleNamespace(model=nn.ModuleDict({"blocks": nn.ModuleList([nn.ModuleDict({"proj": layer})])}))
    cb, trainer = MaskStatistics(every_n_steps=1, persist_every=1), fake_trainer(tmp_path)
    x = torch.randn(256, 1024)
    cb.on_train_batch_start(trainer, pl_module, None, 0)
    layer(x).sum().backward()
    mask = layer.weight.grad != 0  # the estimator's gradient mask
    cb.on_before_optimizer_step(trainer, pl_module, None)
    logged = trainer.logger.logged[0]
    expected = layer.weight_quant.expected_masked_fraction()
    assert logged["mask/expected"] == pytest.approx(expected)
    n = layer.weight.numel()
    assert logged["mask/frac/blocks.0.proj/weight"] == pytest.approx(1 - mask.float().mean().item(), abs=0.5 / n)
    for op, numel in (("weight", n), ("act", x.numel())):
        sigma = math.sqrt(expected * (1 - expected) / numel)
        assert abs(logged[f"mask/frac/blocks.0.proj/{op}"] - expected) < 5 * sigma + 2e-3 * expected, op


def test_persistence_of_identical_and_disjoint_masks():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(37, 29, generator=g) < 0.1
    b = torch.rand(37, 29, generator=g) < 0.1
    packed = pack_bits(a)
    assert np.array_equal(packed.numpy(), np.packbits(a.flatten().numpy()))
    n = int(a.sum())
    assert persistence(packed, pack_bits(a)) == (n, n, n)
    assert persistence(packed, pack_bits(~a))[2] == 0
    assert persistence(packed, pack_bits(b)) == (n, int(b.sum()), int((a & b).sum()))


def test_persistence_logged_and_written(tmp_path):
    """Unchanged weights between snapshots: persistence and Jaccard 1; a disjoint mask: 0; counts in the CSV."""
    pl_module = module(dict(grid="gaussian_mse", bits=2, estimator="trust"))
    cb, micro = MaskStatistics(every_n_steps=1, persist_every=1), batches(1)
    logged = {}
    for step in range(2):
        trainer = fake_trainer(tmp_path, step)
        train_step([cb], trainer, pl_module, micro)
        logged.update(trainer.logger.logged[step])
    persist = {k: v for k, v in logged.items() if k.startswith(("mask/persist/", "mask/jaccard/"))}
    assert len(persist) == 16 and all(v == 1.0 for v in persist.values())
    cb.write_tables(trainer)
    rows = (tmp_path / "mask_persistence.csv").read_text().splitlines()
    assert rows[0] == "layer,old_step,new_step,n_old,n_new,overlap" and len(rows) == 1 + 8
    _, old, new, n_old, n_new, overlap = rows[1].split(",")
    assert (old, new) == ("0", "1") and int(n_old) == int(n_new) == int(overlap) > 0


def test_quantization_error_matches_gaussian_optimum(tmp_path):
    pl_module = module(dict(grid="gaussian_mse", bits=4, estimator="trust", hadamard=True))
    cb, trainer = QuantizationError(every_n_steps=1), fake_trainer(tmp_path)
    train_step([cb], trainer, pl_module, batches(1))
    logged = trainer.logger.logged[0]
    assert logged["quant/expected/weight"] == pytest.approx(0.01154288, rel=1e-4)
    relmse = [v for k, v in logged.items() if k.startswith("quant/relmse/")]
    assert len(relmse) == 16
    assert all(0.8 * 0.01154288 < v < 1.3 * 0.01154288 for v in relmse)  # Hadamard-rotated rows are near Gaussian


def test_off_steps_do_nothing(tmp_path):
    pl_module = module(dict(grid="gaussian_mse", bits=4, estimator="trust"))
    callbacks = [GradientAlignment(every_n_steps=10), MaskStatistics(10, 10), QuantizationError(10)]
    trainer = fake_trainer(tmp_path, step=3)
    train_step(callbacks, trainer, pl_module, batches(1))
    assert trainer.logger.logged == {}
    assert all(not layer._forward_pre_hooks for layer in quant_layers(pl_module.model).values())


@pytest.mark.slow
def test_smoke_diagnostics_and_identical_losses(tmp_path):
    """The smoke run logs every diagnostic and draws the figures; without callbacks its losses are identical."""
    from quest_pl.train import train

    common = ("experiment=smoke", "trainer.enable_progress_bar=false")
    on, off = tmp_path / "on", tmp_path / "off"
    train(compose(*common), on)
    train(compose(*common, "callbacks=none"), off)
    assert scalars(on, "train/loss") == scalars(off, "train/loss")
    assert len(scalars(on, "train/loss")) == 30

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(on / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for prefix, low in (("align/", -1.0), ("mask/frac/", 0.0), ("mask/persist/", 0.0), ("quant/relmse/", 0.0)):
        found = [t for t in tags if t.startswith(prefix)]
        assert found, prefix
        for tag in found:
            values = [e.value for e in acc.Scalars(tag)]
            assert all(math.isfinite(v) for v in values), tag
            if "row_std" not in tag and prefix != "quant/relmse/":
                assert all(low <= v <= 1.0 for v in values), tag
    assert "mask/expected" in tags and "align/model" in tags and "align/block/0" in tags
    names = ("alignment_by_depth", "masked_fraction", "mask_persistence")
    assert {f"figures/{n}" for n in names} <= set(acc.Tags()["images"])
    for name in names:
        assert (on / "figures" / f"{name}.png").stat().st_size > 0
    assert (on / "mask_persistence.csv").is_file() and (on / "alignment.csv").is_file()
    assert not (off / "figures").exists()


def test_quantization_error_logs_no_expectation_for_learned_scales(tmp_path):
    """A learned step or clip level has no RMS-scaled Gaussian optimum: ``quant/expected/*`` is not logged."""
    pl_module = module(dict(grid="gaussian_mse", bits=4, w_bits=4, a_bits=4, estimator="lsq"))
    cb, trainer = QuantizationError(every_n_steps=1), fake_trainer(tmp_path)
    train_step([cb], trainer, pl_module, batches(1))
    logged = trainer.logger.logged[0]
    assert any(k.startswith("quant/relmse/") for k in logged)
    assert not any(k.startswith("quant/expected") for k in logged)


def _bf16_train_step(callbacks, trainer, pl_module, micro_batches):
    """As train_step, with the training forward under CPU bf16 autocast (as bf16-mixed training): an fp32 recompute
    then gives other activations, and other masks, than the training forward."""
    for i, batch in enumerate(micro_batches):
        for cb in callbacks:
            cb.on_train_batch_start(trainer, pl_module, batch, i)
        inputs, targets = batch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = pl_module(inputs)
        (pl_module.loss_fn(logits, targets) / len(micro_batches)).backward()
    for cb in callbacks:
        cb.on_before_optimizer_step(trainer, pl_module, None)


@pytest.mark.parametrize("recompute", [False, True])
def test_diagnostics_on_the_same_step_do_not_contaminate_each_other(tmp_path, recompute):
    """With the alignment callback firing first on the same step (its full-precision and fp32 recompute forwards),
    the quantization error and the masks are those of the training forward alone."""
    quant = dict(grid="gaussian_mse", bits=4, estimator="trust")
    logged = []
    for with_alignment in (False, True):
        pl_module, trainer = module(quant), fake_trainer(tmp_path)
        callbacks = [MaskStatistics(1, 1), QuantizationError(1)]
        if with_alignment:
            callbacks.insert(0, GradientAlignment(every_n_steps=1, recompute_quantized=recompute))
        _bf16_train_step(callbacks, trainer, pl_module, batches(2))
        logged.append({k: v for k, v in trainer.logger.logged[0].items() if k.startswith(("quant/", "mask/"))})
    alone, together = logged
    assert any("/act" in k for k in alone) and set(alone) == set(together)
    for k, v in alone.items():
        assert together[k] == pytest.approx(v, rel=1e-9, abs=0), k


def test_rendered_pixels_are_the_saved_png(tmp_path):
    """``render`` draws once: the pixels it returns for TensorBoard are those of the PNG it wrote."""
    from matplotlib.image import imread

    from quest_pl.callbacks.figures import alignment_by_depth, render

    rows = [(step, "weight", f"blocks.{i}.mlp.w12", 0.5, 0.3 + 0.1 * i, 0.05) for step in (50, 100) for i in range(3)]
    path = tmp_path / "figures" / "alignment_by_depth.png"
    pixels = render(alignment_by_depth(rows), path)
    saved = np.round(imread(path)[..., :3] * 255).astype(np.uint8)
    assert pixels.dtype == np.uint8 and pixels.shape == saved.shape
    assert np.array_equal(pixels, saved)
