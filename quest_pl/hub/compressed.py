"""compressed-tensors checkpoints of MXFP4 / NVFP4 QAT models (``mxfp4-pack-quantized``, ``nvfp4-pack-quantized``),
the layout ``transformers`` and vLLM load; the config is written by compressed-tensors' own ``ModelCompressor``.

What maps exactly. The packed ``block_fp4`` layout (``quest_pl.packing``) is already the formats' layout: E2M1 codes two
per byte, first in the low nibble (``weight_packed``); MXFP4's E8M0 group scale as the biased exponent byte, NVFP4's
E4M3 group scale (``weight_scale``). compressed-tensors decodes a weight as ``e * (weight_scale / weight_global_scale)``
rounded to bf16:

* MXFP4: ``e * 2^k`` is a bf16 value, so the decoded weights equal the QAT model's fp32 weights bit for bit;
* NVFP4: our element unit is ``d = s * G`` (fp32), theirs ``s / gs``. The export chooses ``gs`` near ``1 / G`` so that
  ``s / gs == s * G`` in fp32 for every stored ``s`` when such a ``gs`` exists (``report["scale_exact"]``); the
  decoded weight is then ``bf16(W_q)`` exactly. QuEST's fp32 NVFP4 weights are not bf16 values in general, so the
  checkpoint holds the same codes and scales but decodes to their bf16 rounding (a relative change below 2^-8);
  without such a ``gs`` the unit differs by one fp32 ulp before that rounding (reported, and logged).

Activations: the formats' config says "dynamic MXFP4 / NVFP4 of the input" (their own absmax recipe), so an activation
quantizer of the same format with the ``absmax`` scale rule is declared; any other (QuEST's INT grids, the Gaussian
or 4/6 rules) has no such description and is refused unless ``drop_act_quant=True`` (then weights only). The Hadamard
transform of the input (the full form, and the half form with quantized activations; METHOD.md §1.8) is declared in
``transform_config`` as compressed-tensors' ``hadamard`` (Sylvester, orthonormal, block = ``hadamard_block``), applied
online to each layer's input, with the weights stored in the rotated basis: the same product.

No standard format represents the project's other grids exactly: the centered INT grids' levels ``(k + 1/2) step``
(no zero; compressed-tensors' integer formats are ``k * step`` with a zero point), the Lloyd-Max and ternary levels
(not evenly spaced), ``fp4`` with a per-row RMS scale (an fp32 scale per row, not a power of two or E4M3 per group),
2:4-sparse INT and the group-scaled INT grids (same half-integer levels): :func:`export_compressed_tensors` refuses
them with that reason (the project's own packed format and ``quest_pl.hub`` keep them exact).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from quest_pl.convert import PackedLinear, convert_, packed_layers
from quest_pl.packing import decode_weight

log = logging.getLogger(__name__)

FORMATS = {"mxfp4": "mxfp4-pack-quantized", "nvfp4": "nvfp4-pack-quantized"}
NOT_REPRESENTABLE = {
    "int": "the centered INT grid's levels (k + 1/2) step have no zero; standard integer formats are k * step",
    "int_sparse24": "2:4-sparse INT: the same half-integer levels, and no 2:4 layout for them",
    "levels": "its levels are not evenly spaced (Lloyd-Max, ternary) or its scale is an fp32 per-row RMS (fp4)",
    "dense": "the layer's weight is not quantized",
}


def _global_scale(s: Tensor, g: float) -> tuple[Tensor, bool]:
    """``gs`` (fp32) with ``s / gs == s * G`` for every stored group scale ``s`` when one exists near ``1 / G``
    (searched over 64 fp32 neighbours), else ``1 / G``; and whether it is exact."""
    used = torch.unique(s.float())
    want = used * torch.tensor(g, dtype=torch.float32)
    base = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(g, dtype=torch.float32)
    bits = base.view(torch.int32)
    for k in range(65):
        for sign in (1, -1) if k else (1,):
            gs = (bits + sign * k).view(torch.float32)
            if torch.equal(used / gs, want):
                return gs.reshape(1), True
    return base.reshape(1), False


def _act_declared(layer: PackedLinear, grid: str, drop_act_quant: bool) -> bool:
    act = layer.meta.get("act")
    if act is None:
        return False
    if act["grid"] == grid and act["grid_options"].get("scale_rule", "absmax") == "absmax":
        return True
    if drop_act_quant:
        return False
    rule = act["grid_options"].get("scale_rule")
    raise ValueError(
        f"export_compressed_tensors: activation quantizer {act['grid']}"
        + (f" (scale rule {rule})" if rule else "")
        + f" has no description in {FORMATS[grid]} (dynamic {grid.upper()} with absmax scales only); "
        "pass drop_act_quant=True to export the weights only"
    )


@torch.no_grad()
def export_compressed_tensors(model: nn.Module, out_dir: str | Path, drop_act_quant: bool = False) -> dict:
    """Write ``model`` (QAT with MXFP4 or NVFP4 weights, or already converted; a ``transformers`` model gets its own
    ``config.json``) as a compressed-tensors checkpoint into the empty or new ``out_dir``; returns the report
    (format, layers, whether activations and the Hadamard are declared, whether every NVFP4 unit is exact).
    Refused (``ValueError``) before anything is written: a grid no standard format represents exactly (see the
    module docstring), several formats or Hadamard blocks in one model, an activation quantizer it cannot describe."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import CompressionFormat  # noqa: F401 (the formats' registry is loaded)
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.transform import TransformConfig

    from quest_pl.quant import quant_layers
    from quest_pl.saving import _unique_state, _write_dir

    if quant_layers(model):
        model = convert_(copy.deepcopy(model).cpu())
    layers = packed_layers(model)
    if not layers:
        raise ValueError(f"export_compressed_tensors: {type(model).__name__} has no quantized layer")
    grids = set()
    for name, layer in layers.items():
        meta = layer.meta
        if meta["format"] != "block_fp4":
            why = NOT_REPRESENTABLE.get(meta["format"], "no layout for it")
            raise ValueError(
                f"export_compressed_tensors: layer {name} ({meta.get('grid')}): no standard format represents it "
                f"exactly ({why}); save it with quest_pl.save_quantized instead"
            )
        grids.add(meta["grid"])
    if len(grids) > 1:
        raise ValueError(f"export_compressed_tensors: one format per checkpoint, the model mixes {sorted(grids)}")
    (grid,) = grids
    declared = {name: _act_declared(layer, grid, drop_act_quant) for name, layer in layers.items()}
    if len(set(declared.values())) > 1:
        raise ValueError("export_compressed_tensors: some layers quantize their activations and some do not")
    with_act = next(iter(declared.values()))
    rotated = sorted(n for n, m in layers.items() if m.hadamard == "full" or (m.hadamard == "half" and with_act))
    blocks = {layers[n].hadamard_block for n in rotated}
    if len(blocks) > 1:
        raise ValueError(f"export_compressed_tensors: one Hadamard block per checkpoint, the model has {blocks}")

    scheme = QuantizationScheme(targets=sorted(layers), **PRESET_SCHEMES[grid.upper() + ("" if with_act else "A16")])
    qconfig = QuantizationConfig(
        config_groups={"group_0": scheme}, format=FORMATS[grid], quantization_status=QuantizationStatus.COMPRESSED
    )
    tconfig = None
    if rotated:
        tconfig = TransformConfig(
            config_groups={
                "quest_hadamard": {
                    "type": "hadamard",
                    "head_dim": blocks.pop(),
                    "apply": [{"targets": rotated, "location": "input"}],
                }
            }
        )
    tensors, exact = {}, True
    packed_prefixes = tuple(f"{n}." for n in layers)
    for name, t in _unique_state(model).items():
        if not name.startswith(packed_prefixes):
            tensors[name] = t.detach().cpu().contiguous()
    for name, layer in layers.items():
        tensors[f"{name}.weight_packed"] = layer.codes.cpu().contiguous()
        if grid == "mxfp4":
            tensors[f"{name}.weight_scale"] = layer.scale.cpu().contiguous()
        else:
            s = layer.scale.view(torch.float8_e4m3fn)
            gs, ok = _global_scale(s.float(), float(layer.tensor_scale))
            exact &= ok
            tensors[f"{name}.weight_scale"] = s.cpu().contiguous()
            tensors[f"{name}.weight_global_scale"] = gs
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().cpu().contiguous()
    if not exact:
        log.warning("compressed-tensors NVFP4: some tensor scales G have no exact reciprocal (one fp32 ulp apart)")

    from safetensors.torch import save

    out_dir = Path(out_dir)
    staging = {"model.safetensors": save(tensors, metadata={"format": "pt"})}
    config = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else {}
    config.pop("quantization_config", None)
    staging["config.json"] = json.dumps(config).encode()
    compressor = ModelCompressor(quantization_config=qconfig, transform_config=tconfig)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"export_compressed_tensors: {str(out_dir)!r} exists and is not an empty directory")
    _write_dir(out_dir, staging, overwrite=False)
    compressor.update_config(str(out_dir))  # compressed-tensors' own quantization_config (and transform_config)
    return {
        "format": FORMATS[grid],
        "layers": sorted(layers),
        "activations": with_act,
        "hadamard_layers": rotated,
        "scale_exact": exact,
    }


def decoded_weights(out_dir: str | Path) -> dict[str, Tensor]:
    """The weights of a compressed-tensors checkpoint as compressed-tensors' own decompressor gives them (name of
    the layer -> dense weight), reading its config with compressed-tensors' own parser."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    qconfig = QuantizationConfig.model_validate(
        json.loads((out_dir / "config.json").read_text())["quantization_config"]
    )
    tensors = load_file(str(out_dir / "model.safetensors"))
    compressor = BaseCompressor.load_from_registry(qconfig.format)
    out = {}
    for scheme in qconfig.config_groups.values():
        for name in scheme.targets:
            local = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
            out[name] = compressor.decompress(local, scheme)["weight"]
    return out


def quest_weights(model: nn.Module) -> dict[str, Tensor]:
    """The packed layers' dequantized weights in the basis they are stored in (before the full form's rotation back)."""
    return {name: decode_weight(layer.packed_tensors(), layer.meta) for name, layer in packed_layers(model).items()}
