"""The sweep report on a synthetic sweep directory: one row per arm, deltas to BF16, diagnostics columns, plots, and
regeneration from the command line (``python -m quest_pl.report DIR``)."""

import csv
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

ARMS = {  # arm -> (quant group, final val loss)
    "bf16": ({"name": "bf16", "grid": None, "bits": None, "w_bits": None, "a_bits": None}, 4.0),
    "quest_w4a4": (
        {"name": "quest_w4a4", "grid": "gaussian_mse", "bits": 4, "w_bits": "${.bits}", "a_bits": "${.bits}",
         "estimator": "trust", "hadamard": True, "hadamard_mode": "half"},
        4.1,
    ),
    "quest_w1a16": (
        {"name": "quest_w1a16", "grid": "gaussian_mse", "bits": 1, "w_bits": "${.bits}", "a_bits": None,
         "estimator": "clip", "clip_scale": 1.3, "hadamard": True},
        4.5,
    ),
}  # fmt: skip


def fake_sweep(root):
    from omegaconf import OmegaConf
    from torch.utils.tensorboard import SummaryWriter

    for num, (arm, (quant, loss)) in enumerate(ARMS.items()):
        job = root / f"{num}_{arm}"
        (job / ".hydra").mkdir(parents=True)
        OmegaConf.save(
            OmegaConf.create({"quant": quant, "run_name": "${arm_name:${quant}}"}), job / ".hydra" / "config.yaml"
        )
        (job / "metrics.json").write_text(
            json.dumps({"val/loss": loss, "val/ppl": 2.718**loss, "step": 20, "wall_s": 3.0 + num})
        )
        writer = SummaryWriter(str(job / "tensorboard"))
        for step in (0, 10, 20):
            writer.add_scalar("val/loss", loss + (20 - step) / 10, step)
            writer.add_scalar("train/loss", loss + (20 - step) / 10, step)
            writer.add_scalar("train/tokens_per_sec", 1000.0 * (num + 1), step)
            if quant["grid"]:
                writer.add_scalar("align/model", 0.9, step)
                writer.add_scalar("align/block/0", 0.8, step)
                for layer in ("blocks.0.attn.c_attn", "blocks.1.mlp.w12", "blocks.0.mlp.c_proj"):
                    writer.add_scalar(f"align/cos/{layer}", 0.7, step)
                    writer.add_scalar(f"mask/frac/{layer}/weight", 0.02, step)
                    writer.add_scalar(f"mask/frac/{layer}/act", 0.04, step)
                writer.add_scalar("mask/expected", 0.03, step)
        writer.close()
    (root / "2_unfinished").mkdir()  # a job without metrics.json is not a row
    return root


def read_rows(path):
    with open(path) as f:
        return {r["arm"]: r for r in csv.DictReader(f)}


def test_report_rows_and_files(tmp_path):
    from quest_pl.report import COLUMNS, write_report

    rows = write_report(fake_sweep(tmp_path), ptq=False)
    assert [r["arm"] for r in rows] == list(ARMS)
    csv_rows = read_rows(tmp_path / "summary.csv")
    assert list(csv_rows) == list(ARMS)
    with open(tmp_path / "summary.csv") as f:
        assert tuple(next(csv.reader(f))) == COLUMNS
    q, w1, base = csv_rows["quest_w4a4"], csv_rows["quest_w1a16"], csv_rows["bf16"]
    assert (base["method"], base["bits"], base["grid"]) == ("BF16", "W16A16", "-")
    assert (q["method"], q["grid"], q["bits"], q["estimator"], q["hadamard"]) == (
        "QAT", "gaussian_mse", "W4A4", "trust", "half"
    )  # fmt: skip
    assert (w1["bits"], w1["estimator"]) == ("W1A16", "clip(c=1.3)")
    assert float(q["delta_bf16"]) == pytest.approx(0.1) and float(base["delta_bf16"]) == 0.0
    assert float(q["align_mean"]) == pytest.approx(0.9) and float(q["align_block0"]) == pytest.approx(0.8)
    assert float(q["mask_frac"]) == pytest.approx(0.03)
    assert base["align_mean"] == "" and base["mask_frac"] == ""
    assert float(w1["tokens_per_s"]) == pytest.approx(3000.0) and float(w1["wall_s"]) == 5.0
    md = (tmp_path / "summary.md").read_text()
    assert all(f"| {arm} |" in md for arm in ARMS)
    for png in ("val_loss.png", "alignment_by_depth.png", "masked_fraction.png"):
        assert (tmp_path / png).stat().st_size > 1000, png


def test_alignment_layers_in_depth_order(tmp_path):
    from quest_pl.report import collect

    rows = collect(fake_sweep(tmp_path))
    layers = [layer for layer, _ in rows[1]["_align_depth"]]
    assert layers == ["blocks.0.attn.c_attn", "blocks.0.mlp.c_proj", "blocks.1.mlp.w12"]


def test_report_cli_regenerates(tmp_path):
    fake_sweep(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "quest_pl.report", str(tmp_path), "--no-ptq"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "quest_w4a4" in out.stdout and (tmp_path / "summary.csv").is_file()


def test_report_cli_errors(tmp_path):
    for target in (tmp_path / "nope", tmp_path):
        out = subprocess.run(
            [sys.executable, "-m", "quest_pl.report", str(target)], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 2 and out.stderr.startswith("error: "), out.stderr
