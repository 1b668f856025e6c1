"""Data: documents -> tokenizer -> prepared token files (cached, verified) -> deterministic batches.

Sources (``data.source``): ``embedded`` (default; 38 Shakespeare plays shipped in the package), ``text_file`` (local
files), ``hub`` (a Hugging Face dataset, streamed; online only), and ``bin`` (an existing ``train.bin`` / ``val.bin``
pair in nanoGPT's layout). See :mod:`quest_pl.data.sources`, :mod:`quest_pl.data.tokenizer`,
:mod:`quest_pl.data.shards` (preparation, cache, verification) and :mod:`quest_pl.data.module` (batches).

Preparing a large corpus is a separate step, ``python -m quest_pl.data prepare data=c4 data.max_tokens=3e9``; a
training run with the same ``data`` overrides then reads the prepared files by memory map. Importing this package
costs nothing: the names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Document": "quest_pl.data.sources",
    "EMBEDDED_CORPUS": "quest_pl.data.sources",
    "iter_documents": "quest_pl.data.sources",
    "load_documents": "quest_pl.data.sources",
    "split_documents": "quest_pl.data.sources",
    "EOS": "quest_pl.data.tokenizer",
    "train_tokenizer": "quest_pl.data.tokenizer",
    "DataSpec": "quest_pl.data.shards",
    "prepare": "quest_pl.data.shards",
    "LMDataModule": "quest_pl.data.module",
    "TokenWindows": "quest_pl.data.module",
    "StepBatches": "quest_pl.data.module",
    "ResumeSampler": "quest_pl.data.module",
    "ResumableLoader": "quest_pl.data.module",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quest_pl.data' has no attribute {name!r}")
