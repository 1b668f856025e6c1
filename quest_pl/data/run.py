"""The config, data config and tokenizer of the run that wrote a checkpoint, for the tools that read one (evaluation,
PTQ, the alignment probe, generation, export).

A checkpoint is evaluated on its own run's data config (``<run dir>/.hydra/config.yaml``): ``data.KEY=VALUE`` on the
command line changes that key of the run's config (``data.val_batches=1`` evaluates fewer batches of the run's own
data), while ``data=GROUP`` chooses another data config. Either way the text is tokenized with the run's own tokenizer
(``<run dir>/tokenizer.json``, written by training), never with one retrained on a corpus that may have changed since;
only an explicit ``data.tokenizer`` replaces it. A damaged tokenizer file, or one with more tokens than the checkpoint
has embedding rows, is one line naming the checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from quest_pl.config import ConfigError, validate_data

log = logging.getLogger(__name__)

TOKENIZER_KEYS = ("data.tokenizer", "data.tokenizer_path")
TOKENIZER_FILE = "tokenizer.json"  # a run's own tokenizer, beside its checkpoints/ (LMDataModule.save_tokenizer)


def run_config_of(ckpt_path: str | Path) -> DictConfig | None:
    """The composed config of the run that wrote ``<run dir>/checkpoints/x.ckpt`` (its ``.hydra/config.yaml``)."""
    path = Path(ckpt_path).resolve().parent.parent / ".hydra" / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def find_tokenizer(ckpt_path: str | Path) -> Path | None:
    """The tokenizer a checkpoint was trained with: ``<run dir>/tokenizer.json``, else the run's
    ``data.tokenizer_path``, else the token cache its ``.hydra/config.yaml`` data config points to (rebuilt if gone)."""
    from quest_pl.data.module import LMDataModule

    run_dir = Path(ckpt_path).resolve().parent.parent
    if (run_dir / TOKENIZER_FILE).is_file():
        return run_dir / TOKENIZER_FILE
    cfg = run_config_of(ckpt_path)
    if cfg is None:
        return None
    if cfg.data.get("tokenizer_path"):
        return Path(cfg.data.tokenizer_path).expanduser()
    dm = LMDataModule.from_config(cfg)
    dm.prepare_data()
    return dm.cache_path / TOKENIZER_FILE


def _override_keys(overrides: list[str]) -> list[str]:
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides]


def load_tokenizer(path: str | Path, key: str, vocab_size: int | None = None):
    """The tokenizer at ``path`` for the checkpoint named by ``key`` (``eval.from='...'``), refused in one line when it
    is not a tokenizer file or has more tokens than ``vocab_size`` (the checkpoint's embedding rows)."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # truncated or hand-edited JSON, not a tokenizer
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise ConfigError(f"{key}: its tokenizer {path} is not a readable tokenizer.json ({reason})") from None
    if vocab_size is not None and tok.get_vocab_size() > vocab_size:
        raise ConfigError(
            f"{key}: its tokenizer {path} has {tok.get_vocab_size()} tokens, more than the checkpoint's vocabulary "
            f"({vocab_size}); pass the tokenizer the checkpoint was trained with"
        )
    return tok


def _entry_tokenizer(data_cfg: DictConfig) -> Path | None:
    """The ``tokenizer.json`` of the token-cache entry ``data_cfg`` would use (whether or not it exists)."""
    from quest_pl.data.entry import DataSpec, entry_path

    data = OmegaConf.to_container(data_cfg.data, resolve=True)
    data["tokenizer"] = data.get("tokenizer") or data.get("tokenizer_path")
    return entry_path(DataSpec.from_hparams(data)) / TOKENIZER_FILE


def _uses(data_cfg: DictConfig, own: Path) -> bool:
    """Whether ``data_cfg`` already tokenizes with the bytes of ``own``: a named local tokenizer file with the same
    content, or an existing cache entry made with it (a run's own data, unchanged)."""
    from quest_pl.data.tokenizer import is_hub_name, tokenizer_file

    spec = data_cfg.data.get("tokenizer") or data_cfg.data.get("tokenizer_path")
    if spec:
        if is_hub_name(spec):
            return True  # fetched by name, as the run did
        try:
            return tokenizer_file(spec).read_bytes() == own.read_bytes()
        except ConfigError:  # the file the run named is gone
            return False
    cached = _entry_tokenizer(data_cfg)
    return cached is not None and cached.is_file() and cached.read_bytes() == own.read_bytes()


def data_config(
    cfg: DictConfig, ckpt_path: str | Path, key: str, overrides: list[str] | None = None, vocab_size: int | None = None
) -> DictConfig:
    """The config whose ``data`` (and ``seed``, ``model.seq_len``) a checkpoint's validation split comes from: the
    run's own, with the command line's ``data.*`` keys merged over it (``data=GROUP``: the composed ``cfg``), set to
    the run's tokenizer unless ``data.tokenizer`` is given. ``key`` names the checkpoint in errors; ``vocab_size`` is
    its vocabulary, which the tokenizer must fit."""
    keys = _override_keys(list(overrides or []))
    run_cfg = run_config_of(ckpt_path)
    if run_cfg is None:
        log.info("no .hydra/config.yaml beside %s: evaluating on the composed data config", ckpt_path)
        data_cfg = cfg.copy()
    elif "data" in keys:
        data_cfg = OmegaConf.merge(run_cfg, {"data": cfg.data})  # another data config, the run's seed and sizes
    else:
        data_cfg = run_cfg.copy()
        for k in keys:
            if k.startswith("data."):
                OmegaConf.update(data_cfg, k, OmegaConf.select(cfg, k), force_add=True)
    if run_cfg is None or any(k == "data" or k.startswith("data.") for k in keys):
        validate_data(data_cfg, None)  # (the run's own data config was validated when it ran)
    if data_cfg.data.source == "bin" or any(k in keys for k in TOKENIZER_KEYS):
        return data_cfg  # token ids as they are / the tokenizer the user asked for
    own = find_tokenizer(ckpt_path)
    if own is None:
        return data_cfg
    load_tokenizer(own, key, vocab_size)  # readable and fitting, before any data work
    if not _uses(data_cfg, Path(own)):
        log.info("tokenizing with the run's own tokenizer %s", own)
        OmegaConf.update(data_cfg, "data.tokenizer", str(own), force_add=True)
        OmegaConf.update(data_cfg, "data.tokenizer_path", None, force_add=True)
    return data_cfg


def check_model_overrides(cfg: DictConfig, model_hp: dict, overrides: list[str] | None, key: str) -> None:
    """A checkpoint is read with the shape it was trained with: a ``model.*`` override (or ``model=GROUP``) that
    differs from the checkpoint's hyper-parameters, or names a key the checkpoint's model does not have, is refused."""
    keys = _override_keys(list(overrides or []))
    named = [k[len("model.") :] for k in keys if k.startswith("model.")]
    if "model" in keys:
        named += [k for k in model_hp if k not in named and OmegaConf.select(cfg, f"model.{k}") is not None]
    for k in named:
        value = OmegaConf.select(cfg, f"model.{k}", default=None)
        if k not in model_hp:
            raise ConfigError(f"model.{k}={value!r}: not used with {key}, whose model is fixed by the checkpoint")
        if value != model_hp[k]:
            raise ConfigError(
                f"model.{k}={value!r}: the checkpoint ({key}) was trained with model.{k}={model_hp[k]!r}; drop the "
                "override (its model's shape is the checkpoint's)"
            )
