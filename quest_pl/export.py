"""Packed low-bit export of a trained checkpoint, the loader that rebuilds it bit-exactly, and the integer path.

``python -m quest_pl.export CKPT OUT_DIR [--hf HF_DIR]`` writes ``OUT_DIR/model.safetensors``, ``OUT_DIR/config.json``
and ``OUT_DIR/tokenizer.json``; :func:`load_packed` builds the inference model (a :class:`~quest_pl.model.Llama` whose
block linears are :class:`PackedLinear`). Its logits equal the QAT model's quantized forward (``QuantLinear``, eval
mode, PyTorch path) at the same latent weights to the last bit on CPU in fp32.

Why the reload is exact. Every weight grid maps a row to ``value = table[code] * scale``, one fp32 product per element,
and the quantizers compute exactly that product (``quantizers.integer``: ``(k + 1/2) * step``; ``quantizers.levels``:
``levels[i] * sigma_hat``; the block formats ``round_e2m1(x / d) * d``). The export stores the code, the fp32 table and
the per-row (per-group) factor (``step`` for INT grids, ``sigma_hat`` for level grids, ``d = s * G`` for MXFP4/NVFP4
from its encoded parts), so decoding repeats the same IEEE operations on the same operands. The exporter
checks that every decoded weight equals the quantizer's output bit for bit and refuses to write otherwise. Activations
are re-quantized at run time by the same estimator modules (learned LSQ/PACT scales are stored), and the Hadamard
transform and ``F.linear`` are the same calls as in ``QuantLinear``.

File layout (safetensors; all codes unsigned, packed per row, rows padded to whole bytes). For a ``b``-bit code
stream, element ``j`` of a row has its bit ``t`` at stream bit ``j*b + t``, stored in byte ``(j*b + t) // 8`` at bit
``(j*b + t) % 8`` (least significant first). Hence at 4 bits two codes per byte, the first in the low nibble; at 2 bits
four per byte; at 1 bit eight per byte; at 3 bits eight codes in three bytes; at 8 bits one byte per code.
Per quantized linear ``<name>`` (e.g. ``blocks.0.attn.c_attn``):

* ``<name>.codes``: uint8 ``[rows, ceil(n_codes * b / 8)]``, the code stream of each row;
* ``<name>.scale``: fp32 ``[rows]``, the per-row factor; ``<name>.table``: fp32 ``[2^b]``, the value of each code in
  units of that factor. Dequantized weight (in the Hadamard-rotated basis when ``hadamard`` is set)
  ``W_q[r, j] = table[code[r, j]] * scale[r]``;
* group scales (``group_size = g`` in the layer's metadata, ``quant.group_size``): ``<name>.scale`` is fp32
  ``[rows, cols / g]`` and ``W_q[r, j] = table[code[r, j]] * scale[r, j // g]`` (the per-row rules below, per group);
* ``mxfp4`` / ``nvfp4`` (format ``block_fp4``, g = 32 / 16): ``code`` = E2M1 bit pattern as for ``fp4``, ``table`` the
  16 E2M1 values (``(0, .5, 1, 1.5, 2, 3, 4, 6)``, negated for codes 8-15); ``<name>.scale``: uint8 ``[rows, cols / g]``
  in the format's scale encoding (``scale_encoding`` ``e8m0``: ``s = 2^(byte - 127)``; ``e4m3``: the float8_e4m3fn
  bit pattern); ``<name>.tensor_scale``: fp32 ``[1]``, the tensor scale ``G`` (1 for MXFP4). The element unit is
  ``d = s * G`` (fp32) and ``W_q[r, j] = table[code[r, j]] * d[r, j // g]``: 4.25 (MXFP4) and 4.5 (NVFP4) bits per
  weight, as the formats specify;
* INT grids (``gaussian_mse``, ``uniform``, LSQ/PACT scales): ``code = k + 2^(b-1)``, ``table[code] = code - 2^(b-1) +
  1/2``, ``scale = step``: the odd integer ``2 table[code]`` is the integer code of the integer path;
* ``lloyd_max`` and ``ternary``: ``code`` = level index (ascending), ``table`` = fp32 levels (sigma units), ``scale`` =
  ``sigma_hat``;
* ``fp4``: ``code`` = E2M1 bit pattern, sign in bit 3, magnitude ``(0, .5, 1, 1.5, 2, 3, 4, 6)`` in bits 0-2 (two
  per byte); ``table[code] = fp32(a * (+-)magnitude)``, ``a`` the grid's scale, ``scale = sigma_hat``;
* ``int_sparse24`` (element-wise 2:4): only the 2 kept elements of each group of 4 are coded, ``codes`` holds
  ``cols / 2`` codes per row in position order; ``<name>.index``: the 2-bit positions (0-3, ascending within the
  group) of the kept elements, ``cols / 2`` per row in the 2-bit layout above (one byte per two groups). Pruned
  elements are 0;
* a weight left in full precision (``w_bits`` null, or the ``none`` estimator): ``<name>.weight``, fp32, as the layer
  uses it;
* learned activation scales: ``<name>.act_quant.<param>`` (LSQ ``step``, PACT ``clip``, and ``initialized``).

Embeddings, ``lm_head`` and norms are stored as they are (fp32). The metadata key ``quest_pl`` holds the JSON of
``config.json``: format version, model config, quant config, and per layer the format, grid, bits, group size, shape,
Hadamard form and block, and the activation quantizer (estimator, grid, bits, group size and scale rule).

The integer path (METHOD.md §5). For a centered INT grid on both operands, ``W_q = (c_w / 2) step_w`` and
``Qa(x) = (c_a / 2) step_a`` with odd integer codes ``c`` (0 for a pruned 2:4 element), so a W4A4 layer is
``y = (c_a c_w^T) * (step_a / 2) * (step_w / 2)^T``: one exact integer matmul times per-row scales, with the rotation
of both operands cancelling in the full form as well. :func:`int_matmul` is the single place where a CUDA INT8 GEMM
serves it; elsewhere it runs an exact float64 reference.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quest_pl import quantizers
from quest_pl.config import ConfigError
from quest_pl.data.run import TOKENIZER_FILE, find_tokenizer

log = logging.getLogger(__name__)

FORMAT = "quest-pl-packed"
FORMAT_VERSION = 2  # 2: group scales, MXFP4/NVFP4, the Hadamard block per layer (v1 files: block 128, per row)
READS_VERSIONS = (1, 2)
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# -- bit packing ----------------------------------------------------------------------------------------------------
def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Unsigned ``bits``-bit codes ``[rows, n]`` -> uint8 ``[rows, ceil(n * bits / 8)]`` (layout in the module
    docstring: element ``j``'s bit ``t`` at stream bit ``j * bits + t``, least significant bit of a byte first)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"codes of {bits} bits cannot be packed into bytes")
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    rows, n = codes.shape
    if bits in (1, 2, 4) and n * bits % 8 == 0:  # whole codes per byte: the same layout without a bit stream
        per_byte = 8 // bits
        shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=codes.device)
        return (codes.reshape(rows, -1, per_byte).to(torch.int32) << shifts).sum(-1).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(rows, n * bits)
    stream = F.pad(stream, (0, -(n * bits) % 8))
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=codes.device)
    return (stream.reshape(rows, -1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[rows, bytes]`` -> codes ``[rows, n]`` as int64."""
    if bits == 8:
        return packed[:, :n].long()
    rows = packed.shape[0]
    if bits in (1, 2, 4) and n * bits % 8 == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(rows, n).long()
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1)[:, : n * bits].reshape(rows, n, bits)
    weights = torch.tensor([1 << i for i in range(bits)], dtype=torch.int64, device=packed.device)
    return (stream.long() * weights).sum(-1)


