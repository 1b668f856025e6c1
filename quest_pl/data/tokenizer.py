"""Tokenizers: a byte-level BPE trained on the training documents, or a pretrained one from a file, a directory or
the Hugging Face hub (``data.tokenizer``), and how documents are separated in the packed token stream.

Document boundaries follow the tokenizer: one whose post-processor adds special tokens (Llama-2 prepends ``<s>``, as
the paper's data had, METHOD.md §3) is used as it is; otherwise an end-of-text token is appended to every document
(the tokenizer's own ``<|endoftext|>``/``</s>``/``<eos>`` when it has one, else ``<|endoftext|>`` is added).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quest_pl.config import ConfigError
from quest_pl.config.data import (  # noqa: F401  (beside the data keys' validation, which needs them; public here)
    is_hub_name,
    load_tokenizer_file,
    local_tokenizer_file,
)

EOS = "<|endoftext|>"
EOS_NAMES = (EOS, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")


# The longest pre-token (in bytes) BPE trains on and encodes: a longer unbroken run (a 1 MB line of letters, a long
# rule of dashes) is cut into pieces of this length. BPE training is quadratic in the length of a word (each merge
# rescans it), so one 1 MB "word" took minutes; cut, the time is linear in the text (BENCHMARKS.md, "BPE training on
# one long line"). Natural-language words are far shorter, so ordinary text tokenizes as before.
MAX_PRETOKEN = 64


def pre_tokenizer():
    """GPT-2's byte-level pre-tokenization, then every pre-token cut into pieces of at most :data:`MAX_PRETOKEN`
    characters (one per byte after the byte-level mapping)."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=False),
            pre_tokenizers.Split(Regex(f".{{1,{MAX_PRETOKEN}}}"), behavior="isolated"),
        ]
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int, length: int | None = None):
    """Byte-level BPE trained on ``texts`` (streamed; ``tokenizers``); ``EOS`` separates documents; pre-tokens are
    at most :data:`MAX_PRETOKEN` bytes long."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def tokenizer_file(spec: str, key: str = "data.tokenizer") -> Path:
    """The ``tokenizer.json`` that ``spec`` names: a file, a directory holding one, or a hub repository (downloaded
    once into the Hugging Face cache; a cached copy works offline). Unusable specs are one line."""
    local = local_tokenizer_file(spec, key)
    if local is not None:
        return local
    from huggingface_hub import hf_hub_download

    from quest_pl.data.sources import hub_reachable

    try:
        return Path(hf_hub_download(spec, "tokenizer.json", local_files_only=True))
    except Exception:  # not cached: download below
        pass
    if not hub_reachable():
        raise ConfigError(
            f"{key}={spec!r}: not a local file or directory, and the Hugging Face hub is unreachable (offline); "
            f"pass a local tokenizer.json or a directory holding one"
        )
    try:
        return Path(hf_hub_download(spec, "tokenizer.json"))
    except Exception as e:  # unknown or gated repository, no tokenizer.json in it
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{key}={spec!r}: could not get tokenizer.json from the hub ({msg})") from None


@dataclass
class Boundaries:
    """How documents are separated: the post-processor's special tokens, or ``eos_id`` appended to each."""

    post_processor: bool
    eos_id: int | None


def boundaries(tok) -> Boundaries:
    """Decide (and if needed add) the document separator of ``tok``; see the module docstring."""
    if tok.encode("a", add_special_tokens=True).ids != tok.encode("a", add_special_tokens=False).ids:
        return Boundaries(True, None)
    for name in EOS_NAMES:
        if tok.token_to_id(name) is not None:
            return Boundaries(False, tok.token_to_id(name))
    tok.add_special_tokens([EOS])
    return Boundaries(False, tok.token_to_id(EOS))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def encode_documents(tok, sep: Boundaries, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    """One token array per document, separator included (``tokenizers`` batch encoding, parallel in Rust)."""
    out = []
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # the same ids, without offsets (3x faster)
    for e in encode(texts, add_special_tokens=sep.post_processor):
        ids = e.ids
        if sep.eos_id is not None:
            ids = [*ids, sep.eos_id]
        out.append(np.asarray(ids, dtype=dtype))
    return out
