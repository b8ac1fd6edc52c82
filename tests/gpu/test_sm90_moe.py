"""SM90/SM89/SM80 W4A8 MXFP4 MoE kernels against an exact per-expert reference (CUDA + triton).

Every run: fresh random weights, inputs and routing (top-k ids distinct per token, drawn from a
subset of the experts so that some receive nothing), every output and intermediate poisoned
with NaN first, relative error ||y - ref|| / ||ref|| <= 1e-2 against ``reference_moe`` below
(exact MXFP4 weights in float32, activations quantized exactly as ``moe_base`` defines: the
layer input once for all experts, the intermediate rows of all routed pairs once).
"""

from __future__ import annotations

import os

import pytest
import torch

from w4a8_backend.formats import (
    ActivationDtype,
    ActivationScheme,
    dequantize_mxfp4,
    quantize_activation,
    quantize_mxfp4,
)
from w4a8_backend.kernels.base import DeviceInfo
from w4a8_backend.kernels.moe_base import MoEKernelConfig


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable: {exc}"
    major, minor = torch.cuda.get_device_capability()
    if major * 10 + minor < 80:
        return f"sm90_triton MoE needs sm_80+; this GPU is sm_{major}{minor}"
    return None


requires_gpu_backend = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
pytestmark = [pytest.mark.gpu, requires_gpu_backend]

REL_TOL = 1e-2
FP8, INT8 = ActivationDtype.FP8_E4M3, ActivationDtype.INT8
S, D, P = (ActivationScheme.STATIC_PER_TENSOR, ActivationScheme.DYNAMIC_PER_TENSOR,
           ActivationScheme.DYNAMIC_PER_TOKEN)
DEV = "cuda"


# ---------------------------------------------------------------------------------------------
# inputs and the reference
# ---------------------------------------------------------------------------------------------
def _gen(seed: int, dev: str | None = None) -> torch.Generator:
    g = torch.Generator(device=dev or DEV)
    g.manual_seed(seed)
    return g


