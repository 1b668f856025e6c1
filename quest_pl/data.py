"""Data: documents -> byte-level BPE -> packed token file (cached by content hash) -> deterministic batches.

Sources (``data.source``):

* ``embedded`` (default): 38 Shakespeare plays shipped inside the package (``quest_pl/corpus``, built by
  ``scripts/build_corpus.py``), no network;
* ``text_file``: ``data.path``, a file or a glob of local text files, one document per file (a single file is cut into
  ``data.chunks_per_file`` documents at line boundaries, so a validation split by document exists);
* ``hub``: ``datasets.load_dataset(data.name, data.config, streaming=True)`` (e.g. ``allenai/c4`` ``en``); only when a
  config asks for it and the machine is online.

Validation is held out **by document**, deterministically (documents ordered by a hash of their text). Batches are a
function of ``(seed, global sample index)`` only: the train tokens are cut into non-overlapping ``seq_len + 1``
windows, visited in a seeded permutation per epoch, so a resumed run sees exactly the batches of an uninterrupted one
and data-parallel ranks take disjoint slices of each global batch.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import lzma
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from quest_pl.config import ConfigError

log = logging.getLogger(__name__)

EMBEDDED_CORPUS = Path(__file__).parent / "corpus" / "shakespeare.jsonl.xz"
EOS = "<|endoftext|>"
CACHE_FORMAT = 1  # bump when the packed-file layout or the tokenisation procedure changes


@dataclass
class Document:
    name: str
    text: str


def load_documents(
    source: str,
    path: str | None = None,
    name: str | None = None,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_docs: int | None = None,
    chunks_per_file: int = 64,
) -> list[Document]:
    """All documents of a source, in a deterministic order."""
    if source == "embedded":
        with lzma.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
            return [Document(d["title"], d["text"]) for d in map(json.loads, f)]
    if source == "text_file":
        files = sorted(glob.glob(os.path.expanduser(path), recursive=True))
        docs = [Document(f, Path(f).read_text(encoding="utf-8", errors="replace")) for f in files]
        if len(docs) == 1:
            docs = _split_lines(docs[0], chunks_per_file)
        return docs
    if source == "hub":
        import datasets

        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        docs = []
        for i, row in enumerate(stream):
            if max_docs is not None and i >= max_docs:
                break
            docs.append(Document(f"{name}/{split}/{i}", row[text_field]))
        return docs
    raise ValueError(f"data.source={source!r}: expected one of embedded, text_file, hub")


def _split_lines(doc: Document, chunks: int) -> list[Document]:
    lines = doc.text.splitlines(keepends=True)
    per = max(1, -(-len(lines) // chunks))
    return [Document(f"{doc.name}#{i}", "".join(lines[s : s + per])) for i, s in enumerate(range(0, len(lines), per))]


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Hold out ``ceil(val_fraction * n)`` documents (at least one) chosen by the hash of their text: deterministic
    and independent of the order the source lists them in."""
    ranked = sorted(docs, key=lambda d: hashlib.sha256(d.text.encode()).hexdigest())
    n_val = max(1, round(val_fraction * len(docs) + 0.4999))
    if n_val >= len(docs):
        raise ConfigError(f"data.val_fraction={val_fraction}: leaves no training document out of {len(docs)}")
    val = {id(d) for d in ranked[:n_val]}
    return [d for d in docs if id(d) not in val], [d for d in docs if id(d) in val]


def train_tokenizer(docs: list[Document], vocab_size: int):
    """Byte-level BPE trained on the training documents (``tokenizers``); ``EOS`` separates documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    return tok


def tokenize_to_array(tok, docs: list[Document], num_proc: int | None = None) -> np.ndarray:
    """Tokenise with a batched ``datasets.map`` and pack ``doc EOS doc EOS ...`` into one flat array."""
    import datasets

    datasets.disable_progress_bars()
    eos_id = tok.token_to_id(EOS)

    def encode(batch):
        return {"ids": [[*e.ids, eos_id] for e in tok.encode_batch(batch["text"])]}

    ds = datasets.Dataset.from_dict({"text": [d.text for d in docs]})
    ds = ds.map(encode, batched=True, batch_size=64, remove_columns=["text"], num_proc=num_proc, keep_in_memory=True)
    dtype = np.uint16 if tok.get_vocab_size() <= np.iinfo(np.uint16).max + 1 else np.uint32
    return np.concatenate([np.asarray(ids, dtype=dtype) for ids in ds["ids"]])


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


class TokenWindows(Dataset):
    """Non-overlapping ``(seq_len + 1)``-token windows of a packed token array; item = ``(input, target)``."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n_windows = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.n_windows

    def window(self, i: int, offset: int = 0) -> torch.Tensor:
        start = offset + i * self.seq_len
        return torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.window(i)
        return w[:-1], w[1:]


