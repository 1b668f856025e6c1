"""Injected faults end in one of two ways: the run is right, or it stops with one clear line and nothing lost.
Divergence (NaN loss), a kill or a full disk during a checkpoint write on another filesystem, a resume under a
changed config, a resume into the same run dir, and Ctrl-C in the middle of a step."""

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, compose, scalars

TINY = ("experiment=smoke", "quant=bf16", "callbacks=none", "trainer.enable_progress_bar=false")


def strict_json(path: Path) -> dict:
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=reject)


def checkpoint_is_finite(path: Path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.fixture
def hydra_cleanup():
    """In-process ``cli()`` runs leave Hydra's global state initialised; later compose() calls need it clear."""
    yield
    import logging

    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    root = logging.getLogger()  # Hydra's console handler writes to the test's (now closed) captured stdout
    for handler in list(root.handlers):
        if not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)


def run_cli_inprocess(monkeypatch, capsys, cwd, *args) -> tuple[int, str, str]:
    from quest_pl.cli import cli

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["run.py", *args])
    code = 0
    try:
        cli()
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# -- divergence -------------------------------------------------------------------------------------------------------
def test_nan_loss_stops_the_run(monkeypatch, capsys, tmp_path, hydra_cleanup):
    """A NaN loss at step 3 (injected): exit 3, one line naming the step, strict metrics.json marked diverged, and
    only checkpoints from before the divergence, all finite."""
    from quest_pl.module import LMModule

    forward = LMModule.forward

    def nan_logits_at_step_3(self, idx):
        logits = forward(self, idx)
        return logits * float("nan") if self.training and self.trainer.global_step == 3 else logits

    monkeypatch.setattr(LMModule, "forward", nan_logits_at_step_3)
    run_dir = tmp_path / "run"
    code, _, err = run_cli_inprocess(
        monkeypatch, capsys, tmp_path, *TINY, "trainer.max_steps=8", "checkpoint.every_n_steps=1",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 3, err[-2000:]
    assert len(errors) == 1 and "training diverged at step 3 (loss=nan)" in errors[0], err[-2000:]
    assert "Traceback" not in err
    metrics = strict_json(run_dir / "metrics.json")
    assert metrics["status"] == "diverged" and metrics["diverged_step"] == 3
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert ckpts and all(checkpoint_is_finite(c) for c in ckpts)
    steps = [torch.load(c, map_location="cpu", weights_only=True)["global_step"] for c in ckpts]
    assert max(steps) == 3  # the state before the diverging step is kept; nothing after it was written
    assert "diverged" in (run_dir / "run.log").read_text()


def test_validation_mean_keeps_nan():
    """MeanMetric drops NaN by default; the validation loss must not average a NaN batch away."""
    from quest_pl.module import LMModule

    module = LMModule(dict(vocab_size=300, n_layer=1, d_model=128, n_head=1, seq_len=16), {})
    module.val_loss.update(torch.tensor(2.0), weight=10)
    module.val_loss.update(torch.tensor(float("nan")), weight=10)
    assert math.isnan(module.val_loss.compute())


@pytest.mark.slow
def test_sweep_goes_on_after_a_diverged_arm(monkeypatch, capsys, tmp_path, hydra_cleanup):
    sweep = tmp_path / "sweep"
    code, _, err = run_cli_inprocess(
        monkeypatch, capsys, tmp_path, "-m", *TINY, "optim.lr=1e6,3e-3", "trainer.max_steps=4",
        "trainer.val_check_interval=4", f"hydra.sweep.dir={sweep}", "hydra.callbacks.report.ptq=false",
    )  # fmt: skip
    assert code == 3, err[-2000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    status = [strict_json(j / "metrics.json")["status"] for j in jobs]
    assert status == ["diverged", "ok"], status
    assert "1 arm(s) diverged" in err


# -- resume ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run (its checkpoints/last.ckpt holds the composed config)."""
    from quest_pl.train import train

    run_dir = tmp_path_factory.mktemp("trained")
    train(compose(*TINY, "trainer.max_steps=2", "trainer.val_check_interval=2"), run_dir)
    return run_dir


def resume_cfg(ckpt: Path, *overrides: str):
    return compose(*TINY, "trainer.max_steps=2", "trainer.val_check_interval=2", f"ckpt_path={ckpt}", *overrides)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["optim.lr=1e-2"], "optim.lr"),
        (["quant=quest_w4a4"], "quant."),
        (["seed=1"], "seed"),
        (["data.batch_size=4"], "data.batch_size"),
        (["trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches"),
    ],
)
def test_resume_under_a_changed_config_is_refused(trained, overrides, key):
    from quest_pl.config import ConfigError, validate

    with pytest.raises(ConfigError, match=f"trained with {key}") as e:
        validate(resume_cfg(trained / "checkpoints" / "last.ckpt", *overrides))
    assert "resume.allow_changes=[" in str(e.value) and "\n" not in str(e.value)


