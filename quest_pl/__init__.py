"""QuEST-PL: quantization-aware training of Llama-style models down to 1-bit weights and activations.

The library side is importable without Lightning or Hydra being touched::

    import quest_pl
    model = quest_pl.quantize_(model, quest_pl.QuantConfig.quest(bits=4))
    ...  # train with any loop
    quest_pl.convert_(model)  # frozen: packed weights, activation quantizers kept
    quest_pl.save_quantized(model, "out")  # load_quantized("out", skeleton), or from_pretrained for transformers

Subpackages: ``quest_pl.quantizers`` (grids, Hadamard), ``quest_pl.estimators`` (backward rules),
``quest_pl.kernels`` (Triton), and the Lightning side (``model``, ``data``, ``module``, ``train``, ``callbacks``).
Importing this package costs nothing: the names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from quest_pl import hub as _hub

__version__ = "0.2.0"

_LAZY = {
    "QuantConfig": "quest_pl.quant",
    "OperandSpec": "quest_pl.quant",
    "QuantLinear": "quest_pl.quant",
    "quantize_": "quest_pl.quant",
    "quantize_model": "quest_pl.quant",
    "Llama": "quest_pl.model",
    "LlamaConfig": "quest_pl.model",
    "convert_": "quest_pl.convert",
    "PackedLinear": "quest_pl.convert",
    "save_quantized": "quest_pl.saving",
    "load_quantized": "quest_pl.saving",
}

__all__ = ["__version__", *sorted(_LAZY)]

# A converted model saved for transformers loads with AutoModelForCausalLM.from_pretrained once quest_pl is imported:
# the quantization method registers itself when transformers' quantizer registry loads (transformers is not imported).
_hub.register_on_import()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quest_pl' has no attribute {name!r}")
