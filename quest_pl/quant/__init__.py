"""Quantization wiring: what to quantize is data (:class:`QuantConfig`), how is code (``quantizers``, ``estimators``).

:func:`quantize_` swaps the ``nn.Linear`` layers of any ``nn.Module`` for :class:`QuantLinear` (by default all but the
output head; ``filter_fn`` chooses). :func:`quantize_model` is its use on the project's Llama: every ``nn.Linear``
inside the transformer blocks (attention ``c_attn`` and ``c_proj``, MLP ``w12`` = w1‖w2 and ``c_proj``); embeddings,
``lm_head`` and norms stay in full precision (METHOD.md §2). The model file knows nothing of this.

Hadamard placement (METHOD.md §1.8). Each quantized operand is rotated along ``in_features`` by the block-128 Hadamard H
before its quantizer: ``half`` multiplies in the rotated basis, ``y = Qa(x H) Qw(W H)^T``; ``full`` rotates back
after quantizing, ``y = (Qa(x H) H) (Qw(W H) H)^T``. With both operands quantized the two are equal (H H = I); masks
live in the rotated basis and gradients flow back through H. As in the authors' code the rotation belongs to the
quantizer, so a weight-only ``half`` run computes ``y = x Qw(W H)^T``: a fixed orthogonal re-parametrisation of the
latent weight that needs no Hadamard at inference (the paper's W*A16 runs). ``quant.hadamard_block`` (16-128) sets
the block; group scales (``quant.group_size``, and the MXFP4/NVFP4 grids) nest with it (``quantizers.base``).

``quant.backward`` = ``sr`` | ``rtn`` | ``rtn_rht`` quantizes the output gradient entering both backward GEMMs, in
``quant.backward_format`` (``nvfp4``, ``mxfp4``, ``int8`` or ``fp8``; ``rtn`` + ``fp8`` runs on FP8 tensor cores
with ``quant.matmul=int8``), and with ``quant.backward_operands=all`` the saved weight
and activation too (``estimators.backward``); ``none`` keeps the full-precision backward.

Modules: :mod:`.spec` (the configs), :mod:`.linear` (the layer), :mod:`.swap` (putting it in place).
"""

from quest_pl.quant.linear import QuantLinear
from quest_pl.quant.spec import (
    BACKWARD_DEFAULTS,
    BACKWARD_KEYS,
    HADAMARD_MODES,
    KERNEL_MODES,
    MATMUL_MODES,
    QUANT_PARAM_MARKERS,
    OperandSpec,
    QuantConfig,
    check_backward,
    has_learned_scale,
    kernel_unsupported,
    learned_init_error,
)
from quest_pl.quant.swap import (
    HEAD_NAMES,
    bits_per_element,
    full_precision,
    is_quantizer_param,
    output_heads,
    quant_layers,
    quantize_,
    quantize_model,
)
from quest_pl.quantizers.base import format_bits_per_element

__all__ = [
    "BACKWARD_DEFAULTS",
    "BACKWARD_KEYS",
    "HADAMARD_MODES",
    "HEAD_NAMES",
    "KERNEL_MODES",
    "MATMUL_MODES",
    "QUANT_PARAM_MARKERS",
    "OperandSpec",
    "QuantConfig",
    "QuantLinear",
    "bits_per_element",
    "check_backward",
    "format_bits_per_element",
    "full_precision",
    "has_learned_scale",
    "is_quantizer_param",
    "kernel_unsupported",
    "learned_init_error",
    "output_heads",
    "quant_layers",
    "quantize_",
    "quantize_model",
]
