"""One training run from a composed config: validate, build data, model, trainer; fit; report final metrics."""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from quest_pl.budget import apply_token_budget
from quest_pl.config import (
    PROJECT_TRAINER_KEYS,
    ConfigError,
    check_checkpoint,
    check_devices,
    check_resume,
    expand_paths,
    validate,
)
from quest_pl.config.data import check_model_vocab_of
from quest_pl.io import TMP_PREFIX, atomic_write_json
from quest_pl.module import Diverged, silence_known_warnings

log = logging.getLogger(__name__)


def resolve_precision(precision: str | None, accelerator: str) -> str:
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if precision is None:
        return "bf16-mixed" if on_gpu else "32-true"
    return precision


def validation_trainer(accelerator: str, precision: str | None, run_dir: str | Path, progress_bar: bool = False):
    """A Trainer that only validates a checkpoint's module (evaluation, PTQ): one device, no logger, no checkpoints."""
    import lightning as L

    silence_known_warnings()
    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=resolve_precision(precision, accelerator),
        logger=False,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(run_dir),
    )


def build_datamodule(cfg: DictConfig):
    from quest_pl.data import LMDataModule

    return LMDataModule.from_config(cfg)


def validation_datamodule(data_cfg: DictConfig, vocab_size: int, source: str):
    """The validation split of ``data_cfg``, ready to use, for a checkpoint with ``vocab_size`` logits (evaluation and
    PTQ); ``source`` names the checkpoint key in the error when the data's vocabulary does not fit the model."""
    dm = build_datamodule(data_cfg)
    dm.prepare_data()
    dm.setup("validate")
    if dm.vocab_size > vocab_size:
        raise ConfigError(
            f"{source}: the data's vocabulary ({dm.vocab_size}) is larger than the checkpoint's ({vocab_size}); "
            "evaluate with the tokenizer the checkpoint was trained with (data.tokenizer_path)"
        )
    return dm


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


def remove_stale_temp_files(directory: Path) -> None:
    """Temporary files a killed save left beside the checkpoints (``quest_pl.io`` names them ``.tmp-*``)."""
    for tmp in directory.glob(f"{TMP_PREFIX}*") if directory.is_dir() else []:
        log.info("removing %s (left by an interrupted save)", tmp)
        tmp.unlink(missing_ok=True)


def run_config(cfg: DictConfig) -> dict:
    """The groups a resume is compared on (:data:`quest_pl.config.RESUME_GROUPS`), as plain types."""
    from quest_pl.config import RESUME_GROUPS

    container = {g: cfg.get(g) for g in RESUME_GROUPS}
    return {
        k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v for k, v in container.items()
    }


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list:
    import hydra
    from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary

    from quest_pl.callbacks import SaveOnInterrupt
    from quest_pl.callbacks.checkpoint import SaveRunConfig

    ckpt_dir = run_dir / "checkpoints"
    remove_stale_temp_files(ckpt_dir)
    every = cfg.checkpoint.every_n_steps
    callbacks = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="step{step:06d}",
            auto_insert_metric_name=False,
            every_n_train_steps=every or cfg.trainer.max_steps,
            save_top_k=-1 if every else 0,
            save_last=True,
            enable_version_counter=False,  # resuming into the same run dir updates last.ckpt, not last-v1.ckpt
        ),
        SaveOnInterrupt(ckpt_dir),
        SaveRunConfig(run_config(cfg)),
        ModelSummary(max_depth=1),  # through logging (console and run.log), not a terminal-only table
    ]
    if not progress_bar(cfg):  # redirected output: a line every few percent of the run instead of a bar
        from quest_pl.callbacks.progress import ProgressLines

        callbacks.append(ProgressLines(cfg.trainer.max_steps, cfg.trainer.log_every_n_steps))
    for name, spec in (cfg.get("callbacks") or {}).items():
        if spec is not None and "_target_" in spec:
            callbacks.append(hydra.utils.instantiate(spec))
        else:
            log.debug("callback %s has no _target_; skipped", name)
    comm = cfg.grad_comm
    if comm.hook != "none":
        from quest_pl.callbacks.comm import GradientCommunication

        callbacks.append(GradientCommunication(comm.hook, comm.bits, comm.chunk, comm.marina_p, seed=cfg.seed))
    return callbacks


def _instantiate(spec: dict, **fill):
    """``spec['_target_'](**spec, **fill)``, nested ``_target_`` values instantiated too (Hydra's rule)."""
    import hydra

    params = dict(spec)
    cls = hydra.utils.get_class(params.pop("_target_"))
    for k, v in params.items():
        if isinstance(v, dict) and "_target_" in v:
            params[k] = hydra.utils.instantiate(v)
    return cls(**{**params, **fill})


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    """Every entry of the ``logger`` group (``logger=tensorboard|csv|wandb|many``), saving under the run dir, then the
    run's own metrics log (:class:`quest_pl.callbacks.metrics_log.MetricsLog`, whatever the group says), last so that
    ``trainer.logger`` stays the group's first logger."""
    from quest_pl.callbacks.metrics_log import MetricsLog

    group = cfg.get("logger")
    specs = OmegaConf.to_container(group, resolve=True) if group is not None else {}
    loggers = []
    for spec in specs.values():
        if spec is not None and "_target_" in spec:
            loggers.append(_instantiate(spec, save_dir=str(run_dir)))
    return [*loggers, MetricsLog(run_dir)]


