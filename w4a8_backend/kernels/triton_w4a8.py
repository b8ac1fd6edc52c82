"""Triton kernels of the SM90/SM89/SM80 W4A8 MXFP4 linear (imports triton: GPU machines only).

Kernels
- ``_quant_act``: FP8/INT8 activation quantization, bit-exact with
  ``w4a8_backend.formats.quantize_activation`` (IEEE division, RNE, saturation).
- ``_w4a8_gemm``: the GEMM, computed as ``out^T = W @ x^T`` so that the weight tile is the wide
  (MMA "M") operand even at M = 1 (decode); the weight is decoded in registers from the word
  layout of ``_sm90_repack`` (a per-block byte table looked up with ``prmt``, ``_decode_ptx``;
  under Triton's interpreter: MXFP4 code -> E4M3 bits -> float16 -> times a per-block power of
  two -> exact E4M3 or int8), optional split-K with an in-kernel "last CTA reduces" fix-up (no extra
  launch, no memset: the per-tile counter is reset by the reducing CTA). The same kernel, with
  ``W_DENSE``, reads a materialized weight (prefill path before sm_90, and INT8 with one
  reference per 256-wide K tile).
- ``_prefill_gemm``: the prefill GEMM on the materialized FP8 / INT8-per-row weight on sm_90:
  TMA descriptors, one program per SM, tiles in grouped order.
- ``_materialize``: decodes the whole weight once per call into E4M3/int8 (prefill path, where
  decoding per output tile would cost more than writing the weight once).
- ``_correction``: adds the exact contribution of the out-of-range blocks.
See docs/kernels.md.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import _decode_ptx, _triton_l2
from ._sm90_repack import INT8_TILE, decode_lut

INT8_TILE_K = tl.constexpr(INT8_TILE)

_LUTS: dict = {}


def lut_for(device: torch.device, act_int8: bool) -> torch.Tensor:
    """The decode table on ``device`` (built once; call outside CUDA-graph capture)."""
    key = (str(device), act_int8)
    if key not in _LUTS:
        _LUTS[key] = decode_lut(act_int8).to(device)
    return _LUTS[key]

# Weight loads that stream a weight once may ask the L2 to evict those lines first; Triton 3.6
# drops the request on its pipelined copies, _triton_l2 restores it (False: this Triton has no
# stage hook, or W4A8_SM90_L2_HINT=0).
WEIGHT_EVICT_FIRST = _triton_l2.install()
# Where it pays, measured on an H100 (benchmarks/tools/triton_l2_ab.py, 2026-11-25 17:13 UTC, L2
# flushed; the policy on the weight nibbles, not the block codes): the FP8 GEMM at M <= 32 over
# weights of >= 25 MB 5-10 % faster (8192 x 8192 M = 16: 24.0 -> 21.9 us; as a decode step
# 20.9 -> 19.4 us); 4096 x 4096 M = 16 3 % slower, M >= 64 and the INT8 GEMM within -3 .. +3 %.
EVICT_FIRST_MAX_M = 32
EVICT_FIRST_MIN_BYTES = 25 << 20


def weight_eviction(m: int, m_blocks: int, weight_bytes: int, int8: bool) -> str:
    """The dense GEMM's weight-load L2 policy: ``evict_first`` for FP8 activations (not
    ``int8``, split or not) on tiles read by one program each (``m_blocks`` == 1) where it
    measured faster, else the default."""
    on = (WEIGHT_EVICT_FIRST and not int8 and m_blocks == 1 and m <= EVICT_FIRST_MAX_M
          and weight_bytes >= EVICT_FIRST_MIN_BYTES)
    return "evict_first" if on else ""


FP8_MAX = 448.0
INT8_MAX = 127.0
MIN_DYNAMIC_AMAX = 1e-12
# Tests set this to fill every output/workspace with NaN before the kernels run, so that an
# element the kernels fail to write cannot pass.
POISON_OUTPUTS = False
# The prmt table decode (fast); False selects the float16-arithmetic decode (kept for comparison).
DECODE_LUT = True
# Programmatic dependent launch (sm_90+) of the fused GEMM after the activation quantization:
# the quantization releases it at its start, so the GEMM's launch overlaps the quantization and
# its programs wait (griddepcontrol.wait) before their first load. Only for FP8 tiles of at
# least PDL_MIN_BN x PDL_MIN_BM, whose programs take an SM each (117-183 KB of shared memory):
# smaller programs launched early were packed unevenly onto the SMs the quantization left free,
# and got slower (H100: 16- and 32-token tiles, benchmarks/tools/triton_pdl.py; 64 x 64 tiles,
# 4096 x 14336 M = 64 31.9 -> 39.5 us, benchmarks/tools/mid_m_rule.py; docs/kernels.md).
PDL = True
PDL_MIN_BM = 64
PDL_MIN_BN = 128
# The correction launch after the fused GEMM (layers with out-of-range blocks: INT8 nearly
# always) with PDL: the GEMM releases it at its start, its programs wait for the GEMM's writes.
# Only after GEMM tiles of at most CORRECTION_PDL_MAX_BM tokens: H100, INT8, whole op, 5 shapes
# (benchmarks/tools/correction_pdl.py): 0.94-1.03x (mean 0.99x) at M = 17-64, whose tiles are
# 4-warp programs, but 1.00-1.06x at M = 128-256 (one 8-warp program per SM).
CORRECTION_PDL = True
CORRECTION_PDL_MAX_BM = 64
# INT8 between decode and prefill (layers that keep their FP8 codes, sm90_triton.INT8_SPLIT_ENV):
# the int8 activations as two exact E4M3 planes on the FP8 repacking of the same weight
# (``split_config``, docs/int8_kernel.md), up to tiles of INT8_SPLIT_MAX_BM tokens. H100, whole
# op, 5 shapes (int8_fp8_split_h100_20261125_1043.jsonl): 0.80-0.94x the INT8 time at M = 17-32,
# 0.91-0.98x at M = 64 on three shapes but 1.02-1.05x on 6144 x 4096 and 4096 x 4096; 128-token
# tiles fit only 2 stages and were 1.4-1.5x slower.
INT8_SPLIT_MAX_BM = 64


@functools.lru_cache(maxsize=None)
def _pdl_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` may use PDL (``PDL``, sm_90+, not under Triton's
    interpreter, which runs no PTX)."""
    return (PDL and device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and _pdl_capable(device.index or 0))


def gemm_launch_pdl(device: torch.device, act_int8: bool, bn: int, bm: int,
                    materialized: bool) -> bool:
    """Whether ``_w4a8_gemm`` with a ``bn`` x ``bm`` tile is launched with PDL: FP8 tiles of at
    least PDL_MIN_BM tokens and PDL_MIN_BN weight rows on the packed weight (see PDL)."""
    return (not materialized and not act_int8 and bm >= PDL_MIN_BM and bn >= PDL_MIN_BN
            and pdl_enabled(device))


# --------------------------------------------------------------------------------------------
# activation quantization
# --------------------------------------------------------------------------------------------
@triton.jit
def split_planes(q):
    """int8 codes (any int type) as the two exact E4M3 planes of ``split_int8``: (16 *
    floor(q / 16), q - that)."""
    q = q.to(tl.int32)
    hi = (q >> 4) << 4
    return hi.to(tl.float32).to(tl.float8e4nv), (q - hi).to(tl.float32).to(tl.float8e4nv)


