"""What a resume must share with the checkpoint it continues: the checkpoint is read and compared key by key before
any work."""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from quest_pl.config.budget import budgeted_max_steps
from quest_pl.config.checks import ConfigError, compose, suggest


def check_checkpoint(path: str, mmap: bool = False) -> dict:
    """Load a checkpoint read-only to prove it is usable before any work starts (the file is never modified).
    ``mmap``: map the tensors instead of reading them (a cheap look at the metadata of a large checkpoint)."""
    import torch

    if not os.path.isfile(path):
        what = "a directory, not a checkpoint file" if os.path.isdir(path) else "no such file"
        raise ConfigError(f"ckpt_path={path!r}: {what}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # any unreadable file: truncated, not a zip, not a pickle
        raise ConfigError(f"ckpt_path={path!r}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"ckpt_path={path!r}: not a Lightning checkpoint (no state_dict)")
    return ckpt


# What a resume must share with the checkpoint it continues (every key below these prefixes), except the keys that
# change neither the trained weights nor the logged numbers.
RESUME_KEYS = ("model", "quant", "optim", "data", "seed", "trainer.max_steps", "trainer.accumulate_grad_batches",
               "trainer.gradient_clip_val", "trainer.precision", "trainer.devices", "trainer.num_nodes")  # fmt: skip
RESUME_GROUPS = ("model", "quant", "optim", "data", "seed", "trainer")
RESUME_IGNORED = ("data.num_workers", "data.cache_dir", "quant.kernel")


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _resume_view(flat: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in flat.items()
        if any(k == p or k.startswith(p + ".") for p in RESUME_KEYS) and k not in RESUME_IGNORED
    }


def _key_defaults() -> dict[str, Any]:
    """Every compared key's default (``quant`` keys as the base ``quant=bf16`` sets them, which every quant config
    extends), composed with whatever Hydra instance is active (inside a run, the app's own)."""
    from hydra.core.global_hydra import GlobalHydra

    overrides = ["quant=bf16"]
    if GlobalHydra.instance().is_initialized():
        from hydra.types import RunMode

        loader = GlobalHydra.instance().config_loader()
        cfg = loader.load_configuration(config_name="config", overrides=overrides, run_mode=RunMode.RUN)
    else:
        cfg = compose(*overrides)
    return _resume_view(_flatten(_resume_groups(cfg)))


def _resume_groups(cfg: DictConfig) -> dict[str, Any]:
    """The groups a resume compares (:data:`RESUME_GROUPS`), resolved to plain containers."""
    plain = {g: cfg.get(g) for g in RESUME_GROUPS}
    return {g: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v for g, v in plain.items()}


def check_resume(cfg: DictConfig, ckpt: dict) -> dict[str, tuple[Any, Any]]:
    """A resume continues the checkpoint's run: refuse a checkpoint past ``trainer.max_steps`` and any difference in
    the keys of :data:`RESUME_KEYS` (first one named), except those listed in ``resume.allow_changes``, which are
    returned as ``{key: (checkpoint value, new value)}`` for the caller to log. Checkpoints without a stored config
    (written before it was stored) are compared on what their hyperparameters hold (model, optim, quant)."""
    path = cfg.ckpt_path
    step = int(ckpt.get("global_step", 0))
    max_steps = budgeted_max_steps(cfg)  # a token budget sets it (quest_pl.budget), as it did for the checkpoint
    if step > max_steps:
        raise ConfigError(f"ckpt_path={path!r}: the checkpoint is at step {step}, past trainer.max_steps={max_steps}")
    allowed = set(OmegaConf.select(cfg, "resume.allow_changes", default=None) or [])
    groups = RESUME_GROUPS
    plain = _resume_groups(cfg)
    plain["trainer"]["max_steps"] = max_steps
    new = _resume_view(_flatten(plain))
    saved = ckpt.get("quest_pl_config")
    if isinstance(saved, dict):
        old = _resume_view(_flatten({g: saved.get(g) for g in groups}))
        keys = list(old) + [k for k in new if k not in old]
    else:  # an older checkpoint: what its hyperparameters hold
        hp = ckpt.get("hyper_parameters") or {}
        old = _resume_view(_flatten({g: hp.get(g) for g in ("optim", "quant")}))
        keys = [k for k in old if k in new]
    for key in sorted(allowed - set(new) - set(old)):
        raise ConfigError(f"resume.allow_changes: {key} is not a key a resume compares{suggest(key, new)}")
    changed = {}
    defaults = None
    for key in keys:
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a == b:
            continue
        if key not in old and isinstance(saved, dict):
            # The checkpoint predates the key: it was trained with the behaviour the key's default keeps.
            defaults = _key_defaults() if defaults is None else defaults
            a = defaults.get(key, a)
            if a == b:
                continue
        if key in allowed:
            changed[key] = (a, b)
            continue
        raise ConfigError(
            f"ckpt_path={path!r}: the checkpoint was trained with {key}={a!r}, this run has {key}={b!r}; resume with "
            f"the same value, or allow it with resume.allow_changes=[{key}]"
        )
    return changed
