"""Packed export (quest_pl.export, .packing, .convert, .saving): bit packing, bit-exact reload against the QAT
model's quantized forward for every grid, the packed sizes, and the integer path against fake quantization."""

import math

import pytest
import torch

from quest_pl.convert import PackedLinear, set_int_path
from quest_pl.export import export_packed
from quest_pl.intpath import int_matmul
from quest_pl.packing import pack_codes, unpack_codes
from quest_pl.saving import load_packed, read_packed

MODEL = dict(vocab_size=300, n_layer=1, d_model=128, n_head=2, seq_len=16)
OPTIM = dict(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, warmup_frac=0.1, init_div=100.0,
             final_lr_frac=0.1, quant_lr_scale=1.0, quant_weight_decay=0.0)  # fmt: skip


def quant(grid, w_bits, a_bits=None, hadamard=None, estimator="trust", **kw):
    return dict(name="q", grid=grid, w_bits=w_bits, a_bits=a_bits, estimator=estimator, hadamard=hadamard is not None,
                hadamard_mode=hadamard or "half", kernel="torch", **kw)  # fmt: skip


def qat_module(q, seed=0):
    from quest_pl.module import LMModule

    torch.manual_seed(seed)
    module = LMModule(MODEL, OPTIM, quant=q).eval()
    with torch.no_grad():  # latent weights away from the init's symmetric draw; LSQ/PACT scales initialised
        for p in module.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        module.model(tokens())
    return module


def tokens(seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, MODEL["vocab_size"], (batch, MODEL["seq_len"]), generator=g)


