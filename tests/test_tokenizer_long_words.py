"""BPE on pathological text (quest_pl.data.tokenizer): an unbroken run far longer than MAX_PRETOKEN is cut into
pre-tokens of at most that many bytes, so training stays linear in the text (timed in bench/bench_bpe_long_line.py);
the tokenizer still round-trips every byte, and ordinary text tokenizes exactly as with GPT-2's pre-tokenizer alone."""

import random

from tokenizers import pre_tokenizers

from quest_pl.data import sources
from quest_pl.data.tokenizer import MAX_PRETOKEN, pre_tokenizer, train_tokenizer


def _line(n: int, alphabet: str = "abcdefghijklmnopqrstuvwxyz") -> str:
    rng = random.Random(0)
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_long_runs_are_cut_into_bounded_pre_tokens():
    for text in (_line(5000), "-" * 3000, " " * 1000 + "x", _line(700, "éü€") + " end"):
        pieces = pre_tokenizer().pre_tokenize_str(text)
        assert max(len(p) for p, _ in pieces) <= MAX_PRETOKEN
        # the pieces cover the byte-level pre-tokens exactly, in order
        uncut = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
        assert "".join(p for p, _ in pieces) == "".join(p for p, _ in uncut)


def test_a_tokenizer_trained_on_one_long_line_round_trips():
    line = _line(20_000) + " " + _line(3000, "éü€ ") + "\n" + "=" * 500
    tok = train_tokenizer([line], vocab_size=400)
    assert tok.get_vocab_size() == 400
    assert max(len(t) for t in tok.get_vocab()) <= MAX_PRETOKEN  # no merge spans a cut
    for text in (line, "never seen: ∑ ok\n", _line(300)):
        assert tok.decode(tok.encode(text).ids) == text


def test_ordinary_text_tokenizes_as_without_the_cut(monkeypatch):
    """The cut changes nothing for text whose words are shorter than MAX_PRETOKEN (the embedded plays)."""
    from quest_pl.data import tokenizer

    text = sources.load_documents("embedded", max_docs=1)[0].text[:60_000]
    assert max(len(p) for p, _ in pre_tokenizers.ByteLevel().pre_tokenize_str(text)) <= MAX_PRETOKEN
    cut = train_tokenizer([text], vocab_size=600)
    monkeypatch.setattr(tokenizer, "pre_tokenizer", lambda: pre_tokenizers.ByteLevel(add_prefix_space=False))
    uncut = tokenizer.train_tokenizer([text], vocab_size=600)
    assert not isinstance(uncut.pre_tokenizer, pre_tokenizers.Sequence)
    assert cut.get_vocab() == uncut.get_vocab()
    assert cut.encode(text).ids == uncut.encode(text).ids
