import numpy as np
import pytest
import torch

from quest_pl.data import (
    LMDataModule,
    StepBatches,
    TokenWindows,
    load_documents,
    split_documents,
)


def test_embedded_corpus_is_real_text_and_split_by_document():
    docs = load_documents("embedded")
    assert len(docs) == 38 and sum(len(d.text) for d in docs) > 4_000_000
    assert any("To be, or not to be" in d.text for d in docs)
    train, val = split_documents(docs, 0.05)
    assert len(val) == 2 and len(train) == 36
    assert not {d.name for d in train} & {d.name for d in val}
    # deterministic and independent of the listing order
    _train2, val2 = split_documents(list(reversed(docs)), 0.05)
    assert {d.name for d in val2} == {d.name for d in val}


def test_text_file_source_single_file_is_chunked(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("".join(f"line {i}\n" for i in range(1000)))
    docs = load_documents("text_file", path=str(f), chunks_per_file=10)
    assert len(docs) == 10 and "".join(d.text for d in docs) == f.read_text()
    (tmp_path / "b.txt").write_text("other document\n")
    assert len(load_documents("text_file", path=str(tmp_path / "*.txt"))) == 2


def _windows(n_tokens=10_000, seq_len=16):
    return TokenWindows(np.arange(n_tokens, dtype=np.uint16), seq_len)


def test_batches_are_a_function_of_seed_and_step():
    a = StepBatches(_windows(), batch_size=4, seed=0)
    b = StepBatches(_windows(), batch_size=4, seed=0)
    for m in (0, 7, 3, 7, 500):  # any order, revisits, and beyond one epoch
        assert torch.equal(a[m][0], b[m][0])
    assert not torch.equal(a[1][0], a[2][0])
    assert not torch.equal(StepBatches(_windows(), 4, seed=1)[0][0], a[0][0])
    x, y = a[3]
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one


def test_ranks_get_disjoint_slices_of_the_global_batch():
    windows = _windows(seq_len=8)
    single = StepBatches(windows, batch_size=8, seed=0)
    r0 = StepBatches(windows, batch_size=4, seed=0, rank=0, world_size=2)
    r1 = StepBatches(windows, batch_size=4, seed=0, rank=1, world_size=2)
    for m in range(5):
        joint = torch.cat([r0[m][0], r1[m][0]])
        assert torch.equal(joint, single[m][0])  # same global batch, split by rank
        starts0 = set(r0[m][0][:, 0].tolist())
        assert starts0.isdisjoint(set(r1[m][0][:, 0].tolist()))


def test_every_window_visited_once_per_epoch():
    windows = _windows(n_tokens=8 * 41 + 1, seq_len=8)
    sb = StepBatches(windows, batch_size=4, seed=0)
    firsts = torch.cat([sb[m][0][:, 0] for m in range(sb.n // 4)])
    assert len(set(firsts.tolist())) == len(firsts)


def _datamodule(tmp_path, **kw):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("".join(f"The quick brown fox {i} jumps over the lazy dog.\n" for i in range(3000)))
    args = dict(source="text_file", path=str(corpus), vocab_size=300, seq_len=16, cache_dir=str(tmp_path / "cache"))
    args.update(kw)
    dm = LMDataModule(**args)
    dm.prepare_data()
    dm.setup()
    return dm


def test_token_cache_is_reused_and_invalidated(tmp_path):
    dm = _datamodule(tmp_path)
    first = dm.cache_path
    stamp = (first / "train.bin").stat().st_mtime_ns
    again = _datamodule(tmp_path)
    assert again.cache_path == first and (first / "train.bin").stat().st_mtime_ns == stamp
    assert _datamodule(tmp_path, vocab_size=320).cache_path != first  # tokenizer setting changed
    (tmp_path / "corpus.txt").write_text((tmp_path / "corpus.txt").read_text() + "A new line of text.\n")
    assert _datamodule(tmp_path).cache_path != first  # corpus changed
    assert dm.vocab_size == 300
    decoded = dm.tokenizer.decode(dm.train_tokens[:50].astype(np.int64).tolist())
    assert "quick brown fox" in decoded


def test_tokenizer_file_is_used(tmp_path):
    dm = _datamodule(tmp_path)
    tok_file = dm.cache_path / "tokenizer.json"
    other = _datamodule(tmp_path, tokenizer_path=str(tok_file), vocab_size=999)
    assert other.vocab_size == 300
    assert np.array_equal(np.asarray(other.train_tokens), np.asarray(dm.train_tokens))


def test_too_little_text_is_a_clear_error(tmp_path):
    (tmp_path / "tiny.txt").write_text("hi\n" * 40)
    with pytest.raises(ValueError, match="seq_len"):
        _datamodule(tmp_path, path=str(tmp_path / "tiny.txt"), seq_len=512, cache_dir=str(tmp_path / "c2"))
