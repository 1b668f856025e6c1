"""The project's Llama as a ``transformers`` ``LlamaForCausalLM``: packed (:func:`export_hf`, the quantizers kept,
loaded by ``AutoModelForCausalLM.from_pretrained`` after ``import quest_pl``) or dense (:func:`export_hf_dense`, fp32
dequantized weights, loaded without quest_pl; exact for weight-only models).

The layouts differ in two places: our attention holds q, k, v in one ``c_attn`` and the MLP gate and up in one
``w12``, and our RoPE rotates interleaved pairs where ``transformers`` rotates half-split ones (METHOD.md §2). A packed
layer splits by rows exactly (codes, scales and indices are per row; a row's group scales stay with it), and the RoPE
reordering is a row permutation of q and k, so every projection of the exported model computes, output for output,
what the fused layer computed; the same activation quantizer state serves q, k and v (they quantize the same input).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from quest_pl import quantizers
from quest_pl.config import ConfigError
from quest_pl.convert import PackedLinear, convert_, replace_module


def check_hf_available(key: str) -> None:
    """A one-line error when ``transformers`` (the ``[hf]`` extra) is missing."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError(f"{key}: needs transformers (pip install 'quest-pl[hf]')") from None


def check_dense_exportable(model: nn.Module, drop_act_quant: bool) -> None:
    """Refuse, before any work, a dense export of a model with quantized activations unless ``drop_act_quant``."""
    from quest_pl.quant import quant_layers

    with_act = [layer for layer in quant_layers(model).values() if layer.act_quant is not None]
    if with_act and not drop_act_quant:
        effective_weight(with_act[0])  # raises the error that names the options


def effective_weight(layer: nn.Module, drop_act_quant: bool = False) -> Tensor:
    """The fp32 matrix ``W`` with ``layer(x) = x W^T`` for a linear whose activation is not quantized: the dequantized
    weight with the Hadamard folded in. Weight-only layers fold exactly in both forms (half: ``x Qw(W H)^T``; full:
    ``x (Qw(W H) H)^T``). With quantized activations no fold is exact (``Qa`` is not linear): refused unless
    ``drop_act_quant``, which gives the weight-only equivalent (``Qa`` replaced by the identity: ``Qw(W H) H`` in the
    half form, the full form's ``Qw(W H) H`` as is)."""
    from quest_pl.quant import QuantLinear

    with torch.no_grad():
        if isinstance(layer, QuantLinear):
            w = layer._quantize(layer.weight, layer.weight_quant, "weight").float()
            act, hadamard, block = layer.act_quant, layer.hadamard, layer.hadamard_block
        elif isinstance(layer, PackedLinear):
            w, act = layer.dequantized_weight().float(), layer.act_quant
            hadamard, block = layer.hadamard, layer.hadamard_block
        else:
            return layer.weight.detach().float()
        if act is None:
            return w
        if not drop_act_quant:
            raise ConfigError(
                "a model with quantized activations has no exact full-precision equivalent (Qa is not linear); "
                "export it with --hf (packed, quantizers kept) or --hf-dense --hf-drop-act-quant (weights only: "
                "activations in full precision)"
            )
        return quantizers.hadamard_transform(w, block) if hadamard == "half" else w


def _rope_halves(w: Tensor, n_head: int) -> Tensor:
    """Rows of a q or k projection reordered per head from our interleaved RoPE pairs (2i, 2i+1) (METHOD.md §2) to
    the half-split pairs (i, i + hd/2) of ``transformers``' ``rotate_half``; q.k is unchanged (same order on both)."""
    hd = w.shape[0] // n_head
    perm = torch.cat((torch.arange(0, hd, 2), torch.arange(1, hd, 2)))
    return w.reshape(n_head, hd, -1)[:, perm].reshape(w.shape)


@torch.no_grad()
def hf_state_dict(model: nn.Module, drop_act_quant: bool = False) -> dict[str, Tensor]:
    """``LlamaForCausalLM`` tensors (fp32) of our Llama: c_attn split into q/k/v (q, k reordered for RoPE), w12 split
    into gate/up, effective weights of quantized linears (:func:`effective_weight`), untied head."""
    cfg = model.cfg
    out = {
        "model.embed_tokens.weight": model.wte.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = effective_weight(block.attn.c_attn, drop_act_quant).chunk(3, dim=0)
        gate, up = effective_weight(block.mlp.w12, drop_act_quant).chunk(2, dim=0)
        out |= {
            p + "input_layernorm.weight": block.attn_norm.weight,
            p + "post_attention_layernorm.weight": block.mlp_norm.weight,
            p + "self_attn.q_proj.weight": _rope_halves(q, cfg.n_head),
            p + "self_attn.k_proj.weight": _rope_halves(k, cfg.n_head),
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": effective_weight(block.attn.c_proj, drop_act_quant),
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": effective_weight(block.mlp.c_proj, drop_act_quant),
        }
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def export_hf_dense(
    model: nn.Module, out_dir: str | Path, tokenizer: str | Path | None = None, drop_act_quant: bool = False
) -> Path:
    """Write a ``transformers`` ``LlamaForCausalLM`` directory (``from_pretrained``-loadable, fp32) equivalent to
    ``model`` (see :func:`hf_state_dict`), with the tokenizer when given. Needs the ``[hf]`` extra."""
    check_hf_available("--hf")
    import transformers

    state = hf_state_dict(model, drop_act_quant)
    hf = transformers.LlamaForCausalLM(hf_config(model.cfg, tokenizer)).float()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"HF export: tensors do not match LlamaForCausalLM ({missing[:2]}, {unexpected[:2]})")
    out_dir = Path(out_dir)
    hf.save_pretrained(out_dir)
    save_hf_tokenizer(tokenizer, out_dir)
    return out_dir


