"""The sweep report on synthetic sweep directories: arms grouped over seeds, the paired difference to BF16 with its
95 % t-interval against a hand-computed example, the exact t quantile, diverged and malformed jobs, the "what was
run" header, figures as PDF and PNG, and regeneration from the command line (``python -m quest_pl.report DIR``)."""

import csv
import json
import math
import subprocess
import sys

import pytest

from tests.conftest import ROOT

QUEST = {"name": "quest_w4a4", "grid": "gaussian_mse", "bits": 4, "w_bits": "${.bits}", "a_bits": "${.bits}",
         "estimator": "trust", "hadamard": True, "hadamard_mode": "half"}  # fmt: skip
ARMS = {  # arm -> (quant group, final val loss per seed 0, 1, 2; None: diverged)
    "bf16": ({"name": "bf16", "grid": None, "bits": None, "w_bits": None, "a_bits": None}, [4.00, 4.10, 3.90]),
    "quest_w4a4": (QUEST, [4.05, 4.20, 3.92]),
    "quest_w1a16": (
        {"name": "quest_w1a16", "grid": "gaussian_mse", "bits": 1, "w_bits": "${.bits}", "a_bits": None,
         "estimator": "clip", "clip_scale": 1.3, "hadamard": True},
        [4.50, 4.62, 4.41],
    ),
    "pact_w4a4": (dict(QUEST, name="pact_w4a4", estimator="pact", hadamard=False), [4.30, None, 4.20]),
}  # fmt: skip
MODEL = {"n_layer": 2, "d_model": 128, "n_head": 1, "seq_len": 128}
DATA = {"source": "embedded", "batch_size": 16, "vocab_size": 2048, "val_batches": 8}
TRAINER = {"accumulate_grad_batches": 1, "devices": 1, "num_nodes": 1}


def fake_sweep(root, seeds=(0, 1, 2), seed_in_dir=True, arms=ARMS, align_steps=(0, 10, 20)):
    from omegaconf import OmegaConf
    from torch.utils.tensorboard import SummaryWriter

    num = 0
    for arm, (quant, losses) in arms.items():
        for seed in seeds:
            job = root / (f"{num}_{arm}_s{seed}" if seed_in_dir else f"{num}_{arm}")
            num += 1
            (job / ".hydra").mkdir(parents=True)
            cfg = {"quant": quant, "seed": seed, "model": MODEL, "data": DATA, "trainer": TRAINER}
            OmegaConf.save(OmegaConf.create(cfg), job / ".hydra" / "config.yaml")
            loss = losses[seed]
            metrics = {"step": 20, "wall_s": 3.0 + seed, "non_embedding_params": 500_000}
            metrics.update({"status": "diverged", "val/loss": None} if loss is None else {"val/loss": loss})
            if loss is not None:
                metrics["val/ppl"] = math.exp(loss)
            if arm == "bf16" and seed == 0:
                metrics.pop("status", None)  # older sweeps: no status means ok
            (job / "metrics.json").write_text(json.dumps(metrics))
            writer = SummaryWriter(str(job / "tensorboard"))
            for step in (0, 10, 20):
                value = (loss or 5.0) + (20 - step) / 10
                writer.add_scalar("val/loss", value, step)
                writer.add_scalar("train/loss", value, step)
                writer.add_scalar("train/tokens_per_sec", 1000.0 * (seed + 1), step)
                if quant["grid"] and step in align_steps:
                    writer.add_scalar("align/model", 0.2 if step == 0 else 0.9, step)  # step 0 is excluded
                    writer.add_scalar("align/block/0", 0.8, step)
                    for layer in ("blocks.0.attn.c_attn", "blocks.1.mlp.w12", "blocks.0.mlp.c_proj"):
                        writer.add_scalar(f"align/cos/{layer}", 0.7, step)
                        writer.add_scalar(f"align/row_mean/{layer}", 0.6, step)
                        writer.add_scalar(f"align/row_std/{layer}", 0.1, step)
                        writer.add_scalar(f"mask/frac/{layer}/weight", 0.02, step)
                        writer.add_scalar(f"mask/frac/{layer}/act", 0.04, step)
                    writer.add_scalar("mask/expected", 0.03, step)
            writer.close()
    (root / f"{num}_unfinished_s0").mkdir()  # a job without metrics.json is not a row
    return root


