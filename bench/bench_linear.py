"""QuEST W4A4 linear (forward + backward) vs bf16 nn.Linear at 16384 tokens on the GPU.

Half-Hadamard form, METHOD.md §1.8: y = F.linear(Q(x H), Q(W H)), Q = 4-bit gaussian_mse grid with the trust estimator.
  triton  both operands through kernels.quest_quantize (fused rotation + quantizer forward, fused masked rotation
          backward), then F.linear in bf16 (quant.matmul=bf16)
  int8    kernels.int8.quest_int8_linear: int8 codes + per-row scales from the fused quantizer, the Triton INT8 GEMM
          with the scales in its epilogue, the same backward on the dequantized operands (quant.matmul=int8)
  torch   quest_pl.quant.QuantLinear(hadamard="half") with the PyTorch reference estimators (where quest_pl imports;
          else the same composition written out here: it needs omegaconf, absent from the GPU image)
  bf16    nn.Linear, the baseline every ratio is taken to (same run, same timing mode)
bf16 weights and activations, no bias, random normal inputs. "eager": median of triton.testing.do_bench (CPU launch
overhead included); "graph": median of triton.testing.do_bench_cudagraph (GPU time alone).

    PYTHONPATH=. python bench/bench_linear.py [--profile]   (--profile: per-kernel GPU time of the int8 fwd+bwd)
"""

import argparse
import time

import torch
import torch.nn.functional as F
from timing import median_ms  # bench/timing.py (the script's folder is on sys.path)
from torch import nn

from quest_pl import estimators, kernels, quantizers
from quest_pl.kernels import int8

try:
    from quest_pl.quant import QuantLinear
except ImportError:  # quest_pl needs omegaconf
    QuantLinear = None

TOKENS = 16384
SHAPES = [(2048, 2048), (2048, 5632), (640, 1792)]  # (in_features, out_features)
BITS = 4


class TritonQuestLinear(nn.Linear):
    def forward(self, x):
        return F.linear(kernels.quest_quantize(x, bits=BITS), kernels.quest_quantize(self.weight, bits=BITS))


class Int8QuestLinear(nn.Linear):
    def forward(self, x):
        args = dict(bits=BITS, grid="gaussian_mse", hadamard=True, estimator="trust")
        return int8.quest_int8_linear(x, self.weight, args, args)


def trust():
    return estimators.build("trust", quantizer=quantizers.build("gaussian_mse", bits=BITS))


class ReferenceQuestLinear(nn.Linear):
    """QuantLinear(hadamard="half")'s forward with the PyTorch reference estimators."""

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out, bias=False)
        self.weight_quant, self.act_quant = trust(), trust()

    def forward(self, x):
        rotate = quantizers.hadamard_transform
        return F.linear(self.act_quant(rotate(x)), self.weight_quant(rotate(self.weight)))


def reference_linear(d_in, d_out):
    if QuantLinear is None:
        return ReferenceQuestLinear(d_in, d_out)
    return QuantLinear(d_in, d_out, weight_quant=trust(), act_quant=trust(), hadamard="half")


def step(layer, x, grad):
    params = [x, *layer.parameters()]
    return lambda: torch.autograd.grad(layer(x), params, grad)


def profile(d_in, d_out) -> None:
    """Per-kernel GPU time of one int8 QuEST fwd+bwd (torch.profiler), to name what is left."""
    layer = Int8QuestLinear(d_in, d_out, bias=False).to(device="cuda", dtype=torch.bfloat16)
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
    print(f"\nint8 QuEST fwd+bwd {d_in} -> {d_out}, 10 steps:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", action="store_true", help="also print per-kernel GPU times of the int8 path")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"# reference path: {'quest_pl.quant.QuantLinear' if QuantLinear else 'ReferenceQuestLinear (bench)'}")
    print(
        "| in -> out | mode | bf16 nn.Linear fwd+bwd | int8 QuEST fwd+bwd | triton QuEST fwd+bwd | torch QuEST fwd+bwd "
        "| int8 QuEST fwd | triton QuEST fwd |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for d_in, d_out in SHAPES:
        layers = {
            "bf16": nn.Linear(d_in, d_out, bias=False),
            "int8": Int8QuestLinear(d_in, d_out, bias=False),
            "triton": TritonQuestLinear(d_in, d_out, bias=False),
            "torch": reference_linear(d_in, d_out),
        }
        for layer in layers.values():
            layer.to(device="cuda", dtype=torch.bfloat16)
            layer.weight.data.copy_(layers["bf16"].weight.data)
        x = torch.randn(TOKENS, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(TOKENS, d_out, device="cuda", dtype=torch.bfloat16)
        for graph in (False, True):
            t = {name: median_ms(step(layer, x, grad), graph) for name, layer in layers.items()}
            with torch.no_grad():
                fwd = {n: median_ms(lambda layer=layers[n], x=x: layer(x), graph) for n in ("bf16", "int8", "triton")}
            print(
                f"| {d_in} -> {d_out} | {'graph' if graph else 'eager'} | {t['bf16'] * 1e3:.0f} µs | "
                f"{t['int8'] / t['bf16']:.2f}x | {t['triton'] / t['bf16']:.2f}x | {t['torch'] / t['bf16']:.2f}x | "
                f"{fwd['int8'] / fwd['bf16']:.2f}x | {fwd['triton'] / fwd['bf16']:.2f}x |"
            )
    print("ratios: time / bf16 nn.Linear time of the same run (forward columns: / bf16 forward)")
    if args.profile:
        for d_in, d_out in SHAPES:
            profile(d_in, d_out)


if __name__ == "__main__":
    main()