def hf_config(cfg, tokenizer: str | Path | None = None):
    """The ``transformers.LlamaConfig`` of the project's ``LlamaConfig`` (end-of-text as BOS/EOS with a tokenizer)."""
    import transformers

    from quest_pl.data import EOS

    eos_id = None
    if tokenizer:
        from tokenizers import Tokenizer

        eos_id = Tokenizer.from_file(str(tokenizer)).token_to_id(EOS)
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        dtype="float32",
    )


def save_hf_tokenizer(tokenizer: str | Path | None, out_dir: Path) -> None:
    if tokenizer:
        import transformers

        from quest_pl.data import EOS

        fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer), eos_token=EOS, bos_token=EOS)
        fast.save_pretrained(out_dir)


def rope_rows(n_head: int, head_dim: int) -> Tensor:
    """The row order of :func:`_rope_halves` as indices (per head: even rows, then odd rows)."""
    perm = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    return (torch.arange(n_head).unsqueeze(1) * head_dim + perm).flatten()


def take_rows(layer: nn.Module, rows: Tensor) -> nn.Module:
    """The linear computing outputs ``rows`` of ``layer`` (exact: packed codes, scales and indices are per row; the
    code table and the tensor scale are shared; the activation quantizer is copied with its state)."""
    if not isinstance(layer, PackedLinear):
        out = nn.Linear(layer.in_features, len(rows), bias=layer.bias is not None)
        out.weight.data = layer.weight.detach()[rows].clone()
        if layer.bias is not None:
            out.bias.data = layer.bias.detach()[rows].clone()
        return out
    shared = ("table", "tensor_scale")
    tensors = {k: t.clone() if k in shared else t[rows].clone() for k, t in layer.packed_tensors().items()}
    bias = None if layer.bias is None else layer.bias[rows].clone()
    return PackedLinear(layer.meta | {"rows": len(rows)}, tensors, copy.deepcopy(layer.act_quant), bias)


@torch.no_grad()
def hf_packed_model(model: nn.Module, tokenizer: str | Path | None = None) -> nn.Module:
    """A ``transformers`` ``LlamaForCausalLM`` holding the converted layers of our QAT ``Llama`` (q/k/v and gate/up
    split by rows, q and k reordered for RoPE; see the module docstring), with its ``quantization_config``."""
    import transformers

    from quest_pl.convert import QUANT_METHOD, layer_table

    check_hf_available("export_hf")
    cfg = model.cfg
    packed = convert_(copy.deepcopy(model).cpu())
    hf = transformers.LlamaForCausalLM(hf_config(cfg, tokenizer)).float()
    own = {
        "model.embed_tokens.weight": packed.wte.weight,
        "model.norm.weight": packed.norm.weight,
        "lm_head.weight": packed.lm_head.weight,
    }
    d, h, hd = cfg.d_model, cfg.ffn_hidden, cfg.d_model // cfg.n_head
    rope = rope_rows(cfg.n_head, hd)
    for i, block in enumerate(packed.blocks):
        p = f"model.layers.{i}."
        own |= {p + "input_layernorm.weight": block.attn_norm.weight, p + "post_attention_layernorm.weight":
                block.mlp_norm.weight}  # fmt: skip
        c_attn, w12 = block.attn.c_attn, block.mlp.w12
        layers = {
            "self_attn.q_proj": take_rows(c_attn, rope),
            "self_attn.k_proj": take_rows(c_attn, d + rope),
            "self_attn.v_proj": take_rows(c_attn, torch.arange(2 * d, 3 * d)),
            "self_attn.o_proj": block.attn.c_proj,
            "mlp.gate_proj": take_rows(w12, torch.arange(h)),
            "mlp.up_proj": take_rows(w12, torch.arange(h, 2 * h)),
            "mlp.down_proj": block.mlp.c_proj,
        }
        for name, layer in layers.items():
            replace_module(hf, p + name, layer)
    for name, t in own.items():
        hf.get_parameter(name).copy_(t)
    hf.config.quantization_config = {"quant_method": QUANT_METHOD} | layer_table(hf)
    return hf.eval()


def export_hf(model: nn.Module, out_dir: str | Path, tokenizer: str | Path | None = None, overwrite: bool = False):
    """Write our QAT ``Llama`` as a packed ``LlamaForCausalLM`` directory (:func:`hf_packed_model`, saved with
    ``quest_pl.save_quantized``), with the tokenizer when given; ``AutoModelForCausalLM.from_pretrained`` loads it
    after ``import quest_pl``."""
    import tempfile

    from quest_pl.saving import save_quantized

    files = {}
    if tokenizer:
        with tempfile.TemporaryDirectory() as tmp:
            save_hf_tokenizer(tokenizer, Path(tmp))
            files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    return save_quantized(hf_packed_model(model, tokenizer), Path(out_dir), overwrite=overwrite, files=files)


def is_packed_hf_dir(path: Path) -> bool:
    """Whether ``path`` holds a packed ``LlamaForCausalLM`` export (what ``--hf`` may replace)."""
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get("quantization_config") or {}).get("quant_method") == "quest_pl"
