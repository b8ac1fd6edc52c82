"""Dequantize-to-dense fallback: runs on any device, CPU included.

Weights are decoded once at load into a dense matrix (bfloat16 on accelerators, float32 on CPU;
every MXFP4 value is exact in both). Each call quantizes the activation exactly as the W4A8
format defines it, multiplies the exact codes (FP8/INT8 values are exact in bf16) and applies the
activation scale afterwards, so the result equals the reference up to accumulation order.
"""

from __future__ import annotations

import torch

from ..formats import dequantize_mxfp4, quantize_activation
from .base import DeviceInfo, LinearKernelConfig, Mxfp4LinearKernel, Verdict


def compute_dtype_for(device: torch.device) -> torch.dtype:
    # CPU bf16 GEMMs are slow and their accumulation order is library-defined; fp32 is exact.
    return torch.float32 if device.type == "cpu" else torch.bfloat16


class DequantFallbackLinearKernel(Mxfp4LinearKernel):
    name = "fallback"

    @classmethod
    def is_supported(cls, device: DeviceInfo) -> Verdict:
        return True, None

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> Verdict:
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight = layer.weight.data
        dense = dequantize_mxfp4(weight, layer.weight_scale.data, compute_dtype_for(weight.device))
        layer.weight = torch.nn.Parameter(dense, requires_grad=False)
        del layer.weight_scale

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        cfg = self.config
        dense = layer.weight
        q, scale = quantize_activation(x, cfg.act_dtype, cfg.act_scheme, layer.input_scale)
        y = torch.nn.functional.linear(q.to(dense.dtype), dense).float() * scale
        if bias is not None:
            y = y + bias.float()
        return y.to(cfg.out_dtype).reshape(*x.shape[:-1], cfg.out_features)
