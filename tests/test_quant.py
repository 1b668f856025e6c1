"""QuantLinear wiring: which layers are quantized, Hadamard half == full, optimizer groups, config errors."""

import pytest
import torch
from torch import nn

from quest_pl import quantizers
from quest_pl.config import ConfigError
from quest_pl.model import Llama, LlamaConfig
from quest_pl.module import LMModule
from quest_pl.quant import QuantConfig, QuantLinear, quant_layers, quantize_model
from tests.conftest import compose

TINY = dict(vocab_size=300, n_layer=2, d_model=128, n_head=1, seq_len=16)


def quant_cfg(name: str, *overrides: str) -> QuantConfig:
    return QuantConfig.from_cfg(compose(f"quant={name}", *overrides).quant, LlamaConfig(**TINY))


def test_every_block_linear_is_quantized_and_nothing_else():
    model = quantize_model(Llama(LlamaConfig(**TINY)), quant_cfg("quest_w4a4"))
    names = sorted(quant_layers(model))
    expected = sorted(
        f"blocks.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.w12", "mlp.c_proj")
    )
    assert names == expected  # w12 = w1 and w2 stacked: their shared input is quantized once
    assert type(model.lm_head) is nn.Linear and isinstance(model.wte, nn.Embedding)
    layer = model.blocks[0].mlp.w12
    assert layer.weight_quant is not None and layer.act_quant is not None and layer.hadamard == "half"


def test_quantized_model_keeps_weights_and_changes_outputs():
    torch.manual_seed(0)
    ref = Llama(LlamaConfig(**TINY))
    model = Llama(LlamaConfig(**TINY))
    model.load_state_dict(ref.state_dict())
    quantize_model(model, quant_cfg("quest_w4a4"))
    assert torch.equal(model.blocks[0].attn.c_attn.weight, ref.blocks[0].attn.c_attn.weight)
    idx = torch.randint(0, 300, (2, 16))
    assert not torch.allclose(model(idx), ref(idx))
    for layer in quant_layers(model).values():
        layer.enabled = False
    assert torch.allclose(model(idx), ref(idx), atol=1e-6)


@pytest.mark.parametrize(("name", "bits"), [("quest_w4a4", 4), ("quest_w1a1", 1), ("fp4", 4)])
def test_hadamard_half_equals_full_with_both_operands_quantized(name, bits):
    torch.manual_seed(0)
    x = torch.randn(4, 7, 256, dtype=torch.float64, requires_grad=True)
    layers = {}
    for mode in ("half", "full"):
        cfg = quant_cfg(name, f"quant.hadamard_mode={mode}")
        layer = QuantLinear(256, 384, weight_quant=cfg.weight.build(), act_quant=cfg.act.build(), hadamard=mode)
        layer.double()
        layers[mode] = layer
    layers["full"].weight.data.copy_(layers["half"].weight.data)
    outs = {}
    for mode, layer in layers.items():
        xi = x.detach().clone().requires_grad_(True)
        y = layer(xi)
        y.pow(2).sum().backward()
        outs[mode] = (y.detach(), xi.grad, layer.weight.grad)
    for a, b in zip(outs["half"], outs["full"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_weight_only_half_is_a_reparametrisation():
    """Weight-only half form: y = x Q(W H)^T with no rotation of x (METHOD.md §1.8)."""
    cfg = quant_cfg("quest_w4a16")
    assert cfg.act is None
    layer = QuantLinear(128, 128, weight_quant=cfg.weight.build(), hadamard="half")
    x = torch.randn(3, 128)
    w_q = layer.weight_quant(quantizers.hadamard_transform(layer.weight))
    torch.testing.assert_close(layer(x), x @ w_q.T)


def test_lsq_parameters_get_their_own_optimizer_group():
    module = LMModule(TINY, dict(compose().optim, lr=1e-3), quant=dict(compose("quant=lsq_w4a4").quant))
    groups = {g["name"]: g for g in module.param_groups()}
    assert set(groups) == {"decay", "no_decay", "quantizer"}
    n_layers = len(quant_layers(module.model))
    assert len(groups["quantizer"]["params"]) == 2 * n_layers  # one step per weight and per activation quantizer
    assert groups["quantizer"]["weight_decay"] == 0.0
    decay_ids = {id(p) for p in groups["decay"]["params"]}
    assert id(module.model.lm_head.weight) in decay_ids and id(module.model.wte.weight) not in decay_ids


def test_smoke_trains_quest_and_bits_override_moves_both_operands():
    cfg = compose("experiment=smoke", "quant.bits=2").quant
    q = QuantConfig.from_cfg(cfg, LlamaConfig(**TINY))
    assert q.name == "quest_w4a4" or q.name.startswith("quest")
    assert q.weight.bits == 2 and q.act.bits == 2 and q.weight.estimator == "trust" and q.hadamard == "half"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["quant=quest_w4a4", "quant.grid=nf4"], "quant.grid='nf4': unknown grid; available:"),
        (["quant=quest_w4a4", "quant.estimator=foo"], "quant.estimator='foo': unknown estimator; available:"),
        (["quant=fp4", "quant.bits=3"], "quant.bits=3"),
        (["quant=quest_w4a4", "quant.bits=9"], "quant.bits=9"),
        (["quant=lloyd_max_w4a4", "quant.bits=5"], "quant.bits=5"),
        (["quant=quest_w4a4", "quant.hadamard_mode=sideways"], "quant.hadamard_mode='sideways'"),
        (["quant=quest_w4a4", "quant.kernel=cuda"], "quant.kernel='cuda'"),
    ],
)
def test_quant_config_errors_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        QuantConfig.from_cfg(compose(*overrides).quant, LlamaConfig(**TINY))
    assert needle in str(err.value)


