"""Data-free PTQ (quest_pl.ptq): weights are exactly the grid applied to the (rotated) checkpoint weights, 8-bit PTQ
barely moves the loss, the Hadamard helps at 4 bits, the command line works and fails clearly."""

import json
import math

import pytest
import torch

from tests.conftest import compose, run_cli, scalars

TINY = ("experiment=smoke", "quant=bf16", "trainer.enable_progress_bar=false", "callbacks=none")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BF16 model trained briefly (smoke size, 120 steps), with its run config beside the checkpoint as a
    Hydra run leaves it."""
    from omegaconf import OmegaConf

    from quest_pl.train import train

    run_dir = tmp_path_factory.mktemp("bf16_run")
    cfg = compose(*TINY, "trainer.max_steps=120", "trainer.val_check_interval=120", "trainer.log_every_n_steps=20")
    metrics = train(cfg, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run_dir, metrics


def ptq_eval(trained, tmp_path, **kw):
    from omegaconf import OmegaConf

    from quest_pl.ptq import PTQConfig, evaluate

    run_dir, _ = trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    return evaluate(ckpt, PTQConfig(**kw), OmegaConf.load(run_dir / ".hydra" / "config.yaml"), tmp_path,
                    tensorboard=False)  # fmt: skip


@pytest.mark.parametrize("grid,bits,hadamard,group", [
    ("gaussian_mse", 4, True, None), ("gaussian_mse", 2, False, None), ("lloyd_max", 3, True, None),
    ("fp4", 4, True, 128), ("int_sparse24", 4, True, None), ("uniform", 8, False, 128), ("gaussian_mse", 4, True, 32),
])  # fmt: skip
def test_weights_match_quantizer_on_rotated_checkpoint(trained, grid, bits, hadamard, group):
    from quest_pl import quantizers
    from quest_pl.ptq import PTQConfig, PTQLinear, load_checkpoint, module_from_checkpoint, quantize_model_ptq

    ckpt_path = trained[0] / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(ckpt_path)
    module = module_from_checkpoint(ckpt, ckpt_path)
    quantize_model_ptq(module.model, PTQConfig(grid=grid, bits=bits, hadamard=hadamard, group_size=group))
    q = quantizers.build(grid, bits=bits)
    layers = {n: m for n, m in module.model.named_modules() if isinstance(m, PTQLinear)}
    assert len(layers) == 4 * len(module.model.blocks)
    for name, layer in layers.items():
        w = ckpt["state_dict"][f"model.{name}.weight"]
        w = quantizers.hadamard_transform(w) if hadamard else w
        expected = q(w) if group is None else q(w.reshape(w.shape[0], -1, group)).reshape(w.shape)
        assert torch.equal(layer.weight, expected), name
        assert layer.hadamard is hadamard


def test_ptq_loss_8bit_and_hadamard_4bit(trained, tmp_path):
    _, metrics = trained
    base = metrics["val/loss"]
    w8 = ptq_eval(trained, tmp_path / "w8", grid="gaussian_mse", bits=8, hadamard=True)["val/loss"]
    w8a8 = ptq_eval(trained, tmp_path / "w8a8", grid="gaussian_mse", bits=8, hadamard=True, act_bits=8)["val/loss"]
    # W4A4: the rotation spreads the activations' outlier features (on a briefly trained model the weights are still
    # near-Gaussian rows, so weight-only 4-bit PTQ is within noise either way).
    had = ptq_eval(trained, tmp_path / "had", grid="gaussian_mse", bits=4, act_bits=4, hadamard=True)["val/loss"]
    plain = ptq_eval(trained, tmp_path / "plain", grid="gaussian_mse", bits=4, act_bits=4, hadamard=False)["val/loss"]
    print(f"\nPTQ on the tiny BF16 model: bf16 {base:.4f}  W8A16 {w8:.4f}  W8A8 {w8a8:.4f}  "
          f"W4A4 Hadamard {had:.4f}  W4A4 no Hadamard {plain:.4f}")  # fmt: skip
    assert abs(w8 - base) < 0.01 * base and abs(w8a8 - base) < 0.01 * base
    assert had <= plain


def test_rotation_alone_preserves_the_model(trained):
    """PTQLinear's half form without a grid, y = (x H) (W H)^T, is the trained layer (H orthogonal)."""
    from quest_pl.ptq import PTQLinear, load_checkpoint, module_from_checkpoint

    ckpt_path = trained[0] / "checkpoints" / "last.ckpt"
    module = module_from_checkpoint(load_checkpoint(ckpt_path), ckpt_path)
    idx = torch.randint(0, 2048, (2, 16))
    ref = module.model(idx)
    from quest_pl import quantizers

    for block in module.model.blocks:
        for name, m in list(block.named_modules()):
            if type(m) is torch.nn.Linear:
                parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
                rotated = quantizers.hadamard_transform(m.weight.detach())
                setattr(parent, name.rsplit(".", 1)[-1], PTQLinear(rotated, m.bias, True, None))
    torch.testing.assert_close(module.model(idx), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_cli_ptq_logs_like_a_run(trained, tmp_path):
    ckpt = trained[0] / "checkpoints" / "last.ckpt"
    out = run_cli(f"ptq.from={ckpt}", "ptq.bits=4", "ptq.act_bits=4", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-5)
    assert scalars(tmp_path, "val/loss") == {120: pytest.approx(metrics["val/loss"])}
    assert "final val/loss=" in out.stdout


def test_ptq_errors_are_one_line(trained, tmp_path):
    from quest_pl.config import ConfigError
    from quest_pl.ptq import run

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    ckpt = trained[0] / "checkpoints" / "last.ckpt"
    cases = {
        (f"ptq.from={bad}",): "ptq.from=.*not a readable checkpoint",
        (f"ptq.from={foreign}",): "ptq.from=.*not a QuEST-PL checkpoint",
        (f"ptq.from={ckpt}", "ptq.grid=nope"): "ptq.grid='nope': unknown grid",
        (f"ptq.from={ckpt}", "ptq.grid=fp4", "ptq.bits=3"): "ptq.bits=3 with grid 'fp4'",
        (f"ptq.from={ckpt}", "ptq.group_size=100"): "ptq.group_size=100",
    }
    for args, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            run(compose(*args), tmp_path / "run")


def test_ptq_group_sizes_include_those_of_qat():
    """ptq.group_size takes the group sizes quant.group_size takes (powers of two, e.g. the format ablation's 32), and
    multiples of the Hadamard block."""
    from omegaconf import OmegaConf

    from quest_pl.config import CONFIG_DIR, ConfigError
    from quest_pl.ptq import PTQConfig

    base = OmegaConf.load(CONFIG_DIR / "ptq" / "default.yaml")
    for g in (16, 32, 64, 128, 384):
        assert PTQConfig.from_cfg(OmegaConf.merge(base, {"group_size": g})).group_size == g
    for g in (0, 24, 100):
        with pytest.raises(ConfigError, match=f"ptq.group_size={g}: expected"):
            PTQConfig.from_cfg(OmegaConf.merge(base, {"group_size": g}))


def test_cli_ptq_missing_checkpoint(tmp_path):
    out = run_cli(f"ptq.from={tmp_path / 'missing.ckpt'}", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: ptq.from=") and "no such file" in out.stderr


def test_incompatible_checkpoint_is_one_line(trained, tmp_path):
    from quest_pl.config import ConfigError
    from quest_pl.ptq import load_checkpoint, module_from_checkpoint

    ckpt = load_checkpoint(trained[0] / "checkpoints" / "last.ckpt")
    ckpt["hyper_parameters"]["model"]["d_model"] = 256
    with pytest.raises(ConfigError, match="incompatible checkpoint"):
        module_from_checkpoint(ckpt, "x.ckpt")


def test_aqlm_evaluates_like_the_other_arms(trained, tmp_path):
    """ptq.method=aqlm (a short schedule) on the trained tiny model: metrics.json as the scalar arms, plus the bits per
    weight with codebooks and scales and the calibration size; its loss is below the data-free scalar grid at 2 bits."""
    from quest_pl.ptq import AQLMSettings

    fast = AQLMSettings(rounds=1, adam_steps=20, kmeans_iters=3)
    metrics = ptq_eval(trained, tmp_path / "aqlm", method="aqlm", bits=2, calib_batches=2, aqlm=fast)
    scalar = ptq_eval(trained, tmp_path / "scalar", grid="gaussian_mse", bits=2)["val/loss"]
    print(f"\nPTQ at 2 bits on the tiny BF16 model: gaussian_mse {scalar:.4f}  AQLM 2x8 {metrics['val/loss']:.4f} "
          f"({metrics['aqlm']['bits_per_weight']:.2f} bits/weight with codebooks and scales)")  # fmt: skip
    saved = json.loads((tmp_path / "aqlm" / "metrics.json").read_text())
    assert saved["ptq"]["method"] == "aqlm" and saved["ptq"]["codebook_bits"] == 8
    assert saved["aqlm"]["code_bits_per_weight"] == 2 and saved["aqlm"]["calib_tokens"] == 2 * 8 * 64  # smoke batches
    assert len(saved["aqlm"]["layers"]) == 4
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-5)
    assert metrics["val/loss"] < scalar


# ---- formats: the same grids as the QAT arms ------------------------------------------------------------------------
FORMAT_ARMS = ("bf16", "quest_w4a4", "int4_g32", "mxfp4", "nvfp4", "nvfp4_4over6", "nvfp4_4over6_bwd_sr")


def arm_rows(*arms, experiment="format_ablation"):
    """Report-like rows (method, resolved ``_quant``) of arms as the format ablation composes them."""
    from omegaconf import OmegaConf

    from quest_pl.report import describe_quant

    rows = []
    for arm in arms:
        cfg = compose(*([f"experiment={experiment}"] if experiment else []), f"quant={arm}")
        q = OmegaConf.to_container(cfg.quant, resolve=True)
        rows.append({"arm": arm, "_quant": q, **describe_quant(q)})
    return rows


def test_sweep_configs_one_row_per_format_of_the_format_ablation():
    """Every quantized arm of experiment=format_ablation gets PTQ at its own format (grid, bits, group size of both
    operands, scale rule, Hadamard block), W4A4 and weight-only, whose grids are the arm's own (QuantConfig's); an arm
    that differs only in its backward (or its estimator) shares the row of its forward format."""
    from quest_pl.ptq import sweep_configs
    from quest_pl.quant import QuantConfig

    rows = arm_rows(*FORMAT_ARMS)
    configs = sweep_configs(rows)
    expected = {  # arm -> (PTQ W4A4 name, grid, group size, scale rule, Hadamard block), from experiments/quant/*.yaml
        "quest_w4a4": ("ptq_gaussian_mse_w4a4", "gaussian_mse", None, None, 128),
        "int4_g32": ("ptq_gaussian_mse_g32_w4a4", "gaussian_mse", 32, None, 128),
        "mxfp4": ("ptq_mxfp4_h32_w4a4", "mxfp4", None, None, 32),  # absmax: the format's default rule
        "nvfp4": ("ptq_nvfp4_h16_w4a4", "nvfp4", None, None, 16),
        "nvfp4_4over6": ("ptq_nvfp4_4over6_h16_w4a4", "nvfp4", None, "four_over_six", 16),
    }
    names = [n for name, *_ in expected.values() for n in (name, name.replace("w4a4", "w4a16"))]
    assert [c.name for c in configs] == names
    by_name = {c.name: c for c in configs}
    for r in rows[1:]:
        name, grid, group, rule, block = expected[r["arm"].replace("_bwd_sr", "")]
        both, weight_only = by_name[name], by_name[name.replace("w4a4", "w4a16")]
        assert (both.grid, both.bits, both.act_bits, both.act_grid, both.hadamard) == (grid, 4, 4, None, True)
        assert (both.group_size, both.act_group_size, both.scale_rule) == (group, group, rule)
        assert both.hadamard_block == block
        assert weight_only.settings() == {**both.settings(), "act_bits": None, "act_group_size": None}
        qat = QuantConfig.from_cfg(r["_quant"], None)
        w, a = both.build_quantizers()
        assert qat.hadamard_block == both.hadamard_block
        assert (repr(w), repr(a)) == (repr(qat.weight.build_grid()), repr(qat.act.build_grid())), r["arm"]
        assert w.group_size == (group or {"mxfp4": 32, "nvfp4": 16}.get(grid))
    # the straight-through arm at QuEST's format (estimator only) adds no PTQ row
    assert sweep_configs([*rows[:2], *arm_rows("ste_hadamard_w4a4", experiment=None)]) == configs[:2]


@pytest.mark.parametrize("arm", ["nvfp4_4over6", "nvfp4", "mxfp4", "int4_g32"])
def test_ptq_weights_and_outputs_are_those_of_the_qat_arm(trained, arm):
    """A PTQ'd model at an arm's format holds, in every block linear, exactly quantizers.build(grid, bits, group_size,
    scale_rule)(W H_B) (H_B: the arm's block Hadamard); and each layer's output equals that of the arm's QuantLinear
    (the QAT forward) at the same weights on the same input, to the bit."""
    import copy

    from quest_pl import quantizers
    from quest_pl.ptq import PTQLinear, load_checkpoint, module_from_checkpoint, quantize_model_ptq, sweep_configs
    from quest_pl.quant import QuantConfig, quant_layers, quantize_model

    ckpt_path = trained[0] / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(ckpt_path)
    module = module_from_checkpoint(ckpt, ckpt_path)
    (row,) = arm_rows(arm)
    q = row["_quant"]
    ptq = sweep_configs([row])[0]  # the W4A4 row
    qat_model = quantize_model(copy.deepcopy(module.model), QuantConfig.from_cfg(q, None))
    quantize_model_ptq(module.model, ptq)
    layers = {n: m for n, m in module.model.named_modules() if isinstance(m, PTQLinear)}
    qat_layers = quant_layers(qat_model)
    assert len(layers) == 4 * len(module.model.blocks) and set(layers) == set(qat_layers)
    rule = {} if q["scale_rule"] is None else {"scale_rule": q["scale_rule"]}
    grid = quantizers.build(q["grid"], bits=q["bits"], group_size=q["group_size"], **rule)
    torch.manual_seed(0)
    for name, layer in layers.items():
        w = ckpt["state_dict"][f"model.{name}.weight"]
        assert torch.equal(layer.weight, grid(quantizers.hadamard_transform(w, q["hadamard_block"]))), name
        assert layer.hadamard_block == q["hadamard_block"]
        x = torch.randn(2, 8, layer.weight.shape[1])
        with torch.no_grad():
            assert torch.equal(layer(x), qat_layers[name](x)), name


def test_standalone_ptq_keys_reach_every_arm_format_and_fail_in_one_line():
    """ptq.scale_rule, ptq.act_group_size and ptq.hadamard_block (experiments/ptq/default.yaml) give a standalone PTQ
    run any arm's format, the same setting as the sweep's row; bad values are one-line errors naming key, value and
    what is allowed."""
    from omegaconf import OmegaConf

    from quest_pl.config import CONFIG_DIR, ConfigError
    from quest_pl.ptq import PTQConfig, sweep_configs

    base = OmegaConf.load(CONFIG_DIR / "ptq" / "default.yaml")
    assert (base.scale_rule, base.act_group_size, base.hadamard_block) == (None, None, 128)
    nv = PTQConfig.from_cfg(OmegaConf.merge(base, dict(grid="nvfp4", scale_rule="four_over_six", hadamard_block=16,
                                                       act_bits=4)))  # fmt: skip
    g32 = PTQConfig.from_cfg(OmegaConf.merge(base, dict(group_size=32, act_bits=4, act_group_size=32)))
    assert [nv, g32] == [sweep_configs(arm_rows(a))[0] for a in ("nvfp4_4over6", "int4_g32")]
    assert PTQConfig.from_cfg(OmegaConf.merge(base, dict(act_bits=4, act_group_size=64))).name == (
        "ptq_gaussian_mse_ag64_w4a4"
    )
    cases = {
        (("grid", "nvfp4"), ("scale_rule", "nope")): (
            "ptq.scale_rule='nope' with grid 'nvfp4': expected null or one of absmax, four_over_six, gaussian"
        ),
        (("scale_rule", "four_over_six"),): (
            "ptq.scale_rule='four_over_six' with grid 'gaussian_mse': expected null (the grid has no scale rule)"
        ),
        (("act_bits", 4), ("act_group_size", 24)): "ptq.act_group_size=24: expected null (one scale per token) or a",
        (("act_group_size", 32),): "ptq.act_group_size=32: expected null while ptq.act_bits is null",
        (("hadamard_block", 8),): "ptq.hadamard_block=8: expected one of 16, 32, 64, 128",
        (("grid", "nvfp4"), ("act_bits", 4), ("act_group_size", 32)): (
            "ptq.act_group_size=32 with grid 'nvfp4': grid 'nvfp4' has groups of 16 by its spec"
        ),
        (("grid", "mxfp4"), ("group_size", 384)): "ptq.group_size=384 with grid 'mxfp4': the format has groups of 32",
        (("method", "aqlm"), ("bits", 2), ("hadamard_block", 16)): "ptq.hadamard_block=16: ptq.method=aqlm",
    }
    for items, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
            PTQConfig.from_cfg(OmegaConf.merge(base, dict(items)))
        assert "\n" not in str(e.value)
