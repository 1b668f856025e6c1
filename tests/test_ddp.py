"""Data-parallel runs on CPU (2 gloo ranks, Lightning's ddp_spawn): every diagnostic gives one value on every rank,
learned LSQ/PACT scales stay identical across ranks, and resuming a 2-rank checkpoint on 2 ranks is exact."""

import pytest
import torch

from tests.conftest import compose, scalars

DDP = [
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.strategy=ddp_spawn",
    "trainer.enable_progress_bar=false",
]


def train_recorded(run_dir, *overrides):
    import quest_pl.train as train_mod
    from tests.ddp_probe import RankRecorder

    build = train_mod.build_callbacks
    run_dir.mkdir(parents=True, exist_ok=True)
    original = train_mod.build_callbacks
    train_mod.build_callbacks = lambda cfg, d: [*build(cfg, d), RankRecorder(str(run_dir))]
    try:
        train_mod.train(compose(*overrides), run_dir)
    finally:
        train_mod.build_callbacks = original
    return [torch.load(run_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize(("quant", "comm"), [("quest_w4a4", "none"), ("lsq_w4a4", "correlated")])
def test_diagnostics_and_learned_scales_agree_across_ranks(tmp_path, quant, comm):
    """With the fp32 all-reduce, and with 4-bit correlated gradient exchange (every rank decodes the same mean)."""
    ranks = train_recorded(
        tmp_path, "experiment=smoke", f"quant={quant}", f"grad_comm.hook={comm}", "trainer.max_steps=10", *DDP
    )
    logged = [dict((step, tuple(sorted(m.items()))) for step, m in r["logged"]) for r in ranks]
    assert logged[0], "the diagnostics logged nothing"
    assert logged[0] == logged[1]  # alignment, masked fractions (activations averaged over ranks), quant errors
    tags = {k for _, m in ranks[0]["logged"] for k in m}
    assert any(t.startswith("align/") for t in tags) and any(t.startswith("mask/") for t in tags)
    for k, v in ranks[0]["scales"].items():
        assert torch.equal(v, ranks[1]["scales"][k]), k
    # rank 0 alone writes the tables, once
    assert len(list(tmp_path.glob("mask_persistence*.csv"))) <= 1
    if comm != "none":
        from quest_pl import comm as comm_mod

        sent = scalars(tmp_path, "comm/bytes_per_step")
        expected = comm_mod.wire_bytes(ranks[0]["trainable"], 2, comm, bits=4)["sent"]
        # what the hook moved: DDP's buckets each pad to a whole chunk, so a few bytes above one bucket's count
        assert sent and all(v == pytest.approx(expected, rel=1e-2) for v in sent.values())


@pytest.mark.slow
def test_two_rank_resume_is_exact(tmp_path):
    common = ["experiment=smoke", "quant=quest_w4a4", "trainer.max_steps=8", "callbacks=none", *DDP]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train_recorded(full, *common, "checkpoint.every_n_steps=4")
    train_recorded(resumed, *common, f"ckpt_path={full / 'checkpoints' / 'step000004.ckpt'}")
    a, b = scalars(full, "train/loss"), scalars(resumed, "train/loss")
    assert sorted(b) == [4, 5, 6, 7]
    for step, value in b.items():
        assert value == pytest.approx(a[step], rel=1e-5), step
    wa = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    wb = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_process_group_is_destroyed_at_exit():
    """A ddp_spawn worker returns from fit and exits with its gloo group alive; gloo's threads then die during the
    interpreter's finalisation (SIGABRT, "terminate called without an active exception", seen here at random on 2
    loaded cores). The module registers the group's destruction at exit, while the interpreter is still whole."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import atexit, os
        import torch.distributed as dist
        from quest_pl.module import destroy_process_group_at_exit
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
        dist.init_process_group("gloo", rank=0, world_size=1)
        destroy_process_group_at_exit()
        destroy_process_group_at_exit()  # once only
        atexit._run_exitfuncs()
        print("initialized after exit handlers:", dist.is_initialized())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "initialized after exit handlers: False" in out.stdout
