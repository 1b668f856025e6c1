"""QuEST-PL: quantization-aware training of Llama-style models down to 1-bit weights and activations.

The library side is importable without Lightning or Hydra being touched::

    import quest_pl
    model = quest_pl.quantize_(model, quest_pl.QuantConfig.quest(bits=4))

Subpackages: ``quest_pl.quantizers`` (grids, Hadamard), ``quest_pl.estimators`` (backward rules),
``quest_pl.kernels`` (Triton), and the Lightning side (``model``, ``data``, ``module``, ``train``, ``callbacks``).
Importing this package costs nothing: the names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_LAZY = {
    "QuantConfig": "quest_pl.quant",
    "OperandSpec": "quest_pl.quant",
    "QuantLinear": "quest_pl.quant",
    "quantize_": "quest_pl.quant",
    "quantize_model": "quest_pl.quant",
    "Llama": "quest_pl.model",
    "LlamaConfig": "quest_pl.model",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quest_pl' has no attribute {name!r}")
