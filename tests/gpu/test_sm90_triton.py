"""SM90/SM89/SM80 W4A8 kernels against the exact reference (needs a CUDA GPU and triton).

Every run: fresh random inputs, outputs (and workspaces, quantized activations, materialized
weights) poisoned with NaN first, relative error ||y - ref|| / ||ref|| <= 1e-2 against
``reference_linear`` (exact MXFP4 x exactly quantized activations, float32).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from w4a8_backend.formats import (
    ActivationDtype,
    ActivationScheme,
    dequantize_mxfp4,
    quantize_activation,
    quantize_mxfp4,
    reference_linear,
)
from w4a8_backend.kernels.base import DeviceInfo, LinearKernelConfig



def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable: {exc}"
    major, minor = torch.cuda.get_device_capability()
    if major * 10 + minor not in (80, 86, 87, 89, 90):
        return f"sm90_triton targets sm_80/86/87/89/90; this GPU is sm_{major}{minor}"
    return None


requires_sm90_backend = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
pytestmark = [pytest.mark.gpu, requires_sm90_backend]

REL_TOL = 1e-2
FP8, INT8 = ActivationDtype.FP8_E4M3, ActivationDtype.INT8
SCHEMES = list(ActivationScheme)

LLAMA8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
LLAMA70B = [(10240, 8192), (8192, 8192), (8192, 28672)]
ODD = [(32 * 3, 32 * 5), (32 * 33, 32 * 7), (32 * 65, 32 * 129)]


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    return g


def make_weight(n: int, k: int, g: torch.Generator, extreme: bool = False):
    """MXFP4 weight with a real-weight-like scale spread (DESIGN §6, MiniLM-like): per-block
    log-normal magnitudes, a few large input channels; ``extreme`` also plants blocks 20+
    binades below and 10 above their row and an E8M0 0 (2**-127), i.e. out-of-range blocks."""
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    spread = torch.randn(n, k // 32, device="cuda", generator=g) * 0.7
    w *= torch.exp2(spread).repeat_interleave(32, dim=1)
    cols = torch.randint(0, k, (max(1, k // 512),), device="cuda", generator=g)
    w[:, cols] *= 16.0
    packed, scale = quantize_mxfp4(w)
    if extreme:
        s = scale.to(torch.int32)
        pick = torch.rand(s.shape, device="cuda", generator=g)
        s = torch.where(pick < 0.004, (s - 22).clamp(min=1), s)
        s = torch.where((pick >= 0.004) & (pick < 0.006), (s + 10).clamp(max=254), s)
        s[0, 0] = 0
        scale = s.to(torch.uint8)
    return packed, scale


class Layer(torch.nn.Module):
    pass


def make_layer(packed, scale, input_scale=None):
    layer = Layer()
    layer.weight = torch.nn.Parameter(packed.clone(), requires_grad=False)
    layer.weight_scale = torch.nn.Parameter(scale.clone(), requires_grad=False)
    layer.input_scale = (
        None if input_scale is None else torch.nn.Parameter(input_scale, requires_grad=False)
    )
    return layer


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    from w4a8_backend.kernels import triton_w4a8

    monkeypatch.setattr(triton_w4a8, "POISON_OUTPUTS", True)
    # the synthetic weights are harsher than real ones (MiniLM: 0.005% INT8 out-of-range
    # blocks); keep the kernel path (plus correction) instead of the fallback delegate
    monkeypatch.setenv("W4A8_MXFP4_MAX_CORRECTION", "0.5")
    torch.backends.cuda.matmul.allow_tf32 = False
    yield


def make_kernel(act, scheme, n, k, out_dtype=torch.bfloat16):
    from w4a8_backend.kernels.sm90_triton import Sm90TritonLinearKernel

    cfg = LinearKernelConfig(act, scheme, n, k, out_dtype)
    ok, why = Sm90TritonLinearKernel.is_supported(DeviceInfo.of("cuda"))
    assert ok, why
    ok, why = Sm90TritonLinearKernel.can_implement(cfg)
    assert ok, why
    return Sm90TritonLinearKernel(cfg)


def static_scale_for(x, act):
    qmax = 448.0 if act == FP8 else 127.0
    # calibrated on a slightly smaller range than this input: saturation happens too
    return (x.float().abs().amax() * 0.9 / qmax).reshape(1)


def rel_err(y, ref):
    assert torch.isfinite(ref).all()
    assert torch.isfinite(y.float()).all(), "kernel left NaN/Inf (unwritten or poisoned) output"
    return ((y.float() - ref).norm() / ref.norm()).item()


def check(act, scheme, m, n, k, seed, extreme=False, bias=False, out_dtype=torch.bfloat16,
          x_dtype=torch.bfloat16, prefill_m=None):
    g = _gen(seed)
    packed, scale = make_weight(n, k, g, extreme)
    x = (torch.randn(m, k, device="cuda", generator=g) * 2.0).to(x_dtype)
    x[:, torch.randint(0, k, (4,), device="cuda", generator=g)] *= 20.0  # activation outliers
    s_in = static_scale_for(x, act) if scheme == ActivationScheme.STATIC_PER_TENSOR else None
    b = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16) if bias else None
    kern = make_kernel(act, scheme, n, k, out_dtype)
    layer = make_layer(packed, scale, s_in)
    kern.process_weights_after_loading(layer)
    if prefill_m is not None:
        kern.prefill_m = prefill_m
    y = kern.apply(layer, x, b)
    assert y.shape == (m, n) and y.dtype == out_dtype
    ref = reference_linear(x, packed, scale, act, scheme, s_in, b)
    err = rel_err(y, ref)
    assert err <= REL_TOL, f"rel err {err:.3e} > {REL_TOL}"
    return err, kern


# ---------------------------------------------------------------------------------------------
# activation quantization is bit-exact
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name.lower())
@pytest.mark.parametrize("m,k", [(1, 4096), (7, 160), (33, 20000), (600, 2080)])
def test_activation_quant_bit_exact(act, scheme, m, k):
    """Bit-exact against the reference, with rounding ties, tiny and huge values in the last row
    (for a dynamic per-tensor scale at (600, 2080): the last of 1200 tiles, in the third round of
    a partial-amax program)."""
    from w4a8_backend.kernels.triton_w4a8 import quantize_activation_gpu

    g = _gen(m * 1000 + k)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16) * 3
    x[:, 0] = 0.0
    x[m - 1, 1:9] = torch.tensor([0.5, 1.5, 2.5, -2.5, 1e-30, -1e30, 448.0, -0.0]).to(x.dtype)
    s_in = (x.float().abs().amax() * 0.5 / (448.0 if act == FP8 else 127.0)).reshape(1)
    s_in = s_in if scheme == ActivationScheme.STATIC_PER_TENSOR else None
    q, s = quantize_activation_gpu(x, act == INT8, int(scheme), s_in)
    q_ref, s_ref = quantize_activation(x, act, scheme, s_in)
    assert torch.equal(s.reshape(-1), s_ref.reshape(-1))
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("scheme", [ActivationScheme.DYNAMIC_PER_TENSOR,
                                    ActivationScheme.DYNAMIC_PER_TOKEN], ids=lambda s: s.name.lower())
@pytest.mark.parametrize("m,k", [(3, 4096), (2, 20000)])
def test_activation_quant_nan_like_reference(act, scheme, m, k):
    """A NaN input makes the dynamic scale NaN (per tensor: every row; per token: its row), so
    that nothing downstream is finite garbage: as in the reference."""
    from w4a8_backend.kernels.triton_w4a8 import quantize_activation_gpu

    g = _gen(m * 7 + k)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    x[1, k - 5] = float("nan")
    q, s = quantize_activation_gpu(x, act == INT8, int(scheme), None)
    q_ref, s_ref = quantize_activation(x, act, scheme, None)
    assert torch.isnan(s_ref).any()
    assert torch.equal(torch.isnan(s.reshape(-1)), torch.isnan(s_ref.reshape(-1)))
    assert torch.equal(torch.nan_to_num(s.reshape(-1)), torch.nan_to_num(s_ref.reshape(-1)))
    assert torch.equal(torch.nan_to_num(q.float(), nan=7.0), torch.nan_to_num(q_ref.float(), nan=7.0))


# ---------------------------------------------------------------------------------------------
# GEMM vs reference
# ---------------------------------------------------------------------------------------------
MS_SMALL = [1, 2, 5, 16, 17, 33, 64]
MS_LARGE = [65, 128, 300, 512, 1024]


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name.lower())
@pytest.mark.parametrize("n,k", ODD + [(4096, 4096)], ids=lambda v: str(v))
def test_all_schemes_many_m(act, scheme, n, k):
    seed = hash((int(act), int(scheme), n, k)) % 10_000
    for i, m in enumerate(MS_SMALL + MS_LARGE):
        check(act, scheme, m, n, k, seed + i, bias=(i % 3 == 0))


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("n,k", LLAMA8B + LLAMA70B, ids=lambda v: str(v))
def test_llama_shapes(act, n, k):
    scheme = ActivationScheme.DYNAMIC_PER_TOKEN if act == INT8 else ActivationScheme.DYNAMIC_PER_TENSOR
    for i, m in enumerate([1, 16, 64, 256]):
        check(act, scheme, m, n, k, 17 + i)


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("m", [4096, 8192])
def test_prefill_large_m(act, m):
    check(act, ActivationScheme.DYNAMIC_PER_TOKEN, m, 4096, 4096, m, bias=True)


# limit -1: never per row (with 0, weights whose row windows add no block still go per row)
@pytest.mark.parametrize("rows_max,rows", [("1.0", True), ("-1", False)],
                         ids=["row_reference", "tile_reference"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name.lower())
def test_int8_prefill_both_references(monkeypatch, rows_max, rows, scheme):
    """The INT8 prefill GEMM with one reference per row (int32 sums over the whole K, its own
    side table) and with per-tile references, chosen at load by the out-of-window fraction;
    planted out-of-range blocks and odd shapes included."""
    from w4a8_backend.kernels.sm90_triton import INT8_PREFILL_ROWS_ENV

    monkeypatch.setenv(INT8_PREFILL_ROWS_ENV, rows_max)
    for i, (m, n, k, extreme) in enumerate([(384, 4096, 4096, False), (700, 1056, 224, True),
                                            (1024, 2048, 8192, True), (513, 96, 160, False)]):
        err, kern = check(INT8, scheme, m, n, k, 40 + i, extreme=extreme, bias=(i % 2 == 0),
                          prefill_m=1)
        assert kern.prefill_rows is rows


def _compiled_variants(fn) -> int:
    caches = getattr(fn, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton's JITFunction has no device_caches to count compiled kernels")
    return sum(len(entry[0]) for entry in caches.values())


def test_prefill_gemm_compiles_once_across_m():
    """The sm_90 TMA prefill GEMM compiles one kernel for every M and program count: vLLM's
    profile run (M a multiple of 16) must not leave the first real prompt (odd M, a single
    program; M > 8 here, below that FP8 takes the CUDA decode kernel) to compile another in the
    middle of serving."""
    from w4a8_backend.kernels import triton_w4a8

    if not triton_w4a8.tma_default(torch.device("cuda")):
        pytest.skip("the TMA prefill GEMM runs on sm_90 and newer")
    before = None
    for i, (m, n) in enumerate([(512, 4096), (389, 4096), (13, 4096), (11, 256)]):
        check(FP8, ActivationScheme.STATIC_PER_TENSOR, m, n, 4096, 90 + i, prefill_m=1)
        if before is None:
            before = _compiled_variants(triton_w4a8._prefill_gemm)
    assert _compiled_variants(triton_w4a8._prefill_gemm) == before


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("prefill_m", [1, 10**9], ids=["dense_path", "fused_path"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name.lower())
def test_out_of_range_blocks_nothing_lost(act, prefill_m, scheme):
    """Planted out-of-range blocks (far below/above their row, E8M0 0) are corrected exactly;
    both the decode/fused path and the materialized prefill path."""
    for m, (n, k) in itertools.product([1, 40, 200], [(1056, 224), (2048, 4096)]):
        err, kern = check(act, scheme, m, n, k, m + n, extreme=True, prefill_m=prefill_m)
        assert kern.delegate is None and kern.num_out_of_range > 0


def test_out_of_range_blocks_change_the_result():
    """Guard for the test above: dropping the out-of-range blocks would fail the tolerance."""
    from w4a8_backend.kernels._sm90_repack import repack_mxfp4

    g = _gen(5)
    n, k = 512, 4096
    packed, scale = make_weight(n, k, g, extreme=True)
    s = scale.to(torch.int32)
    s[:, ::8] = (s[:, ::8] + 20).clamp(max=254)  # every 8th block 20 binades up: out of range
    scale = s.to(torch.uint8)
    rp = repack_mxfp4(packed, scale, act_int8=False)
    assert rp.num_out_of_range > 0
    w = dequantize_mxfp4(packed, scale)
    dropped = w.clone().reshape(n, -1, 32)
    for i, row in enumerate(rp.corr_rows.tolist()):
        blocks = rp.corr_blocks[rp.corr_ptr[i] : rp.corr_ptr[i + 1]].long()
        dropped[row, blocks] = 0
    x = torch.randn(8, k, device="cuda", generator=g)
    ref, lossy = x @ w.t(), x @ dropped.reshape(n, k).t()
    assert ((lossy - ref).norm() / ref.norm()).item() > REL_TOL


def test_nan_scale_propagates_like_reference():
    g = _gen(9)
    n, k = 256, 512
    packed, scale = make_weight(n, k, g)
    scale[3, 2] = 0xFF
    x = torch.randn(4, k, device="cuda", generator=g).to(torch.bfloat16)
    for act in (FP8, INT8):
        kern = make_kernel(act, ActivationScheme.DYNAMIC_PER_TOKEN, n, k)
        layer = make_layer(packed, scale)
        kern.process_weights_after_loading(layer)
        y = kern.apply(layer, x, None).float()
        ref = reference_linear(x, packed, scale, act, ActivationScheme.DYNAMIC_PER_TOKEN)
        assert torch.isnan(y[:, 3]).all() and torch.isnan(ref[:, 3]).all()
        keep = torch.ones(n, dtype=torch.bool, device="cuda")
        keep[3] = False
        assert rel_err(y[:, keep], ref[:, keep]) <= REL_TOL


def test_too_many_out_of_range_blocks_falls_back(caplog, monkeypatch):
    monkeypatch.delenv("W4A8_MXFP4_MAX_CORRECTION")
    g = _gen(11)
    n, k = 256, 1024
    packed, scale = make_weight(n, k, g)
    s = scale.to(torch.int32)
    s[:, ::2] = (s[:, ::2] - 30).clamp(min=1)  # half the blocks 30 binades down
    scale = s.to(torch.uint8)
    kern = make_kernel(FP8, ActivationScheme.DYNAMIC_PER_TENSOR, n, k)
    layer = make_layer(packed, scale)
    with caplog.at_level("WARNING", logger="vllm.w4a8_mxfp4"):
        kern.process_weights_after_loading(layer)
    assert kern.delegate is not None
    assert "dequantize fallback" in caplog.text and "outside the exact" in caplog.text
    x = torch.randn(3, k, device="cuda", generator=g).to(torch.bfloat16)
    ref = reference_linear(x, packed, scale, FP8, ActivationScheme.DYNAMIC_PER_TENSOR)
    assert rel_err(kern.apply(layer, x, None), ref) <= REL_TOL


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
def test_out_and_input_dtypes(out_dtype, act):
    for m in (3, 300):
        check(act, ActivationScheme.DYNAMIC_PER_TOKEN, m, 1056, 4096, m, bias=True,
              out_dtype=out_dtype, x_dtype=torch.float16 if out_dtype == torch.float16 else torch.float32)


def test_leading_dims_and_noncontiguous_input():
    g = _gen(13)
    n, k = 1024, 2048
    packed, scale = make_weight(n, k, g)
    kern = make_kernel(INT8, ActivationScheme.DYNAMIC_PER_TOKEN, n, k)
    layer = make_layer(packed, scale)
    kern.process_weights_after_loading(layer)
    x = torch.randn(2, 3, 2 * k, device="cuda", generator=g).to(torch.bfloat16)[..., ::2]
    y = kern.apply(layer, x, None)
    assert y.shape == (2, 3, n)
    ref = reference_linear(x.contiguous(), packed, scale, INT8, ActivationScheme.DYNAMIC_PER_TOKEN)
    assert rel_err(y, ref) <= REL_TOL


# ---------------------------------------------------------------------------------------------
# CUDA graphs, custom op, torch.compile, dispatch
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
def test_cuda_graph_replay_matches_eager(act):
    g = _gen(21)
    n, k = 4096, 4096
    packed, scale = make_weight(n, k, g, extreme=True)
    kern = make_kernel(act, ActivationScheme.DYNAMIC_PER_TENSOR, n, k)
    layer = make_layer(packed, scale)
    kern.process_weights_after_loading(layer)
    # split-K paths (in-kernel counters must return to zero); on the CUDA decode path M = 1 takes
    # the one-CTA amax, M = 4 the grid kernel (GEMM released at its start), INT8 M = 16 the grid
    # kernel releasing the GEMM after its grid sync
    for m in (1, 4, 16, 64):
        check_graph_replay(kern, layer, m, k, g, lambda x: reference_linear(
            x, packed, scale, act, ActivationScheme.DYNAMIC_PER_TENSOR))
        assert int(layer.w4a8_counters.abs().sum()) == 0


def check_graph_replay(kern, layer, m, k, g, reference):
    """Capture ``kern.apply`` on an [m, k] input in a CUDA graph (after a warm-up outside the
    capture), then replay it on fresh inputs written in place: each output must match
    ``reference(x)``."""
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        kern.apply(layer, x, None)  # warm-up / compile / JIT build outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = kern.apply(layer, x, None)
    for _ in range(3):
        x.copy_(torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16))
        y_graph.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y_graph, reference(x)) <= REL_TOL


def replayed_once(kern, layer, x):
    """``kern.apply(layer, x)`` captured in a CUDA graph (after a warm-up outside the capture),
    its output poisoned with NaN, replayed once: the replay's output."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        kern.apply(layer, x, None)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = kern.apply(layer, x, None)
    y_graph.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    return y_graph


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
def test_pdl_launch_gives_the_same_bytes(monkeypatch, act):
    """The fused Triton GEMM launched with PDL (FP8 tiles of >= PDL_MIN_BN x PDL_MIN_BM: it
    waits for the quantization's writes at its start) and the correction launched with PDL
    after it (both activation types: it waits for the GEMM's writes) compute exactly what the
    plain launches compute:
    split-K tiles, M below and above the rule, eager and replayed in a CUDA graph (captured
    PDL edges), on the op's Triton path."""
    from w4a8_backend.kernels import sm90_triton, triton_w4a8

    if not triton_w4a8.pdl_enabled(torch.device("cuda")):
        pytest.skip("PDL needs sm_90 or newer")
    monkeypatch.setattr(sm90_triton, "CUDA_DECODE_MAX_M", {False: 0, True: 0})  # Triton path
    g = _gen(23)
    n, k = 4096, 8192
    packed, scale = make_weight(n, k, g, extreme=True)
    kern = make_kernel(act, ActivationScheme.DYNAMIC_PER_TOKEN, n, k)
    layer = make_layer(packed, scale)
    kern.process_weights_after_loading(layer)
    assert layer.w4a8_corr_rows.numel() > 0  # the correction launch runs
    for m in (16, 64, 128):
        x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
        outs = {}
        for pdl in (False, True):
            monkeypatch.setattr(triton_w4a8, "PDL", pdl)
            outs[pdl] = kern.apply(layer, x, None)
            assert torch.equal(replayed_once(kern, layer, x), outs[pdl]), (m, pdl)
        assert torch.equal(outs[True], outs[False]), m
        assert rel_err(outs[True], reference_linear(
            x, packed, scale, act, ActivationScheme.DYNAMIC_PER_TOKEN)) <= REL_TOL
    assert int(layer.w4a8_counters.abs().sum()) == 0


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
def test_weight_l2_policy_gives_the_same_bytes(monkeypatch, act):
    """The Triton GEMM's weight copies with the L2 evict_first policy (restored in the PTX by
    ``_triton_l2``) compute exactly what the plain copies compute, eager and replayed in a CUDA
    graph, split-K and not, with out-of-range blocks; forced on for every tile here (the
    default rule, ``weight_eviction``, takes FP8 at M <= 32 over large weights)."""
    from w4a8_backend.kernels import sm90_triton, triton_w4a8

    assert triton_w4a8.WEIGHT_EVICT_FIRST, "the stage hook did not install on this triton"
    monkeypatch.setattr(sm90_triton, "CUDA_DECODE_MAX_M", {False: 0, True: 0})  # Triton path
    g = _gen(29)
    n, k = 4096, 8192
    packed, scale = make_weight(n, k, g, extreme=True)
    kern = make_kernel(act, ActivationScheme.DYNAMIC_PER_TOKEN, n, k)
    layer = make_layer(packed, scale)
    kern.process_weights_after_loading(layer)
    for m in (1, 16, 64):
        x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
        outs = {}
        for on in (False, True):
            monkeypatch.setattr(triton_w4a8, "weight_eviction",
                                lambda *args, on=on: "evict_first" if on else "")
            outs[on] = kern.apply(layer, x, None)
            assert torch.equal(replayed_once(kern, layer, x), outs[on]), (m, on)
        assert torch.equal(outs[True], outs[False]), m
        assert rel_err(outs[True], reference_linear(
            x, packed, scale, act, ActivationScheme.DYNAMIC_PER_TOKEN)) <= REL_TOL
    assert int(layer.w4a8_counters.abs().sum()) == 0


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name.lower())
def test_prefill_launches_give_the_same_bytes(monkeypatch, act, scheme):
    """The prefill path's quantization and materialization in one launch (``prepare_prefill``)
    compute exactly what the two launches compute, eager and replayed in a CUDA graph, on a
    weight with out-of-range blocks."""
    from w4a8_backend.kernels import triton_w4a8

    g = _gen(29)
    n, k, m = 2048, 4096, 600
    packed, scale = make_weight(n, k, g, extreme=True)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    s_in = static_scale_for(x, act) if scheme == ActivationScheme.STATIC_PER_TENSOR else None
    kern = make_kernel(act, scheme, n, k)
    layer = make_layer(packed, scale, s_in)
    kern.process_weights_after_loading(layer)
    assert m >= kern.prefill_m
    outs = {}
    for name, fused in {"two launches": False, "one launch": True}.items():
        monkeypatch.setattr(triton_w4a8, "PREFILL_FUSED_PREPARE", fused)
        outs[name] = kern.apply(layer, x, None)
        assert torch.equal(replayed_once(kern, layer, x), outs[name]), name
        assert torch.equal(outs[name], outs["two launches"]), name
    assert rel_err(outs["two launches"],
                   reference_linear(x, packed, scale, act, scheme, s_in)) <= REL_TOL


