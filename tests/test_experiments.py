"""Every experiment config composes for every arm (CPU size and ``+scale=gpu_30m``), arms have distinct readable names,
a ``quant.bits`` override moves every quantized arm, and one real multirun ends with its report."""

import csv

import pytest

from tests.conftest import ROOT, run_cli

EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments" / "experiment").glob("*.yaml") if p.stem != "smoke")


def compose_hydra(*overrides: str):
    from quest_pl.config import compose
    from quest_pl.sweep import register_resolvers

    register_resolvers()
    return compose(*overrides, return_hydra_config=True)


def sweep_arms(experiment: str) -> list[str]:
    from hydra.types import RunMode

    cfg = compose_hydra(f"experiment={experiment}")
    assert cfg.hydra.mode == RunMode.MULTIRUN, experiment  # one command, no -m
    assert "report" in cfg.hydra.callbacks
    return cfg.hydra.sweeper.params.quant.split(",")


def check_arm(cfg) -> None:
    """What ``train`` checks before any work (config keys, quantizer construction, Hadamard widths)."""
    from quest_pl.config import validate
    from quest_pl.model import LlamaConfig
    from quest_pl.quant import QuantConfig

    validate(cfg)
    m = cfg.model
    QuantConfig.from_cfg(cfg.quant, LlamaConfig(n_layer=m.n_layer, d_model=m.d_model, n_head=m.n_head))


def test_experiments_exist():
    assert {"estimator_ablation", "quantizer_ablation", "bits_sweep", "hadamard_ablation", "baselines"} <= set(
        EXPERIMENTS
    )


@pytest.mark.parametrize("scale", [None, "gpu_30m"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_arm_composes(experiment, scale):
    extra = [f"+scale={scale}"] if scale else []
    names = []
    for arm in sweep_arms(experiment):
        cfg = compose_hydra(f"experiment={experiment}", f"quant={arm}", *extra)
        check_arm(cfg)
        names.append(cfg.run_name)
        if scale == "gpu_30m":
            assert (cfg.model.d_model, cfg.trainer.precision, cfg.compile) == (640, "bf16-mixed", True)
            assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * cfg.model.seq_len == 262_144
        else:
            assert (cfg.model.n_layer, cfg.model.d_model, cfg.trainer.max_steps) == (2, 128, 400)
    assert len(set(names)) == len(names), names
    assert "bf16" in names


def test_estimator_ablation_arms():
    assert sweep_arms("estimator_ablation") == [
        "bf16", "ste_w4a4", "clip_w4a4", "trust_w4a4", "quest_w4a4", "lsq_w4a4", "pact_w4a4"
    ]  # fmt: skip
    estimators, hadamard = {}, {}
    for arm in sweep_arms("estimator_ablation")[1:]:
        q = compose_hydra("experiment=estimator_ablation", f"quant={arm}").quant
        assert (q.grid, q.w_bits, q.a_bits) == ("gaussian_mse", 4, 4), arm
        estimators[arm], hadamard[arm] = q.estimator, q.hadamard
    assert estimators == {
        "ste_w4a4": "ste", "clip_w4a4": "clip", "trust_w4a4": "trust", "quest_w4a4": "trust", "lsq_w4a4": "lsq",
        "pact_w4a4": "pact",
    }  # fmt: skip
    assert [arm for arm, h in hadamard.items() if h] == ["quest_w4a4"]


def test_bits_override_moves_every_quantized_arm():
    for arm in sweep_arms("estimator_ablation"):
        cfg = compose_hydra("experiment=estimator_ablation", f"quant={arm}", "quant.bits=2")
        check_arm(cfg)
        if arm == "bf16":
            assert cfg.run_name == "bf16" and cfg.quant.grid is None
        else:
            assert (cfg.quant.w_bits, cfg.quant.a_bits) == (2, 2)
            assert cfg.run_name == arm.replace("w4a4", "w2a2")


def test_quantizer_ablation_uses_quest_estimator_and_hadamard():
    for arm in sweep_arms("quantizer_ablation")[1:]:
        q = compose_hydra("experiment=quantizer_ablation", f"quant={arm}").quant
        assert (q.estimator, q.hadamard) == ("trust", True), arm
    grids = {
        compose_hydra("experiment=quantizer_ablation", f"quant={a}").quant.grid
        for a in sweep_arms("quantizer_ablation")
    }
    assert grids == {None, "gaussian_mse", "uniform", "lloyd_max", "fp4"}  # int_sparse24 is a w_grid


def test_bits_sweep_one_bit_uses_clip_1_3():
    names = {}
    for arm in sweep_arms("bits_sweep"):
        cfg = compose_hydra("experiment=bits_sweep", f"quant={arm}")
        names[cfg.run_name] = cfg.quant
    for bits in (1, 2, 3, 4, 8):
        assert f"quest_w{bits}a{bits}" in names and f"quest_w{bits}a16" in names
    for name in ("quest_w1a1", "quest_w1a16"):
        assert (names[name].estimator, names[name].clip_scale) == ("clip", 1.3)


def test_arm_name():
    from quest_pl.sweep import quant_arm_name as arm_name

    assert arm_name("bf16", None, 4, 4) == "bf16"
    assert arm_name("quest_w4a4", "gaussian_mse", 3, 3) == "quest_w3a3"
    assert arm_name("quest_w4a16", "gaussian_mse", 2, None) == "quest_w2a16"
    assert arm_name("fp4", "fp4", 4, 4) == "fp4_w4a4"
    assert arm_name("ternary", "ternary", 1.585, 1.585) == "ternary_w1.585a1.585"


@pytest.mark.slow
def test_multirun_end_to_end_writes_report(tmp_path):
    """A two-arm sweep of a real experiment for a few steps: job dirs named by arm, summary with the PTQ rows of
    the BF16 arm, and plots."""
    out = run_cli(
        "experiment=baselines",
        "quant=bf16,quest_w4a4",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "data.val_batches=2",
        "callbacks.grad_alignment.every_n_steps=2",
        "callbacks.mask_stats.every_n_steps=2",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "0_bf16" / "metrics.json").is_file() and (tmp_path / "1_quest_w4a4" / "metrics.json").is_file()
    with open(tmp_path / "summary.csv") as f:
        rows = {r["arm"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["bf16", "quest_w4a4", "ptq_gaussian_mse_w4a4", "ptq_gaussian_mse_w4a16"]
    assert (rows["ptq_gaussian_mse_w4a4"]["method"], rows["ptq_gaussian_mse_w4a16"]["bits"]) == ("PTQ", "W4A16")
    assert float(rows["bf16"]["delta_bf16"]) == 0.0
    q = rows["quest_w4a4"]
    assert (q["grid"], q["bits"], q["estimator"], q["hadamard"]) == ("gaussian_mse", "W4A4", "trust", "half")
    assert q["align_mean"] and q["mask_frac"] and float(q["val_loss"]) > 0
    assert "quest_w4a4" in (tmp_path / "summary.md").read_text()
    assert "Sweep summary" in out.stdout and "quest_w4a4" in out.stdout
    for png in ("val_loss.png", "alignment_by_depth.png", "masked_fraction.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
