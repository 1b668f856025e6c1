"""Training throughput, peak memory and loss curve: BF16 vs QuEST W4A4 on the INT8 forward vs QuEST W4A4 with the
bf16 (fake-quantized) forward GEMM, optionally the PyTorch path.

Runs the real training stack (``quest_pl.train.train``: Lightning, bf16-mixed, ``compile=true``) for a few dozen
steps per arm on the embedded corpus and reports the median ``train/tokens_per_sec`` after the first third of the steps
(compilation and autotuning excluded), the peak allocated GPU memory, each as a ratio to the BF16 arm of the same
run, and ``train/loss`` at the logged steps (same seed in every arm: the INT8 and bf16-GEMM curves must agree to the
rounding differences of METHOD.md §5). Each arm's table row is printed as soon as it finishes. GPU only.

    PYTHONPATH=. python bench/bench_train.py --preset llama_200m --steps 40 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

LOWP = ["quant=quest_w4a4", "quant.kernel=triton", "quant.matmul=int8"]
ARMS = {
    "bf16": ["quant=bf16"],
    "quest_w4a4 int8": LOWP,
    "quest_w4a4 int8 fp8-bwd": [*LOWP, "quant.backward=rtn", "quant.backward_format=fp8"],
    "quest_w4a4 bf16-gemm": ["quant=quest_w4a4", "quant.kernel=triton", "quant.matmul=bf16"],
    "quest_w4a4 torch": ["quant=quest_w4a4", "quant.kernel=torch"],
}
DEFAULT_ARMS = ["bf16", "quest_w4a4 int8", "quest_w4a4 bf16-gemm"]


def run_arm(preset: str, steps: int, batch_size: int, log_every: int, overrides: list[str], compile_mode=None) -> dict:
    from quest_pl.config import compose
    from quest_pl.report import read_scalars
    from quest_pl.train import train

    torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()
    compile_fn = torch.compile
    if compile_mode:  # the module calls torch.compile(model): give it a mode (launch overhead, issue arms only)
        torch.compile = lambda model, **kw: compile_fn(model, mode=compile_mode, **kw)
    start = time.time()
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose(
            "trainer=gpu",
            f"model={preset}",
            "compile=true",
            "callbacks=none",
            f"trainer.max_steps={steps}",
            f"trainer.log_every_n_steps={log_every}",
            f"trainer.val_check_interval={steps}",
            f"data.batch_size={batch_size}",
            "data.val_batches=2",
            "trainer.enable_progress_bar=false",
            *overrides,
        )
        try:
            metrics = train(cfg, run_dir)
        finally:
            torch.compile = compile_fn
        scalars = read_scalars(run_dir)
    rates = dict(scalars["train/tokens_per_sec"])
    warm = [v for step, v in sorted(rates.items()) if step > steps // 3]
    return {
        "tokens_per_sec": statistics.median(warm),
        "peak_gib": metrics["peak_memory_gib"],
        "val_loss": metrics["val/loss"],
        "loss_curve": [(int(step), float(v)) for step, v in scalars["train/loss"]],
        "wall_s": time.time() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama_30m")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--arms", nargs="*", default=DEFAULT_ARMS, choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0], help="run every arm once per seed")
    parser.add_argument("--compile-mode", help="torch.compile mode, e.g. reduce-overhead (default: the default mode)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_train.py needs a CUDA GPU")
    mode = args.compile_mode or "default"
    print(f"{args.preset}, {args.steps} steps, batch {args.batch_size} x seq 512, compile {mode}, "
          f"{torch.cuda.get_device_name()}")  # fmt: skip
    print("| arm | seed | tokens/s | vs BF16 | peak GiB | vs BF16 | val loss | wall s |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    results = {}
    for seed in args.seeds:
        for arm in args.arms:
            if arm == "bf16" and seed != args.seeds[0]:  # the throughput baseline: one seed is enough
                continue
            overrides = [*ARMS[arm], f"seed={seed}"]
            r = results[f"{arm} s{seed}"] = run_arm(
                args.preset, args.steps, args.batch_size, args.log_every, overrides, args.compile_mode
            )
            base = results.get(f"bf16 s{args.seeds[0]}")
            tps = f"{r['tokens_per_sec'] / base['tokens_per_sec']:.2f}x" if base else "-"
            mem = f"{r['peak_gib'] / base['peak_gib']:.2f}x" if base else "-"
            print(
                f"| {arm} | {seed} | {r['tokens_per_sec']:,.0f} | {tps} | {r['peak_gib']:.2f} | {mem} "
                f"| {r['val_loss']:.4f} | {r['wall_s']:.0f} |",
                flush=True,
            )
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
    print("\ntrain/loss at the logged steps:")
    for arm, r in results.items():
        print(f"  {arm}: " + " ".join(f"{step}:{loss:.4f}" for step, loss in r["loss_curve"]))
    paired_difference(results, args.arms, args.seeds)


def paired_difference(results: dict, arms: list[str], seeds: list[int]) -> None:
    """Val loss of each quantized arm minus the first quantized arm, paired by seed: mean and a 95% t interval."""
    from scipy import stats

    quantized = [arm for arm in arms if arm != "bf16"]
    if len(seeds) < 2 or len(quantized) < 2:
        return
    ref = quantized[0]
    for arm in quantized[1:]:
        diffs = [results[f"{arm} s{s}"]["val_loss"] - results[f"{ref} s{s}"]["val_loss"] for s in seeds]
        mean = statistics.mean(diffs)
        half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
        print(f"val loss, {arm} - {ref}, paired over seeds {seeds}: {' '.join(f'{d:+.4f}' for d in diffs)}; "
              f"mean {mean:+.4f}, 95% t interval [{mean - half:+.4f}, {mean + half:+.4f}]")  # fmt: skip


if __name__ == "__main__":
    main()