def read_rows(path):
    with open(path) as f:
        return {r["arm"]: r for r in csv.DictReader(f)}


# ---- statistics ---------------------------------------------------------------------------------------------------


def test_t_quantile_exact():
    from quest_pl.report import t_quantile

    assert t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)  # Cauchy
    assert t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95**2)), rel=1e-9)  # t/sqrt(2+t^2)=.95
    for df, table in ((3, 3.182446), (4, 2.776445), (10, 2.228139), (30, 2.042272)):  # standard t tables
        assert t_quantile(0.975, df) == pytest.approx(table, abs=2e-6)
    with pytest.raises(ValueError, match="df=0"):
        t_quantile(0.975, 0)


def test_paired_summary_hand_computed():
    """d = (0.05, 0.10, 0.02): mean 0.056667, s = sqrt(0.0032667 / 2) = 0.040415, half width t(0.975, 2) s / sqrt 3
    = 4.302653 x 0.023333 = 0.100395, interval [-0.043728, 0.157062]: contains 0."""
    from quest_pl.report.statistics import SINGLE_PAIR, paired_summary

    s = paired_summary([0.05, 0.10, 0.02])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.0566667, abs=1e-7)
    assert s["std"] == pytest.approx(0.0404145, abs=1e-7)
    assert (s["low"], s["high"]) == (pytest.approx(-0.043728, abs=2e-6), pytest.approx(0.157062, abs=2e-6))
    assert s["verdict"] == "not significant"
    s = paired_summary([0.50, 0.52, 0.51])  # s = 0.01: [0.51 -+ 0.024841]
    assert (s["low"], s["high"]) == (pytest.approx(0.485159, abs=2e-6), pytest.approx(0.534841, abs=2e-6))
    assert s["verdict"] == "significant"
    one = paired_summary([0.3])
    assert (one["mean"], one["std"], one["low"], one["verdict"]) == (0.3, None, None, SINGLE_PAIR)


# ---- the report ---------------------------------------------------------------------------------------------------


