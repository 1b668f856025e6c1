"""The packed weight formats: bit packing of codes, and the exact encoding of a quantized weight as codes, a table
and scales (``encode_weight``) with its inverse (``decode_weight``).

Why a packed weight is exact. Every weight grid maps a row to ``value = table[code] * scale``, one fp32 product per
element, and the quantizers compute exactly that product (``quantizers.integer``: ``(k + 1/2) * step``;
``quantizers.levels``: ``levels[i] * sigma_hat``; the block formats ``round_e2m1(x / d) * d``). The encoding stores the
code, the fp32 table and the per-row (per-group) factor (``step`` for INT grids, ``sigma_hat`` for level grids,
``d = s * G`` for MXFP4/NVFP4 from its encoded parts), so decoding repeats the same IEEE operations on the same
operands. ``encode_weight`` checks that every decoded weight equals the quantizer's output bit for bit and refuses
otherwise.

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
* ``<name>.bias``: the linear's bias as the layer holds it, when it has one;
* the activation quantizer's state: ``<name>.act_quant.<key>`` for each entry of the estimator's ``state_dict`` (LSQ
  ``log_step``, PACT ``log_clip``, their ``floor`` and ``initialized``; format v2 files stored the scale itself,
  ``step`` / ``clip``, which the estimators also load).

The file's metadata (layer table, digest) is described in ``quest_pl.saving``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quest_pl import quantizers
from quest_pl.config import ConfigError

FORMAT = "quest-pl-packed"
# 2: group scales, MXFP4/NVFP4, the Hadamard block per layer (v1 files: block 128, per row). 3: any module (bias,
# layer names of any model), the activation estimator's own state, a digest of the tensors.
FORMAT_VERSION = 3
READS_VERSIONS = (1, 2, 3)
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
        return Encoded({"weight": values.contiguous()}, {"format": "dense", "rows": rows, "cols": cols})
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
    encoded = Encoded(tensors, meta | {"rows": rows, "cols": cols, "table_size": len(table)})
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


def packed_shapes(meta: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the tensors :func:`encode_weight` writes for a layer with this metadata (what a
    loader allocates before reading them)."""
    rows, cols = meta["rows"], meta["cols"]
    if meta["format"] == "dense":
        return {"weight": ((rows, cols), torch.float32)}
    bits, group = meta["bits"], meta.get("group_size")
    n = cols // 2 if meta["format"] == "int_sparse24" else cols
    scale_shape = (rows, cols // group) if group else (rows,)
    out = {
        "codes": ((rows, math.ceil(n * bits / 8)), torch.uint8),
        "table": ((meta["table_size"],), torch.float32),
        "scale": (scale_shape, torch.uint8 if meta["format"] == "block_fp4" else torch.float32),
    }
    if meta["format"] == "block_fp4":
        out["tensor_scale"] = ((1,), torch.float32)
    if meta["format"] == "int_sparse24":
        out["index"] = ((rows, math.ceil(n * 2 / 8)), torch.uint8)
    return out
