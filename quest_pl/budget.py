"""Applying a token budget to a run: sets ``trainer.max_steps`` (the arithmetic, METHOD.md §3, is
:mod:`quest_pl.config.budget`, which validation and resume checks use too) and logs the epochs the run reads."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from quest_pl.config.budget import (  # noqa: F401  (public here as before: quest_pl.budget.tokens_per_step, ...)
    budget_steps,
    budgeted_max_steps,
    check_budget,
    non_embedding_params,
    planned_tokens,
    tokens_per_step,
    world_size,
)

log = logging.getLogger(__name__)


def apply_token_budget(cfg: DictConfig, train_tokens: int | None = None) -> int:
    """Set ``cfg.trainer.max_steps`` from the budget (when one is asked for), log the epochs of the training split
    (``train_tokens`` long) that the run reads, warn above one. Returns ``max_steps``."""
    step_tokens = tokens_per_step(cfg)
    tokens = planned_tokens(cfg)
    if tokens is not None:
        steps = check_budget(cfg)
        if steps != cfg.trainer.max_steps:
            log.info(
                "Token budget %.4g tokens / %s tokens per step: trainer.max_steps = %d (replaces %d)",
                tokens,
                f"{step_tokens:,}",
                steps,
                cfg.trainer.max_steps,
            )
        cfg.trainer.max_steps = steps
    if train_tokens:
        # Windows of seq_len + 1 tokens, one fewer per epoch for the random offset (quest_pl.data.module.StepBatches).
        per_epoch = max(1, (train_tokens - 1) // cfg.model.seq_len - 1)
        samples = cfg.trainer.max_steps * step_tokens // cfg.model.seq_len
        epochs = samples / per_epoch
        log.info(
            "The run reads %s tokens: %.3g epochs of the %s-token training split",
            f"{samples * cfg.model.seq_len:,}",
            epochs,
            f"{train_tokens:,}",
        )
        if epochs > 1:
            log.warning(
                "the run repeats its training data: %.3g epochs of %s tokens (prepare more data, e.g. data.max_tokens)",
                epochs,
                f"{train_tokens:,}",
            )
    return cfg.trainer.max_steps
