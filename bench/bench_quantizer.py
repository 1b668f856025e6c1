"""Quantizer forward and forward+backward on the GPU: fused Triton kernel vs the PyTorch reference path vs a copy.

QuEST's quantizer on bf16 activations, 4-bit gaussian_mse grid, trust estimator, block-128 Hadamard (half form):
  triton        kernels.quest_quantize (one read, one write of the values, a bit-packed mask), default launch
  int8 codes    kernels.int8.quantize_codes: int8 codes + per-row scale + mask (forward only; the INT8 GEMM's input)
  fp8 codes     the same with FP8 E4M3 code bytes (forward only; the FP8 GEMM's input)
  --sweep       forward (values) and backward alone for several launches (tile rows, warps, programs per SM,
                pipeline stages); "1/tile" = one program per tile, the non-persistent launch of the previous version
  triton g=G    kernels.quest_quantize with group scales (--group-size G: one σ per G elements of the rotated row)
  torch         quantizers.hadamard_transform + estimators "trust" over quantizers "gaussian_mse"
  torch g=G     the reference with quantizers.build("gaussian_mse", 4, group_size=G) (--group-size G)
  torch.compile the same reference function compiled (--compile)
  copy          y.copy_(x) on the same tensor: the memory floor (read + write of one bf16 tensor)
Each cell is a ratio to the copy timed the same way in the same run, on random normal data: "eager" is the median of
triton.testing.do_bench (CPU launch overhead included: autograd and Python dispatch can hide the GPU time of small
calls), "graph" the median of triton.testing.do_bench_cudagraph (GPU time alone, launches replayed from a CUDA graph).

    PYTHONPATH=. python bench/bench_quantizer.py [--compile] [--no-torch] [--group-size G ...] [--sweep]
"""

import argparse
import time

import torch
from timing import median_ms  # bench/timing.py (the script's folder is on sys.path)

from quest_pl import estimators, kernels, quantizers
from quest_pl.kernels import _tl_backward, _tl_quantize, int8

SHAPES = [(16384, 640), (16384, 2048), (16384, 4096), (65536, 2048)]
BITS = 4


def reference_quantizer(group_size=None):
    estimator = estimators.build("trust", quantizer=quantizers.build("gaussian_mse", bits=BITS, group_size=group_size))
    return lambda x: estimator(quantizers.hadamard_transform(x))


def triton_quantizer(x):
    return kernels.quest_quantize(x, bits=BITS)


def codes_quantizer(fmt):
    return lambda x: int8.quantize_codes(x, bits=BITS, codes=fmt)[0]


NON_PERSISTENT = 1 << 20  # programs per SM: more than tiles, so one program per tile
FWD_LAUNCHES = [(64, 4, NON_PERSISTENT, 1), (64, 4, 4, 1), (64, 4, 4, 2), (64, 4, 2, 2), (64, 4, 8, 2), (32, 4, 8, 2),
                (128, 8, 2, 2), (128, 4, 2, 2), (64, 4, 4, 3), (64, 8, 4, 2)]  # fmt: skip
BWD_LAUNCHES = [(64, 4, 4, NON_PERSISTENT), (64, 4, 4, 4), (64, 4, 4, 2), (64, 2, 4, 8), (32, 4, 4, 8), (64, 4, 8, 4),
                (128, 2, 8, 2)]  # fmt: skip


def sweep(x, grad, t_copy) -> None:
    """Forward (values) and backward alone per launch, as ratios to the copy (graph mode: GPU time)."""
    trust = kernels.DEFAULT_TRUST["gaussian_mse", BITS]
    args = dict(grid="gaussian_mse", n_levels=2**BITS, scale_coef=quantizers.OPTIMAL_GAUSSIAN_SCALES[BITS],
                hadamard=True, estimator="trust", trust=trust, clip_scale=1.0)  # fmt: skip
    _, mask = _tl_quantize.quantize_forward(x, **args)
    for launch in FWD_LAUNCHES:
        t = median_ms(lambda launch=launch: _tl_quantize.quantize_forward(x, launch=launch, **args), True)
        name = "/".join("1/tile" if v == NON_PERSISTENT else str(v) for v in launch)
        print(f"|  | fwd launch {name} | | {t / t_copy:.2f}x | | |", flush=True)
    for launch in BWD_LAUNCHES:
        t = median_ms(lambda launch=launch: _tl_backward.quantize_backward(grad, mask, True, launch=launch), True)
        name = "/".join("1/tile" if v == NON_PERSISTENT else str(v) for v in launch)
        print(f"|  | bwd launch {name} | | {t / t_copy:.2f}x | | |", flush=True)


def forward_backward(fn, x, grad):
    return lambda: torch.autograd.grad(fn(x), x, grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compile", action="store_true", help="also time the reference under torch.compile")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference path")
    parser.add_argument("--shapes", nargs="*", default=[f"{r}x{c}" for r, c in SHAPES], help="ROWSxCOLS ...")
    parser.add_argument("--group-size", type=int, nargs="*", default=[], help="also time group scales (16-128)")
    parser.add_argument("--sweep", action="store_true", help="also time launch variants (forward, backward alone)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    reference = reference_quantizer()
    paths = {"triton": triton_quantizer, "int8 codes": codes_quantizer("int8"), "fp8 codes": codes_quantizer("fp8")}
    for g in args.group_size:
        paths[f"triton g={g}"] = lambda x, g=g: kernels.quest_quantize(x, bits=BITS, group_size=g)
    if not args.no_torch:
        paths["torch"] = reference
        for g in args.group_size:
            paths[f"torch g={g}"] = reference_quantizer(g)
    if args.compile:
        paths["torch.compile"] = torch.compile(reference, dynamic=False)
    print("| shape (bf16) | path | fwd eager | fwd graph | fwd+bwd eager | fwd+bwd graph |")
    print("|---|---|---|---|---|---|")
    for rows, cols in (tuple(int(v) for v in shape.split("x")) for shape in args.shapes):
        x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
        grad = torch.randn_like(x)
        copy = torch.empty_like(x)
        t_copy = {g: median_ms(lambda copy=copy, x=x: copy.copy_(x), g) for g in (False, True)}
        print(f"| {rows}x{cols} | copy | {t_copy[False] * 1e3:.0f} µs | {t_copy[True] * 1e3:.0f} µs | | |")
        x_grad = x.clone().requires_grad_(True)
        for name, fn in paths.items():
            cells = []
            for graph in (False, True):
                with torch.no_grad():
                    cells.append(median_ms(lambda fn=fn, x=x: fn(x), graph) / t_copy[graph])
            for graph in (False, True):
                if name.endswith("codes"):  # forward only
                    cells.append(float("nan"))
                    continue
                cells.append(median_ms(forward_backward(fn, x_grad, grad), graph) / t_copy[graph])
            print(f"| {rows}x{cols} | {name} | " + " | ".join(f"{c:.2f}x" if c == c else "-" for c in cells) + " |",
                  flush=True)  # fmt: skip
        if args.sweep:
            sweep(x, grad, t_copy[True])
    print("cells: time / time of the bf16 copy, same timing mode, same run")


if __name__ == "__main__":
    main()
