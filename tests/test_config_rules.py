"""The "key X needs Y" table (quest_pl.config.rules): every row fires when its key is set where nothing reads it, stays
quiet where something does, and no shipped config (every quant config, every experiment) trips any row."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from quest_pl.config import CONFIG_DIR
from quest_pl.config import compose as compose_config
from quest_pl.config import rules as config_rules
from tests.conftest import compose

# Per row: overrides that set the key where it does nothing, and overrides where the same setting acts.
EXAMPLES = {
    "quant.bits": (["quant=bf16", "quant.bits=4"], ["quant=quest_w4a4", "quant.bits=3"]),
    "quant.w_bits": (["quant=bf16", "quant.w_bits=4"], ["quant=quest_w4a4", "quant.w_bits=3"]),
    "quant.a_bits": (["quant=bf16", "quant.a_bits=4"], ["quant=quest_w4a4", "quant.a_bits=3"]),
    "quant.w_grid": (["quant=bf16", "quant.w_grid=uniform"], ["quant=quest_w4a4", "quant.w_grid=uniform"]),
    "quant.a_grid": (["quant=bf16", "quant.a_grid=uniform"], ["quant=quest_w4a4", "quant.a_grid=uniform"]),
    "quant.group_size": (["quant=bf16", "quant.group_size=32"], ["quant=quest_w4a4", "quant.group_size=32"]),
    "quant.scale_rule": (["quant=bf16", "quant.scale_rule=absmax"], ["quant=nvfp4", "quant.scale_rule=absmax"]),
    "quant.backward": (["quant=bf16", "quant.backward=sr"], ["quant=quest_w4a4", "quant.backward=sr"]),
    "quant.hadamard": (["quant=bf16", "quant.hadamard=true"], ["quant=uniform_w4a4", "quant.hadamard=true"]),
    "quant.backward_format": (
        ["quant=quest_w4a4", "quant.backward_format=mxfp4"],
        ["quant=quest_w4a4", "quant.backward=sr", "quant.backward_format=mxfp4"],
    ),
    "quant.backward_operands": (
        ["quant=quest_w4a4", "quant.backward_operands=all"],
        ["quant=quest_w4a4", "quant.backward=sr", "quant.backward_operands=all"],
    ),
    "quant.hadamard_mode": (
        ["quant=uniform_w4a4", "quant.hadamard=false", "quant.hadamard_mode=full"],
        ["quant=quest_w4a4", "quant.hadamard_mode=full"],
    ),
    "quant.trust": (["quant=ste_w4a4", "quant.trust=1.5"], ["quant=trust_w4a4", "quant.trust=1.5"]),
    "quant.clip_scale": (["quant=quest_w4a4", "quant.clip_scale=2"], ["quant=clip_w4a4", "quant.clip_scale=2"]),
    "quant.lsq_per_row": (["quant=quest_w4a4", "quant.lsq_per_row=true"], ["quant=lsq_w4a4", "quant.lsq_per_row=true"]),
    "quant.pact_grad_scale": (
        ["quant=quest_w4a4", "quant.pact_grad_scale=false"],
        ["quant=pact_w4a4", "quant.pact_grad_scale=false"],
    ),
    "quant.learned_init_steps": (
        ["quant=quest_w4a4", "quant.learned_init_steps=5"],
        ["quant=quest_w4a4", "quant.a_estimator=lsq", "quant.learned_init_steps=5"],
    ),
    "grad_comm.hook": (["grad_comm.hook=fp16"], ["grad_comm.hook=fp16", "trainer.strategy=ddp"]),
    "grad_comm.bits": (["grad_comm.bits=2"], ["grad_comm.hook=quantized", "trainer.strategy=ddp", "grad_comm.bits=2"]),
    "grad_comm.chunk": (
        ["grad_comm.chunk=64"],
        ["grad_comm.hook=correlated", "trainer.strategy=ddp", "grad_comm.chunk=64"],
    ),
    "grad_comm.marina_p": (
        ["grad_comm.marina_p=0.5"],
        ["grad_comm.hook=correlated", "trainer.strategy=ddp", "grad_comm.marina_p=0.5"],
    ),
    "eval.text_file": (["eval.text_file=a.txt"], ["eval.from=x.ckpt", "eval.text_file=a.txt"]),
    "eval.allow_quant_change": (["eval.allow_quant_change=true"], ["eval.from=x.ckpt", "eval.allow_quant_change=true"]),
    "eval.batch_size": (["eval.batch_size=4"], ["eval.text_file=a.txt", "eval.from=x.ckpt", "eval.batch_size=4"]),
    "ptq.act_grid": (["ptq.act_grid=uniform"], ["ptq.act_bits=4", "ptq.act_grid=uniform"]),
    "ptq.calib_batches": (["ptq.calib_batches=4"], ["ptq.method=aqlm", "ptq.calib_batches=4"]),
    "probe.quant": (["probe.quant=[quest_w4a4]"], ["probe.from=x.ckpt", "probe.quant=[quest_w4a4]"]),
    "probe.batches": (["probe.batches=2"], ["probe.from=x.ckpt", "probe.batches=2"]),
    "probe.device": (["probe.device=cpu"], ["probe.from=x.ckpt", "probe.device=cpu"]),
}


def test_every_row_has_an_example():
    assert {rule.key for rule in config_rules.RULES} == set(EXAMPLES)


@pytest.mark.parametrize("rule", config_rules.RULES, ids=[r.key for r in config_rules.RULES])
def test_row_fires_where_the_key_does_nothing_and_only_there(rule):
    idle, acting = EXAMPLES[rule.key]
    error = config_rules.violation(compose(*idle))
    assert error is not None and error.startswith(f"{rule.key}="), error
    assert config_rules.violation(compose(*acting)) is None
    # in one job of a sweep, a quantization key moves the quantized arms and leaves the BF16 arm alone
    assert (config_rules.violation(compose(*idle), sweep=True) is None) == rule.per_arm


def _shipped(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("quant", _shipped("quant"))
def test_every_quant_config_passes(quant):
    assert config_rules.violation(compose(f"quant={quant}")) is None


@pytest.mark.parametrize("experiment", _shipped("experiment"))
def test_every_experiment_passes(experiment):
    """Each arm of the sweep, as its job sees it: a quantized arm passes every row; the BF16 arm, which a sweep-wide
    ``quant.*`` setting leaves alone, the rows that hold in every job."""
    cfg = compose_config(f"experiment={experiment}", return_hydra_config=True)
    arms = str(OmegaConf.select(cfg, "hydra.sweeper.params.quant", default=None) or cfg.quant.name).split(",")
    for arm in map(str.strip, arms):
        job = compose(f"experiment={experiment}", f"quant={arm}")
        assert config_rules.violation(job, sweep=job.quant.grid is None) is None, arm


def _float_keys(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _float_keys(value, f"{prefix}{key}.")
        elif isinstance(value, float):
            yield f"{prefix}{key}"


def test_no_float_key_accepts_a_non_finite_value(tmp_path):
    """Every float key a default config holds (the ptq group checked as a ptq.from run does, grad_comm with a
    compressed hook): infinity and NaN are never a meaningful setting."""
    from quest_pl.config import ConfigError, validate

    ckpt = tmp_path / "a.ckpt"
    ckpt.write_bytes(b"")
    base = compose(
        "experiment=smoke", f"ptq.from={ckpt}", "ptq.method=aqlm", "grad_comm.hook=correlated", "trainer.strategy=ddp"
    )
    validate(base)
    keys = sorted(_float_keys(OmegaConf.to_container(base, resolve=False)))
    assert "ptq.aqlm.lr" in keys and "model.lr" in keys
    named = {"model.lr": "optim.lr"}  # optim.lr: ${model.lr}, checked where it is read
    for key in keys:
        for value in (float("inf"), float("-inf"), float("nan")):
            cfg = base.copy()
            OmegaConf.update(cfg, key, value)
            with pytest.raises(ConfigError, match=named.get(key, key).replace(".", r"\.")):
                validate(cfg)
