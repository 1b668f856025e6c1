"""Where people use models (quest_pl.hub): a converted transformers model saves with save_pretrained and loads with
AutoModelForCausalLM.from_pretrained after `import quest_pl` (the quantization method registers itself when
transformers loads, or at once when it is loaded) with the same logits to the last bit; the project's Llama exports to
the same layout; MXFP4/NVFP4 models export as compressed-tensors checkpoints that compressed-tensors' own
decompressor decodes to our weights."""

import json
import subprocess
import sys

import pytest
import torch
import transformers  # the [hf] extra (with compressed-tensors): scripts/setup.sh installs it, nothing skips

from quest_pl.convert import PackedLinear, convert_
from quest_pl.quant import QuantConfig
from quest_pl.saving import save_quantized
from tests.test_lifecycle import D, hf_config, project_llama, qat, tokens

W4A4 = QuantConfig.make(grid="gaussian_mse", bits=4, estimator="trust", hadamard=True, hadamard_block=32)


def hf_qat(config=W4A4):
    return qat(lambda: transformers.LlamaForCausalLM(hf_config()), tokens(), config)


def test_save_pretrained_then_from_pretrained_gives_the_same_logits(tmp_path):
    model = hf_qat()
    idx = tokens()
    with torch.no_grad():
        want = model(idx).logits
    convert_(model)
    model.save_pretrained(tmp_path / "hf")
    quant_config = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert quant_config["quant_method"] == "quest_pl" and len(quant_config["layers"]) == 14
    save_quantized(model, tmp_path / "saved")  # the same layout, with the digest
    for directory in ("hf", "saved"):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / directory).eval()
        q_proj = loaded.model.layers[1].self_attn.q_proj
        assert isinstance(q_proj, PackedLinear) and q_proj.hadamard == "half" and q_proj.act_quant is not None
        assert q_proj.codes.dtype == torch.uint8 and q_proj.scale.dtype == torch.float32
        with torch.no_grad():
            assert torch.equal(loaded(idx).logits, want), directory