def test_hadamard_needs_widths_multiple_of_128():
    with pytest.raises(ConfigError, match="128"):
        QuantConfig.from_cfg(compose("quant=quest_w4a4").quant, LlamaConfig(**dict(TINY, d_model=192)))
    # without the Hadamard any width is fine
    assert QuantConfig.from_cfg(compose("quant=trust_w4a4").quant, LlamaConfig(**dict(TINY, d_model=192)))


@pytest.mark.parametrize(("mode", "group"), [("half", "null"), ("full", "null"), ("half", 32)])
def test_triton_kernel_path_matches_pytorch_path(mode, group):
    """quant.kernel=triton runs the fused kernels (through Triton's interpreter on CPU) in place of H + estimator,
    per row and with group scales (quant.group_size)."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layers = {}
    for kernel in ("torch", "triton"):
        overrides = (f"quant.kernel={kernel}", f"quant.hadamard_mode={mode}", f"quant.group_size={group}")
        cfg = quant_cfg("quest_w4a4", *overrides)
        model = nn.Sequential(nn.Linear(128, 128, bias=False, device=device))
        model.blocks = [model]  # quantize_model walks model.blocks
        quantize_model(model, cfg)
        layers[kernel] = model[0]
    layers["triton"].weight.data.copy_(layers["torch"].weight.data)
    assert layers["triton"].kernel_args["weight"] is not None and layers["torch"].kernel_args["weight"] is None
    assert layers["triton"].kernel_args["act"]["group_size"] == (None if group == "null" else group)
    x = torch.randn(5, 128, device=device)
    results = {}
    for kernel, layer in layers.items():
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.pow(2).sum().backward()
        results[kernel] = (y.detach(), xi.grad, layer.weight.grad)
    for a, b in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # values agree to ~2 fp32 ulps (kernels docs)


def test_disabled_weight_only_half_layer_keeps_the_rotation():
    """Quantizers replaced by the identity: a weight-only half layer computes x (W H)^T, not x W^T."""
    cfg = quant_cfg("quest_w4a16")
    layer = QuantLinear(128, 64, weight_quant=cfg.weight.build(), hadamard="half")
    layer.enabled = False
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), x @ quantizers.hadamard_transform(layer.weight).T)


def test_triton_kernel_with_a_full_precision_operand():
    cfg = quant_cfg("quest_w4a16", "quant.kernel=triton")
    assert cfg.act is None and cfg.weight.grid == "gaussian_mse"