def progress_bar(cfg: DictConfig) -> bool:
    """``trainer.enable_progress_bar``; null: a bar only on a terminal (no escape sequences in redirected logs)."""
    progress = cfg.trainer.get("enable_progress_bar")
    return sys.stdout.isatty() and sys.stderr.isatty() if progress is None else bool(progress)


def build_trainer(cfg: DictConfig, run_dir: Path, loggers: list, callbacks: list):
    """The ``trainer`` group instantiated from its ``_target_`` (any Trainer argument passes through), with the
    precision resolved, validation every ``val_check_interval`` optimizer steps and atomic checkpoint writes."""
    from quest_pl.callbacks.checkpoint import AtomicCheckpointIO

    spec = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in PROJECT_TRAINER_KEYS:  # read by the project (quest_pl.budget), not arguments of the Trainer
        spec.pop(key, None)
    t = cfg.trainer
    progress = progress_bar(cfg)
    accumulate = spec.get("accumulate_grad_batches", 1)
    return _instantiate(
        spec,
        precision=resolve_precision(t.precision, t.accelerator),
        val_check_interval=min(t.val_check_interval, t.max_steps) * accumulate,
        enable_progress_bar=progress,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[*(spec.get("plugins") or []), AtomicCheckpointIO()],  # atomic writes beside the checkpoint
        default_root_dir=str(run_dir),
    )


def write_hparams(logger, cfg: DictConfig) -> None:
    """TensorBoard's hparams tab, linked to ``val/loss`` and ``val/ppl`` (no placeholder ``hp_metric`` scalar): the
    arm, the seed and the ``quant`` keys (:func:`quest_pl.hparams.run_values`). A sweep's report replaces them by the
    keys that differ across its jobs (:func:`quest_pl.hparams.write_sweep_hparams`). Also the CUSTOM SCALARS layout
    (train and val first, then the learned scales: :data:`quest_pl.hparams.LAYOUT`)."""
    from quest_pl import hparams

    hparams.write(logger, hparams.run_values(cfg))
    hparams.write_layout(logger)


def write_metrics(run_dir: Path, metrics: dict) -> None:
    """``metrics.json``: strict JSON (a non-finite value is ``null``), written atomically."""
    atomic_write_json(run_dir / "metrics.json", metrics)


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run one training job; returns the final metrics (also written to ``<run dir>/metrics.json``, with
    ``"status": "ok"``). A non-finite loss or gradient norm raises :class:`Diverged` after writing ``metrics.json``
    with ``"status": "diverged"``; the checkpoints already written are kept (none holds the diverged state)."""
    cfg = expand_paths(cfg)
    validate(cfg)
    check_devices(cfg)
    from quest_pl.quant import QuantConfig

    QuantConfig.validate(cfg.quant)
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    silence_known_warnings()
    run_dir = Path(run_dir)
    start = time.perf_counter()
    if cfg.ckpt_path:
        for key, (old, new) in check_resume(cfg, check_checkpoint(cfg.ckpt_path, mmap=True)).items():
            log.warning("resuming with %s changed from %r to %r (resume.allow_changes)", key, old, new)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    check_model_vocab_of(cfg.model.vocab_size, dm.vocab_size, "the prepared data's tokenizer")  # a hub tokenizer
    apply_token_budget(cfg, len(dm.train_tokens))  # trainer.tokens / scale.tokens_per_param -> trainer.max_steps
    from quest_pl.cadence import check_cadences

    check_cadences(cfg.get("callbacks"), cfg.trainer.max_steps)
    module = build_module(cfg, dm.vocab_size)
    if cfg.ckpt_path:
        check_compatible(cfg.ckpt_path, module)

    loggers = build_loggers(cfg, run_dir)
    from quest_pl.callbacks import SaveOnInterrupt

    callbacks = build_callbacks(cfg, run_dir)
    interrupt = next(c for c in callbacks if isinstance(c, SaveOnInterrupt))
    trainer = build_trainer(cfg, run_dir, loggers, callbacks)
    if trainer.is_global_zero:
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                write_hparams(logger, cfg)
    if trainer.is_global_zero:
        dm.save_tokenizer(run_dir)  # <run dir>/tokenizer.json: a checkpoint is usable without the token cache
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def summary(status: str) -> dict:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
        metrics.update(
            status=status,
            step=trainer.global_step,
            wall_s=time.perf_counter() - start,
            rank=trainer.global_rank,
            peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            non_embedding_params=module.model.non_embedding_params(),
        )
        return metrics

    try:
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path)
        if module.last_val_step != trainer.global_step:  # max_steps is not a multiple of val_check_interval
            trainer.validate(module, datamodule=dm, verbose=False)
    except SIGTERMException:  # SaveOnInterrupt has written last.ckpt; exit as a signalled process does
        raise SystemExit(128 + (interrupt.requested or signal.SIGTERM)) from None
    except SystemExit as e:  # Ctrl-C that SaveOnInterrupt did not turn into a clean stop (a second one, or one
        # outside training: after its last step, in the final validation): Lightning stops at once with status 1
        if interrupt.requested == signal.SIGINT or (e.code == 1 and trainer.interrupted):
            raise SystemExit(128 + signal.SIGINT) from None
        raise
    except Diverged as e:
        metrics = summary("diverged") | {"error": str(e), "diverged_step": e.step}
        if trainer.is_global_zero:
            write_metrics(run_dir, metrics)
        raise
    metrics = summary("ok")
    if trainer.is_global_zero:
        write_metrics(run_dir, metrics)
    return metrics
