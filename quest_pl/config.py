"""Validation of a composed config, before any work: one line per error naming the key, the bad value and what is
allowed. Raised as :class:`ConfigError`, which ``run.py`` prints without a traceback (exit code 2)."""

from __future__ import annotations

import difflib
import glob
import math
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

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


def validate(cfg: DictConfig) -> None:
    """Check every key a run reads, before any work. Quantization keys are also checked by
    :func:`quest_pl.quant.QuantConfig.from_cfg`; resume consistency by :func:`check_resume`."""
    validate_quant(cfg)
    # model
    positive_int(cfg, "model.n_layer")
    d_model = positive_int(cfg, "model.d_model")
    n_head = positive_int(cfg, "model.n_head")
    if d_model % n_head:
        raise ConfigError(f"model.d_model={d_model}: must be divisible by model.n_head={n_head}")
    if (d_model // n_head) % 2:
        raise ConfigError(
            f"model.d_model={d_model}: head size d_model/n_head = {d_model // n_head} must be even (RoPE)"
        )
    positive_int(cfg, "model.seq_len")
    model_vocab = check(
        cfg,
        "model.vocab_size",
        lambda v: _is_int(v) and v >= 258,
        "null (from the tokenizer) or an integer >= 258",
        optional=True,
    )
    check(cfg, "compile", lambda v: isinstance(v, bool), "true or false")
    init_steps = OmegaConf.select(cfg, "quant.learned_init_steps", default=0)
    if cfg.compile and _is_int(init_steps) and init_steps > 0:
        raise learned_init_compile_error(init_steps)
    # optim
    check(cfg, "optim.lr", lambda v: _is_number(v) and v > 0, "a finite number > 0")
    check(cfg, "optim.weight_decay", lambda v: _is_number(v) and v >= 0, "a finite number >= 0")
    check(cfg, "optim.eps", lambda v: _is_number(v) and v > 0, "a finite number > 0")
    check(
        cfg,
        "optim.betas",
        lambda v: len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
        "two numbers in [0, 1), e.g. [0.9,0.95]",
    )
    check(cfg, "optim.init_div", lambda v: _is_number(v) and v >= 1, "a finite number >= 1")
    check(cfg, "optim.warmup_frac", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")
    check(cfg, "optim.final_lr_frac", lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
    check(cfg, "optim.quant_lr_scale", lambda v: _is_number(v) and v > 0, "a finite number > 0")
    check(cfg, "optim.quant_weight_decay", lambda v: _is_number(v) and v >= 0, "a finite number >= 0")
    # trainer
    validate_trainer(cfg)
    # data
    validate_data(cfg, model_vocab)
    check(cfg, "seed", lambda v: _is_int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)")
    # loggers and callbacks: a mapping with a _target_, or null
    for group in ("logger", "callbacks"):
        for name, spec in (cfg.get(group) or {}).items():
            if spec is not None and not (isinstance(spec, DictConfig) and "_target_" in spec) and group == "logger":
                raise ConfigError(f"{group}.{name}={spec!r}: expected null or a config with a _target_")
    if "wandb" in (cfg.get("logger") or {}) and cfg.logger.wandb is not None:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("logger=wandb: the wandb package is not installed (pip install wandb)")
    allowed = check(
        cfg,
        "resume.allow_changes",
        lambda v: isinstance(v, ListConfig) and all(isinstance(k, str) for k in v),
        "a list of keys, e.g. [optim.lr]",
    )
    del allowed
    validate_grad_comm(cfg)
    # checkpoint
    positive_int(cfg, "checkpoint.every_n_steps", optional=True)
    ckpt = check(cfg, "ckpt_path", lambda v: isinstance(v, str), "null or a path to a checkpoint", optional=True)
    if ckpt is not None:
        check_resume(cfg, check_checkpoint(os.path.expanduser(ckpt), mmap=True))


def validate_grad_comm(cfg: DictConfig) -> None:
    from quest_pl.comm import BITS, HOOKS

    hook = check(cfg, "grad_comm.hook", lambda v: v in HOOKS, ", ".join(HOOKS))
    check(cfg, "grad_comm.bits", lambda v: v in BITS, " or ".join(map(str, BITS)))
    positive_int(cfg, "grad_comm.chunk")
    check(cfg, "grad_comm.marina_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
    if hook != "none" and cfg.trainer.strategy not in ("ddp", "ddp_spawn"):
        raise ConfigError(
            f"grad_comm.hook={hook}: a DDP communication hook; needs trainer.strategy=ddp or ddp_spawn "
            f"(got {cfg.trainer.strategy})"
        )


def validate_quant(cfg: DictConfig) -> None:
    """The ``quant`` keys that decide whether anything is quantized, and the numbers the run name is made of (before
    anything resolves ``run_name``)."""
    q = cfg.quant
    raw = OmegaConf.to_container(q, resolve=False)
    for op in ("bits", "w_bits", "a_bits"):
        value = raw.get(op)
        if isinstance(value, str) and value.startswith("${"):
            continue  # ${.bits}: checked as quant.bits
        if value is not None and not (_is_number(value) and value > 0):
            raise ConfigError(f"quant.{op}={value!r}: expected null (full precision) or a number > 0")
    grid = q.get("grid")
    if grid is not None and q.get("w_bits") is None and q.get("a_bits") is None:
        raise ConfigError(
            f"quant.grid={grid!r}: both operands are in full precision (quant.bits, quant.w_bits and quant.a_bits are "
            f"null); set quant.bits, or use quant=bf16 for full precision"
        )
    check(cfg, "quant.trust", lambda v: _is_number(v) and v > 0, "null (the grid's default) or a number > 0", True)
    check(cfg, "quant.clip_scale", lambda v: _is_number(v) and v > 0, "a finite number > 0")
    for key in ("hadamard", "lsq_per_row"):
        check(cfg, f"quant.{key}", lambda v: isinstance(v, bool), "true or false", optional=True)
    p = cfg.get("ptq")
    if p is not None and p.get("from"):
        from quest_pl.ptq import PTQConfig

        for key in ("bits", "act_bits"):
            check(cfg, f"ptq.{key}", lambda v: _is_number(v) and v > 0, "a number > 0", optional=key == "act_bits")
        PTQConfig.from_cfg(p)
        path = os.path.expanduser(str(p.get("from")))
        if not os.path.isfile(path):
            raise ConfigError(f"ptq.from={p.get('from')!r}: no such file")


def learned_init_compile_error(steps: int) -> ConfigError:
    """``quant.learned_init_steps`` > 0 under ``compile=true`` (checked by :func:`validate` and by the module)."""
    return ConfigError(
        f"quant.learned_init_steps={steps}: expected 0 with compile=true (re-initialising the learned scales is a "
        "data-dependent branch of the eager forward); train with compile=false"
    )


def check_bits_without_grid(cfg: DictConfig) -> None:
    """A single run given bits (or ``quant.learned_init_steps``) but no grid would train in full precision under the
    user's nose. (In a sweep, ``quant.bits=N`` moves every quantized arm and leaves the BF16 baseline arm as it is:
    allowed there.)"""
    q = cfg.quant
    if q.get("grid") is None:
        for key in ("bits", "w_bits", "a_bits", "w_grid", "a_grid"):
            if q.get(key) is not None:
                raise ConfigError(
                    f"quant.{key}={q.get(key)!r}: quant.grid is null (nothing is quantized); choose a grid "
                    f"(e.g. quant=quest_w4a4) or leave quant.{key} null"
                )
        init_steps = q.get("learned_init_steps", 0)
        if _is_int(init_steps) and init_steps > 0:
            raise ConfigError(
                f"quant.learned_init_steps={init_steps}: expected 0, as quant.grid is null (nothing is quantized, no "
                "learned scale); choose a learned-scale config (e.g. quant=lsq_w4a4)"
            )


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


def validate_data(cfg: DictConfig, model_vocab: int | None) -> None:
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
        matches = glob.glob(os.path.expanduser(path), recursive=True)
        if not matches:
            raise ConfigError(f"data.path={path!r}: no file matches")
        if not any(os.path.isfile(m) for m in matches):
            raise ConfigError(f"data.path={path!r}: a directory, not a file; use a glob such as {path}/*.txt")
    if source == "hub":
        check(
            cfg,
            "data.name",
            lambda v: isinstance(v, str) and v != "",
            "a datasets hub name (e.g. allenai/c4) when data.source=hub",
        )
        check_hub_reachable()
    data_vocab = check(
        cfg, "data.vocab_size", lambda v: _is_int(v) and v >= 258, "an integer >= 258 (256 bytes + <|endoftext|>)"
    )
    tok = check(cfg, "data.tokenizer_path", lambda v: isinstance(v, str), "a path to a tokenizer.json", optional=True)
    if tok is not None:
        data_vocab = tokenizer_vocab_size(tok)
    if model_vocab is not None and model_vocab < data_vocab:
        where = f"data.tokenizer_path={tok!r}" if tok is not None else f"data.vocab_size={data_vocab}"
        raise ConfigError(
            f"model.vocab_size={model_vocab}: smaller than the tokenizer's vocabulary ({data_vocab}, {where})"
        )
    from quest_pl import budget, data  # the keys of data preparation and token budgets (quest_pl.data.keys, budget)

    data.validate(cfg)
    budget.validate(cfg)
    positive_int(cfg, "data.batch_size")
    positive_int(cfg, "data.val_batch_size")
    positive_int(cfg, "data.val_batches", optional=True)
    positive_int(cfg, "data.chunks_per_file")
    positive_int(cfg, "data.max_docs", optional=True)
    positive_int(cfg, "data.max_val_docs", optional=True)
    check(cfg, "data.num_workers", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    check(cfg, "data.val_fraction", lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)")
    check(cfg, "data.cache_dir", lambda v: isinstance(v, str) and v != "", "a directory for the token cache")


def tokenizer_vocab_size(path: str) -> int:
    """The vocabulary size of a ``tokenizers`` JSON file, or one line saying why it is not one."""
    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        raise ConfigError(f"data.tokenizer_path={path!r}: no such file")
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(full).get_vocab_size()
    except Exception as e:  # not JSON, or JSON that is not a tokenizer
        reason = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        raise ConfigError(f"data.tokenizer_path={path!r}: not a tokenizers JSON file ({reason})") from None


HUB_TIMEOUT_S = 3.0


def check_hub_reachable(timeout: float = HUB_TIMEOUT_S) -> None:
    """``data.source=hub`` streams from the Hugging Face hub: one line within ``timeout`` seconds when it cannot be
    reached (offline mode set, no DNS, no route), instead of minutes of retries. Skipped behind a proxy, whose
    reachability a direct connection would not tell."""
    from urllib.parse import urlparse

    local = "use a local corpus instead: data=text_file data.path=<file or glob>"
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            raise ConfigError(f"data.source=hub: {var} is set, and streaming needs the hub; {local}")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    result: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(e)

    worker = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout of its own
    worker.start()
    worker.join(timeout)
    if not result or result[0] is not None:
        why = f"{type(result[0]).__name__}" if result else f"no answer in {timeout:g} s"
        raise ConfigError(f"data.source=hub: the hub ({host}) is unreachable ({why}); {local}")


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
    from quest_pl.budget import budgeted_max_steps

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
