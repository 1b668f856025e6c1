"""QuEST W4A4 linear (forward + backward) vs bf16 nn.Linear at 16384 tokens on the GPU.

Half-Hadamard form, METHOD.md §1.8: y = Q(x H) Q(W H)^T, Q = 4-bit gaussian_mse grid with the trust estimator.
  lowp        kernels.int8.quest_int8_linear: codes + per-row scales from the fused quantizer, the forward GEMM on the
              backend `kernels.gemm` picks for the shape, the backward GEMMs in bf16 on the dequantized operands
              (quant.matmul=int8); the weight's codes recomputed every call (one micro-batch per optimizer step)
  lowp cached the same with the weight's codes cached (`kernels.weight_cache`: micro-batches 2.. of a step)
  lowp fp8bw  lowp with both backward GEMMs on FP8 tensor cores (quant.backward=rtn, backward_format=fp8)
  lowp triton lowp with the forward GEMM pinned to the Triton INT8 GEMM (the previous version's path)
  bf16-gemm   both operands through kernels.quest_quantize, then F.linear in bf16 (quant.matmul=bf16)
  bf16        nn.Linear, the baseline every ratio is taken to (same run, same timing mode)
bf16 weights and activations, no bias, random normal inputs. "eager": median of triton.testing.do_bench (CPU launch
overhead included); "graph": median of triton.testing.do_bench_cudagraph (GPU time alone).

    PYTHONPATH=. python bench/bench_linear.py [--profile]   (--profile: per-kernel GPU time of two lowp variants)
"""

import argparse
import time

import torch
import torch.nn.functional as F
from timing import median_ms  # bench/timing.py (the script's folder is on sys.path)
from torch import nn

from quest_pl import kernels
from quest_pl.kernels import gemm, int8, weight_cache

TOKENS = 16384
SHAPES = [(2048, 2048), (2048, 5632), (5632, 2048), (640, 1792)]  # (in_features, out_features)
BITS = 4
ARGS = dict(bits=BITS, grid="gaussian_mse", hadamard=True, estimator="trust")


class LowpLinear(nn.Linear):
    def __init__(self, d_in, d_out, cache=False, backward="bf16", backend=None):
        super().__init__(d_in, d_out, bias=False)
        self.cache, self.backward, self.backend = cache, backward, backend

    def forward(self, x):
        weight_cache.enabled = self.cache
        return int8.quest_int8_linear(x, self.weight, ARGS, ARGS, backward=self.backward, backend=self.backend)


class Bf16GemmLinear(nn.Linear):
    def forward(self, x):
        return F.linear(kernels.quest_quantize(x, bits=BITS), kernels.quest_quantize(self.weight, bits=BITS))


LAYERS = {
    "bf16": lambda i, o: nn.Linear(i, o, bias=False),
    "lowp": lambda i, o: LowpLinear(i, o),
    "lowp cached": lambda i, o: LowpLinear(i, o, cache=True),
    "lowp fp8bw": lambda i, o: LowpLinear(i, o, backward="fp8"),
    "lowp triton": lambda i, o: LowpLinear(i, o, backend="triton"),
    "bf16-gemm": lambda i, o: Bf16GemmLinear(i, o, bias=False),
}


def step(layer, x, grad):
    params = [x, *layer.parameters()]
    return lambda: torch.autograd.grad(layer(x), params, grad)


def profile(name, d_in, d_out) -> None:
    """Per-kernel GPU time of one fwd+bwd (torch.profiler), to name what is left."""
    layer = LAYERS[name](d_in, d_out).to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(TOKENS, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(TOKENS, d_out, device="cuda", dtype=torch.bfloat16)
    fn = step(layer, x, grad)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    print(f"\n{name} fwd+bwd {d_in} -> {d_out}, 10 steps:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", action="store_true", help="also print per-kernel GPU times of lowp, lowp fp8bw")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    names = list(LAYERS)
    print("| in -> out | mode | bf16 fwd+bwd | " + " | ".join(f"{n} fwd+bwd" for n in names[1:]) + " | bf16 fwd | "
          "lowp fwd | lowp cached fwd | GEMM backend |")  # fmt: skip
    print("|---" * (len(names) + 6) + "|")
    for d_in, d_out in SHAPES:
        layers = {name: make(d_in, d_out).to(device="cuda", dtype=torch.bfloat16) for name, make in LAYERS.items()}
        for layer in layers.values():
            layer.weight.data.copy_(layers["bf16"].weight.data)
        x = torch.randn(TOKENS, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(TOKENS, d_out, device="cuda", dtype=torch.bfloat16)
        backend = gemm.choose_backend(TOKENS, d_out, d_in, BITS, x.device, torch.bfloat16)
        for graph in (False, True):
            t = {name: median_ms(step(layer, x, grad), graph) for name, layer in layers.items()}
            with torch.no_grad():
                fwd = {n: median_ms(lambda f=layers[n], x=x: f(x), graph) for n in ("bf16", "lowp", "lowp cached")}
            cells = [f"{t['bf16'] * 1e3:.0f} µs", *(f"{t[n] / t['bf16']:.2f}x" for n in names[1:])]
            cells += [f"{fwd['bf16'] * 1e3:.0f} µs", f"{fwd['lowp'] / fwd['bf16']:.2f}x"]
            cells += [f"{fwd['lowp cached'] / fwd['bf16']:.2f}x", backend]
            print(f"| {d_in} -> {d_out} | {'graph' if graph else 'eager'} | " + " | ".join(cells) + " |", flush=True)
    weight_cache.enabled = True
    print("ratios: time / bf16 nn.Linear time of the same run (forward columns: / bf16 forward)")
    if args.profile:
        for name in ("lowp", "lowp fp8bw"):
            profile(name, 2048, 5632)
        profile("lowp", 640, 1792)


if __name__ == "__main__":
    main()
