"""Validation of the ``data`` group: the source, the tokenizer, the batch and cache keys, the preparation keys
(``quest_pl.data``), checked before any work."""

from __future__ import annotations

import codecs
import glob
import os
import socket
import threading
from pathlib import Path

from omegaconf import DictConfig

from quest_pl.config.budget import validate_budget
from quest_pl.config.checks import ConfigError, _is_int, _is_number, check, positive_int


def validate_data(cfg: DictConfig, model_vocab: int | None) -> None:
    source = check(
        cfg, "data.source", lambda v: v in ("embedded", "text_file", "hub", "bin"), "embedded, text_file, hub or bin"
    )
    if source == "text_file":
        path = check(
            cfg,
            "data.path",
            lambda v: isinstance(v, str) and v != "",
            "a file or glob of local text files when data.source=text_file",
        )
        matches = glob.glob(os.path.expanduser(path), recursive=True)
        if not matches:
            raise ConfigError(f"data.path={path!r}: no file matches")
        if not any(os.path.isfile(m) for m in matches):
            raise ConfigError(f"data.path={path!r}: a directory, not a file; use a glob such as {path}/*.txt")
    if source == "hub":
        check(
            cfg,
            "data.name",
            lambda v: isinstance(v, str) and v != "",
            "a datasets hub name (e.g. allenai/c4) when data.source=hub",
        )
        check_hub_reachable()
    data_vocab = check(
        cfg, "data.vocab_size", lambda v: _is_int(v) and v >= 258, "an integer >= 258 (256 bytes + <|endoftext|>)"
    )
    tok = check(cfg, "data.tokenizer_path", lambda v: isinstance(v, str), "a path to a tokenizer.json", optional=True)
    if tok is not None:
        tokenizer_vocab_size(tok)
    del data_vocab, model_vocab  # compared where every source of the vocabulary is known (check_model_vocab)
    validate_data_keys(cfg)
    validate_budget(cfg)
    positive_int(cfg, "data.batch_size")
    positive_int(cfg, "data.val_batch_size")
    positive_int(cfg, "data.val_batches", optional=True)
    positive_int(cfg, "data.chunks_per_file")
    positive_int(cfg, "data.max_docs", optional=True)
    positive_int(cfg, "data.max_val_docs", optional=True)
    check(cfg, "data.num_workers", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    check(cfg, "data.val_fraction", lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)")
    check(cfg, "data.cache_dir", lambda v: isinstance(v, str) and v != "", "a directory for the token cache")


def tokenizer_vocab_size(path: str) -> int:
    """The vocabulary size of a ``tokenizers`` JSON file, or one line saying why it is not one."""
    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        raise ConfigError(f"data.tokenizer_path={path!r}: no such file")
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(full).get_vocab_size()
    except Exception as e:  # not JSON, or JSON that is not a tokenizer
        reason = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        raise ConfigError(f"data.tokenizer_path={path!r}: not a tokenizers JSON file ({reason})") from None


HUB_TIMEOUT_S = 3.0


def check_hub_reachable(timeout: float = HUB_TIMEOUT_S) -> None:
    """``data.source=hub`` streams from the Hugging Face hub: one line within ``timeout`` seconds when it cannot be
    reached (offline mode set, no DNS, no route), instead of minutes of retries. Skipped behind a proxy, whose
    reachability a direct connection would not tell."""
    from urllib.parse import urlparse

    local = "use a local corpus instead: data=text_file data.path=<file or glob>"
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            raise ConfigError(f"data.source=hub: {var} is set, and streaming needs the hub; {local}")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    result: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(e)

    worker = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout of its own
    worker.start()
    worker.join(timeout)
    if not result or result[0] is not None:
        why = f"{type(result[0]).__name__}" if result else f"no answer in {timeout:g} s"
        raise ConfigError(f"data.source=hub: the hub ({host}) is unreachable ({why}); {local}")


def _known_encoding(v) -> bool:
    try:
        codecs.lookup(v)
        return True
    except (LookupError, TypeError):
        return False


def validate_data_keys(cfg: DictConfig) -> None:
    source = cfg.data.source
    check(cfg, "data.encoding", lambda v: isinstance(v, str) and _known_encoding(v), "a Python codec name, e.g. utf-8")
    check(
        cfg,
        "data.max_tokens",
        lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and v >= 1 and float(v).is_integer(),
        "null (all) or a whole number of training tokens >= 1, e.g. 3e9",
        optional=True,
    )
    for key in ("data.max_docs", "data.max_val_docs", "data.tokenizer_train_docs"):
        check(cfg, key, lambda v: _is_int(v) and v >= 1, "null (all) or an integer >= 1", optional=True)
    tok = check(cfg, "data.tokenizer", lambda v: isinstance(v, str) and v != "", "null or a tokenizer", optional=True)
    old = cfg.data.get("tokenizer_path")
    if tok is not None and old is not None:
        raise ConfigError(f"data.tokenizer_path={old!r}: give data.tokenizer only (tokenizer_path is its older name)")
    if tok is not None:
        p = os.path.expanduser(tok)
        if not is_hub_name(tok) and not os.path.exists(p):
            raise ConfigError(f"data.tokenizer={tok!r}: no such file or directory")
    if source == "text_file" and isinstance(cfg.data.path, str) and not text_files(cfg.data.path):
        raise ConfigError(
            f"data.path={cfg.data.path!r}: matches no file (a directory is not a document: use DIR/*.txt)"
        )
    if source == "bin":
        check(cfg, "data.dtype", lambda v: v in ("uint16", "uint32"), "uint16 (nanoGPT's layout) or uint32")
        path = check(
            cfg, "data.path", lambda v: isinstance(v, str) and v != "", "a directory holding train.bin and val.bin"
        )
        if not os.path.isdir(os.path.expanduser(path)):
            raise ConfigError(f"data.path={path!r}: expected a directory holding train.bin and val.bin")
    check_model_vocab(cfg)


def local_tokenizer_file(spec: str, key: str = "data.tokenizer") -> Path | None:
    """The ``tokenizer.json`` that ``spec`` names when it is local (a file, or a directory holding one), ``None`` for a
    hub repository name; a missing file or directory is one line."""
    p = Path(os.path.expanduser(spec))
    if p.is_dir():
        p = p / "tokenizer.json"
        if not p.is_file():
            raise ConfigError(f"{key}={spec!r}: the directory has no tokenizer.json")
        return p
    if p.is_file():
        return p
    if not is_hub_name(spec):
        raise ConfigError(f"{key}={spec!r}: no such file or directory")
    return None


def load_tokenizer_file(path: Path, key: str = "data.tokenizer"):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # not JSON, not a tokenizer
        raise ConfigError(f"{key}={str(path)!r}: not a tokenizer.json ({str(e).splitlines()[0][:120]})") from None


def data_vocabulary(cfg: DictConfig) -> tuple[int, str] | None:
    """The vocabulary size the data will have and the key it comes from, where that is known before preparing:
    ``data.tokenizer`` (a local file or directory), ``data.tokenizer_path``, a ``data=bin`` directory's
    ``tokenizer.json`` (else its ``data.vocab_size``), or the trained tokenizer's ``data.vocab_size``. ``None`` for a
    hub tokenizer not yet fetched (checked after preparing, :func:`check_model_vocab_of`)."""
    d = cfg.data
    spec = d.get("tokenizer") or d.get("tokenizer_path")
    if spec:
        key = "data.tokenizer" if d.get("tokenizer") else "data.tokenizer_path"
        local = local_tokenizer_file(spec, key)
        if local is None:
            return None
        return load_tokenizer_file(local, key).get_vocab_size(), f"{key}={spec!r}"
    if d.source == "bin":
        local = os.path.join(os.path.expanduser(d.path), "tokenizer.json")
        if os.path.isfile(local):
            return load_tokenizer_file(Path(local), "data.path").get_vocab_size(), f"data.path={d.path!r} ({local})"
    return d.vocab_size, f"data.vocab_size={d.vocab_size}"


def check_model_vocab(cfg: DictConfig) -> None:
    """A local tokenizer is readable, and ``model.vocab_size`` (when set) holds every token id the data can have."""
    known = data_vocabulary(cfg)
    if known is not None:
        check_model_vocab_of(cfg.model.get("vocab_size"), *known)


def check_model_vocab_of(model_vocab: int | None, data_vocab: int, where: str) -> None:
    if model_vocab is not None and model_vocab < data_vocab:
        raise ConfigError(
            f"model.vocab_size={model_vocab}: smaller than the data's vocabulary ({data_vocab}, from {where}); token "
            "ids beyond it have no embedding row: set model.vocab_size=null (the data's) or at least that"
        )


def is_hub_name(spec: str) -> bool:
    """``org/name`` or ``name`` that is not an existing local path (``gpt2``, ``meta-llama/Llama-2-7b-hf``)."""
    p = Path(os.path.expanduser(spec))
    return not p.exists() and not spec.startswith((".", "/", "~")) and spec.count("/") <= 1


def text_files(path: str) -> list[str]:
    """The files a ``data.path`` names (a file or a recursive glob), sorted; directories are not documents."""
    return sorted(f for f in glob.glob(os.path.expanduser(path), recursive=True) if os.path.isfile(f))
