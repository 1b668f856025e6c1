"""Save and load a converted model (``quest_pl.convert``): :func:`save_quantized`, :func:`load_quantized`, and the
file reader every loader goes through (:func:`read_packed`: digest and finiteness checked).

A saved directory holds ``model.safetensors`` (the packed layers in the layout of ``quest_pl.packing``, every other
tensor of the ``state_dict`` as it is) and ``config.json``. The safetensors metadata carries ``quest_pl`` (the JSON
layer table: format, version, per layer its metadata; for the project's Llama also the model config) and
``quest_pl_digest``, ``sha256:`` of every tensor's name, dtype, shape and bytes in name order, so a file changed after
it was written (a scale overwritten, a truncated copy) is refused, not loaded. For a ``transformers`` model
``config.json`` is the model's own config with a ``quantization_config`` (``quant_method: quest_pl``), so
``AutoModelForCausalLM.from_pretrained`` rebuilds it after ``import quest_pl`` (``quest_pl.hub``); for any other
model it is the layer table.

Writes are all-or-nothing: the directory is written beside its destination under a temporary name and moved into
place, so a kill leaves the previous directory (or none) and a temporary one that the next save removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from quest_pl.config import ConfigError
from quest_pl.convert import PackedLinear, layer_table, packed_layers, replace_module
from quest_pl.data.run import TOKENIZER_FILE  # noqa: F401  (public here: quest_pl.saving.TOKENIZER_FILE)
from quest_pl.io import TMP_PREFIX
from quest_pl.packing import FORMAT, READS_VERSIONS

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DIGEST_KEY = "quest_pl_digest"


def digest(tensors: dict[str, Tensor]) -> str:
    """``sha256:`` of each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"sha256:{h.hexdigest()}"


def serialize(tensors: dict[str, Tensor], config: dict) -> bytes:
    """The safetensors bytes of ``tensors`` with the layer table and the digest in the metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt", "quest_pl": json.dumps(config), DIGEST_KEY: digest(tensors)}
    return save(tensors, metadata=metadata)


def check_finite(tensors: dict[str, Tensor], what: str) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ConfigError(f"{what}: tensor {name} holds NaN or infinite values; the file is damaged")


def read_packed(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Tensors and layer table of a saved model (a directory or its ``model.safetensors``), checked: readable, written
    by this format (versions :data:`READS_VERSIONS`), the digest (version 3 on) and every float tensor finite.
    Errors are :class:`ConfigError` naming the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise ConfigError(f"{str(path)!r}: no packed model ({MODEL_FILE}) there")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{str(path)!r}: not a readable safetensors file ({e}); the file is damaged") from None
    if "quest_pl" not in metadata:
        raise ConfigError(f"{str(path)!r}: not a QuEST-PL packed model (no quest_pl metadata)")
    try:
        config = json.loads(metadata["quest_pl"])
    except json.JSONDecodeError as e:
        raise ConfigError(f"{str(path)!r}: damaged quest_pl metadata ({e})") from None
    version = config.get("format_version")
    if config.get("format") != FORMAT or version not in READS_VERSIONS:
        raise ConfigError(
            f"{str(path)!r}: format {config.get('format')} v{version}, "
            f"this loader reads {FORMAT} v{', v'.join(map(str, READS_VERSIONS))}"
        )
    stored = metadata.get(DIGEST_KEY)
    if version >= 3 and stored != digest(tensors):
        what = "has no digest" if stored is None else "does not match its digest"
        raise ConfigError(f"{str(path)!r}: the file {what}: it was changed or damaged after it was written")
    check_finite(tensors, repr(str(path)))
    return tensors, config


def _is_hf_model(model: nn.Module) -> bool:
    return callable(getattr(model, "save_pretrained", None)) and hasattr(getattr(model, "config", None), "to_dict")


def _unique_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict without a second copy of a shared tensor (a tied head): loaders tie it again."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def _write_dir(directory: Path, files: dict[str, bytes], overwrite: bool) -> None:
    """Write ``files`` as the whole content of ``directory``: into a temporary directory beside it, then moved into
    place (the previous directory, if any, is removed only once the new one is complete)."""
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f"{TMP_PREFIX}{directory.name}.*"):  # a killed earlier save's leftovers
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{directory.name}.", dir=parent))
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        if directory.exists() and any(directory.iterdir()):
            if not overwrite:  # checked by the caller; a directory filled meanwhile is not replaced either
                raise ValueError(f"{str(directory)!r} is not empty")
            # The previous directory moves aside under another prefix than the temporaries (which the next save
            # removes): a kill between the two renames leaves it there, never deleted.
            old = Path(tempfile.mkdtemp(prefix=f".previous-{directory.name}.", dir=parent))
            os.replace(directory, old / directory.name)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)  # onto nothing or an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_quantized(
    model: nn.Module, directory: str | Path, overwrite: bool = False, files: dict[str, bytes] | None = None
) -> Path:
    """Write the converted ``model`` (``quest_pl.convert_``) into ``directory`` (see the module docstring) and return
    it. Refused before anything is written (``ValueError``): a model with no packed layer (or one not yet
    converted), and a ``directory`` that is a file or a non-empty directory unless ``overwrite=True``. ``files``:
    more files (name -> bytes) written in the same all-or-nothing step, e.g. a tokenizer's."""
    from quest_pl.quant import quant_layers

    directory = Path(directory)
    if quant_layers(model):
        raise ValueError("save_quantized: the model still has QuantLinear layers; call quest_pl.convert_(model) first")
    if not packed_layers(model):
        raise ValueError(f"save_quantized: {type(model).__name__} has no packed layer (quantize_, train, convert_)")
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_quantized: {str(directory)!r} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise ValueError(f"save_quantized: {str(directory)!r} is not empty; pass overwrite=True to replace it")
    config = layer_table(model) | {"model_class": f"{type(model).__module__}.{type(model).__qualname__}"}
    tensors = _unique_state(model)
    check_finite(tensors, "save_quantized")
    written = dict(files or {}) | {MODEL_FILE: serialize(tensors, config)}
    if _is_hf_model(model):
        hf_config = model.config.to_dict()
        hf_config["quantization_config"] = {"quant_method": "quest_pl"} | layer_table(model)
        written[CONFIG_FILE] = (json.dumps(hf_config, indent=2, sort_keys=True) + "\n").encode()
    else:
        written[CONFIG_FILE] = (json.dumps(config, indent=2) + "\n").encode()
    _write_dir(directory, written, overwrite)
    return directory


