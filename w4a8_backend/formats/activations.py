"""Exact activation quantization: FP8 E4M3 and INT8, static or dynamic scales.

Every function works in float32 and returns ``(quantized, scale)`` with ``x ~= quantized * scale``;
``scale`` is a float32 tensor of shape ``[1]`` (per tensor) or ``[M, 1]`` (per token). The rules
(divide by the scale, saturate, round) are the ones the kernels must reproduce bit for bit.
"""

from __future__ import annotations

import torch

from .modes import ActivationDtype, ActivationScheme

FP8_E4M3_MAX = 448.0
INT8_MAX = 127.0
# Floor for dynamic scales so that an all-zero input yields zeros instead of 0/0.
MIN_DYNAMIC_AMAX = 1e-12

QMAX = {ActivationDtype.FP8_E4M3: FP8_E4M3_MAX, ActivationDtype.INT8: INT8_MAX}


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float()


def dynamic_scale(x: torch.Tensor, dtype: ActivationDtype, per_token: bool) -> torch.Tensor:
    """amax / qmax, per token (``[M, 1]``) or for the whole tensor (``[1]``)."""
    x2 = _as_2d(x)
    if per_token:
        amax = x2.abs().amax(dim=-1, keepdim=True)
    else:
        amax = x2.abs().amax().reshape(1)
    return amax.clamp(min=MIN_DYNAMIC_AMAX) / QMAX[dtype]


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``fp8_e4m3(clamp(x / scale, -448, 448))`` with round-to-nearest-even, as ``[M, K]``."""
    q = (_as_2d(x) / scale.float()).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return q.to(torch.float8_e4m3fn)


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``int8(clamp(round_half_even(x / scale), -127, 127))`` (symmetric), as ``[M, K]``.

    NaN inputs become 0 (a defined value instead of an undefined float->int cast).
    """
    q = torch.round(_as_2d(x) / scale.float()).clamp(-INT8_MAX, INT8_MAX)
    return torch.nan_to_num(q, nan=0.0).to(torch.int8)


def quantize_activation(
    x: torch.Tensor,
    dtype: ActivationDtype,
    scheme: ActivationScheme,
    static_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` ``[..., K]`` to ``[M, K]`` FP8/INT8 plus its float32 scale."""
    if scheme == ActivationScheme.STATIC_PER_TENSOR:
        if static_scale is None:
            raise ValueError("static activation quantization needs an input_scale")
        scale = static_scale.float().reshape(1)
    else:
        scale = dynamic_scale(x, dtype, per_token=scheme == ActivationScheme.DYNAMIC_PER_TOKEN)
    quantize = quantize_fp8 if dtype == ActivationDtype.FP8_E4M3 else quantize_int8
    return quantize(x, scale), scale


def fake_quantize_activation(
    x: torch.Tensor,
    dtype: ActivationDtype,
    scheme: ActivationScheme,
    static_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize then dequantize in float32, keeping ``x``'s shape (for reference forwards)."""
    q, scale = quantize_activation(x, dtype, scheme, static_scale)
    return (q.float() * scale).reshape(x.shape)
