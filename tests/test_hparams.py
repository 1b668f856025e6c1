"""TensorBoard's hparams tab (quest_pl.hparams), read back from the event files the way TensorBoard's loader reads
them: a run lists its arm, seed and quant keys; a sweep report replaces that by arm, seed and the keys that differ
across the sweep's jobs (PTQ runs included), in a file TensorBoard reads before the run's own."""

import json

from tests.test_report import ARMS, fake_sweep


def test_run_values_are_arm_seed_and_quant(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from quest_pl import hparams
    from quest_pl.config import compose

    cfg = compose("quant=quest_w4a4", "quant.bits=3", "seed=5")
    values = hparams.run_values(cfg)
    assert values["arm"] == "quest_w3a3" and values["seed"] == 5
    assert values["quant.grid"] == "gaussian_mse" and values["quant.w_bits"] == 3
    assert set(values) - {"arm", "seed"} == {k for k in values if k.startswith("quant.")}
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tensorboard", version="", default_hp_metric=False)
    hparams.write(logger, values)
    logger.finalize("success")
    columns, shown = hparams.read(tmp_path / "tensorboard")
    assert columns == list(values) and shown["arm"] == "quest_w3a3" and shown["seed"] == 5
    assert shown["quant.hadamard"] == "true" and shown["quant.a_bits"] == 3


def _old_style_hparams(tb_dir, arm):
    """What a run wrote before: every config key (the report's file must win over it)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    writer = SummaryWriter(str(tb_dir))
    for summary in hparams({"arm": arm, "model.n_layer": 2, "data.vocab_size": 2048}, {"val/loss": 0.0}):
        writer.file_writer.add_summary(summary)
    writer.close()


def test_sweep_lists_only_differing_keys_arm_and_seed(tmp_path):
    from quest_pl import hparams
    from quest_pl.report import collect, write_report, write_tensorboard_hparams

    sweep = fake_sweep(tmp_path, seeds=(0, 1))
    for job in sweep.iterdir():
        if (job / "tensorboard").is_dir():
            _old_style_hparams(job / "tensorboard", "stale")
    write_report(sweep, ptq=False)
    jobs = sorted(d for d in sweep.iterdir() if (d / "metrics.json").is_file())
    assert len(jobs) == 2 * len(ARMS)
    shown = {}
    for job in jobs:
        columns, values = hparams.read(job / "tensorboard")
        shown[job.name] = values
        assert columns[:2] == ["arm", "seed"]
        # differ across the arms: name, grid, bits, estimator, ...; equal everywhere: model, data, trainer
        assert {"quant.name", "quant.grid", "quant.estimator", "quant.a_bits"} <= set(columns)
        assert not [c for c in columns if c.startswith(("model.", "data.", "trainer."))]
    assert shown["2_quest_w4a4_s0"]["arm"] == "quest_w4a4" and shown["3_quest_w4a4_s1"]["seed"] == 1
    # a_bits mixes numbers and null across the arms: written as strings throughout
    assert shown["2_quest_w4a4_s0"]["quant.a_bits"] == "4" and shown["0_bf16_s0"]["quant.a_bits"] == "null"
    assert "quant.clip_scale" not in shown["0_bf16_s0"] and shown["4_quest_w1a16_s0"]["quant.clip_scale"] == 1.3
    # regenerating the report rewrites the same file; a PTQ run is listed with its own keys
    ptq_dir = sweep / "ptq" / "ptq_gaussian_mse_w4a4" / "tensorboard"
    ptq_dir.mkdir(parents=True)
    _old_style_hparams(ptq_dir, "stale")
    settings = {"grid": "gaussian_mse", "bits": 4, "hadamard": True, "group_size": None, "act_bits": 4}
    (ptq_dir.parent / "metrics.json").write_text(json.dumps({"ptq": settings, "val/loss": 4.1}))
    ptq2 = dict(settings, act_bits=None)
    (sweep / "ptq" / "ptq_gaussian_mse_w4a16" / "tensorboard").mkdir(parents=True)
    (sweep / "ptq" / "ptq_gaussian_mse_w4a16" / "metrics.json").write_text(json.dumps({"ptq": ptq2}))
    jobs = collect(sweep)
    for name in ("ptq_gaussian_mse_w4a4", "ptq_gaussian_mse_w4a16"):
        jobs.append({"arm": name, "seed": 0, "method": "PTQ", "_job_dir": sweep / "ptq" / name})
    written = write_tensorboard_hparams(jobs)
    assert len(written) == len(jobs) and {p.name for p in written} == {hparams.SWEEP_EVENT_FILE}
    columns, ptq = hparams.read(ptq_dir)
    assert ptq["arm"] == "ptq_gaussian_mse_w4a4" and ptq["seed"] == 0 and ptq["ptq.act_bits"] == "4"
    assert "quant.name" not in ptq and "ptq.bits" not in columns  # no quant keys; ptq.bits is 4 in both
    assert hparams.read(sweep / "0_bf16_s0" / "tensorboard")[0] == columns  # the same columns in every run


def test_numbers_stay_numbers_null_makes_strings(tmp_path):
    from quest_pl import hparams

    per_job = hparams.sweep_values(
        [{"arm": "a", "seed": 0, "values": {"q.bits": 4, "q.a": None, "q.same": 1}},
         {"arm": "b", "seed": 1, "values": {"q.bits": 1.5, "q.a": 2, "q.same": 1}}]
    )  # fmt: skip
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    hparams.write_sweep_hparams(dirs, per_job)
    columns, a = hparams.read(dirs[0])
    _, b = hparams.read(dirs[1])
    assert columns == ["arm", "seed", "q.bits", "q.a"]
    assert (a["q.bits"], b["q.bits"], a["q.a"], b["q.a"], b["seed"]) == (4, 1.5, "null", "2", 1)


def test_learned_scales_are_logged_as_scalars():
    """LSQ steps and PACT clip levels: one ``quant_scale/<layer>/weight|act`` scalar each (what a user watches)."""
    import pytest
    import torch

    from quest_pl.module import LMModule
    from quest_pl.probe import quant_group
    from tests.test_probe import OPTIM, TINY

    for name in ("lsq_w4a4", "pact_w4a4"):
        module = LMModule(TINY, OPTIM, quant=quant_group(name))
        with torch.no_grad():
            module.model(torch.randint(0, TINY["vocab_size"], (2, 32)))  # data-dependent initialisation
        logged = {}
        module.log = lambda tag, value, _logged=logged, **_: _logged.__setitem__(tag, float(value))
        module._log_learned_scales()
        assert len(logged) == 2 * 4 * 2, (name, sorted(logged))  # 2 blocks x 4 linears x (weight, act)
        layer = module.model.get_submodule("blocks.1.mlp.w12")
        for operand, quant in (("weight", layer.weight_quant), ("act", layer.act_quant)):
            expected = quant.learned.mean().item()
            assert logged[f"quant_scale/blocks.1.mlp.w12/{operand}"] == pytest.approx(expected) and expected > 0


def test_custom_scalars_layout_puts_train_and_val_first(tmp_path):
    import re

    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    from quest_pl import hparams

    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tensorboard", version="", default_hp_metric=False)
    hparams.write_layout(logger)
    logger.finalize("success")
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    assert layout.category[0].title == "train / val"
    loss = layout.category[0].chart[0].multiline.tag
    assert [t for t in ("train/loss", "val/loss", "val/ppl") if any(re.search(r, t) for r in loss)] == [
        "train/loss",
        "val/loss",
    ]
    scales = [r for c in layout.category for ch in c.chart for r in ch.multiline.tag if "quant_scale" in r]
    assert any(re.search(r, "quant_scale/blocks.0.attn.c_attn/weight") for r in scales)
    assert any(re.search(r, "quant_scale/blocks.1.mlp.w12/act") for r in scales)