class StepBatches(Dataset):
    """Map-style dataset indexed by **micro-batch number**: item ``m`` is this rank's slice of global micro-batch
    ``m``, a pure function of ``(seed, m, rank)``.

    Global sample ``j = m * global_batch + b`` lies in epoch ``e = j // n``; it reads window ``perm_e[j % n]`` of a
    seeded permutation ``perm_e``, with a per-epoch token offset in ``[0, seq_len)`` (METHOD.md §3 sampling). Rank ``r``
    takes ``b`` in ``[r * batch, (r + 1) * batch)``: ranks see disjoint windows of the same global batch.
    """

    def __init__(self, windows: TokenWindows, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        # One window fewer per epoch, so every offset in [0, seq_len) keeps all windows inside the array.
        self.n = windows.n_windows - 1
        self._epoch_cache: dict[int, tuple[torch.Tensor, int]] = {}

    def _epoch(self, e: int) -> tuple[torch.Tensor, int]:
        if e not in self._epoch_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            perm = torch.randperm(self.n, generator=g)
            offset = int(torch.randint(self.windows.seq_len, (1,), generator=g))
            self._epoch_cache = {e: (perm, offset)}  # keep one epoch: the sampler walks forward
        return self._epoch_cache[e]

    def __len__(self) -> int:  # unbounded in principle; the sampler says how far we go
        return 2**62

    def __getitem__(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = (m * self.world_size + self.rank) * self.batch_size
        rows = []
        for j in range(first, first + self.batch_size):
            perm, offset = self._epoch(j // self.n)
            rows.append(self.windows.window(int(perm[j % self.n]), offset))
        batch = torch.stack(rows)
        return batch[:, :-1], batch[:, 1:]


class ResumeSampler(Sampler[int]):
    """Micro-batch numbers ``start, ..., stop - 1``.

    Its length is the whole run (``stop``), not what is left: Lightning restores its batch counter from the
    checkpoint and ends the epoch when that counter reaches the length, so both must count from 0.
    """

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop


class ResumableLoader(DataLoader):
    """A DataLoader Lightning treats as resumable. Its position needs no state of its own: it is the trainer's
    restored global step, read when the loader is built (:meth:`LMDataModule.train_dataloader`)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LMDataModule(L.LightningDataModule):
    """Builds (or reuses from the cache) the tokenizer and packed train/validation token files, then serves
    deterministic micro-batches. See the module docstring for the sources and the batch order."""

    def __init__(
        self,
        source: str = "embedded",
        path: str | None = None,
        name: str | None = None,
        config: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        text_field: str = "text",
        max_docs: int | None = None,
        max_val_docs: int | None = None,
        chunks_per_file: int = 64,
        val_fraction: float = 0.05,
        vocab_size: int = 8192,
        tokenizer_path: str | None = None,
        seq_len: int = 128,
        batch_size: int = 16,
        val_batch_size: int = 16,
        val_batches: int | None = 16,
        seed: int = 0,
        cache_dir: str = "~/.cache/quest_pl",
        num_workers: int = 0,
        accumulate_grad_batches: int = 1,
        max_steps: int = 1000,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.tokenizer = None
        self.train_tokens: np.ndarray | None = None
        self.val_tokens: np.ndarray | None = None

    # -- building the token files -------------------------------------------------------------------------------
    def _documents(self) -> tuple[list[Document], list[Document]]:
        hp = self.hparams
        kw = dict(
            path=hp.path, name=hp.name, config=hp.config, text_field=hp.text_field, chunks_per_file=hp.chunks_per_file
        )
        if hp.source == "hub" and hp.val_split:
            train = load_documents(hp.source, split=hp.train_split, max_docs=hp.max_docs, **kw)
            val = load_documents(hp.source, split=hp.val_split, max_docs=hp.max_val_docs, **kw)
            return train, val
        docs = load_documents(hp.source, split=hp.train_split, max_docs=hp.max_docs, **kw)
        return split_documents(docs, hp.val_fraction)

    def prepare_data(self) -> None:
        self._build(write=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_tokens is None:
            self._build(write=False)

    def _build(self, write: bool) -> None:
        from tokenizers import Tokenizer

        hp = self.hparams
        train_docs, val_docs = self._documents()
        corpus = _digest(*(d.text for d in train_docs), "--val--", *(d.text for d in val_docs))
        if hp.tokenizer_path:
            tok_src = Path(hp.tokenizer_path).expanduser().read_bytes()
            tok_key = _digest("file", tok_src)
        else:
            tok_key = _digest("bpe", str(hp.vocab_size))
        cache = Path(hp.cache_dir).expanduser() / f"v{CACHE_FORMAT}-{_digest(corpus, tok_key)}"
        tok_file, train_file, val_file = cache / "tokenizer.json", cache / "train.bin", cache / "val.bin"
        if not (tok_file.exists() and train_file.exists() and val_file.exists()):
            if not write:
                raise RuntimeError(f"token cache {cache} is missing: prepare_data() did not run on this node")
            log.info("Tokenising %d train / %d validation documents into %s", len(train_docs), len(val_docs), cache)
            tok = (
                Tokenizer.from_str(tok_src.decode())
                if hp.tokenizer_path
                else train_tokenizer(train_docs, hp.vocab_size)
            )
            if tok.token_to_id(EOS) is None:
                tok.add_special_tokens([EOS])
            tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            tok.save(str(tmp / "tokenizer.json"))
            for docs, fname in ((train_docs, "train.bin"), (val_docs, "val.bin")):
                arr = tokenize_to_array(tok, docs)
                (tmp / fname).write_bytes(arr.tobytes())
            (tmp / "meta.json").write_text(
                json.dumps(
                    {
                        "dtype": str(arr.dtype),
                        "vocab_size": tok.get_vocab_size(),
                        "train_docs": len(train_docs),
                        "val_docs": len(val_docs),
                    }
                )
            )
            try:
                tmp.rename(cache)  # atomic: a half-written cache is never picked up
            except OSError:  # another process (a DDP rank) finished the same cache first
                shutil.rmtree(tmp, ignore_errors=True)
        self.tokenizer = Tokenizer.from_file(str(tok_file))
        meta = json.loads((cache / "meta.json").read_text())
        self.train_tokens = np.memmap(train_file, dtype=meta["dtype"], mode="r")
        self.val_tokens = np.memmap(val_file, dtype=meta["dtype"], mode="r")
        self.cache_path = cache
        for split, arr in (("train", self.train_tokens), ("validation", self.val_tokens)):
            if len(arr) < 2 * hp.seq_len + 2:  # at least two windows: one per epoch plus the offset slack
                raise ConfigError(
                    f"data: the {split} split has {len(arr)} tokens, fewer than 2 * model.seq_len + 2 = "
                    f"{2 * hp.seq_len + 2}; use more text or a shorter model.seq_len"
                )

    @property
    def vocab_size(self) -> int:
        if self.tokenizer is None:
            self.prepare_data()
            self.setup()
        return self.tokenizer.get_vocab_size()

    # -- loaders -----------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        accumulate = trainer.accumulate_grad_batches if trainer is not None else hp.accumulate_grad_batches
        max_steps = trainer.max_steps if trainer is not None else hp.max_steps
        start = (trainer.global_step if trainer is not None else 0) * accumulate
        dataset = StepBatches(TokenWindows(self.train_tokens, hp.seq_len), hp.batch_size, hp.seed, rank, world)
        return ResumableLoader(
            dataset,
            batch_size=None,
            sampler=ResumeSampler(start, max_steps * accumulate),
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        windows = TokenWindows(self.val_tokens, hp.seq_len)
        n = len(windows)
        if hp.val_batches is not None:
            n = min(n, hp.val_batches * hp.val_batch_size)
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        indices = list(range(n))[rank::world]
        return DataLoader(
            torch.utils.data.Subset(windows, indices),
            batch_size=hp.val_batch_size,
            shuffle=False,
            num_workers=hp.num_workers,
        )
