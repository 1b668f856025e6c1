"""Documents, streamed one at a time from a source, in a deterministic order; strict decoding of local files.

* ``embedded``: the 38 Shakespeare plays shipped in the package (``quest_pl/corpus``), one document per play;
* ``text_file``: ``data.path``, a file or a glob of local text files, one document per file; a single file is cut
  into ``data.chunks_per_file`` documents at line boundaries (``\\n``), so a validation split by document exists;
* ``hub``: ``datasets.load_dataset(name, config, split=..., streaming=True)``, only when asked and online.

Local files are decoded strictly in ``data.encoding`` (default utf-8): a byte sequence that is not valid text stops
with one line naming the file and the byte offset, never a corpus full of U+FFFD.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import lzma
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from quest_pl.config import ConfigError
from quest_pl.config.data import text_files  # beside the data keys' validation, which needs it

EMBEDDED_CORPUS = Path(__file__).resolve().parent.parent / "corpus" / "shakespeare.jsonl.xz"
READ_BLOCK = 1 << 20  # bytes read (and decoded) at a time from a local file
HUB_HOST = ("huggingface.co", 443)
HUB_TIMEOUT_S = 3.0


@dataclass
class Document:
    name: str
    text: str


def read_blocks(file: str | os.PathLike, key: str = "data.path") -> Iterator[bytes]:
    """The bytes of ``file`` in blocks of ``READ_BLOCK``; a file that cannot be read is one line naming it."""
    try:
        with open(file, "rb") as f:
            while raw := f.read(READ_BLOCK):
                yield raw
    except OSError as e:  # permission denied, an I/O error, a file removed under us
        raise ConfigError(f"{key}: cannot read {file} ({type(e).__name__}: {e.strerror or e})") from None


def decoded_blocks(file: str, encoding: str = "utf-8", key: str = "data.path") -> Iterator[str]:
    """The text of ``file`` in blocks of about ``READ_BLOCK`` bytes, decoded strictly (memory: one block); a byte
    sequence that is not valid ``encoding`` is one line naming ``key``, the file and the byte offset."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    consumed = 0  # bytes handed to the decoder before this block
    for raw in _with_end(read_blocks(file, key)):
        pending = len(decoder.getstate()[0])  # undecoded bytes carried over from the previous block
        try:
            text = decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            offset = consumed - pending + e.start
            raise ConfigError(
                f"{key}: {file} is not valid {encoding} at byte {offset} ({e.reason}); "
                f"set data.encoding to the file's encoding or fix the file"
            ) from None
        consumed += len(raw)
        if text:
            yield text


def _with_end(blocks: Iterator[bytes]) -> Iterator[bytes]:
    """The blocks, then an empty one (the decoder's final call)."""
    yield from blocks
    yield b""


def read_text(file: str, encoding: str = "utf-8", key: str = "data.path") -> str:
    return "".join(decoded_blocks(file, encoding, key))


def _lines(file: str, encoding: str) -> Iterator[str]:
    """Lines of a file, each with its ``\\n`` (the last one may lack it), streamed."""
    rest = ""
    for block in decoded_blocks(file, encoding):
        block = rest + block
        cut = block.rfind("\n") + 1
        rest = block[cut:]
        if cut:
            yield from _split_nl(block[:cut])
    if rest:
        yield rest


def _split_nl(text: str) -> list[str]:
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _count_lines(file: str) -> int:
    n, last = 0, b"\n"
    for raw in read_blocks(file):
        n += raw.count(b"\n")
        last = raw[-1:]
    return n + (last != b"\n")


def _file_chunks(file: str, chunks: int, encoding: str) -> Iterator[Document]:
    """A single file cut into ``chunks`` documents of ``ceil(lines / chunks)`` lines each."""
    per = max(1, -(-_count_lines(file) // chunks))
    buf: list[str] = []
    i = 0
    for line in _lines(file, encoding):
        buf.append(line)
        if len(buf) == per:
            yield Document(f"{file}#{i}", "".join(buf))
            buf, i = [], i + 1
    if buf:
        yield Document(f"{file}#{i}", "".join(buf))


def hub_reachable() -> bool:
    """A quick check (a few seconds at most) that the Hugging Face hub answers, before ``datasets`` retries for long."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in (
        "0",
        "",
    ):
        return False
    answered = []

    def probe() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection(HUB_HOST, timeout=HUB_TIMEOUT_S).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_TIMEOUT_S)
    return bool(answered)


def open_hub_stream(name: str, config: str | None, split: str):
    """``datasets`` streaming iterator of one split; offline is one line, quickly."""
    if not hub_reachable():
        raise ConfigError(
            f"data.name={name!r}: the Hugging Face hub is unreachable (offline); prepare the shards on a machine that "
            f"is online (python -m quest_pl.data prepare ...), or train on a local corpus with data.source=text_file "
            f"or data.source=bin"
        )
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # unknown dataset, config or split, gated repository: one line, the library's reason
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"data.name={name!r} (config {config!r}, split {split!r}): {msg}") from None


def iter_documents(
    source: str,
    path: str | None = None,
    name: str | None = None,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    chunks_per_file: int = 64,
    encoding: str = "utf-8",
) -> Iterator[Document]:
    """All documents of a source, streamed, in a deterministic order."""
    if source == "embedded":
        with lzma.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                yield Document(d["title"], d["text"])
    elif source == "text_file":
        files = text_files(path)
        if len(files) == 1:
            yield from _file_chunks(files[0], chunks_per_file, encoding)
        else:
            for file in files:
                yield Document(file, read_text(file, encoding))
    elif source == "hub":
        for i, row in enumerate(open_hub_stream(name, config, split)):
            text = row.get(text_field)
            if not isinstance(text, str):
                raise ConfigError(f"data.text_field={text_field!r}: row {i} of {name} {split} has no text field")
            yield Document(f"{name}/{split}/{i}", text)
    else:
        raise ConfigError(f"data.source={source!r}: expected one of embedded, text_file, hub, bin")


def load_documents(source: str, max_docs: int | None = None, **kw) -> list[Document]:
    """All documents of a small source as a list (tests, tools); preparation streams instead."""
    docs = []
    for i, d in enumerate(iter_documents(source, **kw)):
        if max_docs is not None and i >= max_docs:
            break
        docs.append(d)
    return docs


def text_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def held_out(digests: list[bytes], val_fraction: float) -> set[int]:
    """Indices of the validation documents: the ``ceil(val_fraction * n)`` (at least one) documents whose text hashes
    lowest; deterministic and independent of the order the source lists them in (ties keep the source order)."""
    n = len(digests)
    n_val = max(1, round(val_fraction * n + 0.4999))
    if n_val >= n:
        raise ConfigError(
            f"data.val_fraction={val_fraction}: leaves no training document out of {n} "
            f"(the corpus has too few documents; for one file raise data.chunks_per_file)"
        )
    ranked = sorted(range(n), key=lambda i: digests[i])
    return set(ranked[:n_val])


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Train and validation documents of a list, by :func:`held_out`."""
    val = held_out([text_digest(d.text) for d in docs], val_fraction)
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


def hashed_to_validation(text: str, val_fraction: float) -> bool:
    """Split rule of a stream without a validation split: a document is held out when its hash, read as a number in
    [0, 1), is below ``val_fraction`` (one pass, by document, independent of the order)."""
    return int.from_bytes(text_digest(text)[:8], "big") < val_fraction * 2**64
