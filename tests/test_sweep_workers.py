"""``sweep.workers``: how many jobs run at once (``auto`` from the cores and the jobs' threads and devices), and the
pool that runs them in forked processes (:mod:`quest_pl.workers`): each job's exit status becomes its status, an
interrupted job or a signal to the sweep's process stops every job, the jobs die with the sweep's process, and never
more than N run at once. The pool runs in a fresh interpreter (a forked pytest worker would inherit its threads); the
end-to-end parallel sweep, bit for bit against a sequential one, is in ``tests/test_sweep.py``."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from quest_pl.config import ConfigError
from quest_pl.workers import check_value, resolve

ROOT = Path(__file__).resolve().parents[1]
HYDRA = OmegaConf.create({"job": {"env_set": {"OMP_NUM_THREADS": "1"}}})


def job(**trainer):
    return OmegaConf.create(
        {"trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto"} | trainer}
    )


def command(workers="auto"):
    return OmegaConf.create({"sweep": {"workers": workers}})


def test_auto_fills_the_cores_with_the_jobs_threads():
    seven = [job()] * 7
    assert resolve(command(), HYDRA, seven, cpus=2) == 2
    assert resolve(command(), HYDRA, seven[:3], cpus=16) == 3  # never more than the jobs
    assert resolve(command(), HYDRA, [job()], cpus=16) == 1
    two_threads = OmegaConf.create({"job": {"env_set": {"OMP_NUM_THREADS": "2"}}})
    assert resolve(command(), two_threads, seven, cpus=2) == 1
    assert resolve(command(), two_threads, seven, cpus=8) == 4


@pytest.mark.parametrize(
    "trainer, why",
    [({"accelerator": "gpu"}, "trainer.accelerator=gpu"), ({"devices": 2}, "trainer.devices=2"),
     ({"strategy": "ddp"}, "trainer.strategy=ddp"), ({"num_nodes": 2}, "trainer.num_nodes=2")],
)  # fmt: skip
def test_jobs_on_a_device_or_several_run_one_at_a_time(trainer, why):
    jobs = [job(), job(**trainer)]  # one such job is enough
    assert resolve(command(), HYDRA, jobs, cpus=64) == 1
    with pytest.raises(ConfigError, match=rf"^sweep.workers=2: jobs run one at a time with {why}"):
        resolve(command(2), HYDRA, jobs, cpus=64)
    assert resolve(command(1), HYDRA, jobs, cpus=64) == 1


def test_another_launcher_or_sweeper_runs_one_at_a_time():
    for node in ("launcher", "sweeper"):
        hydra = OmegaConf.merge(HYDRA, {node: {"_target_": "hydra_plugins.other.Other"}})
        assert resolve(command(), hydra, [job()] * 4, cpus=8) == 1
        with pytest.raises(ConfigError, match=f"hydra/{node}=hydra_plugins.other.Other"):
            resolve(command(3), hydra, [job()] * 4, cpus=8)


@pytest.mark.parametrize("value", [0, -1, "two", True, 1.5])
def test_bad_values_are_refused(value):
    with pytest.raises(ConfigError, match=r"^sweep.workers=.*: expected auto or an integer >= 1"):
        check_value(command(value), multirun=True)


def test_a_single_run_refuses_a_number():
    check_value(command(), multirun=False)
    with pytest.raises(ConfigError, match=r"^sweep.workers=1: acts only in a sweep"):
        check_value(command(1), multirun=False)


def test_cli_refuses_in_one_line_and_writes_nothing(monkeypatch, capsys, tmp_path):
    from tests.test_errors import run_cli_inprocess

    cases = [
        (["trainer.max_steps=1", "sweep.workers=2"], "sweep.workers=2: acts only in a sweep"),
        (["experiment=estimator_ablation", "sweep.workers=0", f"hydra.sweep.dir={tmp_path / 's'}"], "expected auto"),
        (["experiment=estimator_ablation", "sweep.workers=2", "trainer.accelerator=cpu", "trainer.devices=2",
          f"hydra.sweep.dir={tmp_path / 's'}"], "sweep.workers=2: jobs run one at a time with trainer.devices=2"),
    ]  # fmt: skip
    for args, why in cases:
        code, _, err = run_cli_inprocess(monkeypatch, capsys, tmp_path, *args)
        assert code == 2 and err.startswith("error: ") and why in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.rglob("*"))


# -- the pool, in a fresh interpreter --------------------------------------------------------------------------------
HARNESS = """
import json, os, signal, sys, time
from pathlib import Path
from quest_pl import workers