@triton.jit
def quantize_values(v, scale, ACT_INT8: tl.constexpr):
    """float32 ``v`` -> E4M3 or int8 codes of ``v / scale``, bit-exact with
    ``formats.quantize_activation`` (IEEE division, saturation, RNE; int8 NaN -> 0). Also used by
    the MoE's GEMM1 epilogue to quantize its output with a static scale."""
    QMAX: tl.constexpr = 127.0 if ACT_INT8 else 448.0
    v = tl.div_rn(v, scale)
    v = tl.clamp(v, -QMAX, QMAX, propagate_nan=tl.PropagateNan.ALL)
    if ACT_INT8:
        v = libdevice.rint(v)
        v = tl.where(v != v, 0.0, v)
        return v.to(tl.int8)
    else:
        return v.to(tl.float8e4nv)


@triton.jit
def dynamic_scale(amax, ACT_INT8: tl.constexpr):
    """The dynamic scale of an amax, as the reference computes it: torch (CUDA) divides a tensor
    by a Python scalar as a multiplication by the float32 reciprocal, and the reference scale is
    ``amax.clamp(min) / qmax``."""
    INV_QMAX: tl.constexpr = 1.0 / 127.0 if ACT_INT8 else 1.0 / 448.0
    return tl.maximum(amax, 1e-12, propagate_nan=tl.PropagateNan.ALL) * INV_QMAX


@triton.jit
def nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nan_amax(v, axis: tl.constexpr):
    """``max(|v|)`` along ``axis`` that is NaN when any element is (as torch's amax)."""
    return tl.reduce(tl.abs(v), axis, nan_max)


