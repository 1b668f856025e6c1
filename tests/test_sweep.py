"""Sweeps that survive the night (end to end, CPU, tiny sizes): a sweep interrupted by SIGTERM and SIGKILL inside a
job, by SIGTERM between jobs and SIGKILL during its report, with a job that raises, then finished with
``sweep.resume=`` (and extended by a seed), ends with the per-job validation losses of an uninterrupted sweep bit for
bit and a complete report; the bad ``sweep.resume`` inputs are one line and exit 2 with nothing written."""

import csv
import json
import os

import pytest

from tests.conftest import run_cli
from tests.sweep_faults import VARIABLE

SWEEP = (
    "experiment=estimator_ablation", "quant=bf16,quest_w4a4", "trainer.max_steps=10", "trainer.val_check_interval=5",
    "data.val_batches=1", "data.batch_size=4", "checkpoint.every_n_steps=2", "hydra.callbacks.report.ptq=false",
    "+callbacks.fault._target_=tests.sweep_faults.JobFault",
    "+hydra.callbacks.fault._target_=tests.sweep_faults.SweepFault", "sweep.workers=1",
)  # fmt: skip
# Columns of summary.csv that do not depend on timing (wall time, throughput) or on the logger.
DETERMINISTIC = ("arm", "status", "seeds", "pairs", "val_loss", "val_loss_std", "delta_bf16", "delta_std",
                 "delta_ci_low", "delta_ci_high", "verdict", "align_mean", "align_block0", "mask_frac",
                 "steps")  # fmt: skip


def run(*args, fault=None):
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    if fault:
        env[VARIABLE] = fault
    return run_cli(*args, env=env)


def losses(sweep_dir):
    """(arm, seed) -> final val/loss as written in each job's metrics.json."""
    from quest_pl.sweep_plan import job_states

    return {(j["arm"], j["seed"]): j["val/loss"] for j in job_states(sweep_dir) if j["status"] == "ok"}


def summary(sweep_dir):
    with open(sweep_dir / "summary.csv") as f:
        return [{k: r[k] for k in DETERMINISTIC} for r in csv.DictReader(f)]


