"""Lightning-Hydra conventions: the Trainer and loggers are instantiated from their groups' ``_target_`` (any Trainer
argument passes through), ``logger=tensorboard|csv|wandb|many``, ``debug=fast_dev_run|overfit|profile``; and the
console and ``run.log`` hold each line once, without promotional tips."""

import pytest

from tests.conftest import compose

TINY = ("experiment=smoke", "quant=bf16", "callbacks=none", "trainer.enable_progress_bar=false")


def build(tmp_path, *overrides):
    from quest_pl.config import validate
    from quest_pl.train import build_loggers, build_trainer

    cfg = compose(*TINY, *overrides)
    validate(cfg)
    return build_trainer(cfg, tmp_path, build_loggers(cfg, tmp_path), [])


def test_any_trainer_argument_passes_through(tmp_path):
    trainer = build(tmp_path, "+trainer.limit_val_batches=2", "+trainer.detect_anomaly=true")
    assert trainer.limit_val_batches == 2
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    io = trainer.strategy.checkpoint_io
    assert isinstance(io, TorchCheckpointIO) and type(io).__name__ == "AtomicCheckpointIO"
    assert trainer.precision == "32-true"  # precision null: 32-true on CPU


@pytest.mark.parametrize(
    ("debug", "check"),
    [
        ("overfit", lambda t: t.overfit_batches == 4),
        ("profile", lambda t: type(t.profiler).__name__ == "SimpleProfiler"),
    ],
)
def test_debug_configs_build(tmp_path, debug, check):
    assert check(build(tmp_path, f"debug={debug}"))


def test_fast_dev_run_trains_one_step(tmp_path):
    from quest_pl.train import train

    metrics = train(compose(*TINY, "debug=fast_dev_run"), tmp_path)
    assert metrics["status"] == "ok" and metrics["step"] == 1


def test_loggers_from_the_group(tmp_path):
    """The group's loggers, then the run's own metrics log (always, last: ``trainer.logger`` is the group's first)."""
    names = lambda *o: [type(x).__name__ for x in build(tmp_path, *o).loggers]
    assert names() == ["TensorBoardLogger", "MetricsLog"]
    assert names("logger=csv") == ["CSVLogger", "MetricsLog"]
    assert sorted(names("logger=many")[:2]) == ["CSVLogger", "TensorBoardLogger"] and names("logger=many")[2:] == [
        "MetricsLog"
    ]
    assert names("~logger") == ["MetricsLog"]


def test_csv_logger_run(tmp_path):
    from quest_pl.train import train

    train(compose(*TINY, "logger=csv", "trainer.max_steps=2", "trainer.val_check_interval=2"), tmp_path)
    text = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/loss" in text and "val/loss" in text
    assert not (tmp_path / "tensorboard").exists()
    from quest_pl.callbacks.metrics_log import read_metrics_log

    assert {"train/loss", "val/loss"} <= set(read_metrics_log(tmp_path))  # the run's own log, whatever the logger


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from quest_pl.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(compose(*TINY, "logger=wandb", "logger.wandb.offline=true", "trainer.max_steps=2"), tmp_path)
    assert (tmp_path / "wandb").is_dir()


@pytest.mark.slow
def test_console_and_run_log_hold_each_line_once(tmp_path):
    from tests.conftest import run_cli

    out = run_cli(*TINY, "trainer.max_steps=2", "trainer.val_check_interval=2", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    console = out.stdout + out.stderr
    assert "\x1b" not in console and "\r" not in console  # no escape sequences when not on a terminal
    assert "Tip" not in console and "litlogger" not in console.lower()
    log = (tmp_path / "run.log").read_text()
    for line in ("GPU available", "Trainer.fit` stopped", "final val/loss="):
        assert console.count(line) == 1 and log.count(line) == 1, line
