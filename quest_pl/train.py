"""One training run from a composed config: validate, build data, model, trainer; fit; report final metrics."""

from __future__ import annotations

import json
import logging
import signal
import time
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from quest_pl.budget import apply_token_budget
from quest_pl.config import ConfigError, check_checkpoint, validate

log = logging.getLogger(__name__)


def resolve_precision(precision: str | None, accelerator: str) -> str:
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if precision is None:
        return "bf16-mixed" if on_gpu else "32-true"
    return precision


def build_datamodule(cfg: DictConfig):
    from quest_pl.data import LMDataModule

    data = OmegaConf.to_container(cfg.data, resolve=True)
    return LMDataModule(
        **data,
        seq_len=cfg.model.seq_len,
        seed=cfg.seed,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        max_steps=cfg.trainer.max_steps,
    )


def build_module(cfg: DictConfig, vocab_size: int):
    from quest_pl.module import LMModule

    m = cfg.model
    model = dict(
        vocab_size=m.vocab_size or vocab_size, n_layer=m.n_layer, d_model=m.d_model, n_head=m.n_head, seq_len=m.seq_len
    )
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    quant = OmegaConf.to_container(cfg.quant, resolve=True)
    return LMModule(
        model,
        optim,
        quant=quant,
        compile=cfg.compile,
        max_steps=cfg.trainer.max_steps,
        batch_tokens=cfg.data.batch_size * cfg.model.seq_len,
    )


def check_compatible(ckpt_path: str, module) -> None:
    """A checkpoint from another model shape fails here with one line, not deep inside Lightning."""
    state = check_checkpoint(ckpt_path)["state_dict"]
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ConfigError(
            f"ckpt_path={ckpt_path!r}: incompatible with this config ({what}, "
            f"{len(missing)} missing / {len(unexpected)} unexpected keys)"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ConfigError(
                f"ckpt_path={ckpt_path!r}: incompatible with this config ({k} has shape "
                f"{tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} here)"
            )


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list:
    import hydra
    from lightning.pytorch.callbacks import ModelCheckpoint

    from quest_pl.callbacks import SaveOnInterrupt

    ckpt_dir = run_dir / "checkpoints"
    every = cfg.checkpoint.every_n_steps
    callbacks = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="step{step:06d}",
            auto_insert_metric_name=False,
            every_n_train_steps=every or cfg.trainer.max_steps,
            save_top_k=-1 if every else 0,
            save_last=True,
        ),
        SaveOnInterrupt(ckpt_dir),
    ]
    for name, spec in (cfg.callbacks or {}).items():
        if spec is not None and "_target_" in spec:
            callbacks.append(hydra.utils.instantiate(spec))
        else:
            log.debug("callback %s has no _target_; skipped", name)
    return callbacks


def write_hparams(logger, cfg: DictConfig) -> None:
    """TensorBoard's hparams tab, linked to ``val/loss`` and ``val/ppl`` (no placeholder ``hp_metric`` scalar)."""
    from torch.utils.tensorboard.summary import hparams

    flat = {}
    for group in ("model", "optim", "data", "quant", "trainer"):
        for k, v in (OmegaConf.to_container(cfg[group], resolve=True) or {}).items():
            if isinstance(v, (int, float, str, bool)):
                flat[f"{group}.{k}"] = v
    flat["seed"] = cfg.seed
    exp, ssi, sei = hparams(flat, {"val/loss": 0.0, "val/ppl": 0.0})
    writer = logger.experiment._get_file_writer()
    for summary in (exp, ssi, sei):
        writer.add_summary(summary)


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run one training job; returns the final metrics (also written to ``<run dir>/metrics.json``)."""
    validate(cfg)
    from quest_pl.quant import QuantConfig

    QuantConfig.validate(cfg.quant)
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    # Lightning prints through its own handler; Hydra's root handler would print every line a second time.
    logging.getLogger("lightning.pytorch").propagate = False
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    # Resuming with another checkpoint cadence is fine: the checkpoint callback has no state that matters.
    warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint need to be provided.*")
    run_dir = Path(run_dir)
    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    apply_token_budget(cfg, len(dm.train_tokens))  # trainer.tokens / scale.tokens_per_param -> trainer.max_steps
    t = cfg.trainer
    module = build_module(cfg, dm.vocab_size)
    if cfg.ckpt_path:
        check_compatible(cfg.ckpt_path, module)

    logger = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)
    trainer = L.Trainer(
        max_steps=t.max_steps,
        max_epochs=-1,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=resolve_precision(t.precision, t.accelerator),
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=min(t.val_check_interval, t.max_steps) * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        enable_progress_bar=t.enable_progress_bar,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the data module shards by rank itself (deterministic per global step)
        logger=logger if cfg.logger.tensorboard else False,
        callbacks=build_callbacks(cfg, run_dir),
        default_root_dir=str(run_dir),
    )
    if cfg.logger.tensorboard and trainer.is_global_zero:
        write_hparams(logger, cfg)
    if trainer.is_global_zero:
        dm.save_tokenizer(run_dir)  # <run dir>/tokenizer.json: a checkpoint is usable without the token cache
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path)
    except SIGTERMException:  # SaveOnInterrupt has written last.ckpt; exit as a terminated process does
        raise SystemExit(128 + signal.SIGTERM) from None
    if module.last_val_step != trainer.global_step:  # max_steps is not a multiple of val_check_interval
        trainer.validate(module, datamodule=dm, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
    metrics.update(
        step=trainer.global_step,
        wall_s=time.perf_counter() - start,
        rank=trainer.global_rank,
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        non_embedding_params=module.model.non_embedding_params(),
    )
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
