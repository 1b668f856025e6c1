"""QuEST W4A4 linear (forward + backward) vs bf16 nn.Linear at 16384 tokens on the GPU.

Half-Hadamard form, METHOD.md §1.8: y = F.linear(Q(x H), Q(W H)), Q = 4-bit gaussian_mse grid with the trust estimator.
  triton  both operands through kernels.quest_quantize (fused rotation + quantizer forward, fused masked rotation
          backward), then F.linear
  torch   quest_pl.quant.QuantLinear(hadamard="half") with the PyTorch reference estimators (where quest_pl imports;
          else the same composition written out here: it needs omegaconf, absent from the GPU image)
  bf16    nn.Linear, the baseline every ratio is taken to (same run, same timing mode)
bf16 weights and activations, no bias, random normal inputs. "eager": median of triton.testing.do_bench (CPU launch
overhead included); "graph": median of triton.testing.do_bench_cudagraph (GPU time alone).

    PYTHONPATH=. python bench/bench_linear.py
"""

import time

import torch
import torch.nn.functional as F
from timing import median_ms  # bench/timing.py (the script's folder is on sys.path)
from torch import nn

from quest_pl import estimators, kernels, quantizers

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


def main() -> None:
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"# reference path: {'quest_pl.quant.QuantLinear' if QuantLinear else 'ReferenceQuestLinear (bench)'}")
    print(
        "| in -> out | mode | bf16 nn.Linear fwd+bwd | triton QuEST fwd+bwd | torch QuEST fwd+bwd | triton QuEST fwd |"
    )
    print("|---|---|---|---|---|---|")
    for d_in, d_out in SHAPES:
        layers = {
            "bf16": nn.Linear(d_in, d_out, bias=False),
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
                fwd = {n: median_ms(lambda layer=layers[n], x=x: layer(x), graph) for n in ("bf16", "triton")}
            print(
                f"| {d_in} -> {d_out} | {'graph' if graph else 'eager'} | {t['bf16'] * 1e3:.0f} µs | "
                f"{t['triton'] / t['bf16']:.2f}x | {t['torch'] / t['bf16']:.2f}x | {fwd['triton'] / fwd['bf16']:.2f}x |"
            )
    print("ratios: time / bf16 nn.Linear time of the same run")


if __name__ == "__main__":
    main()
