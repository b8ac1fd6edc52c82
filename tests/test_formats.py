"""Unit tests of ``w4a8_backend.formats``: hand-derived values, and ModelOpt 0.47's own bytes.

Hand-derived expectations come from the definitions (E2M1 table, E8M0 = 2**(s-127), FP8 E4M3
spacing, round-half-even), not from running the code under test. The ModelOpt comparisons use
``MXFP4QTensor.quantize/dequantize`` on fresh random tensors (hypothesis draws the seeds, so a
failure prints the seed that reproduces it).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from w4a8_backend.formats import (
    BLOCK_SIZE,
    DEFAULT_ACTIVATION,
    DEFAULT_DYNAMIC_SCHEME,
    E2M1_VALUES,
    E8M0_BIAS,
    E8M0_NAN,
    FP8_E4M3_MAX,
    INT8_MAX,
    ActivationDtype,
    ActivationScheme,
    QuantAlgo,
    dequantize_mxfp4,
    dynamic_scale,
    e2m1_to_float,
    e8m0_to_float,
    fake_quantize_activation,
    float_to_e2m1,
    pack_e2m1,
    quantize_activation,
    quantize_fp8,
    quantize_int8,
    quantize_mxfp4,
    reference_linear,
    unpack_e2m1,
)
from w4a8_backend.formats.mxfp4 import e8m0_exponent_for_amax

FP8 = ActivationDtype.FP8_E4M3
INT8 = ActivationDtype.INT8
SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# E2M1 codes
# ---------------------------------------------------------------------------------------------

# (value already divided by the block scale, expected 4-bit code), derived from the E2M1 table
# [0, .5, 1, 1.5, 2, 3, 4, 6], nearest value with ties to the smaller magnitude, sign bit 3.
E2M1_CASES = [
    (0.0, 0x8),  # exact zero is stored as -0
    (-0.0, 0x8),
    (0.1, 0x0),  # rounds to +0: a non-zero positive keeps the + sign
    (-0.1, 0x8),
    (0.25, 0x0),  # tie 0 / 0.5 -> 0
    (0.2500001, 0x1),
    (0.5, 0x1),
    (0.75, 0x1),  # tie 0.5 / 1 -> 0.5
    (0.76, 0x2),
    (1.0, 0x2),
    (1.25, 0x2),  # tie 1 / 1.5 -> 1
    (1.5, 0x3),
    (1.75, 0x3),  # tie 1.5 / 2 -> 1.5
    (2.0, 0x4),
    (2.5, 0x4),  # tie 2 / 3 -> 2
    (3.0, 0x5),
    (3.5, 0x5),  # tie 3 / 4 -> 3
    (4.0, 0x6),
    (5.0, 0x6),  # tie 4 / 6 -> 4
    (5.0001, 0x7),
    (6.0, 0x7),
    (-0.75, 0x9),
    (-5.0, 0xE),
    (-6.0, 0xF),
    (-2.6, 0xD),
]


@pytest.mark.parametrize("value,code", E2M1_CASES)
def test_float_to_e2m1_hand_values(value, code):
    got = float_to_e2m1(torch.tensor([value], dtype=torch.float32))
    assert got.dtype == torch.uint8
    assert got.item() == code, f"{value} -> {got.item():#x}, expected {code:#x}"


def test_e2m1_to_float_every_code():
    codes = torch.arange(16, dtype=torch.uint8)
    expected = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0,
                -6.0]
    got = e2m1_to_float(codes)
    assert got.dtype == torch.float32
    assert got.tolist() == expected
    assert tuple(E2M1_VALUES) == tuple(expected[:8])


def test_e2m1_round_trip_of_representable_values():
    values = torch.tensor([v * s for v in E2M1_VALUES[1:] for s in (1, -1)], dtype=torch.float32)
    assert torch.equal(e2m1_to_float(float_to_e2m1(values)), values)


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------

def test_pack_nibble_order_hand_values():
    codes = torch.tensor([[0x1, 0x2, 0xF, 0x8, 0x0, 0x7]], dtype=torch.uint8)
    packed = pack_e2m1(codes)
    # element 2j in the low nibble, 2j+1 in the high nibble
    assert packed.tolist() == [[0x21, 0x8F, 0x70]]
    assert torch.equal(unpack_e2m1(packed), codes)


@given(seed=SEEDS)
@FAST
def test_pack_unpack_round_trip(seed):
    codes = torch.randint(0, 16, (3, 5, 64), generator=_gen(seed), dtype=torch.uint8)
    packed = pack_e2m1(codes)
    assert packed.shape == (3, 5, 32)
    assert torch.equal(unpack_e2m1(packed), codes)
    # low nibble is exactly the even element
    assert torch.equal(packed & 0xF, codes[..., 0::2])


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        pack_e2m1(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="even"):
        pack_e2m1(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        unpack_e2m1(torch.zeros(4, dtype=torch.int8))


# ---------------------------------------------------------------------------------------------
# E8M0 scales
# ---------------------------------------------------------------------------------------------

def test_e8m0_to_float_hand_values():
    got = e8m0_to_float(torch.tensor([0, 1, 126, 127, 128, 254, 255], dtype=torch.uint8))
    assert got.dtype == torch.float32
    assert got[0].item() == 2.0**-127  # subnormal in float32, still exact
    assert got[1].item() == 2.0**-126
    assert got[2].item() == 0.5
    assert got[3].item() == 1.0
    assert got[4].item() == 2.0
    assert got[5].item() == 2.0**127
    assert math.isnan(got[6].item())
    assert E8M0_NAN == 255 and E8M0_BIAS == 127


def test_e8m0_to_float_every_finite_code():
    codes = torch.arange(255, dtype=torch.uint8)
    expected = torch.tensor([math.ldexp(1.0, int(s) - 127) for s in range(255)],
                            dtype=torch.float64)
    assert torch.equal(e8m0_to_float(codes).double(), expected)
    with pytest.raises(ValueError, match="uint8"):
        e8m0_to_float(codes.to(torch.int32))


@pytest.mark.parametrize(
    "amax,exponent",
    [
        (6.0, 0),  # amax/6 = 1 -> 2**0
        (6.0001, 1),  # just above -> next power (never clips)
        (5.9, 0),
        (3.0, -1),
        (12.0, 1),
        (12.5, 2),
        (0.75, -3),  # 0.125 = 2**-3
        (6.0 * 2.0**100, 100),
        (0.0, -127),  # log2(0) = -inf, clamped
        (1e-45, -127),  # float32 subnormal amax: clamped at -127
    ],
)
def test_scale_rule_ceil_log2(amax, exponent):
    got = e8m0_exponent_for_amax(torch.tensor([amax], dtype=torch.float32))
    assert got.item() == exponent


def test_quantize_mxfp4_hand_block():
    # One block of 32: amax 10 -> exponent ceil(log2(10/6)) = 1, scale 2, byte 128.
    block = torch.zeros(1, 32, dtype=torch.float32)
    block[0, :8] = torch.tensor([10.0, -10.0, 1.0, 0.5, 7.0, 2.5, -3.0, 0.0])
    # scaled by 1/2:            5.0    -5.0  0.5  0.25  3.5  1.25  -1.5  0
    expected_codes = [0x6, 0xE, 0x1, 0x0, 0x5, 0x2, 0xB, 0x8] + [0x8] * 24
    packed, scales = quantize_mxfp4(block)
    assert scales.dtype == torch.uint8 and scales.tolist() == [[128]]
    assert packed.dtype == torch.uint8 and packed.shape == (1, 16)
    assert unpack_e2m1(packed)[0].tolist() == expected_codes
    assert packed[0, 0].item() == 0xE6  # 0x6 low, 0xE high
    deq = dequantize_mxfp4(packed, scales)
    assert deq[0, :8].tolist() == [8.0, -8.0, 1.0, 0.0, 6.0, 2.0, -3.0, -0.0]


def test_quantize_mxfp4_all_zero_block_and_scale_per_block():
    w = torch.zeros(2, 64, dtype=torch.bfloat16)
    w[0, 32:] = 6.0  # second block of row 0: amax 6 -> scale 127, all codes 0x7
    w[1, :32] = 0.375  # amax 0.375 -> exponent ceil(log2(0.0625)) = -4 -> 0.375*16 = 6
    packed, scales = quantize_mxfp4(w)
    assert scales.tolist() == [[0, 127], [123, 0]]
    codes = unpack_e2m1(packed)
    assert codes[0, :32].tolist() == [0x8] * 32
    assert codes[0, 32:].tolist() == [0x7] * 32
    assert codes[1, :32].tolist() == [0x7] * 32
    assert codes[1, 32:].tolist() == [0x8] * 32


def test_quantize_mxfp4_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.ones(4, 48))
    with pytest.raises(ValueError, match="floating-point"):
        quantize_mxfp4(torch.ones(4, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(torch.zeros(4, 16, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.uint8))


@given(seed=SEEDS)
@FAST
def test_mxfp4_error_bound_and_never_clips(seed):
    g = _gen(seed)
    w = torch.randn(16, 256, generator=g) * torch.exp2(torch.randint(-30, 30, (16, 8, 1), generator=g)
                                                       .float()).repeat_interleave(32, -1).reshape(16, 256)
    packed, scales = quantize_mxfp4(w)
    deq = dequantize_mxfp4(packed, scales)
    blocks = w.reshape(16, 8, 32)
    scale = e8m0_to_float(scales).unsqueeze(-1)
    # |x|/scale <= 6 always (ceil rule), and the rounding error is at most half the largest
    # E2M1 gap (1.0 between 4 and 6) times the scale.
    assert (blocks.abs() / scale).max() <= 6.0
    err = (deq.reshape(16, 8, 32) - blocks).abs()
    assert (err <= scale * 1.0 + 0.0).all()
    # dequantize in another dtype equals the float32 result cast
    assert torch.equal(dequantize_mxfp4(packed, scales, torch.bfloat16), deq.to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# MXFP4 against ModelOpt 0.47 bytes
# ---------------------------------------------------------------------------------------------

def _modelopt_mxfp4():
    mx = pytest.importorskip("modelopt.torch.quantization.qtensor")
    return mx.MXFP4QTensor


def _wide_spread_weight(g: torch.Generator, shape, dtype) -> torch.Tensor:
    """Random weight whose 32-blocks span many binades, with zeros, ties and tiny values mixed in."""
    rows, k = shape
    nblocks = k // 32
    lo, hi = {torch.float16: (-14, 12), torch.bfloat16: (-60, 60), torch.float32: (-60, 60)}[dtype]
    block_exp = torch.randint(lo, hi, (rows, nblocks, 1), generator=g).float()
    w = torch.randn(rows, nblocks, 32, generator=g) * torch.exp2(block_exp)
    # per-element spread inside a block, too
    w = w * torch.exp2(torch.randint(-6, 3, (rows, nblocks, 32), generator=g).float())
    flat = w.reshape(rows, k)
    # exact zeros, a whole zero block, and values exactly on E2M1 midpoints of their block scale
    mask = torch.rand(rows, k, generator=g) < 0.05
    flat[mask] = 0.0
    flat[0, :32] = 0.0
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.25, 6.0])
    flat[1, : len(mids)] = mids
    flat[1, 31] = 6.0  # block amax 6 -> scale 1, so the midpoints stay exact ties
    return flat.to(dtype)


@pytest.mark.slow  # the first ModelOpt import takes ~10 s; the comparisons themselves < 1 s
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@given(seed=SEEDS)
@FAST
def test_quantize_mxfp4_matches_modelopt_bytes(dtype, seed):
    MXFP4QTensor = _modelopt_mxfp4()
    g = _gen(seed)
    rows = int(torch.randint(2, 24, (1,), generator=g))
    k = 32 * int(torch.randint(1, 9, (1,), generator=g))
    w = _wide_spread_weight(g, (rows, k), dtype)
    assert w.abs().max() > 0
    ours_packed, ours_scale = quantize_mxfp4(w)
    qt, mo_scale = MXFP4QTensor.quantize(w, 32)
    mo_packed = qt._quantized_data
    assert ours_packed.shape == mo_packed.shape == (rows, k // 2)
    assert torch.equal(ours_packed, mo_packed), "packed E2M1 bytes differ from ModelOpt"
    assert torch.equal(ours_scale, mo_scale.reshape(rows, k // 32)), "E8M0 bytes differ"
    # and the decodes agree (ModelOpt decodes 255 as inf, never produced by its encoder)
    mo_deq = qt.dequantize(torch.float32, scale=mo_scale, block_sizes={-1: 32})
    assert torch.equal(dequantize_mxfp4(ours_packed, ours_scale), mo_deq)


@pytest.mark.slow
@given(seed=SEEDS)
@FAST
def test_quantize_mxfp4_matches_modelopt_3d_experts(seed):
    MXFP4QTensor = _modelopt_mxfp4()
    g = _gen(seed)
    w = _wide_spread_weight(g, (3 * 8, 96), torch.bfloat16).reshape(3, 8, 96)
    ours_packed, ours_scale = quantize_mxfp4(w)
    assert ours_packed.shape == (3, 8, 48) and ours_scale.shape == (3, 8, 3)
    for e in range(3):  # per-expert 2-D slices give the same bytes as the 3-D call
        qt, mo_scale = MXFP4QTensor.quantize(w[e], 32)
        assert torch.equal(ours_packed[e], qt._quantized_data)
        assert torch.equal(ours_scale[e], mo_scale.reshape(8, 3))


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------

def test_constants():
    assert FP8_E4M3_MAX == 448.0 == float(torch.finfo(torch.float8_e4m3fn).max)
    assert INT8_MAX == 127.0


def test_fp8_saturation_and_round_to_nearest_even():
    x = torch.tensor([[1000.0, -1000.0, 448.0, 460.0, 1.0625, 1.1875, 0.0, -3.3]])
    q = quantize_fp8(x, torch.tensor([1.0]))
    assert q.dtype == torch.float8_e4m3fn and q.shape == (1, 8)
    # E4M3 spacing in [1, 2) is 1/8: 1.0625 ties 1.0 / 1.125 -> even mantissa 1.0;
    # 1.1875 ties 1.125 / 1.25 -> 1.25; spacing in [2, 4) is 1/4: -3.3 -> -3.25.
    assert q.float().tolist() == [[448.0, -448.0, 448.0, 448.0, 1.0, 1.25, 0.0, -3.25]]


def test_fp8_divides_by_scale_first():
    x = torch.tensor([[3.0, 6.0, -9000.0]])
    q = quantize_fp8(x, torch.tensor([2.0]))
    assert q.float().tolist() == [[1.5, 3.0, -448.0]]


def test_int8_round_half_even_and_symmetric_saturation():
    x = torch.tensor([[2.5, 3.5, -2.5, -0.5, 0.5, 1.49, 200.0, -200.0, -127.5, float("nan")]])
    q = quantize_int8(x, torch.tensor([1.0]))
    assert q.dtype == torch.int8
    assert q.tolist() == [[2, 4, -2, 0, 0, 1, 127, -127, -127, 0]]


def test_int8_per_token_scale_broadcasts_by_row():
    x = torch.tensor([[10.0, -5.0], [1.0, 0.5]])
    scale = torch.tensor([[10.0 / 127], [1.0 / 127]])
    q = quantize_int8(x, scale)
    assert q.tolist() == [[127, -64], [127, 64]]  # -63.5 -> -64 (even), 63.5 -> 64 (even)


@given(seed=SEEDS)
@FAST
def test_dynamic_scale_per_token_and_per_tensor(seed):
    g = _gen(seed)
    x = torch.randn(3, 5, 64, generator=g) * torch.exp2(torch.randint(-8, 8, (3, 5, 1), generator=g).float())
    rows = x.reshape(15, 64).double()
    for dtype, qmax in ((FP8, 448.0), (INT8, 127.0)):
        per_token = dynamic_scale(x, dtype, per_token=True)
        assert per_token.shape == (15, 1) and per_token.dtype == torch.float32
        expected = (rows.abs().amax(dim=1, keepdim=True) / qmax).float()
        assert torch.equal(per_token, expected)
        per_tensor = dynamic_scale(x, dtype, per_token=False)
        assert per_tensor.shape == (1,)
        assert per_tensor.item() == pytest.approx(rows.abs().max().item() / qmax, rel=1e-7)
        assert per_tensor.item() == per_token.max().item()


def test_dynamic_scale_of_zero_rows_is_finite():
    x = torch.zeros(2, 32)
    x[1, 3] = -4.0
    s = dynamic_scale(x, INT8, per_token=True)
    assert torch.isfinite(s).all() and s[0].item() > 0 and s[1].item() == pytest.approx(4 / 127)
    q, _ = quantize_activation(x, INT8, ActivationScheme.DYNAMIC_PER_TOKEN)
    assert q[0].abs().sum() == 0 and q[1, 3].item() == -127


@given(seed=SEEDS)
@FAST
def test_quantize_activation_schemes(seed):
    g = _gen(seed)
    x = torch.randn(4, 96, generator=g, dtype=torch.float32).to(torch.bfloat16) * 3
    # dynamic per-token: the largest |x| of each row maps exactly to +-qmax
    for dtype, qmax in ((FP8, 448.0), (INT8, 127.0)):
        q, s = quantize_activation(x, dtype, ActivationScheme.DYNAMIC_PER_TOKEN)
        assert s.shape == (4, 1)
        assert torch.equal(q.float().abs().amax(dim=1), torch.full((4,), qmax))
        q, s = quantize_activation(x, dtype, ActivationScheme.DYNAMIC_PER_TENSOR)
        assert s.shape == (1,) and q.float().abs().max().item() == qmax
    # static: the given scale is used as is, values beyond it saturate
    static = torch.tensor(x.float().abs().max().item() / 2 / 448.0)
    q, s = quantize_activation(x, FP8, ActivationScheme.STATIC_PER_TENSOR, static)
    assert s.shape == (1,) and s.item() == static.item()
    assert q.float().abs().max().item() == 448.0
    expected = (x.float() / static).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))
    with pytest.raises(ValueError, match="input_scale"):
        quantize_activation(x, FP8, ActivationScheme.STATIC_PER_TENSOR, None)


@given(seed=SEEDS)
@FAST
def test_fake_quantize_activation_keeps_shape_and_error_bound(seed):
    g = _gen(seed)
    x = torch.randn(2, 3, 64, generator=g)
    y = fake_quantize_activation(x, INT8, ActivationScheme.DYNAMIC_PER_TOKEN)
    assert y.shape == x.shape and y.dtype == torch.float32
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    assert ((y - x).abs() <= step / 2 + 1e-7).all()
    y8 = fake_quantize_activation(x, FP8, ActivationScheme.DYNAMIC_PER_TENSOR)
    # E4M3 has 3 mantissa bits: relative error <= 2**-4 for normal values
    normal = x.abs() / (x.abs().max() / 448) >= 2.0**-6
    assert ((y8 - x).abs()[normal] <= x.abs()[normal] * 2.0**-4 + 1e-9).all()


# ---------------------------------------------------------------------------------------------
# Reference linear vs a float64 hand computation
# ---------------------------------------------------------------------------------------------

def _hand_decode(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Decode with plain Python arithmetic (float64), independent of the module's helpers."""
    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    n, half = packed.shape
    out = torch.empty(n, half * 2, dtype=torch.float64)
    for r in range(n):
        for j in range(half):
            byte = int(packed[r, j])
            for pos, code in ((2 * j, byte & 0xF), (2 * j + 1, byte >> 4)):
                mag = table[code & 7] * math.ldexp(1.0, int(scales[r, pos // 32]) - 127)
                out[r, pos] = -mag if code & 8 else mag
    return out


def _hand_round_half_even(v: float) -> float:
    f = math.floor(v)
    d = v - f
    if d > 0.5 or (d == 0.5 and f % 2 == 1):
        return f + 1.0
    return f


@given(seed=SEEDS)
@settings(max_examples=5, deadline=None)
def test_reference_linear_int8_matches_float64_hand_computation(seed):
    g = _gen(seed)
    n, k, m = 6, 64, 3
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    scales = torch.randint(120, 134, (n, k // 32), generator=g, dtype=torch.uint8)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    w = _hand_decode(packed, scales)
    xd = x.double()
    expected = torch.empty(m, n, dtype=torch.float64)
    for i in range(m):
        s = float(x[i].abs().max()) / 127.0
        s32 = float(torch.tensor(s, dtype=torch.float32))  # the scale is a float32 value
        q = [max(-127.0, min(127.0, _hand_round_half_even(float(torch.tensor(float(xd[i, j]) / s32,
                                                                            dtype=torch.float32)))))
             for j in range(k)]
        for r in range(n):
            expected[i, r] = sum(q[j] * float(w[r, j]) for j in range(k)) * s32 + float(bias[r])
    got = reference_linear(x, packed, scales, INT8, ActivationScheme.DYNAMIC_PER_TOKEN, bias=bias)
    assert got.shape == (m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=1e-6 * expected.abs().max().item())


@given(seed=SEEDS)
@settings(max_examples=5, deadline=None)
def test_reference_linear_fp8_static_matches_float64(seed):
    g = _gen(seed)
    n, k = 5, 96
    w = torch.randn(n, k, generator=g)
    packed, scales = quantize_mxfp4(w)
    x = torch.randn(2, 4, k, generator=g)
    input_scale = torch.tensor(float(x.abs().max()) / 448.0 * 0.75)  # some values saturate
    wd = _hand_decode(packed, scales)
    # FP8 values of x/s: computed through float8 casting of float32 (exact RNE), then float64 math
    q = (x.reshape(-1, k) / input_scale).clamp(-448, 448).to(torch.float8_e4m3fn).double()
    expected = (q @ wd.t()) * float(input_scale)
    got = reference_linear(x, packed, scales, FP8, ActivationScheme.STATIC_PER_TENSOR, input_scale)
    assert got.shape == (2, 4, n)
    torch.testing.assert_close(got.reshape(-1, n).double(), expected, rtol=2e-6,
                               atol=1e-6 * expected.abs().max().item())
    # and it is close to the unquantized product (sanity: weights/activations are not garbage)
    dense = x.reshape(-1, k) @ w.t()
    rel = (got.reshape(-1, n) - dense).norm() / dense.norm()
    assert rel < 0.25


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------

def test_modes_from_string():
    assert QuantAlgo.from_string("W4A8_MXFP4_FP8") is QuantAlgo.W4A8_MXFP4_FP8
    assert QuantAlgo.from_string("w4a8_mxfp4_int8") is QuantAlgo.W4A8_MXFP4_INT8
    with pytest.raises(ValueError, match="NVFP4"):
        QuantAlgo.from_string("NVFP4")
    assert ActivationDtype.from_string("FP8") is FP8
    assert ActivationDtype.from_string("fp8_e4m3") is FP8
    assert ActivationDtype.from_string("int8") is INT8
    with pytest.raises(ValueError, match="int4"):
        ActivationDtype.from_string("int4")
    assert ActivationScheme.from_string("static") is ActivationScheme.STATIC_PER_TENSOR
    assert ActivationScheme.from_string("per_token") is ActivationScheme.DYNAMIC_PER_TOKEN
    assert ActivationScheme.from_string("PER_TENSOR") is ActivationScheme.DYNAMIC_PER_TENSOR
    with pytest.raises(ValueError, match="per_channel"):
        ActivationScheme.from_string("per_channel")


def test_mode_defaults():
    assert DEFAULT_ACTIVATION[QuantAlgo.W4A8_MXFP4_FP8] is FP8
    assert DEFAULT_ACTIVATION[QuantAlgo.W4A8_MXFP4_INT8] is INT8
    assert DEFAULT_DYNAMIC_SCHEME[FP8] is ActivationScheme.DYNAMIC_PER_TENSOR
    assert DEFAULT_DYNAMIC_SCHEME[INT8] is ActivationScheme.DYNAMIC_PER_TOKEN
    assert BLOCK_SIZE == 32


def test_e2m1_decode_with_a_precomputed_table():
    """The table argument (for code inside CUDA-graph capture) changes nothing but where the
    table comes from."""
    from w4a8_backend.formats import e2m1_table

    codes = torch.randint(0, 16, (64, 96), dtype=torch.uint8)
    packed = pack_e2m1(codes)
    scales = torch.randint(100, 140, (64, 3), dtype=torch.uint8)
    table = e2m1_table("cpu")
    assert torch.equal(e2m1_to_float(codes, table), e2m1_to_float(codes))
    assert torch.equal(dequantize_mxfp4(packed, scales, torch.float32, table),
                       dequantize_mxfp4(packed, scales))
