"""CPU tests of the Blackwell (SM100) FlashInfer path: everything except the Blackwell GPU.

What runs for real here: FlashInfer 0.7.x's pure-torch layout helpers (row shuffles, gated-act
reorder, its torch references of the 128x4 scale layout), its own argument validators, the
signatures of the installed entry points, and all of this project's code around the kernels.

What is faked: the Blackwell GPU only. FlashInfer's GEMM / MoE launch is replaced by a function
that records its arguments (and, for the dense GEMM, computes what the documented kernel computes
from those arguments, so the whole dense pipeline is checked numerically against
``reference_linear``). Nothing here proves the CUDA kernels run; see docs/sm100.md.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

flashinfer = pytest.importorskip(
    "flashinfer", reason="the sm100 extra (flashinfer-python) is required"
)

import flashinfer.fused_moe as fi_moe  # noqa: E402
import flashinfer.gemm as fi_gemm  # noqa: E402
from flashinfer.diffusion_ops.minimax_h3_fc1_swiglu import (  # noqa: E402
    _swizzle_sf_128x4 as fi_swizzle_sf_128x4,
)
from flashinfer.fused_moe.core import (  # noqa: E402
    _maybe_get_cached_w3_w1_permute_indices,
    get_w2_permute_indices_with_cache,
)
from flashinfer.trace.templates.gemm import (  # noqa: E402
    _unswizzle_batched_sf_128x4 as fi_unswizzle_batched,
)
from flashinfer.trace.templates.gemm import _unswizzle_sf_128x4 as fi_unswizzle  # noqa: E402
from flashinfer.utils import get_shuffle_matrix_sf_a_row_indices  # noqa: E402

from w4a8_backend.formats import (  # noqa: E402
    ActivationDtype,
    ActivationScheme,
    dequantize_mxfp4,
    e8m0_to_float,
    quantize_activation,
    quantize_fp8,
    quantize_mxfp4,
    reference_linear,
)
from w4a8_backend.kernels import sm100_flashinfer as sm100  # noqa: E402
from w4a8_backend.kernels import sm100_flashinfer_moe as moe  # noqa: E402
from w4a8_backend.kernels.base import DeviceInfo, LinearKernelConfig  # noqa: E402

FP8 = ActivationDtype.FP8_E4M3
REAL_GEMM = sm100.dense_gemm_entry_point()
REAL_MOE = moe.moe_entry_point()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cuda_torch(monkeypatch):
    monkeypatch.setattr(sm100, "_torch_cuda_version", lambda: "12.9")


def u8(*shape, lo=0, hi=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int32).to(torch.uint8)


# ============================================================================================
# 128x4 scale interleave: our torch twin vs FlashInfer's own pure-torch layout references
# ============================================================================================


@pytest.mark.parametrize("rows, cols", [(128, 4), (256, 16), (200, 6), (1, 1), (384, 36)])
def test_interleave_matches_flashinfer_swizzle_reference(rows, cols):
    s = u8(rows, cols, seed=rows + cols)
    ours = sm100.interleave_scales_128x4(s)
    assert ours.shape == (sm100.round_up(rows, 128), sm100.round_up(cols, 4))
    assert torch.equal(ours.reshape(-1), fi_swizzle_sf_128x4(s))
    # and FlashInfer's inverse (the reference its mm_mxfp8 trace uses) recovers the input
    assert torch.equal(fi_unswizzle(ours.reshape(-1), rows, cols), s)


def test_interleave_batched_matches_flashinfer_batched_reference():
    s = u8(3, 256, 8, seed=7)
    ours = sm100.interleave_scales_128x4(s)
    assert ours.shape == (3, 256, 8)
    assert torch.equal(fi_unswizzle_batched(ours.reshape(-1), 3, 256, 8), s)
    for e in range(3):
        assert torch.equal(ours[e], sm100.interleave_scales_128x4(s[e]))


def test_interleave_hand_derived_offset_and_zero_padding():
    # get_sf_out_offset_128x4: tile (r // 128, c // 4) * 512 + (r % 32) * 16 + (r % 128 // 32) * 4
    # + c % 4, tiles row-tile major. Row 33, column 5 of an [N, 8] grid: tile 1 -> 512 + 16 + 4 + 1.
    s = torch.zeros(130, 8, dtype=torch.uint8)
    s[33, 5] = 200
    s[129, 0] = 17  # second row tile: offset 2 * 512 (tiles per row block: 2) + 1 * 16
    flat = sm100.interleave_scales_128x4(s).reshape(-1)
    assert flat.numel() == 256 * 8
    assert flat[533] == 200 and flat[1024 + 16] == 17
    assert int((flat != 0).sum()) == 2  # everything else, padding included, is zero


def test_interleave_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        sm100.interleave_block_scales(torch.zeros(128, 4, dtype=torch.float32))


# ============================================================================================
# Dense: process + apply with FlashInfer's GEMM faked at the call (arguments recorded)
# ============================================================================================


class FakeDenseGemm:
    """Records the call and computes what the documented kernel computes from its arguments:
    ``out = (a * 2**(a_scale-127)) @ (E2M1(b) * 2**(b_scale-127)).T`` per group, with the 128x4
    scale layouts decoded by FlashInfer's own reference (flashinfer.trace.templates.gemm)."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        bound = inspect.signature(REAL_GEMM).bind(*args, **kwargs)
        bound.apply_defaults()
        p = bound.arguments
        a, b, a_scale, b_scale, m_indptr = (p[k] for k in ("a", "b", "a_scale", "b_scale",
                                                           "m_indptr"))
        assert m_indptr.numel() == 2  # one group
        m, k = a.shape
        n = b.shape[1]
        sa = fi_unswizzle(a_scale.reshape(-1), a_scale.shape[0], k // 32)[:m]
        sb = fi_unswizzle(b_scale[0].reshape(-1), b_scale.shape[1], k // 32)[:n]
        a_deq = a.float() * e8m0_to_float(sa).repeat_interleave(32, dim=1)
        w_deq = dequantize_mxfp4(b[0], sb)
        return (a_deq @ w_deq.t()).to(p["out_dtype"] or torch.bfloat16)


def make_layer(n, k, scheme, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    spread = torch.exp2(torch.randint(-3, 3, (n, k // 32), generator=g).float())
    w = torch.randn(n, k, generator=g) * spread.repeat_interleave(32, 1)
    weight, weight_scale = quantize_mxfp4(w)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    layer.weight_scale = torch.nn.Parameter(weight_scale, requires_grad=False)
    layer.input_scale = (
        torch.tensor([0.05]) if scheme == ActivationScheme.STATIC_PER_TENSOR else None
    )
    b = torch.randn(n, generator=g) if bias else None
    return layer, weight.clone(), weight_scale.clone(), b


def dense_kernel(n, k, scheme, out_dtype=torch.bfloat16):
    cfg = LinearKernelConfig(FP8, scheme, n, k, out_dtype)
    ok, reason = sm100.Sm100FlashInferLinearKernel.can_implement(cfg)
    assert ok, reason
    return sm100.Sm100FlashInferLinearKernel(cfg)


@pytest.fixture
def fake_gemm(monkeypatch):
    fake = FakeDenseGemm()
    monkeypatch.setattr(fi_gemm, "group_gemm_mxfp8_mxfp4_nt_groupwise", fake)
    return fake


def test_process_weights_keeps_weight_and_interleaves_scales():
    n, k = 136, 256
    layer, weight, weight_scale, _ = make_layer(n, k, ActivationScheme.DYNAMIC_PER_TENSOR)
    dense_kernel(n, k, ActivationScheme.DYNAMIC_PER_TENSOR).process_weights_after_loading(layer)
    assert layer.weight.shape == (1, n, k // 2) and torch.equal(layer.weight[0], weight)
    assert layer.weight_scale.shape == (1, 256, k // 32)  # N padded to 128 rows
    assert torch.equal(layer.weight_scale[0].reshape(-1), fi_swizzle_sf_128x4(weight_scale))
    assert not layer.weight.requires_grad


@pytest.mark.parametrize("bad", ["weight", "weight_scale"])
def test_process_weights_names_the_bad_tensor(bad):
    layer, *_ = make_layer(128, 256, ActivationScheme.DYNAMIC_PER_TENSOR)
    t = getattr(layer, bad)
    setattr(layer, bad, torch.nn.Parameter(t.data[:, :-1].contiguous(), requires_grad=False))
    with pytest.raises(ValueError, match=rf"sm100_flashinfer: {bad} must be uint8"):
        dense_kernel(128, 256, ActivationScheme.DYNAMIC_PER_TENSOR).process_weights_after_loading(
            layer
        )


@pytest.mark.parametrize("scheme", list(ActivationScheme))
@pytest.mark.parametrize("m", [1, 3, 4, 130])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_dense_apply_matches_reference(scheme, m, out_dtype, fake_gemm):
    n, k = 136, 384
    layer, weight, weight_scale, bias = make_layer(n, k, scheme, seed=m, bias=m % 2 == 1)
    kernel = dense_kernel(n, k, scheme, out_dtype)
    kernel.process_weights_after_loading(layer)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)) * 2
    y = kernel.apply(layer, x, bias)
    ref = reference_linear(x, weight, weight_scale, FP8, scheme, layer.input_scale, bias)
    assert y.dtype == out_dtype and y.shape == (m, n)
    # The only extra rounding is the GEMM's bfloat16 output (8 bits) and the final cast.
    torch.testing.assert_close(y.float(), ref, rtol=2 ** -7, atol=1e-3 * ref.abs().max().item())
    assert len(fake_gemm.calls) == 1


@pytest.mark.parametrize("m", [1, 5, 128, 129])
def test_dense_gemm_arguments_follow_the_documented_api(m, fake_gemm, monkeypatch):
    n, k = 264, 256
    scheme = ActivationScheme.DYNAMIC_PER_TOKEN
    layer, weight, weight_scale, _ = make_layer(n, k, scheme)
    kernel = dense_kernel(n, k, scheme)
    kernel.process_weights_after_loading(layer)
    x = torch.randn(m, k)
    kernel.apply(layer, x, None)
    (args, kwargs), = fake_gemm.calls

    # 1. the installed signature takes exactly these arguments
    bound = inspect.signature(REAL_GEMM).bind(*args, **kwargs)
    p = bound.arguments
    # 2. FlashInfer's own problem-size validator accepts them (its SM100 branch: the sm12x probe,
    #    which needs a CUDA device, is answered "no" - part of faking the Blackwell GPU)
    import flashinfer.gemm.gemm_base as gb

    monkeypatch.setattr(gb, "is_sm12x_supported", lambda device: False)
    assert gb._check_group_gemm_mxfp8_mxfp4_nt_groupwise_problem_size(*args, **kwargs) is True
    # 3. exact contents
    m4 = sm100.round_up(m, 4)
    q, _ = quantize_activation(x, FP8, scheme)
    assert p["a"].dtype == torch.float8_e4m3fn and p["a"].shape == (m4, k)
    assert torch.equal(p["a"][:m].view(torch.uint8), q.view(torch.uint8))
    assert not p["a"][m:].view(torch.uint8).any()
    assert p["a_scale"].dtype == torch.uint8
    assert p["a_scale"].shape == (sm100.round_up(m4, 128), k // 32)
    assert bool((p["a_scale"] == 127).all())  # unit MX scales; the real scale is applied after
    assert p["m_indptr"].dtype == torch.int32 and p["m_indptr"].tolist() == [0, m4]
    assert p["b"].shape == (1, n, k // 2) and torch.equal(p["b"][0], weight)
    assert torch.equal(fi_unswizzle(p["b_scale"][0].reshape(-1), p["b_scale"].shape[1],
                                    k // 32)[:n], weight_scale)
    assert p["out_dtype"] == torch.bfloat16 and "out" not in p


def test_dense_entry_point_falls_back_to_the_old_name(monkeypatch, fake_gemm):
    monkeypatch.delattr(fi_gemm, "group_gemm_mxfp8_mxfp4_nt_groupwise")
    monkeypatch.setattr(fi_gemm, "group_gemm_mxfp4_nt_groupwise", fake_gemm)
    assert sm100.dense_gemm_entry_point() is fake_gemm


def test_gemm_custom_op_passes_opcheck(fake_gemm):
    a = quantize_fp8(torch.randn(6, 256), torch.tensor([0.01]))
    weight, scale = quantize_mxfp4(torch.randn(128, 256))
    b = weight.unsqueeze(0)
    s = sm100.interleave_scales_128x4(scale).unsqueeze(0)
    # test_schema is left out: torch's schema checker multiplies the float8 inputs on CPU, which
    # torch has no kernel for; it is a limitation of the checker, not of the op.
    torch.library.opcheck(
        torch.ops.w4a8_backend.sm100_mxfp8_mxfp4_gemm.default, (a, b, s),
        test_utils=("test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic"),
    )


def test_dense_apply_compiles_without_graph_breaks(fake_gemm):
    n, k = 128, 256
    scheme = ActivationScheme.DYNAMIC_PER_TENSOR
    layer, *_ = make_layer(n, k, scheme)
    kernel = dense_kernel(n, k, scheme)
    kernel.process_weights_after_loading(layer)
    x = torch.randn(2, 3, k)
    eager = kernel.apply(layer, x, None)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: kernel.apply(layer, t, None), backend="aot_eager",
                             fullgraph=True)
    out = compiled(x)
    assert out.shape == (2, 3, n)
    assert torch.equal(out, eager)


def test_signature_probe_reads_the_installed_functions():
    ok, reason = sm100.probe_flashinfer(sm100.DENSE_ENTRY_POINTS)
    assert ok, reason
    ok, reason = sm100.probe_flashinfer(moe.MOE_ENTRY_POINTS)
    assert ok, reason
    # every name passed is a real parameter of the installed entry points
    assert sm100.missing_parameters(REAL_GEMM, sm100.DENSE_ENTRY_POINTS[0][2]) == []
    assert sm100.missing_parameters(REAL_MOE, moe.MOE_CALL_PARAMETERS) == []
    assert sm100.missing_parameters(REAL_GEMM, ["alpha"]) == ["alpha"]


# ============================================================================================
# MoE weight preparation vs FlashInfer's own (pure-torch) helpers
# ============================================================================================


def moe_weights(e=2, h=256, i=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13, s13 = quantize_mxfp4(torch.randn(e, 2 * i, h, generator=g))
    w2, s2 = quantize_mxfp4(torch.randn(e, h, i, generator=g))
    # make scales distinct per row so row mix-ups cannot hide
    s13 = (s13.int() + torch.arange(2 * i).view(1, -1, 1) % 5).to(torch.uint8)
    s2 = (s2.int() + torch.arange(h).view(1, -1, 1) % 7).to(torch.uint8)
    return w13, s13, w2, s2


def swap_w13(t):  # vLLM's [gate; up] -> FlashInfer's [up; gate] ("w3_w1")
    half = t.shape[-2] // 2
    return torch.cat([t[..., half:, :], t[..., :half, :]], dim=-2)


def test_w13_preparation_equals_flashinfer_public_helpers():
    w13, s13, _, _ = moe_weights()
    g1, g1_scale = moe.prepare_w13(w13, s13)
    assert g1.dtype == torch.uint8 and g1.shape == w13.shape
    assert g1_scale.dtype == torch.float8_e4m3fn and g1_scale.shape == s13.shape
    for e in range(w13.shape[0]):
        # FlashInfer's public recipe (vLLM's NVFP4 one): reorder for the gated GEMM, then shuffle
        expected = flashinfer.shuffle_matrix_a(
            flashinfer.reorder_rows_for_gated_act_gemm(swap_w13(w13[e])), 128
        )
        assert torch.equal(g1[e], expected)
        expected_s = flashinfer.shuffle_matrix_a(
            flashinfer.reorder_rows_for_gated_act_gemm(swap_w13(s13[e])), 128
        )
        got_s = fi_unswizzle(g1_scale[e].view(torch.uint8).reshape(-1), *s13.shape[1:])
        assert torch.equal(got_s, expected_s)


def test_w13_permutation_equals_flashinfer_cached_helper():
    two_i = 256
    probe = torch.zeros(two_i, 4, dtype=torch.uint8)
    fi_perm = _maybe_get_cached_w3_w1_permute_indices({}, probe, 128)
    fi_sf_perm = _maybe_get_cached_w3_w1_permute_indices({}, probe, 128, num_elts_per_sf=32)
    swap = torch.cat([torch.arange(128, 256), torch.arange(0, 128)])
    assert torch.equal(moe.w13_row_permutation(two_i), swap[fi_perm])
    assert torch.equal(moe.w13_row_permutation(two_i), swap[fi_sf_perm])


def test_w13_rows_interleave_up_then_gate():
    # Before the epilogue shuffle, row 2j is up_j and row 2j+1 is gate_j: FlashInfer's references
    # compute silu(second half) * first half on the un-interleaved [w3 (up); w1 (gate)] matrix.
    i = 128
    perm = moe.w13_row_permutation(2 * i)
    shuffle = flashinfer.utils.get_shuffle_matrix_a_row_indices(torch.empty(2 * i, 1), 128)
    unshuffled = torch.empty_like(perm)
    unshuffled[shuffle] = perm  # undo only the epilogue shuffle
    j = torch.arange(i)
    assert torch.equal(unshuffled[0::2], i + j)  # up (w3) rows of vLLM's [gate; up]
    assert torch.equal(unshuffled[1::2], j)  # gate (w1) rows


def test_w2_preparation_equals_flashinfer_helpers():
    _, _, w2, s2 = moe_weights()
    g2, g2_scale = moe.prepare_w2(w2, s2)
    for e in range(w2.shape[0]):
        assert torch.equal(g2[e], flashinfer.shuffle_matrix_a(w2[e], 128))
        perm = get_w2_permute_indices_with_cache({}, s2[e], 128, num_elts_per_sf=32)
        assert torch.equal(perm, get_shuffle_matrix_sf_a_row_indices(s2[e], 128, 32))
        got_s = fi_unswizzle(g2_scale[e].view(torch.uint8).reshape(-1), *s2.shape[1:])
        assert torch.equal(got_s, s2[e][perm])


def test_prepared_weights_decode_to_the_original_experts():
    w13, s13, w2, s2 = moe_weights(e=3)
    g1, g1s = moe.prepare_w13(w13, s13)
    g2, g2s = moe.prepare_w2(w2, s2)
    perm1 = moe.w13_row_permutation(w13.shape[1])
    perm2 = moe.w2_row_permutation(w2.shape[1])
    for e in range(3):
        s1 = fi_unswizzle(g1s[e].view(torch.uint8).reshape(-1), *s13.shape[1:])
        s2e = fi_unswizzle(g2s[e].view(torch.uint8).reshape(-1), *s2.shape[1:])
        dense1 = torch.empty(w13.shape[1], w13.shape[2] * 2)
        dense1[perm1] = dequantize_mxfp4(g1[e], s1)
        dense2 = torch.empty(w2.shape[1], w2.shape[2] * 2)
        dense2[perm2] = dequantize_mxfp4(g2[e], s2e)
        assert torch.equal(dense1, dequantize_mxfp4(w13[e], s13[e]))
        assert torch.equal(dense2, dequantize_mxfp4(w2[e], s2[e]))


def test_prepare_rejects_partial_scale_tiles_and_bad_shapes():
    w13, s13, _, _ = moe_weights(i=64)  # 2I = 128 rows fine, but w13 scale cols 8 fine ...
    moe.prepare_w13(w13, s13)
    _, _, w2, s2 = moe_weights(i=64)  # ... w2 scale columns I/32 = 2: not a whole 4-column tile
    with pytest.raises(ValueError, match="not whole 128x4 tiles"):
        moe.prepare_w2(w2, s2)
    with pytest.raises(ValueError, match=r"w13_scale must be uint8 \[2, 256, 8\]"):
        w13, s13, _, _ = moe_weights()
        moe.prepare_w13(w13, s13[:, :, :4])


# ============================================================================================
# MoE activations, routing packing and the call
# ============================================================================================


def test_mxfp8_quantization_never_clips_and_is_exact_on_representable_blocks():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 256, generator=g) * torch.exp2(torch.randint(-20, 20, (7, 8), generator=g)
                                                      ).repeat_interleave(32, 1)
    x[2, :32] = 0.0
    q, s = moe.quantize_mxfp8(x)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.uint8 and s.shape == (7, 8)
    scale = torch.exp2(s.float() - 127).repeat_interleave(32, 1)
    assert bool(((x / scale).abs() <= 448).all())  # the exponent never makes a block clip
    assert s[2, 0] == 0 and not q[2, :32].float().any()
    # the block scale is the smallest power of two that fits: halving it would clip
    amax = x.abs().view(7, 8, 32).amax(-1)
    nz = amax > 0
    assert bool((amax[nz] / torch.exp2(s.float()[nz] - 128) > 448).all())
    # dequantized values are a fixed point (a block whose maximum rounded down to <= 224 may
    # take the next smaller exponent, which represents the same values exactly)
    exact = q.float() * scale
    q2, s2 = moe.quantize_mxfp8(exact)
    assert torch.equal(q2.float() * torch.exp2(s2.float() - 127).repeat_interleave(32, 1), exact)
    assert bool(((s.int() - s2.int()) >= 0).all() and ((s.int() - s2.int()) <= 1).all())


def test_pack_topk_layout():
    ids = torch.tensor([[0, 5], [127, 3]])
    w = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    packed = moe.pack_topk(ids, w)
    assert packed.dtype == torch.int32
    assert torch.equal(packed >> 16, ids.to(torch.int32))
    low = (packed & 0xFFFF).to(torch.int16)
    assert torch.equal(low.view(torch.bfloat16).float(), w)


class FakeMoE:
    def __init__(self):
        self.calls = []
        self.__signature__ = inspect.signature(REAL_MOE)  # looks like the installed function

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        out = kwargs["output"]
        out.fill_(1.5)  # recognisable: apply must return this buffer's contents
        return [out]


def moe_config(**kw):
    base = dict(num_experts=8, top_k=2, hidden_size=256, intermediate_size=128,
                local_num_experts=4, local_expert_offset=4)
    base.update(kw)
    return moe.MoEKernelConfig(**base)


@pytest.fixture
def fake_moe(monkeypatch):
    fake = FakeMoE()
    monkeypatch.setattr(fi_moe, moe.MOE_ENTRY_NAME, fake)
    return fake


@pytest.mark.parametrize("mode", list(moe.MoEActivationMode))
def test_moe_call_arguments_follow_the_documented_api(mode, fake_moe):
    cfg = moe_config(act_mode=mode, act_scheme=ActivationScheme.STATIC_PER_TENSOR)
    ok, reason = moe.Sm100FlashInferMoEKernel.can_implement(cfg)
    assert ok, reason
    kernel = moe.Sm100FlashInferMoEKernel(cfg)
    w13, s13, w2, s2 = moe_weights(e=4)
    prepared = kernel.process_weights(w13, s13, w2, s2, w13_input_scale=torch.full((4,), 0.02),
                                      w2_input_scale=torch.tensor([0.5, 0.25, 0.5, 0.5]))
    t = 5
    x = torch.randn(t, 256)
    ids = torch.tensor([[4, 7], [5, 6], [4, 5], [7, 6], [6, 4]])
    weights = torch.softmax(torch.randn(t, 2), -1)
    out = kernel.apply(prepared, x, weights, ids)
    assert out.shape == (t, 256) and out.dtype == torch.bfloat16 and bool((out == 1.5).all())

    (args, kwargs), = fake_moe.calls
    assert args == ()
    bound = inspect.signature(REAL_MOE).bind(**kwargs)  # the installed signature accepts them
    p = bound.arguments
    e, h, i = 4, 256, 128
    assert p["hidden_states"].dtype == torch.float8_e4m3fn and p["hidden_states"].shape == (t, h)
    assert p["gemm1_weights"].dtype == torch.uint8
    assert p["gemm1_weights"].shape == (e, 2 * i, h // 2)
    assert p["gemm1_weights_scale"].dtype == torch.float8_e4m3fn
    assert p["gemm1_weights_scale"].shape == (e, 2 * i, h // 32)
    assert p["gemm2_weights"].dtype == torch.uint8 and p["gemm2_weights"].shape == (e, h, i // 2)
    assert p["gemm2_weights_scale"].dtype == torch.float8_e4m3fn
    assert p["gemm2_weights_scale"].shape == (e, h, i // 32)
    assert (p["num_experts"], p["top_k"], p["intermediate_size"]) == (8, 2, i)
    assert (p["local_expert_offset"], p["local_num_experts"]) == (4, 4)
    assert p["routing_method_type"] == int(flashinfer.RoutingMethodType.Renormalize)
    assert p["do_finalize"] is True
    assert p["output"].dtype == torch.bfloat16 and p["output"].shape == (t, h)
    for name in ("routing_bias", "gemm1_bias", "gemm2_bias", "gemm1_alpha", "gemm1_beta",
                 "gemm1_clamp_limit", "n_group", "topk_group", "routed_scaling_factor"):
        assert p[name] is None, name
    # routing: FlashInfer's own splitter sees the packed format; ids/weights decode back
    from flashinfer.fused_moe.core import RoutingInputMode, _split_precomputed_routing

    topk, topk_w, mode_seen = _split_precomputed_routing(p["topk_ids"])
    assert mode_seen == RoutingInputMode.PackedPrecomputed and topk_w is None
    assert torch.equal(topk >> 16, ids.to(torch.int32))
    decoded = (topk & 0xFFFF).to(torch.int16).view(torch.bfloat16)
    assert torch.equal(decoded, weights.to(torch.bfloat16))
    # FlashInfer's own validator of the declared activation-scale layout accepts it
    from flashinfer.fused_moe.shared.validation import resolve_moe_act_sf_layout

    layout = resolve_moe_act_sf_layout(p["hidden_states_scale_layout"])
    assert layout == flashinfer.SfLayout.layout_linear

    if mode == moe.MoEActivationMode.MXFP8:
        q, s = moe.quantize_mxfp8(x)
        assert torch.equal(p["hidden_states"].view(torch.uint8), q.view(torch.uint8))
        assert p["hidden_states_scale"].dtype == torch.float8_e4m3fn
        assert p["hidden_states_scale"].shape == (t, h // 32)
        assert torch.equal(p["hidden_states_scale"].view(torch.uint8), s)
        for name in ("output1_scale_scalar", "output1_scale_gate_scalar", "output2_scale_scalar"):
            assert p[name] is None, name
    else:
        s1, s2_ = torch.tensor([0.02]), torch.tensor([0.5])  # max over experts
        assert p["hidden_states_scale"] is None  # -> FlashInfer selects E4m3 activations
        assert torch.equal(p["hidden_states"].view(torch.uint8),
                           quantize_fp8(x, s1).view(torch.uint8))
        assert torch.equal(p["output1_scale_gate_scalar"], s1.expand(e))
        assert torch.allclose(p["output1_scale_scalar"], (s1 / s2_).expand(e))
        assert torch.equal(p["output2_scale_scalar"], s2_.expand(e))
        for name in ("output1_scale_scalar", "output1_scale_gate_scalar", "output2_scale_scalar"):
            assert p[name].dtype == torch.float32 and p[name].shape == (e,)


def test_moe_layout_kwarg_is_omitted_for_flashinfer_without_it():
    def older_routed_moe(topk_ids, routing_bias, hidden_states, hidden_states_scale,
                         gemm1_weights, gemm1_weights_scale, gemm1_bias, gemm1_alpha, gemm1_beta,
                         gemm1_clamp_limit, gemm2_weights, gemm2_weights_scale, gemm2_bias,
                         output1_scale_scalar, output1_scale_gate_scalar, output2_scale_scalar,
                         num_experts, top_k, n_group, topk_group, intermediate_size,
                         local_expert_offset, local_num_experts, routed_scaling_factor,
                         routing_method_type=0, do_finalize=True, enable_pdl=None,
                         gated_act_type=0, output=None, tune_max_num_tokens=8192):
        pass  # FlashInfer 0.6.0's signature

    t = torch.zeros(1)
    kwargs = moe.moe_call_arguments(older_routed_moe, t, None, t, t, t, t, t, None, None, None,
                                    t, 8, 2, 128, 0, 8)
    assert "hidden_states_scale_layout" not in kwargs
    inspect.signature(older_routed_moe).bind(**kwargs)
    kwargs = moe.moe_call_arguments(REAL_MOE, t, None, t, t, t, t, t, None, None, None,
                                    t, 8, 2, 128, 0, 8)
    assert kwargs["hidden_states_scale_layout"] == int(flashinfer.SfLayout.layout_linear)


def test_moe_custom_op_fake_and_compile(fake_moe):
    cfg = moe_config(local_num_experts=None, local_expert_offset=0, num_experts=2)
    kernel = moe.Sm100FlashInferMoEKernel(cfg)
    w13, s13, w2, s2 = moe_weights(e=2)
    prepared = kernel.process_weights(w13, s13, w2, s2)
    x = torch.randn(3, 256)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])
    w = torch.full((3, 2), 0.5)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a: kernel.apply(prepared, a, w, ids), backend="aot_eager",
                             fullgraph=True)
    assert torch.equal(compiled(x), kernel.apply(prepared, x, w, ids))


def test_fp8_per_tensor_mode_needs_static_scales():
    cfg = moe_config(act_mode=moe.MoEActivationMode.FP8_PER_TENSOR,
                     act_scheme=ActivationScheme.STATIC_PER_TENSOR)
    w13, s13, w2, s2 = moe_weights(e=4)
    with pytest.raises(ValueError, match="static w2_input_scale"):
        moe.Sm100FlashInferMoEKernel(cfg).process_weights(w13, s13, w2, s2,
                                                          w13_input_scale=torch.tensor(0.1))


def test_moe_process_weights_names_the_bad_tensor():
    w13, s13, w2, s2 = moe_weights(e=4)
    kernel = moe.Sm100FlashInferMoEKernel(moe_config())
    with pytest.raises(ValueError, match=r"w2 must be uint8 \[4, 256, 64\]"):
        kernel.process_weights(w13, s13, w2[:, :, :32], s2)


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (moe_config(act_dtype=ActivationDtype.INT8), "INT8 activations"),
        (moe_config(act_mode=moe.MoEActivationMode.FP8_PER_TENSOR), "needs static input scales"),
        (moe_config(activation="gelu"), "only SwiGLU"),
        (moe_config(hidden_size=384), "hidden_size=384 is not a multiple of 256"),
        (moe_config(intermediate_size=192), "intermediate_size=192 (per partition)"),
        (moe_config(local_expert_offset=6), "do not fit"),
        (moe_config(out_dtype=torch.float32), "writes bfloat16"),
        (moe_config(num_experts=40000, local_num_experts=None, local_expert_offset=0), "int16"),
    ],
)
def test_moe_can_implement_reasons(cfg, expected):
    ok, reason = moe.Sm100FlashInferMoEKernel.can_implement(cfg)
    assert not ok and expected in reason


@pytest.mark.parametrize("cap, ok", [(100, True), (103, True), (90, False), (89, False),
                                     (80, False), (None, False)])
def test_moe_is_supported_under_faked_capabilities(cap, ok, cuda_torch):
    device = DeviceInfo("cuda", cap, "gpu") if cap else DeviceInfo("cpu")
    verdict, reason = moe.Sm100FlashInferMoEKernel.is_supported(device)
    assert verdict is ok and (reason is None) is ok


def test_moe_is_refused_when_flashinfer_lacks_the_routed_moe(monkeypatch, cuda_torch):
    monkeypatch.delattr(fi_moe, moe.MOE_ENTRY_NAME)
    ok, reason = moe.Sm100FlashInferMoEKernel.is_supported(DeviceInfo("cuda", 100, "B200"))
    assert not ok and moe.MOE_ENTRY_NAME in reason
    # the dense path does not need it
    assert sm100.Sm100FlashInferLinearKernel.is_supported(DeviceInfo("cuda", 100, "B200"))[0]


def test_routing_constant_matches_flashinfer_enum():
    assert moe.ROUTING_RENORMALIZE == int(flashinfer.RoutingMethodType.Renormalize)
    assert moe.SF_LAYOUT_LINEAR == int(flashinfer.SfLayout.layout_linear)


def test_docs_say_not_run_on_hardware():
    text = (REPO / "docs" / "sm100.md").read_text()
    assert "built, not run on hardware here" in text.lower()
