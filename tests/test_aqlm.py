"""AQLM (quest_pl.quantizers.aqlm and ptq.method=aqlm): vector quantization beats the scalar 2-bit grid on the same
weights, the beam search is exact where it can be checked by enumeration and never increases the error, codes +
codebooks + scales reproduce the weight bit for bit, runs are deterministic, and the PTQ wiring (config, names, sweep
rows, model replacement) holds."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from quest_pl import quantizers
from quest_pl.quantizers import aqlm


def gaussian_layer(out: int, cols: int, tokens: int, seed: int = 0):
    """A random N(0, 0.02^2) weight and the Gram matrix of N(0, 1) inputs."""
    g = torch.Generator().manual_seed(seed)
    weight = 0.02 * torch.randn(out, cols, generator=g)
    x = torch.randn(tokens, cols, generator=g)
    return weight, x.T @ x / tokens, x


def test_two_bit_vector_quantization_beats_the_scalar_grid():
    """At 2 bits per weight, codebooks and scales included, AQLM's output error on Gaussian inputs is below the scalar
    gaussian_mse 2-bit grid's on the same weights (the point of vector quantization; with N(0, I) inputs calibration
    knows nothing the weights don't). On a 256 x 512 layer 2x7 codebooks at g = 8 cost exactly what the scalar grid
    with its fp16 row scales costs: 1.75 + (2 * 128 * 8 + 256) * 16 / (256 * 512) = 2 + 16 / 512 bits per weight."""
    weight, gram, x = gaussian_layer(256, 512, 2048)
    scalar = quantizers.build("gaussian_mse", bits=2)(weight)
    q = aqlm.quantize(weight, gram, group_size=8, num_codebooks=2, codebook_bits=7, rounds=2, adam_steps=20)
    assert q.codes.shape == (256, 64, 2) and q.codebooks.shape == (2, 128, 8)
    assert q.bits_per_weight() == 2 + 16 / 512
    err_scalar = aqlm.relative_error(weight, scalar, gram)
    err_aqlm = aqlm.relative_error(weight, q.dequantize(), gram)
    # the same quantity measured directly on the inputs: ||X W^T - X W_hat^T||^2 / ||X W^T||^2
    direct = ((x @ (weight - q.dequantize()).T).pow(2).sum() / (x @ weight.T).pow(2).sum()).item()
    print(f"\nrelative output error at {q.bits_per_weight():.4f} bits/weight in all: "
          f"scalar gaussian_mse {err_scalar:.4f}, AQLM 2x7 {err_aqlm:.4f}")  # fmt: skip
    assert direct == pytest.approx(err_aqlm, rel=1e-3)
    assert err_aqlm < err_scalar


def test_codes_and_codebooks_reproduce_the_weight_exactly():
    """Stored as they would be on disk (uint8 codes, fp16 codebooks and scales), the codes rebuild the weight the
    quantized layer computes with, bit for bit; the layer is y = (x H) W_hat^T."""
    from quest_pl.ptq import AQLMLinear

    weight, gram, _ = gaussian_layer(64, 128, 512)
    q = aqlm.quantize(weight, gram, num_codebooks=2, codebook_bits=8, rounds=1, adam_steps=5)
    stored = {"codes": q.codes.to(torch.uint8), "codebooks": q.codebooks.half(), "scales": q.scales.half()}
    assert torch.equal(stored["codes"].long(), q.codes)  # 8-bit codes fit
    rebuilt = aqlm.dequantize(stored["codes"].long(), stored["codebooks"].float(), stored["scales"].float())
    layer = AQLMLinear(q, None, hadamard=True, act_quant=None)
    assert torch.equal(rebuilt, q.dequantize()) and torch.equal(rebuilt, layer.weight)
    # and by hand: scale times the sum of the two codewords of each group
    by_hand = torch.stack(
        [q.scales[i, 0] * torch.cat([q.codebooks[0, q.codes[i, j, 0]] + q.codebooks[1, q.codes[i, j, 1]]
                                     for j in range(16)]) for i in range(64)]
    )  # fmt: skip
    assert torch.equal(by_hand, rebuilt)
    x = torch.randn(3, 5, 128)
    torch.testing.assert_close(layer(x), F.linear(quantizers.hadamard_transform(x), rebuilt))


def test_beam_search_is_exact_where_enumerable():
    """With a full-width beam (beam = K) and two codebooks the search is exhaustive for a group; with H diagonal the
    groups decouple, so the codes are the brute-force argmin of every group's error."""
    torch.manual_seed(0)
    out, cols, k = 6, 8, 4
    weight = torch.randn(out, cols)
    gram = torch.diag(torch.rand(cols) + 0.5)
    q = aqlm.AQLMWeight(torch.zeros(out, 2, 2, dtype=torch.long), torch.randn(2, k, 4), torch.rand(out, 1) + 0.5)
    codes = aqlm.beam_search(weight, gram, q, beam_size=k, generator=torch.Generator().manual_seed(0))

    def err(i, j, pair):
        cols_j = slice(4 * j, 4 * j + 4)
        r = q.scales[i, 0] * (q.codebooks[0, pair[0]] + q.codebooks[1, pair[1]])
        return float((gram.diagonal()[cols_j] * (weight[i, cols_j] - r) ** 2).sum())

    for i, j in itertools.product(range(out), range(2)):
        best = min(err(i, j, pair) for pair in itertools.product(range(k), range(k)))
        assert err(i, j, codes[i, j].tolist()) == pytest.approx(best, rel=1e-5, abs=1e-7)


