"""The MoE layer for a few tokens on the CUDA decode kernels (``csrc/w4a8_decode_gemm.cu``).

At decode sizes the Triton grouped GEMMs pay for generality: a routing pass, tiles of 16+ token
rows for one token, a per-pair float32 output and a reduction launch. Here one token's layer is
three launches (static scales), with the same semantics as ``_sm90_moe_triton.moe_forward``:

1. the layer input's quantization (the dense decode path's kernel; it releases the next launch
   at its start, so GEMM1 copies weights while it runs: PDL);
2. GEMM1: one CTA per (8 intermediate columns, routed pair) reads the pair's expert straight
   from ``topk_ids`` (no routing pass), stages the pair's token row in shared memory once,
   fuses SiLU-and-mul and, with a static intermediate scale, the intermediate's quantization;
3. GEMM2: one CTA per (16 output rows, token) sums the token's top-k experts, router-weighted,
   inside the CTA (no per-pair output, no reduction launch); it stages the token's top-k rows
   of the intermediate in shared memory as ``stage_gemm2`` decides.

A dynamic intermediate scale costs no launch where ``fuse_h_quantization`` says so (one token,
small rows): GEMM1
writes float32 h and each CTA's amax of ``|h|``, and GEMM2 quantizes h while staging it, with
the scale those amaxes give (the same bytes as a quantization launch would write). Otherwise
the quantization of h is a launch between 2 and 3 that takes its scales from the same amaxes
(``H_QUANT_FROM_AMAX``; no pass over h for the amax, no grid sync) and is launched with PDL
after GEMM1. Out-of-range blocks are added back inside the
GEMMs' epilogues. A CTA stages at most ``MAX_STAGED`` values (GEMM1: the hidden size; GEMM2:
top-k x the intermediate size rounded up to 256).

Each pair reads its expert's weights, so pairs that share an expert read them again (mostly
from L2): this path is for ``tokens <= MAX_TOKENS``, above one token only while the routed
pairs are at most ``MAX_PAIR_FRACTION`` of the experts; other calls take the Triton kernels
(``usable``).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch

from ..formats import ActivationScheme
from . import _cuda_ext
from .sm90_triton import _capability, aligned_rows, cuda_quantize

# Which calls take this path: at most MAX_TOKENS tokens and, above one token, at most
# MAX_PAIR_FRACTION x experts routed pairs (pairs that share an expert read it again). Measured
# on an H100 with the L2 evict_first weight copies, every scheme, 2-8 tokens, medians of 3
# (benchmarks/results/moe_cuda_vs_triton_l2_evict_first_h100_20261124_1533.jsonl): Qwen3-30B-A3B
# (128 experts, top 8; 64 pairs at 8 tokens) 1.03-1.84x faster than Triton at every point;
# gpt-oss-20b (32 experts, top 4) 1.24-1.44x at 2 tokens, 1.01-1.35x at 4 (16 pairs), a tie
# (INT8) or 13-21 % slower (FP8) at 6 and 8.
MAX_TOKENS = 8
MAX_PAIR_FRACTION = 0.5
# (warps per CTA, cp.async stages per warp) of GEMM1; GEMM2's from gemm2_config unless set.
GEMM1_CONFIG = (4, 2)
GEMM2_CONFIG: tuple[int, int] | None = None
MAX_TOP_K = 16  # GEMM2's per-CTA table of the token's experts
MAX_STAGED = 16384  # values one CTA stages (kMoeMaxStagedK in the source)
STEP_K = 256  # K per staged step (kStepK)
POISON_OUTPUTS = False  # tests: fill intermediates with NaN / 0x7F first
# The unfused dynamic intermediate quantization takes its scales from GEMM1's per-CTA amaxes
# (False: sm90_triton.cuda_quantize over h, a plain launch; kept for the same-run comparison in
# benchmarks/tools/moe_h_quant.py)
H_QUANT_FROM_AMAX = True


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def staged_steps(k: int, rows: int = 1) -> int:
    """256-wide K steps a CTA stages for ``rows`` activation rows of ``k`` values."""
    return rows * -(-k // STEP_K)


# GEMM2 stages its token's rows of h (and quantizes a dynamic one itself) only up to this many
# values per CTA (top_k x intermediate size): every CTA of a token stages (and quantizes) the
# rows again, which paid at Qwen3-30B-A3B's 8 x 768 and not at gpt-oss-20b's 4 x 2880 (H100,
# docs/moe_kernels.md).
GEMM2_STAGE_MAX = 8192
# ... and quantizes a dynamic h itself only up to this many tokens: above, the launch from
# GEMM1's amaxes (H_QUANT_FROM_AMAX) with GEMM2 unstaged was as fast or faster (H100, Qwen3-
# 30B-A3B FP8 dynamic per tensor, fused against the launch: T=1 18.97 / 19.81 us, T=2 29.11 /
# 29.13, T=4 48.38 / 48.24, T=8 88.64 / 82.06; INT8 per token T=8 89.40 / 81.93;
# benchmarks/results/moe_h_quant_qwen3_h100_20261125_0706.jsonl)
FUSE_H_MAX_TOKENS = 1


def fuse_h_quantization(tokens: int, top_k: int, inter: int) -> bool:
    """Whether a dynamic intermediate scale is applied inside GEMM2 (no launch of its own)."""
    return tokens <= FUSE_H_MAX_TOKENS and top_k * inter <= GEMM2_STAGE_MAX


def stage_gemm2(tokens: int, top_k: int, inter: int, static_h: bool) -> bool:
    """Whether GEMM2 stages its token's rows of h in shared memory: a dynamic h where it
    quantizes it itself (``fuse_h_quantization``), a static one for small rows
    (``GEMM2_STAGE_MAX``) above one token. (H100, docs/moe_kernels.md: at Qwen3-30B-A3B staging
    took the FP8 static T=4 layer from 45.4 to 44.8 us and INT8 static from 49.6 to 48.7, and
    was no faster at one token, where each warp has 1-3 items to spread it over.)"""
    if static_h:
        return tokens > 1 and top_k * inter <= GEMM2_STAGE_MAX
    return fuse_h_quantization(tokens, top_k, inter)


def usable(num_tokens: int, top_k: int, num_experts: int, hidden: int, inter: int) -> bool:
    """Whether a call takes this path. One token's top-k experts are distinct, so nothing is
    read twice; more tokens may share experts, each pair reading its expert again, which
    MAX_PAIR_FRACTION bounds. The GEMMs stage their activations in shared memory, up to
    MAX_STAGED values per CTA."""
    return (0 < num_tokens <= MAX_TOKENS and top_k <= MAX_TOP_K
            and staged_steps(hidden) * STEP_K <= MAX_STAGED
            and staged_steps(inter, top_k) * STEP_K <= MAX_STAGED
            and (num_tokens == 1 or num_tokens * top_k <= MAX_PAIR_FRACTION * num_experts))


def gemm2_config(hidden: int, tokens: int, sms: int,
                 blocks_per_sm: Callable[[int], int]) -> tuple[int, int]:
    """GEMM2's launch config: the most warps per CTA (16, 12, 8) whose CTAs all fit on the SMs
    at once (``blocks_per_sm(warps)``: CTAs per SM), else 8. Its CTAs are latency chains over
    the token's experts, so more warps per chain pay while nothing waits for a second wave
    (H100, docs/moe_kernels.md: Qwen3 T=1 19.9 vs 25.5 us with 16 warps instead of 8)."""
    if GEMM2_CONFIG is not None:
        return GEMM2_CONFIG
    ctas = -(-hidden // 16) * tokens
    for warps in (16, 12):
        if ctas <= sms * blocks_per_sm(warps):
            return warps, 2
    return 8, 2


class Gemm2Plan(NamedTuple):
    fused_h: bool  # a dynamic intermediate scale applied inside GEMM2 (fuse_h_quantization)
    staged: bool  # GEMM2 stages the token's rows of h (stage_gemm2)
    warps: int
    stages: int


def gemm2_plan(lib: _cuda_ext.DecodeGemmLib, device_index: int, tokens: int, top_k: int,
               hidden: int, inter: int, act_int8: bool, static_h: bool,
               corrections: bool) -> Gemm2Plan:
    """How GEMM2 runs for a call (moe_forward's, and the benchmark's per-launch timing);
    ``corrections``: the down projection has out-of-range blocks (their staging area takes
    shared memory)."""
    staged = stage_gemm2(tokens, top_k, inter, static_h)
    steps = staged_steps(inter, top_k) if staged else 0
    warps, stages = gemm2_config(
        hidden, tokens, _num_sms(device_index),
        lambda w: lib.moe_blocks_per_sm(act_int8, False, w, 2, steps, corrections))
    return Gemm2Plan(not static_h and fuse_h_quantization(tokens, top_k, inter), staged, warps,
                     stages)


def moe_forward(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None,
    w13: _cuda_ext.MoeWeights,
    w2: _cuda_ext.MoeWeights,
    w13_input_scale: torch.Tensor | None,
    w2_input_scale: torch.Tensor | None,
    num_experts: int,
    hidden: int,
    inter: int,
    ip: int,
    hp: int,
    act_int8: bool,
    scheme1: int,
    scheme2: int,
    out_dtype: torch.dtype,
    apply_router_weight_on_input: bool,
) -> torch.Tensor:
    """``[T, H]`` routed-expert output for ``T <= MAX_TOKENS`` (callers check ``usable``)."""
    dev = x.device
    capability = _capability(dev.index or 0)
    lib = _cuda_ext.load(capability)
    pdl = capability >= 90
    t = x.shape[0]
    top_k = topk_ids.shape[1]
    w1, s1 = GEMM1_CONFIG
    static2 = scheme2 == int(ActivationScheme.STATIC_PER_TENSOR)
    plan2 = gemm2_plan(lib, dev.index or 0, t, top_k, hidden, inter, act_int8, static2,
                       w2.corr_blocks.numel() > 0)
    fused = plan2.fused_h

    weights = topk_weights
    if apply_router_weight_on_input:  # vLLM allows it for top-1 only
        x = x * topk_weights.to(x.dtype)
        weights = None
    elif weights.dtype != torch.float32 or not weights.is_contiguous():
        weights = weights.float().contiguous()
    ids = topk_ids if topk_ids.dtype in (torch.int32, torch.int64) else topk_ids.long()
    ids = ids.contiguous()
    emap = None
    if expert_map is not None:
        emap = expert_map if expert_map.dtype == torch.int32 else expert_map.to(torch.int32)
        emap = emap.contiguous()

    q1, xs1 = cuda_quantize(lib, aligned_rows(x), act_int8, scheme1, w13_input_scale,
                            POISON_OUTPUTS)

    p = t * top_k
    if static2:
        h = torch.empty((p, inter), dtype=torch.int8 if act_int8 else torch.float8_e4m3fn,
                        device=dev)
    else:
        h = torch.empty((p, inter), dtype=torch.float32, device=dev)
    if POISON_OUTPUTS and static2:
        h.view(torch.uint8).fill_(0x7F)
    elif POISON_OUTPUTS:
        h.fill_(float("nan"))
    h_scale = amax = None
    if static2:
        h_scale = (w2_input_scale if w2_input_scale.dtype == torch.float32
                   else w2_input_scale.float())
    from_amax = not static2 and not fused and H_QUANT_FROM_AMAX
    if fused or from_amax:
        # each GEMM1 CTA's amax of |h| (unrouted pairs: zeros, which leave it unchanged)
        amax = torch.empty((p, -(-inter // 8)), dtype=torch.float32, device=dev)
        if POISON_OUTPUTS:
            amax.fill_(float("nan"))
    lib.moe_gemm(q1, xs1, w13, ids, emap, None, h_scale, h, gated=True,
                 num_experts=num_experts, k=hidden, rows_per_expert=2 * ip, up_offset=ip,
                 n_out=inter, act_int8=act_int8,
                 a_per_row=scheme1 == int(ActivationScheme.DYNAMIC_PER_TOKEN),
                 warps=w1, stages=s1, pdl=pdl, amax=amax)

    q2, xs2 = h, h_scale
    if from_amax:
        per_row = scheme2 == int(ActivationScheme.DYNAMIC_PER_TOKEN)
        q2 = torch.empty((p, inter), dtype=torch.int8 if act_int8 else torch.float8_e4m3fn,
                         device=dev)
        xs2 = torch.empty(p if per_row else 1, dtype=torch.float32, device=dev)
        if POISON_OUTPUTS:
            q2.view(torch.uint8).fill_(0x80 if act_int8 else 0x7F)
            xs2.fill_(float("nan"))
        lib.quant_from_amax(h, q2, amax, xs2, act_int8, per_row, pdl)
    elif not static2 and not fused:
        # unrouted pairs' rows are zeros: they leave a per-tensor amax unchanged
        q2, xs2 = cuda_quantize(lib, h, act_int8, scheme2, None, POISON_OUTPUTS)

    out = torch.empty((t, hidden), dtype=out_dtype, device=dev)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    lib.moe_gemm(q2, xs2, w2, ids, emap, weights, None, out, gated=False,
                 num_experts=num_experts, k=inter, rows_per_expert=hp, up_offset=0,
                 n_out=hidden, act_int8=act_int8,
                 a_per_row=scheme2 == int(ActivationScheme.DYNAMIC_PER_TOKEN),
                 warps=plan2.warps, stages=plan2.stages, pdl=pdl, stage_a=plan2.staged,
                 amax=amax if fused else None)
    return out
