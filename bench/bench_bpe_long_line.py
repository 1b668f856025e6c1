"""BPE tokenizer training on one unbroken line: time against the line's length, with pre-tokens cut at
``quest_pl.data.tokenizer.MAX_PRETOKEN`` bytes (the project's tokenizer) and uncut (GPT-2's byte-level
pre-tokenization alone, as before the cut).

    PYTHONPATH=. python bench/bench_bpe_long_line.py [--kb 64 128 256 512 1024] [--uncut-max-kb 256]

The line is random lowercase letters (seeded): one "word" of the whole length for the byte-level pre-tokenizer. Each
cell is one call of ``train_tokenizer`` (vocabulary 2048) on the line alone; the uncut arm stops at
``--uncut-max-kb`` (quadratic: minutes beyond). Prints a Markdown table with the ratio uncut / cut.
"""

from __future__ import annotations

import argparse
import random
import time


def uncut_pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def seconds(line: str, cut: bool) -> float:
    from quest_pl.data import tokenizer

    original = tokenizer.pre_tokenizer
    if not cut:
        tokenizer.pre_tokenizer = uncut_pre_tokenizer
    try:
        start = time.perf_counter()
        tokenizer.train_tokenizer([line], vocab_size=2048)
        return time.perf_counter() - start
    finally:
        tokenizer.pre_tokenizer = original


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kb", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--uncut-max-kb", type=int, default=256)
    args = p.parse_args()
    rng = random.Random(0)
    print("| line | cut (s) | uncut (s) | uncut / cut |\n|---|---|---|---|")
    for kb in args.kb:
        line = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(kb * 1024))
        cut = seconds(line, cut=True)
        uncut = seconds(line, cut=False) if kb <= args.uncut_max_kb else None
        ratio = f"{uncut / cut:.0f}x" if uncut is not None else "not run"
        print(f"| {kb} KB | {cut:.2f} | {'-' if uncut is None else f'{uncut:.1f}'} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
