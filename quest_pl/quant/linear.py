"""The quantized layer: :class:`QuantLinear`, an ``nn.Linear`` whose weight and input pass through their estimators
(and the Hadamard, METHOD.md §1.8) before the matmul, on the INT8 kernel path where it serves."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quest_pl import quantizers
from quest_pl.estimators.backward import (
    quantized_backward_linear,
)


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose weight and input pass through estimators (fake quantization) before the matmul.

    ``weight_quant`` and ``act_quant`` are estimator modules (or ``None`` for full precision). ``enabled = False``
    replaces every quantizer by the identity, giving the full-precision layer at the same latent weights (used by the
    gradient-alignment diagnostics): ``x W^T``, or ``x (W H)^T`` for a weight-only half-form layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        weight_quant: nn.Module | None = None,
        act_quant: nn.Module | None = None,
        hadamard: str | None = None,
        device=None,
        dtype=None,
        hadamard_block: int = quantizers.HADAMARD_BLOCK,
        backward: str = "none",
        backward_format: str = "nvfp4",
        backward_operands: str = "grad",
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight_quant = weight_quant
        self.act_quant = act_quant
        self.hadamard = hadamard
        self.hadamard_block = hadamard_block
        self.backward = backward
        self.backward_format = backward_format
        self.backward_operands = backward_operands
        self.enabled = True
        # Per operand: keyword arguments for kernels.quest_quantize when the fused Triton path serves it on CUDA
        # (set by quantize_model from quant.kernel), or None for the PyTorch path.
        self.kernel_args: dict[str, dict | None] = {"weight": None, "act": None}
        self.kernel_mode = "torch"
        # "int8": the forward GEMM on integer codes when both operands are kernel-served (kernels.int8); "bf16": the
        # fake-quantized product. Set by quantize_model (quant.matmul=auto resolves to int8 on CUDA sm_80+).
        self.matmul = "bf16"
        self._frozen_weight_codes = None  # (key, codes, scales): inference reuses the weight's codes

    def extra_repr(self) -> str:
        extra = f", hadamard_block={self.hadamard_block}" if self.hadamard and self.hadamard_block != 128 else ""
        if self.backward != "none":
            extra += f", backward={self.backward}, backward_format={self.backward_format}"
            extra += f", backward_operands={self.backward_operands}"
        return super().extra_repr() + f", hadamard={self.hadamard}" + extra

    def _quantize(self, t: torch.Tensor, quant: nn.Module | None, operand: str) -> torch.Tensor:
        if quant is None:
            return t
        kernel_args = self.kernel_args[operand]
        # Masks for the diagnostics come from the estimator modules: on those steps the PyTorch path runs.
        # auto: on CUDA tensors only; triton: also on CPU tensors (Triton's interpreter, for tests).
        if kernel_args is not None and (t.is_cuda or self.kernel_mode == "triton") and not quant.record_mask:
            from quest_pl import kernels

            q = kernels.quest_quantize(t, **kernel_args)
            return quantizers.hadamard_transform(q) if self.hadamard == "full" else q
        if self.hadamard is None:
            return quant(t)
        # Rotate in fp32 so a bf16 activation is not rounded between the Hadamard and the grid (METHOD.md §7.12).
        block = self.hadamard_block
        q = quant(quantizers.hadamard_transform(t.to(torch.promote_types(t.dtype, torch.float32)), block))
        if self.hadamard == "full":
            q = quantizers.hadamard_transform(q, block)
        return q.to(t.dtype)

    def _rotate(self, t: torch.Tensor, quant: nn.Module | None) -> torch.Tensor:
        """The operand with its quantizer replaced by the identity: rotated only where the half form leaves it
        rotated, so a disabled weight-only half layer is ``x (W H)^T``, the same function of the latent weight."""
        if quant is None or self.hadamard != "half" or (self.act_quant is not None and self.weight_quant is not None):
            return t  # full form, or both operands rotated: H H^T = I cancels
        return quantizers.hadamard_transform(t, self.hadamard_block)

    def _uses_int8(self, x: torch.Tensor) -> bool:
        """Whether this call runs the INT8 forward (METHOD.md §5): both operands on the fused kernels, no mask
        recording (the diagnostics read masks from the estimator modules), and int8 asked for or auto on sm_80+."""
        if self.matmul == "bf16" or self.kernel_args["act"] is None or self.kernel_args["weight"] is None:
            return False
        if self.act_quant.record_mask or self.weight_quant.record_mask:
            return False
        return self.matmul == "int8" and (x.is_cuda or self.kernel_mode == "triton")  # CPU: Triton's interpreter

    def _int8_forward(self, x: torch.Tensor) -> torch.Tensor:
        from quest_pl.kernels import int8

        act, weight_args = self.kernel_args["act"], self.kernel_args["weight"]
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            backward = "bf16" if self.backward == "none" else "fp8"  # _int8_config_error admits rtn / fp8 only
            y = int8.quest_int8_linear(x, self.weight, act, weight_args, backward=backward)
        else:  # inference: the weight's codes once per weight version
            w = self.weight
            fmt = int8.inference_codes(x, w, act, weight_args)
            key = (w.data_ptr(), w._version, w.device, w.dtype, fmt)
            if self._frozen_weight_codes is None or self._frozen_weight_codes[0] != key:
                codes, _, scales = int8.quantize_codes(w, **weight_args, codes=fmt)
                self._frozen_weight_codes = (key, codes, scales)
            _, codes, scales = self._frozen_weight_codes
            y = int8.quest_int8_linear_frozen(x, codes, scales, act)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(self._rotate(x, self.act_quant), self._rotate(self.weight, self.weight_quant), self.bias)
        if self._uses_int8(x):
            return self._int8_forward(x)
        x = self._quantize(x, self.act_quant, "act")
        weight = self._quantize(self.weight, self.weight_quant, "weight")
        if self.backward != "none":
            return quantized_backward_linear(
                x, weight, self.bias, self.backward, self.backward_format, self.backward_operands
            )
        return F.linear(x, weight, self.bias)