def test_normal_run_is_marked_ok(trained):
    assert strict_json(trained / "metrics.json")["status"] == "ok"


def test_resume_allows_a_listed_change(trained):
    from quest_pl.config import check_checkpoint, check_resume, validate

    ckpt = trained / "checkpoints" / "last.ckpt"
    cfg = resume_cfg(ckpt, "optim.lr=1e-2", "resume.allow_changes=[optim.lr]")
    validate(cfg)
    assert check_resume(cfg, check_checkpoint(str(ckpt))) == {"optim.lr": (3e-3, 1e-2)}
    validate(resume_cfg(ckpt, "trainer.val_check_interval=1", "data.num_workers=1"))  # neither changes training


def test_resume_past_max_steps_is_refused(trained):
    from quest_pl.config import ConfigError, validate

    cfg = compose(*TINY, "trainer.max_steps=1", f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}")
    with pytest.raises(ConfigError, match=r"at step 2, past trainer\.max_steps=1"):
        validate(cfg)


def test_resume_of_a_token_budget_run_compares_the_budgeted_steps(tmp_path):
    """``trainer.tokens`` sets max_steps (quest_pl.budget): a resume with the same budget continues the run (the
    checkpoint's max_steps is the budgeted one, and so is the new run's), and a smaller budget than the checkpoint's
    step is refused in the budget's steps."""
    from quest_pl.budget import tokens_per_step
    from quest_pl.config import ConfigError, validate
    from quest_pl.train import train

    step_tokens = tokens_per_step(compose(*TINY))
    budget = (*TINY, "trainer.max_steps=50", "trainer.val_check_interval=2", f"trainer.tokens={2 * step_tokens}")
    train(compose(*budget), tmp_path)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2
    validate(compose(*budget, f"ckpt_path={ckpt}"))
    with pytest.raises(ConfigError, match=r"at step 2, past trainer\.max_steps=1"):
        validate(compose(*budget, f"trainer.tokens={step_tokens}", f"ckpt_path={ckpt}"))


def test_checkpoint_older_than_a_key_resumes_at_its_default(trained, tmp_path):
    """A key added after the checkpoint was written (absent from its stored config) compares as its default, the
    behaviour the checkpoint was trained with; any other value of it is refused, naming it."""
    from quest_pl.config import ConfigError, validate

    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del ckpt["quest_pl_config"]["quant"]["backward_format"], ckpt["quest_pl_config"]["optim"]["quant_lr_scale"]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    validate(resume_cfg(old))
    with pytest.raises(ConfigError, match=r"trained with quant\.backward_format='nvfp4'.*'mxfp4'"):
        validate(resume_cfg(old, "quant.backward_format=mxfp4"))


def test_checkpoint_older_than_a_key_on_the_command_line(trained, monkeypatch, capsys, tmp_path, hydra_cleanup):
    """The same comparison inside the running app (its own Hydra instance composes the defaults)."""
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del ckpt["quest_pl_config"]["quant"]["backward_format"]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    run = tmp_path / "run"
    run.mkdir()
    code, _, err = run_cli_inprocess(
        monkeypatch, capsys, run, *TINY, "trainer.max_steps=2", f"ckpt_path={old}", "quant.backward_format=int8"
    )
    assert code == 2 and err.count("\n") == 1 and "quant.backward_format" in err, err


