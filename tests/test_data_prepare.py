"""Preparation of token files: strict decoding, the verified cache (damage, leftovers, unwritable location), resume
after a crash, pretrained tokenizers and their document boundaries, nanoGPT bin pairs, one-line errors offline."""

import json
import os
import time

import numpy as np
import pytest
import torch

from quest_pl.config import ConfigError, compose
from quest_pl.data import shards, sources
from quest_pl.data.module import LMDataModule
from quest_pl.data.shards import DataSpec


def _corpus(tmp_path, n_files=24, lines=120):
    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    for i in range(n_files):
        (d / f"doc{i:03d}.txt").write_text(
            "".join(f"Document {i}, line {j}: the fox jumps over dogs.\n" for j in range(lines))
        )
    return str(d / "*.txt")


def _spec(tmp_path, **kw):
    args = dict(source="text_file", path=_corpus(tmp_path), vocab_size=300, cache_dir=str(tmp_path / "cache"))
    args.update(kw)
    return DataSpec(**args)


def _tokens(entry):
    return {s: (entry / f"{s}.bin").read_bytes() for s in shards.SPLITS}


# -- strict decoding ---------------------------------------------------------------------------------------------------
def test_invalid_utf8_names_the_file_and_byte_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "READ_BLOCK", 7)  # the bad byte and a valid 2-byte character straddle block edges
    raw = "héllo wörld, ".encode() * 5 + b"caf\xe9 " + b"more text\n"
    bad = raw.index(b"\xe9")
    f = tmp_path / "latin.txt"
    f.write_bytes(raw)
    with pytest.raises(ConfigError, match=rf"{f} is not valid utf-8 at byte {bad} "):
        sources.read_text(str(f))
    assert sources.read_text(str(f), "latin-1") == raw.decode("latin-1")
    ok = tmp_path / "ok.txt"
    ok.write_bytes("héllo wörld, ".encode() * 5)
    assert sources.read_text(str(ok)) == "héllo wörld, " * 5  # multi-byte characters split across blocks decode


def test_binary_file_is_rejected_before_training(tmp_path):
    (tmp_path / "a.txt").write_text("fine text\n" * 100)
    (tmp_path / "b.txt").write_bytes(bytes(range(256)) * 4)
    spec = _spec(tmp_path, path=str(tmp_path / "*.txt"))
    with pytest.raises(ConfigError, match=r"b\.txt is not valid utf-8 at byte 128 "):
        shards.prepare(spec)
    assert not list((tmp_path / "cache").glob("v2-*[!k]"))  # no entry (only the lock file)


def test_encoding_key_is_validated():
    from quest_pl.config import compose, validate

    with pytest.raises(ConfigError, match=r"data.encoding='utf-9'"):
        validate(compose("data.encoding=utf-9"))


# -- the cache ---------------------------------------------------------------------------------------------------------
def test_entry_layout_and_split_by_document(tmp_path):
    entry = shards.prepare(_spec(tmp_path))
    meta = shards.verify_entry(entry, full=True)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 300
    assert (meta["splits"]["train"]["docs"], meta["splits"]["val"]["docs"]) == (22, 2)  # ceil(0.05 * 24) held out
    train = np.fromfile(entry / "train.bin", dtype=np.uint16)  # nanoGPT's layout: raw ids
    assert len(train) == meta["splits"]["train"]["tokens"] and (train == meta["eos_id"]).sum() == 22
    docs = sources.load_documents("text_file", path=_spec(tmp_path).path)
    _, val_docs = sources.split_documents(docs, 0.05)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(entry / "tokenizer.json"))
    val = np.fromfile(entry / "val.bin", dtype=np.uint16).tolist()
    assert tok.decode(val).replace("<|endoftext|>", "") == "".join(d.text for d in val_docs)


