"""The Llama of METHOD.md §2, as a plain ``nn.Module`` that knows nothing of Lightning or quantization.

Pre-norm blocks ``x + Attn(RMSNorm(x))``, ``x + MLP(RMSNorm(x))``; interleaved RoPE (GPT-J convention); SwiGLU MLP with
``h = multiple_of * ceil(int(8 d / 3) / multiple_of)``; untied head. Quantization is swapped in from outside
(``quest_pl.quant.quantize_model``), which replaces the ``nn.Linear`` layers of every block.

The MLP keeps its two input projections ``w1`` (gate) and ``w2`` (up) as one fused ``w12`` linear: they read the same
input, so one GEMM computes both and a quantized model quantizes that shared activation once (METHOD.md
§7.17). Parameter counts, per-row weight scales and initialisation are those of two separate linears.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LlamaConfig:
    vocab_size: int = 8192
    n_layer: int = 2
    d_model: int = 128
    n_head: int = 1
    seq_len: int = 128
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 1e4
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU hidden size, METHOD.md §2: ``256 * ceil(int(8 d / 3) / 256)`` (with ``multiple_of`` = 256)."""
        return self.multiple_of * math.ceil(int(8 * self.d_model / 3) / self.multiple_of)


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight``, normalised in fp32 and cast back (METHOD.md §2)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_angles(seq_len: int, head_dim: int, theta: float) -> torch.Tensor:
    """Angles ``t * theta^(-2i / hd)`` for positions ``t < seq_len`` and pairs ``i < hd / 2``, fp32."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` by the position angle (GPT-J / Meta convention), in fp32."""
    x32 = x.float().unflatten(-1, (-1, 2))
    even, odd = x32[..., 0], x32[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.c_attn(x).view(batch, seq, 3, self.n_head, dim // self.n_head).transpose(1, 3).unbind(2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(batch, seq, dim))


class MLP(nn.Module):
    """SwiGLU: ``c_proj(silu(w1 x) * w2 x)``, with ``w1`` and ``w2`` stacked as rows of ``w12``."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w12 = nn.Linear(cfg.d_model, 2 * cfg.ffn_hidden, bias=False)
        self.c_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w12(x).chunk(2, dim=-1)
        return self.c_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        angles = rope_angles(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """METHOD.md §2: every linear and the embedding ~ N(0, std); the two output projections of each block (attention
        and MLP ``c_proj``, which write into the residual stream) ~ N(0, std / sqrt(2 n_layer)); norms 1."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layer))

    def non_embedding_params(self) -> int:
        """Parameters excluding ``wte`` and ``lm_head``, as the paper's model-size table counts them (METHOD.md §3)."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith(("wte.", "lm_head.")))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids ``(batch, seq)`` -> logits ``(batch, seq, vocab)``."""
        seq = idx.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))
