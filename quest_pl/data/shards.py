"""Prepared token files: streamed tokenisation into a keyed, verified, resumable cache entry; nanoGPT bin pairs.

An entry ``<data.cache_dir>/v2-<key>/`` holds ``train.bin`` and ``val.bin`` (flat token ids, uint16 when the
vocabulary fits, else uint32: nanoGPT's layout, so an entry is itself a ``data.source=bin`` corpus), the
``tokenizer.json`` they were made with, and ``meta.json``: the sizes, the dtype, and a digest (BLAKE2b) of every
segment of each file. ``<key>`` hashes everything the tokens depend on (source and its content or identity, split
rule, tokenizer, limits), so a changed setting never reuses a stale entry.

Preparation streams documents (never all in memory), encodes them in batches and appends to the two files in
``v2-<key>.partial/``; every ``CHECKPOINT_TOKENS`` tokens it fsyncs them and records in ``state.json`` how many
documents were consumed and how long each file is, so a killed preparation continues from its last checkpoint and ends
with the same bytes as an uninterrupted one. The finished directory is renamed into place (atomic). A lock file
(``fcntl.flock``, released by the kernel when a process dies) keeps two preparations of the same entry apart.

Opening an entry checks, before any token is trusted: ``meta.json``'s own digest, the tokenizer's digest, each file's
size against its token count and dtype, and the segment digests (all segments up to ``VERIFY_ALL_BYTES``, otherwise
the first, the last and two chosen at random). A damaged entry is rebuilt with a warning where the run may prepare
it, otherwise the run stops with one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from quest_pl.config import ConfigError
from quest_pl.data import sources

# _verified, memmap_tokens and open_bin: read through this module by the data module and the tests.
from quest_pl.data.entry import (  # noqa: F401
    CACHE_FORMAT,
    SPLITS,
    DamagedEntry,
    DataSpec,
    _file_digest,
    _meta_digest,
    _verified,
    entry_path,
    memmap_tokens,
    open_bin,
    verify_entry,
)
from quest_pl.data.tokenizer import (
    boundaries,
    encode_documents,
    load_tokenizer_file,
    token_dtype,
    tokenizer_file,
    train_tokenizer,
)
from quest_pl.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

CHECKPOINT_TOKENS = int(os.environ.get("QUEST_DATA_CHECKPOINT_TOKENS", 1 << 24))  # tokens between resumable states
BATCH_DOCS, BATCH_CHARS = 1024, 4 << 20  # documents encoded together (memory: one batch)
AUTO_PREPARE_TOKENS = 100_000_000  # a training run tokenises at most this much by itself; above, `prepare` first


def estimated_tokens(spec: DataSpec) -> float:
    """A rough size of what preparation would tokenise (4 bytes of text per token), to refuse surprises."""
    if spec.max_tokens is not None:
        return spec.max_tokens
    if spec.source == "embedded":
        return 2e6
    if spec.source == "text_file":
        return sum(os.path.getsize(f) for f in sources.text_files(spec.path)) / 4
    if spec.max_docs is not None:
        return spec.max_docs * 500
    return math.inf


def _writable(root: Path) -> None:
    p = root
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(
            f"data.cache_dir={str(root)!r}: not writable ({p} is not a writable directory); "
            f"set data.cache_dir (or $QUEST_CACHE) to a writable directory"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(root: Path) -> None:
    """Remove ``*.tmp<pid>`` directories of format-1 preparations whose process is gone (never a live one's)."""
    if not root.is_dir():
        return
    for d in root.glob("v*.tmp*"):
        pid = d.name.rpartition(".tmp")[2]
        if d.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            log.info("removed %s, left by a killed preparation", d)


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    with open(lock_file, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process preparing %s", lock_file.with_suffix(""))
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Writer:
    """Appends token arrays to one file; keeps the digest of the segment since the last checkpoint."""

    def __init__(self, file: Path, size: int, segments: list):
        self.file = open(file, "r+b" if file.exists() else "w+b")  # noqa: SIM115 (closed by close())
        self.file.truncate(size)  # drop whatever a killed run wrote after its last checkpoint
        self.file.seek(size)
        self.size, self.segments = size, segments
        self.hasher, self.pending = hashlib.blake2b(digest_size=16), 0

    def write(self, arr: np.ndarray) -> None:
        data = arr.tobytes()
        self.file.write(data)
        self.hasher.update(data)
        self.size += len(data)
        self.pending += len(data)

    def checkpoint(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        if self.pending:
            self.segments.append([self.pending, self.hasher.hexdigest()])
            self.hasher, self.pending = hashlib.blake2b(digest_size=16), 0

    def close(self) -> None:
        self.file.close()


class _Progress:
    """tqdm on a terminal (tokens/s, ETA); a log line every 30 s otherwise."""

    def __init__(self, total: float | None, initial: int, desc: str):
        self.bar = None
        self.total, self.count, self.desc = total, initial, desc
        self.start, self.start_count, self.last_log = time.monotonic(), initial, time.monotonic()
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=None if total in (None, math.inf) else int(total),
                initial=initial,
                unit="tok",
                unit_scale=True,
                desc=desc,
                smoothing=0.1,
            )

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last_log > 30:
            self.last_log = time.monotonic()
            log.info("%s: %s tokens, %s tokens/s", self.desc, f"{self.count:,}", f"{self.rate():,.0f}")

    def rate(self) -> float:
        return (self.count - self.start_count) / max(time.monotonic() - self.start, 1e-9)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _jobs(spec: DataSpec) -> list[dict]:
    """The document streams and where their documents go: ``{'split': source split, 'to': 'train'|'val'|'rule'}``."""
    if spec.source == "hub" and spec.val_split:
        return [
            {"split": spec.val_split, "to": "val", "max_docs": spec.max_val_docs, "max_tokens": None},
            {"split": spec.train_split, "to": "train", "max_docs": spec.max_docs, "max_tokens": spec.max_tokens},
        ]
    return [{"split": spec.train_split, "to": "rule", "max_docs": spec.max_docs, "max_tokens": spec.max_tokens}]


def _stream(spec: DataSpec, split: str, max_docs: int | None) -> Iterator[sources.Document]:
    docs = sources.iter_documents(
        spec.source,
        path=spec.path,
        name=spec.name,
        config=spec.config,
        split=split,
        text_field=spec.text_field,
        chunks_per_file=spec.chunks_per_file,
        encoding=spec.encoding,
    )
    for i, d in enumerate(docs):
        if max_docs is not None and i >= max_docs:
            return
        yield d


def _validation_set(spec: DataSpec, job: dict) -> set[int] | None:
    """Local sources: the exact held-out set of :func:`sources.held_out` (one hashing pass over the documents).
    Hub streams without a validation split use the one-pass hash rule instead (``None``)."""
    if job["to"] != "rule" or spec.source == "hub":
        return None
    digests = [sources.text_digest(d.text) for d in _stream(spec, job["split"], job["max_docs"])]
    return sources.held_out(digests, spec.val_fraction)


def _train_texts(spec: DataSpec, job: dict, val: set[int] | None) -> Iterator[str]:
    for i, d in enumerate(_stream(spec, job["split"], job["max_docs"])):
        if spec.tokenizer_train_docs is not None and i >= spec.tokenizer_train_docs:
            return
        if _routes_to(spec, job, val, i, d.text) == "train":
            yield d.text


def _routes_to(spec: DataSpec, job: dict, val: set[int] | None, i: int, text: str) -> str:
    if job["to"] != "rule":
        return job["to"]
    if val is not None:
        return "val" if i in val else "train"
    return "val" if sources.hashed_to_validation(text, spec.val_fraction) else "train"


def _tokenizer(spec: DataSpec, partial: Path):
    """The entry's tokenizer: kept in ``partial`` once made, so a resumed preparation encodes with the same one."""
    target = partial / "tokenizer.json"
    if target.is_file():
        return load_tokenizer_file(target, "the cache's tokenizer")
    if spec.tokenizer is None:
        job = _jobs(spec)[-1]
        log.info("Training a %d-token byte-level BPE on the training documents of %s", spec.vocab_size, spec.describe())
        tok = train_tokenizer(_train_texts(spec, job, _validation_set(spec, job)), spec.vocab_size)
    else:
        tok = load_tokenizer_file(tokenizer_file(spec.tokenizer))
    boundaries(tok)  # adds an end-of-text token where the tokenizer has none, before it is saved
    atomic_write_bytes(target, tok.to_str(pretty=True).encode())
    return tok


def prepare(spec: DataSpec, allow_large: bool = True, progress: bool = True) -> Path:
    """Make sure the entry of ``spec`` exists and is sound; build (or continue building) it if not. Returns its path.

    ``allow_large=False`` (a training run) refuses to tokenise more than ``AUTO_PREPARE_TOKENS`` by surprise.
    """
    entry = entry_path(spec)
    if entry.is_dir():
        try:
            verify_entry(entry)
            return entry
        except DamagedEntry as e:
            damage = str(e)
    else:
        damage = None
    if not allow_large and estimated_tokens(spec) > AUTO_PREPARE_TOKENS:
        what = "is damaged (" + damage + ")" if damage else "is not prepared"
        raise ConfigError(
            f"data: the token cache of {spec.describe()} {what} and it is large (about "
            f"{estimated_tokens(spec):.3g} tokens); prepare it first with the same data overrides: "
            f"python -m quest_pl.data prepare <data overrides>"
        )
    _writable(spec.root)
    spec.root.mkdir(parents=True, exist_ok=True)
    clean_leftovers(spec.root)
    with _locked(spec.root / f"{entry.name}.lock"):
        if entry.is_dir():  # damaged, or finished by another process while we waited
            try:
                verify_entry(entry)
                return entry
            except DamagedEntry as e:
                log.warning("token cache %s is damaged (%s): rebuilding it", entry, e)
                shutil.rmtree(entry)
        partial = entry.with_name(entry.name + ".partial")
        try:
            _build(spec, entry, partial, progress)
        except ConfigError:  # the data itself is unusable (undecodable file, bad tokenizer): nothing to resume
            shutil.rmtree(partial, ignore_errors=True)
            raise
    try:
        verify_entry(entry, full=True)
    except DamagedEntry as e:  # written and fsynced a moment ago: the storage does not keep what it is given
        raise ConfigError(f"data: the token cache {entry} fails verification right after preparation ({e})") from None
    return entry


def _resumable(state: dict, key: str, partial: Path) -> bool:
    """A saved state is usable when it is this entry's and every file holds at least what it recorded (fsynced)."""
    try:
        itemsize = np.dtype(state["dtype"]).itemsize
        return state["key"] == key and all(
            (partial / f"{s}.bin").stat().st_size >= state["splits"][s]["tokens"] * itemsize for s in SPLITS
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _build(spec: DataSpec, entry: Path, partial: Path, progress: bool) -> None:
    state_file = partial / "state.json"
    state = None
    if state_file.is_file():
        with contextlib.suppress(ValueError, OSError):
            state = json.loads(state_file.read_text())
        if state is not None and not _resumable(state, entry.name, partial):
            log.warning("the interrupted preparation in %s does not match its files: starting again", partial)
            state = None
    if state is None:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    else:
        log.info(
            "Continuing an interrupted preparation of %s from document %d of stream %d",
            entry,
            state["docs"],
            state["job"],
        )
    tok = _tokenizer(spec, partial)
    sep = boundaries(tok)
    dtype = token_dtype(tok.get_vocab_size())
    if state is None:
        state = {
            "key": entry.name,
            "dtype": dtype.name,
            "job": 0,
            "docs": 0,
            "splits": {s: {"tokens": 0, "docs": 0, "segments": []} for s in SPLITS},
        }
    writers = {
        s: _Writer(partial / f"{s}.bin", state["splits"][s]["tokens"] * dtype.itemsize, state["splits"][s]["segments"])
        for s in SPLITS
    }
    jobs = _jobs(spec)
    done_tokens = sum(state["splits"][s]["tokens"] for s in SPLITS)
    bar = _Progress(estimated_tokens(spec) if progress else None, done_tokens, f"tokenising {spec.describe()}")

    def checkpoint(job: int, docs: int) -> None:
        for s in SPLITS:
            writers[s].checkpoint()
            state["splits"][s]["tokens"] = writers[s].size // dtype.itemsize
        state["job"], state["docs"] = job, docs
        atomic_write_json(state_file, state)

    def encode(job: dict, val: set[int] | None, batch: list[tuple[int, str]]) -> tuple[int, bool]:
        """Encode and append a batch; returns the next document's index and whether the job reached its limit."""
        arrays = encode_documents(tok, sep, [text for _, text in batch], dtype)
        out: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        train_tokens = writers["train"].size // dtype.itemsize
        next_doc, finished = batch[-1][0] + 1, False
        for (i, text), arr in zip(batch, arrays):
            to = _routes_to(spec, job, val, i, text)
            out[to].append(arr)
            state["splits"][to]["docs"] += 1
            if to == "train":
                train_tokens += len(arr)
                if job["max_tokens"] is not None and train_tokens >= job["max_tokens"]:
                    next_doc, finished = i + 1, True
                    break
        for s in SPLITS:
            if out[s]:
                arr = np.concatenate(out[s])
                writers[s].write(arr)
                bar.update(len(arr))
        return next_doc, finished

    try:
        for j in range(state["job"], len(jobs)):
            job = jobs[j]
            val = _validation_set(spec, job)
            start = state["docs"] if j == state["job"] else 0
            next_doc, finished = start, False
            batch: list[tuple[int, str]] = []
            chars = 0
            for i, doc in itertools.islice(enumerate(_stream(spec, job["split"], job["max_docs"])), start, None):
                batch.append((i, doc.text))
                chars += len(doc.text)
                if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
                    next_doc, finished = encode(job, val, batch)
                    batch, chars = [], 0
                    if finished:
                        break
                    if sum(w.pending for w in writers.values()) >= CHECKPOINT_TOKENS * dtype.itemsize:
                        checkpoint(j, next_doc)
            if batch and not finished:
                encode(job, val, batch)
            checkpoint(j + 1, 0)
        bar.close()
    finally:
        for w in writers.values():
            w.close()
    meta = {
        "format": CACHE_FORMAT,
        "source": spec.describe(),
        "dtype": dtype.name,
        "vocab_size": tok.get_vocab_size(),
        "eos_id": sep.eos_id,
        "tokenizer_sha256": _file_digest(partial / "tokenizer.json"),
        "spec": asdict(spec),
        "splits": state["splits"],
    }
    meta["meta_digest"] = _meta_digest(meta)
    atomic_write_json(partial / "meta.json", meta)
    state_file.unlink()
    os.replace(partial, entry)
    tokens = {s: state["splits"][s]["tokens"] for s in SPLITS}
    log.info(
        "Prepared %s: %s train / %s validation tokens (%d / %d documents), %s tokens/s",
        entry,
        f"{tokens['train']:,}",
        f"{tokens['val']:,}",
        state["splits"]["train"]["docs"],
        state["splits"]["val"]["docs"],
        f"{bar.rate():,.0f}",
    )