@pytest.mark.parametrize(
    "damage",
    ["truncate_train", "flip_byte", "meta_dtype", "meta_missing", "tokenizer_missing", "empty_val", "bad_json"],
)
def test_damaged_entry_is_rebuilt_with_a_warning(tmp_path, damage, caplog):
    spec = _spec(tmp_path)
    entry = shards.prepare(spec)
    good = _tokens(entry)
    shards._verified.clear()
    if damage == "truncate_train":
        with open(entry / "train.bin", "r+b") as f:
            f.truncate(len(good["train"]) // 2)
    elif damage == "flip_byte":  # same size: only the digest sees it
        data = bytearray(good["train"])
        data[len(data) // 2] ^= 1
        (entry / "train.bin").write_bytes(bytes(data))
    elif damage == "meta_dtype":
        meta = json.loads((entry / "meta.json").read_text())
        meta["dtype"] = "uint32"
        (entry / "meta.json").write_text(json.dumps(meta))
    elif damage == "meta_missing":
        (entry / "meta.json").unlink()
    elif damage == "tokenizer_missing":
        (entry / "tokenizer.json").unlink()
    elif damage == "empty_val":
        (entry / "val.bin").write_bytes(b"")
    elif damage == "bad_json":
        (entry / "meta.json").write_text("{not json")
    # A process that may not build (a DDP rank's setup) stops with one line ...
    dm = LMDataModule(**{**spec.__dict__, "seq_len": 16})
    with pytest.raises(ConfigError, match="is damaged"):
        dm.setup()
    # ... one that may rebuilds it with a warning, to the same tokens.
    with caplog.at_level("WARNING"):
        again = shards.prepare(spec)
    assert again == entry and "damaged" in caplog.text
    assert _tokens(entry) == good


def test_large_damaged_or_missing_entry_stops_with_the_prepare_command(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "AUTO_PREPARE_TOKENS", 100)
    spec = _spec(tmp_path)
    with pytest.raises(ConfigError, match=r"is not prepared .* python -m quest_pl\.data prepare"):
        shards.prepare(spec, allow_large=False)
    assert not (tmp_path / "cache").exists()  # nothing written
    entry = shards.prepare(spec)  # the explicit prepare step
    shards._verified.clear()
    assert shards.prepare(spec, allow_large=False) == entry  # prepared: training reads it
    (entry / "val.bin").write_bytes(b"\0\0")
    with pytest.raises(ConfigError, match=r"is damaged \(val.bin has 2 bytes"):
        shards.prepare(spec, allow_large=False)


def test_leftover_tmp_dirs_of_dead_processes_are_cleaned(tmp_path):
    spec = _spec(tmp_path)
    root = tmp_path / "cache"
    dead, live = root / "v1-abc.tmp999999999", root / f"v1-abc.tmp{os.getpid()}"
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "train.bin").write_bytes(b"junk")
    shards.prepare(spec)
    assert not dead.exists() and live.exists()  # a live process's directory is never touched


def test_unwritable_cache_location_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"data.cache_dir=.*not writable"):
        shards.prepare(_spec(tmp_path, cache_dir=str(blocker / "cache")))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_cache_directory_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="not writable"):
        shards.prepare(_spec(tmp_path, cache_dir=str(ro)))