def test_checkpoint_without_stored_config_is_compared_on_its_hyperparameters(trained, tmp_path):
    from quest_pl.config import ConfigError, validate

    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del ckpt["quest_pl_config"]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    validate(resume_cfg(old))
    with pytest.raises(ConfigError, match=r"trained with optim\.lr"):
        validate(resume_cfg(old, "optim.lr=1e-2"))


def test_refused_resume_on_the_command_line_creates_nothing(trained, monkeypatch, capsys, tmp_path):
    code, _, err = run_cli_inprocess(
        monkeypatch, capsys, tmp_path, *TINY, f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", "optim.lr=1e-2"
    )
    assert code == 2 and err.count("\n") == 1 and "optim.lr" in err, err
    assert list(tmp_path.iterdir()) == []


def test_resume_into_the_same_run_dir_updates_last_ckpt(tmp_path):
    from quest_pl.train import train

    common = (*TINY, "trainer.val_check_interval=2", "resume.allow_changes=[trainer.max_steps]")
    train(compose(*common, "trainer.max_steps=2"), tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    train(compose(*common, "trainer.max_steps=4", f"ckpt_path={last}"), tmp_path)
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]


# -- atomic checkpoint writes ---------------------------------------------------------------------------------------
def other_filesystem_dir(tmp_path) -> Path:
    """A directory on another filesystem than $TMPDIR (/dev/shm is tmpfs on Linux), where a rename from $TMPDIR
    fails with EXDEV: the case in which Lightning's own save truncated last.ckpt."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tempfile.gettempdir()).st_dev:
        pytest.skip("no second filesystem (/dev/shm) beside $TMPDIR")
    d = Path(tempfile.mkdtemp(dir=shm, prefix="quest_pl_test_"))
    return d


@pytest.fixture
def shm_dir(tmp_path):
    d = other_filesystem_dir(tmp_path)
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def test_full_disk_during_checkpoint_write_keeps_the_previous_one(monkeypatch, tmp_path, shm_dir):
    from quest_pl.callbacks.checkpoint import AtomicCheckpointIO

    private_tmp = tmp_path / "tmpdir"
    private_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    io = AtomicCheckpointIO()
    path = shm_dir / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "global_step": 1}, path)
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"\x00" * 4096)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "global_step": 2}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # the temporary file is gone
    assert list(private_tmp.iterdir()) == []


KILL_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys, torch
    from quest_pl.callbacks.checkpoint import AtomicCheckpointIO
    io, path = AtomicCheckpointIO(), sys.argv[1]
    io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "global_step": 1}, path)
    def killed_midway(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"\\x00" * 1_000_000)
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    torch.save = killed_midway
    io.save_checkpoint({"state_dict": {"w": torch.zeros(10**6)}, "global_step": 2}, path)
    """
)


def test_kill_during_checkpoint_write_on_another_filesystem(tmp_path, shm_dir):
    from quest_pl.train import remove_stale_temp_files

    private_tmp = tmp_path / "tmpdir"
    private_tmp.mkdir()
    path = shm_dir / "checkpoints" / "last.ckpt"
    env = {**os.environ, "TMPDIR": str(private_tmp)}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, str(path)], cwd=ROOT, env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # the previous checkpoint, complete
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["state_dict"]["w"], torch.ones(1000))
    assert list(private_tmp.iterdir()) == []  # nothing in $TMPDIR
    leftovers = [p for p in path.parent.iterdir() if p.name != "last.ckpt"]
    assert leftovers and all(p.name.startswith(".tmp-last.ckpt") for p in leftovers)  # beside it, never over it
    remove_stale_temp_files(path.parent)  # what the next run in this dir does first
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


