"""End-to-end runs: the smoke experiment, resume exactness, Ctrl-C / SIGTERM, and one-line errors."""

import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, compose, run_cli, scalars


def train(run_dir, *overrides):
    from quest_pl.train import train as train_fn

    return train_fn(compose(*overrides), run_dir)


@pytest.mark.slow
def test_smoke_run_writes_scalars_and_layout(tmp_path):
    metrics = train(tmp_path, "experiment=smoke", "trainer.enable_progress_bar=false")
    for tag in ("train/loss", "val/loss", "val/ppl"):
        values = scalars(tmp_path, tag)
        assert values and all(math.isfinite(v) for v in values.values()), tag
    assert len(scalars(tmp_path, "train/loss")) == 30  # logged every step
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-5)
    assert metrics["val/loss"] < math.log(2048)  # learned something in 30 steps


@pytest.mark.slow
def test_cli_smoke_run(tmp_path):
    out = run_cli("experiment=smoke", f"hydra.run.dir={tmp_path}", "trainer.enable_progress_bar=false")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "final val/loss=" in out.stdout
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert (tmp_path / "tensorboard").is_dir() and (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["bf16", "lsq_w4a4"])
def test_resume_is_exact(tmp_path, quant):
    common = ["experiment=smoke", f"quant={quant}", "trainer.enable_progress_bar=false"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(full, *common, "checkpoint.every_n_steps=12")
    ckpt = full / "checkpoints" / "step000012.ckpt"
    train(resumed, *common, f"ckpt_path={ckpt}")
    a, b = scalars(full, "train/loss"), scalars(resumed, "train/loss")
    assert sorted(b) == list(range(12, 30))
    for step, value in b.items():
        assert abs(value - a[step]) <= 1e-5 * abs(a[step]), step
    assert scalars(resumed, "val/loss") == pytest.approx(scalars(full, "val/loss"), rel=1e-5)


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint(tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "run.py"),
            "experiment=smoke",
            "trainer.max_steps=100000",
            f"hydra.run.dir={tmp_path}",
            "trainer.enable_progress_bar=false",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    events = tmp_path / "tensorboard"
    deadline = time.time() + 120
    while time.time() < deadline and not (events.is_dir() and any(events.glob("events.*"))):
        time.sleep(0.5)
    time.sleep(3)  # let it take some steps
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_file(), out[-2000:]
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] > 0


BAD_INPUTS = [
    (["model.n_layer=0"], "model.n_layer=0"),
    (["model.d_model=100", "model.n_head=3"], "model.d_model=100"),
    (["optim.lr=0"], "optim.lr=0"),
    (["optim.lr=-1e-3"], "optim.lr=-0.001"),
    (["trainer.max_steps=abc"], "trainer.max_steps='abc'"),
    (["data.source=text_file"], "data.path"),
    (["data.source=text_file", "data.path=/nonexistent/*.txt"], "data.path='/nonexistent/*.txt'"),
    (["experiment=nonexistent"], "experiment='nonexistent'"),
    (["model=llama_1b"], "model='llama_1b'"),
    (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path='/nonexistent/last.ckpt'"),
    (["quant=quest_w4a4", "quant.grid=nf4"], "quant.grid='nf4'"),
    (["quant=quest_w4a4", "quant.estimator=magic"], "quant.estimator='magic'"),
    (["quant=fp4", "quant.bits=3"], "quant.bits=3"),
    (["quant=quest_w4a4", "quant.bits=9"], "quant.bits=9"),
    (["quant=quest_w4a4", "model.d_model=192", "model.n_head=1"], "128"),
]


@pytest.mark.parametrize(("args", "needle"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_line(tmp_path, args, needle):
    out = run_cli("experiment=smoke", *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_corrupt_checkpoint_is_rejected_and_untouched(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00not a checkpoint" * 100)
    before = bad.read_bytes()
    out = run_cli("experiment=smoke", f"ckpt_path={bad}", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2 and "not a readable checkpoint" in out.stderr
    assert bad.read_bytes() == before


@pytest.mark.slow
def test_incompatible_checkpoint_is_rejected(tmp_path):
    train(
        tmp_path / "a",
        "experiment=smoke",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false",
    )
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    out = run_cli("experiment=smoke", "model.n_layer=2", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'b'}")
    assert out.returncode == 2 and "incompatible" in out.stderr, out.stderr


@pytest.mark.slow
def test_two_process_cpu_ddp_run_finishes(tmp_path):
    """Two gloo ranks (Lightning re-launches run.py for rank 1); ranks read disjoint slices (see test_data)."""
    out = run_cli(
        "experiment=smoke",
        "quant=bf16",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        f"hydra.run.dir={tmp_path}",
        "trainer.enable_progress_bar=false",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("final val/loss=") == 1
    assert len(scalars(tmp_path, "train/loss")) == 30