def packed_skeletons(model: nn.Module, layers: dict, where: str, device=None) -> dict[str, PackedLinear]:
    """An empty :class:`PackedLinear` for each layer named in ``layers`` (name -> metadata), checked against ``model``
    (the named module must exist with the layer's shape; ``ConfigError`` otherwise). ``model`` is not changed."""
    skeletons = {}
    for name, meta in layers.items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"{where}: layer {name} of the file is not in the {type(model).__name__}") from None
        weight = getattr(current, "weight", None)
        shape = (meta["rows"], meta["cols"])
        if isinstance(current, PackedLinear):
            have = (current.out_features, current.in_features)
        else:
            have = tuple(weight.shape) if isinstance(weight, Tensor) else None
        if have != shape:
            raise ConfigError(f"{where}: layer {name} is {have} in the model, {shape} in the file: another model")
        skeletons[name] = PackedLinear(meta, device=device)
    return skeletons


def install_packed_layers(model: nn.Module, layers: dict, where: str, device=None) -> None:
    """Replace, in ``model``, each layer named in ``layers`` by an empty :class:`PackedLinear` of its metadata (all
    checked first: :func:`packed_skeletons`)."""
    for name, layer in packed_skeletons(model, layers, where, device).items():
        replace_module(model, name, layer)


@torch.no_grad()
def load_quantized(directory: str | Path, model: nn.Module | object) -> nn.Module:
    """The converted model saved in ``directory``, rebuilt on ``model``: an unquantized skeleton of the same
    architecture (its weights are replaced), or a ``transformers`` config (the model is built from it), in eval mode.
    Raises ``ConfigError`` (a ``ValueError``) when the file is damaged or changed (digest), or was saved from another
    model (a layer or tensor that does not match); the skeleton is left as it was then."""
    where = repr(str(directory))
    tensors, config = read_packed(directory)
    if not isinstance(model, nn.Module):
        if not hasattr(model, "to_dict"):
            kind = type(model).__name__
            raise TypeError(f"load_quantized: model={kind}: expected an nn.Module or a transformers config")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(model)
    skeletons = packed_skeletons(model, config["layers"], where)
    prefixes = tuple(f"{n}." for n in skeletons)
    tied = _tied_names(model)
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(prefixes) and k not in tied}
    expected |= {f"{n}.{k}": v.shape for n, m in skeletons.items() for k, v in m.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    kind = type(model).__name__
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ConfigError(f"{where}: the file's tensors do not match the {kind} ({what}): another model")
    for name, t in tensors.items():
        if tuple(expected[name]) != tuple(t.shape):
            shapes = f"{list(t.shape)} in the file, {list(expected[name])} in the model"
            raise ConfigError(f"{where}: tensor {name} is {shapes}: another model")
    for name, layer in skeletons.items():
        replace_module(model, name, layer)
    model.load_state_dict(tensors, strict=False)
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    return model.eval()


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names that share a tensor with an earlier name (not stored: :func:`_unique_state`)."""
    unique = _unique_state(model)
    return set(model.state_dict()) - set(unique)


def load_packed(path: str | Path) -> tuple[nn.Module, dict]:
    """The inference model of a ``python -m quest_pl.export`` directory (the project's Llama with
    :class:`PackedLinear` blocks) and its layer table, on CPU in eval mode."""
    from quest_pl.model import Llama, LlamaConfig

    _, config = read_packed(path)
    if "model" not in config:
        raise ConfigError(f"{str(path)!r}: not an export of the project's Llama; use load_quantized(path, model)")
    model = Llama(LlamaConfig(**config["model"]))
    if config["format_version"] < 3:
        return _load_v2(path, model), config
    return load_quantized(path, model), config


@torch.no_grad()
def _load_v2(path: str | Path, model: nn.Module) -> nn.Module:
    """Format v1/v2 files (the project's Llama only): the layer metadata had no rows/cols/table size, and a learned
    activation scale was stored as the scale itself (the estimators load either form)."""
    tensors, config = read_packed(path)
    layers = {}
    for name, meta in config["layers"].items():
        rows, cols = meta["shape"]
        table = tensors.get(f"{name}.table")
        layers[name] = meta | {"rows": rows, "cols": cols, "table_size": 0 if table is None else len(table)}
    install_packed_layers(model, layers, repr(str(path)))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{str(path)!r}: tensors do not match the model ({missing[:1] or unexpected[:1]})")
    return model.eval()
