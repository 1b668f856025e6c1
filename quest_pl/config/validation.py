"""Validation of a composed config, before any work: one line per error naming the key, the bad value and what is
allowed. Raised as :class:`ConfigError`, which ``run.py`` prints without a traceback (exit code 2). Each group's
checks live in their own module of this package; :func:`validate` runs them all in one order."""

from __future__ import annotations

import os

from omegaconf import DictConfig, ListConfig, OmegaConf

from quest_pl.config.checks import ConfigError, _is_int, _is_number, check, positive_int
from quest_pl.config.data import validate_data
from quest_pl.config.ptq import PTQConfig
from quest_pl.config.resume import check_checkpoint, check_resume
from quest_pl.config.rules import violation
from quest_pl.config.trainer import validate_trainer

# Gradient communication (quest_pl.comm): the DDP hooks and the bits of the quantized ones.
HOOKS = ("none", "fp16", "quantized", "correlated")
BITS = (2, 4, 8)


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
    check_rules(cfg, sweep=True)  # the rows that hold in every job; the per-arm rows: check_rules(cfg) (cli)
    # checkpoint
    positive_int(cfg, "checkpoint.every_n_steps", optional=True)
    ckpt = check(cfg, "ckpt_path", lambda v: isinstance(v, str), "null or a path to a checkpoint", optional=True)
    if ckpt is not None:
        check_resume(cfg, check_checkpoint(os.path.expanduser(ckpt), mmap=True))


def validate_grad_comm(cfg: DictConfig) -> None:
    hook = check(cfg, "grad_comm.hook", lambda v: v in HOOKS, ", ".join(HOOKS))
    check(cfg, "grad_comm.bits", lambda v: v in BITS, " or ".join(map(str, BITS)))
    positive_int(cfg, "grad_comm.chunk")
    check(cfg, "grad_comm.marina_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
    del hook  # what it needs: quest_pl.config.rules


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


def check_rules(cfg: DictConfig, sweep: bool = False) -> None:
    """Every key set in ``cfg`` acts: the table of :mod:`quest_pl.config.rules` ("key X needs Y"). ``sweep``: one job
    of a multirun, where a ``quant.*`` override moves the quantized arms and leaves the BF16 baseline arm as it is (a
    single run given bits but no grid would train in full precision under the user's nose)."""
    error = violation(cfg, sweep=sweep)
    if error:
        raise ConfigError(error)
