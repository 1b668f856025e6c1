"""Token budgets (METHOD.md §3): iterations = floor(tokens / tokens per step); the paper's step counts."""

import logging

import pytest

from quest_pl.budget import apply_token_budget, non_embedding_params, tokens_per_step
from quest_pl.config import ConfigError, compose, validate

# METHOD.md §3 model-size table: non-embedding parameters, training tokens, iterations at 512 x 512 tokens per step.
PAPER = {
    "llama_30m": (30_482_560, 3e9, 11_444),
    "llama_50m": (49_556_736, 5e9, 19_073),
    "llama_100m": (102_777_856, 10e9, 38_146),
    "llama_200m": (203_188_480, 20e9, 76_293),
    "llama_430m": (443_068_288, 43e9, 164_031),
    "llama_800m": (822_151_168, 80e9, 305_175),
}
PAPER_BATCH = ("data.batch_size=64", "trainer.accumulate_grad_batches=8", "trainer.devices=1")  # 262,144 tokens


@pytest.mark.parametrize("model", sorted(PAPER))
def test_paper_step_counts(model):
    params, tokens, iterations = PAPER[model]
    cfg = compose(f"model={model}", *PAPER_BATCH, f"trainer.tokens={tokens}")
    assert tokens_per_step(cfg) == 512 * 512
    assert non_embedding_params(cfg.model) == params
    assert apply_token_budget(cfg) == iterations == cfg.trainer.max_steps
    # tokens_per_param applies the rule to the exact count; the paper rounded tokens to the nominal size (<= 3% apart)
    cfg = compose(f"model={model}", *PAPER_BATCH, "scale.tokens_per_param=100")
    steps = apply_token_budget(cfg)
    assert steps == int(100 * params // (512 * 512))
    assert abs(steps / iterations - 1) < 0.035


def test_gpu_30m_preset_is_the_paper_budget():
    cfg = compose("+scale=gpu_30m", "trainer.tokens=3e9")
    assert apply_token_budget(cfg) == 11_444 == compose("+scale=gpu_30m").trainer.max_steps


def test_world_size_multiplies_the_global_batch():
    cfg = compose("data.batch_size=8", "trainer.devices=4", "trainer.num_nodes=2", "trainer.tokens=1e6")
    assert tokens_per_step(cfg) == 8 * 4 * 2 * cfg.model.seq_len
    assert apply_token_budget(cfg) == int(1e6 // (64 * cfg.model.seq_len))


def test_epochs_are_logged_and_repeats_warned(caplog):
    cfg = compose("trainer.max_steps=10", "data.batch_size=4")  # 40 windows of 128 tokens
    with caplog.at_level(logging.INFO, logger="quest_pl.budget"):
        apply_token_budget(cfg, train_tokens=128 * 101 + 1)  # 100 windows per epoch
    assert "0.4 epochs" in caplog.text and "repeats" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="quest_pl.budget"):
        apply_token_budget(cfg, train_tokens=128 * 21 + 1)  # 20 windows per epoch
    assert "2 epochs" in caplog.text and "repeats its training data" in caplog.text
    assert cfg.trainer.max_steps == 10  # no budget asked: max_steps stands


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.tokens=3e9", "scale.tokens_per_param=100"], "give either it or trainer.tokens"),
        (["trainer.tokens=-1"], r"trainer.tokens=-1: expected"),
        (["scale.tokens_per_param=abc"], r"scale.tokens_per_param='abc': expected"),
    ],
)
def test_budget_keys_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(*overrides))


def test_budget_smaller_than_a_step_is_one_line():
    with pytest.raises(ConfigError, match="less than one step"):
        apply_token_budget(compose("trainer.tokens=100"))
