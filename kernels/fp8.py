"""The FP8 backward of the low-precision QuEST linear (`quant.backward=rtn`, `quant.backward_format=fp8`; METHOD.md
§1.13, §5): both backward GEMMs on FP8 tensor cores (torch._scaled_mm, E4M3, one fp32 scale per row of each operand
along the GEMM's contraction dimension, round to nearest), as float8 training with row-wise scales does.

The forward saved each operand as its exact odd-integer codes C and Δ/2 per row s (Q = C ⊙ s, rows along K). The
scales lie along the backward GEMMs' contraction dimensions, so they are folded into the output gradient G (M, N)
before it is rounded; the codes enter exact (|c| <= 15 is exact in E4M3):
    dX_h = G Q_w   = d_1 ⊙ (R(G ⊙ s_w / d_1) C_w),     d_1 = max_n |G ⊙ s_w| / 448 per row m,
    dW_h = G^T Q_x = d_2 ⊙ (R((G ⊙ s_x)^T / d_2) C_x), d_2 = max_m |G ⊙ s_x| / 448 per column n,
R = round to nearest E4M3. The only rounding is that of the gradient (relative error <= 2^-4 per element); an
all-zero row gets scale 1 and zero codes. The masked transposed Hadamard then runs as in the bf16 backward.
On CPU `gemm.fp8_matmul` emulates the GEMMs exactly (decoded values, fp32 sums), so the tests check the same function.
"""

from __future__ import annotations

import torch

from quest_pl.kernels.gemm import fp8_matmul, to_format

E4M3_MAX = 448.0


def rowwise_e4m3(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (R, C) -> (E4M3 codes (R, C), fp32 scale (R,)): t ≈ codes · scale[:, None], scale = max|row| / 448."""
    amax = t.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (t / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def _pad_cols(t: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -t.shape[1] % multiple
    return torch.nn.functional.pad(t.view(torch.uint8), (0, pad)).view(t.dtype) if pad else t


def fp8_backward_gemms(
    grad: torch.Tensor, codes_x: torch.Tensor, scales_x: torch.Tensor, codes_w: torch.Tensor, scales_w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX_h (M, K), dW_h (N, K)) in grad's dtype for grad (M, N), x codes (M, K) with Δ/2 (M,), W codes (N, K) with
    Δ/2 (N,); codes int8 or float8_e4m3fn (module docstring)."""
    g = grad.float()
    k = codes_x.shape[1]
    ones = torch.ones(k, device=grad.device, dtype=torch.float32)
    q1, d1 = rowwise_e4m3(g * scales_w[None, :])
    w_t = to_format(codes_w, "fp8").t().contiguous()  # (K, N): the second operand's rows along N
    grad_xh = fp8_matmul(q1, w_t, d1, ones, grad.dtype)
    q2, d2 = rowwise_e4m3((g * scales_x[:, None]).t())
    x_t = to_format(codes_x, "fp8").t().contiguous()  # (K, M)
    # FP8 tensor cores need the contraction (here the tokens) to be a multiple of 16: zero codes add nothing.
    grad_wh = fp8_matmul(_pad_cols(q2.contiguous(), 16), _pad_cols(x_t, 16), d2, ones, grad.dtype)
    return grad_xh, grad_wh
