"""A prepared cache entry: its key (:class:`DataSpec` and everything the tokens depend on), its place, and the checks
that open it (digests of ``meta.json``, the tokenizer and every segment, sizes against token counts) before any token
is trusted; also nanoGPT ``train.bin`` / ``val.bin`` pairs (``data.source=bin``). Preparation is
:mod:`quest_pl.data.shards`."""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quest_pl.config import ConfigError
from quest_pl.data import sources
from quest_pl.data.tokenizer import (
    load_tokenizer_file,
    tokenizer_file,
)

CACHE_FORMAT = 2  # bump when the file layout or the tokenisation procedure changes
VERIFY_ALL_BYTES = 256 << 20  # entries up to this size are verified whole on open, larger ones by sampled segments
SPLITS = ("train", "val")


@dataclass(frozen=True)
class DataSpec:
    """The ``data`` keys that decide the tokens (the cache key), read from a run's ``data`` config."""

    source: str = "embedded"
    path: str | None = None
    name: str | None = None
    config: str | None = None
    train_split: str = "train"
    val_split: str | None = None
    text_field: str = "text"
    max_docs: int | None = None
    max_val_docs: int | None = None
    max_tokens: int | None = None
    chunks_per_file: int = 64
    val_fraction: float = 0.05
    vocab_size: int = 8192
    tokenizer: str | None = None
    tokenizer_train_docs: int | None = None
    encoding: str = "utf-8"
    cache_dir: str = "~/.cache/quest_pl"

    @classmethod
    def from_hparams(cls, hp) -> DataSpec:
        names = cls.__dataclass_fields__
        kw = {k: hp[k] for k in names if k in hp}
        if kw.get("max_tokens") is not None:
            kw["max_tokens"] = int(kw["max_tokens"])
        return cls(**kw)

    @property
    def root(self) -> Path:
        return Path(os.path.expanduser(self.cache_dir))

    def describe(self) -> str:
        what = {"embedded": "the embedded corpus", "text_file": f"data.path={self.path!r}", "hub": f"{self.name}"}
        return what.get(self.source, self.source)


# -- the key ---------------------------------------------------------------------------------------------------------
def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _file_digest(path: str | Path, key: str = "data.path") -> str:
    h = hashlib.sha256()
    for block in sources.read_blocks(path, key):  # an unreadable file is one line naming it
        h.update(block)
    return h.hexdigest()


CONTENT_KEY_BYTES = 1 << 30  # local corpora up to this size are keyed by content, larger ones by name/size/mtime


def source_identity(spec: DataSpec) -> str:
    if spec.source == "embedded":
        return _digest("embedded", _file_digest(sources.EMBEDDED_CORPUS))
    if spec.source == "text_file":
        files = sources.text_files(spec.path)
        stats = [os.stat(f) for f in files]
        if sum(s.st_size for s in stats) <= CONTENT_KEY_BYTES:
            return _digest("text_file", *(f"{os.path.basename(f)}:{_file_digest(f)}" for f in files))
        return _digest(
            "text_file-stat", *(f"{os.path.abspath(f)}:{s.st_size}:{s.st_mtime_ns}" for f, s in zip(files, stats))
        )
    return _digest("hub", str(spec.name), str(spec.config), spec.train_split, str(spec.val_split), spec.text_field)


def tokenizer_identity(spec: DataSpec) -> str:
    if spec.tokenizer is None:
        return _digest("bpe", str(spec.vocab_size), str(spec.tokenizer_train_docs))
    p = Path(os.path.expanduser(spec.tokenizer))
    if p.is_dir() or p.is_file():
        return _digest("file", _file_digest(tokenizer_file(spec.tokenizer), "data.tokenizer"))
    return _digest("hub-tokenizer", spec.tokenizer)  # by name: an entry made online stays usable offline


def cache_key(spec: DataSpec) -> str:
    split_rule = (
        f"val_split={spec.val_split}:{spec.max_val_docs}"
        if spec.source == "hub" and spec.val_split
        else f"val_fraction={spec.val_fraction}"
    )
    limits = f"max_docs={spec.max_docs}:max_tokens={spec.max_tokens}:chunks={spec.chunks_per_file}:enc={spec.encoding}"
    return _digest(source_identity(spec), tokenizer_identity(spec), split_rule, limits, spec.text_field)


def entry_path(spec: DataSpec) -> Path:
    return spec.root / f"v{CACHE_FORMAT}-{cache_key(spec)}"


# -- reading and verifying -------------------------------------------------------------------------------------------
class DamagedEntry(Exception):
    """A cache entry that fails verification (the message says what is wrong)."""


