"""Measured experiment, not used by the backend: the INT8 prefill GEMM written in Gluon
(Triton's explicit-layout dialect, Triton 3.6), against the backend's Triton kernel.

``y = (x_q @ W^T) * x_scale * weight scales`` for a materialized int8 weight, with one reference
per 256-wide K tile (each tile's exact int32 sum times ``2**(e[tile, n] - 127)`` into a float32
accumulator) or one float32 scale per row. Why try it: in Triton 3.6 a ``tl.dot`` whose int32
result is converted (the per-tile rescale) is always followed by ``wgmma.wait_group 0``
(docs/kernels.md). Gluon issues ``wgmma`` and its waits explicitly; operands arrive by TMA into
a ring of ``STAGES`` shared-memory stages, one mbarrier each. Two schedules for the tiles:

- ``TWO_ACC``: two int32 accumulators take turns, so a tile's first MMA is issued before the
  other tile's sum is waited for and rescaled. ptxas serializes its ``wgmma``s anyway (C7514:
  accumulator registers read while a ``wgmma`` is in flight).
- otherwise one int32 accumulator per tile, ``wait_group 0``, rescale (as Triton does).

Result (H100, benchmarks/results/gluon_int8_prefill_h100_20261124_17*.jsonl, docs/kernels.md):
exact, and slower than the Triton kernel in every variant (N = K = 8192, M = 4096: Triton
per-tile 664-671 us, Gluon 661-777; per-row 437 against 499-797). Kept as a tool to reproduce
that, on the GPU machine: ``python benchmarks/tools/gluon_int8_prefill.py > out.jsonl``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import functools  # noqa: E402

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402

import bench_linear as bl  # noqa: E402
from w4a8_backend.kernels import triton_w4a8 as tk  # noqa: E402

BM, BN, BK = 128, 128, 128
STAGES = 4
NUM_WARPS = 8
TWO_ACC = False


@gluon.jit
def _issue_load(x_desc, w_desc, x_s, w_s, ready, j, n_steps, off_m, off_n,
                STAGES: gl.constexpr, BK: gl.constexpr):
    """TMA of K step ``j`` (if there is one) into its stage."""
    if j < n_steps:
        sj = j % STAGES
        mbarrier.expect(ready.index(sj), x_desc.block_type.nbytes + w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [off_m, j * BK], ready.index(sj), x_s.index(sj))
        tma.async_copy_global_to_shared(w_desc, [off_n, j * BK], ready.index(sj), w_s.index(sj))


@gluon.jit
def _tile_scale(e, layout: gl.constexpr):
    """2**(e - 127) of reference tile exponent bytes ``e``, in ``layout``."""
    return gl.convert_layout((e.to(gl.int32) << 23).to(gl.float32, bitcast=True), layout)


@gluon.jit
def _int8_prefill_gemm(
    x_desc, w_desc, xs_ptr, rs_ptr, y_ptr, bias_ptr, M, N, NP, n_steps, stride_ym,
    PER_TOKEN: gl.constexpr, TILE_SCALED: gl.constexpr, HAS_BIAS: gl.constexpr,
    TWO_ACC: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
):
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    off_m = pid_m * BM
    off_n = pid_n * BN

    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 32])
    cols: gl.constexpr = gl.SliceLayout(0, mma)
    rows: gl.constexpr = gl.SliceLayout(1, mma)
    # the tile exponents wait in a compact layout (a byte per thread) until their tile is
    # rescaled: in the accumulator's column layout they would hold 32 registers per thread
    flat: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    offs_flat = off_n + gl.arange(0, BN, layout=flat)

    x_s = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BM, BK], x_desc.layout)
    w_s = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for st in gl.static_range(STAGES):
        mbarrier.init(ready.index(st), count=1)
    for st in gl.static_range(STAGES - 1):
        _issue_load(x_desc, w_desc, x_s, w_s, ready, st, n_steps, off_m, off_n, STAGES, BK)

    if TILE_SCALED and not TWO_ACC:
        # one int32 accumulator per reference tile (2 steps), waited for and rescaled into acc
        acc = gl.zeros([BM, BN], gl.float32, layout=mma)
        acc_i = gl.zeros([BM, BN], gl.int32, layout=mma)
        e_next = gl.load(rs_ptr + offs_flat)
        for t in range(n_steps // 2):
            i = 2 * t
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            acc_i = warpgroup_mma(x_s.index(s), w_s.index(s).permute((1, 0)), acc_i,
                                  use_acc=False, is_async=True)
            s = (i + 1) % STAGES
            mbarrier.wait(ready.index(s), ((i + 1) // STAGES) & 1)
            acc_i = warpgroup_mma(x_s.index(s), w_s.index(s).permute((1, 0)), acc_i,
                                  is_async=True)
            acc_i = warpgroup_mma_wait(num_outstanding=0, deps=(acc_i,))
            e = e_next
            e_next = gl.load(rs_ptr + gl.minimum(t + 1, n_steps // 2 - 1) * NP + offs_flat)
            _issue_load(x_desc, w_desc, x_s, w_s, ready, i - 1 + STAGES, n_steps, off_m, off_n,
                        STAGES, BK)
            _issue_load(x_desc, w_desc, x_s, w_s, ready, i + STAGES, n_steps, off_m, off_n,
                        STAGES, BK)
            acc += acc_i.to(gl.float32) * _tile_scale(e, cols)[None, :]
    elif TILE_SCALED:
        # Reference tiles of 2 steps in pairs (n_steps is a multiple of 4): tile 2g sums into
        # acc_a and tile 2g + 1 into acc_b, each in its own registers; a tile's first MMA is
        # issued before the other accumulator is waited for and rescaled into acc
        acc = gl.zeros([BM, BN], gl.float32, layout=mma)
        acc_a = gl.zeros([BM, BN], gl.int32, layout=mma)
        acc_b = gl.zeros([BM, BN], gl.int32, layout=mma)
        scale_a = gl.zeros([BN], gl.uint8, layout=flat)
        scale_b = gl.zeros([BN], gl.uint8, layout=flat)
        for g in range(n_steps // 4):
            i = 4 * g
            # step i: tile 2g, first half
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            acc_a = warpgroup_mma(x_s.index(s), w_s.index(s).permute((1, 0)), acc_a,
                                  use_acc=False, is_async=True)
            acc_a, acc_b = warpgroup_mma_wait(num_outstanding=1, deps=(acc_a, acc_b))
            if g > 0:
                acc += acc_b.to(gl.float32) * _tile_scale(scale_b, cols)[None, :]
            scale_a = gl.load(rs_ptr + 2 * g * NP + offs_flat)
            _issue_load(x_desc, w_desc, x_s, w_s, ready, i - 1 + STAGES, n_steps, off_m, off_n,
                        STAGES, BK)
            # step i + 1: tile 2g, second half
            s = (i + 1) % STAGES
            mbarrier.wait(ready.index(s), ((i + 1) // STAGES) & 1)
            acc_a = warpgroup_mma(x_s.index(s), w_s.index(s).permute((1, 0)), acc_a,
                                  is_async=True)
            acc_a, acc_b = warpgroup_mma_wait(num_outstanding=1, deps=(acc_a, acc_b))
            _issue_load(x_desc, w_desc, x_s, w_s, ready, i + STAGES, n_steps, off_m, off_n,
                        STAGES, BK)
            # step i + 2: tile 2g + 1, first half; tile 2g's sum completes under it
            s = (i + 2) % STAGES
            mbarrier.wait(ready.index(s), ((i + 2) // STAGES) & 1)
            acc_b = warpgroup_mma(x_s.index(s), w_s.index(s).permute((1, 0)), acc_b,
                                  use_acc=False, is_async=True)
            acc_a, acc_b = warpgroup_mma_wait(num_outstanding=1, deps=(acc_a, acc_b))
            acc += acc_a.to(gl.float32) * _tile_scale(scale_a, cols)[None, :]
            scale_b = gl.load(rs_ptr + (2 * g + 1) * NP + offs_flat)
            _issue_load(x_desc, w_desc, x_s, w_s, ready, i + 1 + STAGES, n_steps, off_m, off_n,
                        STAGES, BK)
            # step i + 3: tile 2g + 1, second half
            s = (i + 3) % STAGES
            mbarrier.wait(ready.index(s), ((i + 3) // STAGES) & 1)
            acc_b = warpgroup_mma(x_s.index(s), w_s.index(s).permute((1, 0)), acc_b,
                                  is_async=True)
            acc_a, acc_b = warpgroup_mma_wait(num_outstanding=1, deps=(acc_a, acc_b))
            _issue_load(x_desc, w_desc, x_s, w_s, ready, i + 2 + STAGES, n_steps, off_m, off_n,
                        STAGES, BK)
        acc_b = warpgroup_mma_wait(num_outstanding=0, deps=(acc_b,))
        acc += acc_b.to(gl.float32) * _tile_scale(scale_b, cols)[None, :]
    else:
        acc_i = gl.zeros([BM, BN], gl.int32, layout=mma)
        for i in range(n_steps):
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            acc_i = warpgroup_mma(x_s.index(s), w_s.index(s).permute((1, 0)), acc_i,
                                  is_async=True)
            acc_i = warpgroup_mma_wait(num_outstanding=1, deps=(acc_i,))
            _issue_load(x_desc, w_desc, x_s, w_s, ready, i - 1 + STAGES, n_steps, off_m, off_n,
                        STAGES, BK)
        acc_i = warpgroup_mma_wait(num_outstanding=0, deps=(acc_i,))
        acc = acc_i.to(gl.float32) * gl.convert_layout(gl.load(rs_ptr + offs_flat), cols)[None, :]
    for st in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(st))

    offs_m = off_m + gl.arange(0, BM, layout=rows)
    offs_n = off_n + gl.arange(0, BN, layout=cols)
    m_mask = offs_m < M
    if PER_TOKEN:
        acc = acc * gl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
    else:
        acc = acc * gl.load(xs_ptr)
    n_mask = offs_n < N
    if HAS_BIAS:
        acc += gl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(gl.float32)[None, :]
    ptrs = y_ptr + offs_m.to(gl.int64)[:, None] * stride_ym + offs_n[None, :]
    gl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@functools.lru_cache(maxsize=None)
def _layouts(bm: int):
    x_layout = gl.NVMMASharedLayout.get_default_for([bm, BK], gl.int8)
    w_layout = gl.NVMMASharedLayout.get_default_for([BN, BK], gl.int8)
    return x_layout, w_layout


def int8_prefill_gemm(q: torch.Tensor, xs: torch.Tensor, dense: torch.Tensor,
                      scales: torch.Tensor, n: int, per_token: bool, tile_scaled: bool,
                      bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``q`` int8 [M, K]; ``dense`` the materialized int8 weight [NP, KP]; ``scales``: the
    tile exponents [KP / 256, NP] (uint8, ``tile_scaled``) or one float32 scale per row [NP]."""
    m, k = q.shape
    n_pad, kp = dense.shape
    y = torch.empty((m, n), dtype=out_dtype, device=q.device)
    if m == 0:
        return y
    x_layout, w_layout = _layouts(BM)
    x_desc = TensorDescriptor(q, [m, k], [q.stride(0), 1], [BM, BK], x_layout)
    w_desc = TensorDescriptor(dense, [n_pad, kp], [kp, 1], [BN, BK], w_layout)
    grid = (n_pad // BN, triton.cdiv(m, BM))
    _int8_prefill_gemm[grid](
        x_desc, w_desc, xs, scales, y, bias if bias is not None else y, m, n, n_pad,
        kp // BK, y.stride(0),
        PER_TOKEN=per_token, TILE_SCALED=tile_scaled, HAS_BIAS=bias is not None,
        TWO_ACC=TWO_ACC, STAGES=STAGES, num_warps=NUM_WARPS)
    return y


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = "cuda"
    timer = bl.Timer()
    N = K = 8192
    g = torch.Generator(device=dev)
    g.manual_seed(7)
    W = torch.randint(-96, 97, (N, K), device=dev, dtype=torch.int8, generator=g)
    E = torch.randint(120, 131, (K // 256, N), device=dev, dtype=torch.uint8, generator=g)
    RS = torch.exp2(torch.randint(-8, 3, (N,), device=dev, generator=g).float())
    packed = torch.empty((N, K // 2), dtype=torch.uint8, device=dev)
    codes = torch.empty((N, K // 32), dtype=torch.uint8, device=dev)
    counters = torch.zeros(4096, dtype=torch.int32, device=dev)
    lut = tk.lut_for(torch.device(dev), True)

    def reference(q, xs, tile):
        acc = torch.zeros(q.shape[0], N, dtype=torch.float64, device=dev)
        if tile:
            for t in range(K // 256):
                sl = slice(256 * t, 256 * t + 256)
                p = q[:, sl].float() @ W[:, sl].float().t()  # exact: integers below 2**24
                acc += p.double() * torch.exp2(E[t].double() - 127)[None, :]
        else:
            for t in range(K // 1024):
                sl = slice(1024 * t, 1024 * t + 1024)
                acc += (q[:, sl].float() @ W[:, sl].float().t()).double()
            acc *= RS.double()[None, :]
        return acc * xs.double()[:, None]

    def gluon(bm, warps, two, stages, tile):
        def run(q, xs):
            global BM, NUM_WARPS, TWO_ACC, STAGES
            BM, NUM_WARPS, TWO_ACC, STAGES = bm, warps, two, stages
            return int8_prefill_gemm(q, xs, W, E if tile else RS, N, True, tile, None,
                                     torch.bfloat16)
        return run

    def triton(tile):
        def run(q, xs):
            return tk.w4a8_gemm(q, xs, packed, codes, E, counters, lut, N, True, True, None,
                                torch.bfloat16, dense=W,
                                prefill_row_scale=None if tile else RS)
        return run

    VARIANTS = {  # (BM, warps, TWO_ACC, stages); the 1732 and 1734 UTC runs timed subsets
        "triton tile": (triton(True), True),
        "gluon tile wait0 bm128 w8 s4": (gluon(128, 8, False, 4, True), True),
        "gluon tile wait0 bm128 w8 s5": (gluon(128, 8, False, 5, True), True),
        "gluon tile wait0 bm128 w8 s6": (gluon(128, 8, False, 6, True), True),
        "gluon tile wait0 bm64 w4 s4": (gluon(64, 4, False, 4, True), True),
        "gluon tile 2acc bm128 w8 s4": (gluon(128, 8, True, 4, True), True),
        "gluon tile 2acc bm128 w8 s6": (gluon(128, 8, True, 6, True), True),
        "triton row": (triton(False), False),
        "gluon row bm128 w8 s3": (gluon(128, 8, False, 3, False), False),
        "gluon row bm128 w8 s4": (gluon(128, 8, False, 4, False), False),
        "gluon row bm128 w8 s6": (gluon(128, 8, False, 6, False), False),
        "gluon row bm64 w4 s4": (gluon(64, 4, False, 4, False), False),
    }
    for M in (512, 4096):
        q = torch.randint(-127, 128, (M, K), device=dev, dtype=torch.int8, generator=g)
        xs = torch.rand(M, device=dev, generator=g) * 1e-2 + 1e-3
        refs = {t: reference(q, xs, t) for t in (True, False)}
        res = {}
        for name, (fn, tile) in VARIANTS.items():
            try:
                y = fn(q, xs); torch.cuda.synchronize()
                ref = refs[tile]
                err = ((y.double() - ref).norm() / ref.norm()).item()
                res[name] = {"err": err, "us": []}
            except Exception as e:  # a variant that does not build or run is reported
                res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(name, res[name], file=sys.stderr, flush=True)
        for _ in range(3):
            for name, (fn, tile) in VARIANTS.items():
                if "us" in res[name]:
                    res[name]["us"].append(round(timer.time_us(lambda: fn(q, xs)), 2))
        for name, r in res.items():
            print(json.dumps({"M": M, "variant": name, **r}), flush=True)


if __name__ == "__main__":
    main()
