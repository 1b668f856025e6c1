"""Prefill throughput: a W4A4 QuEST model on the INT8 path vs the same model in bf16, inference only (no gradient).

The model presets of experiments/model (METHOD.md §3), vocab 8192, bf16 weights on the GPU, eval mode, one forward
over batch x seq tokens (the prefill of a prompt), timed with triton.testing.do_bench (median, eager):
  bf16        the plain model
  w4a4 int8   quantize_model with quant=quest_w4a4, quant.matmul=int8: each block linear quantizes its input to int8
              codes per call and multiplies them with the weight's codes, computed once (QuantLinear's inference
              cache), in the Triton INT8 GEMM
  w4a4 bf16   the same model with quant.matmul=bf16 (fake-quantized weights and activations in a bf16 GEMM)
Ratios are tokens/s over the bf16 model's of the same run.

    PYTHONPATH=. python bench/bench_prefill.py [--presets llama_200m llama_800m] [--batch 8] [--seq 2048]
"""

import argparse
import time
from pathlib import Path

import torch
import yaml
from triton.testing import do_bench

from quest_pl.model import Llama, LlamaConfig
from quest_pl.quant import QuantConfig, quantize_model

MODEL_DIR = Path(__file__).resolve().parents[1] / "experiments" / "model"
QUANT = dict(name="quest_w4a4", grid="gaussian_mse", bits=4, estimator="trust", hadamard=True, kernel="triton")


def build(preset: str, seq: int, matmul: str | None) -> Llama:
    spec = yaml.safe_load((MODEL_DIR / f"{preset}.yaml").read_text())
    cfg = LlamaConfig(n_layer=spec["n_layer"], d_model=spec["d_model"], n_head=spec["n_head"], seq_len=seq)
    torch.manual_seed(0)
    model = Llama(cfg)
    if matmul is not None:
        quantize_model(model, QuantConfig.from_cfg(dict(QUANT, matmul=matmul), cfg))
    return model.to(device="cuda", dtype=torch.bfloat16).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="*", default=["llama_200m", "llama_800m"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    tokens = args.batch * args.seq
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"# prefill of batch {args.batch} x seq {args.seq} = {tokens} tokens, bf16 weights, eval, no grad")
    print("| preset | arm | ms / prefill | tokens/s | vs bf16 | max |logit diff| vs bf16 arm |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        idx = torch.randint(0, 8192, (args.batch, args.seq), device="cuda")
        base_ms, base_logits = None, None
        for arm, matmul in (("bf16", None), ("w4a4 int8", "int8"), ("w4a4 bf16", "bf16")):
            model = build(preset, args.seq, matmul)
            with torch.no_grad():
                logits = model(idx)
                ms = do_bench(lambda model=model, idx=idx: model(idx), warmup=50, rep=300, return_mode="median")
            if base_ms is None:
                base_ms, ref = ms, logits
            diff = (logits.float() - ref.float()).abs().max().item()
            if arm == "w4a4 int8":
                base_logits = logits
            elif base_logits is not None:
                diff = f"{diff:.3f} (vs int8: {(logits.float() - base_logits.float()).abs().max().item():.3f})"
            print(f"| {preset} | {arm} | {ms:.2f} | {tokens / ms * 1e3:,.0f} | {base_ms / ms:.2f}x | {diff} |")
            del model, logits
            torch.cuda.empty_cache()
    print("vs bf16: tokens/s over the bf16 model's, same run")


if __name__ == "__main__":
    main()
