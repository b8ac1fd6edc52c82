"""MXFP4 (OCP microscaling FP4): E2M1 codes, E8M0 block scales, packing and ModelOpt's encoder.

Layout (ModelOpt 0.47 export, also compressed-tensors ``mxfp4-pack-quantized``):
- ``weight``: uint8 ``[out, in/2]``; element ``2j`` in the low nibble, ``2j+1`` in the high nibble.
- code = ``sign << 3 | idx``, idx into :data:`E2M1_VALUES`.
- ``weight_scale``: uint8 E8M0 ``[out, in/32]``; value ``2**(s - 127)``; ``0xFF`` is NaN.
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 32
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes; a magnitude equal to a midpoint rounds down.
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E8M0_BIAS = 127
E8M0_NAN = 0xFF
ZERO_CODE = 0x8  # ModelOpt stores an exact zero as -0

_E2M1_SIGNED = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes ``[..., K]`` (uint8, values < 16, K even) into bytes ``[..., K/2]``."""
    if codes.dtype != torch.uint8:
        raise ValueError(f"E2M1 codes must be uint8, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"E2M1 codes need an even last dimension, got shape {tuple(codes.shape)}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Unpack bytes ``[..., K/2]`` into 4-bit codes ``[..., K]`` (uint8)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed E2M1 data must be uint8, got {packed.dtype}")
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def e2m1_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 E2M1 code values (float32, code 0x8 is -0.0) on ``device``."""
    return _E2M1_SIGNED.to(device)


def e2m1_to_float(codes: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
    """Decode 4-bit E2M1 codes to float32 (exact).

    ``table``: :func:`e2m1_table` already on ``codes``' device. Code that runs inside a CUDA-graph
    capture must pass one made beforehand: building it here would copy from the host then.
    """
    return (e2m1_table(codes.device) if table is None else table)[codes.long()]


def float_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round already-scaled values (|x| <= 6) to E2M1 codes the way ModelOpt 0.47 does.

    Nearest value, ties toward the smaller magnitude; the sign bit is set for negative values
    and for exact zeros (zero is stored as ``0x8``).
    """
    magnitude = x.float().abs()
    # The index is the number of midpoints strictly below the magnitude (a tie rounds down);
    # seven compares beat torch.bucketize by ~4x on the CPU.
    idx = (magnitude > E2M1_MIDPOINTS[0]).to(torch.uint8)
    for midpoint in E2M1_MIDPOINTS[1:]:
        idx += magnitude > midpoint
    return idx | ((x <= 0).to(torch.uint8) << 3)


def e8m0_to_float(scales: torch.Tensor) -> torch.Tensor:
    """Decode E8M0 bytes to float32: ``2**(s-127)`` exactly (s=0 is the subnormal 2**-127)."""
    if scales.dtype != torch.uint8:
        raise ValueError(f"E8M0 scales must be uint8, got {scales.dtype}")
    s = scales.to(torch.int32)
    bits = torch.where(s == 0, torch.full_like(s, 1 << 22), s << 23)
    out = bits.view(torch.float32)
    return torch.where(s == E8M0_NAN, torch.full_like(out, float("nan")), out)


def e8m0_exponent_for_amax(amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt's scale rule: unbiased exponent ``ceil(log2(amax / 6))``, at least -127.

    The ceiling guarantees ``amax / 2**e <= 6``: the encoder never clips.
    """
    descale = amax.float() / E2M1_MAX
    return torch.ceil(torch.clamp(torch.log2(descale), min=-float(E8M0_BIAS)))


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``weight`` ``[..., K]`` (K % 32 == 0) exactly as ModelOpt 0.47 exports it.

    Returns ``(packed uint8 [..., K/2], e8m0 uint8 [..., K/32])``.
    """
    if weight.shape[-1] % BLOCK_SIZE:
        raise ValueError(
            f"MXFP4 needs the last dimension to be a multiple of {BLOCK_SIZE}, "
            f"got shape {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise ValueError(f"MXFP4 encodes floating-point tensors, got {weight.dtype}")
    blocks = weight.reshape(*weight.shape[:-1], -1, BLOCK_SIZE)
    # abs and max are exact in the input dtype: only the block maxima need widening.
    amax = blocks.abs().amax(dim=-1, keepdim=True).float()
    if not torch.isfinite(amax).all():
        bad = int((~torch.isfinite(amax)).sum())
        raise ValueError(f"cannot encode non-finite values to MXFP4: {bad} block(s) of 32 hold "
                         "NaN or Inf")
    exponent = e8m0_exponent_for_amax(amax)
    # Multiplying by 2**-e is the same correctly rounded operation as dividing by 2**e.
    scaled = blocks.float() * torch.exp2(-exponent)
    codes = float_to_e2m1(scaled).reshape(weight.shape)
    scales = (exponent.squeeze(-1) + E8M0_BIAS).to(torch.uint8)
    return pack_e2m1(codes), scales


def dequantize_mxfp4(
    packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
    table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact decode of packed MXFP4 ``[..., K/2]`` with E8M0 ``[..., K/32]`` into ``dtype``.

    The product is formed in float32, where every E2M1 value times every finite E8M0 scale is
    exact; casting to a narrower ``dtype`` is the caller's choice. ``table``: see
    :func:`e2m1_to_float`.
    """
    codes = unpack_e2m1(packed)
    k = codes.shape[-1]
    if scales.shape[:-1] != codes.shape[:-1] or scales.shape[-1] * BLOCK_SIZE != k:
        raise ValueError(
            f"MXFP4 scales of shape {tuple(scales.shape)} do not match packed data of shape "
            f"{tuple(packed.shape)}: expected {(*codes.shape[:-1], k // BLOCK_SIZE)}"
        )
    values = e2m1_to_float(codes, table).reshape(*codes.shape[:-1], -1, BLOCK_SIZE)
    out = values * e8m0_to_float(scales).unsqueeze(-1)
    return out.reshape(codes.shape).to(dtype)
