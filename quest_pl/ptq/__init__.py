"""Post-training quantization (PTQ) of a trained checkpoint: data-free HIGGS-style grids, or calibrated AQLM (below).

Every linear that QAT would quantize (those inside the transformer blocks, :func:`quest_pl.quant.quantize_model`) gets
its weight replaced, once and without data, by ``Q(W H)``: the block Hadamard H along ``in_features`` (optional; block
``ptq.hadamard_block``, 128 by default), then any ``quantizers`` grid, built by the same ``quantizers.build(grid, bits,
group_size=..., scale_rule=...)`` call as a QAT arm's operand (``quest_pl.quant.OperandSpec``) and applied as
QAT's ``QuantLinear`` applies it (fp32 rotation, then the grid), so a PTQ weight is bit for bit the weight a QAT arm
of the same format would see: per-row scales, per group of ``g`` elements along the row (``ptq.group_size``, as
``quant.group_size``; or, PTQ only, a multiple of 128), the block formats' groups (mxfp4: 32, nvfp4: 16) with their
``ptq.scale_rule``. At inference the input is rotated the same way, ``y = Qa(x H) Q(W H)^T``: QuantLinear's half form
(METHOD.md §1.8), with the activation quantizer ``Qa`` optional (W4A16 or W4A4; per token, or per group of
``ptq.act_group_size``). Embeddings, ``lm_head`` and norms stay as trained.

Command line (``experiments/config.yaml``, group ``ptq``)::

    python run.py ptq.from=outputs/bf16/<time>/checkpoints/last.ckpt ptq.grid=gaussian_mse ptq.bits=4 \
        ptq.hadamard=true [ptq.act_bits=4] [ptq.group_size=128]
    python run.py ptq.from=<ckpt> ptq.grid=nvfp4 ptq.scale_rule=four_over_six ptq.hadamard_block=16 ptq.act_bits=4

evaluates on the validation split of the run that wrote the checkpoint (its ``.hydra/config.yaml``; else the composed
``data`` group), logs ``val/loss`` and ``val/ppl`` to TensorBoard at the checkpoint's step and writes ``metrics.json``.

``ptq.method=aqlm`` replaces the scalar grid by additive vector quantization (AQLM, :mod:`quest_pl.quantizers.aqlm`),
which is **calibrated, not data-free**: each block linear's weight is coded in groups of ``ptq.aqlm.group_size`` = g
input weights as a sum of ``ptq.aqlm.num_codebooks`` = M codewords from learned codebooks of ``2^B`` vectors, with
``B = ptq.bits * g / M`` (``ptq.bits=2``: the paper's 2x8 at g = 8 by default, 1x16 with ``ptq.aqlm.num_codebooks=1``),
minimising the layer's output error on the inputs it sees on the first ``ptq.calib_batches`` training batches of the
run, block by block (later blocks calibrated on the outputs of the already quantized ones)::

    python run.py ptq.from=<ckpt> ptq.method=aqlm ptq.bits=2 [ptq.aqlm.num_codebooks=1] [ptq.aqlm.finetune_steps=200]

``ptq.aqlm.finetune_steps`` > 0 adds the end-to-end fine-tuning of all codebooks and scales (codes fixed) by Adam on
the KL divergence to the full-precision model's next-token distribution, on the same calibration batches.
``metrics.json`` reports the bits per weight including the fp16 codebooks and scales (``aqlm.bits_per_weight``): on
small layers the codebooks cost more than the codes (2x8 adds ``2 * 256 * 8 * 16`` bits per layer, 1x16 ``2^16 * 8 *
16``; on the tiny model 2x8 is about 3 bits per weight in all). 1x16 is slow on CPU (every code choice scores 65,536
codewords); it runs on the GPU when ``trainer.accelerator`` allows.

Modules: the ``ptq`` group's schema is :mod:`quest_pl.config.ptq` (:class:`PTQConfig`), :mod:`.layers` (the
replacement layers), :mod:`.scalar` (data-free grids), :mod:`.aqlm` (AQLM calibration), :mod:`.finetune` (AQLM's
end-to-end fine-tuning), :mod:`.job` (a PTQ job: load, quantize, evaluate) and :mod:`.rows` (a sweep's PTQ rows).
"""

from quest_pl.config.ptq import METHODS, SCALAR_KEYS, SCALE_RULE_TAGS, AQLMSettings, PTQConfig, named_scale_rule
from quest_pl.ptq.aqlm import calibration_batches, quantize_model_aqlm
from quest_pl.ptq.finetune import finetune_aqlm
from quest_pl.ptq.job import evaluate, load_checkpoint, module_from_checkpoint, ptq_values, run, run_config_of
from quest_pl.ptq.layers import AQLMLinear, PTQLinear
from quest_pl.ptq.rows import ptq_bits_per_element, ptq_row, sweep_configs, sweep_rows
from quest_pl.ptq.scalar import quantize_model_ptq, quantize_weight

__all__ = [
    "METHODS",
    "SCALAR_KEYS",
    "SCALE_RULE_TAGS",
    "AQLMLinear",
    "AQLMSettings",
    "PTQConfig",
    "PTQLinear",
    "calibration_batches",
    "evaluate",
    "finetune_aqlm",
    "load_checkpoint",
    "module_from_checkpoint",
    "named_scale_rule",
    "ptq_bits_per_element",
    "ptq_row",
    "ptq_values",
    "quantize_model_aqlm",
    "quantize_model_ptq",
    "quantize_weight",
    "run",
    "run_config_of",
    "sweep_configs",
    "sweep_rows",
]
