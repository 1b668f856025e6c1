"""The alignment probe (``python run.py probe.from=CKPT probe.quant=[...]``): every quantizer on the same weights and
batches; alignment 1 without quantization, near 1 at 8 bits; one-line errors for bad keys."""

import copy
import csv

import pytest
import torch

from tests.conftest import run_cli

TINY = dict(vocab_size=2048, n_layer=2, d_model=128, n_head=1, seq_len=32)
OPTIM = dict(lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, quant_lr_scale=1.0, quant_weight_decay=0.0)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as ``run.py`` sets (``OMP_NUM_THREADS=1``): on a few shared cores two spinning threads made
    these tests many times slower whenever another process was busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Lightning-format checkpoint of a tiny full-precision LMModule (random weights: the probe needs no training)."""
    from quest_pl.module import LMModule

    torch.manual_seed(0)
    module = LMModule(TINY, OPTIM)
    path = tmp_path_factory.mktemp("probe_ckpt") / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 0}, path)
    return path


def probe_cfg(ckpt, *quant, batches=2):
    from quest_pl.config import compose
    from quest_pl.sweep import register_resolvers

    register_resolvers()
    q = "[" + ",".join(quant) + "]"
    return compose(f"probe.from={ckpt}", f"probe.quant={q}", f"probe.batches={batches}", "model.seq_len=32",
                   "data.val_batch_size=2", "data.vocab_size=2048")  # fmt: skip


def test_probe_same_weights(tmp_path, checkpoint):
    from quest_pl.probe import run

    summaries = run(probe_cfg(checkpoint, "bf16", "quest_w8a8", "ste_w4a4", "quest_w4a4"), tmp_path)
    assert summaries["bf16"]["model_cos"] == pytest.approx(1.0, abs=1e-9)
    assert summaries["quest_w8a8"]["model_cos"] > 0.99  # METHOD.md §4.2: near 1 at 8 bits
    assert summaries["quest_w8a8"]["model_cos"] > summaries["quest_w4a4"]["model_cos"]
    assert summaries["ste_w4a4"]["mask_weight"] == 0.0 and 0 < summaries["quest_w4a4"]["mask_weight"] < 0.05
    with open(tmp_path / "probe.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 8  # 2 blocks x 4 linears, per quant config
    first = [r for r in rows if r["quant"] == "quest_w4a4"]
    assert [int(r["depth_from_top"]) for r in first] == list(range(7, -1, -1))  # forward order, top = 0
    assert all(-1 <= float(r["row_mean"]) <= 1 and float(r["row_std"]) >= 0 for r in rows)
    assert "| quest_w4a4 |" in (tmp_path / "probe.md").read_text()
    for ext in ("pdf", "png"):
        assert (tmp_path / f"probe_alignment.{ext}").stat().st_size > 1000


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("probe.quant=[nope_w4a4]",), "probe.quant: 'nope_w4a4' is not a quant config"),
        (("probe.batches=0",), "probe.batches=0: expected an integer >= 1"),
        (("probe.device=tpu",), "probe.device='tpu'"),
    ],
)
def test_probe_config_errors(checkpoint, overrides, message):
    from quest_pl.config import ConfigError, compose
    from quest_pl.probe import check

    cfg = compose(f"probe.from={checkpoint}", *overrides)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        check(cfg)


def test_probe_bad_checkpoint_writes_nothing(tmp_path):
    from quest_pl.config import ConfigError
    from quest_pl.probe import run

    with pytest.raises(ConfigError, match=r"^probe.from='/nonexistent.ckpt': "):
        run(probe_cfg("/nonexistent.ckpt", "quest_w4a4"), tmp_path)
    assert not list(tmp_path.iterdir())


def test_full_precision_gradient_shared_only_where_the_function_is_the_same(checkpoint):
    """probe.run computes the full-precision gradient once per full_precision_key: a W4A4 model bypassed is the plain
    model (same gradient, bit for bit), a weight-only half-Hadamard one is x (W H)^T (its own key)."""
    from quest_pl.model import LlamaConfig
    from quest_pl.probe import _gradients, full_precision_key, quant_group
    from quest_pl.ptq import load_checkpoint, module_from_checkpoint
    from quest_pl.quant import QuantConfig, full_precision, quantize_model

    fp = module_from_checkpoint(load_checkpoint(checkpoint), checkpoint).float()
    torch.manual_seed(1)
    batch = [(torch.randint(0, TINY["vocab_size"], (2, 32)), torch.randint(0, TINY["vocab_size"], (2, 32)))]
    plain = _gradients(fp.model, batch, "cpu", fp.loss_fn)
    keys = {}
    for name in ("quest_w4a4", "ste_w4a4", "quest_w4a16"):
        model = copy.deepcopy(fp.model)
        quantize_model(model, QuantConfig.from_cfg(quant_group(name), LlamaConfig(**TINY)))
        keys[name] = full_precision_key(model)
        with full_precision(model):
            g = _gradients(model, batch, "cpu", fp.loss_fn)
        same = all(torch.equal(g[k], plain[k]) for k in plain)
        assert same == (keys[name] == ()), name
    assert keys["quest_w4a4"] == keys["ste_w4a4"] == () and len(keys["quest_w4a16"]) == 8


@pytest.mark.slow
def test_probe_command_line(tmp_path, checkpoint):
    out = run_cli(f"probe.from={checkpoint}", "probe.quant=[quest_w4a4]", "probe.batches=1",
                  "model.seq_len=32", "data.vocab_size=2048", f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| quest_w4a4 |" in out.stdout and (tmp_path / "probe.csv").is_file()


@pytest.mark.parametrize("name", ["bf16", "quest_w4a4", "lsq_w4a4", "quest_w1a16"])
def test_quant_group_matches_hydra_composition(name):
    from omegaconf import OmegaConf

    from quest_pl.config import compose
    from quest_pl.probe import quant_group

    assert quant_group(name) == OmegaConf.to_container(compose(f"quant={name}").quant, resolve=True)