@pytest.mark.parametrize("tamper", [False, True])
def test_interrupted_preparation_continues_to_the_same_bytes(tmp_path, monkeypatch, tamper, caplog):
    monkeypatch.setattr(shards, "BATCH_DOCS", 2)
    monkeypatch.setattr(shards, "CHECKPOINT_TOKENS", 1500)
    spec = _spec(tmp_path, tokenizer_train_docs=5)
    reference = _tokens(shards.prepare(_spec(tmp_path, tokenizer_train_docs=5, cache_dir=str(tmp_path / "ref"))))
    real, calls = shards.encode_documents, []

    def crash_on_fifth(*a):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # a kill between checkpoints: bytes were written past the last one
        return real(*a)

    monkeypatch.setattr(shards, "encode_documents", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        shards.prepare(spec)
    partial = shards.entry_path(spec).with_name(shards.entry_path(spec).name + ".partial")
    state = json.loads((partial / "state.json").read_text())
    assert 0 < state["docs"] < 24 and (partial / "train.bin").stat().st_size > 0
    monkeypatch.setattr(shards, "encode_documents", real)
    if tamper:  # a file shorter than its saved state records: the state cannot be trusted, start again
        (partial / "train.bin").write_bytes(b"")
    entry = shards.prepare(spec)
    assert _tokens(entry) == reference and not partial.exists()
    assert ("does not match its files" in caplog.text) == tamper


def test_max_tokens_stops_the_training_split(tmp_path):
    full = shards.verify_entry(shards.prepare(_spec(tmp_path)))
    capped = shards.verify_entry(shards.prepare(_spec(tmp_path, max_tokens=2000)))
    n = capped["splits"]["train"]["tokens"]
    assert 2000 <= n < 2000 + full["splits"]["train"]["tokens"] / 22 + 1  # stops after the document that crosses it


# -- tokenizers --------------------------------------------------------------------------------------------------------
def _wordlevel(tmp_path, bos=False):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["[UNK]", "<s>", "the", "fox", "jumps", "over", "dogs."] + [str(i) for i in range(200)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d = tmp_path / ("bos_tok" if bos else "tok")
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    return d


def test_pretrained_tokenizer_from_a_directory_follows_its_boundaries(tmp_path):
    with_bos = shards.prepare(_spec(tmp_path, tokenizer=str(_wordlevel(tmp_path, bos=True))))
    meta = shards.verify_entry(with_bos)
    train = np.fromfile(with_bos / "train.bin", dtype=np.uint16)
    assert meta["eos_id"] is None and meta["vocab_size"] == 207  # post-processor marks documents: nothing added
    assert train[0] == 1 and (train == 1).sum() == 22  # one <s> per training document, first
    plain = shards.prepare(_spec(tmp_path, tokenizer=str(_wordlevel(tmp_path) / "tokenizer.json")))
    meta = shards.verify_entry(plain)
    assert meta["vocab_size"] == 208 and meta["eos_id"] == 207  # <|endoftext|> added and appended
    assert (np.fromfile(plain / "train.bin", dtype=np.uint16) == 207).sum() == 22


def test_hub_tokenizer_and_dataset_offline_fail_in_one_line_quickly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"data.tokenizer='some-org/no-such-tokenizer': .*unreachable"):
        shards.prepare(_spec(tmp_path, tokenizer="some-org/no-such-tokenizer"))
    with pytest.raises(ConfigError, match=r"data.name='allenai/c4': the Hugging Face hub is unreachable"):
        shards.prepare(
            DataSpec(
                source="hub",
                name="allenai/c4",
                config="en",
                val_split="validation",
                max_tokens=1000,
                cache_dir=str(tmp_path / "cache"),
            )
        )
    assert time.monotonic() - start < 10


def test_missing_local_tokenizer_is_one_line(tmp_path):
    from quest_pl.config import compose, validate

    with pytest.raises(ConfigError, match=r"data.tokenizer='./nope/tokenizer.json': no such file"):
        validate(compose("data.tokenizer=./nope/tokenizer.json"))
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"not a tokenizer\.json"):
        shards.prepare(_spec(tmp_path, tokenizer=str(tmp_path / "junk.json")))


