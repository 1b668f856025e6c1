"""Validation of a composed config, before any work: one line per error naming the key, the bad value and what is
allowed. Raised as :class:`ConfigError`, which ``run.py`` prints without a traceback (exit code 2)."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent / "experiments"


def compose(*overrides: str, return_hydra_config: bool = False) -> DictConfig:
    """The config ``python run.py OVERRIDES`` would see, through Hydra's compose API (tests, benchmarks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)


class ConfigError(ValueError):
    """A user error in the config or the command line."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


def check(cfg: DictConfig, key: str, ok: Callable[[Any], bool], allowed: str, optional: bool = False) -> Any:
    value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    if value is None and optional:
        return None
    if value is None or not ok(value):
        raise ConfigError(f"{key}={value!r}: expected {allowed}")
    return value


def positive_int(cfg: DictConfig, key: str, optional: bool = False) -> int | None:
    return check(cfg, key, lambda v: _is_int(v) and v >= 1, "an integer >= 1", optional)


def validate(cfg: DictConfig) -> None:
    """Check every key a run reads. Quantization keys are checked by :func:`quest_pl.quant.QuantConfig.from_cfg`."""
    # model
    n_layer = positive_int(cfg, "model.n_layer")
    d_model = positive_int(cfg, "model.d_model")
    n_head = positive_int(cfg, "model.n_head")
    if d_model % n_head:
        raise ConfigError(f"model.d_model={d_model}: must be divisible by model.n_head={n_head}")
    if (d_model // n_head) % 2:
        raise ConfigError(
            f"model.d_model={d_model}: head size d_model/n_head = {d_model // n_head} must be even (RoPE)"
        )
    positive_int(cfg, "model.seq_len")
    check(
        cfg,
        "model.vocab_size",
        lambda v: _is_int(v) and v >= 258,
        "null (from the tokenizer) or an integer >= 258",
        optional=True,
    )
    del n_layer
    # optim
    check(cfg, "optim.lr", lambda v: _is_number(v) and v > 0, "a number > 0")
    check(cfg, "optim.weight_decay", lambda v: _is_number(v) and v >= 0, "a number >= 0")
    check(cfg, "optim.warmup_frac", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")
    check(cfg, "optim.final_lr_frac", lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
    check(cfg, "optim.quant_lr_scale", lambda v: _is_number(v) and v > 0, "a number > 0")
    # trainer
    positive_int(cfg, "trainer.max_steps")
    positive_int(cfg, "trainer.log_every_n_steps")
    positive_int(cfg, "trainer.accumulate_grad_batches")
    positive_int(cfg, "trainer.val_check_interval")
    check(
        cfg,
        "trainer.precision",
        lambda v: v in ("32-true", "bf16-mixed", "16-mixed", "bf16-true"),
        "null (bf16-mixed on GPU, 32-true on CPU), 32-true, bf16-mixed, 16-mixed or bf16-true",
        optional=True,
    )
    check(
        cfg,
        "trainer.strategy",
        lambda v: v in ("auto", "ddp", "ddp_spawn", "fsdp", "single_device"),
        "auto, ddp, ddp_spawn, fsdp or single_device",
    )
    # data
    source = check(
        cfg, "data.source", lambda v: v in ("embedded", "text_file", "hub", "bin"), "embedded, text_file, hub or bin"
    )
    if source == "text_file":
        path = check(
            cfg,
            "data.path",
            lambda v: isinstance(v, str) and v != "",
            "a file or glob of local text files when data.source=text_file",
        )
        if not glob.glob(os.path.expanduser(path), recursive=True):
            raise ConfigError(f"data.path={path!r}: no file matches")
    if source == "hub":
        check(
            cfg,
            "data.name",
            lambda v: isinstance(v, str) and v != "",
            "a datasets hub name (e.g. allenai/c4) when data.source=hub",
        )
    tok = check(cfg, "data.tokenizer_path", lambda v: isinstance(v, str), "a path to a tokenizer.json", optional=True)
    if tok is not None and not os.path.isfile(os.path.expanduser(tok)):
        raise ConfigError(f"data.tokenizer_path={tok!r}: no such file")
    check(cfg, "data.vocab_size", lambda v: _is_int(v) and v >= 258, "an integer >= 258 (256 bytes + <|endoftext|>)")
    from quest_pl import budget, data  # the keys of data preparation and token budgets (quest_pl.data.keys, budget)

    data.validate(cfg)
    budget.validate(cfg)
    positive_int(cfg, "data.batch_size")
    positive_int(cfg, "data.val_batch_size")
    positive_int(cfg, "data.val_batches", optional=True)
    check(cfg, "data.val_fraction", lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)")
    check(cfg, "seed", _is_int, "an integer")
    # checkpoint
    positive_int(cfg, "checkpoint.every_n_steps", optional=True)
    ckpt = check(cfg, "ckpt_path", lambda v: isinstance(v, str), "null or a path to a checkpoint", optional=True)
    if ckpt is not None:
        check_checkpoint(ckpt)


def check_checkpoint(path: str) -> dict:
    """Load a checkpoint read-only to prove it is usable before any work starts (the file is never modified)."""
    import torch

    if not os.path.isfile(path):
        raise ConfigError(f"ckpt_path={path!r}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: truncated, not a zip, not a pickle
        raise ConfigError(f"ckpt_path={path!r}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"ckpt_path={path!r}: not a Lightning checkpoint (no state_dict)")
    return ckpt