# -- what a quantizer computes, as codes ----------------------------------------------------------------------------
def _estimator_clip(est: nn.Module, x32: Tensor) -> Tensor:
    """The per-row clip level ``s`` an INT-grid estimator uses on ``x32``, shape ``(rows, 1)`` (same fp32 ops)."""
    from quest_pl.estimators.lsq import LSQ
    from quest_pl.estimators.pact import PACT

    rms = quantizers.row_rms(x32)
    if isinstance(est, LSQ):
        return (est.step.float() * ((2**est.quantizer.bits - 1) / 2)).float().expand_as(rms)
    if isinstance(est, PACT):
        return est.clip.float().expand_as(rms)
    return est.quantizer.quantize(x32).scale


def int_step(est: nn.Module, x32: Tensor) -> Tensor:
    """``step = s * 2 / (n - 1)`` per row, exactly as ``quantizers.integer.int_grid_values`` computes it."""
    n = 2**est.quantizer.bits
    return _estimator_clip(est, x32) * 2 / (n - 1)


def odd_codes(values: Tensor, step: Tensor) -> Tensor:
    """The odd integers ``c = 2 values / step`` of centered-INT values ``(c / 2) step`` (0 stays 0), as int64.
    Exact: ``values`` is ``(c/2) step`` rounded once (relative error 2^-24), so the quotient is within 1e-4 of c."""
    return torch.round(values * 2 / step).long()


