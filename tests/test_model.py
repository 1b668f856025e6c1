import math

import pytest
import torch

from quest_pl.model import Llama, LlamaConfig, apply_rope, rope_angles

# METHOD.md §3 model-size table: (layers, d, heads, ffn h, non-embedding parameters)
SPEC_SIZES = {
    "llama_30m": (6, 640, 5, 1792, 30_482_560),
    "llama_50m": (7, 768, 6, 2048, 49_556_736),
    "llama_100m": (8, 1024, 8, 2816, 102_777_856),
    "llama_200m": (10, 1280, 10, 3584, 203_188_480),
    "llama_430m": (13, 1664, 13, 4608, 443_068_288),
    "llama_800m": (16, 2048, 16, 5632, 822_151_168),
}


@pytest.mark.parametrize("preset", sorted(SPEC_SIZES))
def test_presets_match_spec_parameter_counts(preset):
    from tests.conftest import compose

    layers, d, heads, ffn, params = SPEC_SIZES[preset]
    m = compose(f"model={preset}").model
    assert (m.n_layer, m.d_model, m.n_head) == (layers, d, heads)
    cfg = LlamaConfig(vocab_size=50304, n_layer=m.n_layer, d_model=m.d_model, n_head=m.n_head, seq_len=m.seq_len)
    assert cfg.ffn_hidden == ffn and cfg.head_dim == 128
    with torch.device("meta"):
        model = Llama(cfg)
    assert model.non_embedding_params() == params


def test_forward_shape_and_untied_head():
    model = Llama(LlamaConfig(vocab_size=300, n_layer=2, d_model=128, n_head=2, seq_len=16))
    logits = model(torch.randint(0, 300, (3, 16)))
    assert logits.shape == (3, 16, 300)
    assert model.lm_head.weight.data_ptr() != model.wte.weight.data_ptr()


def test_initialisation_follows_method():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, n_layer=4, d_model=256, n_head=2, seq_len=16)
    model = Llama(cfg)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.blocks[0].mlp.w12.weight.std().item() == pytest.approx(0.02, rel=0.02)
    scaled = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert model.blocks[1].attn.c_proj.weight.std().item() == pytest.approx(scaled, rel=0.03)
    assert model.blocks[1].mlp.c_proj.weight.std().item() == pytest.approx(scaled, rel=0.03)
    assert torch.equal(model.blocks[0].attn_norm.weight, torch.ones(256))


def test_rope_rotates_interleaved_pairs_and_is_relative():
    hd, seq = 8, 5
    angles = rope_angles(seq, hd, 1e4)
    assert angles[1, 0].item() == pytest.approx(1.0) and angles[1, 1].item() == pytest.approx(1e4 ** (-2 / 8))
    cos, sin = angles.cos(), angles.sin()
    x = torch.zeros(seq, hd)
    x[:, 0] = 1.0  # a unit vector in pair 0 (components 0 and 1: interleaved, not rotate_half)
    y = apply_rope(x, cos, sin)
    assert torch.allclose(y[:, 0], torch.cos(angles[:, 0])) and torch.allclose(y[:, 1], torch.sin(angles[:, 0]))
    q, k = torch.randn(hd), torch.randn(hd)
    qs, ks = apply_rope(q.expand(seq, hd), cos, sin), apply_rope(k.expand(seq, hd), cos, sin)
    # <R_m q, R_n k> depends on m - n only
    assert torch.allclose(qs[3] @ ks[1], qs[4] @ ks[2], atol=1e-5)


def test_causal():
    model = Llama(LlamaConfig(vocab_size=300, n_layer=1, d_model=128, n_head=1, seq_len=8))
    idx = torch.randint(0, 300, (1, 8))
    a = model(idx)
    idx2 = idx.clone()
    idx2[0, -1] = (idx[0, -1] + 1) % 300
    assert torch.allclose(model(idx2)[0, :-1], a[0, :-1], atol=1e-6)


def test_lr_schedule_is_one_cycle_lr_of_the_paper():
    """METHOD.md §3: torch OneCycleLR(div_factor=100, final_div_factor=0.1, pct_start=floor(T/10)/T, cosine)."""
    from quest_pl.module import warmup_cosine

    total, lr = 200, 1e-3
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=total, pct_start=(total // 10) / total, div_factor=100, final_div_factor=0.1,
        anneal_strategy="cos", cycle_momentum=False,
    )  # fmt: skip
    for step in range(total):
        assert warmup_cosine(step, total) * lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()
    assert warmup_cosine(total - 1, total) == pytest.approx(0.1)