def test_from_pretrained_keeps_the_packed_tensors_in_their_dtype_and_refuses_a_damaged_one(tmp_path):
    model = convert_(hf_qat())
    save_quantized(model, tmp_path / "saved")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    layer = loaded.model.layers[0].mlp.down_proj
    assert layer.scale.dtype == torch.float32 and layer.table.dtype == torch.float32  # fp32 quantizer arithmetic
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16  # the rest of the model as asked
    with torch.no_grad():
        assert loaded(tokens()).logits.dtype == torch.bfloat16
    assert torch.equal(layer.scale, model.model.layers[0].mlp.down_proj.scale)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "saved" / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.scale"][3] = float("inf")
    save_file(tensors, tmp_path / "saved" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"down_proj\.scale holds NaN or infinite"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")


REGISTERS = """
import sys
import quest_pl
import torch
from quest_pl.convert import PackedLinear
assert "transformers" not in sys.modules
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert isinstance(model.model.layers[0].self_attn.o_proj, PackedLinear)
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def test_import_quest_pl_before_transformers_registers_when_transformers_loads(tmp_path):
    model = convert_(hf_qat())
    save_quantized(model, tmp_path / "saved")
    idx = tokens()
    torch.save(idx, tmp_path / "idx.pt")
    args = [sys.executable, "-c", REGISTERS, str(tmp_path / "saved"), str(tmp_path / "idx.pt"), str(tmp_path / "y.pt")]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), model(idx).logits)


def test_transformers_loaded_first_registers_at_once(monkeypatch):
    from transformers.quantizers import auto

    from quest_pl.hub import register_on_import

    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "quest_pl", raising=False)
    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, "quest_pl", raising=False)
    register_on_import()  # what `import quest_pl` runs; transformers' registry is already loaded here
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["quest_pl"].__name__ == "QuestPLConfig"
    assert auto.AUTO_QUANTIZER_MAPPING["quest_pl"].__name__ == "QuestPLHfQuantizer"


def test_import_quest_pl_stays_cheap():
    code = "import sys, quest_pl; print(sorted(m for m in ('torch', 'transformers', 'lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_project_llama_exports_to_the_same_layout(tmp_path):
    """Every projection of the exported model computes, output for output, what the fused layer computed (q/k/v and
    gate/up split by rows, q and k reordered for transformers' RoPE); the logits agree up to the two attention
    implementations' fp32 rounding."""
    from quest_pl.hub.llama import export_hf, rope_rows

    model = qat(project_llama, tokens(), W4A4)
    export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.quantization_config.quant_method == "quest_pl"
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3))
    fused = convert_(model)
    with torch.no_grad():
        for i, block in enumerate(fused.blocks):
            layer = hf.model.layers[i]
            qkv, w12 = block.attn.c_attn(x), block.mlp.w12(x)
            rope = rope_rows(2, D // 2)
            assert torch.equal(layer.self_attn.q_proj(x), qkv[..., rope])
            assert torch.equal(layer.self_attn.k_proj(x), qkv[..., D + rope])
            assert torch.equal(layer.self_attn.v_proj(x), qkv[..., 2 * D :])
            h = fused.cfg.ffn_hidden
            assert torch.equal(layer.mlp.gate_proj(x), w12[..., :h])
            assert torch.equal(layer.mlp.up_proj(x), w12[..., h:])
            assert torch.equal(layer.self_attn.o_proj(x), block.attn.c_proj(x))
        idx = tokens()
        want, got = fused(idx), hf(idx).logits
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()


# -- compressed-tensors ---------------------------------------------------------------------------------------------
def block_fp4(grid, **kw):
    block = 32 if grid == "mxfp4" else 16
    return QuantConfig.make(grid=grid, bits=4, estimator="trust", hadamard=True, hadamard_block=block, **kw)


@pytest.mark.parametrize(
    "config",
    [block_fp4("mxfp4", scale_rule="absmax"), block_fp4("mxfp4", scale_rule="gaussian", a_bits=None),
     block_fp4("nvfp4", scale_rule="absmax"), block_fp4("nvfp4", scale_rule="four_over_six", a_bits=None)],
    ids=["mxfp4-w4a4", "mxfp4-w4a16", "nvfp4-w4a4", "nvfp4-w4a16"],
)  # fmt: skip
def test_compressed_tensors_checkpoint_decodes_to_our_weights(config, tmp_path):
    from quest_pl.hub.compressed import decoded_weights, export_compressed_tensors, quest_weights

    model = hf_qat(config)
    report = export_compressed_tensors(model, tmp_path / "ct")
    ours = quest_weights(convert_(model))
    theirs = decoded_weights(tmp_path / "ct")  # compressed-tensors' own config parser and decompressor
    assert sorted(theirs) == sorted(ours) and len(ours) == 14
    quant_config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert quant_config["quant_method"] == "compressed-tensors"
    scheme = quant_config["config_groups"]["group_0"]
    assert (scheme["input_activations"] is not None) == (config.act is not None) == report["activations"]
    rotated = quant_config["transform_config"]["config_groups"]["quest_hadamard"] if report["hadamard_layers"] else None
    if config.act is not None:  # the half form rotates the input online: declared, with the block
        assert rotated["type"] == "hadamard" and rotated["head_dim"] == config.hadamard_block
        assert rotated["apply"][0]["location"] == "input" and len(rotated["apply"][0]["targets"]) == 14
    else:  # half-form weight-only: the weights are stored rotated and the input is not rotated
        assert rotated is None
    for name, w in ours.items():
        if config.weight.grid == "mxfp4":  # E2M1 x 2^k is a bf16 value: the very same numbers
            assert torch.equal(theirs[name].float(), w), name
        elif report["scale_exact"]:  # NVFP4 decodes to bf16: the bf16 rounding of our fp32 weight, exactly
            assert torch.equal(theirs[name], w.to(theirs[name].dtype)), name
        else:  # one fp32 ulp on the unit, then bf16 rounding
            assert (theirs[name].float() - w).abs().max() <= 2**-8 * w.abs().max(), name


def test_compressed_tensors_hadamard_is_ours():
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    from quest_pl.quantizers import hadamard_transform

    for block in (16, 32, 128):
        theirs = deterministic_hadamard_matrix(block, dtype=torch.float64) / block**0.5
        assert torch.allclose(hadamard_transform(torch.eye(block, dtype=torch.float64), block), theirs, atol=1e-15)


def test_compressed_tensors_refuses_what_no_standard_format_holds_exactly(tmp_path):
    from quest_pl.hub.compressed import export_compressed_tensors

    with pytest.raises(ValueError, match=r"no standard format represents it exactly \(the centered INT grid"):
        export_compressed_tensors(hf_qat(W4A4), tmp_path / "int4")
    lloyd = QuantConfig.make(grid="lloyd_max", bits=4, estimator="trust", a_bits=None)
    with pytest.raises(ValueError, match="not evenly spaced"):
        export_compressed_tensors(hf_qat(lloyd), tmp_path / "lloyd")
    four_six = block_fp4("nvfp4", scale_rule="four_over_six")
    with pytest.raises(ValueError, match=r"scale rule four_over_six.*drop_act_quant=True"):
        export_compressed_tensors(hf_qat(four_six), tmp_path / "act")
    assert not any(tmp_path.iterdir())  # refused before anything was written
    report = export_compressed_tensors(hf_qat(four_six), tmp_path / "weights", drop_act_quant=True)
    assert report["activations"] is False


def test_transformers_loads_the_compressed_tensors_checkpoint(tmp_path):
    from quest_pl.hub.compressed import export_compressed_tensors

    model = hf_qat(QuantConfig.make(grid="mxfp4", bits=4, a_bits=None, estimator="trust", scale_rule="absmax"))
    export_compressed_tensors(model, tmp_path / "ct")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.bfloat16).eval()
    idx = tokens()
    with torch.no_grad():
        want, got = model(idx).logits, loaded(idx).logits.float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()  # bf16 activations against our fp32 model


def test_readme_example_runs_and_reloads_to_the_same_logits(tmp_path, monkeypatch):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### QAT your own Hugging Face model, save it, load it", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len([line for line in code.splitlines() if line.strip()]) <= 12
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    model, again = namespace["model"], namespace["again"]
    assert isinstance(again.model.layers[0].self_attn.q_proj, PackedLinear)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