@triton.jit
def _amax_partials(x_ptr, part_ptr, K, stride_xm, CHUNKS, TILES, BLOCK: tl.constexpr):
    """Program p: the amax over the tiles (row, BLOCK-wide chunk of it) p, p + G, ... of x,
    into ``part_ptr[p]`` (a dynamic per-tensor scale's first pass, spread over G programs)."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for t in range(pid, TILES, tl.num_programs(0)):
        row = t // CHUNKS
        k0 = (t - row * CHUNKS) * BLOCK
        xv = tl.load(x_ptr + row.to(tl.int64) * stride_xm + k0 + offs, mask=k0 + offs < K,
                     other=0.0)
        acc = nan_max(acc, tl.abs(xv.to(tl.float32)))
    tl.store(part_ptr + pid, nan_amax(acc, 0))


@triton.jit
def _quant_chunks(x_ptr, q_ptr, s_in_ptr, s_out_ptr, row, chunk, chunks, rows, K, stride_xm,
                  n_part, ACT_INT8: tl.constexpr, MODE: tl.constexpr, ONE_PASS: tl.constexpr,
                  BLOCK: tl.constexpr, PART_P2: tl.constexpr, SPLIT: tl.constexpr):
    """One quantization program: row ``row`` of ``rows``, its BLOCK-wide chunks ``chunk``,
    ``chunk + chunks``, ... (MODE 1 static scale, 2 scale from n_part partial amaxes, 3 per-token
    amax: then ``chunks`` is 1)."""
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    q_row = q_ptr + row.to(tl.int64) * K
    offs = tl.arange(0, BLOCK)
    if MODE == 1:
        scale = tl.load(s_in_ptr).to(tl.float32)
    elif MODE == 2:
        p = tl.arange(0, PART_P2)
        amax = nan_amax(tl.load(s_in_ptr + p, mask=p < n_part, other=0.0).to(tl.float32), 0)
        scale = dynamic_scale(amax, ACT_INT8)
        if row == 0 and chunk == 0:
            tl.store(s_out_ptr, scale)
    else:
        if ONE_PASS:
            xv = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = nan_amax(xv, 0)
        else:
            amax_v = tl.zeros([BLOCK], dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                xv = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
                amax_v = nan_max(amax_v, tl.abs(xv))
            amax = nan_amax(amax_v, 0)
        scale = dynamic_scale(amax, ACT_INT8)
        tl.store(s_out_ptr + row, scale)
    # (a known scale: the row's BLOCK-wide chunks may be spread over several programs)
    for k0 in range(chunk * BLOCK, K, BLOCK * chunks):
        if not ONE_PASS or MODE != 3:
            xv = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        qv = quantize_values(xv, scale, ACT_INT8)
        if SPLIT:  # int8 codes as two exact E4M3 planes: see split_int8
            tl.static_assert(ACT_INT8, "SPLIT splits int8 codes")
            q_hi, q_lo = split_planes(qv)
            plane = rows.to(tl.int64) * K  # (q_ptr: the planes, float8)
            tl.store(q_row + k0 + offs, q_hi, mask=k0 + offs < K)
            tl.store(q_row + plane + k0 + offs, q_lo, mask=k0 + offs < K)
        else:
            tl.store(q_row + k0 + offs, qv, mask=k0 + offs < K)


@triton.jit
def _quant_act(
    x_ptr,
    q_ptr,
    s_in_ptr,
    s_out_ptr,
    K,
    stride_xm,
    n_part,
    ACT_INT8: tl.constexpr,
    MODE: tl.constexpr,  # 1 static scale, 2 scale from n_part partial amaxes, 3 per-token amax
    ONE_PASS: tl.constexpr,
    BLOCK: tl.constexpr,
    PART_P2: tl.constexpr,
    PDL: tl.constexpr,
    SPLIT: tl.constexpr = False,
):
    if PDL:  # a GEMM launched after this one with PDL may start now (it waits for our writes)
        gdc_launch_dependents()
    _quant_chunks(x_ptr, q_ptr, s_in_ptr, s_out_ptr, tl.program_id(0), tl.program_id(1),
                  tl.num_programs(1), tl.num_programs(0), K, stride_xm, n_part, ACT_INT8, MODE,
                  ONE_PASS, BLOCK, PART_P2, SPLIT)


# --------------------------------------------------------------------------------------------
# weight decode helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _e4m3_bits(mag, sign):
    """E4M3 bits of E2M1 * 2**-6 from its magnitude code (3 bits) and sign bit."""
    return (sign << 7) | (mag << 2)


@triton.jit
def _decode_words(b, BN: tl.constexpr, G: tl.constexpr):
    """Arithmetic decode (no PTX, so Triton's interpreter runs it) of ``b`` [BN, G, 32] in the
    word layout of ``_sm90_repack.WORD_BITS`` into float16 E2M1 * 2**-6: (low, high) halves.
    The element and sign bits of one word lie in different bytes: split the word's bytes out."""
    b02, b13 = tl.split(tl.reshape(b, (BN, G, 8, 2, 2)))  # byte j = 2a + c of each word
    y0, y2 = tl.split(b02)
    y1, y3 = tl.split(b13)
    lo0 = _e4m3_bits(y0 & 7, y0 >> 7)
    lo1 = _e4m3_bits((y0 >> 4) & 7, y1 >> 7)
    lo2 = _e4m3_bits(y1 & 7, y2 >> 7)
    lo3 = _e4m3_bits((y1 >> 4) & 7, y3 >> 7)
    hi0 = _e4m3_bits(y2 & 7, (y0 >> 3) & 1)
    hi1 = _e4m3_bits((y2 >> 4) & 7, (y1 >> 3) & 1)
    hi2 = _e4m3_bits(y3 & 7, (y2 >> 3) & 1)
    hi3 = _e4m3_bits((y3 >> 4) & 7, (y3 >> 3) & 1)
    # join(join(v0, v2), join(v1, v3))[..., a, c] = v[2a + c]
    lo = tl.reshape(tl.join(tl.join(lo0, lo2), tl.join(lo1, lo3)), (BN, G, 32))
    hi = tl.reshape(tl.join(tl.join(hi0, hi2), tl.join(hi1, hi3)), (BN, G, 32))
    return (lo.to(tl.float8e4nv, bitcast=True).to(tl.float16),
            hi.to(tl.float8e4nv, bitcast=True).to(tl.float16))


@triton.jit
def _apply_codes(v16, code, ACT_INT8: tl.constexpr):
    """v16 [BN, G, 32] float16 (E2M1 * 2**-6), code [BN, G] uint8 -> exact E4M3 or int8."""
    mult = (code.to(tl.int16) << 10).to(tl.float16, bitcast=True)
    w = v16 * mult[:, :, None]
    if ACT_INT8:
        # 2v << d lies in [-96, 96]: adding 1536 puts it in the low byte of the float16 bits.
        w = w + 1536.0
        w = w.to(tl.float16)
        return w.to(tl.int16, bitcast=True).to(tl.int8)
    else:
        return w.to(tl.float8e4nv)


# Fast decode (DECODE_LUT): per block, an 8-entry byte table built arithmetically from the
# block's code byte, looked up with one `prmt` per 4 weights (the PTX and why: _decode_ptx).
_ASM_FP8_LO = tl.constexpr(_decode_ptx.FP8_LO)
_ASM_FP8_HI = tl.constexpr(_decode_ptx.FP8_HI)
_ASM_I8_LO = tl.constexpr(_decode_ptx.INT8_LO)
_ASM_I8_HI = tl.constexpr(_decode_ptx.INT8_HI)
_CONSTRAINTS_9 = tl.constexpr("=r," + ",".join(["r"] * 9))
_CONSTRAINTS_17 = tl.constexpr("=r," + ",".join(["r"] * 17))


@triton.jit
def _lut_half(b, code, BN: tl.constexpr, G: tl.constexpr, HIGH: tl.constexpr,
              ACT_INT8: tl.constexpr):
    """Decode the low or high weights of ``b`` [BN, G, 32] with the per-block tables built from
    ``code`` [BN, G] by integer arithmetic (no memory lookups, so nothing breaks the pipeline)."""
    c = code.to(tl.int32)
    live = c != 0
    if ACT_INT8:
        d = c - 22
        pos_lo = tl.where(live, 0x03020100 << d, 0)
        pos_hi = tl.where(live, 0x0C080604 << d, 0)
        neg_lo = tl.where(live, 0x01010000 - pos_lo, 0)
        neg_hi = tl.where(live, 0x01010100 - pos_hi, 0)
        t0 = tl.broadcast_to(pos_lo[:, :, None], (BN, G, 32))
        t1 = tl.broadcast_to(pos_hi[:, :, None], (BN, G, 32))
        t2 = tl.broadcast_to(neg_lo[:, :, None], (BN, G, 32))
        t3 = tl.broadcast_to(neg_hi[:, :, None], (BN, G, 32))
        if HIGH:
            out = tl.inline_asm_elementwise(_ASM_I8_HI, _CONSTRAINTS_17, [b, t0, t1, t2, t3],
                                            dtype=tl.uint8, is_pure=True, pack=4)
        else:
            out = tl.inline_asm_elementwise(_ASM_I8_LO, _CONSTRAINTS_17, [b, t0, t1, t2, t3],
                                            dtype=tl.uint8, is_pure=True, pack=4)
        return out.to(tl.int8, bitcast=True)
    else:
        e = (c - 15) * 8  # E4M3 exponent field of 0.5 * 2**d, shifted into place: (d + 6) << 3
        la = tl.where(live, e * 0x01010100 + 0x0C080000, 0)
        lb = tl.where(live, e * 0x01010101 + 0x1C181410, 0)
        t0 = tl.broadcast_to(la[:, :, None], (BN, G, 32))
        t1 = tl.broadcast_to(lb[:, :, None], (BN, G, 32))
        if HIGH:
            out = tl.inline_asm_elementwise(_ASM_FP8_HI, _CONSTRAINTS_9, [b, t0, t1],
                                            dtype=tl.uint8, is_pure=True, pack=4)
        else:
            out = tl.inline_asm_elementwise(_ASM_FP8_LO, _CONSTRAINTS_9, [b, t0, t1],
                                            dtype=tl.uint8, is_pure=True, pack=4)
        return out.to(tl.float8e4nv, bitcast=True)


@triton.jit
def _load_decoded(w_ptr, c_ptr, offs_n, k0, KP2, KP32, BN: tl.constexpr, BK: tl.constexpr,
                  ACT_INT8: tl.constexpr, DECODE_LUT: tl.constexpr, EVICT: tl.constexpr,
                  code_shift=None):
    """Decode a [BN, BK] weight tile. ``code_shift`` [BN] (INT8 prefill per-row reference):
    each block's code moves by it and blocks that leave the exact range [22, 25] decode to 0.
    ``EVICT``: the L2 eviction policy of the weight loads (``weight_eviction``)."""
    G: tl.constexpr = BK // 64
    jj = tl.arange(0, BK // 2)
    b2 = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * KP2 + (k0 // 2 + jj)[None, :],
                 eviction_policy=EVICT)
    b = tl.reshape(b2, (BN, G, 32))
    cc = tl.arange(0, 2 * G)
    # (the block codes keep the default policy: a row's codes are one or two L2 lines that the
    # next K steps read again, 8 bytes at a time)
    c2 = tl.load(c_ptr + offs_n.to(tl.int64)[:, None] * KP32 + (k0 // 32 + cc)[None, :])
    if code_shift is not None:
        c = c2.to(tl.int32)
        moved = c + code_shift[:, None]
        c2 = tl.where((c != 0) & (moved >= 22) & (moved <= 25), moved, 0).to(tl.uint8)
    c_lo, c_hi = tl.split(tl.reshape(c2, (BN, G, 2)))
    if DECODE_LUT:
        w_lo = _lut_half(b, c_lo, BN, G, False, ACT_INT8)
        w_hi = _lut_half(b, c_hi, BN, G, True, ACT_INT8)
    else:
        v_lo, v_hi = _decode_words(b, BN, G)
        w_lo = _apply_codes(v_lo, c_lo, ACT_INT8)
        w_hi = _apply_codes(v_hi, c_hi, ACT_INT8)
    return tl.reshape(w_lo, (BN, BK // 2)), tl.reshape(w_hi, (BN, BK // 2))


# --------------------------------------------------------------------------------------------
# GEMM
# --------------------------------------------------------------------------------------------
@triton.jit
def _w4a8_gemm(
    x_ptr, xs_ptr, w_ptr, c_ptr, rs_ptr, y_ptr, bias_ptr, ws_ptr, cnt_ptr, lut_ptr,
    M, N, K, KP, KP2, KP32, NP, stride_ym, iters_per_split,
    ACT_INT8: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr,
    W_DENSE: tl.constexpr, ROW_REF: tl.constexpr, SPLIT_K: tl.constexpr,
    DECODE_LUT: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    PDL: tl.constexpr, RELEASE: tl.constexpr, X_SPLIT: tl.constexpr = False,
    W_EVICT: tl.constexpr = "",
):
    if RELEASE:  # the correction launched after this one with PDL may start (it waits for us)
        gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[None, :] * K
    n_iters = KP // BK
    it0 = pid_k * iters_per_split
    it1 = tl.minimum(it0 + iters_per_split, n_iters)
    if PDL:  # launched while the quantization may still run: wait for its writes
        gdc_wait()

    acc = tl.zeros([BN, BM], dtype=tl.float32)
    if ROW_REF:
        # INT8 dense weight with one reference per row (rs_ptr: float32 2**(top - 131)):
        # exact int32 sums over the whole K, rescaled once in the epilogue
        tl.static_assert(ACT_INT8 and W_DENSE, "ROW_REF is the INT8 dense (prefill) GEMM")
        acc_i = tl.zeros([BN, BM], dtype=tl.int32)
    elif ACT_INT8:
        tl.static_assert(BK == INT8_TILE_K, "INT8 needs one reference tile per K step")
        # the tile exponents are one byte per row (not pipelined by cp.async): prefetch by hand
        e_next = tl.load(rs_ptr + it0 * NP + offs_n)
    if W_DENSE:
        kk = tl.arange(0, BK)
    else:
        jj = tl.arange(0, BK // 2)
        kx = (jj // 32) * 64 + (jj % 32)
    # Every split has at least one K step (w4a8_gemm sizes them so). Telling the compiler removes
    # the loop's zero-trip path, whose zeroed accumulator made ptxas serialize every wgmma of the
    # FP8 tiles (C7515; H100, same call: N=K=8192 FP8 M=128 42.5 -> 39.7 us, INT8 M=32 36.3 ->
    # 32.6 us)
    tl.assume(it1 > it0)
    for it in range(it0, it1):
        k0 = it * BK
        if W_DENSE:
            w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * KP + (k0 + kk)[None, :])
            xk = k0 + kk
            xt = tl.load(x_rows + xk[:, None], mask=m_mask[None, :] & (xk < K)[:, None], other=0.0)
            if ROW_REF:
                acc_i = tl.dot(w, xt, acc_i, out_dtype=tl.int32)
            elif ACT_INT8:
                p = tl.dot(w, xt, out_dtype=tl.int32)
            else:
                acc = tl.dot(w, xt, acc)
        else:
            w_lo, w_hi = _load_decoded(w_ptr, c_ptr, offs_n, k0, KP2, KP32, BN, BK, ACT_INT8,
                                       DECODE_LUT, W_EVICT)
            xk = k0 + kx
            x_lo = tl.load(x_rows + xk[:, None], mask=m_mask[None, :] & (xk < K)[:, None], other=0.0)
            x_hi = tl.load(x_rows + (xk + 32)[:, None],
                           mask=m_mask[None, :] & (xk + 32 < K)[:, None], other=0.0)
            if X_SPLIT:
                # int8 activations as two exact E4M3 planes, 16 * floor(q / 16) and the rest
                # (split_int8): FP8 weights, two MMAs per half
                tl.static_assert(not ACT_INT8, "X_SPLIT runs on the FP8 weight path")
                y_lo = tl.load(x_rows + M * K + xk[:, None],
                               mask=m_mask[None, :] & (xk < K)[:, None], other=0.0)
                y_hi = tl.load(x_rows + M * K + (xk + 32)[:, None],
                               mask=m_mask[None, :] & (xk + 32 < K)[:, None], other=0.0)
                acc = tl.dot(w_lo, x_lo, acc)
                acc = tl.dot(w_lo, y_lo, acc)
                acc = tl.dot(w_hi, x_hi, acc)
                acc = tl.dot(w_hi, y_hi, acc)
            elif ACT_INT8:
                p = tl.dot(w_lo, x_lo, out_dtype=tl.int32)
                p = tl.dot(w_hi, x_hi, p, out_dtype=tl.int32)
            else:
                acc = tl.dot(w_lo, x_lo, acc)
                acc = tl.dot(w_hi, x_hi, acc)
        if ACT_INT8 and not ROW_REF:
            # one reference tile per iteration: exact int32 -> float32, times 2**(t - 1)
            e = e_next
            e_next = tl.load(rs_ptr + tl.minimum(it + 1, n_iters - 1) * NP + offs_n)
            ts = (e.to(tl.int32) << 23).to(tl.float32, bitcast=True)
            # exact int32 -> float32 without I2F (|p| < 2**22): 0x4B400000 is 1.5 * 2**23
            pf = (p + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
            acc += pf * ts[:, None]
    if ROW_REF:
        acc = acc_i.to(tl.float32)

    if SPLIT_K > 1:
        ws_tile = ws_ptr + (pid_m * BM + tl.arange(0, BM))[None, :] * N + offs_n[:, None]
        tile_stride = M * N
        st_mask = m_mask[None, :] & (offs_n < N)[:, None]
        tl.store(ws_tile + pid_k * tile_stride, acc, mask=st_mask)
        tl.debug_barrier()
        cnt = cnt_ptr + pid_n * tl.num_programs(1) + pid_m
        arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros([BN, BM], dtype=tl.float32)
            for s in range(SPLIT_K):
                acc += tl.load(ws_tile + s * tile_stride, mask=st_mask, other=0.0,
                               cache_modifier=".cg")
            tl.atomic_xchg(cnt, 0)
            _epilogue(acc, offs_n, offs_m, m_mask, xs_ptr, rs_ptr, y_ptr, bias_ptr, N, stride_ym,
                      ACT_INT8 and not ROW_REF, PER_TOKEN, HAS_BIAS)
    else:
        _epilogue(acc, offs_n, offs_m, m_mask, xs_ptr, rs_ptr, y_ptr, bias_ptr, N, stride_ym,
                  ACT_INT8 and not ROW_REF, PER_TOKEN, HAS_BIAS)


@triton.jit
def _epilogue(acc, offs_n, offs_m, m_mask, xs_ptr, rs_ptr, y_ptr, bias_ptr, N, stride_ym,
              TILE_SCALED: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``TILE_SCALED``: the per-tile INT8 loop already applied the weight's scales; otherwise
    ``rs_ptr`` holds one float32 scale per row."""
    if PER_TOKEN:
        xs = tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)
        acc = acc * xs[None, :]
    else:
        acc = acc * tl.load(xs_ptr)
    if not TILE_SCALED:
        acc = acc * tl.load(rs_ptr + offs_n)[:, None]
    n_mask = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    ptrs = y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None]
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[None, :] & n_mask[:, None])


# --------------------------------------------------------------------------------------------
# prefill GEMM on the materialized weight (sm_90: TMA loads, persistent grid)
# --------------------------------------------------------------------------------------------
@triton.jit
def _prefill_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
    # GROUP_M token tiles walk one band of weight tiles together, so the band is read from DRAM
    # about once, not once per token tile (the tile order of _w4a8_gemm's grid reads the whole
    # weight once per token tile: 28672 x 4096 FP8 M = 4096 965 -> 707 us with this order)
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % rows, (tile % per_group) // rows


# M and PROGRAMS unspecialized: vLLM's profile run (M a multiple of 16, many programs) would
# otherwise leave the first real prompt (odd M, or one program) to compile a second variant
# in the middle of serving (seen as vLLM's "JIT compilation during inference" warning, H100)
@triton.jit(do_not_specialize=["M", "PROGRAMS"])
def _prefill_gemm(x_desc, w_desc, xs_ptr, rs_ptr, y_ptr, bias_ptr, M, N, K, stride_ym, PROGRAMS,
                  ACT_INT8: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """``y [M, N] = x_q [M, K] @ dense [N, K]^T * x_scale * rs[N]``: FP8, or INT8 materialized
    with one reference per row (exact int32 sums over the whole K). Tokens x weights per tile
    (``acc[BM, BN] = dot(x, w^T)``; both operands K-major in shared memory, as FP8 and int8
    ``wgmma`` need), one program per SM walking the tiles."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    for tile in range(tl.program_id(0), num_m * num_n, PROGRAMS):
        pid_m, pid_n = _prefill_tile(tile, num_m, num_n, GROUP_M)
        m0 = pid_m * BM
        n0 = pid_n * BN
        offs_m = m0 + tl.arange(0, BM)
        offs_n = n0 + tl.arange(0, BN)
        if ACT_INT8:
            acc_i = tl.zeros([BM, BN], dtype=tl.int32)
            for ks in range(0, tl.cdiv(K, BK)):
                acc_i = tl.dot(x_desc.load([m0, ks * BK]), w_desc.load([n0, ks * BK]).T, acc_i,
                               out_dtype=tl.int32)
            acc = acc_i.to(tl.float32)
        else:
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for ks in range(0, tl.cdiv(K, BK)):
                acc = tl.dot(x_desc.load([m0, ks * BK]), w_desc.load([n0, ks * BK]).T, acc)
        m_mask = offs_m < M
        n_mask = offs_n < N
        if PER_TOKEN:
            acc = acc * tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
        else:
            acc = acc * tl.load(xs_ptr)
        acc = acc * tl.load(rs_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# --------------------------------------------------------------------------------------------
# materialize (prefill): decoded weight [NP, KP] E4M3 / int8
# --------------------------------------------------------------------------------------------
@triton.jit
def _materialize_tile(w_ptr, c_ptr, rs_ptr, prs_ptr, out_ptr, pid_n, pid_k, KP, KP2, KP32, NP,
                      ACT_INT8: tl.constexpr, ROW_REF: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr, DECODE_LUT: tl.constexpr):
    offs_n = pid_n * BN + tl.arange(0, BN)
    k0 = pid_k * BK
    G: tl.constexpr = BK // 64
    if ROW_REF:
        # INT8 per-row reference (_sm90_repack.int8_prefill_rows): BK is one tile, so every
        # block of this program moves by tile_exp[pid_k, n] - row_exp[n]
        tl.static_assert(ACT_INT8 and BK == INT8_TILE_K, "ROW_REF is INT8 with BK = one tile")
        tile_exp = tl.load(rs_ptr + pid_k * NP + offs_n).to(tl.int32)
        row_exp = tl.load(prs_ptr + offs_n).to(tl.int32, bitcast=True) >> 23
        w_lo, w_hi = _load_decoded(w_ptr, c_ptr, offs_n, k0, KP2, KP32, BN, BK, ACT_INT8,
                                   DECODE_LUT, "", tile_exp - row_exp)
    else:
        w_lo, w_hi = _load_decoded(w_ptr, c_ptr, offs_n, k0, KP2, KP32, BN, BK, ACT_INT8,
                                   DECODE_LUT, "")
    g = tl.arange(0, G)
    j = tl.arange(0, 32)
    base = out_ptr + offs_n.to(tl.int64)[:, None, None] * KP + k0 + (g * 64)[None, :, None] + j[None, None, :]
    tl.store(base, tl.reshape(w_lo, (BN, G, 32)))
    tl.store(base + 32, tl.reshape(w_hi, (BN, G, 32)))


@triton.jit
def _materialize(w_ptr, c_ptr, rs_ptr, prs_ptr, out_ptr, KP, KP2, KP32, NP,
                 ACT_INT8: tl.constexpr, ROW_REF: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, DECODE_LUT: tl.constexpr):
    _materialize_tile(w_ptr, c_ptr, rs_ptr, prs_ptr, out_ptr, tl.program_id(0), tl.program_id(1),
                      KP, KP2, KP32, NP, ACT_INT8, ROW_REF, BN, BK, DECODE_LUT)


@triton.jit
def _prefill_prepare(x_ptr, q_ptr, s_in_ptr, s_out_ptr, K, stride_xm, n_part, M, CHUNKS, NQ,
                     w_ptr, c_ptr, rs_ptr, prs_ptr, dense_ptr, KP, KP2, KP32, NP, K_TILES,
                     ACT_INT8: tl.constexpr, MODE: tl.constexpr, ONE_PASS: tl.constexpr,
                     BLOCK: tl.constexpr, PART_P2: tl.constexpr, ROW_REF: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, DECODE_LUT: tl.constexpr):
    """The prefill path's two passes over memory in one launch: programs [0, NQ) quantize the
    activations (as ``_quant_act``, CHUNKS programs per row), the others materialize the
    weight (as ``_materialize``)."""
    pid = tl.program_id(0)
    if pid < NQ:
        _quant_chunks(x_ptr, q_ptr, s_in_ptr, s_out_ptr, pid // CHUNKS, pid % CHUNKS, CHUNKS, M,
                      K, stride_xm, n_part, ACT_INT8, MODE, ONE_PASS, BLOCK, PART_P2, False)
    else:
        t = pid - NQ
        _materialize_tile(w_ptr, c_ptr, rs_ptr, prs_ptr, dense_ptr, t // K_TILES, t % K_TILES,
                          KP, KP2, KP32, NP, ACT_INT8, ROW_REF, BN, BK, DECODE_LUT)


# --------------------------------------------------------------------------------------------
# correction for out-of-range blocks: y[:, n] += (x[:, blocks of n] @ values) * x_scale
# --------------------------------------------------------------------------------------------
@triton.jit
def _correction(x_ptr, xs_ptr, y_ptr, rows_ptr, ptr_ptr, blk_ptr, val_ptr, M, K, stride_ym,
                PER_TOKEN: tl.constexpr, BM: tl.constexpr, PDL: tl.constexpr,
                X_SPLIT: tl.constexpr = False):
    if PDL:  # launched while the GEMM may still run: wait for its writes
        gdc_wait()
    pid_r = tl.program_id(0)
    pid_m = tl.program_id(1)
    n = tl.load(rows_ptr + pid_r)
    b0 = tl.load(ptr_ptr + pid_r)
    b1 = tl.load(ptr_ptr + pid_r + 1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    j = tl.arange(0, 32)
    acc = tl.zeros([BM], dtype=tl.float32)
    for b in range(b0, b1):
        blk = tl.load(blk_ptr + b)
        v = tl.load(val_ptr + b * 32 + j)
        xp = x_ptr + offs_m.to(tl.int64)[:, None] * K + blk * 32 + j[None, :]
        xq = tl.load(xp, mask=m_mask[:, None], other=0.0).to(tl.float32)
        if X_SPLIT:  # the two planes of split_int8 sum to the int8 codes
            # (tl.cast: Triton passes M = 1 as a constant, which has no .to)
            xq += tl.load(xp + tl.cast(M, tl.int64) * K, mask=m_mask[:, None],
                          other=0.0).to(tl.float32)
        acc += tl.sum(xq * v[None, :], axis=1)
    if PER_TOKEN:
        acc = acc * tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)
    else:
        acc = acc * tl.load(xs_ptr)
    yp = y_ptr + offs_m.to(tl.int64) * stride_ym + n
    y = tl.load(yp, mask=m_mask, other=0.0).to(tl.float32)
    tl.store(yp, (y + acc).to(y_ptr.dtype.element_ty), mask=m_mask)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# A dynamic per-tensor amax: tiles of AMAX_BLOCK elements of a row, over at most
# AMAX_PARTIALS_MAX programs (each quantization program reads all their partial amaxes).
AMAX_BLOCK = 2048
AMAX_PARTIALS_MAX = 512
# Static and dynamic per-tensor quantization: one program per QUANT_CHUNK values of a row (more
# programs than rows at decode sizes; one per row took 5.7-6.5 us at K = 14336, M = 1-64 on an
# H100, this 2.1-3.3 us: benchmarks/results/dynamic_amax_h100_20261123_*.jsonl).
QUANT_CHUNK = 2048


class _QuantLaunch(NamedTuple):
    """A quantization's outputs and its launch parameters (``_quant_plan``)."""

    q: torch.Tensor
    s_out: torch.Tensor
    s_in: torch.Tensor
    n_part: int
    chunks: int  # programs per row
    one_pass: bool
    block: int

    @property
    def warps(self) -> int:
        return 8 if self.block >= 4096 else 4


def _quant_plan(x2: torch.Tensor, act_int8: bool, scheme: int, input_scale: torch.Tensor | None,
                split: bool) -> _QuantLaunch:
    """Allocates the quantization's outputs and, for a dynamic per-tensor scale, launches the
    partial amaxes; the quantization itself is the caller's launch (``_quant_act`` or
    ``_prefill_prepare``)."""
    m, k = x2.shape
    dev = x2.device
    if split and not act_int8:
        raise ValueError("split is for int8 activations")
    q = (torch.empty((2, m, k), dtype=torch.float8_e4m3fn, device=dev) if split else
         torch.empty((m, k), dtype=torch.int8 if act_int8 else torch.float8_e4m3fn, device=dev))
    if POISON_OUTPUTS:
        q.view(torch.uint8).fill_(0x80 if act_int8 and not split else 0x7F)  # int8 -128 / E4M3 NaN
    s_out = input_scale if scheme == 1 else torch.empty(1 if scheme == 2 else m,
                                                        dtype=torch.float32, device=dev)
    if POISON_OUTPUTS and scheme != 1:
        s_out.fill_(float("nan"))
    s_in, n_part = input_scale if scheme == 1 else x2, 1  # (x2: unused by the per-token mode)
    if scheme == 2 and m > 0:
        # the amax in two launches, neither a single CTA: partial amaxes over the whole GPU,
        # reduced again by every program of the quantization
        chunks = triton.cdiv(k, AMAX_BLOCK)
        n_part = min(m * chunks, AMAX_PARTIALS_MAX)
        s_in = torch.empty(n_part, dtype=torch.float32, device=dev)
        _amax_partials[(n_part,)](x2, s_in, k, x2.stride(0), chunks, m * chunks,
                                  BLOCK=AMAX_BLOCK, num_warps=4)
    if scheme == 3:  # one program per row: it needs the row's amax
        one_pass = k <= 16384
        block = triton.next_power_of_2(k) if one_pass else 4096
        chunks = 1
    else:  # a known scale: a program per QUANT_CHUNK of a row
        one_pass, block = False, QUANT_CHUNK
        chunks = triton.cdiv(k, QUANT_CHUNK)
    return _QuantLaunch(q, s_out, s_in, n_part, chunks, one_pass, block)


def quantize_activation_gpu(x2: torch.Tensor, act_int8: bool, scheme: int,
                            input_scale: torch.Tensor | None, split: bool = False):
    """x2 [M, K] (bf16/fp16/fp32, last dim contiguous) -> (q [M, K], scale fp32 [M] or [1]).
    ``split`` (INT8): q as ``split_int8``'s [2, M, K] E4M3 planes."""
    m, k = x2.shape
    pl = _quant_plan(x2, act_int8, scheme, input_scale, split)
    if m == 0:
        return pl.q, pl.s_out
    _quant_act[(m, pl.chunks)](x2, pl.q, pl.s_in, pl.s_out, k, x2.stride(0), pl.n_part,
                               ACT_INT8=act_int8, MODE=scheme, ONE_PASS=pl.one_pass,
                               BLOCK=pl.block, PART_P2=triton.next_power_of_2(pl.n_part),
                               PDL=pdl_enabled(x2.device), SPLIT=split, num_warps=pl.warps)
    return pl.q, pl.s_out


# The prefill path's activation quantization and weight materialization in one launch
# (``prepare_prefill``). H100, whole op, medians of 3 (benchmarks/tools/prefill_prepare.py,
# prefill_prepare_h100_20261125_1236.jsonl): N = K = 8192 FP8 M = 4096 440.5 -> 436.2 us
# (static), 438.6 -> 432.4 (per token), M = 512 95.6 -> 89.6; INT8 M = 512 145.1 -> 138.1, M =
# 4096 a tie. The dense GEMM after it with PDL gained nothing (released after each program's
# stores) or lost 3 % and 7 % at M = 4096 (released at their start: the persistent GEMM took
# SMs early), so it is launched plainly.
PREFILL_FUSED_PREPARE = True


def prepare_prefill(x2: torch.Tensor, act_int8: bool, scheme: int,
                    input_scale: torch.Tensor | None, packed: torch.Tensor, codes: torch.Tensor,
                    row_scale: torch.Tensor, prefill_row_scale: torch.Tensor | None = None):
    """``quantize_activation_gpu`` and ``materialize`` in one launch: (q, scale, dense)."""
    m, k = x2.shape
    if m == 0 or not PREFILL_FUSED_PREPARE:
        q, xs = quantize_activation_gpu(x2, act_int8, scheme, input_scale)
        return q, xs, materialize(packed, codes, row_scale, act_int8, prefill_row_scale)
    pl = _quant_plan(x2, act_int8, scheme, input_scale, False)
    n_pad, kp = packed.shape[0], packed.shape[1] * 2
    dense = _dense_out(n_pad, kp, act_int8, packed.device)
    row_ref = prefill_row_scale is not None
    bn, bk = MATERIALIZE_TILE
    nq = m * pl.chunks
    _prefill_prepare[(nq + (n_pad // bn) * (kp // bk),)](
        x2, pl.q, pl.s_in, pl.s_out, k, x2.stride(0), pl.n_part, m, pl.chunks, nq,
        packed, codes, row_scale, prefill_row_scale if row_ref else row_scale, dense,
        kp, kp // 2, kp // 32, n_pad, kp // bk,
        ACT_INT8=act_int8, MODE=scheme, ONE_PASS=pl.one_pass, BLOCK=pl.block,
        PART_P2=triton.next_power_of_2(pl.n_part), ROW_REF=row_ref, BN=bn, BK=bk,
        DECODE_LUT=DECODE_LUT, num_warps=pl.warps)
    return pl.q, pl.s_out, dense


def _fill_split(tiles: int, iters: int, sms: int) -> int:
    """Largest split-K (a power of 2, at least two K steps per split, at most 16) that keeps the
    grid within one CTA per SM."""
    split = 1
    while tiles * split * 2 <= sms and split * 2 <= max(1, iters // 2) and split < 16:
        split *= 2
    return split


# Mid-M tiles (BN, BM, warps, stages), BK = 256: WIDE at 128 tokens, ROWS at 64 tokens and 128
# weight rows, NARROW at 64 x 64.
MID_WIDE = (128, 128, 8, 4)
MID_ROWS = (128, 64, 4, 4)
MID_NARROW = (64, 64, 4, 4)
MID_FULL_GRID = 0.7  # a grid of at least this many CTAs per SM counts as filling the GPU
MID_LONG_K = 8192  # from this K on, the split-K rule of the decode tiles (measured better there)


def pick_config(m: int, n_pad: int, kp: int, act_int8: bool, sms: int, dense: bool = False,
                row_ref: bool = False):
    """(BN, BM, BK, split_k, num_warps, num_stages). Up to 32 tokens, and at any M from K =
    MID_LONG_K on, from the H100 sweeps at N = K = 8192 (benchmarks/results/sweep_*.jsonl):
    split-K until about 7 (FP8) or 14 (INT8, more decode work per byte) warps per SM are busy.
    Shorter K above 32 tokens, from the sweep and the A/B over the Llama-3-8B shapes
    (mid_m_shapes_h100_20261125_0617.jsonl, mid_m_rule_h100_20261125_*.jsonl): that rule gave
    6144 x 4096 a second wave of CTAs (M = 128: 34.2 against 20.8 us), so there the grid is one
    wave that fills the SMs, split-K only to fill it. FP8 takes 64-token tiles below 0.7 x
    SMs' worth of 128-token tiles, and 64 x 64 tiles where even 128 x 64 ones would need split
    4; INT8, whose decode is dearer, keeps the 128-token tile above 64 tokens. The INT8 dense
    GEMM with one reference per row (``row_ref``): 128x128x128 tiles, the fastest at M = 512
    and 4096 (sweep_int8_prefill_rows_h100_20261123.jsonl)."""
    if dense:
        if act_int8:
            return (128, 128, 128, 1, 8, 3) if row_ref else (128, 128, INT8_TILE, 1, 8, 3)
        return (128, 256, 128, 1, 8, 3) if m >= 2048 else (128, 128, 128, 1, 8, 3)
    bk = 256
    iters = kp // bk
    if m <= 32 or kp >= MID_LONG_K:
        if m <= 16:
            bn, bm, warps, stages = 64, 16, 4, 3 if act_int8 else 4
        elif m <= 64:
            bm = 32 if m <= 32 else 64
            bn, warps, stages = (64, 4, 4) if act_int8 else (128, 8, 4)
        else:
            bn, bm, warps, stages = MID_WIDE
        tiles = (n_pad // bn) * triton.cdiv(m, bm)
        target = (14 if act_int8 and m <= 16 else 7) * sms
        split = 1
        while tiles * split * warps < target and split * 2 <= max(1, iters // 2) and split < 16:
            split *= 2
        return bn, bm, bk, split, warps, stages

    def tiles_of(tile):
        return triton.cdiv(n_pad, tile[0]) * triton.cdiv(m, tile[1])

    full = MID_FULL_GRID * sms
    if act_int8:
        tile = MID_WIDE if m > 64 else MID_NARROW
    elif m > 64 and tiles_of(MID_WIDE) >= full:
        tile = MID_WIDE
    elif 2 * tiles_of(MID_ROWS) >= full:
        tile = MID_ROWS
    else:
        tile = MID_NARROW
    bn, bm, warps, stages = tile
    return bn, bm, bk, _fill_split(tiles_of(tile), iters, sms), warps, stages


def split_config(m: int, n_pad: int, kp: int, sms: int) -> tuple | None:
    """The INT8 split GEMM's tile (int8 activations as two E4M3 planes on the FP8 repacking:
    FP8's decode, twice its MMAs): FP8's tile rule, or None where that takes tiles of more than
    INT8_SPLIT_MAX_BM tokens (the INT8 GEMM is kept there)."""
    bn, bm, bk, split, warps, stages = pick_config(m, n_pad, kp, False, sms)
    if bm > INT8_SPLIT_MAX_BM:
        return None
    # an 8-warp tile's twice-FP8 activation stages leave room for one CTA per SM: one wave
    while warps == 8 and split > 1 and (n_pad // bn) * triton.cdiv(m, bm) * split > sms:
        split //= 2
    return bn, bm, bk, split, warps, stages


def w4a8_gemm(q: torch.Tensor, xs: torch.Tensor, packed: torch.Tensor, codes: torch.Tensor,
              row_scale: torch.Tensor, counters: torch.Tensor, lut: torch.Tensor, n: int,
              act_int8: bool, per_token: bool, bias: torch.Tensor | None,
              out_dtype: torch.dtype, config=None,
              dense: torch.Tensor | None = None,
              prefill_row_scale: torch.Tensor | None = None, tma: bool | None = None,
              tma_config=None, release: bool = False, x_split: bool = False) -> torch.Tensor:
    """``dense``: the materialized weight (prefill); INT8 with ``prefill_row_scale``: it was
    materialized against one reference per row (``materialize(..., prefill_row_scale)``).
    ``tma``: the dense FP8 and INT8-per-row GEMMs as ``_prefill_gemm`` (default: on sm_90 and
    newer) with ``tma_config`` (default ``prefill_config``); otherwise, and for the per-tile INT8
    weight, ``_w4a8_gemm`` with ``config``. (The per-tile INT8 GEMM on TMA loads was slower:
    748 against 643 us at N = K = 8192, M = 4096, H100, in the sweep below.) ``release``:
    ``_w4a8_gemm`` lets a correction launched next with ``pdl`` start early. ``x_split``
    (the INT8 split path): ``q`` is ``split_int8``'s [2, M, K] E4M3 planes of int8 activations
    and the weight the FP8 repacking of the same tensors (``act_int8`` False; ``config``
    default: ``split_config``)."""
    m, k = q.shape[-2:]
    if x_split and (act_int8 or dense is not None or q.dim() != 3 or q.shape[0] != 2
                    or q.dtype != torch.float8_e4m3fn):
        raise ValueError("x_split takes int8 activations as [2, M, K] E4M3 planes on the fused "
                         f"GEMM of the FP8 repacking; got q {q.dtype} {tuple(q.shape)}, "
                         f"act_int8={act_int8}, dense={dense is not None}")
    row_ref = prefill_row_scale is not None
    if row_ref and (dense is None or not act_int8):
        raise ValueError("prefill_row_scale is for the INT8 dense (materialized) GEMM")
    n_pad, kp = packed.shape[0], packed.shape[1] * 2
    y = torch.empty((m, n), dtype=out_dtype, device=q.device)
    if POISON_OUTPUTS:
        y.fill_(float("nan"))
    if m == 0:
        return y
    # (the interpreter on the CPU: an H100's count, so that the tile rules pick as they would)
    sms = num_sms(q.device.index or 0) if q.is_cuda else 132
    if (dense is not None and (row_ref or not act_int8)
            and (tma_default(q.device) if tma is None else tma)):
        _prefill_launch(q, xs, dense, prefill_row_scale if row_ref else row_scale, y, bias, n,
                        act_int8, per_token,
                        tma_config or prefill_config(m, n, act_int8, sms))
        return y
    if config is None and x_split:
        config = split_config(m, n_pad, kp, sms) or pick_config(m, n_pad, kp, False, sms)
    elif config is None:
        config = pick_config(m, n_pad, kp, act_int8, sms,
                             dense is not None, row_ref)
    bn, bm, bk, split, warps, stages = config
    pdl = gemm_launch_pdl(q.device, act_int8, bn, bm, dense is not None)
    iters = kp // bk
    per_split = triton.cdiv(iters, split)
    split = triton.cdiv(iters, per_split)
    grid = (n_pad // bn, triton.cdiv(m, bm), split)
    if split > 1 and grid[0] * grid[1] > counters.numel():
        split, per_split = 1, iters  # not enough tile counters: no split-K
        grid = (grid[0], grid[1], 1)
    if split > 1:
        ws = torch.empty((split, m, n), dtype=torch.float32, device=q.device)
        if POISON_OUTPUTS:
            ws.fill_(float("nan"))
    else:
        ws = y
    _w4a8_gemm[grid](
        q, xs, packed if dense is None else dense, codes,
        prefill_row_scale if row_ref else row_scale, y,
        bias if bias is not None else y, ws, counters, lut,
        m, n, k, kp, kp // 2, kp // 32, n_pad, y.stride(0), per_split,
        ACT_INT8=act_int8, PER_TOKEN=per_token, HAS_BIAS=bias is not None,
        W_DENSE=dense is not None, ROW_REF=row_ref, SPLIT_K=split, DECODE_LUT=DECODE_LUT,
        BN=bn, BM=bm, BK=bk, PDL=pdl, RELEASE=release, X_SPLIT=x_split,
        W_EVICT=weight_eviction(m, grid[1], packed.numel() + codes.numel(),
                                act_int8 or x_split),
        num_warps=warps, num_stages=stages, launch_pdl=pdl,
    )
    return y


# (BM, BN, BK, GROUP_M, num_warps, num_stages) of _prefill_gemm, from an H100 sweep at
# N = K = 8192, 28672 x 4096 and 4096 x 14336, M = 1024 and 4096
# (benchmarks/results/dense_prefill_gemm_h100_20261124_2327.jsonl)
PREFILL_CONFIG = (128, 256, 128, 16, 8, 4)
# The same with 128 weight rows per tile, for FP8 grids that the wide tile leaves half empty.
# A narrow tile takes about 0.63 of a wide one's time (H100, M = 512: 28672 x 4096 102.6 us for
# 4 wide tiles per program against 112.4 for 7 narrow ones; 4096 x 4096 23.8 against 18.5 us
# with one tile per program; mid_m_shapes_h100_20261125_0617.jsonl).
PREFILL_CONFIG_NARROW = (128, 128, 128, 16, 8, 4)
PREFILL_NARROW_COST = 0.63


def prefill_config(m: int, n: int, act_int8: bool, sms: int) -> tuple:
    """``_prefill_gemm``'s tile: with one program per SM each program runs ceil(tiles / SMs)
    tiles, so FP8 takes the narrow tile where those cost less than the wide tile's. (INT8 with
    one reference per row keeps the wide tile: the narrow one was not measured there.)"""
    if act_int8:
        return PREFILL_CONFIG

    def per_program(bm: int, bn: int) -> int:
        return -(-(-(-m // bm) * -(-n // bn)) // sms)

    wide = per_program(PREFILL_CONFIG[0], PREFILL_CONFIG[1])
    narrow = per_program(PREFILL_CONFIG_NARROW[0], PREFILL_CONFIG_NARROW[1])
    return PREFILL_CONFIG_NARROW if narrow * PREFILL_NARROW_COST < wide else PREFILL_CONFIG


@functools.lru_cache(maxsize=None)
def _tma_capable(device_index: int) -> bool:
    try:  # host-side TMA descriptors: Triton 3.4 and newer
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def tma_default(device: torch.device) -> bool:
    """Whether the prefill GEMM takes TMA loads (``_prefill_gemm``): CUDA devices of sm_90+."""
    return device.type == "cuda" and _tma_capable(device.index or 0)


def _prefill_launch(q, xs, dense, scale, y, bias, n, act_int8, per_token, config):
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk, group_m, warps, stages = config
    m, k = q.shape
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    # one program per SM (CPU, the interpreter: a few, so that programs take several tiles)
    programs = min(tiles, num_sms(q.device.index or 0) if q.is_cuda else 3)
    _prefill_gemm[(programs,)](
        TensorDescriptor.from_tensor(q, [bm, bk]), TensorDescriptor.from_tensor(dense, [bn, bk]),
        xs, scale, y, bias if bias is not None else y, m, n, k, y.stride(0), programs,
        ACT_INT8=act_int8, PER_TOKEN=per_token, HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk,
        GROUP_M=group_m, num_warps=warps, num_stages=stages)


MATERIALIZE_TILE = (64, 256)  # (weight rows, K) per program


def _dense_out(n_pad: int, kp: int, act_int8: bool, device: torch.device) -> torch.Tensor:
    out = torch.empty((n_pad, kp), dtype=torch.int8 if act_int8 else torch.float8_e4m3fn,
                      device=device)
    if POISON_OUTPUTS:
        out.view(torch.uint8).fill_(0x7F if not act_int8 else 0x80)
    return out


def materialize(packed: torch.Tensor, codes: torch.Tensor, row_scale: torch.Tensor,
                act_int8: bool, prefill_row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The whole weight decoded to [NP, KP] E4M3 / int8. INT8 with ``prefill_row_scale``
    (``int8_prefill_rows``): against one reference per row instead of per tile."""
    n_pad, kp = packed.shape[0], packed.shape[1] * 2
    out = _dense_out(n_pad, kp, act_int8, packed.device)
    row_ref = prefill_row_scale is not None
    bn, bk = MATERIALIZE_TILE
    _materialize[(n_pad // bn, kp // bk)](
        packed, codes, row_scale, prefill_row_scale if row_ref else row_scale, out,
        kp, kp // 2, kp // 32, n_pad, ACT_INT8=act_int8, ROW_REF=row_ref, BN=bn, BK=bk,
        DECODE_LUT=DECODE_LUT, num_warps=4)
    return out


def split_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 activations [M, K] as two E4M3 planes [2, M, K]: 16 * floor(q / 16) in {-128, ...,
    112} and q - that in [0, 15], both exact in E4M3, summing to q exactly (the INT8 split
    path, docs/int8_kernel.md). The reference for ``quantize_activation_gpu(..., split=True)``."""
    hi = torch.div(q, 16, rounding_mode="floor") * 16
    return torch.stack((hi, q - hi)).to(torch.float16).to(torch.float8_e4m3fn)


def correction_pdl(device: torch.device, bm: int) -> bool:
    """Whether the correction after a fused GEMM of ``bm``-token tiles is launched with PDL
    (``CORRECTION_PDL``, ``CORRECTION_PDL_MAX_BM``)."""
    return CORRECTION_PDL and bm <= CORRECTION_PDL_MAX_BM and pdl_enabled(device)


def correction(y: torch.Tensor, q: torch.Tensor, xs: torch.Tensor, per_token: bool,
               rows: torch.Tensor, ptr: torch.Tensor, blocks: torch.Tensor,
               values: torch.Tensor, pdl: bool = False) -> None:
    """``pdl``: launched with PDL after a GEMM that released it (``w4a8_gemm(release=True)``).
    ``q`` may be ``split_int8``'s [2, M, K] planes."""
    m, k = q.shape[-2:]
    if rows.numel() == 0 or m == 0:
        return
    bm = min(64, max(16, triton.next_power_of_2(m)))
    _correction[(rows.numel(), triton.cdiv(m, bm))](
        q, xs, y, rows, ptr, blocks, values, m, k, y.stride(0), PER_TOKEN=per_token, BM=bm,
        PDL=pdl, X_SPLIT=q.dim() == 3, num_warps=4, launch_pdl=pdl)


def scaled_mm_fp8(q: torch.Tensor, xs: torch.Tensor, dense: torch.Tensor, row_scale: torch.Tensor,
                  n: int, per_token: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """Prefill FP8 path: cuBLASLt/CUTLASS row-wise FP8 GEMM on the materialized E4M3 weight."""
    m, k = q.shape
    sa = xs.reshape(-1, 1) if per_token else xs.reshape(1, 1).expand(m, 1).contiguous()
    sb = row_scale[:n].reshape(1, n)
    return torch._scaled_mm(q, dense[:n, :k].t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)