def is_int_estimator(est: nn.Module | None) -> bool:
    """Whether ``est`` quantizes to a centered INT grid with one scale per row (what the integer path computes)."""
    from quest_pl.quantizers.integer import IntGrid

    grid = getattr(est, "quantizer", None)
    return est is not None and isinstance(grid, IntGrid) and grid.group_size is None


def _fp4_code_table(levels: Tensor) -> tuple[Tensor, Tensor]:
    """(level index -> E2M1 code, E2M1 code -> fp32 value) for the 15 fp4 levels (index 7 is 0)."""
    index_to_code = torch.tensor([8 | (7 - i) for i in range(7)] + list(range(8)), dtype=torch.long)
    table = torch.empty(16, dtype=torch.float32)
    table[index_to_code] = levels
    table[8] = levels[7]  # -0 decodes to the grid's zero
    return index_to_code, table


def _e2m1_code_table() -> Tensor:
    """E2M1 code (sign in bit 3, magnitude index in bits 0-2) -> its fp32 value (code 8 is -0)."""
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32)
    return torch.cat((mags, -mags))


def _e2m1_codes(e: Tensor) -> Tensor:
    """E2M1 codes of E2M1 values ``e`` (exact members of the table, signed zeros keep their sign)."""
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=e.device)
    index = torch.searchsorted(mags, e.abs())
    return index + 8 * torch.signbit(e).long()


def _encode_block_scale(s: Tensor, encoding: str) -> Tensor:
    """Per-group scale values ``s`` (exact members of the encoding) as uint8 codes: E8M0 = exponent + 127, E4M3 =
    the float8_e4m3fn bit pattern."""
    if encoding == "e8m0":
        return (torch.frexp(s).exponent - 1 + 127).to(torch.uint8)
    return s.to(torch.float8_e4m3fn).view(torch.uint8)


def _decode_scale(tensors: dict[str, Tensor], meta: dict) -> Tensor:
    """The fp32 scale per row or per group, shape ``(rows, groups, 1)`` (the grid's product ``s * G`` for the block
    formats)."""
    scale = tensors["scale"]
    encoding = meta.get("scale_encoding", "fp32")
    if encoding == "e8m0":
        scale = torch.ldexp(torch.ones(scale.shape, dtype=torch.float32, device=scale.device), scale.long() - 127)
    elif encoding == "e4m3":
        scale = scale.view(torch.float8_e4m3fn).float()
    else:
        scale = scale.float()
    if "tensor_scale" in tensors:
        scale = scale * tensors["tensor_scale"].float().reshape(())
    return scale.reshape(meta["rows"], -1, 1)


@dataclass
class Encoded:
    """One layer's stored tensors and metadata."""

    tensors: dict[str, Tensor]
    meta: dict


