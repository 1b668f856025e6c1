"""quest_pl.quantize_ on any nn.Module: nn.Sequential, the project's Llama, a Hugging Face Llama; QuantConfig in plain
Python; the default filter (every linear but the output head); gradients reach every quantized weight."""

import pytest
import torch
from torch import nn

import quest_pl
from quest_pl.config import ConfigError
from quest_pl.model import Llama, LlamaConfig
from quest_pl.quant import OperandSpec, QuantConfig, QuantLinear, quant_layers, quantize_, quantize_model
from tests.conftest import compose

TINY = dict(vocab_size=300, n_layer=2, d_model=128, n_head=1, seq_len=16)


def train_and_check_gradients(model: nn.Module, batch, loss_fn, steps: int = 4) -> list[float]:
    """A few AdamW steps; after each backward every quantized layer's weight has a finite, non-zero gradient."""
    layers = quant_layers(model)
    assert layers
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        for name, layer in layers.items():
            grad = layer.weight.grad
            assert grad is not None, name
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    return losses


def test_top_level_exports_are_the_quant_module_objects():
    assert quest_pl.quantize_ is quantize_ and quest_pl.QuantConfig is QuantConfig


def test_quest_constructor_matches_the_hydra_group():
    for bits, group in ((4, "quest_w4a4"), (2, "quest_w2a2"), (1, "quest_w1a1")):
        hydra = QuantConfig.from_cfg(compose(f"quant={group}").quant, None)
        assert QuantConfig.quest(bits=bits) == hydra
    assert QuantConfig.quest(bits=4, a_bits=None) == QuantConfig.from_cfg(compose("quant=quest_w4a16").quant, None)
    assert QuantConfig.make(grid="fp4", bits=4, hadamard=True, name="fp4") == QuantConfig.from_cfg(
        compose("quant=fp4").quant, None
    )


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: QuantConfig.make(grid="gaussian_mse", bits=4, bitz=3), "QuantConfig.make(bitz=...): unknown option"),
        (lambda: QuantConfig.make(grid="nf4", bits=4), "grid='nf4'): unknown grid"),
        (lambda: QuantConfig.make(grid="gaussian_mse"), "nothing to quantize"),
        (lambda: QuantConfig.quest(bits=9), "quant.bits=9"),
        (lambda: QuantConfig.quest(bits=4, estimator="foo"), "unknown estimator"),
        (lambda: QuantConfig(name="q", weight=None, act=None, hadamard="sideways"), "hadamard='sideways'"),
        (lambda: QuantConfig("q", OperandSpec("gaussian_mse", 4, "foo"), None, None), "unknown estimator"),
        (lambda: QuantConfig("q", OperandSpec("fp4", 3, "trust"), None, None), "bits=3"),
    ],
)
def test_python_config_errors_are_one_line_config_errors(make, needle):
    with pytest.raises(ConfigError) as err:
        make()
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_sequential_all_linears_but_the_last_and_training_reaches_every_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 10))
    assert quantize_(model, QuantConfig.quest(bits=4)) is model
    assert sorted(quant_layers(model)) == ["0", "2"]
    assert type(model[4]) is nn.Linear  # the output head stays in full precision
    assert model[0].bias is not None and model[0].hadamard == "half"
    x, y = torch.randn(32, 128), torch.randint(0, 10, (32,))
    losses = train_and_check_gradients(model, (x, y), lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    assert losses[-1] < losses[0]


def test_filter_fn_chooses_the_layers_and_keeps_the_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))
    w = model[2].weight
    quantize_(model, QuantConfig.quest(bits=4), filter_fn=lambda module, name: name == "2")
    assert sorted(quant_layers(model)) == ["2"] and model[2].weight is w


def test_hadamard_width_not_multiple_of_128_is_a_one_line_error_before_any_swap():
    model = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 4))
    with pytest.raises(ConfigError) as err:
        quantize_(model, QuantConfig.quest(bits=4))
    msg = str(err.value)
    assert "layer 2 has in_features = 96" in msg and "multiple of 128" in msg and "\n" not in msg
    assert not quant_layers(model)  # nothing was swapped
    quantize_(model, QuantConfig.quest(bits=4, hadamard=False))  # without the Hadamard any width is fine
    assert sorted(quant_layers(model)) == ["0", "2"]


def test_multihead_attention_out_proj_is_never_swapped():
    """nn.MultiheadAttention reads out_proj.weight directly: swapping it would silently quantize nothing."""
    model = nn.Sequential(nn.Linear(128, 128), nn.MultiheadAttention(128, 2, batch_first=True))
    quantize_(model, QuantConfig.quest(bits=4), filter_fn=lambda module, name: True)
    assert sorted(quant_layers(model)) == ["0"]


