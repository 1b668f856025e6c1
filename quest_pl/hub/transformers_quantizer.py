"""QuEST-PL as a ``transformers`` quantization method, registered out of tree (``register_quantization_config`` /
``register_quantizer``): a ``config.json`` whose ``quantization_config`` has ``quant_method: quest_pl`` loads with
``AutoModelForCausalLM.from_pretrained`` as the converted model (``quest_pl.convert``): before the weights are read,
each layer of the config's layer table becomes an empty ``PackedLinear`` whose buffers carry the file's tensor names
(codes, scales, table, bias, the activation quantizer's state), so ``transformers``' own loader fills them; after, every
float tensor is checked finite.

``import quest_pl`` registers this module when ``transformers`` is imported (before or after), without importing
``transformers`` itself (``quest_pl.hub.register_on_import``). The packed tensors keep the dtype they were saved in
whatever ``dtype`` the model is loaded with: ``transformers`` casts a tensor to the dtype of the empty module it loads
into, and the packed layers are built with fp32 scales and tables and uint8 codes (the quantizer arithmetic stays
fp32; METHOD.md §7.12).
"""

from __future__ import annotations

from typing import Any

import torch

# Submodules, not the package: this module is imported while transformers.quantizers itself is still initialising.
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from quest_pl.config import ConfigError
from quest_pl.convert import QUANT_METHOD, PackedLinear, packed_layers
from quest_pl.packing import FORMAT, READS_VERSIONS


class QuestPLConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a converted model: the packed format, its version and the layer table (name ->
    the layer's metadata, as ``quest_pl.convert.layer_table`` writes it)."""

    def __init__(self, format: str = FORMAT, format_version: int = 3, layers: dict | None = None, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.format = format
        self.format_version = format_version
        self.layers = dict(layers or {})
        if format != FORMAT or format_version not in READS_VERSIONS:
            raise ConfigError(
                f"quantization_config: format {format} v{format_version}; this quest_pl reads {FORMAT} "
                f"v{', v'.join(map(str, READS_VERSIONS))}"
            )
        if format_version < 3:
            raise ConfigError("quantization_config: format versions before 3 were not written for transformers")


class QuestPLHfQuantizer(HfQuantizer):
    """Loads a pre-quantized (converted) QuEST-PL model; it does not quantize a full-precision one (train with
    ``quest_pl.quantize_`` and convert with ``quest_pl.convert_`` instead)."""

    requires_calibration = True  # pre-quantized checkpoints only

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ValueError(
                "quest_pl: from_pretrained(quantization_config=QuestPLConfig(...)) cannot quantize a model; "
                "QAT it with quest_pl.quantize_, convert it with quest_pl.convert_ and save it"
            )

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        from quest_pl.saving import install_packed_layers

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        install_packed_layers(model, self.quantization_config.layers, "from_pretrained", device=device)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        from quest_pl.saving import check_finite

        for name, layer in packed_layers(model).items():
            check_finite({f"{name}.{k}": v for k, v in layer.state_dict().items()}, "from_pretrained")
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the config and the quantizer with ``transformers`` (once)."""
    if QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:
        return
    register_quantization_config(QUANT_METHOD)(QuestPLConfig)
    register_quantizer(QUANT_METHOD)(QuestPLHfQuantizer)


__all__ = ["PackedLinear", "QuestPLConfig", "QuestPLHfQuantizer", "register"]