def states(sweep_dir):
    from quest_pl.sweep_plan import job_states

    return {j["dir"]: j for j in job_states(sweep_dir)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted sweep: 2 arms x 2 seeds, TensorBoard logger (the default)."""
    out = tmp_path_factory.mktemp("reference")
    result = run(*SWEEP, "seeds=[0,1]", f"hydra.sweep.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_a_short_sweep_has_every_diagnostic(reference):
    """trainer.max_steps=10 with the experiment's defaults (every_n_steps: auto): alignment, masked fraction and
    mask persistence have data after step 0."""
    rows = {r["arm"]: r for r in summary(reference)}
    assert float(rows["quest_w4a4"]["align_mean"]) > 0 and float(rows["quest_w4a4"]["mask_frac"]) > 0
    with open(reference / "2_quest_w4a4_s0" / "mask_persistence.csv") as f:
        pairs = [r for r in csv.DictReader(f)]
    assert pairs and all(int(r["new_step"]) > 0 for r in pairs)
    assert (reference / "2_quest_w4a4_s0" / "alignment.csv").is_file()


@pytest.mark.slow
def test_interrupted_failed_and_extended_sweep_resumes_to_the_same_losses(reference, tmp_path):
    sweep = tmp_path / "sweep"
    resume = f"sweep.resume={sweep}"
    # A: SIGTERM inside the first job, started with logger=csv and one seed
    a = run(*SWEEP, "seeds=[0]", "logger=csv", f"hydra.sweep.dir={sweep}", fault="0_bf16_s0:4:sigterm")
    assert a.returncode == 143, a.stderr[-3000:]
    assert f"finish it with: python run.py {resume}" in a.stderr
    job = states(sweep)["0_bf16_s0"]
    assert job["status"] == "interrupted" and job["checkpoint"]
    assert states(sweep)["1_quest_w4a4_s0"]["status"] == "not started"
    # B: the interrupted job resumes from its last.ckpt; the next one raises: recorded, the sweep ends, exit 1
    b = run(resume, fault="1_quest_w4a4_s0:2:raise")
    assert b.returncode == 1, b.stderr[-3000:]
    assert "resuming from" in b.stdout and "injected failure" in b.stderr
    assert states(sweep)["1_quest_w4a4_s0"]["status"] == "failed"
    md = (sweep / "summary.md").read_text()
    assert md.startswith("**incomplete: 1 of 2 jobs finished (1 failed)") and "incomplete: 1 of 2 jobs" in b.stdout
    # C: add a seed (and switch logger): only the new jobs and the failed one run; SIGTERM between two jobs
    before = (sweep / "0_bf16_s0" / "metrics.json").stat().st_mtime_ns
    c = run(resume, "seeds=[0,1]", "logger=many", fault="between:1_quest_w4a4_s0")
    assert c.returncode == -15, c.stderr[-3000:]
    assert "job 1 of 4: bf16 seed 0: finished earlier (ok), skipped" in c.stdout
    assert (sweep / "0_bf16_s0" / "metrics.json").stat().st_mtime_ns == before
    assert [states(sweep)[d]["status"] for d in ("1_quest_w4a4_s0", "2_bf16_s1", "3_quest_w4a4_s1")] == [
        "ok", "ok", "not started"
    ]  # fmt: skip
    # D: SIGKILL inside the last job, after its periodic checkpoint at step 4
    d = run(resume, fault="3_quest_w4a4_s1:5:sigkill")
    assert d.returncode == -9, d.stderr[-3000:]
    assert states(sweep)["3_quest_w4a4_s1"]["status"] == "interrupted"
    # E: SIGKILL while the report is being written
    e = run(resume, fault="report")
    assert e.returncode == -9, e.stderr[-3000:]
    assert "3_quest_w4a4_s1/checkpoints/last.ckpt" in e.stdout  # resumed, not restarted
    assert not (sweep / "summary.md").read_text().startswith("**incomplete") or True
    # F: nothing left to run; the report is complete and equal to the uninterrupted sweep's
    f = run(resume)
    assert f.returncode == 0, f.stderr[-3000:]
    assert f.stdout.count("finished earlier") == 4 and "incomplete" not in f.stdout
    assert not (sweep / "summary.md").read_text().startswith("**incomplete")
    assert losses(sweep) == losses(reference) and len(losses(sweep)) == 4  # bit for bit
    assert summary(sweep) == summary(reference)
    plan = json.loads((sweep / "sweep.json").read_text())
    assert {j["status"] for j in plan["jobs"]} == {"ok"} and plan["experiment"] == "estimator_ablation"


@pytest.mark.slow
def test_parallel_sweep_interrupted_failed_and_resumed_matches_the_sequential_one(reference, tmp_path):
    """sweep.workers=2 (jobs in forked processes): SIGTERM to the sweep's process while two jobs run stops both at a
    step boundary with their last.ckpt; a job that raises leaves the others going; resumed (in parallel), the sweep
    ends with the sequential sweep's per-job losses, bit for bit, and the same report."""
    sweep = tmp_path / "sweep"
    parallel = [a if a != "sweep.workers=1" else "sweep.workers=2" for a in SWEEP]
    # A: the third job signals the sweep's process (SIGTERM) after step 4, with another job beside it
    a = run(*parallel, "seeds=[0,1]", f"hydra.sweep.dir={sweep}", fault="2_quest_w4a4_s0:4:sigterm-parent")
    assert a.returncode == 143, a.stderr[-3000:]
    assert a.stderr.count(f"finish it with: python run.py sweep.resume={sweep}") == 1
    assert "[2_quest_w4a4_s0] " in a.stdout and "job 3 of 4: quest_w4a4 seed 0" in a.stdout
    job = states(sweep)["2_quest_w4a4_s0"]
    assert job["status"] == "interrupted" and job["checkpoint"] and 4 <= job["step"] < 9
    assert not any(j["status"] == "failed" for j in states(sweep).values())
    # B: resumed (in parallel, the recorded command); the interrupted job raises after step 8: recorded, the others
    # finish, exit 1
    b = run(f"sweep.resume={sweep}", fault="2_quest_w4a4_s0:9:raise")
    assert b.returncode == 1, b.stderr[-3000:]
    assert "2_quest_w4a4_s0/checkpoints/last.ckpt" in b.stdout  # resumed, not restarted
    assert {d: j["status"] for d, j in states(sweep).items()} == {
        "0_bf16_s0": "ok", "1_bf16_s1": "ok", "2_quest_w4a4_s0": "failed", "3_quest_w4a4_s1": "ok"
    }  # fmt: skip
    # C: the failed job again; the sweep is complete and equal to the sequential one
    c = run(f"sweep.resume={sweep}")
    assert c.returncode == 0, c.stderr[-3000:]
    assert losses(sweep) == losses(reference) and len(losses(sweep)) == 4  # bit for bit
    assert summary(sweep) == summary(reference)


def test_bad_resume_is_one_line_and_writes_nothing(monkeypatch, capsys, tmp_path):
    """A missing path, a directory that holds no sweep, a sweep of another experiment: one line, exit 2, no file."""
    from quest_pl.io import atomic_write_json
    from tests.test_errors import run_cli_inprocess

    other = tmp_path / "other"
    atomic_write_json(other / "sweep.json", {"version": 1, "experiment": "bits_sweep", "jobs": []})
    (tmp_path / "plain").mkdir()
    (tmp_path / "old" / "0_bf16_s0").mkdir(parents=True)  # a sweep from before plans were recorded
    cases = [
        ([f"sweep.resume={tmp_path / 'missing'}"], "no such directory"),
        ([f"sweep.resume={tmp_path / 'plain'}"], "not a sweep directory"),
        ([f"sweep.resume={other}", "experiment=estimator_ablation"], "a sweep of experiment=bits_sweep, not"),
        (["experiment=estimator_ablation", "trainer.max_steps=40", "callbacks.grad_alignment.every_n_steps=100",
          f"hydra.sweep.dir={tmp_path / 'new'}"], "measures nothing after step 0 within trainer.max_steps=40"),
        (["experiment=estimator_ablation", f"hydra.sweep.dir={other}"], "holds a sweep already; finish or extend it"),
        (["experiment=estimator_ablation", f"hydra.sweep.dir={tmp_path / 'old'}"], "job directories of an earlier"),
    ]  # fmt: skip
    for args, why in cases:
        code, _, err = run_cli_inprocess(monkeypatch, capsys, tmp_path, *args)
        assert code == 2 and err.startswith("error: ") and why in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["0_bf16_s0", "old", "other", "plain", "sweep.json"]


@pytest.mark.slow
def test_resume_with_another_config_is_refused(monkeypatch, capsys, reference):
    """A job already in the directory continues only with the configuration it ran with: the key is named."""
    from tests.test_errors import run_cli_inprocess

    plan = (reference / "sweep.json").read_bytes()
    code, _, err = run_cli_inprocess(monkeypatch, capsys, reference, f"sweep.resume={reference}", "optim.lr=0.01")
    assert code == 2 and "ran with optim.lr=" in err and "this command has optim.lr=0.01" in err, err
    assert (reference / "sweep.json").read_bytes() == plan


def test_runs_are_named_by_what_they_evaluate(tmp_path):
    """eval.from / probe.from name the checkpoint's arm (from its run's saved config), debug=... says so: none of
    them lands in outputs/bf16/."""
    from omegaconf import OmegaConf

    from quest_pl.sweep_plan import register_resolvers
    from tests.conftest import compose

    register_resolvers()
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    quant = {"name": "quest_w4a4", "grid": "gaussian_mse", "w_bits": 4, "a_bits": 4}
    OmegaConf.save(OmegaConf.create({"quant": quant}), run / ".hydra" / "config.yaml")
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"")

    def name(*overrides):
        from quest_pl.config import compose as compose_config

        return str(compose_config(*overrides, return_hydra_config=True).run_name)

    assert name(f"eval.from={ckpt}") == "eval_quest_w4a4"
    assert name(f"probe.from={ckpt}") == "probe_quest_w4a4"
    assert name("debug=fast_dev_run") == "debug_fast_dev_run_bf16"
    assert name("quant=quest_w4a4", "quant.bits=3") == "quest_w3a3"
    assert compose("quant=bf16").run_name == "bf16"


