"""Validation of the data keys this package adds, before any work (called from :func:`quest_pl.config.validate`)."""

from __future__ import annotations

import codecs
import os

from omegaconf import DictConfig

from quest_pl.config import ConfigError, check


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _known_encoding(v) -> bool:
    try:
        codecs.lookup(v)
        return True
    except (LookupError, TypeError):
        return False


def validate(cfg: DictConfig) -> None:
    source = cfg.data.source
    check(cfg, "data.encoding", lambda v: isinstance(v, str) and _known_encoding(v), "a Python codec name, e.g. utf-8")
    check(
        cfg,
        "data.max_tokens",
        lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and v >= 1 and float(v).is_integer(),
        "null (all) or a whole number of training tokens >= 1, e.g. 3e9",
        optional=True,
    )
    for key in ("data.max_docs", "data.max_val_docs", "data.tokenizer_train_docs"):
        check(cfg, key, lambda v: _is_int(v) and v >= 1, "null (all) or an integer >= 1", optional=True)
    tok = check(cfg, "data.tokenizer", lambda v: isinstance(v, str) and v != "", "null or a tokenizer", optional=True)
    old = cfg.data.get("tokenizer_path")
    if tok is not None and old is not None:
        raise ConfigError(f"data.tokenizer_path={old!r}: give data.tokenizer only (tokenizer_path is its older name)")
    if tok is not None:
        from quest_pl.data.tokenizer import is_hub_name

        p = os.path.expanduser(tok)
        if not is_hub_name(tok) and not os.path.exists(p):
            raise ConfigError(f"data.tokenizer={tok!r}: no such file or directory")
    if source == "text_file" and isinstance(cfg.data.path, str):
        from quest_pl.data.sources import text_files

        if not text_files(cfg.data.path):
            raise ConfigError(
                f"data.path={cfg.data.path!r}: matches no file (a directory is not a document: use DIR/*.txt)"
            )
    if source == "bin":
        check(cfg, "data.dtype", lambda v: v in ("uint16", "uint32"), "uint16 (nanoGPT's layout) or uint32")
        path = check(
            cfg, "data.path", lambda v: isinstance(v, str) and v != "", "a directory holding train.bin and val.bin"
        )
        if not os.path.isdir(os.path.expanduser(path)):
            raise ConfigError(f"data.path={path!r}: expected a directory holding train.bin and val.bin")
