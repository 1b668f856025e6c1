"""Evaluate a trained checkpoint with the quantization it was trained with (``python run.py eval.from=CKPT``).

    python run.py eval.from=outputs/quest_w4a4/<time>/checkpoints/last.ckpt            # its own validation split
    python run.py eval.from=CKPT data=text_file data.path=other.txt                   # another data config
    python run.py eval.from=CKPT eval.text_file='notes/*.txt'                         # perplexity on local text

The model is rebuilt from the checkpoint's hyper-parameters, quantizers included (QAT checkpoints evaluate their
quantized forward; LSQ/PACT scales are restored), and evaluated as training validates it: ``val/loss`` (mean
next-token cross-entropy) and ``val/ppl = exp(val/loss)``, written to ``metrics.json`` (atomic, strict JSON) and to
TensorBoard at the checkpoint's step. A ``quant=...`` or ``quant.*`` override that differs from the checkpoint's
quantization is an error unless ``eval.allow_quant_change=true`` (then the latent weights are evaluated under the
given quantization). ``quant.<key>=...`` without ``quant=...`` changes that key of the checkpoint's own quantization.
Another ``data`` config is tokenized with the checkpoint's own tokenizer.

``eval.text_file`` (a file or glob) scores every token of the files, documents joined by ``<|endoftext|>`` as in
training, in consecutive windows of ``model.seq_len`` tokens (each token but the first predicted once).
"""

from __future__ import annotations

import glob
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from quest_pl.config import ConfigError, check, positive_int
from quest_pl.data.sources import read_text, text_files

log = logging.getLogger(__name__)


def _overridden(overrides: list[str], group: str) -> bool:
    """Whether a command-line override sets ``group`` or one of its keys."""
    keys = (o.split("=", 1)[0].lstrip("+~") for o in overrides)
    return any(k == group or k.startswith(f"{group}.") for k in keys)


def _group_chosen(overrides: list[str], group: str) -> bool:
    """Whether a command-line override chooses the config group itself (``quant=...``), not only its keys."""
    return any(o.split("=", 1)[0].lstrip("+~") == group for o in overrides)


def _quant_keys(overrides: list[str]) -> list[str]:
    """The ``quant.<key>`` names set on the command line, in order."""
    keys = (o.split("=", 1)[0].lstrip("+~") for o in overrides)
    return [k[len("quant.") :] for k in keys if k.startswith("quant.")]


def _overlay(own: dict, changed: dict) -> dict:
    """The checkpoint's quant config with the given keys changed; ``bits`` also sets ``w_bits``/``a_bits`` where the
    checkpoint had them equal to its ``bits`` (the interpolation of ``experiments/quant/bf16.yaml``)."""
    out = dict(own)
    for op in ("w_bits", "a_bits"):
        if "bits" in changed and op not in changed and own.get(op) == own.get("bits"):
            out[op] = changed["bits"]
    return out | changed


def _comparable(q: dict | None):
    """A quant config as what it computes: the parsed :class:`QuantConfig` without its name and kernel choice."""
    import dataclasses

    from quest_pl.quant import QuantConfig

    parsed = QuantConfig.from_cfg(OmegaConf.create(q or {}), None)
    return None if parsed is None else dataclasses.replace(parsed, name="", kernel="auto")


def validate_eval(cfg: DictConfig) -> None:
    """Check the ``eval.*`` keys before any work."""
    check(cfg, "eval.from", lambda v: isinstance(v, str) and v != "", "a checkpoint path")
    check(cfg, "eval.allow_quant_change", lambda v: isinstance(v, bool), "true or false")
    positive_int(cfg, "eval.batch_size")
    pattern = check(cfg, "eval.text_file", lambda v: isinstance(v, str) and v != "", "null or a file/glob", True)
    if pattern is not None and not text_files(pattern):
        what = "only directories match" if glob.glob(os.path.expanduser(pattern), recursive=True) else "no file matches"
        raise ConfigError(f"eval.text_file={pattern!r}: {what} (a directory is not a text: use DIR/*.txt)")


def text_file_loss(
    model, tokenizer, pattern: str, seq_len: int, batch_size: int, encoding: str = "utf-8"
) -> tuple[float, int]:
    """(mean next-token loss, tokens scored) over every token of the files matching ``pattern``, decoded strictly in
    ``encoding`` (``data.encoding``)."""
    from quest_pl.data import EOS

    eos = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for path in text_files(pattern):
        ids += [*tokenizer.encode(read_text(path, encoding, key="eval.text_file")).ids, eos]
    tokens = torch.tensor(ids, dtype=torch.long)
    if len(tokens) < 2:
        raise ConfigError(f"eval.text_file={pattern!r}: fewer than 2 tokens")
    starts = list(range(0, len(tokens) - 1, seq_len))
    full = [s for s in starts if s + seq_len + 1 <= len(tokens)]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(full), batch_size):
            win = torch.stack([tokens[s : s + seq_len + 1] for s in full[i : i + batch_size]]).to(device)
            logits = model(win[:, :-1])
            total += float(F.cross_entropy(logits.float().flatten(0, 1), win[:, 1:].flatten(), reduction="sum"))
            count += win[:, 1:].numel()
        for s in starts[len(full) :]:  # the shorter last window
            win = tokens[s:].unsqueeze(0).to(device)
            logits = model(win[:, :-1])
            total += float(F.cross_entropy(logits.float().flatten(0, 1), win[:, 1:].flatten(), reduction="sum"))
            count += win.shape[1] - 1
    return total / count, count


