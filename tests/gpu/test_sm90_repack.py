"""Load-time repacking of the SM90 kernels loses nothing (runs on CPU: pure torch)."""

from __future__ import annotations

import pytest
import torch

from w4a8_backend.formats import dequantize_mxfp4, quantize_mxfp4
from w4a8_backend.kernels._sm90_repack import (
    FP8_CODE_BIAS,
    INT8_CODE_BIAS,
    dequantize_repacked,
    repack_mxfp4,
    validate_checkpoint_tensors,
)


def _weights(n, k, spread, seed):
    g = torch.Generator().manual_seed(seed)
    blk = torch.randint(-spread, spread + 1, (n, k // 32), generator=g).float()
    w = torch.randn(n, k, generator=g) * torch.exp2(blk).repeat_interleave(32, 1)
    return quantize_mxfp4(w)


def _same(a, b):
    return torch.equal(torch.nan_to_num(a, nan=7.0), torch.nan_to_num(b, nan=7.0))


@pytest.mark.parametrize("act_int8", [False, True], ids=["fp8", "int8"])
@pytest.mark.parametrize("n,k,spread", [(96, 160, 2), (128, 256, 12), (1056, 224, 30), (40, 4096, 1)])
def test_repack_is_exact(act_int8, n, k, spread):
    packed, scale = _weights(n, k, spread, n + k)
    scale[0, 0] = 0xFF
    scale[1, 0] = 0
    rp = repack_mxfp4(packed, scale, act_int8)
    assert _same(dequantize_repacked(rp), dequantize_mxfp4(packed, scale))
    assert rp.nan_blocks == 1 and rp.num_out_of_range >= 1  # the NaN block is never in range
    codes = rp.codes.to(torch.int32)
    nz = codes[codes > 0]
    lo, hi = (INT8_CODE_BIAS, INT8_CODE_BIAS + 3) if act_int8 else (FP8_CODE_BIAS - 8, FP8_CODE_BIAS + 6)
    assert int(nz.min()) >= lo and int(nz.max()) <= hi


def test_narrow_spread_has_no_out_of_range_blocks():
    packed, scale = _weights(64, 2048, 1, 3)
    assert repack_mxfp4(packed, scale, False).num_out_of_range == 0
    packed, scale = _weights(64, 2048, 0, 3)
    rp = repack_mxfp4(packed, scale, True)
    assert rp.num_out_of_range <= 0.001 * rp.num_blocks


def test_fp8_window_keeps_the_majority():
    """One huge block must not push the rest of its row out of range."""
    packed, scale = _weights(4, 1024, 1, 4)
    scale[2, 5] = min(int(scale[2].max()) + 40, 254)
    rp = repack_mxfp4(packed, scale, False)
    assert rp.num_out_of_range == 1 and rp.corr_rows.tolist() == [2]


def test_bad_tensors_are_named():
    with pytest.raises(ValueError, match="layer.weight"):
        validate_checkpoint_tensors(torch.zeros(4, 16), torch.zeros(4, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="layer.weight_scale"):
        validate_checkpoint_tensors(torch.zeros(4, 16, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.uint8))
