"""The CUDA decode kernel (csrc/w4a8_decode_gemm.cu, M <= 16) against the exact reference.

Needs a CUDA GPU and nvcc (the kernel is built just in time). Same rules as test_sm90_triton:
fresh random inputs, outputs poisoned with NaN first, rel. error <= 1e-2 vs ``reference_linear``.
"""

from __future__ import annotations

import logging

import pytest
import torch

from w4a8_backend.formats import ActivationScheme, quantize_activation, reference_linear

from test_sm90_triton import (
    FP8,
    INT8,
    LLAMA8B,
    LLAMA70B,
    ODD,
    REL_TOL,
    SCHEMES,
    _gen,
    _poison,  # noqa: F401  (fixture used by _force_cuda)
    _skip_reason,
    check,
    check_graph_replay,
    make_kernel,
    make_layer,
    make_weight,
    rel_err,
)


def _cuda_skip_reason() -> str | None:
    reason = _skip_reason()
    if reason is not None:
        return reason
    from w4a8_backend.kernels import _cuda_ext

    major, minor = torch.cuda.get_device_capability()
    try:
        _cuda_ext.load(major * 10 + minor)
    except _cuda_ext.CudaExtUnavailable as exc:
        return f"the CUDA decode kernel cannot be built here: {exc}"
    return None


_REASON = _cuda_skip_reason() if torch.cuda.is_available() else "no CUDA GPU on this machine"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]

CONFIGS = [(4, 2), (4, 3), (8, 2), (8, 4)]


@pytest.fixture(autouse=True)
def _force_cuda(monkeypatch, _poison):
    monkeypatch.setenv("W4A8_SM90_DECODE", "cuda")
    yield


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name.lower())
@pytest.mark.parametrize("n,k", ODD + LLAMA8B + LLAMA70B[:1], ids=lambda v: str(v))
def test_decode_matches_reference(act, scheme, n, k):
    seed = hash((int(act), int(scheme), n, k)) % 10_000
    from w4a8_backend.kernels.sm90_triton import cuda_decode_max_m

    assert cuda_decode_max_m(act == INT8) in (8, 16)
    for i, m in enumerate((1, 2, 7, 8, 9, 16)):
        _, kern = check(act, scheme, m, n, k, seed + i, bias=(i % 2 == 0))
        assert kern.decode_cuda


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_every_launch_config(act, config):
    from w4a8_backend.kernels.sm90_triton import cuda_decode

    g = _gen(config[0] * 10 + config[1])
    n, k = 1056, 4096 + 32 * 3  # K not a multiple of the 256-wide step, N not of 128
    packed, scale = make_weight(n, k, g, extreme=True)
    kern = make_kernel(act, ActivationScheme.DYNAMIC_PER_TOKEN, n, k)
    layer = make_layer(packed, scale)
    kern.process_weights_after_loading(layer)
    assert layer.w4a8_corr_blocks.numel() > 0  # the epilogue's corrections are exercised
    corr = (layer.w4a8_corr_row_ptr, layer.w4a8_corr_blocks, layer.w4a8_corr_values)
    for m in (1, 5, 16):
        x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
        y, q, xs = cuda_decode(x, layer.weight, layer.weight_scale, layer.w4a8_row_scale, None,
                               None, n, act == INT8, int(ActivationScheme.DYNAMIC_PER_TOKEN),
                               torch.bfloat16, corr, config=config)
        ref = reference_linear(x, packed, scale, act, ActivationScheme.DYNAMIC_PER_TOKEN)
        assert rel_err(y, ref) <= REL_TOL, (config, m)


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name.lower())
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_activation_quant_bit_exact(act, scheme, x_dtype):
    from w4a8_backend.kernels.sm90_triton import cuda_decode

    g = _gen(int(scheme) * 7 + (act == INT8))
    m, k, n = 9, 4096 + 160, 256
    x = (torch.randn(m, k, device="cuda", generator=g) * 3).to(x_dtype)
    x[:, 0] = 0.0
    x[0, 1:9] = torch.tensor([0.5, 1.5, 2.5, -2.5, 1e-30, -1e30, 448.0, -0.0]).to(x_dtype)
    x[1, 5] = float("inf")
    x[2, 7] = float("-inf")
    s_in = (x[3:].float().abs().amax() * 0.5 / (448.0 if act == FP8 else 127.0)).reshape(1)
    s_in = s_in if scheme == ActivationScheme.STATIC_PER_TENSOR else None
    packed, scale = make_weight(n, k, g)
    kern = make_kernel(act, scheme, n, k)
    layer = make_layer(packed, scale)
    kern.process_weights_after_loading(layer)
    _, q, s = cuda_decode(x, layer.weight, layer.weight_scale, layer.w4a8_row_scale, s_in, None,
                          n, act == INT8, int(scheme), torch.bfloat16)
    q_ref, s_ref = quantize_activation(x, act, scheme, s_in)
    assert torch.equal(s.reshape(-1), s_ref.reshape(-1))
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("one_cta", [True, False], ids=["one-cta", "grid"])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_per_tensor_amax_both_ways_bit_exact(act, one_cta, in_dtype, monkeypatch):
    """A dynamic per-tensor scale from the single-CTA kernel (small inputs) and from the grid
    kernel (a cooperative launch, per-CTA amaxes then a grid sync): both bit-exact, with the
    largest value in the last row; the grid shapes include one whose values do not fit in the
    kernel's registers (a second pass over the input). Both propagate a NaN to the scale."""
    from w4a8_backend.kernels import _cuda_ext, sm90_triton

    monkeypatch.setattr(sm90_triton, "ONE_CTA_AMAX_MAX", 1 << 30 if one_cta else 0)
    major, minor = torch.cuda.get_device_capability()
    lib = _cuda_ext.load(major * 10 + minor)
    g = _gen(17 + one_cta + 2 * (act == INT8))
    scheme = ActivationScheme.DYNAMIC_PER_TENSOR
    shapes = [(1, 2048), (4, 8192), (16, 4096 + 32)]
    if not one_cta:
        shapes += [(1, 32), (3, 14336 + 96), (64, 14336), (160, 8192)]
    for m, k in shapes:
        x = (torch.randn(m, k, device="cuda", generator=g) * 3).to(in_dtype)
        x[m - 1, (k * 2) // 3] = -77.0
        q, s = sm90_triton.cuda_quantize(lib, x, act == INT8, int(scheme), None, poison=True)
        q_ref, s_ref = quantize_activation(x, act, scheme, None)
        assert torch.equal(s.reshape(-1), s_ref.reshape(-1)), (m, k)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), (m, k)
    for r in (0, m - 1):
        x[r, 1] = float("nan")
        q, s = sm90_triton.cuda_quantize(lib, x, act == INT8, int(scheme), None)
        q_ref, s_ref = quantize_activation(x, act, scheme, None)
        assert torch.isnan(s).all() and torch.isnan(s_ref).all()
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_out_dtypes_and_bias(act, out_dtype):
    g = _gen(3)
    n, k = 1056, 4096
    packed, scale = make_weight(n, k, g)
    kern = make_kernel(act, ActivationScheme.STATIC_PER_TENSOR, n, k, out_dtype)
    x = torch.randn(4, k, device="cuda", generator=g).to(torch.bfloat16)
    s_in = (x.float().abs().amax() / (448.0 if act == FP8 else 127.0)).reshape(1)
    layer = make_layer(packed, scale, s_in)
    kern.process_weights_after_loading(layer)
    b = torch.randn(n, device="cuda", generator=g).to(out_dtype)
    y = kern.apply(layer, x, b)
    assert y.dtype == out_dtype
    ref = reference_linear(x, packed, scale, act, ActivationScheme.STATIC_PER_TENSOR, s_in, b)
    assert rel_err(y, ref) <= REL_TOL


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
def test_cuda_graph_replay_with_pdl(act):
    g = _gen(21)
    n, k = 4096, 4096
    packed, scale = make_weight(n, k, g, extreme=True)
    x0 = torch.randn(64, k, device="cuda", generator=g).to(torch.bfloat16)
    s_in = (x0.float().abs().amax() / (448.0 if act == FP8 else 127.0)).reshape(1)
    kern = make_kernel(act, ActivationScheme.STATIC_PER_TENSOR, n, k)
    layer = make_layer(packed, scale, s_in)
    kern.process_weights_after_loading(layer)
    for m in (1, 16):
        check_graph_replay(kern, layer, m, k, g, lambda x: reference_linear(
            x, packed, scale, act, ActivationScheme.STATIC_PER_TENSOR, s_in))


