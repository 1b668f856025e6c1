"""The Lightning data module: prepared token files (:mod:`quest_pl.data.shards`) -> deterministic batches.

Batches are a function of ``(seed, global sample index)`` only: the train tokens are cut into non-overlapping
``seq_len + 1`` windows, visited in a seeded permutation per epoch, so a resumed run sees exactly the batches of an
uninterrupted one and data-parallel ranks take disjoint slices of each global batch. Tokens are read by memory map,
so any number of runs and ranks share one prepared entry and memory does not grow with the corpus.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from quest_pl.config import ConfigError

log = logging.getLogger(__name__)


class TokenWindows(Dataset):
    """Non-overlapping ``(seq_len + 1)``-token windows of a packed token array; item = ``(input, target)``."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n_windows = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.n_windows

    def __getstate__(self) -> dict:
        """A memory map travels to spawned loader workers as its file name, never as a copy of the tokens."""
        state = dict(self.__dict__)
        if isinstance(self.tokens, np.memmap):
            state["tokens"] = (self.tokens.filename, self.tokens.dtype.str, self.tokens.offset, self.tokens.shape)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["tokens"], tuple):
            file, dtype, offset, shape = state["tokens"]
            state["tokens"] = np.memmap(file, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)
        self.__dict__.update(state)

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
    """Prepares (or reuses, verified, from the cache) the tokenizer and the train/validation token files, or opens a
    ``data.source=bin`` pair, then serves deterministic micro-batches. See :mod:`quest_pl.data` for the keys."""

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
        max_tokens: int | float | None = None,
        chunks_per_file: int = 64,
        val_fraction: float = 0.05,
        vocab_size: int = 8192,
        tokenizer: str | None = None,
        tokenizer_path: str | None = None,
        tokenizer_train_docs: int | None = None,
        encoding: str = "utf-8",
        dtype: str = "uint16",
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
        self.tokenizer_file: Path | None = None
        self.n_vocab: int | None = None
        self.train_tokens: np.ndarray | None = None
        self.val_tokens: np.ndarray | None = None
        self.cache_path: Path | None = None

    @classmethod
    def from_config(cls, cfg) -> LMDataModule:
        """The data module of a composed config: its ``data`` keys, ``model.seq_len``, ``seed`` and the step counts."""
        from omegaconf import OmegaConf

        return cls(
            **OmegaConf.to_container(cfg.data, resolve=True),
            seq_len=cfg.model.seq_len,
            seed=cfg.seed,
            accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
            max_steps=cfg.trainer.max_steps,
        )

    @property
    def spec(self):
        from quest_pl.data.shards import DataSpec

        hp = dict(self.hparams)
        hp["tokenizer"] = hp.get("tokenizer") or hp.get("tokenizer_path")  # tokenizer_path: the older name
        return DataSpec.from_hparams(hp)

    def prepare_data(self) -> None:
        self._build(write=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_tokens is None:
            self._build(write=False)

    def _build(self, write: bool) -> None:
        from quest_pl.data import shards
        from quest_pl.data.tokenizer import load_tokenizer_file

        hp = self.hparams
        if hp.source == "bin":
            train, val, tok_file, vocab = shards.open_bin(hp.path, hp.dtype, hp.vocab_size, self.spec.tokenizer)
            self.cache_path = Path(hp.path).expanduser()
        else:
            spec = self.spec
            if write:
                entry = shards.prepare(spec, allow_large=False)
            else:
                entry = shards.entry_path(spec)
                if not entry.is_dir():
                    raise ConfigError(f"data: token cache {entry} is missing (prepare_data() did not run on this node)")
            try:
                meta = shards.verify_entry(entry)
            except shards.DamagedEntry as e:
                raise ConfigError(f"data: token cache {entry} is damaged ({e}); run again to rebuild it") from None
            train, val = (shards.memmap_tokens(entry / f"{s}.bin", np.dtype(meta["dtype"])) for s in shards.SPLITS)
            tok_file, vocab = entry / "tokenizer.json", meta["vocab_size"]
            self.cache_path = entry
        self.tokenizer = load_tokenizer_file(tok_file) if tok_file is not None else None
        self.tokenizer_file, self.n_vocab = tok_file, vocab
        self.train_tokens, self.val_tokens = train, val
        for split, arr in (("train", train), ("validation", val)):
            if len(arr) < 2 * hp.seq_len + 2:  # at least two windows: one per epoch plus the offset slack
                raise ConfigError(
                    f"data: the {split} split has {len(arr)} tokens, fewer than 2 * model.seq_len + 2 = "
                    f"{2 * hp.seq_len + 2}; use more text or a shorter model.seq_len"
                )

    @property
    def vocab_size(self) -> int:
        if self.n_vocab is None:
            self.prepare_data()
            self.setup()
        return self.n_vocab

    def save_tokenizer(self, run_dir: str | Path) -> Path | None:
        """Copy the tokenizer into the run directory (``<run dir>/tokenizer.json``), so a checkpoint is usable
        without the cache. A ``data.source=bin`` corpus without a tokenizer has none to copy (``None``)."""
        from quest_pl.io import atomic_write_bytes

        if self.tokenizer_file is None:
            log.info("data.source=bin without a tokenizer: no tokenizer.json in the run directory")
            return None
        target = Path(run_dir) / "tokenizer.json"
        atomic_write_bytes(target, self.tokenizer_file.read_bytes())
        return target

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