def test_project_llama_default_filter_equals_quantize_model():
    cfg = QuantConfig.quest(bits=4)
    by_filter = quantize_(Llama(LlamaConfig(**TINY)), cfg)
    by_blocks = quantize_model(Llama(LlamaConfig(**TINY)), cfg)
    assert sorted(quant_layers(by_filter)) == sorted(quant_layers(by_blocks))
    assert type(by_filter.lm_head) is nn.Linear
    torch.manual_seed(0)
    idx = torch.randint(0, TINY["vocab_size"], (4, TINY["seq_len"] + 1))

    def loss_fn(m, b):
        logits = m(b[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))

    losses = train_and_check_gradients(by_filter, idx, loss_fn)
    assert losses[-1] < losses[0]


def test_a_linear_tied_to_an_embedding_is_the_head():
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 128)
            self.mix = nn.Linear(128, 128)
            self.unembed = nn.Linear(128, 50, bias=False)
            self.unembed.weight = self.embed.weight

    model = quantize_(TinyLM(), QuantConfig.quest(bits=4))
    assert sorted(quant_layers(model)) == ["mix"] and model.unembed.weight is model.embed.weight


def test_hugging_face_llama():
    import transformers  # the [hf] extra: scripts/setup.sh installs it, so this never skips

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config)
    quantize_(model, QuantConfig.quest(bits=4))
    names = sorted(quant_layers(model))
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    projections += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert names == sorted(f"model.layers.{i}.{p}" for i in range(2) for p in projections)
    assert type(model.lm_head) is nn.Linear
    idx = torch.randint(0, 256, (2, 16))
    losses = train_and_check_gradients(model, idx, lambda m, b: m(input_ids=b, labels=b).loss, steps=3)
    assert losses[-1] < losses[0]


def test_quantized_layers_are_quantlinear_with_their_own_estimators():
    model = quantize_(nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128), nn.Linear(128, 2)), QuantConfig.quest())
    a, b = model[0], model[1]
    assert isinstance(a, QuantLinear) and a.weight_quant is not b.weight_quant and a.act_quant is not b.act_quant
    assert quantize_(model, None) is model


# -- quantize_ refuses what would silently do nothing, and changes nothing when it refuses --------------------------
def _snapshot(model: nn.Module) -> list[tuple[str, type, int]]:
    return [(n, type(m), id(m)) for n, m in model.named_modules()]


class Conv1D(nn.Module):
    """GPT-2's projection (transformers.pytorch_utils.Conv1D): a linear map with a transposed weight, not nn.Linear."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)


def test_quantizing_twice_is_refused_and_keeps_the_first_layers():
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.Linear(128, 4))
    quantize_(model, QuantConfig.quest(bits=4))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"already quantized \(2 QuantLinear layers, e\.g\. 0\)"):
        quantize_(model, QuantConfig.quest(bits=2))
    assert _snapshot(model) == before
    with pytest.raises(ValueError, match="already quantized"):  # a QuantLinear anywhere, whatever the filter chooses
        quantize_(model, QuantConfig.quest(bits=2), filter_fn=lambda module, name: name == "3")


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        (
            nn.Sequential(Conv1D(128, 128), nn.GELU(), Conv1D(128, 128)),
            "no nn.Linear layer (layers with weights: Conv1D)",
        ),
        (nn.Sequential(nn.LayerNorm(8), nn.ReLU()), "no nn.Linear layer (layers with weights: LayerNorm)"),
        (nn.Sequential(nn.Linear(128, 4)), "filter_fn chose none of its 1 nn.Linear layers"),  # the head alone
    ],
)
def test_nothing_to_quantize_is_refused(model, needle):
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"quantize_: nothing to quantize in Sequential") as err:
        quantize_(model, QuantConfig.quest(bits=4))
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert _snapshot(model) == before


def test_a_group_size_that_does_not_divide_a_layer_is_refused_before_any_swap():
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 64), nn.Linear(64, 2))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"layer 2 has in_features = 48, not a multiple of the group size 32"):
        quantize_(model, QuantConfig.make(grid="uniform", bits=4, group_size=32))
    assert _snapshot(model) == before


def test_a_failure_while_building_changes_nothing(monkeypatch):
    """Every replacement is built before the first swap: a failure on the second layer leaves the first alone."""
    from quest_pl.quant import swap as quant

    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128), nn.Linear(128, 2))
    before, real, built = _snapshot(model), quant._quant_linear, []

    def fail_on_second(config, module):
        built.append(module)
        if len(built) == 2:
            raise RuntimeError("out of memory")
        return real(config, module)

    monkeypatch.setattr(quant, "_quant_linear", fail_on_second)
    with pytest.raises(RuntimeError):
        quantize_(model, QuantConfig.quest(bits=4))
    assert _snapshot(model) == before