def evaluate(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> dict:
    """Evaluate ``cfg.eval.from`` (see the module docstring); returns and writes the metrics."""

    from quest_pl.data.run import check_model_overrides, data_config, find_tokenizer, load_tokenizer
    from quest_pl.export import module_from_checkpoint
    from quest_pl.io import atomic_write_json
    from quest_pl.ptq import load_checkpoint
    from quest_pl.train import validation_datamodule, validation_trainer

    start = time.perf_counter()
    overrides = list(overrides or [])
    validate_eval(cfg)
    ckpt_path = cfg.eval["from"]
    ckpt = load_checkpoint(ckpt_path, key="eval.from")
    model_hp = ckpt["hyper_parameters"]["model"]
    key = f"eval.from={ckpt_path!r}"
    check_model_overrides(cfg, model_hp, overrides, key)
    own_quant = ckpt["hyper_parameters"].get("quant")
    quant = own_quant
    if _overridden(overrides, "quant"):
        given = OmegaConf.to_container(cfg.quant, resolve=True)
        keys = _quant_keys(overrides)
        what = repr(given.get("name"))
        if not _group_chosen(overrides, "quant") and own_quant:  # quant.* keys change the checkpoint's quantization
            given = _overlay(own_quant, {k: given[k] for k in keys})
            what = f"{given.get('name')!r} with " + ", ".join(f"quant.{k}={given[k]}" for k in keys)
        differs = _comparable(given) != _comparable(own_quant)
        if differs and not cfg.eval.allow_quant_change:
            raise ConfigError(
                f"quant={what}: differs from the quantization the checkpoint was trained with "
                f"({(own_quant or {}).get('name', 'bf16')!r}); drop the quant override or set "
                "eval.allow_quant_change=true to evaluate the latent weights under another quantization"
            )
        if differs:
            log.warning("evaluating under quant=%s instead of the checkpoint's %s", given.get("name"),
                        (own_quant or {}).get("name"))  # fmt: skip
            quant = given
    module, _ = module_from_checkpoint(
        ckpt_path, quant=quant, key="eval.from", kernel=None, strict_quantizers=quant is own_quant
    )
    step = int(ckpt.get("global_step", 0))
    accelerator, precision = cfg.trainer.accelerator, cfg.trainer.precision
    metrics: dict = {"checkpoint": str(Path(ckpt_path).resolve()), "step": step, "quant": (quant or {}).get("name")}
    if cfg.eval.text_file:
        tokenizer_path = find_tokenizer(ckpt_path)
        if tokenizer_path is None:
            raise ConfigError(f"{key}: no tokenizer found beside the checkpoint or in its run config")
        tokenizer = load_tokenizer(tokenizer_path, key, model_hp["vocab_size"])
        device = "cuda" if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu"
        model = module.model.to(device).eval()
        loss, count = text_file_loss(
            model, tokenizer, cfg.eval.text_file, model_hp["seq_len"], cfg.eval.batch_size, cfg.data.encoding
        )
        metrics |= {"val/loss": loss, "val/ppl": math.exp(loss), "tokens": count, "data": cfg.eval.text_file}
    else:
        data_cfg = data_config(cfg, ckpt_path, key, overrides, model_hp["vocab_size"])
        data_cfg = OmegaConf.merge(data_cfg, {"model": {"seq_len": model_hp["seq_len"]}})
        dm = validation_datamodule(data_cfg, model_hp["vocab_size"], f"eval.from={ckpt_path!r}")
        trainer = validation_trainer(accelerator, precision, run_dir, bool(cfg.trainer.enable_progress_bar))
        results = trainer.validate(module, datamodule=dm, verbose=False)[0]
        source = data_cfg.data.source
        metrics |= {"val/loss": float(results["val/loss"]), "val/ppl": float(results["val/ppl"]),
                    "data": source if source != "text_file" else f"text_file:{data_cfg.data.path}"}  # fmt: skip
    metrics["wall_s"] = time.perf_counter() - start
    run_dir = Path(run_dir)
    if (cfg.get("logger") or {}).get("tensorboard"):
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)
        logger.log_metrics({"val/loss": metrics["val/loss"], "val/ppl": metrics["val/ppl"]}, step=step)
        logger.finalize("success")
    atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics


def run(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> dict:
    """``python run.py eval.from=CKPT ...`` (the CLI passes Hydra's task overrides)."""
    return {**evaluate(cfg, run_dir, overrides), "rank": 0}
