"""Packed export sizes (quest_pl.export) of a llama_30m-shaped model (6 x 640, vocab 32000) at each weight format, next
to the fp32 and bf16 sizes of the same parameters, and a bit-exactness check of the reload on 64 tokens.

Random latent weights (sizes do not depend on the values). Embeddings, head and norms are stored in fp32 as trained, so
at this size they dominate the file; the quantized linears' bits per weight include the fp32 per-row scales and tables.

    PYTHONPATH=. python bench/export_sizes.py [LABEL ...]     # e.g. mxfp4 nvfp4: only those rows
"""

import sys
import tempfile

import torch

from quest_pl.export import export_packed
from quest_pl.module import LMModule
from quest_pl.saving import load_packed

MODEL = dict(vocab_size=32000, n_layer=6, d_model=640, n_head=5, seq_len=512)
OPTIM = dict(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, warmup_frac=0.1, init_div=100.0,
             final_lr_frac=0.1, quant_lr_scale=1.0, quant_weight_decay=0.0)  # fmt: skip
FORMATS = [("gaussian_mse", b) for b in (1, 2, 3, 4, 8)] + [("lloyd_max", 4), ("fp4", 4), ("int_sparse24", 4)]
FORMATS = [(f"{g}_w{b}", dict(grid=g, bits=b)) for g, b in FORMATS] + [
    ("int4_g32", dict(grid="gaussian_mse", bits=4, group_size=32)),  # an fp32 step per group of 32
    ("mxfp4", dict(grid="mxfp4", bits=4, scale_rule="absmax", hadamard_block=32)),  # E8M0 byte per 32
    ("nvfp4", dict(grid="nvfp4", bits=4, scale_rule="four_over_six", hadamard_block=16)),  # E4M3 byte per 16
]


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main() -> None:
    for label, fmt in FORMATS:
        if sys.argv[1:] and label not in sys.argv[1:]:
            continue
        torch.manual_seed(0)
        quant = dict(name="q", estimator="trust", hadamard=True, hadamard_mode="half", kernel="torch") | fmt
        module = LMModule(MODEL, OPTIM, quant=quant).eval()
        with tempfile.TemporaryDirectory() as out:
            s = export_packed(module, out)
            model, _ = load_packed(out)
            idx = torch.randint(0, MODEL["vocab_size"], (1, 64))
            with torch.no_grad():
                exact = torch.equal(model(idx), module.model(idx))
        print(
            f"{label} (weights and activations): file {mib(s['file_bytes'])} (fp32 {mib(s['fp32_bytes'])}, bf16 "
            f"{mib(s['bf16_bytes'])}); quantized linears {mib(s['quantized_linear_bytes'])} = "
            f"{s['quantized_linear_bits_per_weight']:.3f} bits/weight; reload bit-exact: {exact}",
            flush=True,
        )


if __name__ == "__main__":
    main()
