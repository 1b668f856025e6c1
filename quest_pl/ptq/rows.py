"""The PTQ rows of a sweep's report: the settings an experiment lists, evaluated on each seed's BF16 checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from quest_pl import quantizers
from quest_pl.config.ptq import PTQConfig, named_scale_rule
from quest_pl.ptq.job import evaluate
from quest_pl.quantizers.base import format_bits_per_element

log = logging.getLogger(__name__)


def sweep_configs(rows: list[dict]) -> list[PTQConfig]:
    """PTQ settings matching a sweep's quantized arms, one per distinct format, in arm order: each arm's weight grid
    and bits, group size (weights, and activations when quantized), scale rule and Hadamard block, with the arm's
    activation quantization (WbAb) and weight-only (WbA16); always with the Hadamard rotation (HIGGS), at the arm's
    block. What only shapes a QAT arm's gradient (estimator, trust threshold, quantized backward) makes no separate
    PTQ setting: PTQ does not train. When an arm has 2-bit weights, AQLM at 2 bits (``aqlm_w2``, the default 2x8
    layout, calibrated) follows the 2-bit rows."""
    configs = []
    for r in rows:
        q = r.get("_quant") or {}
        if r.get("method") != "QAT" or q.get("w_bits") is None:
            continue
        w_grid = q.get("w_grid") or q.get("grid")
        a_grid = q.get("a_grid") or q.get("grid")
        group = q.get("group_size")
        for act_bits in (q.get("a_bits"), None):
            c = PTQConfig(
                grid=w_grid,
                bits=q["w_bits"],
                hadamard=True,
                group_size=group,
                act_bits=act_bits,
                act_grid=None if act_bits is None or a_grid == w_grid else a_grid,
                scale_rule=named_scale_rule(w_grid, q.get("scale_rule")),
                act_group_size=None if act_bits is None else group,
                hadamard_block=int(q.get("hadamard_block") or quantizers.HADAMARD_BLOCK),
            )
            if c not in configs:
                configs.append(c)
    two_bit = [i for i, c in enumerate(configs) if float(c.bits) == 2]
    if two_bit:  # the calibrated vector-quantization baseline at 2 bits (aqlm_w2), after the scalar 2-bit rows
        configs.insert(two_bit[-1] + 1, PTQConfig(method="aqlm", bits=2, hadamard=True))
    return configs


def sweep_rows(rows: list[dict], sweep_dir: str | Path) -> list[dict]:
    """Report rows (:mod:`quest_pl.report`) for PTQ of the sweep's BF16 arm at the quantized arms' formats
    (:func:`sweep_configs`).
    Each evaluation is kept in ``<sweep dir>/ptq/<name>/`` (TensorBoard and metrics.json) and reused when the report
    is regenerated from the same checkpoint."""
    base = next((r for r in rows if r.get("method") == "BF16"), None)
    if base is None:
        return []
    ckpt_path = base["_job_dir"] / "checkpoints" / "last.ckpt"
    if not ckpt_path.is_file():
        log.warning("no %s: PTQ rows skipped", ckpt_path)
        return []
    data_cfg = OmegaConf.load(base["_job_dir"] / ".hydra" / "config.yaml")
    out = []
    lightning_log = logging.getLogger("lightning.pytorch")  # no "GPU available" banner per evaluation
    level, lightning_log.level = lightning_log.level, logging.WARNING
    try:
        for ptq in sweep_configs(rows):
            out.append(_sweep_row(ptq, ckpt_path, data_cfg, Path(sweep_dir)))
    finally:
        lightning_log.setLevel(level)
    return out


def _sweep_row(ptq: PTQConfig, ckpt_path: Path, data_cfg: DictConfig, sweep_dir: Path) -> dict:
    run_dir = sweep_dir / "ptq" / ptq.name
    cached = run_dir / "metrics.json"
    metrics = json.loads(cached.read_text()) if cached.is_file() else None
    if not metrics or metrics.get("checkpoint") != str(ckpt_path.resolve()) or metrics.get("ptq") != ptq.settings():
        log.info("PTQ %s of %s", ptq.name, ckpt_path)
        metrics = evaluate(
            ckpt_path,
            ptq,
            data_cfg,
            run_dir,
            accelerator=data_cfg.trainer.accelerator,
            precision=data_cfg.trainer.precision,
        )
    return ptq_row(ptq, metrics, row_length=data_cfg.model.d_model)


def ptq_bits_per_element(ptq: PTQConfig, metrics: dict, row_length: int) -> str | None:
    """The report's ``bits_per_elem`` of a PTQ row, counted as for a QAT arm (rows of ``row_length`` = d_model):
    :meth:`PTQConfig.bits_per_element`; for AQLM the weights' bits with codebooks and scales from its
    ``metrics.json``."""
    if ptq.method != "aqlm":
        return ptq.bits_per_element(row_length)
    bpw = (metrics.get("aqlm") or {}).get("bits_per_weight")
    if bpw is None:
        return None
    _, act = ptq.build_quantizers()
    return f"W{bpw:.4g}A" + format_bits_per_element(None, act, row_length).rpartition("A")[2]


def ptq_row(ptq: PTQConfig, metrics: dict, row_length: int | None = None) -> dict:
    """A report row; an AQLM row's grid cell says it is calibrated and states its bits per weight in all. The grid
    cell names a non-default scale rule and the groups, the Hadamard cell a block other than 128 (as a QAT row's);
    ``bits_per_elem`` (:func:`ptq_bits_per_element`) needs the row length (``model.d_model``)."""
    if ptq.method == "aqlm":
        bpw = (metrics.get("aqlm") or {}).get("bits_per_weight")
        grid = f"aqlm {ptq.codebook_layout} g{ptq.aqlm.group_size}, calibrated ({ptq.calib_batches} batches)"
        grid += "" if bpw is None else f", {bpw:.2f} bits/weight in all"
        if ptq.act_bits is not None:
            grid += f" / {ptq.act_grid or ptq.grid}"
    else:
        grid = ptq.grid if ptq.act_bits is None or not ptq.act_grid else f"{ptq.grid} / {ptq.act_grid}"
        rule = named_scale_rule(ptq.grid, ptq.scale_rule)
        grid += f" {rule}" if rule else ""
        grid += f" g{ptq.group_size}" if ptq.group_size else ""
        act_group = ptq.act_group_size if ptq.act_bits is not None else None
        grid += f", act g{act_group}" if act_group and act_group != ptq.group_size else ""
    a = "16" if ptq.act_bits is None else f"{float(ptq.act_bits):g}"
    hadamard = "half" if ptq.hadamard else "no"
    if ptq.hadamard and ptq.hadamard_block != quantizers.HADAMARD_BLOCK:
        hadamard += f", block {ptq.hadamard_block}"
    return {
        "arm": ptq.name,
        "method": "PTQ",
        "grid": grid,
        "bits": f"W{float(ptq.bits):g}A{a}",
        "bits_per_elem": None if row_length is None else ptq_bits_per_element(ptq, metrics, row_length),
        "estimator": "-",
        "hadamard": hadamard,
        "val_loss": metrics["val/loss"],
        "val_ppl": metrics["val/ppl"],
        "wall_s": metrics.get("wall_s"),
        "steps": metrics.get("step"),
    }