out = Path(sys.argv[1])
ended = []
pool = workers.configure(int(sys.argv[2]), lambda d, status, s, error: ended.append([d.name, status, error]))

def on_term(code):  # what a job's training does on SIGTERM: stop and exit 143 (quest_pl.callbacks.interrupt)
    signal.signal(signal.SIGTERM, lambda *a: os._exit(code))

def record(name, seconds):
    start = time.monotonic()
    time.sleep(seconds)
    (out / name).write_text(json.dumps([start, time.monotonic(), os.getpgid(0)]))

def finish(extra=None):
    print(json.dumps({"ended": sorted(ended), "pgid": os.getpgid(0), **(extra or {})}), flush=True)
"""


def pool(tmp_path, size, body, timeout=60):
    script = HARNESS + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script, str(tmp_path), str(size)], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip


def test_exit_statuses_become_job_statuses_with_at_most_n_at_once(tmp_path):
    result = pool(
        tmp_path,
        2,
        """
        def run(name, code):
            record(name, 0.3)
            if code == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if code == "raise":
                raise RuntimeError("boom")
            return code
        for name, code in [("ok", 0), ("diverged", 3), ("failed", 1), ("raised", "raise"), ("killed", "kill"),
                           ("odd", 7)]:
            pool.start(out / name, lambda name=name, code=code: run(name, code))
        pool.wait()
        finish()
    """,
    )
    assert result.returncode == 0, result.stderr
    ended = json.loads(result.stdout)["ended"]
    killed = "the job's process was killed by SIGKILL"
    assert ended == [["diverged", "diverged", None], ["failed", "failed", None], ["killed", "failed", killed],
                     ["odd", "failed", "exit status 7"], ["ok", "ok", None], ["raised", "failed", None]]  # fmt: skip
    assert "RuntimeError: boom" in result.stderr and "killed by SIGKILL; the sweep goes on" in result.stderr
    spans = [json.loads((tmp_path / n).read_text()) for n in ("ok", "diverged", "failed", "raised", "killed", "odd")]
    for start, _, _ in spans:  # at most 2 jobs at any start
        assert sum(s <= start + 1e-3 and start < e for s, e, _ in spans) <= 2
    parent_group = json.loads(result.stdout)["pgid"]
    assert all(group != parent_group for _, _, group in spans)  # own process groups: Ctrl-C reaches the parent only


def test_an_interrupted_job_stops_every_job(tmp_path):
    """A job that exits 143 (its process got SIGTERM) stops the sweep: the other running job gets SIGTERM, both are
    'interrupted', and the next start raises SystemExit(143)."""
    result = pool(
        tmp_path,
        2,
        """
        def long():
            on_term(143)
            record("long", 60)
        def short():
            time.sleep(0.5)
            return 143
        pool.start(out / "long", long)
        pool.start(out / "short", short)
        try:
            pool.start(out / "third", lambda: (out / "third").write_text("ran"))
        except SystemExit as e:
            pool.wait()
            finish({"exit": e.code, "interrupted": pool.interrupted})
    """,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == {"ended": [["long", "interrupted", None], ["short", "interrupted", None]],
                      "pgid": report["pgid"], "exit": 143, "interrupted": signal.SIGTERM}  # fmt: skip
    assert not (tmp_path / "third").exists()


def test_a_signal_to_the_sweep_reaches_every_job_once(tmp_path):
    """SIGTERM (and Ctrl-C) to the sweep's process: passed on to each running job, raised in the sweep's process;
    a job that had not reached training (default handler) counts as interrupted, not failed."""
    result = pool(
        tmp_path,
        3,
        """
        import threading
        def saving():
            on_term(143)
            time.sleep(60)
        def early():
            time.sleep(60)  # the default SIGTERM handler: killed by the signal
        pool.start(out / "a", saving)
        pool.start(out / "b", early)
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        try:
            pool.wait()
        except SystemExit as e:
            pool.wait()
            finish({"exit": e.code})
    """,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ended"] == [["a", "interrupted", None], ["b", "interrupted", None]]
    assert json.loads(result.stdout)["exit"] == 143


def test_jobs_die_with_the_sweeps_process(tmp_path):
    """SIGKILL to the sweep's process: the kernel kills its jobs (no orphan writes into the sweep)."""
    body = """
        pool.start(out / "a", lambda: time.sleep(60))
        pool.start(out / "b", lambda: time.sleep(60))
        print(json.dumps(list(pool.running)), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = HARNESS + textwrap.dedent(body)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path), "2"], stdout=subprocess.PIPE, text=True, env=env
    )
    children = json.loads(proc.stdout.readline())
    assert proc.wait(timeout=30) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in children)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_without_the_report_callback_the_sweep_still_waits_for_its_jobs(tmp_path):
    """The report callback waits for the jobs; without it the command line does, and every job finishes."""
    from quest_pl.sweep_plan import job_states
    from tests.conftest import run_cli

    args = ("experiment=estimator_ablation", "quant=bf16,ste_w4a4", "trainer.max_steps=3",
            "trainer.val_check_interval=3", "data.val_batches=1", "data.batch_size=2", "~hydra.callbacks.report",
            "sweep.workers=2")  # fmt: skip
    result = run_cli(*args, f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [j["status"] for j in job_states(tmp_path)] == ["ok", "ok"]
    assert not (tmp_path / "summary.csv").exists()


def test_a_job_killed_by_sigterm_before_its_training_stops_the_sweep(tmp_path):
    """SIGTERM to a job's process before its training installs the handler (data preparation, model build) ends it
    by the default action. That job was interrupted on its own, as one in training that exits 143: the sweep stops
    (its other job gets SIGTERM, no new job starts, exit 143), as a sequential sweep's process dies of the same signal.
    It is not a failure the sweep goes on after."""
    result = pool(
        tmp_path,
        2,
        """
        def preparing():
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGTERM)  # the default handler: the process dies of it
            time.sleep(60)
        def training():
            on_term(143)
            time.sleep(3)
            return 0
        pool.start(out / "preparing", preparing)
        pool.start(out / "training", training)
        try:
            pool.start(out / "third", lambda: (out / "third").write_text("ran"))
            pool.wait()
            finish({"exit": None})
        except SystemExit as e:
            pool.wait()
            finish({"exit": e.code})
    """,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ended"] == [["preparing", "interrupted", None], ["training", "interrupted", None]]
    assert report["exit"] == 143
    assert not (tmp_path / "third").exists()


def test_ctrl_c_while_the_last_jobs_run_writes_no_report(tmp_path):
    """Ctrl-C while the sweep's process waits in the report callback for its last jobs: the jobs save and the sweep
    stops without writing the report (nor running its PTQ or the scaling fit), as a sequential sweep interrupted in
    its last job does, and as SIGTERM at the same moment does."""
    result = pool(
        tmp_path,
        2,
        """
        import threading
        from omegaconf import OmegaConf
        import quest_pl.report
        from quest_pl.sweep import SweepReport
        calls = []
        quest_pl.report.write_report = lambda *a, **k: calls.append(str(a))
        def saving():
            signal.signal(signal.SIGINT, lambda *a: os._exit(130))  # training: save, exit 130
            time.sleep(60)
        pool.start(out / "last", saving)
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            SweepReport(ptq=False).on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(out)}}}))
            outcome = "returned"
        except (KeyboardInterrupt, SystemExit) as e:
            outcome = type(e).__name__
        finish({"report_calls": len(calls), "outcome": outcome})
    """,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ended"] == [["last", "interrupted", None]]
    assert report["report_calls"] == 0, report


def test_usable_cpus_follow_a_containers_quota(tmp_path):
    from quest_pl.workers import usable_cpus

    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == affinity  # no cgroup files: the affinity
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # --cpus=1.5: one whole core
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # cgroup v1, no quota
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == affinity
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == 1


def test_a_jobs_printed_lines_carry_its_name():
    import io

    from quest_pl.workers import _PrefixedStream

    out = io.StringIO()
    stream = _PrefixedStream(out, "[3_quest_w4a4_s0] ")
    stream.write("step 1")
    stream.write(" done\n\nCtrl-C: stopping\nprogress 10%\rprogress 20%\r")
    assert out.getvalue() == (
        "[3_quest_w4a4_s0] step 1 done\n\n[3_quest_w4a4_s0] Ctrl-C: stopping\n"
        "[3_quest_w4a4_s0] progress 10%\r[3_quest_w4a4_s0] progress 20%\r"
    )
    assert stream.getvalue() == out.getvalue()  # everything else is the stream's own