# -- Ctrl-C ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigint_mid_step_resumes_exactly(tmp_path):
    """Ctrl-C at an arbitrary moment: exit 130, last.ckpt at a step boundary, and after resuming into the same run
    dir every logged scalar is at the same step with the same value as in an uninterrupted run."""
    from quest_pl.train import train

    # Long enough that the signal lands mid-run on a fast, idle machine too (40 steps took 1.9 s there).
    common = (*TINY, "trainer.max_steps=120", "trainer.val_check_interval=30", "trainer.log_every_n_steps=1")
    full, run = tmp_path / "full", tmp_path / "run"
    train(compose(*common), full)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *common, f"hydra.run.dir={run}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline and not list((run / "tensorboard").glob("events.*")):
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < step < 120, out[-3000:]
    train(compose(*common, f"ckpt_path={last}"), run)
    for tag in ("train/loss", "val/loss", "train/lr"):
        a, b = scalars(full, tag), scalars(run, tag)
        assert sorted(b) == sorted(a), tag
        for s, v in b.items():
            assert v == pytest.approx(a[s], rel=1e-5, abs=1e-7), (tag, s)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from quest_pl.train import train

    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(compose(*INTERRUPT_RUN), run_dir)
    return run_dir


INTERRUPT_RUN = (*TINY, "trainer.max_steps=16", "trainer.val_check_interval=8", "trainer.log_every_n_steps=1",
                 "trainer.accumulate_grad_batches=2")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("where", ["validation_batch", "validation_end", "mid_accumulation"])
def test_interrupt_anywhere_resumes_exactly(tmp_path, uninterrupted, where):
    """The stop request (what Ctrl-C and SIGTERM record) injected inside a validation, between a step and its
    validation, and between two micro-batches of a step: the resumed run logs what the uninterrupted one did."""
    import lightning as L

    from quest_pl import train as train_module
    from quest_pl.callbacks import SaveOnInterrupt

    class Request(L.Callback):
        def _request(self, trainer):
            next(c for c in trainer.callbacks if isinstance(c, SaveOnInterrupt)).requested = signal.SIGINT

        def on_validation_batch_end(self, trainer, *args, **kwargs):
            if where == "validation_batch" and trainer.global_step == 8:
                self._request(trainer)

        def on_validation_epoch_end(self, trainer, *args, **kwargs):
            if where == "validation_end" and trainer.global_step == 8:
                self._request(trainer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if where == "mid_accumulation" and trainer.global_step == 5 and batch_idx % 2 == 0:
                self._request(trainer)

    build = train_module.build_callbacks
    run = tmp_path / "run"
    try:
        train_module.build_callbacks = lambda cfg, d: [*build(cfg, d), Request()]
        with pytest.raises(SystemExit) as e:
            train_module.train(compose(*INTERRUPT_RUN), run)
    finally:
        train_module.build_callbacks = build
    assert e.value.code == 130
    last = run / "checkpoints" / "last.ckpt"
    assert 0 < torch.load(last, map_location="cpu", weights_only=True)["global_step"] < 16
    train_module.train(compose(*INTERRUPT_RUN, f"ckpt_path={last}"), run)
    for tag in ("train/loss", "val/loss", "train/lr"):
        a, b = scalars(uninterrupted, tag), scalars(run, tag)
        assert sorted(b) == sorted(a), tag
        for s, v in b.items():
            assert v == pytest.approx(a[s], rel=1e-5, abs=1e-7), (tag, s)


def test_user_error_inside_the_job_removes_the_fresh_run_dir(trained, monkeypatch, capsys, tmp_path, hydra_cleanup):
    """An error only found once the job runs (an older checkpoint of another model shape, found when the model is
    built): one line, exit 2, and the run dir Hydra had created for it is gone again."""
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del ckpt["quest_pl_config"]  # written before the config was stored: precheck cannot see the model change
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    code, _, err = run_cli_inprocess(
        monkeypatch, capsys, cwd, *TINY, "trainer.max_steps=2", "model.n_layer=2", f"ckpt_path={old}"
    )
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "incompatible" in errors[0], err[-2000:]
    assert list(cwd.iterdir()) == []  # no outputs/<run>/<time> left behind