@torch.no_grad()
def encode_weight(layer: nn.Module) -> Encoded:
    """Codes, table and per-row (per-group) scale of a ``QuantLinear``'s quantized weight (in the basis its quantizer
    works in), checked to decode to the quantizer's output bit for bit."""
    from quest_pl.quantizers.e2m1 import BlockFP4, round_e2m1
    from quest_pl.quantizers.int_sparse24 import IntSparse24, two_four_keep_mask
    from quest_pl.quantizers.integer import IntGrid
    from quest_pl.quantizers.levels import LevelGrid

    est = layer.weight_quant
    w = layer.weight.detach().float()
    rows, cols = w.shape
    grid = getattr(est, "quantizer", None)
    block = getattr(layer, "hadamard_block", quantizers.HADAMARD_BLOCK)
    x32 = quantizers.hadamard_transform(w, block) if layer.hadamard and est is not None else w
    values = est(x32).float() if est is not None else x32  # the estimator's forward: exactly what QuantLinear uses
    if est is None or grid is None or getattr(est, "name", None) == "none":  # full precision or the identity
        return Encoded({"weight": values.contiguous()}, {"format": "dense"})
    if not isinstance(grid, (IntGrid, LevelGrid, BlockFP4)):
        raise ConfigError(f"weight grid {grid.name!r}: the packed format has no layout for it")
    bits = math.ceil(grid.bits)
    group = grid.group_size or cols
    xr, vr = x32.reshape(rows, cols // group, group), values.reshape(rows, cols // group, group)
    meta = {"grid": grid.name, "bits": bits, "group_size": grid.group_size}
    tensors = {}
    if isinstance(grid, IntGrid):
        n = 2**grid.bits
        step = int_step(est, x32).reshape(rows, -1, 1)
        codes = (odd_codes(vr, step) - 1).div(2, rounding_mode="floor") + n // 2  # k + n/2
        table = torch.arange(n, dtype=torch.float32) - n // 2 + 0.5
        scale = step
        meta["format"] = "int"
    elif isinstance(grid, LevelGrid):
        boundaries, levels = grid.fp32_tables(x32.device)
        scale = quantizers.base.safe_rms(quantizers.row_rms(xr))
        codes = torch.bucketize(xr / scale, boundaries, right=True)
        table = levels.clone()
        if grid.name == "fp4":
            index_to_code, table = _fp4_code_table(levels)
            codes = index_to_code[codes]
        meta["format"] = "levels"
    else:  # MXFP4 / NVFP4: E2M1 codes, the group scale in the format's encoding, the fp32 tensor scale
        _, s, tensor_scale = grid.quantize_parts(xr, quantizers.row_rms(xr))
        d = s * tensor_scale
        e = torch.where(d > 0, round_e2m1(xr / torch.where(d > 0, d, torch.ones_like(d))), 0.0)
        codes, table = _e2m1_codes(e), _e2m1_code_table()
        encoding = "e8m0" if grid.name == "mxfp4" else "e4m3"
        scale = _encode_block_scale(s, encoding)
        tensors["tensor_scale"] = tensor_scale.float().reshape(1)
        meta |= {"format": "block_fp4", "scale_encoding": encoding}
    codes = codes.reshape(rows, cols)
    tensors |= {"table": table, "scale": scale.reshape(rows, -1) if grid.group_size else scale.reshape(rows)}
    if isinstance(grid, IntSparse24):
        keep = two_four_keep_mask(x32)
        positions = torch.arange(cols).expand(rows, cols)[keep].reshape(rows, cols // 2) % 4
        codes = codes[keep].reshape(rows, cols // 2)
        tensors["index"] = pack_codes(positions, 2)
        meta["format"] = "int_sparse24"
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    tensors["codes"] = pack_codes(codes, bits)
    encoded = Encoded(tensors, meta | {"rows": rows, "cols": cols})
    if not torch.equal(decode_weight(encoded.tensors, encoded.meta), values):
        raise RuntimeError(f"{grid.name} {grid.bits}-bit weight does not round-trip exactly; refusing to export it")
    return encoded


def decode_weight(tensors: dict[str, Tensor], meta: dict) -> Tensor:
    """The dequantized weight ``table[code] * scale`` (rotated basis; the scale of the element's row or group), fp32
    ``[rows, cols]``."""
    if meta["format"] == "dense":
        return tensors["weight"].float()
    rows, cols, bits = meta["rows"], meta["cols"], meta["bits"]
    scale = _decode_scale(tensors, meta)  # (rows, groups, 1)
    table = tensors["table"].float()
    if meta["format"] == "int_sparse24":
        kept = table[unpack_codes(tensors["codes"], bits, cols // 2)]
        kept = (kept.reshape(rows, scale.shape[1], -1) * scale).reshape(rows, cols // 2)
        positions = unpack_codes(tensors["index"], 2, cols // 2)
        columns = positions + torch.arange(cols // 2, device=positions.device).div(2, rounding_mode="floor") * 4
        return torch.zeros(rows, cols, dtype=torch.float32, device=kept.device).scatter_(1, columns, kept)
    values = table[unpack_codes(tensors["codes"], bits, cols)]
    return (values.reshape(rows, scale.shape[1], -1) * scale).reshape(rows, cols)


# -- the integer path -----------------------------------------------------------------------------------------------
def int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact ``a @ b^T`` of integer codes ``a [M, K]``, ``b [N, K]`` (|code| <= 255), as float64 integers ``[M, N]``.

    The single place the CUDA INT8 GEMM plugs in: on CUDA, with codes that fit int8,
    ``quest_pl.kernels.int8.int_matmul`` (int32 accumulation) when it exists. Elsewhere a float64 matmul, which is
    exact here: every product is an integer below 2^16 and every partial sum an integer below K * 2^16 < 2^53 (for
    K < 2^37), all exactly representable, so any summation order gives the exact integer result.
    """
    if a.is_cuda and a.abs().max() <= 127 and b.abs().max() <= 127:
        try:
            from quest_pl.kernels.int8 import int_matmul as cuda_int_matmul
        except ImportError:
            cuda_int_matmul = None
        if cuda_int_matmul is not None:
            return cuda_int_matmul(a.to(torch.int8).contiguous(), b.to(torch.int8).contiguous()).double()
    return a.double() @ b.double().T


# -- the inference model --------------------------------------------------------------------------------------------
class PackedLinear(nn.Module):
    """A quantized linear rebuilt from the export: the dequantized weight (decoded once, kept as a buffer) and the
    activation estimator; ``forward`` computes what ``QuantLinear.forward`` computes in eval mode.

    ``int_path = True`` (INT grids on both operands) computes the layer as :func:`int_matmul` of the odd integer codes
    times per-row scales instead: the exact value of the product the float path rounds (equal up to fp32 rounding).
    """

    def __init__(
        self,
        weight_q: Tensor,
        meta: dict,
        act_quant: nn.Module | None,
        codes: Tensor | None = None,
        half_step: Tensor | None = None,
    ):
        super().__init__()
        self.meta = meta
        self.hadamard = meta["hadamard"]
        self.hadamard_block = meta.get("hadamard_block", quantizers.HADAMARD_BLOCK)
        self.act_quant = act_quant
        transform_back = self.hadamard == "full" and meta["weight_quantized"]
        weight = quantizers.hadamard_transform(weight_q, self.hadamard_block) if transform_back else weight_q
        self.register_buffer("weight", weight)
        self.register_buffer("weight_codes", codes)  # odd integer codes, for the integer path
        self.register_buffer("weight_half_step", half_step)  # step / 2 per row (exact), for the integer path
        self.int_path = False

    @property
    def supports_int_path(self) -> bool:
        return self.weight_codes is not None and is_int_estimator(self.act_quant)

    def extra_repr(self) -> str:
        out, inp = self.weight.shape
        block = f", hadamard_block={self.hadamard_block}" if self.hadamard and self.hadamard_block != 128 else ""
        return f"in_features={inp}, out_features={out}, format={self.meta['format']}, hadamard={self.hadamard}{block}"

    def _quantize_act(self, x: Tensor) -> Tensor:
        """``QuantLinear._quantize(x, act_quant, "act")``, PyTorch path."""
        if self.act_quant is None:
            return x
        if self.hadamard is None:
            return self.act_quant(x)
        block = self.hadamard_block
        q = self.act_quant(quantizers.hadamard_transform(x.to(torch.promote_types(x.dtype, torch.float32)), block))
        if self.hadamard == "full":
            q = quantizers.hadamard_transform(q, block)
        return q.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.int_path:
            return self._forward_int(x)
        return F.linear(self._quantize_act(x), self.weight.to(x.dtype))

    def _forward_int(self, x: Tensor) -> Tensor:
        x32 = x.float()
        if self.hadamard is not None:
            x32 = quantizers.hadamard_transform(x32, self.hadamard_block)
        values = self.act_quant(x32).float()
        half_step = int_step(self.act_quant, x32) / 2  # exact halving
        codes = odd_codes(values, 2 * half_step)
        acc = int_matmul(codes.flatten(0, -2), self.weight_codes)
        y = acc * half_step.flatten(0, -2).double() * self.weight_half_step.double().reshape(1, -1)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def set_int_path(model: nn.Module, enabled: bool = True) -> int:
    """Switch every :class:`PackedLinear` that supports it to the integer path; returns how many were switched."""
    n = 0
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.int_path = enabled and m.supports_int_path
            n += m.int_path
    return n


# -- checkpoints ----------------------------------------------------------------------------------------------------
def module_from_checkpoint(
    ckpt_path: str | Path,
    quant: dict | None = None,
    key: str = "checkpoint",
    kernel: str | None = "torch",
    strict_quantizers: bool = True,
):
    """The ``LMModule`` of a checkpoint with the quantization it was trained with (or ``quant``), every weight and
    quantizer state loaded, in eval mode on CPU. ``kernel="torch"`` (default) forces the PyTorch quantizer path, the
    exactness reference; None keeps the config's. ``strict_quantizers=False`` (another quantization than the
    checkpoint's) ignores LSQ/PACT state that does not match."""
    from quest_pl.module import LMModule
    from quest_pl.ptq import load_checkpoint
    from quest_pl.quant import is_quantizer_param

    ckpt = load_checkpoint(ckpt_path, key=key)
    hp = ckpt["hyper_parameters"]
    q = dict(hp.get("quant") or {}) if quant is None else dict(quant)
    if q.get("grid") is not None and kernel is not None:
        q["kernel"] = kernel
    try:
        module = LMModule(hp["model"], hp["optim"], quant=q, max_steps=hp.get("max_steps", 1))
    except TypeError as e:
        raise ConfigError(f"{key}={str(ckpt_path)!r}: incompatible model hyper-parameters ({e})") from None
    state = ckpt["state_dict"]
    if not strict_quantizers:
        own = module.state_dict()
        state = {k: v for k, v in state.items() if not is_quantizer_param(k) or k in own}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if not strict_quantizers:
        missing = [k for k in missing if not is_quantizer_param(k)]
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ConfigError(f"{key}={str(ckpt_path)!r}: incompatible checkpoint ({what})")
    module.eval()
    return module, ckpt


# -- export ---------------------------------------------------------------------------------------------------------
def _act_meta(layer) -> dict | None:
    est = layer.act_quant
    if est is None:
        return None
    grid = getattr(est, "quantizer", None)
    grid_options = {}
    if grid is not None and grid.group_size is not None and grid.fixed_group_size is None:
        grid_options["group_size"] = grid.group_size
    if getattr(grid, "scale_rule", None) is not None:
        grid_options["scale_rule"] = grid.scale_rule
    return {
        "estimator": est.name,
        "grid": None if grid is None else grid.name,
        "bits": None if grid is None else grid.bits,
        "options": {k: v for k, v in vars(est).items() if k in ("trust", "clip_scale", "per_row")},
        "grid_options": grid_options,
        "rows": est.step.shape[0] if est.name == "lsq" and est.per_row else None,
    }


@torch.no_grad()
def export_packed(module, out_dir: str | Path, tokenizer: str | Path | None = None, extra: dict | None = None) -> dict:
    """Write the packed model of ``module`` (an ``LMModule`` or a ``Llama`` with ``QuantLinear`` blocks) into
    ``out_dir``; returns the size report (bytes: file, fp32 and bf16 of the same parameters)."""
    from safetensors.torch import save

    from quest_pl.io import atomic_write_bytes, atomic_write_json, atomic_write_text
    from quest_pl.quant import QuantLinear

    model = getattr(module, "model", module).cpu()
    out_dir = Path(out_dir)
    tensors: dict[str, Tensor] = {}
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            if m.bias is not None:
                raise ValueError(f"{name}: linears with a bias are not supported by the packed format")
            enc = encode_weight(m)
            tensors |= {f"{name}.{k}": v.contiguous() for k, v in enc.tensors.items()}
            if m.act_quant is not None:
                tensors |= {f"{name}.act_quant.{k}": v for k, v in _act_quant_state(m.act_quant).items()}
            layers[name] = enc.meta | {
                "hadamard": m.hadamard,
                "hadamard_block": m.hadamard_block,
                "weight_quantized": m.weight_quant is not None,
                "act": _act_meta(m),
                "shape": list(m.weight.shape),
            }
    quant_names = tuple(f"{n}." for n in layers)
    for name, p in model.state_dict().items():
        if not name.startswith(quant_names):
            tensors[name] = p.detach().float().contiguous()
    cfg = model.cfg
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "quant": extra.get("quant") if extra else None,
        "layers": layers,
        "tokenizer": TOKENIZER_FILE if tokenizer else None,
    } | {k: v for k, v in (extra or {}).items() if k != "quant"}
    blob = save(tensors, metadata={"quest_pl": json.dumps(config)})
    atomic_write_bytes(out_dir / MODEL_FILE, blob)
    atomic_write_json(out_dir / CONFIG_FILE, config)
    if tokenizer:
        atomic_write_text(out_dir / TOKENIZER_FILE, Path(tokenizer).read_text(encoding="utf-8"))
    from quest_pl.quant import is_quantizer_param

    n_params = sum(p.numel() for n, p in model.named_parameters() if not is_quantizer_param(n))
    quant_bytes = sum(v.numel() * v.element_size() for k, v in tensors.items() if k.startswith(quant_names))
    quant_weights = sum(math.prod(meta["shape"]) for meta in layers.values())
    return {
        "file_bytes": len(blob),
        "fp32_bytes": 4 * n_params,
        "bf16_bytes": 2 * n_params,
        "quantized_linear_bytes": quant_bytes,
        "quantized_linear_bits_per_weight": 8 * quant_bytes / quant_weights if quant_weights else None,
    }


def read_packed(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Tensors and config of an export (a directory or its ``model.safetensors``)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise ConfigError(f"{str(path)!r}: no packed model ({MODEL_FILE}) there")
    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get("quest_pl")
        if meta is None:
            raise ConfigError(f"{str(path)!r}: not a QuEST-PL packed export (no quest_pl metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    config = json.loads(meta)
    if config.get("format") != FORMAT or config.get("format_version") not in READS_VERSIONS:
        raise ConfigError(
            f"{str(path)!r}: format {config.get('format')} v{config.get('format_version')}, "
            f"this loader reads {FORMAT} v{', v'.join(map(str, READS_VERSIONS))}"
        )
    return tensors, config


def _act_quant_state(est: nn.Module) -> dict[str, Tensor]:
    """An activation estimator's state for the file: a learned scale as the scale itself (``step`` / ``clip``), not
    the log the estimator trains (METHOD.md §1.9); its loader takes either."""
    from quest_pl.estimators.learned import LearnedScale

    state = {k: v.detach().clone() for k, v in est.state_dict().items()}
    if isinstance(est, LearnedScale):
        state[est.scale_name] = state.pop(est.parameter_name).exp()
    return state


def _build_act_quant(meta: dict | None, state: dict[str, Tensor]) -> nn.Module | None:
    from quest_pl.quant import OperandSpec

    if meta is None:
        return None
    rows = meta.get("rows") or None
    spec = OperandSpec(meta["grid"], meta["bits"], meta["estimator"], meta["options"], meta.get("grid_options", {}))
    est = spec.build(rows=rows)
    if state:
        est.load_state_dict(state)
    return est.eval()


@torch.no_grad()
def load_packed(path: str | Path) -> tuple[nn.Module, dict]:
    """The inference model of an export (see the module docstring) and its config, on CPU in eval mode."""
    from quest_pl.model import Llama, LlamaConfig

    tensors, config = read_packed(path)
    model = Llama(LlamaConfig(**config["model"]))
    for name, meta in config["layers"].items():
        prefix = f"{name}."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        act_state = {k[len("act_quant.") :]: v for k, v in own.items() if k.startswith("act_quant.")}
        weight_q = decode_weight(own, meta)
        codes = half = None
        if meta["format"] in ("int", "int_sparse24") and not meta.get("group_size"):  # per-row steps only
            half = own["scale"].float() / 2
            codes = odd_codes(weight_q, own["scale"].float().reshape(-1, 1))
        layer = PackedLinear(weight_q, meta, _build_act_quant(meta["act"], act_state), codes, half)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer)
    fp = {k: v for k, v in tensors.items() if not k.startswith(tuple(f"{n}." for n in config["layers"]))}
    missing, unexpected = model.load_state_dict(fp, strict=False)
    missing = [k for k in missing if not k.startswith(tuple(f"{n}." for n in config["layers"]))]
    if missing or unexpected:
        raise ConfigError(f"{str(path)!r}: tensors do not match the model ({missing[:1] or unexpected[:1]})")
    return model.eval(), config


# -- Hugging Face interop (optional extra [hf]) ----------------------------------------------------------------------
def effective_weight(layer: nn.Module, drop_act_quant: bool = False) -> Tensor:
    """The fp32 matrix ``W`` with ``layer(x) = x W^T`` for a linear whose activation is not quantized: the dequantized
    weight with the Hadamard folded in. Weight-only layers fold exactly in both forms (half: ``x Qw(W H)^T``; full:
    ``x (Qw(W H) H)^T``). With quantized activations no fold is exact (``Qa`` is not linear): refused unless
    ``drop_act_quant``, which gives the weight-only equivalent (``Qa`` replaced by the identity: ``Qw(W H) H`` in the
    half form, the full form's ``Qw(W H) H`` as is)."""
    from quest_pl.quant import QuantLinear

    with torch.no_grad():
        if isinstance(layer, QuantLinear):
            w = layer._quantize(layer.weight, layer.weight_quant, "weight").float()
            act, hadamard, block = layer.act_quant, layer.hadamard, layer.hadamard_block
        elif isinstance(layer, PackedLinear):
            w, act, hadamard, block = layer.weight.float(), layer.act_quant, layer.hadamard, layer.hadamard_block
        else:
            return layer.weight.detach().float()
        if act is None:
            return w
        if not drop_act_quant:
            raise ConfigError(
                "a model with quantized activations has no exact full-precision equivalent (Qa is not linear); "
                "export it for Hugging Face with --hf-drop-act-quant (weights only: activations in full precision)"
            )
        return quantizers.hadamard_transform(w, block) if hadamard == "half" else w


def _rope_halves(w: Tensor, n_head: int) -> Tensor:
    """Rows of a q or k projection reordered per head from our interleaved RoPE pairs (2i, 2i+1) (METHOD.md §2) to
    the half-split pairs (i, i + hd/2) of ``transformers``' ``rotate_half``; q.k is unchanged (same order on both)."""
    hd = w.shape[0] // n_head
    perm = torch.cat((torch.arange(0, hd, 2), torch.arange(1, hd, 2)))
    return w.reshape(n_head, hd, -1)[:, perm].reshape(w.shape)


@torch.no_grad()
def hf_state_dict(model: nn.Module, drop_act_quant: bool = False) -> dict[str, Tensor]:
    """``LlamaForCausalLM`` tensors (fp32) of our Llama: c_attn split into q/k/v (q, k reordered for RoPE), w12 split
    into gate/up, effective weights of quantized linears (:func:`effective_weight`), untied head."""
    cfg = model.cfg
    out = {
        "model.embed_tokens.weight": model.wte.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = effective_weight(block.attn.c_attn, drop_act_quant).chunk(3, dim=0)
        gate, up = effective_weight(block.mlp.w12, drop_act_quant).chunk(2, dim=0)
        out |= {
            p + "input_layernorm.weight": block.attn_norm.weight,
            p + "post_attention_layernorm.weight": block.mlp_norm.weight,
            p + "self_attn.q_proj.weight": _rope_halves(q, cfg.n_head),
            p + "self_attn.k_proj.weight": _rope_halves(k, cfg.n_head),
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": effective_weight(block.attn.c_proj, drop_act_quant),
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": effective_weight(block.mlp.c_proj, drop_act_quant),
        }
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def export_hf(
    model: nn.Module, out_dir: str | Path, tokenizer: str | Path | None = None, drop_act_quant: bool = False
) -> Path:
    """Write a ``transformers`` ``LlamaForCausalLM`` directory (``from_pretrained``-loadable, fp32) equivalent to
    ``model`` (see :func:`hf_state_dict`), with the tokenizer when given. Needs the ``[hf]`` extra."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("--hf: needs transformers (pip install 'quest-pl[hf]')") from None
    from quest_pl.data import EOS

    cfg = model.cfg
    state = hf_state_dict(model, drop_act_quant)
    eos_id = None
    if tokenizer:
        from tokenizers import Tokenizer

        eos_id = Tokenizer.from_file(str(tokenizer)).token_to_id(EOS)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).float()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"HF export: tensors do not match LlamaForCausalLM ({missing[:2]}, {unexpected[:2]})")
    out_dir = Path(out_dir)
    hf.save_pretrained(out_dir)
    if tokenizer:
        fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer), eos_token=EOS, bos_token=EOS)
        fast.save_pretrained(out_dir)
    return out_dir


# -- command line ---------------------------------------------------------------------------------------------------
def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def check_paths(out_dir: str | None = None, hf: str | None = None, tokenizer: str | None = None) -> None:
    """One-line errors, before any work, for output directories that are files and a tokenizer that is not one."""
    for key, path in (("out_dir", out_dir), ("--hf", hf)):
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            raise ConfigError(f"{key}={path!r}: exists and is not a directory")
    if tokenizer is not None and not Path(tokenizer).expanduser().is_file():
        raise ConfigError(f"--tokenizer={tokenizer!r}: no such file (expected a tokenizer.json)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m quest_pl.export", description="Export a checkpoint as a packed low-bit safetensors model."
    )
    parser.add_argument("checkpoint", help="a .ckpt this project wrote (e.g. <run dir>/checkpoints/last.ckpt)")
    parser.add_argument("out_dir", help="output directory (model.safetensors, config.json, tokenizer.json)")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the run's own)")
    parser.add_argument("--hf", metavar="HF_DIR", help="also write a transformers LlamaForCausalLM directory")
    parser.add_argument(
        "--hf-drop-act-quant",
        action="store_true",
        help="allow the HF export of a model with quantized activations: the activation quantizers are dropped",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        check_paths(out_dir=args.out_dir, hf=args.hf, tokenizer=args.tokenizer)
        module, ckpt = module_from_checkpoint(args.checkpoint, key="checkpoint")
        tokenizer = args.tokenizer or find_tokenizer(args.checkpoint)
        if tokenizer is None:
            log.warning("no tokenizer found for %s (pass --tokenizer): exporting without one", args.checkpoint)
        extra = {"quant": ckpt["hyper_parameters"].get("quant"), "step": int(ckpt.get("global_step", 0))}
        sizes = export_packed(module, args.out_dir, tokenizer, extra)
        if args.hf:
            export_hf(module.model, args.hf, tokenizer=tokenizer, drop_act_quant=args.hf_drop_act_quant)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bits = sizes["quantized_linear_bits_per_weight"]
    print(
        f"{Path(args.out_dir) / MODEL_FILE}: {_mib(sizes['file_bytes'])} "
        f"(fp32 {_mib(sizes['fp32_bytes'])}, bf16 {_mib(sizes['bf16_bytes'])}; quantized linears "
        f"{_mib(sizes['quantized_linear_bytes'])}" + (f", {bits:.3f} bits/weight with scales)" if bits else ")")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
