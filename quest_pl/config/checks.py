"""The config layer's base: :class:`ConfigError`, the generic key checks every group's validation uses, and Hydra's
compose API on the project's config directory."""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "experiments"


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
    """A finite int or float (not a bool): NaN and infinity are never a valid setting."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def suggest(name: str, candidates) -> str:
    """``; did you mean X?`` for the closest candidate (difflib), or nothing."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


# Paths a run reads or writes: ``~`` is expanded in every one (expand_paths).
PATH_KEYS = ("data.path", "data.tokenizer_path", "data.cache_dir", "ckpt_path", "ptq.from")


def expand_paths(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` with ``~`` expanded in every path key."""
    cfg = cfg.copy()
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if isinstance(value, str) and value.startswith("~"):
            OmegaConf.update(cfg, key, os.path.expanduser(value), force_add=True)
    return cfg


def check(cfg: DictConfig, key: str, ok: Callable[[Any], bool], allowed: str, optional: bool = False) -> Any:
    value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    if value is None and optional:
        return None
    try:
        good = value is not None and ok(value)
    except (TypeError, ValueError):  # a scalar where a list belongs, a list where a number belongs, ...
        good = False
    if not good:
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value)
        raise ConfigError(f"{key}={value!r}: expected {allowed}")
    return value


def positive_int(cfg: DictConfig, key: str, optional: bool = False) -> int | None:
    return check(cfg, key, lambda v: _is_int(v) and v >= 1, "an integer >= 1", optional)
