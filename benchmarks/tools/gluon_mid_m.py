"""Measured experiment: the FP8 mid-M GEMM (M = 16-128) written in Gluon, with the decoded
weight in shared memory as the ``wgmma`` B operand, against the backend's Triton kernel.

Why try it: the Triton kernel (``triton_w4a8._w4a8_gemm``) decodes the weight into registers
and feeds it as the ``wgmma`` register operand; Triton 3.6 then waits for every ``wgmma``
before the next decode (``wait_group 0``), so decode and MMA take turns. Here each K step
(``G`` groups of 64) is:

1. TMA into a ring of ``STAGES`` stages (one mbarrier each): per group the activations' low
   and high 32 K columns ([BM, 32] each) and the packed weight words [BN, 32]; every
   ``16 / (2G)``-th step also a box of the next steps' block codes [BN, 16] (a TMA box must
   start 16-byte aligned, so one step's 2G codes cannot be a box of their own);
2. each thread reads a weight row's 32 bytes of a group and decodes them with the backend's
   ``prmt`` decode (``_decode_ptx``: per block an 8-entry E4M3 table from its code byte) into
   two [BN, 32] E4M3 halves. In the word layout the low half of a 64-wide group is K 0-31 and
   the high half K 32-63, so each half pairs with the matching activation columns;
3. the halves go to one of two decoded buffers (the step two back has been retired by
   ``wgmma.wait_group``), and 2G asynchronous ``wgmma m(BM) n(BN) k32`` are issued. The next
   step's decode runs while they do.

Split K over CTAs: float32 partials in a workspace, the last CTA of a tile (an arrival
counter) sums them in split order and runs the epilogue (activation scale, ``2**r[n]``, bias).
Out-of-range blocks are not added (the weights here have none).

Result (H100, 2026-11-25, N = K = 8192, GEMM alone; docs/kernels.md): exact to the same
2e-3 as the Triton kernel (FP8 fast accumulation) and slower in every variant. Best Gluon
against Triton: M = 16 29.7 against 22.1 us, M = 64 33.9 against 27.9, M = 128 42.7 against
37.8 (``gluon_mid_m_row_decode_h100_20261125_0134.jsonl``; the earlier forms in
``gluon_mid_m_first_h100_20261125_0128.jsonl``, one group per step, and
``gluon_mid_m_h100_20261125_0130.jsonl``, a word per thread in the decode). ncu (M = 64,
``ncu_gluon_mid_m_vs_triton_h100_20261125.txt``): both kernels at 1.05-1.24 TB/s of DRAM
traffic and 12.5 % occupancy, each scheduler issuing every 2.6 (Gluon) or 2.9 (Triton) cycles
with about 2 warps. Latency bounds them, not bandwidth. Staging the decoded weight through
shared memory added stores, a proxy fence and a barrier to each step without letting more
work overlap.

On the GPU machine: ``python benchmarks/tools/gluon_mid_m.py > out.jsonl``: one JSON line per
(shape, M, variant): microseconds (L2 flushed, CUDA-graph replay, bench_linear.Timer) and the
error against the exact reference.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402

from w4a8_backend.kernels import _decode_ptx  # noqa: E402

CODE_BOX = gl.constexpr(16)  # codes per TMA box (the smallest inner box TMA takes)
_FP8_LO = gl.constexpr(_decode_ptx.FP8_LO)
_FP8_HI = gl.constexpr(_decode_ptx.FP8_HI)
_CONSTRAINTS_9 = gl.constexpr("=r," + ",".join(["r"] * 9))


@gluon.jit
def _issue(x_desc, w_desc, c_desc, x_s, w_s, c_s, ready, j, n_steps, step0, off_m, off_n,
           G: gl.constexpr, STAGES: gl.constexpr, CS: gl.constexpr, CBUF: gl.constexpr):
    """TMA of this split's step ``j`` (if there is one; G groups of 64 K) into its stage: the
    activations as 2G [BM, 32] boxes (each group's low and high half), the words as G [BN, 32];
    every CS-th step also the codes of the next CS steps (a TMA box must start 16-byte aligned,
    else the copy faults with an illegal instruction)."""
    if j < n_steps:
        s = j % STAGES
        kk = step0 + j
        nbytes: gl.constexpr = G * (2 * x_desc.block_type.nbytes + w_desc.block_type.nbytes)
        if j % CS == 0:
            mbarrier.expect(ready.index(s), nbytes + c_desc.block_type.nbytes)
        else:
            mbarrier.expect(ready.index(s), nbytes)
        for h in gl.static_range(2 * G):
            tma.async_copy_global_to_shared(x_desc, [off_m, kk * 64 * G + 32 * h],
                                            ready.index(s), x_s.index(s * 2 * G + h))
        for g in gl.static_range(G):
            tma.async_copy_global_to_shared(w_desc, [off_n, kk * 32 * G + 32 * g],
                                            ready.index(s), w_s.index(s * G + g))
        if j % CS == 0:
            tma.async_copy_global_to_shared(c_desc, [off_n, kk * 2 * G], ready.index(s),
                                            c_s.index((j // CS) % CBUF))


@gluon.jit
def _decode_half(b, code, HIGH: gl.constexpr):
    """E4M3 weights of the low or high half of words ``b`` [BN, 32] (uint8) with block codes
    ``code`` [BN, 1] (the tables of triton_w4a8._lut_half)."""
    c = code.to(gl.int32)
    live = c != 0
    e = (c - 15) * 8
    la = gl.where(live, e * 0x01010100 + 0x0C080000, 0)
    lb = gl.where(live, e * 0x01010101 + 0x1C181410, 0)
    t0 = gl.broadcast(la, b)[0]
    t1 = gl.broadcast(lb, b)[0]
    if HIGH:
        out = gl.inline_asm_elementwise(_FP8_HI, _CONSTRAINTS_9, [b, t0, t1], dtype=gl.uint8,
                                        is_pure=True, pack=4)
    else:
        out = gl.inline_asm_elementwise(_FP8_LO, _CONSTRAINTS_9, [b, t0, t1], dtype=gl.uint8,
                                        is_pure=True, pack=4)
    return out.to(gl.float8e4nv, bitcast=True)


@gluon.jit
def _code_column(codes, cols, c: gl.constexpr, layout: gl.constexpr):
    """Column ``c`` of the code rows [BN, CODE_BOX] (each row in one thread) as [BN, 1] in
    ``layout`` (the words' rows: the same threads)."""
    col = gl.sum(gl.where(cols[None, :] == c, codes, 0), axis=1).to(gl.uint8)
    return gl.convert_layout(col, gl.SliceLayout(1, layout))[:, None]


@gluon.jit
def _mid_gemm(x_desc, w_desc, c_desc, xs_ptr, rs_ptr, y_ptr, bias_ptr, ws_ptr, cnt_ptr,
              M, N, steps_per_split, total_steps, stride_ym,
              PER_TOKEN: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr,
              G: gl.constexpr, STAGES: gl.constexpr, WARPS_N: gl.constexpr,
              num_warps: gl.constexpr):
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    CS: gl.constexpr = CODE_BOX // (2 * G)  # steps whose codes one box holds
    CBUF: gl.constexpr = STAGES // CS + 2  # code boxes in flight or in use
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    pid_k = gl.program_id(2)
    off_m = pid_m * BM
    off_n = pid_n * BN
    step0 = pid_k * steps_per_split
    n_steps = gl.minimum(steps_per_split, total_steps - step0)

    # warpgroups along M (BM = 64 per warpgroup) and along N (WARPS_N halves of BN)
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps // WARPS_N, WARPS_N],
        instr_shape=[16, BN // WARPS_N, 32])
    # a row's 32 word bytes in one thread (TPR threads per row when there are more threads
    # than rows): the block's two decode tables are built once per row, not once per word
    TPR: gl.constexpr = max(num_warps * 32 // BN, 1)
    words: gl.constexpr = gl.BlockedLayout([1, 32 // TPR], [32 // TPR, TPR], [num_warps, 1],
                                           [1, 0])
    code_rows: gl.constexpr = gl.BlockedLayout([1, CODE_BOX], [32, 1], [num_warps, 1], [1, 0])
    code_cols = gl.arange(0, CODE_BOX, layout=gl.SliceLayout(0, code_rows))
    dec_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, 32], gl.float8e4nv)

    x_s = gl.allocate_shared_memory(x_desc.dtype, [STAGES * 2 * G, BM, 32], x_desc.layout)
    w_s = gl.allocate_shared_memory(w_desc.dtype, [STAGES * G, BN, 32], w_desc.layout)
    c_s = gl.allocate_shared_memory(c_desc.dtype, [CBUF, BN, CODE_BOX], c_desc.layout)
    # two steps of decoded halves: [buffer, group, half]
    d_s = gl.allocate_shared_memory(gl.float8e4nv, [2 * G * 2, BN, 32], dec_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for st in gl.static_range(STAGES):
        mbarrier.init(ready.index(st), count=1)
    for st in gl.static_range(STAGES):
        _issue(x_desc, w_desc, c_desc, x_s, w_s, c_s, ready, st, n_steps, step0, off_m, off_n,
               G, STAGES, CS, CBUF)

    acc = gl.zeros([BM, BN], gl.float32, layout=mma)
    # at least one trip (the host sizes the splits so): a zero-trip path that keeps the zeroed
    # accumulator makes ptxas serialize the wgmmas (C7515)
    for ch in range(0, gl.maximum(n_steps // CS, 1)):
        for u in gl.static_range(CS):
            j = ch * CS + u
            s = j % STAGES
            mbarrier.wait(ready.index(s), (j // STAGES) & 1)
            if u % CS == 0:
                codes = c_s.index(ch % CBUF).load(code_rows)
            buf = u % 2
            for g in gl.static_range(G):
                b = w_s.index(s * G + g).load(words)
                c_lo = _code_column(codes, code_cols, 2 * (u * G + g), words)
                c_hi = _code_column(codes, code_cols, 2 * (u * G + g) + 1, words)
                d_s.index((buf * G + g) * 2).store(_decode_half(b, c_lo, False))
                d_s.index((buf * G + g) * 2 + 1).store(_decode_half(b, c_hi, True))
            # (step j - 2's wgmmas were retired at the end of step j - 1)
            fence_async_shared()
            gl.thread_barrier()
            tok = warpgroup_mma(x_s.index(s * 2 * G), d_s.index(buf * G * 2).permute((1, 0)),
                                acc, is_async=True)
            for h in gl.static_range(1, 2 * G):
                tok = warpgroup_mma(x_s.index(s * 2 * G + h),
                                    d_s.index(buf * G * 2 + h).permute((1, 0)), tok,
                                    is_async=True)
            # retire step j - 1 (step j's stay in flight under the next decode): its decoded
            # buffers and its stage are free again
            acc = warpgroup_mma_wait(num_outstanding=2 * G, deps=(tok,))
            if j >= 1:
                _issue(x_desc, w_desc, c_desc, x_s, w_s, c_s, ready, j - 1 + STAGES, n_steps,
                       step0, off_m, off_n, G, STAGES, CS, CBUF)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for st in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(st))

    rows: gl.constexpr = gl.SliceLayout(1, mma)
    cols: gl.constexpr = gl.SliceLayout(0, mma)
    offs_m = off_m + gl.arange(0, BM, layout=rows)
    offs_n = off_n + gl.arange(0, BN, layout=cols)
    m_mask = offs_m < M
    n_mask = offs_n < N
    o_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT > 1:
        ws_tile = ws_ptr + offs_m.to(gl.int64)[:, None] * N + offs_n[None, :]
        tile_stride = M * N
        gl.store(ws_tile + pid_k * tile_stride, acc, mask=o_mask)
        gl.thread_barrier()
        cnt = cnt_ptr + pid_n * gl.num_programs(1) + pid_m
        arrived = gl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            acc = gl.zeros([BM, BN], gl.float32, layout=mma)
            for sp in range(SPLIT):
                acc += gl.load(ws_tile + sp * tile_stride, mask=o_mask, other=0.0,
                               cache_modifier=".cg")
            gl.atomic_xchg(cnt, 0)
            _epilogue(acc, offs_m, offs_n, m_mask, n_mask, xs_ptr, rs_ptr, y_ptr, bias_ptr,
                      stride_ym, PER_TOKEN, HAS_BIAS)
    else:
        _epilogue(acc, offs_m, offs_n, m_mask, n_mask, xs_ptr, rs_ptr, y_ptr, bias_ptr,
                  stride_ym, PER_TOKEN, HAS_BIAS)


@gluon.jit
def _epilogue(acc, offs_m, offs_n, m_mask, n_mask, xs_ptr, rs_ptr, y_ptr, bias_ptr, stride_ym,
              PER_TOKEN: gl.constexpr, HAS_BIAS: gl.constexpr):
    if PER_TOKEN:
        acc = acc * gl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
    else:
        acc = acc * gl.load(xs_ptr)
    acc = acc * gl.load(rs_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += gl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(gl.float32)[None, :]
    ptrs = y_ptr + offs_m.to(gl.int64)[:, None] * stride_ym + offs_n[None, :]
    gl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@functools.lru_cache(maxsize=None)
def _layouts(bm: int, bn: int):
    # words: 32-byte swizzle, so that a warp's 16-byte loads of 32-byte rows hit every bank
    return (gl.NVMMASharedLayout.get_default_for([bm, 32], gl.float8e4nv),
            gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=8, rank=2),
            gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=2))


def mid_gemm(q: torch.Tensor, xs: torch.Tensor, packed: torch.Tensor, codes: torch.Tensor,
             row_scale: torch.Tensor, counters: torch.Tensor, n: int, per_token: bool,
             bias: torch.Tensor | None, out_dtype: torch.dtype, bm: int, bn: int, groups: int,
             split: int, stages: int, warps: int, warps_n: int) -> torch.Tensor:
    """``q`` E4M3 [M, K]; the repacked weight (``packed`` [NP, KP/2], ``codes`` [NP, KP/32],
    ``row_scale`` float32 2**r [NP]); out-of-range blocks are not added here."""
    m, k = q.shape
    n_pad, kp = packed.shape[0], packed.shape[1] * 2
    y = torch.empty((m, n), dtype=out_dtype, device=q.device)
    xl, wl, cl = _layouts(bm, bn)
    x_desc = TensorDescriptor(q, [m, k], [q.stride(0), 1], [bm, 32], xl)
    w_desc = TensorDescriptor(packed, [n_pad, kp // 2], [kp // 2, 1], [bn, 32], wl)
    c_desc = TensorDescriptor(codes, [n_pad, kp // 32], [kp // 32, 1], [bn, CODE_BOX.value], cl)
    cs = CODE_BOX.value // (2 * groups)
    total = kp // (64 * groups)
    if total % cs:
        raise ValueError(f"the experiment needs K padded to {64 * groups * cs}, got {kp}")
    per_split = triton.cdiv(total // cs, split) * cs
    split = triton.cdiv(total, per_split)
    ws = torch.empty((split, m, n), dtype=torch.float32, device=q.device) if split > 1 else y
    grid = (n_pad // bn, triton.cdiv(m, bm), split)
    _mid_gemm[grid](x_desc, w_desc, c_desc, xs, row_scale, y, bias if bias is not None else y,
                    ws, counters, m, n, per_split, total, y.stride(0),
                    PER_TOKEN=per_token, HAS_BIAS=bias is not None, SPLIT=split, G=groups,
                    STAGES=stages, WARPS_N=warps_n, num_warps=warps)
    return y


VARIANTS = [  # (BM, BN, groups per step, split, stages, warps, warps along N)
    (64, 128, 1, 2, 6, 4, 1),
    (64, 128, 2, 2, 4, 8, 2), (64, 256, 2, 4, 4, 8, 2), (64, 128, 4, 2, 3, 8, 2),
    (64, 256, 1, 4, 6, 8, 2), (64, 128, 2, 4, 4, 4, 1), (128, 128, 2, 2, 4, 8, 1),
    (128, 256, 2, 4, 3, 8, 1),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="8192x8192")
    ap.add_argument("--ms", default="16,64,128")
    args = ap.parse_args()
    from bench_linear import Timer, run_metadata
    from w4a8_backend.formats import mxfp4
    from w4a8_backend.kernels import _sm90_repack, triton_w4a8 as tw

    print(json.dumps({"meta": run_metadata()}), flush=True)
    timer = Timer()
    dev = "cuda"
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        g = torch.Generator(device=dev).manual_seed(0)
        weight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev, generator=g)
        # 12 binades: every block inside the FP8 folded window (no out-of-range blocks)
        scale = torch.randint(120, 132, (n, k // 32), dtype=torch.uint8, device=dev, generator=g)
        rep = _sm90_repack.repack_mxfp4(weight, scale, act_int8=False)
        assert rep.corr_blocks.numel() == 0, "the experiment assumes no out-of-range blocks"
        w_exact = mxfp4.dequantize_mxfp4(weight, scale).double()
        counters = torch.zeros(1 << 16, dtype=torch.int32, device=dev)
        lut = tw.lut_for(torch.device(dev), False)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device=dev, generator=g) * 4
            q = x.clamp(-448, 448).to(torch.float8_e4m3fn)
            xs = torch.tensor([0.01], device=dev)
            ref = (q.double() @ w_exact.t()) * 0.01
            ref_norm = ref.norm().item()
            base = {"n": n, "k": k, "m": m}

            def triton_gemm():
                return tw.w4a8_gemm(q, xs, rep.packed, rep.codes, rep.row_scale, counters, lut,
                                    n, False, False, None, torch.bfloat16)

            def err_of(y):
                return ((y.double() - ref).norm() / ref_norm).item()

            runs = {"triton": triton_gemm}
            for v in VARIANTS:
                runs[f"gluon {v}"] = functools.partial(
                    mid_gemm, q, xs, rep.packed, rep.codes, rep.row_scale, counters, n, False,
                    None, torch.bfloat16, *v)
            errs = {}
            for name, fn in list(runs.items()):
                try:
                    y = fn()
                    torch.cuda.synchronize()
                    errs[name] = err_of(y)
                except Exception as e:  # a variant that does not build: say so, go on
                    print(json.dumps({**base, "variant": name, "error": repr(e)[:400]}),
                          flush=True)
                    traceback.print_exc(limit=3)
                    del runs[name]
            times = {name: [] for name in runs}
            for _ in range(3):
                for name, fn in runs.items():
                    times[name].append(round(timer.time_us(fn), 2))
            for name in runs:
                print(json.dumps({**base, "variant": name, "us": sorted(times[name])[1],
                                  "samples": times[name], "rel_err": errs[name]}), flush=True)


if __name__ == "__main__":
    main()