@pytest.mark.parametrize("act,prefill_m,m", [(FP8, None, 8), (INT8, 1, 8), (INT8, None, 40)],
                         ids=["fp8", "int8_prefill_rows", "int8_split"])
def test_custom_op_opcheck_and_compile(monkeypatch, act, prefill_m, m):
    from w4a8_backend.kernels import triton_w4a8
    from w4a8_backend.kernels.sm90_triton import INT8_PREFILL_ROWS_ENV

    monkeypatch.setenv(INT8_PREFILL_ROWS_ENV, "1.0")  # the row path despite the harsh weights
    g = _gen(31)
    n, k = 512, 1024
    scheme = ActivationScheme.DYNAMIC_PER_TOKEN
    packed, scale = make_weight(n, k, g)
    kern = make_kernel(act, scheme, n, k)
    layer = make_layer(packed, scale)
    kern.process_weights_after_loading(layer)
    if prefill_m is not None:
        kern.prefill_m = prefill_m
        assert kern.prefill_rows and layer.w4a8_prefill_corr
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    args = (
        x, layer.weight, layer.weight_scale, layer.w4a8_row_scale, layer.w4a8_counters,
        layer.w4a8_lut, layer.w4a8_corr_rows, layer.w4a8_corr_ptr, layer.w4a8_corr_blocks,
        layer.w4a8_corr_values, layer.w4a8_corr_row_ptr, layer.w4a8_prefill_row_scale,
        layer.w4a8_prefill_corr, layer.w4a8_split, None,
        None, n, act == INT8, int(scheme), 0, kern.prefill_m, kern.decode_cuda,
    )
    triton_w4a8.POISON_OUTPUTS = False  # opcheck compares repeated runs
    torch.library.opcheck(torch.ops.w4a8_backend.mxfp4_w4a8_linear.default, args)

    @torch.compile(fullgraph=True, dynamic=True)
    def f(inp):
        return kern.apply(layer, inp, None) * 2.0

    ref = reference_linear(x, packed, scale, act, scheme) * 2.0
    assert rel_err(f(x), ref) <= REL_TOL
    x2 = torch.randn(37, k, device="cuda", generator=g).to(torch.bfloat16)
    ref2 = reference_linear(x2, packed, scale, act, scheme) * 2.0
    assert rel_err(f(x2), ref2) <= REL_TOL