@pytest.mark.parametrize("cols", [21, 24])  # 24: whole bytes (the fast path at 1, 2, 4 bits)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_pack_layout_and_round_trip(bits, cols):
    codes = torch.randint(0, 2**bits, (3, cols), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, math.ceil(cols * bits / 8))
    assert torch.equal(unpack_codes(packed, bits, cols), codes)
    # the documented layout: element j's bit t at stream bit j*bits + t, least significant bit first
    stream = [(int(packed[0, i // 8]) >> (i % 8)) & 1 for i in range(cols * bits)]
    assert [sum(stream[j * bits + t] << t for t in range(bits)) for j in range(cols)] == codes[0].tolist()


def test_pack_known_bytes():
    assert pack_codes(torch.tensor([[1, 2, 15, 0]]), 4).tolist() == [[0x21, 0x0F]]  # low nibble first
    assert pack_codes(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1]]), 1).tolist() == [[0x81]]
    assert pack_codes(torch.tensor([[7, 0, 0, 0, 0, 0, 0, 5]]), 3).tolist() == [[0x07, 0x00, 0xA0]]


CASES = [
    *[quant("gaussian_mse", b, None, h) for b in (1, 2, 4, 8) for h in (None, "half", "full")],
    *[quant("gaussian_mse", b, b, h) for b in (1, 2, 4, 8) for h in (None, "half", "full")],
    *[quant(g, 4, 4, h) for g in ("lloyd_max", "fp4", "int_sparse24") for h in (None, "half", "full")],
    *[quant(g, 4, None, "half") for g in ("lloyd_max", "fp4", "int_sparse24")],
    quant("lloyd_max", 2, 2, "full"),
    quant("ternary", 1.585, 1.585, "half"),
    quant("uniform", 3, 3, None),
    quant("gaussian_mse", 4, 4, "half", estimator="lsq"),
    quant("gaussian_mse", 4, None, None, estimator="lsq", lsq_per_row=True),
    quant("gaussian_mse", 4, 4, "full", estimator="pact"),
    quant("int_sparse24", 4, 4, "half", w_grid="int_sparse24", a_grid="gaussian_mse"),
    quant("gaussian_mse", None, 4, "half"),  # activations only: the weight stays in full precision
]
# Group scales, the block formats and Hadamard blocks other than 128 (docs/METHOD.md §1.8; group scales nest with it).
GROUPED = [
    quant("gaussian_mse", 4, 4, "half", group_size=32),
    quant("gaussian_mse", 2, None, "full", group_size=16),
    quant("lloyd_max", 4, 4, None, group_size=32),
    quant("fp4", 4, None, "half", group_size=16),
    quant("int_sparse24", 4, None, "half", group_size=32),
    quant("mxfp4", 4, 4, "half", scale_rule="absmax", hadamard_block=32),
    quant("mxfp4", 4, None, "full", scale_rule="gaussian", hadamard_block=32),
    quant("nvfp4", 4, 4, "half", scale_rule="absmax", hadamard_block=16),
    quant("nvfp4", 4, 4, "full", scale_rule="four_over_six", hadamard_block=16),
    quant("nvfp4", 4, None, None, scale_rule="gaussian"),
    quant("gaussian_mse", 4, 4, "half", hadamard_block=32),
    quant("gaussian_mse", 4, None, "half", hadamard_block=16),
]
CASES += GROUPED


def case_id(q):
    form = q["hadamard_mode"] if q["hadamard"] else "nohad"
    extra = "".join(f"-{k}{q[k]}" for k in ("group_size", "scale_rule", "hadamard_block") if k in q)
    return f"{q['grid']}-w{q['w_bits']}a{q['a_bits']}-{form}-{q['estimator']}{extra}"


# Every grid, bits, Hadamard form and operand set runs in the default suite; the rest of the cross product is slow.
CORE = {
    "gaussian_mse-w1a1-half-trust", "gaussian_mse-w1aNone-full-trust", "gaussian_mse-w2aNone-half-trust",
    "gaussian_mse-w2a2-full-trust", "gaussian_mse-w4a4-nohad-trust", "gaussian_mse-w4aNone-full-trust",
    "gaussian_mse-w8a8-half-trust", "gaussian_mse-w8aNone-nohad-trust", "lloyd_max-w4a4-half-trust",
    "lloyd_max-w4aNone-half-trust", "fp4-w4a4-full-trust", "fp4-w4aNone-half-trust", "int_sparse24-w4a4-nohad-trust",
    "int_sparse24-w4aNone-half-trust", "ternary-w1.585a1.585-half-trust", "gaussian_mse-w4a4-full-pact",
    "gaussian_mse-w4aNone-nohad-lsq", "gaussian_mse-wNonea4-half-trust",
    "gaussian_mse-w4a4-half-trust-group_size32", "lloyd_max-w4a4-nohad-trust-group_size32",
    "mxfp4-w4a4-half-trust-scale_ruleabsmax-hadamard_block32",
    "nvfp4-w4a4-full-trust-scale_rulefour_over_six-hadamard_block16",
    "gaussian_mse-w4aNone-half-trust-hadamard_block16",
}  # fmt: skip


@pytest.mark.parametrize(
    "q", [pytest.param(q, marks=() if case_id(q) in CORE else pytest.mark.slow) for q in CASES], ids=case_id
)
def test_reload_is_bit_exact(q, tmp_path):
    module = qat_module(q)
    export_packed(module, tmp_path)
    model, _config = load_packed(tmp_path)
    idx = tokens()
    with torch.no_grad():
        want, got = module.model(idx), model(idx)
    assert want.dtype == got.dtype == torch.float32
    assert torch.equal(want, got)  # to the last bit: SQNR infinite
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 4 and all(m.hadamard == (q["hadamard_mode"] if q["hadamard"] else None) for m in layers)
    assert all(m.meta["format"] != "dense" for m in layers if q["w_bits"] is not None)  # the weights are packed


def test_sizes_match_the_layout(tmp_path):
    from quest_pl.model import Llama, LlamaConfig

    module = qat_module(quant("gaussian_mse", 4, 4, "half"))
    sizes = export_packed(module, tmp_path)
    tensors, _config = read_packed(tmp_path)
    cfg = LlamaConfig(**MODEL)
    h = cfg.ffn_hidden
    shapes = [(3 * 128, 128), (128, 128), (2 * h, 128), (128, h)]
    for name, (rows, cols) in zip(("attn.c_attn", "attn.c_proj", "mlp.w12", "mlp.c_proj"), shapes):
        assert tensors[f"blocks.0.{name}.codes"].shape == (rows, cols // 2)  # two 4-bit codes per byte
        assert tensors[f"blocks.0.{name}.scale"].shape == (rows,)
    n_params = sum(p.numel() for p in Llama(cfg).parameters())
    assert sizes["fp32_bytes"] == 4 * n_params and sizes["bf16_bytes"] == 2 * n_params
    assert sizes["file_bytes"] == (tmp_path / "model.safetensors").stat().st_size
    weights = sum(r * c for r, c in shapes)
    rows = sum(r for r, _ in shapes)
    # 4 bits per weight + one fp32 step per row + the 16-entry table per layer, + 4-byte LSQ-free act state (none)
    assert sizes["quantized_linear_bytes"] == weights // 2 + 4 * rows + 4 * 16 * 4
    sparse = export_packed(qat_module(quant("int_sparse24", 4, None, "half")), tmp_path / "s")
    assert sparse["quantized_linear_bits_per_weight"] == pytest.approx(
        8 * (weights * 3 // 8 + 4 * rows + 4 * 16 * 4) / weights
    )  # 2:4 at 4 bits: half the codes (2 bits/weight) + a 2-bit position per kept code (1 bit/weight)


@pytest.mark.parametrize(
    ("q", "scale_bytes_per_group", "group"),
    [(quant("gaussian_mse", 4, None, "half", group_size=32), 4, 32),  # fp32 step per group
     (quant("mxfp4", 4, None, "half", scale_rule="absmax", hadamard_block=32), 1, 32),  # E8M0 byte per group
     (quant("nvfp4", 4, None, "half", scale_rule="four_over_six", hadamard_block=16), 1, 16)],  # E4M3 byte per group
    ids=["int4-g32", "mxfp4", "nvfp4"],
)  # fmt: skip
def test_group_scale_sizes_match_the_layout(q, scale_bytes_per_group, group, tmp_path):
    sizes = export_packed(qat_module(q), tmp_path)
    tensors, config = read_packed(tmp_path)
    weights = overhead = 0
    for name, meta in config["layers"].items():
        rows, cols = meta["rows"], meta["cols"]
        assert meta["group_size"] == group
        assert tensors[f"{name}.codes"].shape == (rows, cols // 2)  # two 4-bit codes per byte
        assert tensors[f"{name}.scale"].shape == (rows, cols // group)
        assert tensors[f"{name}.scale"].element_size() == scale_bytes_per_group
        weights += rows * cols
        overhead += 4 * 16 + (4 if q["grid"] in ("mxfp4", "nvfp4") else 0)  # code table, fp32 tensor scale
    assert sizes["quantized_linear_bytes"] == weights // 2 + weights // group * scale_bytes_per_group + overhead
    # MXFP4 4.25 and NVFP4 4.5 bits per weight as the formats specify (plus the table and tensor scale)
    assert sizes["quantized_linear_bits_per_weight"] == pytest.approx(4 + 8 * scale_bytes_per_group / group, abs=0.01)


def test_export_refuses_what_it_cannot_reproduce(tmp_path, monkeypatch):
    from quest_pl import packing

    module = qat_module(quant("gaussian_mse", 4, None, None))
    monkeypatch.setattr(packing, "odd_codes", lambda values, step: torch.round(values * 2 / step).long() + 2)
    with pytest.raises(RuntimeError, match="does not round-trip exactly"):
        export_packed(module, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_int_matmul_is_exact():
    g = torch.Generator().manual_seed(0)
    a = 2 * torch.randint(-128, 128, (5, 4096), generator=g) + 1  # odd codes up to 255 (8 bits)
    b = 2 * torch.randint(-128, 128, (7, 4096), generator=g) + 1
    assert torch.equal(int_matmul(a, b).long(), a @ b.T)  # int64 matmul on CPU as the reference


@pytest.mark.parametrize(
    "q",
    [quant("gaussian_mse", 4, 4, "half"), quant("gaussian_mse", 4, 4, "full"), quant("gaussian_mse", 2, 2, None),
     quant("int_sparse24", 4, 4, "half", a_grid="gaussian_mse"), quant("gaussian_mse", 4, 4, "half", estimator="lsq"),
     quant("uniform", 4, 4, None)],
    ids=case_id,
)  # fmt: skip
def test_integer_path_matches_fake_quantization(q, tmp_path):
    """Per layer: the integer path is the exact product of the dequantized operands (float64 reference), and the fake
    quantized fp32 layer is within fp32 matmul rounding of it."""
    module = qat_module(q)
    export_packed(module, tmp_path)
    model, _ = load_packed(tmp_path)
    assert set_int_path(model) == 4
    fake = dict(module.model.named_modules())
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(2))
    for name, layer in model.named_modules():
        if not isinstance(layer, PackedLinear):
            continue
        xin = x if layer.in_features == 128 else torch.randn(3, 5, layer.in_features)
        with torch.no_grad():
            y_int = layer(xin)
            y_fake = fake[name](xin)
            # exact reference: the dequantized activation (rotated basis) times the rotated-basis weight, in float64
            x32 = xin.float()
            if layer.hadamard:
                from quest_pl.quantizers import hadamard_transform

                x32 = hadamard_transform(x32)
            a = layer.act_quant(x32).double()
            _, codes, half_step = layer._decoded()
            w = (codes * half_step.reshape(-1, 1)).double()
            ref = a @ w.T
        assert torch.equal(y_int, ref.float()) or (y_int.double() - ref).abs().max() <= 1e-6 * ref.abs().max()
        bound = 2 * xin.shape[-1] * 2**-24 * (a.abs() @ w.abs().T).max()  # fp32 dot-product rounding bound
        assert (y_fake.double() - y_int.double()).abs().max() <= bound
        assert (y_fake - y_int).abs().max() > 0 or layer.hadamard != "full"  # the two are different computations


def test_full_model_integer_path_close_to_fake(tmp_path):
    module = qat_module(quant("gaussian_mse", 4, 4, "half"))
    export_packed(module, tmp_path)
    model, _ = load_packed(tmp_path)
    set_int_path(model)
    idx = tokens()
    with torch.no_grad():
        want, got = module.model(idx), model(idx)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "q",
    [quant("gaussian_mse", 4, 4, "half"), quant("fp4", 4, None, "full"),
     quant("nvfp4", 4, None, "half", scale_rule="four_over_six", hadamard_block=16)],
    ids=case_id,
)  # fmt: skip
def test_reload_on_cuda_float_and_integer_paths(q, tmp_path):
    """Bit-exactness is a CPU property (the CPU tests above): on CUDA the quantizer's row reductions and the GEMMs
    sum in another order, so a recomputed scale can differ in its last bit. What must hold on CUDA: the decoded
    weights are the same bits (decoding is an elementwise product), a weight-only model gives the CPU logits up to
    fp32 rounding, and the integer path equals the float path on the same device (the same activation codes)."""
    module = qat_module(q)
    export_packed(module, tmp_path)
    model, _ = load_packed(tmp_path)
    idx = tokens()
    with torch.no_grad():
        cpu_logits = model(idx)
        cpu_buffers = {k: v.clone() for k, v in model.named_buffers()}
        model = model.cuda()
        for k, v in model.named_buffers():
            assert torch.equal(v.cpu(), cpu_buffers[k]), k
        torch.backends.cuda.matmul.allow_tf32 = False
        got = model(idx.cuda())
        if q["a_bits"] is None:
            torch.testing.assert_close(got.cpu(), cpu_logits, rtol=1e-4, atol=1e-5)
        if set_int_path(model):
            torch.testing.assert_close(model(idx.cuda()), got, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "q",
    [
        None,
        quant("gaussian_mse", 4, None, "half"),
        quant("fp4", 4, None, "full"),
        quant("gaussian_mse", 2, 2, "half"),
        quant("gaussian_mse", 4, 4, "half", hadamard_block=32),
        quant("nvfp4", 4, None, "half", hadamard_block=16),
    ],
    ids=lambda q: "bf16" if q is None else case_id(q),
)
def test_hugging_face_export_gives_the_same_logits(q, tmp_path):
    import transformers  # the [hf] extra: scripts/setup.sh installs it, so this never skips

    from quest_pl.config import ConfigError
    from quest_pl.hub.llama import export_hf_dense as export_hf
    from quest_pl.quant import quant_layers

    module = qat_module(q)
    model = module.model
    drop = q is not None and q["a_bits"] is not None
    if drop:
        with pytest.raises(ConfigError, match="no exact full-precision equivalent"):
            export_hf(model, tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
    export_hf(model, tmp_path / "hf", drop_act_quant=drop)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    if drop:  # the weight-only equivalent: our model with its activation quantizers removed
        for layer in quant_layers(model).values():
            if layer.hadamard == "half":
                layer.weight.data = layer._quantize(layer.weight, layer.weight_quant, "weight").detach()
                layer.weight_quant = None
                from quest_pl.quantizers import hadamard_transform

                layer.weight.data = hadamard_transform(layer.weight.data, layer.hadamard_block)
            layer.act_quant = None
            layer.hadamard = None if layer.weight_quant is None else layer.hadamard
    idx = tokens()
    with torch.no_grad():
        want = model(idx)
        got = hf(idx).logits
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max())
