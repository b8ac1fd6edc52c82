"""The CUDA mid-M GEMM (csrc/w4a8_decode_gemm.cu ``mid_gemm_kernel``, M above the decode
kernel's range) against the exact reference.

Needs a CUDA GPU and nvcc. Same rules as test_sm90_triton: fresh random inputs, outputs poisoned
with NaN first, rel. error <= 1e-2 vs ``reference_linear``.
"""

from __future__ import annotations

import pytest
import torch

from w4a8_backend.formats import ActivationScheme, reference_linear

from test_cuda_decode import _REASON
from test_sm90_triton import (
    FP8,
    INT8,
    LLAMA8B,
    REL_TOL,
    SCHEMES,
    _gen,
    _poison,  # noqa: F401  (fixture used by _force_cuda)
    check,
    check_graph_replay,
    make_kernel,
    make_layer,
    make_weight,
    rel_err,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]

# every instantiated (warps, tokens per CTA, stages), with and without split K
CONFIGS = [(4, 8, 4, 1), (4, 16, 4, 1), (4, 32, 4, 1), (4, 64, 3, 1), (4, 64, 4, 1),
           (8, 32, 4, 1), (8, 64, 3, 1), (8, 64, 4, 1), (4, 8, 4, 4), (4, 16, 4, 2),
           (4, 32, 4, 3), (4, 64, 3, 2), (8, 64, 4, 2)]


@pytest.fixture(autouse=True)
def _force_cuda(monkeypatch, _poison):
    from w4a8_backend.kernels import sm90_triton

    monkeypatch.setenv("W4A8_SM90_DECODE", "cuda")
    monkeypatch.setattr(sm90_triton, "CUDA_MID_MAX_M", {False: 128, True: 128})
    yield


def _spy(monkeypatch):
    from w4a8_backend.kernels import sm90_triton

    calls = []
    real = sm90_triton.cuda_mid

    def spy(x2, *args, **kwargs):
        calls.append(x2.shape[0])
        return real(x2, *args, **kwargs)

    monkeypatch.setattr(sm90_triton, "cuda_mid", spy)
    return calls


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_every_launch_config(act, config):
    """Odd N and K (not multiples of the CTA's rows or the 256-wide step), weights with
    out-of-range blocks (the correction kernel adds them), M filling and not filling the token
    tiles; split-K leaves its counters at zero and is bit-identical on repeat."""
    from w4a8_backend.kernels.sm90_triton import cuda_mid

    g = _gen(sum(config) * 10 + int(act == INT8))
    n, k = 1056, 4096 + 32 * 3
    packed, scale = make_weight(n, k, g, extreme=True)
    scheme = ActivationScheme.DYNAMIC_PER_TOKEN
    kern = make_kernel(act, scheme, n, k)
    layer = make_layer(packed, scale)
    kern.process_weights_after_loading(layer)
    assert layer.w4a8_corr_blocks.numel() > 0
    corr = (layer.w4a8_corr_rows, layer.w4a8_corr_ptr, layer.w4a8_corr_blocks,
            layer.w4a8_corr_values)
    for m in (3, 17, 40, 64):
        x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
        run = (lambda: cuda_mid(x, layer.weight, layer.weight_scale, layer.w4a8_row_scale, None,
                                None, n, act == INT8, int(scheme), torch.bfloat16,
                                layer.w4a8_counters, corr, config=config)[0])
        y = run()
        ref = reference_linear(x, packed, scale, act, scheme)
        assert rel_err(y, ref) <= REL_TOL, (config, m)
        assert int(layer.w4a8_counters.abs().sum()) == 0, (config, m)
        assert torch.equal(run(), y), (config, m)


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name.lower())
@pytest.mark.parametrize("n,k", [(32 * 33, 32 * 7), (32 * 65, 32 * 129)] + LLAMA8B[:2],
                         ids=str)
def test_op_takes_mid_path_and_matches_reference(monkeypatch, act, scheme, n, k):
    calls = _spy(monkeypatch)
    seed = hash((int(act), int(scheme), n, k)) % 10_000
    ms = (17, 33, 64, 65, 128)
    for i, m in enumerate(ms):
        check(act, scheme, m, n, k, seed + i, bias=(i % 2 == 0))
    assert calls == list(ms)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
def test_out_dtypes(monkeypatch, out_dtype, act):
    """(A bias must have the output's dtype for this path; check()'s is bf16, so none here.)"""
    calls = _spy(monkeypatch)
    check(act, ActivationScheme.STATIC_PER_TENSOR, 48, 640, 1024, 5 + int(act == INT8),
          out_dtype=out_dtype)
    assert calls == [48]


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
def test_cuda_graph_replay(monkeypatch, act):
    """Captured with its PDL edge from the quantization kernel and the correction launch after
    it; replays match the reference on fresh inputs."""
    from w4a8_backend.kernels import sm90_triton

    monkeypatch.setattr(sm90_triton, "CUDA_MID_CONFIGS",
                        {a: ((128, (4, 64, 3, 2)),) for a in (False, True)})
    calls = _spy(monkeypatch)
    g = _gen(77 + int(act == INT8))
    n, k, m = 1024, 2048 + 64, 80
    packed, scale = make_weight(n, k, g, extreme=True)
    scheme = ActivationScheme.DYNAMIC_PER_TENSOR
    kern = make_kernel(act, scheme, n, k)
    layer = make_layer(packed, scale)
    kern.process_weights_after_loading(layer)
    check_graph_replay(kern, layer, m, k, g,
                       lambda x: reference_linear(x, packed, scale, act, scheme))
    assert calls and set(calls) == {m}
    assert int(layer.w4a8_counters.abs().sum()) == 0


def test_bad_config_is_a_clear_error():
    from w4a8_backend.kernels.sm90_triton import cuda_mid

    g = _gen(3)
    n, k = 256, 512
    packed, scale = make_weight(n, k, g)
    kern = make_kernel(FP8, ActivationScheme.DYNAMIC_PER_TOKEN, n, k)
    layer = make_layer(packed, scale)
    kern.process_weights_after_loading(layer)
    x = torch.randn(40, k, device="cuda", generator=g).to(torch.bfloat16)
    corr = (layer.w4a8_corr_rows, layer.w4a8_corr_ptr, layer.w4a8_corr_blocks,
            layer.w4a8_corr_values)
    with pytest.raises(RuntimeError, match="mid-M GEMM launch failed"):
        cuda_mid(x, layer.weight, layer.weight_scale, layer.w4a8_row_scale, None, None, n, False,
                 int(ActivationScheme.DYNAMIC_PER_TOKEN), torch.bfloat16, layer.w4a8_counters,
                 corr, config=(4, 48, 3, 1))