@pytest.mark.parametrize("act", [FP8, INT8], ids=["fp8", "int8"])
def test_dispatcher_picks_sm90_triton(act):
    from w4a8_backend.kernels.dispatch import choose_linear_kernel

    cfg = LinearKernelConfig(act, ActivationScheme.DYNAMIC_PER_TOKEN, 4096, 4096, torch.bfloat16)
    cls = choose_linear_kernel(cfg, DeviceInfo.of("cuda"))
    assert cls.name == "sm90_triton"


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name.lower())
def test_int8_split_path(scheme):
    """INT8 layers between decode and prefill: int8 activations as two exact E4M3 planes on the
    FP8 repacking the layer keeps beside its INT8 one (quantization writing the planes, the
    fused GEMM's X_SPLIT, the correction reading them), through the layer's op, against the
    exact INT8 reference; planted out-of-range blocks, split-K, 32- and 64-token tiles. Also
    checks the op takes the split path at these M, and that it is off with
    W4A8_MXFP4_INT8_SPLIT=0."""
    from w4a8_backend.kernels import triton_w4a8 as tk
    from w4a8_backend.kernels.sm90_triton import INT8_SPLIT_ENV

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the INT8 split path is built for sm_90 only")
    for i, (m, n, k, extreme) in enumerate([(17, 4096, 4096, False), (64, 1056, 224, True),
                                            (33, 2048, 8192, True), (40, 6144, 4096, False)]):
        g = _gen(70 + i)
        packed, scale = make_weight(n, k, g, extreme)
        x = (torch.randn(m, k, device="cuda", generator=g) * 2.0).to(torch.bfloat16)
        s_in = static_scale_for(x, INT8) if scheme == ActivationScheme.STATIC_PER_TENSOR else None
        kern = make_kernel(INT8, scheme, n, k)
        layer = make_layer(packed, scale, s_in)
        kern.process_weights_after_loading(layer)
        assert len(layer.w4a8_split) == 6
        assert tk.split_config(m, layer.weight.shape[0], layer.weight.shape[1] * 2,
                               tk.num_sms(0)) is not None, m
        if extreme:
            assert layer.w4a8_split[4].numel() > 0  # FP8 out-of-range blocks
        y = kern.apply(layer, x, None)
        ref = reference_linear(x, packed, scale, INT8, scheme, s_in)
        assert rel_err(y, ref) <= REL_TOL, (m, n, k, rel_err(y, ref))
    import os

    os.environ[INT8_SPLIT_ENV] = "0"
    try:
        layer = make_layer(packed, scale, s_in)
        kern.process_weights_after_loading(layer)
        assert layer.w4a8_split == []
        assert rel_err(kern.apply(layer, x, None), ref) <= REL_TOL
    finally:
        del os.environ[INT8_SPLIT_ENV]
