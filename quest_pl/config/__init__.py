"""The config layer: the schema and validation of a composed config, below everything that uses it.

Validation runs before any work and raises :class:`ConfigError`, one line naming the key, the bad value and what is
allowed (``run.py`` prints it without a traceback, exit code 2). One module per group: :mod:`.checks` (the error and
the generic checks), :mod:`.trainer`, :mod:`.data`, :mod:`.budget` (token budgets, METHOD.md §3), :mod:`.ptq` (the
``ptq`` group's schema), :mod:`.resume` (a resume against its checkpoint), :mod:`.names` (run names and resolvers),
:mod:`.rules` (which keys need which others) and :mod:`.validation` (:func:`validate`, every group in one order).
This package imports nothing of ``quest_pl`` but the library layer (``quantizers``, ``model``).
"""

from quest_pl.config.checks import (
    CONFIG_DIR,
    PATH_KEYS,
    ConfigError,
    check,
    compose,
    expand_paths,
    positive_int,
    suggest,
)
from quest_pl.config.data import check_hub_reachable, tokenizer_vocab_size, validate_data
from quest_pl.config.resume import (
    RESUME_GROUPS,
    RESUME_IGNORED,
    RESUME_KEYS,
    check_checkpoint,
    check_resume,
)
from quest_pl.config.trainer import (
    MAX_STEPS,
    PROJECT_TRAINER_KEYS,
    TRAINER_KNOWN,
    check_devices,
    trainer_parameters,
    validate_trainer,
)
from quest_pl.config.validation import (
    check_rules,
    learned_init_compile_error,
    validate,
    validate_grad_comm,
    validate_quant,
)

__all__ = [
    "CONFIG_DIR",
    "MAX_STEPS",
    "PATH_KEYS",
    "PROJECT_TRAINER_KEYS",
    "RESUME_GROUPS",
    "RESUME_IGNORED",
    "RESUME_KEYS",
    "TRAINER_KNOWN",
    "ConfigError",
    "check",
    "check_checkpoint",
    "check_devices",
    "check_hub_reachable",
    "check_resume",
    "check_rules",
    "compose",
    "expand_paths",
    "learned_init_compile_error",
    "positive_int",
    "suggest",
    "tokenizer_vocab_size",
    "trainer_parameters",
    "validate",
    "validate_data",
    "validate_grad_comm",
    "validate_quant",
    "validate_trainer",
]
