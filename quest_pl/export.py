"""Export a trained checkpoint: ``python -m quest_pl.export CKPT OUT_DIR [--tokenizer T] [--hf HF_DIR]``.

Writes ``OUT_DIR/model.safetensors`` (the converted model, ``quest_pl.convert_``, in the packed layout of
``quest_pl.packing`` with the digest of ``quest_pl.saving``), ``OUT_DIR/config.json`` and ``OUT_DIR/tokenizer.json``;
``quest_pl.saving.load_packed`` rebuilds it (the project's Llama with ``PackedLinear`` blocks), and its logits equal the
QAT model's quantized forward (``QuantLinear``, eval mode, PyTorch path) at the same latent weights to the last bit on
CPU in fp32. ``--hf HF_DIR`` also writes the same packed model as a ``transformers`` ``LlamaForCausalLM`` directory
that ``AutoModelForCausalLM.from_pretrained`` loads after ``import quest_pl`` (``quest_pl.hub``); ``--hf-dense``
writes a plain fp32 one instead (weights dequantized, loads without quest_pl; exact for weight-only models).

Every check (paths, tokenizer, the ``--hf`` options and their extra) runs before anything is written; a stale
temporary file of an export killed earlier is removed; a file that cannot be written is one ``error:`` line.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from pathlib import Path

import torch
from torch import nn

from quest_pl.config import ConfigError
from quest_pl.convert import convert_, layer_table, packed_layers
from quest_pl.data.run import find_tokenizer
from quest_pl.io import TMP_PREFIX, atomic_write_bytes, atomic_write_json, atomic_write_text
from quest_pl.saving import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, load_packed, read_packed, serialize

log = logging.getLogger(__name__)

__all__ = ["export_packed", "find_tokenizer", "load_packed", "main", "module_from_checkpoint", "read_packed"]


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
def packed_copy(module: nn.Module) -> nn.Module:
    """A converted copy (``quest_pl.convert_``) of the Llama of ``module`` (an ``LMModule`` or a ``Llama``), on CPU."""
    return convert_(copy.deepcopy(getattr(module, "model", module)).cpu())


def remove_stale_temps(out_dir: Path, names: tuple[str, ...]) -> None:
    """Remove the temporary files an earlier export of ``names`` left in ``out_dir`` when it was killed."""
    for name in names:
        for stale in out_dir.glob(f"{TMP_PREFIX}{name}.*"):
            stale.unlink(missing_ok=True)


@torch.no_grad()
def export_packed(module, out_dir: str | Path, tokenizer: str | Path | None = None, extra: dict | None = None) -> dict:
    """Write the packed model of ``module`` (an ``LMModule`` or a ``Llama`` with ``QuantLinear`` blocks) into
    ``out_dir``; returns the size report (bytes: file, fp32 and bf16 of the same parameters, the packed layers)."""
    from quest_pl.quant import is_quantizer_param

    source = getattr(module, "model", module)
    model = packed_copy(module)
    cfg = model.cfg
    config = {
        "model": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "quant": (extra or {}).get("quant"),
        "tokenizer": TOKENIZER_FILE if tokenizer else None,
    } | {k: v for k, v in (extra or {}).items() if k != "quant"}
    config = layer_table(model) | config
    blob = serialize(model.state_dict(), config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir, (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE))
    atomic_write_bytes(out_dir / MODEL_FILE, blob)
    atomic_write_json(out_dir / CONFIG_FILE, config)
    if tokenizer:
        atomic_write_text(out_dir / TOKENIZER_FILE, Path(tokenizer).read_text(encoding="utf-8"))
    n_params = sum(p.numel() for n, p in source.named_parameters() if not is_quantizer_param(n))
    layers = packed_layers(model)
    quant_bytes = sum(t.numel() * t.element_size() for name, m in layers.items() for k, t in m.state_dict().items())
    quant_weights = sum(m.meta["rows"] * m.meta["cols"] for m in layers.values())
    return {
        "file_bytes": len(blob),
        "fp32_bytes": 4 * n_params,
        "bf16_bytes": 2 * n_params,
        "quantized_linear_bytes": quant_bytes,
        "quantized_linear_bits_per_weight": 8 * quant_bytes / quant_weights if quant_weights else None,
    }


# -- command line ---------------------------------------------------------------------------------------------------
def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _writable(path: Path, key: str) -> None:
    """A one-line error when ``path`` (a directory to create or fill) cannot be written: its nearest existing
    ancestor must be a writable directory."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{key}={str(path)!r}: {str(probe)!r} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={str(path)!r}: {str(probe)!r} is not writable")