def test_triton_decode_still_selectable(monkeypatch, caplog):
    monkeypatch.setenv("W4A8_SM90_DECODE", "triton")
    for act in (FP8, INT8):
        _, kern = check(act, ActivationScheme.DYNAMIC_PER_TOKEN, 3, 4096, 4096, 5)
        assert not kern.decode_cuda


def test_unbuildable_kernel_auto_falls_back_forced_raises(monkeypatch, caplog, tmp_path):
    from w4a8_backend.kernels import _cuda_ext, sm90_triton

    major, minor = torch.cuda.get_device_capability()
    cap = major * 10 + minor
    monkeypatch.setitem(_cuda_ext._LOADED, cap, _cuda_ext.CudaExtUnavailable("nvcc not found"))
    monkeypatch.setattr(sm90_triton, "_LOGGED_ONCE", set())
    monkeypatch.setenv("W4A8_SM90_DECODE", "auto")
    with caplog.at_level(logging.WARNING, logger="vllm.w4a8_mxfp4"):
        _, kern = check(FP8, ActivationScheme.DYNAMIC_PER_TOKEN, 2, 512, 1024, 1)
    assert not kern.decode_cuda
    assert "CUDA decode kernel is not used (nvcc not found)" in caplog.text
    monkeypatch.setenv("W4A8_SM90_DECODE", "cuda")
    with pytest.raises(RuntimeError, match="W4A8_SM90_DECODE=cuda but nvcc not found"):
        check(FP8, ActivationScheme.DYNAMIC_PER_TOKEN, 2, 512, 1024, 1)


def test_op_uses_triton_when_the_library_is_not_loaded(monkeypatch):
    """``decode_cuda`` is an argument baked into compiled graphs; a process in which the library
    is not loaded (e.g. a replay of a cached graph where nvcc is missing) must still compute
    right, on the Triton kernel."""
    from w4a8_backend.kernels import _cuda_ext

    g = _gen(8)
    n, k = 1056, 4096
    packed, scale = make_weight(n, k, g)
    kern = make_kernel(INT8, ActivationScheme.DYNAMIC_PER_TOKEN, n, k)
    layer = make_layer(packed, scale)
    kern.process_weights_after_loading(layer)
    assert kern.decode_cuda
    major, minor = torch.cuda.get_device_capability()
    monkeypatch.setitem(_cuda_ext._LOADED, major * 10 + minor,
                        _cuda_ext.CudaExtUnavailable("simulated: not built in this process"))
    assert not _cuda_ext.is_loaded(major * 10 + minor)
    x = torch.randn(4, k, device="cuda", generator=g).to(torch.bfloat16)
    ref = reference_linear(x, packed, scale, INT8, ActivationScheme.DYNAMIC_PER_TOKEN)
    assert rel_err(kern.apply(layer, x, None), ref) <= REL_TOL