def test_beam_search_never_increases_the_error():
    """Each group update keeps the current codes among its candidates, under a full (correlated) Gram matrix."""
    weight, _, _ = gaussian_layer(32, 64, 256)
    a = torch.randn(64, 64) / 8
    gram = a @ a.T + 0.1 * torch.eye(64)
    gen = torch.Generator().manual_seed(0)
    q = aqlm.initialise(weight, 8, 2, 5, kmeans_iters=2, generator=gen)
    before = aqlm.relative_error(weight, q.dequantize(), gram)
    for beam in (1, 4):
        codes = aqlm.beam_search(weight, gram, q, beam_size=beam, generator=gen)
        after = aqlm.relative_error(weight, aqlm.dequantize(codes, q.codebooks, q.scales), gram)
        assert after <= before + 1e-6


def test_deterministic_with_a_seed():
    weight, gram, _ = gaussian_layer(32, 64, 256)
    runs = [aqlm.quantize(weight, gram, codebook_bits=6, rounds=1, adam_steps=5, seed=s) for s in (3, 3, 4)]
    assert torch.equal(runs[0].codes, runs[1].codes) and torch.equal(runs[0].codebooks, runs[1].codebooks)
    assert torch.equal(runs[0].scales, runs[1].scales)
    assert not torch.equal(runs[0].codebooks, runs[2].codebooks)


def test_one_codebook_of_65536_runs():
    """The paper's 1x16 layout (one codebook of 2^16 vectors) runs; on a layer with fewer groups than codewords every
    group gets its own codeword (the codebook is then most of the storage), so it is exact but for fp16 rounding."""
    weight, gram, _ = gaussian_layer(32, 64, 256)
    q = aqlm.quantize(weight, gram, num_codebooks=1, codebook_bits=16, rounds=1, adam_steps=2, kmeans_iters=1)
    assert q.codes.shape == (32, 8, 1) and q.codebooks.shape == (1, 65536, 8) and int(q.codes.max()) < 65536
    assert aqlm.relative_error(weight, q.dequantize(), gram) < 1e-5
    assert q.bits_per_weight() == aqlm.bits_per_weight(32, 64, 8, 1, 16) > 500


def test_bits_per_weight_counts_codebooks_and_scales():
    # 4096 x 4096 at 2x8, g = 8: 2 bits of codes + 2 * 256 * 8 fp16 codebook entries + 4096 fp16 scales
    assert aqlm.bits_per_weight(4096, 4096, 8, 2, 8) == 2 + (2 * 256 * 8 * 16 + 4096 * 16) / 4096**2
    assert aqlm.bits_per_weight(4096, 4096, 8, 1, 16) == 2 + (65536 * 8 * 16 + 4096 * 16) / 4096**2
    weight, gram, _ = gaussian_layer(16, 32, 64)
    q = aqlm.quantize(weight, gram, num_codebooks=2, codebook_bits=4, rounds=1, adam_steps=0)
    assert q.bits_per_weight() == aqlm.bits_per_weight(16, 32, 8, 2, 4)


