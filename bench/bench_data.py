"""Data throughput: (a) preparation rate on the CPU, (b) data-loading overhead of a GPU training step.

(a) ``PYTHONPATH=. python bench/bench_data.py prepare --mb 200``: builds a text corpus of about ``--mb`` MB (copies
of the embedded plays, each with its own first line, one document per play), a 32k byte-level BPE trained on the
embedded corpus, and times ``python -m quest_pl.data prepare``'s work (``quest_pl.data.shards.prepare``: hashing
pass, streamed encoding, writes, checkpoints, final verification) in tokens/s. BPE training is excluded.

(b) ``PYTHONPATH=. python bench/bench_data.py step --steps 60``: the 30M preset (``+scale=gpu_30m``: 64 x 8 x 512
tokens per step, bf16-mixed, ``torch.compile``) with QuEST W4A4 on the Triton kernels, trained through
``quest_pl.train.train`` twice: on a memory-mapped ``train.bin`` / ``val.bin`` pair of ``--tokens`` random ids
(``data.source=bin``, 4 loader workers as the preset) and on synthetic batches already in memory (the same loader with
every micro-batch a fixed tensor). Reports the median ``train/tokens_per_sec`` after warm-up for both and their
ratio. GPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def bench_prepare(mb: int, workdir: Path) -> None:
    from quest_pl.data import shards, sources

    plays = sources.load_documents("embedded")
    size = sum(len(p.text.encode()) for p in plays)
    corpus = workdir / "corpus"
    corpus.mkdir()
    copies = max(1, round(mb * 1e6 / size))
    for c in range(copies):
        for i, p in enumerate(plays):
            (corpus / f"{c:04d}_{i:02d}.txt").write_text(f"copy {c}\n{p.text}")
    tok_entry = shards.prepare(shards.DataSpec(vocab_size=32000, cache_dir=str(workdir / "cache")))
    spec = shards.DataSpec(
        source="text_file",
        path=str(corpus / "*.txt"),
        tokenizer=str(tok_entry / "tokenizer.json"),
        cache_dir=str(workdir / "cache"),
    )
    start = time.perf_counter()
    entry = shards.prepare(spec, progress=False)
    wall = time.perf_counter() - start
    meta = json.loads((entry / "meta.json").read_text())
    tokens = sum(meta["splits"][s]["tokens"] for s in shards.SPLITS)
    text_mb = copies * size / 1e6
    # Baseline: the tokenizer alone on the same documents, in the same batches, text already in memory, nothing written.
    from quest_pl.data.tokenizer import load_tokenizer_file

    tok = load_tokenizer_file(entry / "tokenizer.json")
    texts = [f.read_text() for f in sorted(corpus.glob("*.txt"))]
    start = time.perf_counter()
    base_tokens = 0
    for i in range(0, len(texts), 38):
        base_tokens += sum(len(e.ids) for e in tok.encode_batch_fast(texts[i : i + 38]))
    base = base_tokens / (time.perf_counter() - start)
    print(
        f"prepared {text_mb:.0f} MB of text ({copies} copies x 38 plays) into {tokens:,} tokens in {wall:.1f} s: "
        f"{tokens / wall:,.0f} tokens/s, {text_mb / wall:.1f} MB/s, on {os.cpu_count()} CPU cores; the tokenizer "
        f"alone (encode_batch_fast, in memory): {base:,.0f} tokens/s; ratio {tokens / wall / base:.2f}"
    )


def bench_step(steps: int, n_tokens: int, workdir: Path) -> None:
    import torch

    from quest_pl.config import compose
    from quest_pl.data import module
    from quest_pl.report import read_scalars
    from quest_pl.train import train

    if not torch.cuda.is_available():
        raise SystemExit("bench_data.py step needs a CUDA GPU")
    bins = workdir / "bins"
    bins.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train.bin", n_tokens), ("val.bin", n_tokens // 100)):
        rng.integers(0, 32000, n, dtype=np.uint16).tofile(bins / name)

    def run(tag: str) -> float:
        run_dir = workdir / tag
        cfg = compose(
            "+scale=gpu_30m",
            "quant=quest_w4a4",
            "quant.kernel=triton",
            "data=bin",
            f"data.path={bins}",
            "data.vocab_size=32000",
            f"trainer.max_steps={steps}",
            "trainer.log_every_n_steps=5",
            f"trainer.val_check_interval={steps}",
            "data.val_batches=2",
            "callbacks=none",
        )
        train(cfg, run_dir)
        rates = dict(read_scalars(run_dir)["train/tokens_per_sec"])
        return statistics.median(v for s, v in sorted(rates.items()) if s > steps // 3)

    real = run("memmap")
    fixed = {}
    original = module.StepBatches.__getitem__

    def in_memory(self, m):  # the first micro-batch, kept: no reads, no copies from the memory map
        if "batch" not in fixed:
            fixed["batch"] = original(self, 0)
        return fixed["batch"]

    module.StepBatches.__getitem__ = in_memory
    try:
        synthetic = run("synthetic")
    finally:
        module.StepBatches.__getitem__ = original
    print(f"\n30M preset, QuEST W4A4 (triton), {steps} steps of 262,144 tokens, {torch.cuda.get_device_name()}")
    print("| batches | tokens/s | vs in-memory |")
    print("|---|---|---|")
    print(f"| memory-mapped bin ({n_tokens:,} tokens) | {real:,.0f} | {real / synthetic:.3f}x |")
    print(f"| synthetic, in memory | {synthetic:,.0f} | 1.000x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("prepare", "step"))
    parser.add_argument("--mb", type=int, default=200, help="prepare: MB of text")
    parser.add_argument("--steps", type=int, default=60, help="step: optimizer steps per arm")
    parser.add_argument("--tokens", type=int, default=200_000_000, help="step: tokens in the memory-mapped train.bin")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        if args.mode == "prepare":
            bench_prepare(args.mb, Path(d))
        else:
            bench_step(args.steps, args.tokens, Path(d))


if __name__ == "__main__":
    main()
