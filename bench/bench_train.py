"""Training throughput and peak memory: BF16 vs QuEST W4A4 (Triton kernels) vs QuEST W4A4 (PyTorch path).

Runs the real training stack (``quest_pl.train.train``: Lightning, bf16-mixed, ``compile=true``) for a few hundred
steps per arm on the embedded corpus and reports the median ``train/tokens_per_sec`` after the warm-up (compilation)
and the peak allocated GPU memory, each as a ratio to the BF16 arm of the same run. GPU only.

    python bench/bench_train.py --preset llama_30m --steps 300 --batch-size 64
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

ARMS = {
    "bf16": ["quant=bf16"],
    "quest_w4a4 (triton)": ["quant=quest_w4a4", "quant.kernel=triton"],
    "quest_w4a4 (torch)": ["quant=quest_w4a4", "quant.kernel=torch"],
}


def run_arm(preset: str, steps: int, batch_size: int, overrides: list[str]) -> dict:
    from quest_pl.config import compose
    from quest_pl.report import read_scalars
    from quest_pl.train import train

    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose(
            "trainer=gpu",
            f"model={preset}",
            "compile=true",
            "callbacks=none",
            f"trainer.max_steps={steps}",
            "trainer.log_every_n_steps=10",
            f"trainer.val_check_interval={steps}",
            f"data.batch_size={batch_size}",
            "data.val_batches=2",
            "trainer.enable_progress_bar=false",
            *overrides,
        )
        metrics = train(cfg, run_dir)
        rates = dict(read_scalars(run_dir)["train/tokens_per_sec"])
    warm = [v for step, v in sorted(rates.items()) if step > steps // 3]
    return {
        "tokens_per_sec": statistics.median(warm),
        "peak_gib": metrics["peak_memory_gib"],
        "val_loss": metrics["val/loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama_30m")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--arms", nargs="*", default=list(ARMS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_train.py needs a CUDA GPU")
    results = {arm: run_arm(args.preset, args.steps, args.batch_size, ARMS[arm]) for arm in args.arms}
    base = results.get("bf16")
    print(f"\n{args.preset}, {args.steps} steps, batch {args.batch_size} x seq 512, {torch.cuda.get_device_name()}")
    print("| arm | tokens/s | vs BF16 | peak GiB | vs BF16 | val loss |")
    print("|---|---|---|---|---|---|")
    for arm, r in results.items():
        tps = f"{r['tokens_per_sec'] / base['tokens_per_sec']:.2f}x" if base else "-"
        mem = f"{r['peak_gib'] / base['peak_gib']:.2f}x" if base else "-"
        print(f"| {arm} | {r['tokens_per_sec']:,.0f} | {tps} | {r['peak_gib']:.2f} | {mem} | {r['val_loss']:.3f} |")


if __name__ == "__main__":
    main()