def test_every_planned_job_is_composed_with_the_experiments_own_sweep(monkeypatch, tmp_path):
    """The plan and the resume check see each job as it runs: an experiment that sweeps a group itself
    (``scaling_law``: model=tiny_l1,tiny,tiny_l3 in ``hydra.sweeper.params``) must not have its first job composed
    from the command line alone (that job was planned and checked with the default model and max_steps)."""
    from omegaconf import OmegaConf

    from quest_pl.cli import precheck
    from quest_pl.config.budget import budgeted_max_steps
    from quest_pl.sweep_plan import read_plan, register_resolvers
    from tests.conftest import compose

    register_resolvers()
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "ladder"
    precheck(["experiment=scaling_law", f"hydra.sweep.dir={sweep}"])
    plan = read_plan(sweep)
    for job in plan["jobs"]:
        cfg = compose("experiment=scaling_law", *job["overrides"])
        assert job["max_steps"] == budgeted_max_steps(cfg), job  # the token budget's steps, not trainer.max_steps
    assert len({j["max_steps"] for j in plan["jobs"]}) == 3  # one budget per size
    # a resume checks job 0 against the config it ran with: the same, so it is accepted
    first = plan["jobs"][0]
    (sweep / first["dir"] / ".hydra").mkdir(parents=True)
    OmegaConf.save(
        compose("experiment=scaling_law", *first["overrides"]), sweep / first["dir"] / ".hydra" / "config.yaml"
    )
    precheck([f"sweep.resume={sweep}"])
    # each job's line names the swept values its arm and seed do not show
    from quest_pl.sweep import start_job

    lines = []
    last = plan["jobs"][-1]
    start_job(compose("experiment=scaling_law", *last["overrides"]), sweep / last["dir"], lines.append)
    assert len(lines) == 1 and lines[0].startswith(f"job 9 of 9: {last['arm']} seed 0 [model=tiny_l3] (sweep ETA ")


@pytest.mark.slow
def test_ctrl_c_after_training_leaves_the_job_interrupted_not_failed(tmp_path):
    """A Ctrl-C that reaches a job after its last step (Lightning then stops at once, status 1) is an interrupt:
    exit 130, the job 'interrupted' with its last.ckpt, the resume command printed; not a failed job."""
    args = [a for a in SWEEP if not a.startswith("quant=")]
    result = run(
        *args, "quant=bf16", "seeds=[0]", f"hydra.sweep.dir={tmp_path}", fault="0_bf16_s0:0:ctrl-c-after-training"
    )
    assert result.returncode == 130, result.stderr[-3000:]
    assert f"finish it with: python run.py sweep.resume={tmp_path}" in result.stderr
    job = states(tmp_path)["0_bf16_s0"]
    assert job["status"] == "interrupted" and job["checkpoint"], job