def test_report_groups_seeds_with_paired_intervals(tmp_path):
    from quest_pl.report import write_report
    from quest_pl.report.tables import COLUMNS

    rows = write_report(fake_sweep(tmp_path), ptq=False)
    assert [r["arm"] for r in rows] == list(ARMS)
    csv_rows = read_rows(tmp_path / "summary.csv")
    with open(tmp_path / "summary.csv") as f:
        assert tuple(next(csv.reader(f))) == COLUMNS
    q, w1, base, pact = (csv_rows[a] for a in ("quest_w4a4", "quest_w1a16", "bf16", "pact_w4a4"))
    assert (base["method"], base["bits"], base["grid"], base["status"]) == ("BF16", "W16A16", "-", "ok")
    assert (q["method"], q["grid"], q["bits"], q["estimator"], q["hadamard"]) == (
        "QAT", "gaussian_mse", "W4A4", "trust", "half"
    )  # fmt: skip
    assert (w1["bits"], w1["estimator"]) == ("W1A16", "clip(c=1.3)")
    assert float(q["val_loss"]) == pytest.approx((4.05 + 4.20 + 3.92) / 3)
    assert float(base["val_loss_std"]) == pytest.approx(0.1)
    assert float(q["delta_bf16"]) == pytest.approx(0.0566667, abs=1e-6)
    assert float(q["delta_ci_low"]) == pytest.approx(-0.043728, abs=2e-6) and q["verdict"] == "not significant"
    assert w1["verdict"] == "significant" and q["seeds"] == "3"
    # a diverged seed: listed, excluded from the means and the pairing
    assert pact["status"] == "diverged 1/3" and pact["seeds"] == "3"
    assert float(pact["val_loss"]) == pytest.approx(4.25) and float(pact["delta_bf16"]) == pytest.approx(0.3)
    assert float(q["align_mean"]) == pytest.approx(0.9)  # step 0 excluded
    assert float(q["mask_frac"]) == pytest.approx(0.03)
    assert base["align_mean"] == "" and base["mask_frac"] == ""
    with open(tmp_path / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 12 and {r["status"] for r in runs} == {"ok", "diverged"}
    md = (tmp_path / "summary.md").read_text()
    assert all(f"| {arm} |" in md for arm in ARMS)
    assert "+0.0567 [-0.0437, +0.1571]" in md and "diverged 1/3" in md
    for label in ("model", "tokens", "tokens per parameter", "seeds", "data", "report"):
        assert f"**{label}**" in md
    assert "0.50 M non-embedding parameters" in md and "40,960 seen (20 steps x 2,048 tokens/step)" in md
    assert "git commit" in md
    for name in ("loss_curves", "delta_bf16", "alignment_by_depth", "masked_fraction"):
        for ext in ("pdf", "png"):
            assert (tmp_path / f"{name}.{ext}").stat().st_size > 1000, (name, ext)


def test_single_seed_is_a_pipeline_check(tmp_path):
    from quest_pl.report import write_report
    from quest_pl.report.statistics import SINGLE_PAIR

    rows = write_report(fake_sweep(tmp_path, seeds=(0,)), ptq=False)
    q = next(r for r in rows if r["arm"] == "quest_w4a4")
    assert q["verdict"] == SINGLE_PAIR and q["delta_ci_low"] is None and q["val_loss_std"] is None
    assert "1 seed: pipeline check" in (tmp_path / "summary.md").read_text()


def test_old_sweep_without_seed_in_dir_names_groups_by_arm(tmp_path):
    """``-m seed=0,1`` without an experiment: job dirs are <num>_<arm>; the seed comes from the job's config."""
    from quest_pl.report import write_report

    rows = write_report(fake_sweep(tmp_path, seeds=(0, 1), seed_in_dir=False), ptq=False)
    assert [(r["arm"], r["seeds"]) for r in rows][:2] == [("bf16", 2), ("quest_w4a4", 2)]


def test_alignment_layers_in_depth_order(tmp_path):
    from quest_pl.report import collect

    jobs = collect(fake_sweep(tmp_path, seeds=(0,)))
    layers = [layer for layer, *_ in jobs[1]["_align_depth"]["weight"]]
    assert layers == ["blocks.0.attn.c_attn", "blocks.0.mlp.c_proj", "blocks.1.mlp.w12"]


def test_alignment_logged_only_at_step0(tmp_path):
    """A run shorter than the alignment interval logs it at step 0 alone, which the report leaves out (untrained
    model): the report and every figure are still written, the alignment columns are empty and the depth panel says
    why instead of crashing on an empty mean."""
    from quest_pl.report import collect, write_report

    sweep = fake_sweep(tmp_path, seeds=(0, 1), align_steps=(0,))
    assert all(not j["_align_depth"]["weight"] for j in collect(sweep))
    rows = write_report(sweep, ptq=False)
    assert next(r for r in rows if r["arm"] == "quest_w4a4")["align_mean"] is None
    assert (sweep / "alignment_by_depth.png").stat().st_size > 0
    # the table shows storage bits per element with the scales: 4 + 16 / d_model for a 16-bit scale per row of 128
    text = (sweep / "summary.md").read_text()
    assert "| bits/elem |" in text and "W4.125A4.125" in text


def test_report_cli_regenerates(tmp_path):
    fake_sweep(tmp_path, seeds=(0, 1))
    out = subprocess.run(
        [sys.executable, "-m", "quest_pl.report", str(tmp_path), "--no-ptq"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "quest_w4a4" in out.stdout and (tmp_path / "summary.csv").is_file()


def test_report_errors_are_one_line(tmp_path):
    from quest_pl.config import ConfigError
    from quest_pl.report import main, write_report

    fake_sweep(tmp_path, seeds=(0,))
    bad = tmp_path / "1_quest_w4a4_s0" / "metrics.json"
    bad.write_text('{"val/loss": 4.0,')
    with pytest.raises(ConfigError, match=r"1_quest_w4a4_s0/metrics.json: malformed metrics.json"):
        write_report(tmp_path, ptq=False)
    bad.write_text('{"val/loss": 4.0, "status": "exploded"}')
    with pytest.raises(ConfigError, match="status='exploded'"):
        write_report(tmp_path, ptq=False)
    assert main([str(tmp_path / "nope")]) == 2


def test_report_cli_errors(tmp_path):
    for target in (tmp_path / "nope", tmp_path):
        out = subprocess.run(
            [sys.executable, "-m", "quest_pl.report", str(target)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr


def test_describe_names_hadamard_block_and_quantized_backward():
    """A block-scaled arm rotates per group and may quantize its backward: the table says both, so two arms that
    differ only there are told apart."""
    from quest_pl.report import describe_quant

    resolved = dict(QUEST, w_bits=4, a_bits=4)
    nvfp4 = dict(resolved, grid="nvfp4", hadamard_block=16, backward="sr")
    row = describe_quant(nvfp4)
    assert (row["hadamard"], row["estimator"]) == ("half, block 16", "trust, sr backward")
    row = describe_quant(dict(resolved, hadamard_block=128, backward="none", backward_format="int8"))
    assert (row["hadamard"], row["estimator"]) == ("half", "trust")
    row = describe_quant(dict(nvfp4, backward_format="nvfp4", backward_operands="grad"))
    assert row["estimator"] == "trust, sr backward"  # the defaults, as older runs' configs (without the keys) read
    row = describe_quant(dict(nvfp4, backward_format="mxfp4", backward_operands="all"))
    assert row["estimator"] == "trust, sr backward (mxfp4, all)"
    assert describe_quant(dict(nvfp4, backward_format="int8"))["estimator"] == "trust, sr backward (int8, grad)"


# ---- PTQ rows at the arms' formats -----------------------------------------------------------------------------------
def test_ptq_rows_count_bits_per_element_as_qat_rows():
    """A PTQ row's bits_per_elem is its arm's (quest_pl.quant.bits_per_element) at the same format: element bits plus
    16-bit scales per row (d = 128) or per group of 32, MX's 8-bit scales per 32, NV's per 16; W..A16 for the
    weight-only row; AQLM's bits per weight with codebooks and scales from its metrics.json."""
    import math

    from omegaconf import OmegaConf

    from quest_pl.ptq import PTQConfig, ptq_row, sweep_configs
    from quest_pl.quant import bits_per_element
    from tests.conftest import compose

    metrics = {"val/loss": 4.0, "val/ppl": math.exp(4.0), "step": 20}
    expected = {"quest_w4a4": 4 + 16 / 128, "int4_g32": 4 + 16 / 32, "mxfp4": 4 + 8 / 32, "nvfp4_4over6": 4 + 8 / 16}
    for arm, bits in expected.items():
        q = OmegaConf.to_container(compose("experiment=format_ablation", f"quant={arm}").quant, resolve=True)
        both, weight_only = sweep_configs([{"method": "QAT", "_quant": q}])
        assert (
            ptq_row(both, metrics, row_length=128)["bits_per_elem"] == bits_per_element(q, 128) == f"W{bits:g}A{bits:g}"
        )
        assert ptq_row(weight_only, metrics, row_length=128)["bits_per_elem"] == f"W{bits:g}A16"
        assert bits_per_element(dict(q, a_bits=None), 128) == f"W{bits:g}A16"
    # a PTQ-only weight group (384, no power of two): its scales per 384 weights; activations per token of 128
    assert PTQConfig(group_size=384, act_bits=4).bits_per_element(128) == f"W{4 + 16 / 384:.4g}A{4 + 16 / 128:g}"
    aqlm = ptq_row(PTQConfig(method="aqlm", bits=2), dict(metrics, aqlm={"bits_per_weight": 2.75}), row_length=128)
    assert aqlm["bits_per_elem"] == "W2.75A16"


@pytest.mark.slow
def test_format_ablation_report_has_a_ptq_row_per_arm_format(tmp_path):
    """experiment=format_ablation with the PTQ rows (the default), three arms, a few steps on CPU: one PTQ row per arm
    format (W4A4 and weight-only) at the arm's group size, scale rule and Hadamard block, with bits/elem, evaluated
    with exactly those settings."""
    from tests.conftest import run_cli

    out = run_cli(
        "experiment=format_ablation", "quant=bf16,int4_g32,nvfp4_4over6", "trainer.max_steps=4",
        "trainer.val_check_interval=2", "data.val_batches=1", "seeds=[0]", f"hydra.sweep.dir={tmp_path}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_rows(tmp_path / "summary.csv")
    ptq = {a: r for a, r in rows.items() if r["method"] == "PTQ"}
    assert list(ptq) == [
        "ptq_gaussian_mse_g32_w4a4", "ptq_gaussian_mse_g32_w4a16",
        "ptq_nvfp4_4over6_h16_w4a4", "ptq_nvfp4_4over6_h16_w4a16",
    ]  # fmt: skip
    assert rows["int4_g32_w4a4"]["bits_per_elem"] == ptq["ptq_gaussian_mse_g32_w4a4"]["bits_per_elem"] == "W4.5A4.5"
    assert rows["nvfp4_4over6_w4a4"]["bits_per_elem"] == ptq["ptq_nvfp4_4over6_h16_w4a4"]["bits_per_elem"] == "W4.5A4.5"
    assert ptq["ptq_nvfp4_4over6_h16_w4a16"]["bits_per_elem"] == "W4.5A16"
    assert ptq["ptq_nvfp4_4over6_h16_w4a4"]["hadamard"] == rows["nvfp4_4over6_w4a4"]["hadamard"] == "half, block 16"
    assert all(float(r["val_loss"]) > 0 for r in ptq.values())
    settings = {a: json.loads((tmp_path / "ptq" / a / "metrics.json").read_text())["ptq"] for a in ptq}
    g32, nv = settings["ptq_gaussian_mse_g32_w4a4"], settings["ptq_nvfp4_4over6_h16_w4a4"]
    assert (g32["group_size"], g32["act_group_size"], g32["hadamard_block"]) == (32, 32, 128)
    assert (nv["grid"], nv["scale_rule"], nv["hadamard_block"], nv["act_bits"]) == ("nvfp4", "four_over_six", 16, 4)


def test_runs_of_one_arm_name_with_different_settings_are_separate_arms(tmp_path):
    """A sweep over a key that the arm name does not show (``optim.lr=0.003,0.01`` with ``quant=bf16,quest_w4a4``)
    must not pool the two QuEST settings as four seeds of one arm: each setting is its own row, labelled with the
    differing key, and is paired with the BF16 run of the same seed and the same optim.lr (none here for 0.01)."""
    import shutil

    from omegaconf import OmegaConf

    from quest_pl.report import write_report

    sweep = fake_sweep(tmp_path, seeds=(0, 1), arms={a: ARMS[a] for a in ("bf16", "quest_w4a4")})
    for job in [d for d in sweep.iterdir() if (d / "metrics.json").is_file()]:
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        cfg.optim = {"lr": 0.003}
        OmegaConf.save(cfg, job / ".hydra" / "config.yaml")
    for seed, loss in ((0, 4.5), (1, 4.7)):
        variant = sweep / f"{10 + seed}_quest_w4a4_s{seed}"
        shutil.copytree(sweep / f"{2 + seed}_quest_w4a4_s{seed}", variant)
        cfg = OmegaConf.load(variant / ".hydra" / "config.yaml")
        cfg.optim.lr = 0.01
        OmegaConf.save(cfg, variant / ".hydra" / "config.yaml")
        metrics = json.loads((variant / "metrics.json").read_text())
        (variant / "metrics.json").write_text(json.dumps(dict(metrics, **{"val/loss": loss})))
    rows = {r["arm"]: r for r in write_report(sweep, ptq=False)}
    low, high = rows["quest_w4a4 [optim.lr=0.003]"], rows["quest_w4a4 [optim.lr=0.01]"]
    assert (low["seeds"], high["seeds"]) == (2, 2)
    assert low["val_loss"] == pytest.approx((4.05 + 4.20) / 2) and high["val_loss"] == pytest.approx(4.6)
    assert low["delta_bf16"] == pytest.approx(((4.05 - 4.00) + (4.20 - 4.10)) / 2)
    assert high["delta_bf16"] is None  # no BF16 run at optim.lr=0.01 to pair with


# ---- what the statistics count ------------------------------------------------------------------------------------


def test_a_duplicate_job_is_counted_once(tmp_path):
    """The same arm and seed twice (a re-run job directory) is one seed and one pair: no interval from it, never
    "significant"; the later finished job is the one kept."""
    import shutil

    from quest_pl.report import write_report
    from quest_pl.report.statistics import SINGLE_PAIR

    sweep = fake_sweep(tmp_path, seeds=(0,), arms={a: ARMS[a] for a in ("bf16", "quest_w4a4")})
    shutil.copytree(sweep / "1_quest_w4a4_s0", sweep / "7_quest_w4a4_s0")
    metrics = json.loads((sweep / "7_quest_w4a4_s0" / "metrics.json").read_text())
    (sweep / "7_quest_w4a4_s0" / "metrics.json").write_text(json.dumps(dict(metrics, **{"val/loss": 4.07})))
    q = {r["arm"]: r for r in write_report(sweep, ptq=False)}["quest_w4a4"]
    assert (q["seeds"], q["pairs"], q["verdict"]) == (1, 1, SINGLE_PAIR)
    assert q["delta_bf16"] == pytest.approx(0.07) and q["delta_ci_low"] is None
    assert "| 1 | 1 |" in (sweep / "summary.md").read_text()  # seeds and pairs columns


def test_every_statistic_of_an_arm_uses_the_same_paired_seeds(tmp_path):
    """BF16 finished seeds 0 and 1 only: QuEST's three seeds give two pairs, and its mean loss, std and difference
    are all over seeds 0 and 1; an arm left with one pair (two of three seeds diverged) has no interval."""
    import shutil

    from quest_pl.report import write_report
    from quest_pl.report.statistics import SINGLE_PAIR

    arms = {
        "bf16": ARMS["bf16"],
        "quest_w4a4": ARMS["quest_w4a4"],
        "pact_w4a4": (ARMS["pact_w4a4"][0], [4.3, None, None]),
    }
    sweep = fake_sweep(tmp_path, arms=arms)
    shutil.rmtree(sweep / "2_bf16_s2")
    rows = {r["arm"]: r for r in write_report(sweep, ptq=False)}
    q, pact = rows["quest_w4a4"], rows["pact_w4a4"]
    assert (q["seeds"], q["pairs"]) == (3, 2)
    assert q["val_loss"] == pytest.approx((4.05 + 4.20) / 2) and q["val_loss_std"] == pytest.approx(0.15 / math.sqrt(2))
    assert q["delta_bf16"] == pytest.approx((0.05 + 0.10) / 2) and q["delta_ci_low"] is not None
    assert (pact["seeds"], pact["pairs"], pact["verdict"]) == (3, 1, SINGLE_PAIR)
    assert pact["status"] == "diverged 2/3"


def test_identical_differences_are_never_significant():
    """Two pairs with the same difference: zero spread gives no interval (a zero-width one would claim certainty)."""
    from quest_pl.report.statistics import NO_SPREAD, paired_summary

    s = paired_summary([0.002, 0.002])
    assert (s["mean"], s["std"], s["low"], s["high"], s["verdict"]) == (0.002, 0.0, None, None, NO_SPREAD)


def test_header_of_a_sweep_over_sizes_gives_each_jobs_budget(tmp_path):
    """A sweep whose jobs differ in size and steps (a scaling ladder at a fixed tokens-per-parameter ratio): the header
    gives the ranges and the ratio of each job, not the first job's size against the longest job's tokens."""
    from quest_pl.report.tables import what_was_run

    jobs = []
    for n_layer, steps in ((1, 64), (2, 128), (3, 192)):
        job_dir = tmp_path / f"{n_layer}"
        job_dir.mkdir()
        (job_dir / "metrics.json").write_text("{}")
        model = {"n_layer": n_layer, "d_model": 128, "n_head": 1, "seq_len": 128}
        cfg = {"model": model, "data": {"batch_size": 16, "source": "embedded"}, "trainer": {}}
        params = n_layer * 262_144
        jobs.append({"_config": cfg, "_metrics": {"non_embedding_params": params}, "steps": steps, "seed": 0,
                     "_job_dir": job_dir})  # fmt: skip
    lines = dict(what_was_run(jobs))
    assert lines["tokens per parameter"] == "0.5"  # 64 x 2,048 / 262,144 for every job
    assert lines["model"] == "1 to 3 x 128 (heads 1, seq 128), 0.26 to 0.79 M non-embedding parameters"
    assert lines["tokens"] == "131,072 to 393,216 seen per job (64 to 192 steps x 2,048 tokens/step)"
    jobs[2]["steps"] = 96  # one job off the ratio
    assert dict(what_was_run(jobs))["tokens per parameter"] == "0.25 to 0.5"
