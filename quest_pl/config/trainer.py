"""Validation of the ``trainer`` group (Lightning's Trainer arguments and the project's own keys) and of the devices a
run asks for."""

from __future__ import annotations

from omegaconf import DictConfig

from quest_pl.config.checks import ConfigError, _is_int, _is_number, check, positive_int, suggest

MAX_STEPS = 2**31 - 1  # step counters and schedules are int32-safe
PROJECT_TRAINER_KEYS = ("tokens",)  # trainer-group keys the project reads (quest_pl.budget); not Trainer arguments
TRAINER_KNOWN = {
    *PROJECT_TRAINER_KEYS,
    "_target_", "max_steps", "max_epochs", "accelerator", "devices", "num_nodes", "strategy", "precision",
    "log_every_n_steps", "val_check_interval", "check_val_every_n_epoch", "accumulate_grad_batches",
    "gradient_clip_val", "enable_progress_bar", "num_sanity_val_steps", "use_distributed_sampler",
}  # fmt: skip


def trainer_parameters() -> set[str]:
    import inspect

    from lightning.pytorch import Trainer

    return set(inspect.signature(Trainer.__init__).parameters) - {"self"}


def validate_trainer(cfg: DictConfig) -> None:
    t = cfg.trainer
    unknown = set(t) - TRAINER_KNOWN
    if unknown:
        params = trainer_parameters()
        for key in sorted(unknown):
            if key not in params:
                raise ConfigError(f"trainer.{key}: not an argument of lightning's Trainer{suggest(key, params)}")
    check(cfg, "trainer.max_steps", lambda v: _is_int(v) and 1 <= v <= MAX_STEPS, f"an integer in [1, {MAX_STEPS}]")
    positive_int(cfg, "trainer.log_every_n_steps")
    positive_int(cfg, "trainer.accumulate_grad_batches")
    positive_int(cfg, "trainer.val_check_interval")
    positive_int(cfg, "trainer.num_nodes")
    check(
        cfg,
        "trainer.gradient_clip_val",
        lambda v: _is_number(v) and v >= 0,
        "null (no clipping) or a finite number >= 0",
        optional=True,
    )
    check(
        cfg, "trainer.enable_progress_bar", lambda v: isinstance(v, bool), "null (on a terminal), true or false", True
    )
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
    accelerator = check(
        cfg, "trainer.accelerator", lambda v: v in ("auto", "cpu", "gpu", "cuda"), "auto, cpu, gpu or cuda"
    )
    devices = check(
        cfg,
        "trainer.devices",
        lambda v: (
            (_is_int(v) and (v >= 1 or v == -1))
            or v == "auto"
            or (not isinstance(v, (str, int, float)) and len(v) > 0 and all(_is_int(d) and d >= 0 for d in v))
        ),
        "an integer >= 1, -1 (all), auto, or a list of device indices",
    )
    del accelerator, devices  # check_devices() compares them with the machine (not for configs meant elsewhere)


def check_devices(cfg: DictConfig) -> None:
    """The devices a run asks for exist on this machine (``validate`` checks values only: a GPU config composes and
    validates anywhere)."""
    accelerator, devices = cfg.trainer.accelerator, cfg.trainer.devices
    if accelerator in ("gpu", "cuda"):
        import torch

        available = torch.cuda.device_count()
        if not available:
            raise ConfigError(f"trainer.accelerator={accelerator!r}: no CUDA device is available")
        wanted = devices if _is_int(devices) else (max(devices) + 1 if not isinstance(devices, str) else 1)
        if wanted > available:
            raise ConfigError(f"trainer.devices={devices!r}: only {available} CUDA device(s) available")
