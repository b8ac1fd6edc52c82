"""The exact reference W4A8 matmul every kernel is checked against.

Exactly dequantized MXFP4 weights times exactly quantized activations, accumulated in float32,
then multiplied by the activation scale. No kernel-specific shortcuts.
"""

from __future__ import annotations

import torch

from .activations import quantize_activation
from .modes import ActivationDtype, ActivationScheme
from .mxfp4 import dequantize_mxfp4


def reference_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    act_dtype: ActivationDtype,
    scheme: ActivationScheme,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = quant(x) @ dequant(W).T * s_x (+ bias)`` in float32, shape ``[..., N]``."""
    w = dequantize_mxfp4(weight, weight_scale, torch.float32).to(x.device)
    q, scale = quantize_activation(x, act_dtype, scheme, input_scale)
    y = (q.float() @ w.t()) * scale
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], w.shape[0])