def make_expert_weights(e, n, k, g, dev=None, extreme=False, narrow=False):
    """MXFP4 ``[e, n, k/2]`` / ``[e, n, k/32]`` with a real-weight-like spread of block scales
    (per-block log-normal magnitudes, a few large input channels, per-expert level);
    ``extreme`` also plants blocks far outside their row's exact window (corrections);
    ``narrow``: a smaller spread and no large channels, so that even INT8 needs no corrections."""
    dev = dev or DEV
    w = torch.randn(e, n, k, device=dev, generator=g) * 0.02
    spread = 0.15 if narrow else 0.6
    w *= torch.exp2(torch.randn(e, n, k // 32, device=dev, generator=g) * spread
                    ).repeat_interleave(32, dim=2)
    w *= torch.exp2(torch.randn(e, 1, 1, device=dev, generator=g))
    if not narrow:
        cols = torch.randint(0, k, (max(1, k // 256),), device=dev, generator=g)
        w[:, :, cols] *= 8.0
    packed, scale = quantize_mxfp4(w)
    if extreme:
        s = scale.to(torch.int32)
        pick = torch.rand(s.shape, device=dev, generator=g)
        s = torch.where(pick < 0.004, (s - 22).clamp(min=1), s)
        s = torch.where((pick >= 0.004) & (pick < 0.006), (s + 10).clamp(max=254), s)
        s[0, 0, 0] = 0
        scale = s.to(torch.uint8)
    return packed, scale


class Layer(torch.nn.Module):
    pass


def make_layer(e, h, i, g, dev=None, extreme=False, narrow=False):
    dev = dev or DEV
    layer = Layer()
    dense = {}
    for name, (n, k) in (("w13", (2 * i, h)), ("w2", (h, i))):
        packed, scale = make_expert_weights(e, n, k, g, dev, extreme, narrow)
        layer.register_parameter(f"{name}_weight", torch.nn.Parameter(packed, requires_grad=False))
        layer.register_parameter(f"{name}_weight_scale",
                                 torch.nn.Parameter(scale, requires_grad=False))
        dense[name] = dequantize_mxfp4(packed, scale)
    layer.w13_input_scale = None
    layer.w2_input_scale = None
    return layer, dense


def make_routing(t, e, k, g, dev=None, used=None, ids_dtype=torch.int32):
    """Distinct top-k ids per token among the first ``used`` experts (the rest get nothing)."""
    dev = dev or DEV
    used = e if used is None else used
    scores = torch.rand(t, e, device=dev, generator=g)
    scores[:, used:] = -1.0
    vals, ids = scores.topk(k, dim=-1)
    weights = torch.softmax(vals * 4.0, dim=-1)
    return weights.float(), ids.to(ids_dtype)


def make_x(t, h, g, dev=None, dtype=torch.bfloat16):
    dev = dev or DEV
    x = torch.randn(t, h, device=dev, generator=g) * 2.0
    x[:, torch.randint(0, h, (4,), device=dev, generator=g)] *= 20.0  # activation outliers
    return x.to(dtype)


def silu(v):
    return v / (1.0 + torch.exp(-v))


def reference_moe(x, topk_weights, topk_ids, dense, act, scheme1, scheme2, s1=None, s2=None,
                  expert_map=None, on_input=False):
    """Exact W4A8 MoE (moe_base semantics), float32, per expert."""
    w13, w2 = dense["w13"].float(), dense["w2"].float()
    e, i2, _ = w13.shape
    inter = i2 // 2
    t, k = topk_ids.shape
    local = topk_ids.long() if expert_map is None else expert_map[topk_ids.long()].long()
    weights = topk_weights.float()
    if on_input:
        x = x * topk_weights.to(x.dtype)
        weights = torch.ones_like(weights)
    q1, sc1 = quantize_activation(x, act, scheme1, s1)
    xq = q1.float() * sc1
    flat = local.reshape(-1)
    tok = torch.arange(t, device=x.device).repeat_interleave(k)
    pv = ((flat >= 0) & (flat < e)).nonzero().flatten()
    ev = flat[pv]
    h = torch.zeros(pv.numel(), inter, device=x.device)
    groups = [(ex, (ev == ex).nonzero().flatten()) for ex in ev.unique().tolist()]
    for ex, sel in groups:
        gu = xq[tok[pv[sel]]] @ w13[ex].t()
        h[sel] = silu(gu[:, :inter]) * gu[:, inter:]
    out = torch.zeros(t, x.shape[1], device=x.device)
    if pv.numel() == 0:
        return out
    q2, sc2 = quantize_activation(h, act, scheme2, s2)
    hq = q2.float() * sc2
    for ex, sel in groups:
        y = hq[sel] @ w2[ex].t()
        out.index_add_(0, tok[pv[sel]], y * weights.reshape(-1)[pv[sel], None])
    return out


def static_scales(x, topk_weights, topk_ids, dense, act, scheme1, scheme2):
    """Calibrated-like static scales: 0.9 x the amax of this input (saturation happens)."""
    qmax = 448.0 if act == FP8 else 127.0
    s1 = (x.float().abs().amax() * 0.9 / qmax).reshape(1)
    # the intermediate amax from a per-tensor dynamic reference run
    w13 = dense["w13"].float()
    inter = w13.shape[1] // 2
    q1, sc1 = quantize_activation(x, act, ActivationScheme.STATIC_PER_TENSOR, s1)
    xq = q1.float() * sc1
    ids = topk_ids.long().reshape(-1)
    tok = torch.arange(x.shape[0], device=x.device).repeat_interleave(topk_ids.shape[1])
    amax = 0.0
    for ex in ids.unique().tolist():
        sel = (ids == ex).nonzero().flatten()
        gu = xq[tok[sel]] @ w13[ex].t()
        amax = max(amax, float((silu(gu[:, :inter]) * gu[:, inter:]).abs().amax()))
    s2 = torch.tensor([amax * 0.9 / qmax], device=x.device)
    return s1, s2


def rel_err(y, ref):
    assert torch.isfinite(ref).all()
    assert torch.isfinite(y.float()).all(), "kernel left NaN/Inf (unwritten or poisoned) output"
    return ((y.float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


# ---------------------------------------------------------------------------------------------
# fixtures / helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    from w4a8_backend.kernels import _sm90_moe_cuda as mc
    from w4a8_backend.kernels import _sm90_moe_triton as mk
    from w4a8_backend.kernels import triton_w4a8 as tk

    monkeypatch.setattr(tk, "POISON_OUTPUTS", True)
    monkeypatch.setattr(mk, "POISON_OUTPUTS", True)
    monkeypatch.setattr(mc, "POISON_OUTPUTS", True)
    # the synthetic "extreme" weights are far harsher than real ones: keep the kernel path
    monkeypatch.setenv("W4A8_MXFP4_MAX_CORRECTION", "0.5")
    torch.backends.cuda.matmul.allow_tf32 = False
    yield


def make_kernel(act, scheme1, scheme2, e, h, i, k, out_dtype=torch.bfloat16):
    from w4a8_backend.kernels.sm90_triton_moe import Sm90TritonMoEKernel

    cfg = MoEKernelConfig(act, scheme1, scheme2, e, h, i, k, "silu", out_dtype)
    if DEV == "cuda":
        ok, why = Sm90TritonMoEKernel.is_supported(DeviceInfo.of("cuda"))
        assert ok, why
    ok, why = Sm90TritonMoEKernel.can_implement(cfg)
    assert ok, why
    return Sm90TritonMoEKernel(cfg)


def build(act, scheme1, scheme2, e, h, i, k, seed, extreme=False, out_dtype=torch.bfloat16,
          narrow=False):
    g = _gen(seed)
    layer, dense = make_layer(e, h, i, g, DEV, extreme, narrow)
    kern = make_kernel(act, scheme1, scheme2, e, h, i, k, out_dtype)
    return kern, layer, dense, g


def run_case(kern, layer, dense, g, t, act, scheme1, scheme2, used=None, ids_dtype=torch.int32,
             x_dtype=torch.bfloat16, expert_map=None, num_global=None, on_input=False,
             routing=None):
    """One call against the reference; ``routing``: (weights, ids) instead of random distinct
    top-k ids."""
    cfg = kern.config
    e, h, k = cfg.num_local_experts, cfg.hidden_size, cfg.top_k
    x = make_x(t, h, g, DEV, x_dtype)
    if routing is None:
        topk_weights, topk_ids = make_routing(t, num_global or e, k, g, DEV, used, ids_dtype)
    else:
        topk_weights, topk_ids = routing
    s1 = s2 = None
    if S in (scheme1, scheme2):
        local = topk_ids if expert_map is None else expert_map[topk_ids.long()]
        s1, s2 = static_scales(x, topk_weights, local.clamp(min=0), dense, act, scheme1,
                               scheme2)
    layer.w13_input_scale = s1 if scheme1 == S else None
    layer.w2_input_scale = s2 if scheme2 == S else None
    y = kern.apply(layer, x, topk_weights, topk_ids, expert_map, on_input)
    assert y.shape == (t, h) and y.dtype == cfg.out_dtype
    ref = reference_moe(x, topk_weights, topk_ids, dense, act, scheme1, scheme2, s1, s2,
                        expert_map, on_input)
    err = rel_err(y, ref)
    if os.environ.get("W4A8_MOE_ERRLOG"):
        with open(os.environ["W4A8_MOE_ERRLOG"], "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]} {act.name} "
                    f"{scheme1.name}/{scheme2.name} E={e} k={k} H={h} T={t} "
                    f"blocks={kern.num_out_of_range} err={err:.3e}\n")
    assert err <= REL_TOL, f"T={t} E={e} k={k}: rel err {err:.3e} > {REL_TOL}"
    return err


def _need_fp8(act):
    if act == FP8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 activations need sm_89+")


# ---------------------------------------------------------------------------------------------
# routing / shapes (E = 8/64/128, top-k 1/2/8, T = 1..8192, empty experts)
# ---------------------------------------------------------------------------------------------
# (E, top_k, H, I, used experts, token counts)
CASES = [
    (8, 2, 256, 96, 6, [1, 3, 17, 100]),
    (8, 1, 384, 128, 8, [5, 1024]),
    (64, 8, 512, 256, 48, [1, 16, 64, 300]),
    (128, 8, 1024, 384, 100, [1, 33, 257, 2048]),
    (64, 2, 256, 128, 64, [8192]),
]


@pytest.mark.parametrize("act,schemes", [(FP8, (D, D)), (INT8, (P, P))],
                         ids=["fp8-tensor", "int8-token"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_routing_and_shapes(act, schemes, case):
    _need_fp8(act)
    e, k, h, i, used, tokens = CASES[case]
    kern, layer, dense, g = build(act, *schemes, e, h, i, k, seed=100 * case + int(act))
    kern.process_weights_after_loading(layer)
    for n, t in enumerate(tokens):
        run_case(kern, layer, dense, g, t, act, *schemes, used=used,
                 ids_dtype=torch.int64 if n % 2 else torch.int32)


SCHEME_PAIRS = [(S, S), (D, D), (P, P), (P, D), (S, P), (D, S)]


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("schemes", SCHEME_PAIRS, ids=lambda p: f"{p[0].name}-{p[1].name}")
def test_activation_schemes(act, schemes):
    _need_fp8(act)
    kern, layer, dense, g = build(act, *schemes, 16, 256, 160, 4, seed=7 + int(act))
    kern.process_weights_after_loading(layer)
    for t in (5, 200):
        run_case(kern, layer, dense, g, t, act, *schemes, used=12)


# The Triton FP8 path over many seeds: GEMM1's FP8 MMAs keep ~14-bit partial sums and h is
# quantized to FP8 again, so a rare seed flips a large value's rounding (2 of 240 cases above
# 1e-2 over 10 token counts and 4 pairs, moe_triton_fp8_precision_vs_f16_h100_20261124_2050.jsonl).
# These very cases on an H100 (2026-11-24, moe_triton_fp8_error_over_seeds_promotion_h100_
# 20261124_2127.jsonl): max / median 1.18e-2 / 2.13e-3 (dynamic pair), 4.0e-3 / 1.79e-3
# (per-token); without GEMM1's promotion 1.67e-2 / 3.71e-3 and 1.28e-2 / 3.40e-3. The bounds
# hold the measured state and fail for both pairs if the promotion is lost.
FP8_SWEEP_MAX, FP8_SWEEP_MEDIAN = 1.5e-2, 3e-3


@pytest.mark.parametrize("schemes", [(D, D), (P, P)], ids=lambda p: f"{p[0].name}-{p[1].name}")
def test_triton_fp8_error_over_seeds(schemes):
    _need_fp8(FP8)
    errs = []
    for seed in range(6):
        kern, layer, dense, g = build(FP8, *schemes, 64, 512, 256, 8, seed=100 + seed)
        kern.process_weights_after_loading(layer)
        kern.decode_cuda = False  # the Triton kernels at every size
        for t in (4, 16, 32, 64):
            x = make_x(t, 512, g)
            w, ids = make_routing(t, 64, 8, g)
            y = kern.apply(layer, x, w, ids, None, False)
            errs.append(rel_err(y, reference_moe(x, w, ids, dense, FP8, *schemes)))
    errs.sort()
    median = errs[len(errs) // 2]
    assert errs[-1] <= FP8_SWEEP_MAX and median <= FP8_SWEEP_MEDIAN, (
        f"max {errs[-1]:.3e} (bound {FP8_SWEEP_MAX}), median {median:.3e} "
        f"(bound {FP8_SWEEP_MEDIAN})")


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("schemes", SCHEME_PAIRS, ids=lambda p: f"{p[0].name}-{p[1].name}")
def test_decode_fusions_bit_identical(act, schemes, monkeypatch):
    """The fusions (static intermediate scale in GEMM1's epilogue, routing inside the GEMMs)
    give the very bytes of the separate launches, with and without an expert map, at sizes on
    both sides of the inline-routing limit."""
    from w4a8_backend.kernels import _sm90_moe_triton as mk

    _need_fp8(act)
    e, k, h, i = 64, 8, 512, 256
    kern, layer, dense, g = build(act, *schemes, e, h, i, k, seed=41 + int(act), narrow=True)
    kern.process_weights_after_loading(layer)
    kern.decode_cuda = False  # the Triton kernels' fusions at every size (CUDA: its own tests)
    assert layer.w4a8_w13_corr[0].numel() == 0 and layer.w4a8_w2_corr[0].numel() == 0
    expert_map = torch.full((2 * e,), -1, dtype=torch.int32, device=DEV)
    expert_map[e // 2:e // 2 + e] = torch.randperm(e, device=DEV, generator=g).to(torch.int32)
    engaged = set()
    for t in (1, 3, 16, 32, 33, 300):
        for emap in (None, expert_map):
            x = make_x(t, h, g)
            w, ids = make_routing(t, e if emap is None else 2 * e, k, g)
            local = ids if emap is None else emap[ids.long()]
            s1, s2 = static_scales(x, w, local.clamp(min=0), dense, act, *schemes)
            layer.w13_input_scale = s1 if schemes[0] == S else None
            layer.w2_input_scale = s2 if schemes[1] == S else None
            plan = mk.fusion_plan(t * k, e, int(schemes[1]))
            engaged |= {n for n, on in zip(("h_out", "route"), plan) if on}
            monkeypatch.setattr(mk, "FUSE_DECODE", True)
            y_fused = kern.apply(layer, x, w, ids, emap, False)
            monkeypatch.setattr(mk, "FUSE_DECODE", False)
            y_plain = kern.apply(layer, x, w, ids, emap, False)
            assert torch.equal(y_fused, y_plain), (t, emap is not None, plan)
            ref = reference_moe(x, w, ids, dense, act, *schemes, s1, s2, emap)
            assert rel_err(y_fused, ref) <= REL_TOL
    want = ({"h_out"} if schemes[1] == S else set()) | (set() if schemes[1] == D else {"route"})
    assert engaged == want, engaged


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("name,dims", [("qwen3-30b-a3b", (128, 8, 2048, 768)),
                                       ("gpt-oss-20b", (32, 4, 2880, 2880))])
def test_model_shapes(act, name, dims):
    _need_fp8(act)
    e, k, h, i = dims
    schemes = (D, D) if act == FP8 else (P, P)
    kern, layer, dense, g = build(act, *schemes, e, h, i, k, seed=e + k)
    kern.process_weights_after_loading(layer)
    for t in (1, 16, 64, 512):
        run_case(kern, layer, dense, g, t, act, *schemes)


@pytest.mark.parametrize("act,schemes", [(FP8, (D, D)), (INT8, (P, P))],
                         ids=["fp8-tensor", "int8-token"])
@pytest.mark.parametrize("config", [(32, 16, 4, 4), (64, 16, 4, 4), (128, 16, 4, 3),
                                    (64, 32, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3),
                                    (128, 64, 8, 3)], ids=str)
def test_config_variants(act, schemes, config, monkeypatch):
    """Every tile shape (BN, BM, warps, stages) the benchmark may pick is correct."""
    _need_fp8(act)
    from w4a8_backend.kernels import _sm90_moe_triton as mk

    monkeypatch.setattr(mk, "pick_config", lambda *a, **kw: config)
    kern, layer, dense, g = build(act, *schemes, 16, 512, 320, 4, seed=config[0] + config[1])
    kern.process_weights_after_loading(layer)
    for t in (3, 150):
        run_case(kern, layer, dense, g, t, act, *schemes, used=10)


# ---------------------------------------------------------------------------------------------
# out-of-range blocks (corrections in the epilogues), EP maps, router weight on input, dtypes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("schemes", [(D, D), (P, P), (S, S)], ids=lambda p: f"{p[0].name}")
def test_out_of_range_blocks_nothing_lost(act, schemes):
    _need_fp8(act)
    kern, layer, dense, g = build(act, *schemes, 8, 512, 192, 2, seed=31 + int(act), extreme=True)
    kern.process_weights_after_loading(layer)
    assert kern.delegate is None
    n13, n2 = kern.num_out_of_range
    assert n13 > 0 and n2 > 0
    for t in (1, 40, 300):
        run_case(kern, layer, dense, g, t, act, *schemes, used=7)


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("schemes", [(D, D), (P, P), (S, S)], ids=lambda p: f"{p[0].name}")
@pytest.mark.parametrize("extreme", [False, True], ids=["inline_routing", "routing_table"])
def test_a_token_naming_an_expert_twice(act, schemes, extreme):
    """Top-k ids drawn with replacement (an expert can appear several times in a token; vLLM's
    routers never do that, but nothing may be lost): an expert then has more pairs than
    tokens, which the routing table (and its grid) once capped at T, leaving outputs unwritten.
    Planted out-of-range blocks take the table path; without them small calls route inline."""
    _need_fp8(act)
    e, k = 8, 4
    kern, layer, dense, g = build(act, *schemes, e, 256, 160, k, seed=17 + int(act),
                                  extreme=extreme)
    kern.process_weights_after_loading(layer)
    for t in (1, 3, 70, 600):
        ids = torch.randint(0, e, (t, k), device=DEV, generator=g, dtype=torch.int64)
        ids[0] = ids[0, 0]  # the first token names one expert k times
        w = torch.softmax(torch.rand(t, k, device=DEV, generator=g) * 4.0, dim=-1)
        run_case(kern, layer, dense, g, t, act, *schemes, routing=(w, ids))


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
def test_nan_input_spreads_like_the_reference(act):
    """A NaN in one token's input, per-token input scale, per-tensor intermediate scale: the
    intermediate's amax is NaN, so the reference's whole output is NaN (not only that token's).
    Few tokens take the CUDA path where it is built (its one-CTA amax), more the Triton GEMM1's
    atomic amax, which once dropped NaN and returned finite numbers."""
    _need_fp8(act)
    kern, layer, dense, g = build(act, P, D, 8, 256, 160, 2, seed=23 + int(act))
    kern.process_weights_after_loading(layer)
    for t in (2, 70):
        x = make_x(t, 256, g)
        x[1, 5] = float("nan")
        w, ids = make_routing(t, 8, 2, g)
        ref = reference_moe(x, w, ids, dense, act, P, D)
        assert ref.isnan().all()
        y = kern.apply(layer, x, w, ids, None, False)
        assert y.isnan().all(), f"T={t}: {int(y.isnan().sum())} of {y.numel()} outputs NaN"


def test_out_of_range_blocks_change_the_result():
    """Guard for the test above: dropping the corrected blocks would fail the tolerance."""
    from w4a8_backend.kernels._sm90_repack import repack_mxfp4
    from w4a8_backend.kernels.sm90_triton_moe import stack_expert_rows

    g = _gen(5)
    e, n, k = 8, 384, 512
    packed, scale = make_expert_weights(e, n, k, g, extreme=True)
    w = dequantize_mxfp4(packed, scale).reshape(e * n, k)
    x = torch.randn(16, k, device=DEV, generator=g)
    for act_int8 in (False, True):
        rp = repack_mxfp4(*stack_expert_rows(packed.view(e, 1, n, k // 2),
                                             scale.view(e, 1, n, k // 32), n), act_int8)
        assert rp.num_out_of_range > 0
        dropped = w.clone().reshape(e * n, k // 32, 32)
        for j, row in enumerate(rp.corr_rows.tolist()):
            dropped[row, rp.corr_blocks[rp.corr_ptr[j]:rp.corr_ptr[j + 1]].long()] = 0
        ref, lossy = x @ w.t(), x @ dropped.reshape(e * n, k).t()
        assert ((lossy - ref).norm() / ref.norm()).item() > REL_TOL


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
def test_expert_map_and_router_weight_on_input(act):
    _need_fp8(act)
    # expert parallelism: 16 global experts, this rank holds 8 (ids 3..10), the rest map to -1
    e_local, e_global = 8, 16
    expert_map = torch.full((e_global,), -1, dtype=torch.int32, device=DEV)
    expert_map[3:11] = torch.arange(8, dtype=torch.int32, device=DEV).flip(0)
    for schemes in ((D, D), (P, P), (S, P)):
        kern, layer, dense, g = build(act, *schemes, e_local, 256, 128, 4, seed=int(act) + 3)
        kern.process_weights_after_loading(layer)
        for t in (1, 9, 130):
            run_case(kern, layer, dense, g, t, act, *schemes, expert_map=expert_map,
                     num_global=e_global)
    kern, layer, dense, g = build(act, D, P, 8, 256, 128, 1, seed=77)
    kern.process_weights_after_loading(layer)
    for t in (2, 70):
        run_case(kern, layer, dense, g, t, act, D, P, on_input=True)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
def test_out_and_input_dtypes(out_dtype, act):
    _need_fp8(act)
    kern, layer, dense, g = build(act, P, P, 8, 256, 128, 2, seed=11, out_dtype=out_dtype)
    kern.process_weights_after_loading(layer)
    x_dtype = torch.float16 if out_dtype == torch.float16 else torch.float32
    for t in (3, 90):
        run_case(kern, layer, dense, g, t, act, P, P, x_dtype=x_dtype)


def test_reference_agrees_with_fallback_kernel():
    """The test's reference against the project's dequantize fallback (graph-safe GPU path).

    Looser bound: the fallback's GPU path rounds gate/up to bf16 before the intermediate is
    re-quantized, and the FP8/INT8 re-quantization turns that 2**-9 perturbation into ~1.6e-2
    output error (measured on H100, FP8). The kernels are held to 1e-2 against the exact
    reference everywhere else."""
    from w4a8_backend.kernels.moe_fallback import DequantFallbackMoEKernel

    for act, schemes in ((FP8, (D, P)), (INT8, (P, D))):
        g = _gen(3)
        layer, dense = make_layer(8, 256, 128, g)
        cfg = MoEKernelConfig(act, *schemes, 8, 256, 128, 2, "silu", torch.float32)
        fb = DequantFallbackMoEKernel(cfg)
        fb.process_weights_after_loading(layer)
        x = make_x(20, 256, g)
        w, ids = make_routing(20, 8, 2, g, used=6)
        y = fb.apply(layer, x, w, ids, None, False)
        ref = reference_moe(x, w, ids, dense, act, *schemes)
        assert rel_err(y, ref) <= 3e-2


# ---------------------------------------------------------------------------------------------
# CUDA graphs, custom op, torch.compile, dispatch
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
def test_cuda_graph_replay_matches_eager(act):
    _need_fp8(act)
    schemes = (D, D) if act == FP8 else (P, P)
    e, k, h, i = 64, 8, 512, 256
    kern, layer, dense, g = build(act, *schemes, e, h, i, k, seed=21, extreme=act == INT8)
    kern.process_weights_after_loading(layer)
    for t in (1, 64):
        x = make_x(t, h, g)
        w, ids = make_routing(t, e, k, g)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            kern.apply(layer, x, w, ids, None, False)  # compile outside capture
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_graph = kern.apply(layer, x, w, ids, None, False)
        for _ in range(3):
            w2_, ids2 = make_routing(t, e, k, g, used=e // 2)
            x.copy_(make_x(t, h, g))
            w.copy_(w2_)
            ids.copy_(ids2)
            y_graph.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            ref = reference_moe(x, w, ids, dense, act, *schemes)
            assert rel_err(y_graph, ref) <= REL_TOL


def test_custom_op_opcheck_and_compile():
    from w4a8_backend.kernels import _sm90_moe_triton as mk

    e, k, h, i = 8, 2, 256, 128
    kern, layer, dense, g = build(FP8, P, D, e, h, i, k, seed=41)
    kern.process_weights_after_loading(layer)
    x = make_x(6, h, g)
    w, ids = make_routing(6, e, k, g)
    args = (x, w, ids, None, kern._weights(layer, "w13"), kern._weights(layer, "w2"), None, None,
            kern.dims, False, int(P), int(D), 0, False, kern.decode_cuda)
    mk.POISON_OUTPUTS = False  # opcheck compares repeated runs (restored by the fixture)
    torch.library.opcheck(torch.ops.w4a8_backend.mxfp4_w4a8_moe.default, args)

    @torch.compile(fullgraph=True, dynamic=True)
    def f(inp, tw, ti):
        return kern.apply(layer, inp, tw, ti, None, False) * 2.0

    for t in (6, 37):
        x = make_x(t, h, g)
        w, ids = make_routing(t, e, k, g)
        ref = reference_moe(x, w, ids, dense, FP8, P, D) * 2.0
        assert rel_err(f(x, w, ids), ref) <= REL_TOL


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
def test_dispatcher_picks_sm90_triton(act):
    _need_fp8(act)
    from w4a8_backend.kernels.dispatch import choose_moe_kernel

    cfg = MoEKernelConfig(act, D, P, 8, 256, 128, 2, "silu", torch.bfloat16)
    assert choose_moe_kernel(cfg, DeviceInfo.of("cuda")).name == "sm90_triton"


def test_can_implement_reasons():
    from w4a8_backend.kernels.sm90_triton_moe import Sm90TritonMoEKernel

    bad = MoEKernelConfig(FP8, D, D, 8, 256, 100, 2, "silu", torch.bfloat16)
    ok, why = Sm90TritonMoEKernel.can_implement(bad)
    assert not ok and "intermediate_size=100" in why
    bad = MoEKernelConfig(FP8, D, D, 8, 256, 128, 2, "gelu", torch.bfloat16)
    ok, why = Sm90TritonMoEKernel.can_implement(bad)
    assert not ok and "gelu" in why


@pytest.mark.parametrize("schemes", [(D, D), (P, P), (S, S)], ids=lambda p: f"{p[0].name}")
def test_int8_split_path(schemes):
    """INT8 layers on sm_90 keep the FP8 repacking of their experts and run the Triton path at
    decode sizes with int8 activations as two exact E4M3 planes on it (docs/int8_kernel.md):
    both GEMMs, the intermediate's quantization into planes (static: in GEMM1's epilogue), the
    corrections reading the planes; out-of-range blocks planted. 64 and 300 tokens take larger
    tiles and so the per-tile INT8 GEMMs."""
    from w4a8_backend.kernels import _sm90_moe_triton as mk

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the INT8 split path is built for sm_90 only")
    kern, layer, dense, g = build(INT8, *schemes, 8, 1024, 512, 2, seed=57, extreme=True)
    kern.process_weights_after_loading(layer)
    assert kern.delegate is None
    for name in ("w13", "w2"):
        split = getattr(layer, f"w4a8_{name}_split")
        assert len(split) == 5 and split[3].numel() > 0, name
    for t, takes_split in ((16, True), (40, True), (64, False), (300, False)):
        assert (mk.pick_config(t, 2 * t, 8, False)[1] <= mk.INT8_SPLIT_MAX_BM) == takes_split
        run_case(kern, layer, dense, g, t, INT8, *schemes, used=7)


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
def test_weight_l2_policy_gives_the_same_bytes(act, monkeypatch):
    """The grouped GEMMs' expert weight copies with the L2 evict_first policy (restored in the
    PTX by ``_triton_l2``; forced on here for every tile) compute exactly what the plain copies
    compute, at decode and prefill tiles, with out-of-range blocks."""
    from w4a8_backend.kernels import _sm90_moe_triton as mk
    from w4a8_backend.kernels import triton_w4a8 as tk

    _need_fp8(act)
    assert tk.WEIGHT_EVICT_FIRST, "the stage hook did not install on this triton"
    kern, layer, dense, g = build(act, P, P, 16, 512, 256, 4, seed=61, extreme=True)
    kern.process_weights_after_loading(layer)
    for t in (16, 64, 700):
        outs = {}
        state = g.get_state()
        for on in (False, True):
            monkeypatch.setattr(mk, "weight_eviction",
                                lambda *args, on=on: "evict_first" if on else "")
            g.set_state(state)
            x = make_x(t, 512, g, DEV)
            tw, ti = make_routing(t, 16, 4, g, DEV, used=12)
            outs[on] = kern.apply(layer, x, tw, ti, None, False)
        assert torch.equal(outs[True], outs[False]), t
        g.set_state(state)
        run_case(kern, layer, dense, g, t, act, P, P, used=12)
