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
        elif experiment == "scaling_law":  # steps from the token budget of each ladder size (tests/test_scaling_cli.py)
            assert (cfg.model.d_model, cfg.scale.tokens_per_param) == (128, 0.5)
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


def sweep_seeds(*overrides: str) -> str:
    """The ``seed`` choice list an experiment's sweeper gets (the resolver Hydra's sweeper instantiation runs)."""
    return compose_hydra(*overrides).hydra.sweeper.params.seed


def test_every_experiment_sweeps_seeds():
    for experiment in EXPERIMENTS:
        assert sweep_seeds(f"experiment={experiment}") == "0", experiment  # CPU default: one seed
        assert sweep_seeds(f"experiment={experiment}", "seeds=[0,1,2]") == "0,1,2"
        assert sweep_seeds(f"experiment={experiment}", "+scale=gpu_30m") == "0,1,2"  # GPU default: three seeds
    from omegaconf import OmegaConf

    sweep = OmegaConf.to_container(compose_hydra("experiment=estimator_ablation").hydra.sweep)
    assert sweep["subdir"].startswith("${sweep_job_dir:${hydra.sweep.dir},${hydra.job.num},${run_name},${seed},")


@pytest.mark.parametrize("seeds", ["[]", "[0,0]", "[a]"])
def test_bad_seeds_are_one_line_errors(seeds):
    from quest_pl.sweep import seed_list

    with pytest.raises(ValueError, match=r"seeds=.*: expected"):
        seed_list([] if seeds == "[]" else [0, 0] if seeds == "[0,0]" else ["a"])


def test_arms_are_paired_by_seed():
    """Same seed: every arm starts from the same latent weights (quantizers add no draw before the model's init) and
    reads the same batches; another seed changes both."""
    import lightning as L
    import torch

    from quest_pl.train import build_datamodule, build_module

    def start(quant: str, seed: int):
        cfg = compose_hydra("experiment=estimator_ablation", f"quant={quant}", f"seed={seed}")
        L.seed_everything(cfg.seed, verbose=False)
        dm = build_datamodule(cfg)
        dm.prepare_data()
        dm.setup("fit")
        module = build_module(cfg, dm.vocab_size)
        weights = {k: v for k, v in module.model.state_dict().items() if k.endswith("weight") and "_quant" not in k}
        return weights, next(iter(dm.train_dataloader()))[0]

    base, base_batch = start("bf16", 0)
    for quant, seed in (("quest_w4a4", 0), ("lsq_w4a4", 0), ("bf16", 1)):
        weights, batch = start(quant, seed)
        same = all(torch.equal(base[k], weights[k]) for k in base) and torch.equal(base_batch, batch)
        assert same == (seed == 0), (quant, seed)


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
    assert (tmp_path / "0_bf16_s0" / "metrics.json").is_file()
    assert (tmp_path / "1_quest_w4a4_s0" / "metrics.json").is_file()
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
    assert q["verdict"] == "1 pair: pipeline check"
    for name in ("loss_curves", "delta_bf16", "alignment_by_depth", "masked_fraction"):
        for ext in ("pdf", "png"):
            assert (tmp_path / f"{name}.{ext}").stat().st_size > 1000, name
