"""A PTQ job (``python run.py ptq.from=CKPT ...``): load the checkpoint, quantize, evaluate on the run's validation
split, log to TensorBoard and write ``metrics.json``."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from quest_pl.config import ConfigError
from quest_pl.config.ptq import PTQConfig
from quest_pl.data.run import run_config_of  # noqa: F401  (public here as before: quest_pl.ptq.run_config_of)
from quest_pl.io import atomic_write_json
from quest_pl.ptq.aqlm import calibration_batches, quantize_model_aqlm
from quest_pl.ptq.scalar import quantize_model_ptq

log = logging.getLogger(__name__)


def load_checkpoint(path: str | Path, key: str = "ptq.from") -> dict:
    """A checkpoint this project wrote (an ``LMModule``'s), with one-line errors for a missing or foreign file."""
    from quest_pl.config import check_checkpoint

    try:
        ckpt = check_checkpoint(str(path))
    except ConfigError as e:
        raise ConfigError(str(e).replace("ckpt_path=", f"{key}=", 1)) from None
    hp = ckpt.get("hyper_parameters") or {}
    if not isinstance(hp.get("model"), dict) or not isinstance(hp.get("optim"), dict):
        raise ConfigError(f"{key}={str(path)!r}: not a QuEST-PL checkpoint (no model hyper-parameters)")
    return ckpt


def module_from_checkpoint(ckpt: dict, path: str | Path, key: str = "ptq.from"):
    """The full-precision ``LMModule`` of a checkpoint: latent weights only (LSQ/PACT scales of a QAT run dropped)."""
    from quest_pl.module import LMModule
    from quest_pl.quant import is_quantizer_param

    hp = ckpt["hyper_parameters"]
    q = hp.get("quant") or {}
    if q.get("grid") and q.get("hadamard") and q.get("hadamard_mode", "half") == "half" and q.get("a_bits") is None:
        raise ConfigError(
            f"{key}={str(path)!r}: a weight-only half-Hadamard QAT checkpoint (quant={q.get('name')}) computes "
            "x (W H)^T, not x W^T; its latent weights are no full-precision model to post-train-quantize"
        )
    try:
        module = LMModule(hp["model"], hp["optim"], quant=None, max_steps=hp.get("max_steps", 1))
    except TypeError as e:
        raise ConfigError(f"{key}={str(path)!r}: incompatible model hyper-parameters ({e})") from None
    state = {k: v for k, v in ckpt["state_dict"].items() if not is_quantizer_param(k)}
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        what = (
            (missing and f"missing {missing[0]}")
            or (unexpected and f"unexpected {unexpected[0]}")
            or (f"{bad_shape[0]} has shape {tuple(state[bad_shape[0]].shape)}")
        )
        raise ConfigError(f"{key}={str(path)!r}: incompatible checkpoint ({what})")
    module.load_state_dict(state)
    return module


# -- evaluation -----------------------------------------------------------------------------------------------------
def evaluate(
    ckpt_path: str | Path,
    ptq: PTQConfig,
    data_cfg: DictConfig,
    run_dir: str | Path,
    accelerator: str = "auto",
    precision: str | None = None,
    tensorboard: bool = True,
) -> dict:
    """PTQ a checkpoint and evaluate it on the validation split of ``data_cfg`` (a config with ``data``,
    ``model.seq_len``, ``seed``, ``trainer``) exactly as training validates; returns and writes ``metrics.json``."""

    from quest_pl.train import validation_datamodule, validation_trainer

    start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(ckpt_path)
    module = module_from_checkpoint(ckpt, ckpt_path)
    model_hp = ckpt["hyper_parameters"]["model"]
    if data_cfg.model.seq_len != model_hp["seq_len"]:
        data_cfg = OmegaConf.merge(data_cfg, {"model": {"seq_len": model_hp["seq_len"]}})
    dm = validation_datamodule(data_cfg, model_hp["vocab_size"], f"ptq.from={str(ckpt_path)!r}")
    aqlm_stats = None
    if ptq.method == "aqlm":
        on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        module.to("cuda" if on_gpu else "cpu")
        log.info("AQLM %s calibrated on %d training batches", ptq.codebook_layout, ptq.calib_batches)
        aqlm_stats = quantize_model_aqlm(module.model, ptq, calibration_batches(dm, ptq.calib_batches))
        log.info(
            "AQLM: %.3f bits per weight with codebooks and scales (codes %.3f), mean relative output error %.4f",
            aqlm_stats["bits_per_weight"], aqlm_stats["code_bits_per_weight"], aqlm_stats["mean_rel_output_error"],
        )  # fmt: skip
    else:
        quantize_model_ptq(module.model, ptq)
    trainer = validation_trainer(accelerator, precision, run_dir)
    results = trainer.validate(module, datamodule=dm, verbose=False)[0]
    step = int(ckpt.get("global_step", 0))
    metrics = {
        "val/loss": float(results["val/loss"]),
        "val/ppl": float(results["val/ppl"]),
        "step": step,
        "wall_s": time.perf_counter() - start,
        "checkpoint": str(Path(ckpt_path).resolve()),
        "ptq": ptq.settings(),
    }
    if aqlm_stats is not None:
        metrics["aqlm"] = aqlm_stats
    if tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        from quest_pl import hparams

        logger = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)
        hparams.write(logger, {"arm": ptq.name, "seed": data_cfg.get("seed"), **ptq_values(ptq, ckpt_path)})
        scalars = {"val/loss": metrics["val/loss"], "val/ppl": metrics["val/ppl"]}
        if aqlm_stats is not None:
            scalars["ptq/bits_per_weight"] = aqlm_stats["bits_per_weight"]
            scalars["ptq/rel_output_error"] = aqlm_stats["mean_rel_output_error"]
        logger.log_metrics(scalars, step=step)
        logger.finalize("success")
    atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics


def ptq_values(ptq: PTQConfig, ckpt_path: str | Path | None = None) -> dict:
    """The ``ptq.*`` keys of a setting for TensorBoard's hparams tab (and ``ptq.from``)."""
    values = {f"ptq.{k}": v for k, v in ptq.settings().items() if k != "aqlm"}
    values |= {f"ptq.aqlm.{k}": v for k, v in asdict(ptq.aqlm).items()} if ptq.method == "aqlm" else {}
    return values | ({"ptq.from": str(ckpt_path)} if ckpt_path is not None else {})


def run(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> dict:
    """``python run.py ptq.from=CKPT ...``: PTQ evaluation of one checkpoint (see the package docstring), on the
    validation split of the run that wrote it (``data.*`` overrides merged over it, :mod:`quest_pl.data.run`)."""
    from quest_pl.data.run import check_model_overrides, data_config

    ckpt_path = cfg.ptq["from"]
    ptq = PTQConfig.from_cfg(cfg.ptq)
    model_hp = load_checkpoint(ckpt_path)["hyper_parameters"]["model"]  # fail early, before any data work
    key = f"ptq.from={str(ckpt_path)!r}"
    check_model_overrides(cfg, model_hp, overrides, key)
    data_cfg = data_config(cfg, ckpt_path, key, overrides, model_hp["vocab_size"])
    t = cfg.trainer
    metrics = evaluate(
        ckpt_path, ptq, data_cfg, run_dir, accelerator=t.accelerator, precision=t.precision,
        tensorboard=bool((cfg.get("logger") or {}).get("tensorboard")),
    )  # fmt: skip
    return {**metrics, "rank": 0}


# -- sweeps ---------------------------------------------------------------------------------------------------------