def _meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _segment_digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


_verified: set[tuple[str, int]] = set()  # entries this process already verified (prepare_data, then setup)


def verify_entry(entry: Path, full: bool | None = None) -> dict:
    """Check an entry as the module docstring says; return its metadata or raise :class:`DamagedEntry`."""
    meta_file = entry / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise DamagedEntry("meta.json is missing") from None
    except (ValueError, OSError) as e:
        raise DamagedEntry(f"meta.json is unreadable ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("meta_digest") != _meta_digest(meta):
        raise DamagedEntry("meta.json does not match its digest (edited or damaged)")
    stamp = (str(entry), meta_file.stat().st_mtime_ns)
    tok = entry / "tokenizer.json"
    if not tok.is_file():
        raise DamagedEntry("tokenizer.json is missing")
    if _file_digest(tok) != meta["tokenizer_sha256"]:
        raise DamagedEntry("tokenizer.json does not match its digest")
    itemsize = np.dtype(meta["dtype"]).itemsize
    total = 0
    for split in SPLITS:
        info, f = meta["splits"][split], entry / f"{split}.bin"
        if not f.is_file():
            raise DamagedEntry(f"{split}.bin is missing")
        size = f.stat().st_size
        if size != info["tokens"] * itemsize or size != sum(b for b, _ in info["segments"]):
            raise DamagedEntry(f"{split}.bin has {size} bytes, expected {info['tokens'] * itemsize}")
        total += size
    if stamp in _verified:
        return meta
    full = total <= VERIFY_ALL_BYTES if full is None else full
    for split in SPLITS:
        segments = meta["splits"][split]["segments"]
        starts = np.cumsum([0] + [b for b, _ in segments])
        picks = range(len(segments))
        if not full and len(segments) > 4:
            rng = random.Random()
            picks = sorted({0, len(segments) - 1, *rng.sample(range(1, len(segments) - 1), 2)})
        with open(entry / f"{split}.bin", "rb") as f:
            for i in picks:
                f.seek(int(starts[i]))
                if _segment_digest(f.read(segments[i][0])) != segments[i][1]:
                    raise DamagedEntry(f"{split}.bin segment {i} (bytes {starts[i]}..{starts[i + 1]}) is damaged")
    _verified.add(stamp)
    return meta


def memmap_tokens(file: Path, dtype: np.dtype) -> np.ndarray:
    if file.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(file, dtype=dtype, mode="r")


def open_bin(path: str, dtype: str, vocab_size: int | None, tokenizer: str | None = None):
    """A ``data.source=bin`` pair: ``DIR/train.bin`` and ``DIR/val.bin`` of raw token ids (nanoGPT / QuEST layout).

    The vocabulary is the tokenizer's (``data.tokenizer``, else ``DIR/tokenizer.json`` when present), else the
    declared ``data.vocab_size``; every id must be below it. Returns ``(train, val, tokenizer_file or None, vocab)``.
    """
    d = Path(os.path.expanduser(path))
    if not d.is_dir():
        raise ConfigError(f"data.path={path!r}: expected a directory holding train.bin and val.bin")
    dt = np.dtype(dtype)
    arrays = []
    for split in SPLITS:
        f = d / f"{split}.bin"
        if not f.is_file():
            raise ConfigError(f"data.path={path!r}: {f.name} is missing")
        size = f.stat().st_size
        if size == 0 or size % dt.itemsize:
            raise ConfigError(
                f"data.path={path!r}: {f.name} has {size} bytes, not a positive multiple of {dt.itemsize} "
                f"(data.dtype={dtype})"
            )
        arrays.append(memmap_tokens(f, dt))
    tok_file = (
        tokenizer_file(tokenizer) if tokenizer else (d / "tokenizer.json" if (d / "tokenizer.json").is_file() else None)
    )
    vocab = load_tokenizer_file(tok_file).get_vocab_size() if tok_file else vocab_size
    for split, arr in zip(SPLITS, arrays):
        top = max_token(arr)
        if top >= vocab:
            where = f"the tokenizer's vocabulary ({vocab})" if tok_file else f"data.vocab_size={vocab}"
            raise ConfigError(f"data.path={path!r}: {split}.bin holds token id {top}, beyond {where}")
    return arrays[0], arrays[1], tok_file, vocab


def max_token(arr: np.ndarray, block: int = 1 << 26) -> int:
    return max(int(arr[i : i + block].max()) for i in range(0, len(arr), block))


# -- preparing -------------------------------------------------------------------------------------------------------
