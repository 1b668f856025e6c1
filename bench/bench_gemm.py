"""The forward GEMM on 4-bit codes vs the bf16 GEMM, per backend and shape (METHOD.md §5; `kernels.gemm`).

  bf16      torch.matmul of bf16 operands (cuBLAS): the baseline every ratio is taken to, same run
  fp8       torch._scaled_mm, E4M3 codes, row-wise fp32 scales, bf16 out (use_fast_accum off: exact sums)
  fp8 fast  the same with use_fast_accum=True (Hopper's fast FP8 accumulation; for reference only: not used)
  int_mm    torch._int_mm (cuBLASLt INT8, int32 out) + the Triton scale epilogue
  triton    the Triton INT8 GEMM with the scales in its epilogue (autotuned per shape)
  chosen    what `kernels.gemm.choose_backend` picks for the shape (timed once, cached)
Median of triton.testing.do_bench (eager) and do_bench_cudagraph (graph) on random odd codes |c| <= 15.

    PYTHONPATH=. python bench/bench_gemm.py [--shapes MxKxN ...]
"""

import argparse
import time

import torch
from timing import median_ms  # bench/timing.py (the script's folder is on sys.path)

from quest_pl.kernels import gemm

SHAPES = ["16384x2048x5632", "16384x5632x2048", "16384x2048x2048", "16384x640x1792", "16384x1792x640"]


def time_shape(m: int, k: int, n: int) -> None:
    a16, b16 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn(n, k, device="cuda").bfloat16()
    ca = torch.randint(-8, 8, (m, k), device="cuda", dtype=torch.int8) * 2 + 1
    cb = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8) * 2 + 1
    fa, fb = gemm.to_format(ca, "fp8"), gemm.to_format(cb, "fp8")
    sa, sb = torch.rand(m, device="cuda"), torch.rand(n, device="cuda")
    sa2, sb2 = sa[:, None].contiguous(), sb[None, :].contiguous()
    fns = {
        "bf16": lambda: a16 @ b16.t(),
        "fp8": lambda: gemm.scaled_matmul(fa, fb, sa, sb, torch.bfloat16, "fp8"),
        "fp8 fast": lambda: torch._scaled_mm(fa, fb.t(), sa2, sb2, out_dtype=torch.bfloat16, use_fast_accum=True),
        "int_mm": lambda: gemm.scaled_matmul(ca, cb, sa, sb, torch.bfloat16, "int_mm"),
        "triton": lambda: gemm.scaled_matmul(ca, cb, sa, sb, torch.bfloat16, "triton"),
    }
    chosen = gemm.choose_backend(m, n, k, 4, ca.device, torch.bfloat16)
    ops = 2 * m * n * k
    # Is the fast FP8 accumulation exact on these integer sums? (fp32 output, unit tensor-wise scales: the raw sums)
    one = torch.ones((), device="cuda")
    exact = ca[:512].double() @ cb.double().t()
    for fast in (False, True):
        raw = torch._scaled_mm(fa[:512], fb.t(), one, one, out_dtype=torch.float32, use_fast_accum=fast)
        err = (raw.double() - exact).abs().max().item()
        print(f"# {m}x{k}x{n}: fp8 use_fast_accum={fast}: max |sum - exact integer sum| = {err:g} "
              f"(max |sum| {exact.abs().max().item():g})")  # fmt: skip
    for graph in (False, True):
        t = {name: median_ms(fn, graph) for name, fn in fns.items()}
        cells = [f"{t['bf16'] * 1e3:.0f} µs ({ops / t['bf16'] / 1e9:.0f} TF)"]
        cells += [f"{t['bf16'] / t[x]:.2f}x ({ops / t[x] / 1e9:.0f} T)" for x in list(fns)[1:]]
        print(f"| {m}x{k}x{n} | {'graph' if graph else 'eager'} | " + " | ".join([*cells, chosen]) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="*", default=SHAPES, help="MxKxN ...")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| M x K x N | mode | bf16 | fp8 | fp8 fast | int_mm | triton | chosen |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        time_shape(*(int(v) for v in shape.split("x")))
    print("cells: speed-up over the bf16 GEMM of the same run (time_bf16 / time), achieved tera-ops/s in brackets")


if __name__ == "__main__":
    main()