# -- PTQ wiring ------------------------------------------------------------------------------------------------------
def test_config_names_and_errors():
    from omegaconf import OmegaConf

    from quest_pl.config import ConfigError
    from quest_pl.ptq import PTQConfig
    from quest_pl.sweep import arm_name

    def cfg(**kw):
        base = OmegaConf.load(quantizers.__file__.rsplit("quantizers", 1)[0] + "experiments/ptq/default.yaml")
        return OmegaConf.merge(base, {"from": "x.ckpt", "method": "aqlm", "bits": 2}, kw)

    p = PTQConfig.from_cfg(cfg())
    assert (p.name, p.codebook_layout, p.codebook_bits) == ("aqlm_w2", "2x8", 8)
    assert PTQConfig.from_cfg(cfg(aqlm={"num_codebooks": 1})).name == "aqlm_1x16_w2"
    assert PTQConfig.from_cfg(cfg(hadamard=False, act_bits=4)).name == "aqlm_nohad_w2a4"
    assert arm_name(OmegaConf.create({"name": "bf16"}), cfg()) == "aqlm_w2"
    assert arm_name(OmegaConf.create({"name": "bf16"}), cfg(method="scalar")) == "ptq_gaussian_mse_w2a16"
    cases = {
        "ptq.method='gptq'": cfg(method="gptq"),
        "ptq.bits=1.3: ptq.method=aqlm needs": cfg(bits=1.3),
        "ptq.bits=5: .* = 20 an integer in 1..16": cfg(bits=5),
        "ptq.group_size=128: ptq.method=aqlm": cfg(group_size=128),
        "ptq.aqlm.beam_size=0: expected an integer >= 1": cfg(aqlm={"beam_size": 0}),
        "ptq.aqlm.lr=-1": cfg(aqlm={"lr": -1}),
        "ptq.aqlm.codebook_bits: unknown key": cfg(aqlm={"codebook_bits": 8}),
        "ptq.calib_batches=0": cfg(calib_batches=0),
    }
    for message, c in cases.items():
        with pytest.raises(ConfigError, match=message):
            PTQConfig.from_cfg(c)


def test_sweep_adds_aqlm_after_the_two_bit_rows():
    from quest_pl.ptq import ptq_row, sweep_configs

    def arm(w, a):
        return {"method": "QAT", "_quant": {"grid": "gaussian_mse", "w_bits": w, "a_bits": a}}

    names = [c.name for c in sweep_configs([{"method": "BF16"}, arm(2, 2), arm(4, 4), arm(2, None)])]
    assert names == ["ptq_gaussian_mse_w2a2", "ptq_gaussian_mse_w2a16", "aqlm_w2", "ptq_gaussian_mse_w4a4",
                     "ptq_gaussian_mse_w4a16"]  # fmt: skip
    assert "aqlm_w2" not in [c.name for c in sweep_configs([arm(4, 4)])]
    aqlm_cfg = next(c for c in sweep_configs([arm(2, None)]) if c.method == "aqlm")
    row = ptq_row(aqlm_cfg, {"val/loss": 4.5, "val/ppl": 90.0, "aqlm": {"bits_per_weight": 3.1015}})
    assert (row["arm"], row["method"], row["bits"]) == ("aqlm_w2", "PTQ", "W2A16")
    assert row["grid"] == "aqlm 2x8 g8, calibrated (16 batches), 3.10 bits/weight in all"


def test_model_quantization_replaces_every_block_linear():
    """On a small random Llama: every block linear becomes an AQLMLinear whose output error on the calibration
    inputs is below the scalar 2-bit grid's; fine-tuning lowers the KL to the full-precision model."""
    from quest_pl.model import Llama, LlamaConfig
    from quest_pl.ptq import AQLMLinear, AQLMSettings, PTQConfig, quantize_model_aqlm

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=300, n_layer=1, d_model=128, seq_len=32))
    calib = [torch.randint(0, 300, (4, 32)) for _ in range(2)]
    settings = AQLMSettings(rounds=1, adam_steps=10, kmeans_iters=2, finetune_steps=6, finetune_lr=1e-3)
    stats = quantize_model_aqlm(model, PTQConfig(method="aqlm", bits=2, aqlm=settings), calib, progress=False)
    layers = [m for m in model.modules() if isinstance(m, AQLMLinear)]
    assert len(layers) == 4 and not any(type(m) is torch.nn.Linear for m in model.blocks.modules())
    assert set(stats["layers"]) == {"blocks.0.attn.c_attn", "blocks.0.attn.c_proj", "blocks.0.mlp.w12",
                                    "blocks.0.mlp.c_proj"}  # fmt: skip
    assert stats["code_bits_per_weight"] == 2 and stats["bits_per_weight"] > 2
    assert stats["mean_rel_output_error"] < quantizers.build("gaussian_mse", bits=2).gaussian_mse
    assert stats["finetune_kl"][-1] < stats["finetune_kl"][0]
    for m in layers:  # fine-tuning left fp16-representable, frozen codebooks and scales
        assert torch.equal(m.codebooks, m.codebooks.half().float()) and not m.codebooks.requires_grad