def check_paths(out_dir: str | None = None, hf: str | None = None, tokenizer: str | None = None) -> None:
    """One-line errors, before any work, for output directories that are files or cannot be written and a tokenizer
    that is not a file."""
    for key, path in (("out_dir", out_dir), ("--hf", hf)):
        if path is not None:
            if Path(path).exists() and not Path(path).is_dir():
                raise ConfigError(f"{key}={path!r}: exists and is not a directory")
            _writable(Path(path), key)
    if tokenizer is not None and not Path(tokenizer).expanduser().is_file():
        raise ConfigError(f"--tokenizer={tokenizer!r}: no such file (expected a tokenizer.json)")


def check_tokenizer(path: str | Path, vocab_size: int, key: str = "--tokenizer") -> None:
    """The tokenizer must parse, know the end-of-text token and fit the model's vocabulary."""
    from quest_pl.data import EOS
    from quest_pl.data.tokenizer import load_tokenizer_file

    tok = load_tokenizer_file(Path(path).expanduser(), key=key)
    if tok.get_vocab_size() > vocab_size:
        raise ConfigError(
            f"{key}={str(path)!r}: vocabulary of {tok.get_vocab_size()} tokens, more than the model's "
            f"model.vocab_size = {vocab_size}: not the tokenizer this model was trained with"
        )
    if tok.token_to_id(EOS) is None:
        raise ConfigError(f"{key}={str(path)!r}: has no {EOS} token: not a tokenizer this project trained")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m quest_pl.export", description="Export a checkpoint as a packed low-bit safetensors model."
    )
    parser.add_argument("checkpoint", help="a .ckpt this project wrote (e.g. <run dir>/checkpoints/last.ckpt)")
    parser.add_argument("out_dir", help="output directory (model.safetensors, config.json, tokenizer.json)")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the run's own)")
    parser.add_argument(
        "--hf", metavar="HF_DIR", help="also write a transformers LlamaForCausalLM directory of the packed model"
    )
    parser.add_argument(
        "--hf-dense",
        action="store_true",
        help="with --hf: a plain fp32 LlamaForCausalLM instead (weights dequantized; loads without quest_pl)",
    )
    parser.add_argument(
        "--hf-drop-act-quant",
        action="store_true",
        help="with --hf-dense: allow a model with quantized activations (the activation quantizers are dropped)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if (args.hf_dense or args.hf_drop_act_quant) and not args.hf:
            raise ConfigError("--hf-dense and --hf-drop-act-quant: need --hf HF_DIR")
        if args.hf_drop_act_quant and not args.hf_dense:
            raise ConfigError("--hf-drop-act-quant: only with --hf-dense (the packed --hf keeps the quantizers)")
        check_paths(out_dir=args.out_dir, hf=args.hf, tokenizer=args.tokenizer)
        if args.hf:
            from quest_pl.hub.llama import check_hf_available, is_packed_hf_dir

            check_hf_available("--hf")
            hf_dir = Path(args.hf)
            if not args.hf_dense and hf_dir.is_dir() and any(hf_dir.iterdir()) and not is_packed_hf_dir(hf_dir):
                raise ConfigError(f"--hf={args.hf!r}: a non-empty directory that is no earlier --hf export")
        module, ckpt = module_from_checkpoint(args.checkpoint, key="checkpoint")
        tokenizer = args.tokenizer or find_tokenizer(args.checkpoint)
        if tokenizer is None:
            log.warning("no tokenizer found for %s (pass --tokenizer): exporting without one", args.checkpoint)
        else:
            check_tokenizer(tokenizer, module.model.cfg.vocab_size, "--tokenizer" if args.tokenizer else "tokenizer")
        if args.hf_dense:
            from quest_pl.hub.llama import check_dense_exportable

            check_dense_exportable(module.model, args.hf_drop_act_quant)  # a W·A model: refused before any write
        extra = {"quant": ckpt["hyper_parameters"].get("quant"), "step": int(ckpt.get("global_step", 0))}
        sizes = export_packed(module, args.out_dir, tokenizer, extra)
        if args.hf:
            from quest_pl.hub.llama import export_hf, export_hf_dense

            if args.hf_dense:
                export_hf_dense(module.model, args.hf, tokenizer=tokenizer, drop_act_quant=args.hf_drop_act_quant)
            else:
                export_hf(module.model, args.hf, tokenizer=tokenizer, overwrite=True)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a directory made read-only meanwhile: the atomic writes left no partial file
        print(f"error: out_dir={args.out_dir!r}: cannot write the export ({e.strerror or e})", file=sys.stderr)
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