# -- nanoGPT bin pairs -------------------------------------------------------------------------------------------------
def _bin_pair(d, n_train=5000, n_val=1000, vocab=300, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.bin", n_train), ("val.bin", n_val)):
        rng.integers(0, vocab, n, dtype=np.uint16).tofile(d / name)  # nanoGPT prepare.py: arr.tofile
    return d


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("missing_val", "val.bin is missing"),
        ("odd_size", "train.bin has 10001 bytes, not a positive multiple of 2"),
        ("beyond_vocab", "val.bin holds token id 400, beyond data.vocab_size=300"),
        ("empty", "train.bin has 0 bytes"),
    ],
)
def test_bin_pair_errors_are_one_line(tmp_path, fault, message):
    d = _bin_pair(tmp_path / "bins")
    if fault == "missing_val":
        (d / "val.bin").unlink()
    elif fault == "odd_size":
        (d / "train.bin").write_bytes(b"\0" * 10001)
    elif fault == "beyond_vocab":
        np.full(1000, 400, dtype=np.uint16).tofile(d / "val.bin")
    elif fault == "empty":
        (d / "train.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=message):
        LMDataModule(source="bin", path=str(d), vocab_size=300, seq_len=16).setup()


def test_bin_pair_is_read_in_place_with_its_tokenizer(tmp_path):
    d = _bin_pair(tmp_path / "bins", vocab=207)
    dm = LMDataModule(source="bin", path=str(d), vocab_size=8192, seq_len=16)
    dm.setup()
    assert dm.vocab_size == 8192 and dm.tokenizer is None  # declared vocabulary
    assert np.array_equal(dm.train_tokens, np.fromfile(d / "train.bin", dtype=np.uint16))
    (d / "tokenizer.json").write_bytes((_wordlevel(tmp_path) / "tokenizer.json").read_bytes())
    dm = LMDataModule(source="bin", path=str(d), vocab_size=8192, seq_len=16)
    dm.setup()
    assert dm.vocab_size == 207  # DIR/tokenizer.json wins over the declared size
    assert dm.save_tokenizer(tmp_path / "run").read_bytes() == (d / "tokenizer.json").read_bytes()


def test_training_on_a_bin_pair_with_a_token_budget(tmp_path):
    """nanoGPT's layout trains end to end; the budget sets max_steps; the run directory keeps the tokenizer."""
    from quest_pl.train import train

    d = _bin_pair(tmp_path / "bins", n_train=20_000, n_val=2_000, vocab=207)
    (d / "tokenizer.json").write_bytes((_wordlevel(tmp_path) / "tokenizer.json").read_bytes())
    cfg = compose(
        "data=bin",
        f"data.path={d}",
        "data.batch_size=4",
        "data.val_batches=2",
        "model.seq_len=32",
        "trainer.tokens=384",  # 3 steps of 4 x 32 tokens
        "trainer.max_steps=1000",
        "trainer.val_check_interval=3",
        "trainer.enable_progress_bar=false",
        "callbacks=none",
        "~logger",
    )
    metrics = train(cfg, tmp_path / "run")
    assert metrics["step"] == 3 and np.isfinite(metrics["val/loss"])
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == (d / "tokenizer.json").read_bytes()


def test_text_file_path_that_is_a_directory_is_one_line(tmp_path):
    from quest_pl.config import validate

    (tmp_path / "sub").mkdir()
    with pytest.raises(ConfigError, match=r"data.path=.*: a directory, not a file"):
        validate(compose("data=text_file", f"data.path={tmp_path}"))


def test_memory_mapped_windows_pickle_as_a_file_name(tmp_path):
    import pickle

    from quest_pl.data.module import TokenWindows

    d = _bin_pair(tmp_path / "bins", n_train=100_000)
    w = TokenWindows(np.memmap(d / "train.bin", dtype=np.uint16, mode="r"), 16)
    blob = pickle.dumps(w)
    assert len(blob) < 10_000  # 200 KB of tokens are not copied
    again = pickle.loads(blob)
    assert isinstance(again.tokens, np.memmap) and np.array_equal(again.tokens, w.tokens)
    assert torch.equal(again[5][0], w[5][0])


# -- the prepare command: faults are one line -------------------------------------------------------------------------
def _prepare_cli(tmp_path, capsys, *extra):
    from quest_pl.data.__main__ import main

    code = main(["prepare", "data=text_file", f"data.path={_corpus(tmp_path)}", "data.vocab_size=300",
                 f"data.cache_dir={tmp_path / 'cache'}", *extra])  # fmt: skip
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def test_prepare_with_an_unreadable_file_is_one_line(tmp_path, monkeypatch, capsys):
    import builtins

    real_open = builtins.open
    target = os.path.join(tmp_path, "corpus", "doc003.txt")

    def deny(file, *a, **kw):  # the tests may run as root, which chmod does not stop
        if str(file) == target:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", deny)  # every reader: the cache key's digest, then the decoding
    code, lines = _prepare_cli(tmp_path, capsys)
    assert code == 2 and lines[-1].startswith("error: data.path: cannot read ") and "doc003.txt" in lines[-1]
    assert "Traceback" not in "\n".join(lines)


def test_prepare_interrupted_is_one_line_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shards, "BATCH_DOCS", 2)
    monkeypatch.setattr(shards, "CHECKPOINT_TOKENS", 1500)
    real, calls = shards.encode_documents, []

    def interrupt_on_fifth(*a):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(shards, "encode_documents", interrupt_on_fifth)
    code, lines = _prepare_cli(tmp_path, capsys, "data.tokenizer_train_docs=5")
    assert code == 130 and lines[-1].startswith("interrupted: prepare stopped"), lines
    assert "Traceback" not in "\n".join(lines)
    monkeypatch.setattr(shards, "encode_documents", real)
    code, lines = _prepare_cli(tmp_path, capsys, "data.tokenizer_train_docs=5")
    assert code == 0, lines
