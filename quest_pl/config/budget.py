"""Token budgets: ``trainer.tokens=3e9`` or ``scale.tokens_per_param=100`` sets ``trainer.max_steps``.

The paper's rule (METHOD.md §3): ``iterations = floor(tokens / tokens per step)``, with tokens per step the global
batch (``data.batch_size x trainer.accumulate_grad_batches x devices x nodes`` sequences of ``model.seq_len``
tokens) and, for ``tokens_per_param``, ``tokens = tokens_per_param x`` the model's non-embedding parameter count
(embedding and head excluded, as the paper counts). The paper rounded its token counts to the nominal model size
(3 B for the 30M model's 30.48 M parameters, 43 B for the 430M model's 443 M): ``trainer.tokens`` reproduces its
step counts exactly, ``tokens_per_param`` applies the rule to the exact parameter count (about 3% more steps).
"""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from quest_pl.config.checks import ConfigError, _is_int, check
from quest_pl.config.trainer import MAX_STEPS


def _positive_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def validate_budget(cfg: DictConfig) -> None:
    tokens = check(cfg, "trainer.tokens", _positive_number, "null or a number of training tokens > 0", optional=True)
    tpp = check(cfg, "scale.tokens_per_param", _positive_number, "null or a number > 0", optional=True)
    if tokens is not None and tpp is not None:
        raise ConfigError(f"scale.tokens_per_param={tpp}: give either it or trainer.tokens={tokens}, not both")
    sizes = ("data.batch_size", "trainer.accumulate_grad_batches", "model.seq_len", "trainer.max_steps")
    if not all(_is_int(v) and v >= 1 for v in (OmegaConf.select(cfg, k, default=None) for k in sizes)):
        return  # a bad size is refused by its own check
    steps = check_budget(cfg) if tokens is not None or tpp is not None else cfg.trainer.max_steps
    init_steps = OmegaConf.select(cfg, "quant.learned_init_steps", default=0)
    if _is_int(init_steps) and init_steps >= steps and OmegaConf.select(cfg, "quant.grid", default=None) is not None:
        raise ConfigError(
            f"quant.learned_init_steps={init_steps}: expected fewer than the run's {steps} steps (trainer.max_steps or "
            "the token budget), or the learned scales are never learned"
        )


def check_budget(cfg: DictConfig) -> int:
    """The budget's step count, between 1 and :data:`quest_pl.config.MAX_STEPS` (the bound ``trainer.max_steps``
    has), or one line naming the budget key."""
    tokens = planned_tokens(cfg)
    key = "scale.tokens_per_param"
    if OmegaConf.select(cfg, "trainer.tokens", default=None) is not None:
        key = "trainer.tokens"
    value = OmegaConf.select(cfg, key)
    step_tokens = tokens_per_step(cfg)
    steps = budget_steps(tokens, step_tokens)
    if steps < 1:
        raise ConfigError(
            f"{key}={value}: a budget of {tokens:.4g} tokens is less than one step of {step_tokens:,} tokens"
        )
    if steps > MAX_STEPS:
        raise ConfigError(
            f"{key}={value}: a budget of {tokens:.4g} tokens is {steps:.4g} steps of {step_tokens:,} tokens, more than "
            f"the {MAX_STEPS} steps a run can have (as trainer.max_steps)"
        )
    return steps


def non_embedding_params(model_cfg) -> int:
    """Parameters of the Llama of ``model_cfg`` without embedding and head, counted on the meta device (no memory)."""
    import torch

    from quest_pl.model import Llama, LlamaConfig

    with torch.device("meta"):
        model = Llama(
            LlamaConfig(
                vocab_size=258,
                n_layer=model_cfg.n_layer,
                d_model=model_cfg.d_model,
                n_head=model_cfg.n_head,
                seq_len=model_cfg.seq_len,
            )
        )
    return model.non_embedding_params()


def world_size(trainer_cfg) -> int:
    """Data-parallel processes the trainer will start, from ``trainer.devices`` and ``trainer.num_nodes``."""
    devices = trainer_cfg.devices
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, int) and devices > 0:
        n = devices
    else:  # "auto" or -1: every visible GPU on a GPU run, one process on CPU
        import torch

        on_gpu = trainer_cfg.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        n = torch.cuda.device_count() if on_gpu else 1
    return n * int(trainer_cfg.get("num_nodes") or 1)


def tokens_per_step(cfg: DictConfig) -> int:
    return cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * world_size(cfg.trainer) * cfg.model.seq_len


def budget_steps(tokens: float, step_tokens: int) -> int | float:
    """``floor(tokens / step_tokens)``, the paper's iteration count (a float beyond 2**63, which no run can have)."""
    steps = tokens // step_tokens
    return int(steps) if steps < 2**63 else steps


def planned_tokens(cfg: DictConfig) -> float | None:
    """The token budget the config asks for, or ``None`` when ``trainer.max_steps`` stands as given."""
    tokens = OmegaConf.select(cfg, "trainer.tokens", default=None)
    if tokens is not None:
        return float(tokens)
    tpp = OmegaConf.select(cfg, "scale.tokens_per_param", default=None)
    if tpp is not None:
        return float(tpp) * non_embedding_params(cfg.model)
    return None


def budgeted_max_steps(cfg: DictConfig) -> int:
    """The ``trainer.max_steps`` the run will have: the budget's step count when one is asked for, else the key."""
    tokens = planned_tokens(cfg)
    return cfg.trainer.max_steps if tokens is None else budget_steps(tokens, tokens_per_step(cfg))
