// W4A8 MXFP4 decode GEMM for SM89/SM90 (FP8) and SM80+ (INT8): y[M, N] = x[M, K] @ W[N, K]^T
// for small M (1..16 tokens), the activation quantization that feeds it, and the MoE layer's
// two expert GEMMs for a few tokens built from the same pieces (moe_decode_kernel, below).
//
// Built just in time by w4a8_backend/kernels/_cuda_ext.py (nvcc, cached per source hash and
// GPU architecture) and called through ctypes: no torch headers, so it builds in seconds, and the
// package imports without it. Design and measurements: docs/kernels.md ("CUDA decode kernel").
//
// Inputs are the load-time repacked tensors of w4a8_backend/kernels/_sm90_repack.py:
//   packed [NP, KP/2]  each 64-wide K group is 8 words; word i holds the "low" elements 4i+j
//                      and the "high" elements 32+4i+j (j = 0..3), bits as _sm90_repack.WORD_BITS:
//                      magnitudes of low j at bit 4j, of high j at 16+4j; signs at 8j+7 / 8j+3
//   codes  [NP, KP/32] one byte per MX block: FP8 d+21 (d in [-5, 6]), INT8 d+22 (d in [0, 3]),
//                      0 = skip (out-of-range block, added back exactly in the epilogue from
//                      a CSR over the rows: struct Corrections)
//   row_scale          FP8: float32 [NP] = 2**r[n];  INT8: uint8 [KP/256, NP] biased exponent
//
// Work split: one CTA per 16 weight rows, its warps take the 256-wide K steps in turn (split-K
// inside the CTA, reduced through shared memory, so no workspace and one launch). A warp
// computes 16 rows x 8*NT tokens with mma.sync m16n8k32: the weight is the 16-row "A" operand
// (the wide one, so M = 1 wastes only the unused token columns of "B"). Each lane loads 32
// contiguous packed bytes per row per step (two 16-byte loads) = one whole 64-wide K group, and
// the 64 activation bytes of the same group: the MMA's k slots are a permutation of K that is
// the same for A and B within a lane, which is all a dot product needs.
// The weights reach shared memory through a per-warp cp.async ring (below), copied as whole
// 128-byte row segments. Every value in one step
// belongs to one INT8 reference tile, so the INT8 int32 sum of a step is exact and is scaled
// once per step.
//
// Decode (per 32-bit word = 4 low + 4 high weights, ~7 instructions for the 8 in FP8): an
// 8-entry byte table per block, built from its code byte by integer arithmetic, looked up with
// one `prmt` per 4 weights, whose selectors are the word's magnitude bits as they lie; FP8 ORs
// in the sign bits, INT8 picks between the positive and negated tables with a sign mask. The
// same instructions as the Triton kernels' PTX (w4a8_backend/kernels/_decode_ptx.py).
//
// PDL: on SM90 the GEMM is launched with programmatic stream serialization and the quantization
// kernel releases it at its start, so the GEMM's weight loads overlap the quantization; the GEMM
// waits (griddepcontrol.wait) before it reads the quantized activations.

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include "quant_modes.h"

namespace {

constexpr int kStepK = 256;  // K per warp step = one INT8 reference tile = 4 groups of 64

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// ----------------------------------------------------------------------------------------------
// decode tables
// ----------------------------------------------------------------------------------------------
struct Lut {
  uint32_t lo, hi;    // FP8: E4M3 bits of E2M1[idx] * 2**d; INT8: (2 * E2M1[idx]) << d
  uint32_t nlo, nhi;  // INT8 only: the negated table
};

template <bool kInt8>
__device__ __forceinline__ Lut make_lut(uint32_t code) {
  Lut t;
  const bool live = code != 0;
  if constexpr (kInt8) {
    const uint32_t d = code - 22u;  // 0..3 for live codes
    t.lo = live ? (0x03020100u << d) : 0u;
    t.hi = live ? (0x0C080604u << d) : 0u;
    t.nlo = __vneg4(t.lo);
    t.nhi = __vneg4(t.hi);
  } else {
    // E4M3 exponent field of 0.5 * 2**d, in place: (d + 6) << 3, with d = code - 21
    const uint32_t e = (code - 15u) * 8u;
    t.lo = live ? e * 0x01010100u + 0x0C080000u : 0u;
    t.hi = live ? e * 0x01010101u + 0x1C181410u : 0u;
    t.nlo = t.nhi = 0u;
  }
  return t;
}

// PTX prmt in its default mode. (__byte_perm would mask each selector to 3 bits itself.)
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

// 4 weights from table t, selectors in the low 16 bits of sel (sign flags cleared), signs at
// each byte's top bit of sgn
template <bool kInt8>
__device__ __forceinline__ uint32_t lookup4(uint32_t sel, uint32_t sgn, const Lut& t) {
  if constexpr (kInt8) {
    const uint32_t pos = prmt(t.lo, t.hi, sel);
    const uint32_t neg = prmt(t.nlo, t.nhi, sel);
    const uint32_t mask = prmt(sgn, 0u, 0xBA98u);  // sign-replicate mode: 0x00 / 0xFF per byte
    return (pos & ~mask) | (neg & mask);
  } else {
    return prmt(t.lo, t.hi, sel) | (sgn & 0x80808080u);
  }
}

// The 4 low-half weights (table tl) and 4 high-half weights (table th) of the packed word p.
template <bool kInt8>
__device__ __forceinline__ void decode8(uint32_t p, const Lut& tl, const Lut& th, uint32_t& lo,
                                        uint32_t& hi) {
  const uint32_t sel = p & 0x77777777u;
  lo = lookup4<kInt8>(sel, p, tl);
  hi = lookup4<kInt8>(sel >> 16, p << 4, th);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
// The four E4M3 bytes of v as f16x2: bytes 0, 1 in lo, bytes 2, 3 in hi (exact)
__device__ __forceinline__ void e4m3x4_to_f16(uint32_t v, uint32_t& lo, uint32_t& hi) {
  asm("{ .reg .b16 l, h; mov.b32 {l, h}, %2; cvt.rn.f16x2.e4m3x2 %0, l; "
      "cvt.rn.f16x2.e4m3x2 %1, h; }"
      : "=r"(lo), "=r"(hi)
      : "r"(v));
}

__device__ __forceinline__ void mma_f16_16x8x16(float (&c)[4], uint32_t a0, uint32_t a1,
                                                uint32_t a2, uint32_t a3, uint32_t b0,
                                                uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#endif

// One m16n8k32 MMA of 8-bit operands (a0/a2: row g, a1/a3: row g + 8; a0/a1 and b0 hold this
// lane's first 4 k slots, a2/a3 and b1 its last 4). INT8: into ci. FP8: the first k16 half
// into c, the second into c2 (summed by the caller at the end).
// sm_90 has no E4M3 mma.sync: ptxas runs one as 12 F2FP unpacks, two f16 HMMAs into a zero
// accumulator and 4 FADDs into c. Unpacking here and accumulating in place saves the FADDs
// (exact: every E4M3 value is an f16, and the HMMAs still multiply and add in float32). Two
// accumulators keep consecutive MMAs independent. Each f16 MMA pairs this lane's k slots of A
// and B in the same order (bytes 0, 1 then 2, 3), which is all a dot product needs.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
// mma_16x8x32's FP8 half with B already in f16 (b0l, b0h: this lane's first 4 k slots; b1l,
// b1h: its last 4)
__device__ __forceinline__ void mma_e4m3_f16b(float (&c)[4], float (&c2)[4], uint32_t a0,
                                              uint32_t a1, uint32_t a2, uint32_t a3,
                                              uint32_t b0l, uint32_t b0h, uint32_t b1l,
                                              uint32_t b1h) {
  uint32_t a0l, a0h, a1l, a1h, a2l, a2h, a3l, a3h;
  e4m3x4_to_f16(a0, a0l, a0h);
  e4m3x4_to_f16(a1, a1l, a1h);
  mma_f16_16x8x16(c, a0l, a1l, a0h, a1h, b0l, b0h);
  e4m3x4_to_f16(a2, a2l, a2h);
  e4m3x4_to_f16(a3, a3l, a3h);
  mma_f16_16x8x16(c2, a2l, a3l, a2h, a3h, b1l, b1h);
}
#endif

template <bool kInt8>
__device__ __forceinline__ void mma_16x8x32(float (&c)[4], float (&c2)[4], int32_t (&ci)[4],
                                            uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                            uint32_t b0, uint32_t b1) {
  if constexpr (kInt8) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(ci[0]), "+r"(ci[1]), "+r"(ci[2]), "+r"(ci[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    uint32_t b0l, b0h, b1l, b1h;
    e4m3x4_to_f16(b0, b0l, b0h);
    e4m3x4_to_f16(b1, b1l, b1h);
    mma_e4m3_f16b(c, c2, a0, a1, a2, a3, b0l, b0h, b1l, b1h);
#else
    __trap();  // the host never launches FP8 below sm_89
#endif
  }
}

// ----------------------------------------------------------------------------------------------
// cp.async staging: each warp owns a ring of kStages stages in shared memory; a stage holds one
// K step of its 16 rows: the packed weights (row-major, rows padded to 144 bytes so that the
// lanes' 16-byte reads are conflict-free; each copy instruction moves 4 whole 128-byte row
// segments, i.e. full cache lines), the 16 rows' 8 code bytes, and (INT8) the 16 rows' tile
// exponents. Deep rings keep many bytes in flight per SM without costing registers.
// ----------------------------------------------------------------------------------------------
constexpr int kRowStride = kStepK / 2 + 16;
constexpr int kStageWeights = 16 * kRowStride;
constexpr int kStageCodes = 16 * 8;
constexpr int kStageTiles = 16;
constexpr int kStageBytes = kStageWeights + kStageCodes + kStageTiles;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// The weights (packed bytes, INT8 tile exponents) are read once per call: copied with an L2
// policy that evicts their lines first, so that streaming them does not push out other lines.
// (H100, L2 full of just-written lines: the decode GEMM's copies alone 17.8 -> 15.6 us at
// N = K = 8192, the GEMM 20.8 -> 18.5 us; docs/kernels.md.) The policy is made by each copy:
// made once per kernel (or passed in), nvcc 13.0's ptxas lost it in the INT8 instantiations and
// left their copies reading an unset descriptor, an illegal-instruction trap (the ptxas bug of
// IST-DASLab/marlin issue 44). _cuda_ext.build checks every built library's copies for that
// and rebuilds with W4A8_NO_L2_HINT (plain copies) when it finds one.
__device__ __forceinline__ void cp_async16_evict_first(void* dst, const void* src) {
#if defined(W4A8_NO_L2_HINT)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
#else
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(
                   smem_addr(dst)),
               "l"(src), "l"(policy));
#endif
}
// the same with the shared-memory address already converted (the decode GEMM's main loop keeps
// its stage addresses as 32-bit shared addresses)
__device__ __forceinline__ void cp_async16_evict_first_s(uint32_t dst, const void* src) {
#if defined(W4A8_NO_L2_HINT)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
#else
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(dst),
               "l"(src), "l"(policy));
#endif
}
__device__ __forceinline__ void cp_async8_s(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async8(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// 32-bit word i (0..7) of the 32 bytes lo:hi
__device__ __forceinline__ uint32_t word(const uint4& lo, const uint4& hi, int i) {
  const uint4& q = i < 4 ? lo : hi;
  switch (i & 3) {
    case 0: return q.x;
    case 1: return q.y;
    case 2: return q.z;
    default: return q.w;
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// The value of a quantized activation byte
template <bool kInt8>
__device__ __forceinline__ float act_value(uint8_t q) {
  if constexpr (kInt8) {
    return float(int8_t(q));
  } else {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(q, __NV_E4M3)));
  }
}

// Out-of-range blocks (code 0: zeros in the main pass) as a CSR over the weight's rows: row n's
// blocks are [row_ptr[n], row_ptr[n + 1]), each an MX block index along K (K offset / 32) and its
// 32 exact weight values. row_ptr null: the weight has none.
struct Corrections {
  const int32_t* row_ptr;
  const int32_t* blocks;
  const float* values;
};

// sum over blocks [b_first, b_end) (one row's) of their exact values times the quantized
// activations, unscaled, one lane alone (the MoE epilogue, which has one lane per row; the
// dense epilogue spreads each block over a warp instead). block_act(k0) gives the block at K
// index k0's activations as an accessor of its 32 values.
template <typename BlockAct>
__device__ __forceinline__ float correction_dot(const Corrections& corr, int b_first, int b_end,
                                                BlockAct block_act) {
  float dot = 0.f;
  for (int b = b_first; b < b_end; ++b) {
    const auto act = block_act(32 * corr.blocks[b]);
    const float* val = corr.values + size_t(b) * 32;
#pragma unroll  // all loads of a block in flight at once: this runs on the few-token path
    for (int e = 0; e < 32; ++e) dot = fmaf(val[e], act(e), dot);
  }
  return dot;
}

// ----------------------------------------------------------------------------------------------
// GEMM
// ----------------------------------------------------------------------------------------------
// One warp's share of a 256-wide K step, as the MMAs take it: this lane's K group (bytes
// 32t .. 32t + 31) of weight rows g and g + 8, their code bytes, (INT8) their tile exponents,
// and (the MoE kernel's unstaged items; the dense kernel keeps them apart, step_mma's x) the
// activation bytes of the same K group for each token tile.
template <int kNT>
struct StepRegs {
  uint4 wa0, wa1, wb0, wb1;
  uint32_t ca, cb, ta, tb;
  uint4 x[kNT][4];
};

// The decode and MMAs of one step. acc (FP8) accumulates across steps; INT8 sums a step exactly
// in int32 and adds it to acc once, scaled by the rows' tile exponents.
template <bool kInt8, int kNT>
__device__ __forceinline__ void step_mma(const StepRegs<kNT>& r, const uint4 (&x)[kNT][4],
                                         float (&acc)[kNT][4], float (&acc2)[kNT][4]) {
  const Lut la_lo = make_lut<kInt8>(r.ca & 0xFF);
  const Lut la_hi = make_lut<kInt8>(r.ca >> 8);
  const Lut lb_lo = make_lut<kInt8>(r.cb & 0xFF);
  const Lut lb_hi = make_lut<kInt8>(r.cb >> 8);
  int32_t iacc[kNT][4];
#pragma unroll
  for (int j = 0; j < kNT; ++j) iacc[j][0] = iacc[j][1] = iacc[j][2] = iacc[j][3] = 0;
#pragma unroll
  for (int i8 = 0; i8 < 8; ++i8) {
    const uint32_t pa = word(r.wa0, r.wa1, i8), pb = word(r.wb0, r.wb1, i8);
    uint32_t a0, a1, a2, a3;
    decode8<kInt8>(pa, la_lo, la_hi, a0, a2);  // row g, K 64G + 4*i8 .. and 64G + 32 + 4*i8 ..
    decode8<kInt8>(pb, lb_lo, lb_hi, a1, a3);  // row g + 8, same K
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const uint32_t b0 = word(x[j][0], x[j][1], i8);
      const uint32_t b1 = word(x[j][2], x[j][3], i8);
      mma_16x8x32<kInt8>(acc[j], acc2[j], iacc[j], a0, a1, a2, a3, b0, b1);
    }
  }
  if constexpr (kInt8) {
    // exact: |tile sum| < 256 * 96 * 127 < 2**24
    const float sa = __int_as_float(int(r.ta) << 23);
    const float sb = __int_as_float(int(r.tb) << 23);
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      acc[j][0] = fmaf(float(iacc[j][0]), sa, acc[j][0]);
      acc[j][1] = fmaf(float(iacc[j][1]), sa, acc[j][1]);
      acc[j][2] = fmaf(float(iacc[j][2]), sb, acc[j][2]);
      acc[j][3] = fmaf(float(iacc[j][3]), sb, acc[j][3]);
    }
  }
}

template <bool kInt8, int kNT, int kWarps, int kStages, typename OutT>
__global__ void __launch_bounds__(kWarps * 32)
    decode_gemm_kernel(const uint8_t* __restrict__ xq, const float* __restrict__ xs,
                       const uint8_t* __restrict__ packed, const uint8_t* __restrict__ codes,
                       const void* __restrict__ row_scale, const Corrections corr,
                       const OutT* __restrict__ bias, OutT* __restrict__ y, int M, int N, int K,
                       int KP, int NP, int ldy, int per_token) {
  constexpr int kCols = 8 * kNT;
  extern __shared__ __align__(16) uint8_t ring_all[];
  __shared__ float partial[kWarps][16][kCols + 1];
  constexpr int kCorrChunk = 32;  // out-of-range blocks summed per round of the epilogue
  __shared__ float corr_blk[kCorrChunk][kCols];  // one round's sums per (block, token)
  __shared__ float corr_sum[16][kCols];          // their totals per (row, token), unscaled

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;  // MMA group: weight rows g and g + 8, token column g
  const int t = lane & 3;   // thread in group: which 64-wide K group of a step
  const int n0 = blockIdx.x * 16;
  const int m0 = blockIdx.y * kCols;
  const int steps = (K + kStepK - 1) / kStepK;  // steps past K would read only padding
  const size_t kp2 = size_t(KP) / 2, kp32 = size_t(KP) / 32;
  const uint8_t* tiles = static_cast<const uint8_t*>(row_scale);

  float acc[kNT][4], acc2[kNT][4];  // acc2: FP8's second k16 halves (mma_16x8x32)
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    acc2[j][0] = acc2[j][1] = acc2[j][2] = acc2[j][3] = 0.f;
  }

  // The main loop keeps its addresses in registers and moves them by one warp step (kWarps K
  // steps) per iteration: nothing is recomputed from the thread index or the kernel arguments
  // inside it (that address arithmetic was about a third of the loop's instructions).
  // copies: instruction i moves rows 4i .. 4i+3 (lane: row 4i + lane/8, 16-byte chunk
  // lane%8); lanes 0-15 one row's code bytes; lane 16 the 16 tile exponents (INT8)
  const int copy_row = lane >> 3, copy_chunk = (lane & 7) * 16;
  const size_t row4 = 4 * kp2;
  const uint8_t* w_next = packed + size_t(n0 + copy_row) * kp2 + copy_chunk + warp * (kStepK / 2);
  const uint8_t* c_next = codes + size_t(n0 + (lane & 15)) * kp32 + warp * (kStepK / 32);
  const uint8_t* t_next = tiles + n0 + size_t(warp) * NP;
  const uint8_t* ring = ring_all + warp * (kStages * kStageBytes);
  const uint32_t ring_s = smem_addr(ring);
  const uint32_t w_dst = ring_s + copy_row * kRowStride + copy_chunk;
  const uint32_t c_dst = ring_s + kStageWeights + (lane & 15) * 8;
  const uint32_t t_dst = ring_s + kStageWeights + kStageCodes;
  // copies the next step into the stage at byte offset `stage` of the ring
  auto issue = [&](uint32_t stage) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      cp_async16_evict_first_s(w_dst + stage + 4 * i * kRowStride, w_next + i * row4);
    if (lane < 16) cp_async8_s(c_dst + stage, c_next);
    if (kInt8 && lane == 16) cp_async16_evict_first_s(t_dst + stage, t_next);
    w_next += kWarps * (kStepK / 2);
    c_next += kWarps * (kStepK / 32);
    t_next += size_t(kWarps) * NP;
  };
  auto next_stage = [](uint32_t stage) {
    return stage + kStageBytes == kStages * kStageBytes ? 0u : stage + kStageBytes;
  };

  // Two token tiles: addresses from the step index and one register set copied, as before
  // 2026-11-25 (the pointers and register sets of the loop for one tile below took 145-150
  // registers here: fewer CTAs per SM than the grid has, 1.1-1.2x slower on an H100,
  // benchmarks/results/cuda_lib_ab_h100_20261125_1249.jsonl)
  const uint8_t* w_src = packed + size_t(n0 + copy_row) * kp2 + copy_chunk;
  const uint8_t* c_src = codes + size_t(n0 + (lane & 15)) * kp32;
  const uint8_t* t_src = tiles + n0;
  auto issue_at = [&](int s_at, int stage) {
    uint8_t* st = ring_all + warp * (kStages * kStageBytes) + stage * kStageBytes +
                  copy_row * kRowStride + copy_chunk;
    const uint8_t* src = w_src + s_at * (kStepK / 2);
#pragma unroll
    for (int i = 0; i < 4; ++i)
      cp_async16_evict_first(st + 4 * i * kRowStride, src + 4 * i * kp2);
    uint8_t* sc = ring_all + warp * (kStages * kStageBytes) + stage * kStageBytes + kStageWeights;
    if (lane < 16) cp_async8(sc + lane * 8, c_src + s_at * (kStepK / 32));
    if (kInt8 && lane == 16) cp_async16_evict_first(sc + kStageCodes, t_src + size_t(s_at) * NP);
  };
  auto load_x_at = [&](int s_at, uint4 (&x)[kNT][4]) {
    const int kx = s_at * kStepK + t * 64;
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const int m = m0 + 8 * j + g;
      const uint4* px = reinterpret_cast<const uint4*>(xq + size_t(m) * K + kx);
#pragma unroll
      for (int q = 0; q < 4; ++q)
        x[j][q] = (m < M && kx + 16 * q < K) ? __ldg(px + q) : make_uint4(0, 0, 0, 0);
    }
  };

  // The weights do not depend on the previous kernel: start their copies before waiting.
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (warp + i * kWarps < steps) {
      if constexpr (kNT == 1) {
        issue(i * kStageBytes);
      } else {
        issue_at(warp + i * kWarps, i);
      }
    }
    cp_async_commit();
  }
  // The CTA's out-of-range blocks are [c_first, c_end) of the CSR (its rows are consecutive);
  // lanes 0..16 of every warp hold the rows' offsets row_ptr[n0 + lane] (n0 + 16 <= NP). Each
  // warp prefetches the index and values (one per lane) of the first block it sums in the
  // epilogue, so that the epilogue waits only for the activations. (Waiting for row_ptr here
  // costs nothing: the weight copies are in flight and the activations are not ready yet.)
  int corr_off = 0;
  if (corr.row_ptr != nullptr && lane <= 16) corr_off = corr.row_ptr[n0 + lane];
  const int c_first = __shfl_sync(0xffffffffu, corr_off, 0);
  const int c_count = __shfl_sync(0xffffffffu, corr_off, 16) - c_first;
  float pre_val = 0.f;
  int pre_blk = 0;
  if (warp < c_count) {
    pre_val = corr.values[size_t(c_first + warp) * 32 + lane];
    pre_blk = corr.blocks[c_first + warp];
  }
  pdl_wait();

  // Activations: token m0 + 8j + g, the 64 bytes of this lane's K group of each step
  // (L2-resident), loaded one step ahead: loaded in the step itself, their L2 latency added to
  // the largest stall (ncu, H100: 36 % of the warps' cycles on the L1TEX scoreboard, with the
  // cp.async ring's waits). One token tile: two register sets, swapped by unrolling the loop
  // twice; two tiles copy one set instead (two sets took 154 registers, which left room for
  // fewer CTAs than the grid has). Lanes of tokens past M keep their zeros.
  const uint8_t* x_next[kNT];
  bool x_live[kNT];
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    const int m = m0 + 8 * j + g;
    x_live[j] = m < M;
    x_next[j] = xq + size_t(x_live[j] ? m : 0) * K + warp * kStepK + t * 64;
  }
  int k_left = K - (warp * kStepK + t * 64);  // this lane's K values from its next load on
  auto load_x = [&](uint4 (&x)[kNT][4]) {
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      if (!x_live[j]) continue;
      const uint4* px = reinterpret_cast<const uint4*>(x_next[j]);
      if (k_left >= 64) {
#pragma unroll
        for (int q = 0; q < 4; ++q) x[j][q] = __ldg(px + q);
      } else {  // the last step of a K that is not a multiple of kStepK
#pragma unroll
        for (int q = 0; q < 4; ++q)
          x[j][q] = 16 * q < k_left ? __ldg(px + q) : make_uint4(0, 0, 0, 0);
      }
      x_next[j] += kWarps * kStepK;
    }
    k_left -= kWarps * kStepK;
  };
  uint4 xa[kNT][4], xb[kNT == 1 ? kNT : 1][4];
#pragma unroll
  for (int j = 0; j < kNT; ++j)
#pragma unroll
    for (int q = 0; q < 4; ++q) xa[j][q] = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int q = 0; q < 4; ++q) xb[0][q] = make_uint4(0, 0, 0, 0);
  if (warp < steps) {
    if constexpr (kNT == 1) {
      load_x(xa);
    } else {
      load_x_at(warp, xa);
    }
  }

  // this lane's weights, code bytes and (INT8) tile exponents of the stage at st
  auto stage_regs = [&](const uint8_t* st) {
    StepRegs<kNT> r;
    r.wa0 = *reinterpret_cast<const uint4*>(st + g * kRowStride + 32 * t);
    r.wa1 = *reinterpret_cast<const uint4*>(st + g * kRowStride + 32 * t + 16);
    r.wb0 = *reinterpret_cast<const uint4*>(st + (g + 8) * kRowStride + 32 * t);
    r.wb1 = *reinterpret_cast<const uint4*>(st + (g + 8) * kRowStride + 32 * t + 16);
    r.ca = *reinterpret_cast<const uint16_t*>(st + kStageWeights + g * 8 + t * 2);
    r.cb = *reinterpret_cast<const uint16_t*>(st + kStageWeights + (g + 8) * 8 + t * 2);
    r.ta = st[kStageWeights + kStageCodes + g];
    r.tb = st[kStageWeights + kStageCodes + g + 8];
    return r;
  };
  uint32_t st_read = 0, st_write = (kStages - 1) * kStageBytes;
  int s = warp;
  // one K step: x holds its activations, x_ahead receives the next step's
  auto step = [&](const uint4 (&x)[kNT][4], uint4 (&x_ahead)[kNT][4]) {
    if (s + kWarps < steps) load_x(x_ahead);
    __syncwarp();  // every lane is done reading the stage that the next copy overwrites
    if (s + (kStages - 1) * kWarps < steps) issue(st_write);
    cp_async_commit();
    cp_async_wait<kStages - 1>();
    __syncwarp();  // make the other lanes' copies (codes, tile exponents) visible

    step_mma<kInt8, kNT>(stage_regs(ring + st_read), x, acc, acc2);
    st_read = next_stage(st_read);
    st_write = next_stage(st_write);
    s += kWarps;
  };
  if constexpr (kNT == 1) {
    while (s < steps) {
      step(xa, xb);
      if (s >= steps) break;
      step(xb, xa);
    }
  } else {  // two token tiles (issue_at, load_x_at above)
    int stage = 0;
    for (; s < steps; s += kWarps) {
      uint4 x[kNT][4];
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) x[j][q] = xa[j][q];
      if (s + kWarps < steps) load_x_at(s + kWarps, xa);
      __syncwarp();  // every lane is done reading the stage that the next copy overwrites
      const int s_next = s + (kStages - 1) * kWarps;
      if (s_next < steps) issue_at(s_next, stage == 0 ? kStages - 1 : stage - 1);
      cp_async_commit();
      cp_async_wait<kStages - 1>();
      __syncwarp();  // make the other lanes' copies (codes, tile exponents) visible
      const uint8_t* st = ring + stage * kStageBytes;
      stage = stage + 1 == kStages ? 0 : stage + 1;
      step_mma<kInt8, kNT>(stage_regs(st), x, acc, acc2);
    }
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the CTA exits

  // split-K reduction across the CTA's warps, then the epilogue
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    if constexpr (!kInt8) {
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[j][q] += acc2[j][q];
    }
    partial[warp][g][8 * j + 2 * t] = acc[j][0];
    partial[warp][g][8 * j + 2 * t + 1] = acc[j][1];
    partial[warp][g + 8][8 * j + 2 * t] = acc[j][2];
    partial[warp][g + 8][8 * j + 2 * t + 1] = acc[j][3];
  }
  // The exact sums of the out-of-range blocks, in rounds of kCorrChunk blocks: warp w takes the
  // round's blocks w, w + kWarps, ..., each with its 32 lanes on the block's 32 values and a
  // fixed reduction tree; then each (row, token) adds its row's blocks in order (deterministic).
  // Most CTAs have none and skip this (c_count is the same in every warp).
  for (int base = 0; base < c_count; base += kCorrChunk) {
    const int count = min(c_count - base, kCorrChunk);
    for (int i = warp; i < count; i += kWarps) {
      const bool prefetched = base == 0 && i == warp;
      const size_t b = size_t(c_first + base + i);
      const float val = prefetched ? pre_val : corr.values[b * 32 + lane];
      const uint8_t* xb = xq + 32 * size_t(prefetched ? pre_blk : corr.blocks[b]) + lane;
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        float p = m0 + j < M ? val * act_value<kInt8>(xb[size_t(m0 + j) * K]) : 0.f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) p += __shfl_xor_sync(0xffffffffu, p, o);
        if (lane == 0) corr_blk[i][j] = p;
      }
    }
    __syncthreads();
    // (the lanes of a warp run the same number of iterations: 16 * kCols is a multiple of 32)
    for (int idx = threadIdx.x; idx < 16 * kCols; idx += kWarps * 32) {
      const int r = idx & 15, col = idx >> 4;
      const int lo = max(__shfl_sync(0xffffffffu, corr_off, r) - c_first - base, 0);
      const int hi = min(__shfl_sync(0xffffffffu, corr_off, r + 1) - c_first - base, count);
      float c = base == 0 ? 0.f : corr_sum[r][col];
      for (int i = lo; i < hi; ++i) c += corr_blk[i][col];
      corr_sum[r][col] = c;
    }
    __syncthreads();
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < 16 * kCols; idx += kWarps * 32) {
    const int r = idx & 15, col = idx >> 4;
    const int n = n0 + r, m = m0 + col;
    if (n >= N || m >= M) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += partial[w][r][col];
    const float x_scale = per_token ? xs[m] : xs[0];
    v *= x_scale;
    if constexpr (!kInt8) v *= static_cast<const float*>(row_scale)[n];
    if (c_count > 0) v = fmaf(corr_sum[r][col], x_scale, v);
    if (bias != nullptr) v += to_float(bias[n]);
    y[size_t(m) * ldy + n] = from_float<OutT>(v);
  }
}

// ----------------------------------------------------------------------------------------------
// activation quantization (bit-exact with w4a8_backend.formats.quantize_activation)
// ----------------------------------------------------------------------------------------------
__device__ __forceinline__ float nan_max(float a, float b) {
  return (a > b || a != a) ? a : b;
}

// v / scale (IEEE division), clamped to the format's range, rounded: an E4M3 byte or an int8
// (NaN -> 0 for INT8, as formats.quantize_activation does)
template <bool kInt8>
__device__ __forceinline__ uint8_t quantize_value(float v, float scale) {
  constexpr float kQmax = kInt8 ? 127.f : 448.f;
  float f = __fdiv_rn(v, scale);
  if (f == f) f = fminf(fmaxf(f, -kQmax), kQmax);
  if constexpr (kInt8) {
    return (f == f) ? uint8_t(int8_t(rintf(f))) : uint8_t(0);
  } else {
    return __nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3);
  }
}

// The scale of a dynamic amax as the reference computes it: amax.clamp(min=1e-12) / qmax, where
// torch divides a CUDA tensor by a Python scalar as a multiplication by the float32 reciprocal.
// A NaN amax gives a NaN scale, as in the reference.
template <bool kInt8>
__device__ __forceinline__ float dynamic_scale(float amax) {
  constexpr float kInvQmax = kInt8 ? float(1.0 / 127.0) : float(1.0 / 448.0);
  return (amax != amax ? amax : fmaxf(amax, 1e-12f)) * kInvQmax;
}

// Eight (bf16/fp16) or four (fp32) input values: one 16-byte load.
template <typename InT>
struct Vec16 {
  static constexpr int kN = 16 / sizeof(InT);
  InT v[kN];
};

// Quantize one input vector into q's vector i (q rows are contiguous, K bytes each).
template <bool kInt8, typename InT>
__device__ __forceinline__ void store_quantized(uint8_t* q, int i, const Vec16<InT>& v,
                                                float scale) {
  constexpr int kN = Vec16<InT>::kN;
  uint8_t out[kN];
#pragma unroll
  for (int e = 0; e < kN; ++e) out[e] = quantize_value<kInt8>(to_float(v.v[e]), scale);
  if constexpr (kN == 8) {
    uint2 o;
    o.x = out[0] | (out[1] << 8) | (out[2] << 16) | (uint32_t(out[3]) << 24);
    o.y = out[4] | (out[5] << 8) | (out[6] << 16) | (uint32_t(out[7]) << 24);
    reinterpret_cast<uint2*>(q)[i] = o;
  } else {
    reinterpret_cast<uint32_t*>(q)[i] =
        out[0] | (out[1] << 8) | (out[2] << 16) | (uint32_t(out[3]) << 24);
  }
}

// One CTA per row; 16-byte loads, kUnroll of them in flight per thread. A dynamic per-tensor
// scale (small inputs; larger ones go to quant_act_grid_kernel) comes from this kernel in a
// single CTA over all `rows` rows.
template <bool kInt8, typename InT>
__global__ void __launch_bounds__(256)
    quant_act_kernel(const InT* __restrict__ x, int ldx, uint8_t* __restrict__ q,
                     const float* __restrict__ s_in, float* __restrict__ s_out, int rows, int K,
                     int mode) {
  pdl_release();  // the GEMM may start copying weights now
  const bool is_static = mode == int(w4a8::ActivationScheme::STATIC_PER_TENSOR);
  using V = Vec16<InT>;
  constexpr int kN = V::kN;
  constexpr int kUnroll = 8;
  const bool whole = mode == int(w4a8::ActivationScheme::DYNAMIC_PER_TENSOR);
  const int nvec = K / kN;
  // this CTA's 16-byte vectors, numbered across its rows (so that the single CTA of `whole` keeps
  // kUnroll loads in flight across row ends instead of one row after another)
  const int v0 = whole ? 0 : blockIdx.x * nvec, v1 = whole ? rows * nvec : v0 + nvec;
  const int first = v0 + threadIdx.x, stride = blockDim.x * kUnroll;
  auto vec = [&](int i) {
    const int r = i / nvec;
    return reinterpret_cast<const V*>(x + size_t(r) * ldx)[i - r * nvec];
  };
  // the first round of vectors (all of them up to 16384 bf16 values) stays in registers
  V kept[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u)
    if (first + u * int(blockDim.x) < v1) kept[u] = vec(first + u * blockDim.x);
  float scale;
  if (is_static) {
    scale = s_in[0];
  } else {
    __shared__ float red[8];
    float amax = 0.f;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (first + u * int(blockDim.x) < v1)
#pragma unroll
        for (int e = 0; e < kN; ++e) amax = nan_max(amax, fabsf(to_float(kept[u].v[e])));
    for (int base = first + stride; base < v1; base += stride) {
      V v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (base + u * int(blockDim.x) < v1) v[u] = vec(base + u * blockDim.x);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (base + u * int(blockDim.x) < v1)
#pragma unroll
          for (int e = 0; e < kN; ++e) amax = nan_max(amax, fabsf(to_float(v[u].v[e])));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = amax;
    __syncthreads();
    amax = red[0];
    for (int w = 1; w < int(blockDim.x >> 5); ++w) amax = nan_max(amax, red[w]);
    scale = dynamic_scale<kInt8>(amax);
    if (threadIdx.x == 0) s_out[whole ? 0 : blockIdx.x] = scale;
  }
  // q rows are contiguous (K bytes each), so q's vector i is vector i of this numbering
#pragma unroll
  for (int u = 0; u < kUnroll; ++u)
    if (first + u * int(blockDim.x) < v1)
      store_quantized<kInt8>(q, first + u * blockDim.x, kept[u], scale);
  for (int base = first + stride; base < v1; base += stride) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * int(blockDim.x) < v1) v[u] = vec(base + u * blockDim.x);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * int(blockDim.x) < v1)
        store_quantized<kInt8>(q, base + u * blockDim.x, v[u], scale);
  }
}

// Dynamic per-tensor quantization over a grid of CTAs (a cooperative launch, at most one CTA per
// SM): each CTA takes the amax of its grid-strided share of the vectors into partials[blockIdx],
// the grid syncs, every CTA reduces all partials (max is exact in any order, so all get the same
// scale) and quantizes its share, kept in registers when it fits in kUnroll vectors per thread.
// One launch, and all SMs' bandwidth for the amax instead of one CTA's. The GEMM is released at
// the start, or with release_late once the amax is known: measured faster from 8 rows up on an
// H100 (up to 5.7 us at K = 14336), slower below (benchmarks/results/quant_pdl_release_*.jsonl).
template <bool kInt8, typename InT>
__global__ void __launch_bounds__(256)
    quant_act_grid_kernel(const InT* __restrict__ x, int ldx, uint8_t* __restrict__ q,
                          float* __restrict__ partials, float* __restrict__ s_out, int rows,
                          int K, int release_late) {
  if (!release_late) pdl_release();  // the GEMM may start copying weights now
  using V = Vec16<InT>;
  constexpr int kN = V::kN;
  constexpr int kUnroll = 4;
  const int nvec = K / kN, total = rows * nvec;
  const int first = blockIdx.x * blockDim.x + threadIdx.x, stride = gridDim.x * blockDim.x;
  auto vec = [&](int i) {
    const int r = i / nvec;
    return reinterpret_cast<const V*>(x + size_t(r) * ldx)[i - r * nvec];
  };
  V kept[kUnroll];
  float amax = 0.f;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u)
    if (first + u * stride < total) kept[u] = vec(first + u * stride);
#pragma unroll
  for (int u = 0; u < kUnroll; ++u)
    if (first + u * stride < total)
#pragma unroll
      for (int e = 0; e < kN; ++e) amax = nan_max(amax, fabsf(to_float(kept[u].v[e])));
  for (int i = first + kUnroll * stride; i < total; i += stride) {
    const V v = vec(i);
#pragma unroll
    for (int e = 0; e < kN; ++e) amax = nan_max(amax, fabsf(to_float(v.v[e])));
  }
  __shared__ float red[8];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = amax;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < int(blockDim.x >> 5); ++w) amax = nan_max(amax, red[w]);
    partials[blockIdx.x] = amax;
  }
  cooperative_groups::this_grid().sync();
  if (threadIdx.x < 32) {
    amax = 0.f;
    for (int b = threadIdx.x; b < int(gridDim.x); b += 32) amax = nan_max(amax, partials[b]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (threadIdx.x == 0) red[0] = amax;
  }
  __syncthreads();
  if (release_late) pdl_release();
  const float scale = dynamic_scale<kInt8>(red[0]);
  if (blockIdx.x == 0 && threadIdx.x == 0) s_out[0] = scale;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u)
    if (first + u * stride < total) store_quantized<kInt8>(q, first + u * stride, kept[u], scale);
  for (int i = first + kUnroll * stride; i < total; i += stride)
    store_quantized<kInt8>(q, i, vec(i), scale);
}

// ----------------------------------------------------------------------------------------------
// MoE decode GEMMs (a few tokens): the dense kernel's copies, decode and MMA, with one routed
// expert's rows per work item. Stacked expert matrices (sm90_triton_moe.py): expert e owns rows
// [e * rows_per_expert, (e + 1) * rows_per_expert); in w13 its gate rows start at 0 and its up
// rows at up_offset.
//
// GEMM1 (kGated): one CTA per (8 intermediate columns, routed pair). Its 16 MMA rows are the
//   expert's 8 gate rows (MMA rows 0-7) and the 8 matching up rows (8-15), so the epilogue has
//   gate and up of each column at hand: SiLU-and-mul, and with a static intermediate scale the
//   quantization, happen there. Output h [pairs, I]: quantized bytes, or (dynamic scales)
//   float32 h and each CTA's amax of |h| [pairs, ceil(I / 8)].
// GEMM2: one CTA per (16 output rows, token); its work items are (the token's j-th expert,
//   K step), so the router-weighted sum over the top-k experts happens inside the CTA: no
//   per-pair output and no reduction launch. Float32 h it quantizes itself while staging it,
//   with the scales (per pair row or per tensor) that GEMM1's amaxes give: no quantization
//   launch in between. (Splitting the experts over several CTAs with a
//   last-CTA reduction, for more CTAs at one token, was measured slower on an H100: 19.9 ->
//   21.6-40.5 us for the Qwen3-30B-A3B layer; docs/moe_kernels.md.)
// Only MMA column 0 is used (every lane reads the staged row, so B's other 7 columns are
// copies of column 0).
// FP8 products are summed in float32 by the f16 MMAs (mma_16x8x32) over a work item's 256-wide
// K step and scaled once per item (rows' 2**r, activation scale, router weight). The MoE
// re-quantizes h, where the Triton kernels' wgmma needs explicit promotion to keep its FP8
// roundings (docs/moe_kernels.md); mma.sync's f16 path accumulates in float32 throughout, as
// the E4M3 mma.sync that ptxas expands into it did. Out-of-range blocks (code 0, zeros in the
// main pass) are added back exactly in the epilogue from a per-row CSR over the repacking's
// side table.
// ----------------------------------------------------------------------------------------------
constexpr int kMoeMaxGroups = 16;  // largest top-k that GEMM2 takes
// Both GEMMs stage their activations in shared memory once per CTA (GEMM1 its pair's token row,
// GEMM2 its token's top-k rows of h), instead of each warp loading them (and, FP8, unpacking
// them) on every MMA. Per 256-wide K step: the 4 K groups of 64 values, FP8 as f16 (128
// bytes) at a stride of 144 bytes, INT8 as they are (64 bytes) at a stride of 80, so that the
// 4 groups the lanes read at once sit on distinct banks. Work item it (group grp, step s) finds
// its step at it * x_step_bytes (it = grp * steps + s).
template <bool kInt8>
__host__ __device__ constexpr int x_group_stride() { return kInt8 ? 80 : 144; }
template <bool kInt8>
__host__ __device__ constexpr int x_step_bytes() { return 4 * x_group_stride<kInt8>(); }
// Most values one CTA stages: GEMM1's hidden size, GEMM2's top_k x (intermediate size rounded
// up to 256). FP8: 37 KB.
constexpr int kMoeMaxStagedK = 16384;

// INT8 GEMM2's out-of-range blocks, brought to shared memory while the main loop runs. Read in
// the epilogue, they were two dependent memory latencies at the end of every CTA with a block
// (INT8 weights always have some; ~a third of GEMM2's CTAs at Qwen3-30B-A3B, one token: 1.8 us
// of its 9.7 us on an H100). At the end of the dynamic shared memory of those launches only,
// so that the others keep their occupancy: the first block (index, 32 values) of up to
// kCorrSlots rows, then the 17 CSR entries of the CTA's 16 rows per group. GEMM1 (few blocks
// per CTA, many CTAs) and FP8 (its 12-binade windows leave few blocks) keep the epilogue loads:
// staging them too cost GEMM1 2 us at 4 tokens.
constexpr int kCorrSlots = 4;
constexpr int kCorrRpPitch = 17;
constexpr int kCorrSmemBytes =
    (kCorrSlots * 32 + kCorrSlots + kMoeMaxGroups * kCorrRpPitch) * 4;
template <bool kInt8, bool kGated>
constexpr bool kStagedCorr = kInt8 && !kGated;

// dynamic shared memory of a MoE launch config: the weight rings, `staged_steps` staged K
// steps and, where the blocks are staged and the weight has some, their area
template <bool kInt8, bool kGated, int kWarps, int kStages>
constexpr int moe_smem_bytes(int staged_steps, bool corr) {
  return kWarps * kStages * kStageBytes + staged_steps * x_step_bytes<kInt8>() +
         (corr && kStagedCorr<kInt8, kGated> ? kCorrSmemBytes : 0);
}

// The staged activations of the MX block at K index k0 (a multiple of 32, so the block lies in
// one 64-wide group) of the group whose first item is item0: an accessor of its 32 values.
template <bool kInt8>
__device__ __forceinline__ auto staged_block(const uint8_t* x_staged, int item0, int k0) {
  const uint8_t* p = x_staged + (item0 + k0 / kStepK) * x_step_bytes<kInt8>() +
                     (k0 % kStepK) / 64 * x_group_stride<kInt8>() + (k0 % 64) * (kInt8 ? 1 : 2);
  return [p](int e) {
    if constexpr (kInt8) {
      return float(int8_t(p[e]));
    } else {
      return __half2float(reinterpret_cast<const __half*>(p)[e]);
    }
  };
}

// nan_max of p[first], p[first + stride], ... below n (and 0), 8 loads in flight
__device__ __forceinline__ float strided_nan_max(const float* p, int n, int first, int stride) {
  float m = 0.f;
  for (int i0 = first; i0 < n; i0 += 8 * stride) {
    float v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) v[u] = i0 + u * stride < n ? p[i0 + u * stride] : 0.f;
#pragma unroll
    for (int u = 0; u < 8; ++u) m = nan_max(m, v[u]);
  }
  return m;
}

// The staging passes of a CTA over `groups` activation rows of K values (`steps` 256-wide steps
// each) in units of kUnit values: thread t takes units t, t + kThreads, ...; a pass issues all
// of its kRounds loads (load(grp, k, in) -> V for the unit at K index k of row grp; in: the
// unit holds values, else past the rows or past K, which K % 32 == 0 makes whole units) before
// its first store (store(grp, k, v)), so that rows longer than one round wait for one L2
// latency per pass, not one per unit.
template <int kThreads, int kUnit, bool kOneGroup, typename V, typename Load, typename Store>
__device__ __forceinline__ void staging_passes(int groups, int steps, int K, Load load,
                                               Store store) {
  constexpr int kRounds = 4;
  const int per_row = steps * (kStepK / kUnit);
  const int units = groups * per_row;
  for (int u0 = threadIdx.x; u0 < units; u0 += kRounds * kThreads) {
    V v[kRounds];
#pragma unroll
    for (int q = 0; q < kRounds; ++q) {
      const int u = u0 + q * kThreads;
      const int grp = kOneGroup ? 0 : u / per_row, k = kUnit * (u - grp * per_row);
      v[q] = load(grp, k, u < units && k < K);
    }
#pragma unroll
    for (int q = 0; q < kRounds; ++q) {
      const int u = u0 + q * kThreads;
      if (u >= units) break;
      const int grp = kOneGroup ? 0 : u / per_row, k = kUnit * (u - grp * per_row);
      store(grp, k, v[q]);
    }
  }
}

__device__ __forceinline__ float warp_nan_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

struct MoeArgs {
  const void* a;                // GEMM1: quantized x [T, K]; GEMM2: h [pairs, K], quantized
                                // bytes, or float32 (a_float)
  const float* a_scale;         // [1], or one per activation row (a_per_row); unused if a_float
  const uint8_t* packed;        // stacked experts [rows, KP/2]
  const uint8_t* codes;         // [rows, KP/32]
  const void* row_scale;        // FP8: float [rows]; INT8: uint8 [KP/256, rows]
  const int32_t* corr_row_ptr;  // [rows + 1] CSR into corr_blocks / corr_values, or null
  const int32_t* corr_blocks;   // MX block index (along K) of each out-of-range block
  const float* corr_values;     // [blocks, 32] their exact values
  const void* ids;              // topk_ids [T, top_k], int32 or int64 (ids64)
  const int32_t* expert_map;    // global id -> local id or -1; null: the identity
  const float* topk_w;          // [T, top_k] router weights (GEMM2), or null: unweighted
  const float* h_scale;         // GEMM1: static scale to quantize h with, or null: float32 h
  void* out;                    // GEMM1: h [pairs, ldo]; GEMM2: y [T, ldo] of out_dtype
  float* amax_out;              // GEMM1 with float32 h: each CTA's amax of |h| [pairs, grid.x]
  const float* amax_in;         // GEMM2 with a_float: GEMM1's amax_out [pairs, amax_cols]
  int ids64, top_k, E, K, KP, rows, rows_per_expert, up_offset, n_out, lda, ldo, a_per_row,
      out_dtype, a_float, amax_cols;
};

__device__ __forceinline__ void store_out(void* out, int dtype, size_t i, float v) {
  if (dtype == 0) {
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
  } else if (dtype == 1) {
    static_cast<__half*>(out)[i] = __float2half_rn(v);
  } else {
    static_cast<float*>(out)[i] = v;
  }
}

// kStageX: the activations staged in shared memory (GEMM1 always; GEMM2 as the host picks),
// else each item's loaded from global memory by the lanes of token column 0.
template <bool kInt8, bool kGated, bool kStageX, int kWarps, int kStages>
__global__ void __launch_bounds__(kWarps * 32) moe_decode_kernel(const MoeArgs args) {
  static_assert(kStageX || !kGated, "GEMM1 stages its token row");
  // INT8 loads its activation factor in each item unless GEMM2 stages (moving it to shared
  // memory was slower on an H100 for GEMM1 and the unstaged GEMM2, faster for the staged one;
  // docs/moe_kernels.md)
  constexpr bool kSmemFactor = !kInt8 || (kStageX && !kGated);
  extern __shared__ __align__(16) uint8_t ring_all[];
  [[maybe_unused]] uint8_t* const x_staged = ring_all + kWarps * kStages * kStageBytes;
  __shared__ float partial[kWarps][16];
  __shared__ int s_row[kMoeMaxGroups];   // first stacked row of the group's expert
  __shared__ int s_arow[kMoeMaxGroups];  // the group's activation row
  __shared__ float s_w[kMoeMaxGroups];   // the group's router weight
  // the group's activation factor (activation scale x router weight), FP8 its 16 MMA rows' 2**r;
  // GEMM2 with float32 h: the groups' activation scales and the CTA's partial amaxes
  __shared__ float s_xs[kSmemFactor ? kMoeMaxGroups : 1];
  __shared__ float s_rs[kGated || kInt8 ? 1 : kMoeMaxGroups][kInt8 ? 1 : 16];
  __shared__ float s_as[kGated ? 1 : kMoeMaxGroups];
  __shared__ float s_red[kGated ? 1 : kWarps];
  __shared__ int s_groups;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;  // MMA rows g and g + 8; token column g (only g == 0 is real)
  const int t = lane & 3;   // which 64-wide K group of a step
  const int col0 = blockIdx.x * (kGated ? 8 : 16);  // first h column / first output row
  const int steps = (args.K + kStepK - 1) / kStepK;
  const size_t kp2 = size_t(args.KP) / 2, kp32 = size_t(args.KP) / 32;
  const bool a_float = kStageX && !kGated && args.a_float;  // the host stages float h

  // The routing was finished before the previous kernel started, so it may be read before
  // griddepcontrol.wait. GEMM1: the CTA's pair; GEMM2: the token's top-k pairs, one per lane
  // of warp 0 (loaded in parallel), compacted in pair order; pairs routed to no local expert
  // are dropped.
  if (warp == 0) {
    const int first = kGated ? blockIdx.y : blockIdx.y * args.top_k;
    const int count = kGated ? 1 : args.top_k;
    const int p = first + lane;
    int id = -1;
    float w = 1.f;
    if (lane < count) {
      id = args.ids64 ? int(static_cast<const int64_t*>(args.ids)[p])
                      : static_cast<const int32_t*>(args.ids)[p];
      if (args.topk_w != nullptr) w = args.topk_w[p];
      if (args.expert_map != nullptr) id = id >= 0 ? args.expert_map[id] : -1;
    }
    const bool routed = lane < count && id >= 0 && id < args.E;
    const uint32_t mask = __ballot_sync(0xffffffffu, routed);
    if (routed) {
      const int slot = __popc(mask & ((1u << lane) - 1u));
      s_row[slot] = id * args.rows_per_expert;
      s_arow[slot] = kGated ? p / args.top_k : p;
      s_w[slot] = w;
    }
    if (lane == 0) s_groups = __popc(mask);
  }
  __syncthreads();
  const int groups = s_groups;
  const int items = groups * steps;

  // MMA row r (0..15) -> row within the expert
  auto expert_row = [&](int r) {
    if constexpr (kGated) {
      return r < 8 ? col0 + r : args.up_offset + col0 + r - 8;
    } else {
      return col0 + r;
    }
  };
  // the activation factor of group grp
  auto factor = [&](int grp) {
    if constexpr (kSmemFactor) {
      return s_xs[grp];
    } else {
      return args.a_scale[args.a_per_row ? s_arow[grp] : 0] * s_w[grp];
    }
  };
  // unstaged: the activations of item it, the lanes of token column 0 their K group's 64 bytes
  auto load_x = [&](int it, StepRegs<1>& r) {
    const int grp = it / steps, s = it - grp * steps;
    const int kx = s * kStepK + t * 64;
    const uint4* px = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(args.a) +
                                                     size_t(s_arow[grp]) * args.lda + kx);
#pragma unroll
    for (int q = 0; q < 4; ++q)
      r.x[0][q] = (g == 0 && kx + 16 * q < args.K) ? __ldg(px + q) : make_uint4(0, 0, 0, 0);
  };

  // The decode and MMAs of item it, folded into float32 with the item's factor per MMA row
  // (activation factor x weight exponent: INT8's tile exponents r.ta / r.tb from the stage,
  // FP8's 2**r from s_rs).
  float acc_lo = 0.f, acc_hi = 0.f;  // MMA rows g and g + 8, token column 0 (lanes t == 0)
  auto consume = [&](int it, const StepRegs<1>& r) {
    const int grp = it / steps;
    const float xs = factor(grp);
    const int rs_grp = kGated ? 0 : grp;  // GEMM1 has one group
    const float f_lo = xs * (kInt8 ? __int_as_float(int(r.ta) << 23) : s_rs[rs_grp][g]);
    const float f_hi = xs * (kInt8 ? __int_as_float(int(r.tb) << 23) : s_rs[rs_grp][g + 8]);
    const Lut la_lo = make_lut<kInt8>(r.ca & 0xFF);
    const Lut la_hi = make_lut<kInt8>(r.ca >> 8);
    const Lut lb_lo = make_lut<kInt8>(r.cb & 0xFF);
    const Lut lb_hi = make_lut<kInt8>(r.cb >> 8);
    // this lane's K group of the item's staged step
    [[maybe_unused]] const uint8_t* xg =
        x_staged + it * x_step_bytes<kInt8>() + t * x_group_stride<kInt8>();
    // the item's sums: FP8 in float32 (the f16 MMAs' accumulators), INT8 exact in int32
    // (|step sum| < 256 * 96 * 127 < 2**24)
    float c[4] = {0.f, 0.f, 0.f, 0.f}, c2[4] = {0.f, 0.f, 0.f, 0.f};
    int32_t ci[4] = {0, 0, 0, 0};
    // INT8: the group's 64 bytes as 4 16-byte loads (B of MMA i8: bytes 4*i8.. and 32+4*i8..)
    [[maybe_unused]] uint4 xv[kInt8 ? 4 : 1];
    if constexpr (kInt8 && kStageX) {
#pragma unroll
      for (int q = 0; q < 4; ++q) xv[q] = reinterpret_cast<const uint4*>(xg)[q];
    }
#pragma unroll
    for (int i8 = 0; i8 < 8; ++i8) {
      const uint32_t pa = word(r.wa0, r.wa1, i8), pb = word(r.wb0, r.wb1, i8);
      uint32_t a0, a1, a2, a3;
      decode8<kInt8>(pa, la_lo, la_hi, a0, a2);
      decode8<kInt8>(pb, lb_lo, lb_hi, a1, a3);
      if constexpr (!kStageX) {
        const uint32_t b0 = word(r.x[0][0], r.x[0][1], i8), b1 = word(r.x[0][2], r.x[0][3], i8);
        mma_16x8x32<kInt8>(c, c2, ci, a0, a1, a2, a3, b0, b1);
      } else if constexpr (kInt8) {
        const uint32_t b0 = word(xv[0], xv[1], i8), b1 = word(xv[2], xv[3], i8);
        mma_16x8x32<true>(c, c2, ci, a0, a1, a2, a3, b0, b1);
      } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
        const uint2 b0 = *reinterpret_cast<const uint2*>(xg + 8 * i8);
        const uint2 b1 = *reinterpret_cast<const uint2*>(xg + 64 + 8 * i8);
        mma_e4m3_f16b(c, c2, a0, a1, a2, a3, b0.x, b0.y, b1.x, b1.y);
#else
        __trap();  // the host never launches FP8 below sm_89
#endif
      }
    }
    if constexpr (kInt8) {
      acc_lo = fmaf(float(ci[0]), f_lo, acc_lo);
      acc_hi = fmaf(float(ci[2]), f_hi, acc_hi);
    } else {
      acc_lo = fmaf(c[0] + c2[0], f_lo, acc_lo);
      acc_hi = fmaf(c[2] + c2[2], f_hi, acc_hi);
    }
  };

  uint8_t* ring = ring_all + warp * (kStages * kStageBytes);
  const int copy_row = lane >> 3, copy_chunk = (lane & 7) * 16;
  auto issue = [&](int it, int stage) {
    const int grp = it / steps, s = it - grp * steps;
    const int base = s_row[grp];
    uint8_t* st = ring + stage * kStageBytes;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = 4 * i + copy_row;
      cp_async16_evict_first(st + r * kRowStride + copy_chunk,
                             args.packed + size_t(base + expert_row(r)) * kp2 +
                                 s * (kStepK / 2) + copy_chunk);
    }
    uint8_t* sc = st + kStageWeights;
    if (lane < 16)
      cp_async8(sc + lane * 8,
                args.codes + size_t(base + expert_row(lane)) * kp32 + s * (kStepK / 32));
    if constexpr (kInt8) {
      const uint8_t* tiles =
          static_cast<const uint8_t*>(args.row_scale) + size_t(s) * args.rows + base;
      if constexpr (kGated) {  // two runs of 8 rows (gate, up)
        if (lane == 16 || lane == 17)
          cp_async8(sc + kStageCodes + 8 * (lane - 16), tiles + expert_row(8 * (lane - 16)));
      } else {
        if (lane == 16) cp_async16_evict_first(sc + kStageCodes, tiles + col0);
      }
    }
  };

  // INT8 GEMM2's out-of-range blocks (kCorrSmemBytes above). Warp 0's lane r + 16 * half sums
  // row r's blocks of groups 2j + half in the epilogue. The CSR entries are weights, like the
  // copies below: copied now, in the ring's first group; the first blocks once those landed.
  constexpr bool kStaged = kStagedCorr<kInt8, kGated>;
  const bool has_corr = args.corr_row_ptr != nullptr;
  const int corr_half = lane >> 4;
  float* c_val = nullptr;  // [kCorrSlots][32]
  int* c_blk = nullptr;    // [kCorrSlots]
  int* c_rp = nullptr;     // [groups][kCorrRpPitch]
  if (kStaged && has_corr) {
    uint32_t dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    c_val = reinterpret_cast<float*>(ring_all + dyn - kCorrSmemBytes);
    c_blk = reinterpret_cast<int*>(c_val + kCorrSlots * 32);
    c_rp = c_blk + kCorrSlots;
    if (warp == 0 && lane <= 16) {
      for (int grp = 0; grp < groups; ++grp)
        cp_async4(&c_rp[grp * kCorrRpPitch + lane], args.corr_row_ptr + s_row[grp] + col0 + lane);
    }
  }
  // [first, end) of MMA row r's blocks in group grp
  auto corr_bounds = [&](int grp, int r) {
    const int* e = c_rp + grp * kCorrRpPitch + r;
    return make_int2(e[0], e[1]);
  };
  // this lane's first block (-1: none) and its staging slot (kCorrSlots: not staged)
  auto first_block = [&](int& slot) {
    int b = -1;
    for (int grp = corr_half; grp < groups; grp += 2) {
      const int2 bounds = corr_bounds(grp, lane & 15);
      if (bounds.x < bounds.y) {
        b = bounds.x;
        break;
      }
    }
    const uint32_t mask = __ballot_sync(0xffffffffu, b >= 0);
    slot = min(__popc(mask & ((1u << lane) - 1u)), kCorrSlots);
    return b;
  };
  auto stage_first_blocks = [&]() {
    int slot;
    const int b = first_block(slot);
    if (b >= 0 && slot < kCorrSlots) {
      cp_async4(&c_blk[slot], args.corr_blocks + b);
#pragma unroll
      for (int q = 0; q < 8; ++q)
        cp_async16(&c_val[slot * 32 + 4 * q], args.corr_values + size_t(b) * 32 + 4 * q);
    }
  };

  // The weights do not depend on the previous kernel: start their copies before waiting.
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    const int it = warp + i * kWarps;
    if (it < items) issue(it, i);
    cp_async_commit();
  }
  // FP8's factors wait in shared memory, not on global loads in each item (that wait was the
  // kernels' largest single stall under ncu, ~11 % of the samples). The row scales are
  // weights: loaded now, stored after the staging loads (a store here would hold the warp
  // until they arrive); the activation scales may come from the previous kernel.
  constexpr int kRsPerThread = kInt8 ? 0 : (kMoeMaxGroups * 16 + kWarps * 32 - 1) / (kWarps * 32);
  float rs_v[kRsPerThread > 0 ? kRsPerThread : 1];
#pragma unroll
  for (int j = 0; j < kRsPerThread; ++j) {
    const int i = threadIdx.x + j * kWarps * 32;
    if (i < groups * 16)
      rs_v[j] = static_cast<const float*>(args.row_scale)[s_row[i / 16] + expert_row(i % 16)];
  }
  if constexpr (kGated) pdl_release();  // GEMM2 may start copying its weights
  pdl_wait();

  if (a_float) {
    // GEMM2 on float32 h: the scales that quantizing h on its own launch would give (the same
    // amax: max is exact in any order), from GEMM1's per-CTA amaxes
    const int cols = args.amax_cols;
    if (args.a_per_row) {  // a warp per group
      for (int grp = warp; grp < groups; grp += kWarps) {
        const float m = warp_nan_max(
            strided_nan_max(args.amax_in + size_t(s_arow[grp]) * cols, cols, lane, 32));
        if (lane == 0) s_as[grp] = dynamic_scale<kInt8>(m);
      }
    } else {  // every pair's row, unrouted ones (zeros) included
      const float m = warp_nan_max(strided_nan_max(
          args.amax_in, int(gridDim.y) * args.top_k * cols, threadIdx.x, kWarps * 32));
      if (lane == 0) s_red[warp] = m;
      __syncthreads();
      if (threadIdx.x < groups) {
        float a = s_red[0];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) a = nan_max(a, s_red[w]);
        s_as[threadIdx.x] = dynamic_scale<kInt8>(a);
      }
    }
    __syncthreads();
  }
  float a_scale_v = 0.f;
  if (kSmemFactor && threadIdx.x < groups)
    a_scale_v = a_float ? s_as[threadIdx.x]
                        : args.a_scale[args.a_per_row ? s_arow[threadIdx.x] : 0];

  // Stage the groups' activation rows: float32 h a float4 (quantized here), bytes 16 at a time
  // per thread and unit.
  if constexpr (kStageX) {
    constexpr int kThreads = kWarps * 32;
    // where the value at K index k of group grp is staged
    auto staged_dst = [&](int grp, int k) {
      return x_staged + (grp * steps + k / kStepK) * x_step_bytes<kInt8>() +
             (k % kStepK) / 64 * x_group_stride<kInt8>() + (k % 64) * (kInt8 ? 1 : 2);
    };
    if (a_float) {
      const float* af = static_cast<const float*>(args.a);
      staging_passes<kThreads, 4, kGated, float4>(
          groups, steps, args.K,
          [&](int grp, int k, bool in) {
            const float* src = af + (in ? size_t(s_arow[grp]) * args.lda + k : 0);
            return in ? __ldg(reinterpret_cast<const float4*>(src))
                      : make_float4(0.f, 0.f, 0.f, 0.f);
          },
          [&](int grp, int k, const float4& v) {
            const float sc = s_as[grp];
            const uint32_t b = quantize_value<kInt8>(v.x, sc) |
                               (uint32_t(quantize_value<kInt8>(v.y, sc)) << 8) |
                               (uint32_t(quantize_value<kInt8>(v.z, sc)) << 16) |
                               (uint32_t(quantize_value<kInt8>(v.w, sc)) << 24);
            uint8_t* dst = staged_dst(grp, k);
            if constexpr (kInt8) {
              *reinterpret_cast<uint32_t*>(dst) = b;
            } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
              uint2 h2;
              e4m3x4_to_f16(b, h2.x, h2.y);
              *reinterpret_cast<uint2*>(dst) = h2;
#else
              __trap();  // the host never launches FP8 below sm_89
#endif
            }
          });
    } else {
      const uint8_t* ab = static_cast<const uint8_t*>(args.a);
      staging_passes<kThreads, 16, kGated, uint4>(
          groups, steps, args.K,
          [&](int grp, int k, bool in) {
            const uint8_t* src = ab + (in ? size_t(s_arow[grp]) * args.lda + k : 0);
            return in ? __ldg(reinterpret_cast<const uint4*>(src)) : make_uint4(0, 0, 0, 0);
          },
          [&](int grp, int k, const uint4& v) {
            uint8_t* dst = staged_dst(grp, k);
            if constexpr (kInt8) {
              *reinterpret_cast<uint4*>(dst) = v;
            } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
              uint4 lo, hi;
              e4m3x4_to_f16(v.x, lo.x, lo.y);
              e4m3x4_to_f16(v.y, lo.z, lo.w);
              e4m3x4_to_f16(v.z, hi.x, hi.y);
              e4m3x4_to_f16(v.w, hi.z, hi.w);
              *reinterpret_cast<uint4*>(dst) = lo;
              *reinterpret_cast<uint4*>(dst + 16) = hi;
#else
              __trap();  // the host never launches FP8 below sm_89
#endif
            }
          });
    }
  }
  // the factors' stores after the staging loads, so that no load waits behind them
#pragma unroll
  for (int j = 0; j < kRsPerThread; ++j) {
    const int i = threadIdx.x + j * kWarps * 32;
    if (i < groups * 16) s_rs[i / 16][i % 16] = rs_v[j];
  }
  if (kSmemFactor && threadIdx.x < groups) s_xs[threadIdx.x] = a_scale_v * s_w[threadIdx.x];
  if constexpr (kSmemFactor || kStageX) __syncthreads();

  int stage = 0;
  for (int it = warp; it < items; it += kWarps) {
    StepRegs<1> r;
    if constexpr (!kStageX) load_x(it, r);
    __syncwarp();  // every lane is done reading the stage that the next copy overwrites
    const int it_next = it + (kStages - 1) * kWarps;
    if (it_next < items) issue(it_next, stage == 0 ? kStages - 1 : stage - 1);
    cp_async_commit();
    cp_async_wait<kStages - 1>();
    __syncwarp();

    const uint8_t* st = ring + stage * kStageBytes;
    stage = stage + 1 == kStages ? 0 : stage + 1;
    r.wa0 = *reinterpret_cast<const uint4*>(st + g * kRowStride + 32 * t);
    r.wa1 = *reinterpret_cast<const uint4*>(st + g * kRowStride + 32 * t + 16);
    r.wb0 = *reinterpret_cast<const uint4*>(st + (g + 8) * kRowStride + 32 * t);
    r.wb1 = *reinterpret_cast<const uint4*>(st + (g + 8) * kRowStride + 32 * t + 16);
    r.ca = *reinterpret_cast<const uint16_t*>(st + kStageWeights + g * 8 + t * 2);
    r.cb = *reinterpret_cast<const uint16_t*>(st + kStageWeights + (g + 8) * 8 + t * 2);
    if constexpr (kInt8) {
      r.ta = st[kStageWeights + kStageCodes + g];
      r.tb = st[kStageWeights + kStageCodes + g + 8];
    }
    consume(it, r);
    // (warp 0: the CSR entries came with the ring's first group, and __syncwarp above made
    // every lane's visible; these copies join the next group, or the one committed below)
    if (kStaged && has_corr && it == 0) stage_first_blocks();
  }
  // No copy may still target shared memory when the CTA exits. The commit takes in the staged
  // blocks' copies when they came after the loop's last commit (warp 0's first item was its
  // last): wait_group 0 alone does not wait for uncommitted copies (an illegal-instruction
  // fault on an H100).
  if constexpr (kStaged) cp_async_commit();
  cp_async_wait<0>();

  if (t == 0) {
    partial[warp][g] = acc_lo;
    partial[warp][g + 8] = acc_hi;
  }
  __syncthreads();
  if (warp != 0) return;
  const int r = lane & 15;  // MMA row; lanes 16-31 take the same rows' odd groups below
  float v = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) v += partial[w][r];
  // the activations of group grp's MX block at K index k0: an accessor of its 32 values
  auto block_act = [&](int grp, int k0) {
    if constexpr (kStageX) {
      return staged_block<kInt8>(x_staged, grp * steps, k0);
    } else {
      const uint8_t* xa =
          static_cast<const uint8_t*>(args.a) + size_t(s_arow[grp]) * args.lda + k0;
      return [xa](int e) { return act_value<kInt8>(xa[e]); };
    }
  };
  if (kStaged && has_corr) {
    // Out-of-range blocks of row r, groups 2j + half; the first one from its staging slot
    int slot;
    const int b_staged = first_block(slot);
    float corr = 0.f;
    for (int grp = corr_half; grp < groups; grp += 2) {
      const int2 bounds = corr_bounds(grp, r);
      if (bounds.x == bounds.y) continue;
      float dot = 0.f;
      for (int b = bounds.x; b < bounds.y; ++b) {
        const bool staged = b == b_staged && slot < kCorrSlots;
        const int k0 = 32 * (staged ? c_blk[slot] : args.corr_blocks[b]);
        const float* val = staged ? c_val + slot * 32 : args.corr_values + size_t(b) * 32;
        const auto act = block_act(grp, k0);
#pragma unroll  // all loads of a block in flight at once
        for (int q = 0; q < 8; ++q) {
          const float4 w4 = reinterpret_cast<const float4*>(val)[q];
          dot = fmaf(w4.x, act(4 * q), dot);
          dot = fmaf(w4.y, act(4 * q + 1), dot);
          dot = fmaf(w4.z, act(4 * q + 2), dot);
          dot = fmaf(w4.w, act(4 * q + 3), dot);
        }
      }
      corr = fmaf(dot, factor(grp), corr);
    }
    v += corr + __shfl_xor_sync(0xffffffffu, corr, 16);
  }
  if (!kStaged && has_corr) {
    // Out-of-range blocks of row r: group 2j + half, the CSR bounds of all groups loaded first
    // (independent loads, one latency instead of one per group).
    constexpr int kPerHalf = kGated ? 1 : kMoeMaxGroups / 2;
    const int half = lane >> 4;
    int b_first[kPerHalf], b_end[kPerHalf];
#pragma unroll
    for (int j = 0; j < kPerHalf; ++j) {
      const int grp = 2 * j + half;
      b_first[j] = b_end[j] = 0;
      if (grp < groups) {
        const int row = s_row[grp] + expert_row(r);
        b_first[j] = args.corr_row_ptr[row];
        b_end[j] = args.corr_row_ptr[row + 1];
      }
    }
    float corr = 0.f;
#pragma unroll
    for (int j = 0; j < kPerHalf; ++j) {
      if (b_first[j] == b_end[j]) continue;
      const int grp = 2 * j + half;
      const Corrections table = {args.corr_row_ptr, args.corr_blocks, args.corr_values};
      const float dot = correction_dot(table, b_first[j], b_end[j],
                                       [&](int k0) { return block_act(grp, k0); });
      corr = fmaf(dot, factor(grp), corr);
    }
    v += corr + __shfl_xor_sync(0xffffffffu, corr, 16);
  }
  if constexpr (kGated) {
    const float up = __shfl_down_sync(0xffffffffu, v, 8);
    const int col = col0 + lane;
    const bool live = lane < 8 && col < args.n_out;
    const float h = v / (1.f + expf(-v)) * up;  // silu(gate) * up; 0 for an unrouted pair
    if (live) {
      const size_t o = size_t(blockIdx.y) * args.ldo + col;
      if (args.h_scale != nullptr) {
        static_cast<uint8_t*>(args.out)[o] = quantize_value<kInt8>(h, args.h_scale[0]);
      } else {
        static_cast<float*>(args.out)[o] = h;
      }
    }
    if (args.amax_out != nullptr) {  // for GEMM2, which quantizes float32 h
      float m = live ? fabsf(h) : 0.f;
#pragma unroll
      for (int o = 4; o > 0; o >>= 1) m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, o));
      if (lane == 0) args.amax_out[size_t(blockIdx.y) * gridDim.x + blockIdx.x] = m;
    }
  } else {
    const int n = col0 + lane;
    if (lane < 16 && n < args.n_out)
      store_out(args.out, args.out_dtype, size_t(blockIdx.y) * args.ldo + n, v);
  }
}

// ----------------------------------------------------------------------------------------------
// host side
// ----------------------------------------------------------------------------------------------
template <bool kInt8, int kNT, int kWarps, int kStages, typename OutT>
cudaError_t launch_gemm(const uint8_t* xq, const float* xs, const uint8_t* packed,
                        const uint8_t* codes, const void* row_scale, const Corrections& corr,
                        const void* bias, void* y,
                        int M, int N, int K, int KP, int NP, int ldy, int per_token, bool pdl,
                        cudaStream_t stream) {
  auto kernel = decode_gemm_kernel<kInt8, kNT, kWarps, kStages, OutT>;
  constexpr int kSmem = kWarps * kStages * kStageBytes;
  static const cudaError_t attr_status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (attr_status != cudaSuccess) return attr_status;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(NP / 16, (M + 8 * kNT - 1) / (8 * kNT), 1);
  cfg.blockDim = dim3(kWarps * 32, 1, 1);
  cfg.dynamicSmemBytes = kSmem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, xq, xs, packed, codes, row_scale, corr,
                            static_cast<const OutT*>(bias), static_cast<OutT*>(y), M, N, K, KP, NP,
                            ldy, per_token);
}

template <bool kInt8, int kNT, typename OutT>
cudaError_t pick_warps(int warps, int stages, const uint8_t* xq, const float* xs,
                       const uint8_t* packed, const uint8_t* codes, const void* row_scale,
                       const Corrections& corr, const void* bias, void* y, int M, int N, int K,
                       int KP, int NP, int ldy, int per_token, bool pdl, cudaStream_t stream) {
#define W4A8_LAUNCH(W, D)                                                                       \
  if (warps == W && stages == D)                                                                 \
    return launch_gemm<kInt8, kNT, W, D, OutT>(xq, xs, packed, codes, row_scale, corr, bias, y, \
                                               M, N, K, KP, NP, ldy, per_token, pdl, stream);
  W4A8_LAUNCH(4, 2)
  W4A8_LAUNCH(4, 3)
  W4A8_LAUNCH(8, 2)
  W4A8_LAUNCH(8, 4)
#undef W4A8_LAUNCH
  return cudaErrorInvalidConfiguration;
}

template <bool kInt8, typename OutT>
cudaError_t pick_tiles(int warps, int stages, const uint8_t* xq, const float* xs,
                       const uint8_t* packed, const uint8_t* codes, const void* row_scale,
                       const Corrections& corr, const void* bias, void* y, int M, int N, int K,
                       int KP, int NP, int ldy, int per_token, bool pdl, cudaStream_t stream) {
  if (M <= 8)
    return pick_warps<kInt8, 1, OutT>(warps, stages, xq, xs, packed, codes, row_scale, corr,
                                      bias, y, M, N, K, KP, NP, ldy, per_token, pdl, stream);
  return pick_warps<kInt8, 2, OutT>(warps, stages, xq, xs, packed, codes, row_scale, corr,
                                    bias, y, M, N, K, KP, NP, ldy, per_token, pdl, stream);
}

template <bool kInt8, bool kGated, bool kStageX, int kWarps, int kStages>
cudaError_t launch_moe(const MoeArgs& args, dim3 grid, int staged_steps, bool pdl,
                       cudaStream_t stream) {
  auto kernel = moe_decode_kernel<kInt8, kGated, kStageX, kWarps, kStages>;
  constexpr int kSmemMax =
      moe_smem_bytes<kInt8, kGated, kWarps, kStages>(kMoeMaxStagedK / kStepK, true);
  static const cudaError_t attr_status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemMax);
  if (attr_status != cudaSuccess) return attr_status;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(kWarps * 32, 1, 1);
  cfg.dynamicSmemBytes =
      moe_smem_bytes<kInt8, kGated, kWarps, kStages>(staged_steps, args.corr_row_ptr != nullptr);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, args);
}

template <bool kInt8, bool kGated, bool kStageX>
cudaError_t pick_moe_config(int warps, int stages, const MoeArgs& args, dim3 grid,
                            int staged_steps, bool pdl, cudaStream_t stream) {
#define W4A8_MOE_LAUNCH(W, D)                                                           \
  if (warps == W && stages == D)                                                        \
    return launch_moe<kInt8, kGated, kStageX, W, D>(args, grid, staged_steps, pdl, stream);
  W4A8_MOE_LAUNCH(4, 2)
  W4A8_MOE_LAUNCH(8, 2)
  W4A8_MOE_LAUNCH(12, 2)
  W4A8_MOE_LAUNCH(16, 2)
#undef W4A8_MOE_LAUNCH
  return cudaErrorInvalidConfiguration;
}

// How many CTAs of a launch config with `staged_steps` staged K steps fit on one SM
// (registers, shared memory, warps)
template <bool kInt8, bool kGated, bool kStageX, int kWarps, int kStages>
cudaError_t moe_occupancy(int staged_steps, bool corr, int* blocks) {
  auto kernel = moe_decode_kernel<kInt8, kGated, kStageX, kWarps, kStages>;
  // the same attribute as launch_moe sets (the query may come first)
  constexpr int kSmemMax =
      moe_smem_bytes<kInt8, kGated, kWarps, kStages>(kMoeMaxStagedK / kStepK, true);
  const cudaError_t st =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemMax);
  if (st != cudaSuccess) return st;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      blocks, kernel, kWarps * 32,
      moe_smem_bytes<kInt8, kGated, kWarps, kStages>(staged_steps, corr));
}

template <bool kInt8, bool kGated, bool kStageX>
cudaError_t pick_moe_occupancy(int warps, int stages, int staged_steps, bool corr,
                               int* blocks) {
#define W4A8_MOE_OCC(W, D)                                                                \
  if (warps == W && stages == D)                                                          \
    return moe_occupancy<kInt8, kGated, kStageX, W, D>(staged_steps, corr, blocks);
  W4A8_MOE_OCC(4, 2)
  W4A8_MOE_OCC(8, 2)
  W4A8_MOE_OCC(12, 2)
  W4A8_MOE_OCC(16, 2)
#undef W4A8_MOE_OCC
  return cudaErrorInvalidConfiguration;
}

// The MoE's float32 h [rows, K] (GEMM1's output with a dynamic intermediate scale) quantized
// with the scales GEMM1's per-CTA amaxes give (amax [rows, cols]; max is exact in any order, so
// the bytes are quant_act's): no pass over h for its amax and no grid sync. One CTA per row (per
// token) or per kUnroll x 256 vectors of 4 values (per tensor; each CTA reduces every row's
// amaxes). Launched with PDL after GEMM1 (which releases it at its start): it releases GEMM2 at
// once, issues its loads of h after griddepcontrol.wait, and reduces the amaxes while they fly.
template <bool kInt8>
__global__ void __launch_bounds__(256)
    quant_from_amax_kernel(const float* __restrict__ h, uint8_t* __restrict__ q,
                           const float* __restrict__ amax, float* __restrict__ s_out, int rows,
                           int K, int cols, int per_row) {
  pdl_release();  // GEMM2 may start copying weights now
  pdl_wait();     // GEMM1's h and amaxes are complete
  using V = Vec16<float>;
  constexpr int kUnroll = 4;
  const int nvec = K / V::kN;
  const int chunk = kUnroll * int(blockDim.x);
  const int v0 = per_row ? blockIdx.x * nvec : blockIdx.x * chunk;
  const int v1 = per_row ? v0 + nvec : min(v0 + chunk, rows * nvec);
  const int first = v0 + threadIdx.x;
  const V* hv = reinterpret_cast<const V*>(h);
  V kept[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u)
    if (first + u * int(blockDim.x) < v1) kept[u] = hv[first + u * blockDim.x];
  const float* a = per_row ? amax + size_t(blockIdx.x) * cols : amax;
  float m = strided_nan_max(a, per_row ? cols : rows * cols, threadIdx.x, blockDim.x);
  __shared__ float red[8];
  m = warp_nan_max(m);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
  __syncthreads();
  m = red[0];
  for (int w = 1; w < int(blockDim.x >> 5); ++w) m = nan_max(m, red[w]);
  const float scale = dynamic_scale<kInt8>(m);
  if (threadIdx.x == 0 && (per_row || blockIdx.x == 0)) s_out[per_row ? blockIdx.x : 0] = scale;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u)
    if (first + u * int(blockDim.x) < v1)
      store_quantized<kInt8>(q, first + u * blockDim.x, kept[u], scale);
  for (int i = first + chunk; i < v1; i += blockDim.x)  // rows longer than one round
    store_quantized<kInt8>(q, i, hv[i], scale);
}

}  // namespace

extern "C" {

const char* w4a8_error_string(int code) { return cudaGetErrorString(cudaError_t(code)); }

// Returns a cudaError_t code (0 = launched). out_dtype: 0 bf16, 1 fp16, 2 fp32.
// (warps, stages) is one of the instantiated launch configs (CUDA_DECODE_CONFIG in
// sm90_triton.py). corr_row_ptr [NP + 1] / corr_blocks / corr_values: the weight's out-of-range
// blocks (struct Corrections), added in the epilogue; corr_row_ptr null when it has none.
int w4a8_decode_gemm(const void* xq, const void* xs, const void* packed, const void* codes,
                     const void* row_scale, const void* corr_row_ptr, const void* corr_blocks,
                     const void* corr_values, const void* bias, void* y, int M, int N, int K,
                     int KP, int NP, int ldy, int act_int8, int per_token, int out_dtype,
                     int warps, int stages, int pdl, void* stream) {
  if (M <= 0 || M > 16 || NP % 16 || KP % (2 * kStepK) || K % 32 || K > KP || N > NP)
    return int(cudaErrorInvalidValue);
  const Corrections corr = {static_cast<const int32_t*>(corr_row_ptr),
                            static_cast<const int32_t*>(corr_blocks),
                            static_cast<const float*>(corr_values)};
  auto xq8 = static_cast<const uint8_t*>(xq);
  auto xsf = static_cast<const float*>(xs);
  auto w = static_cast<const uint8_t*>(packed);
  auto c = static_cast<const uint8_t*>(codes);
  auto st = static_cast<cudaStream_t>(stream);
  const bool use_pdl = pdl != 0;
#define W4A8_DTYPE(INT8)                                                                     \
  switch (out_dtype) {                                                                       \
    case 0:                                                                                  \
      return int(pick_tiles<INT8, __nv_bfloat16>(warps, stages, xq8, xsf, w, c, row_scale,   \
                                                 corr, bias, y, M, N, K, KP, NP, ldy,        \
                                                 per_token, use_pdl, st));                   \
    case 1:                                                                                  \
      return int(pick_tiles<INT8, __half>(warps, stages, xq8, xsf, w, c, row_scale, corr,    \
                                          bias, y, M, N, K, KP, NP, ldy, per_token, use_pdl, \
                                          st));                                              \
    case 2:                                                                                  \
      return int(pick_tiles<INT8, float>(warps, stages, xq8, xsf, w, c, row_scale, corr,     \
                                         bias, y, M, N, K, KP, NP, ldy, per_token, use_pdl,  \
                                         st));                                               \
    default:                                                                                 \
      return int(cudaErrorInvalidValue);                                                     \
  }
  if (act_int8) {
    W4A8_DTYPE(true)
  } else {
    W4A8_DTYPE(false)
  }
#undef W4A8_DTYPE
}

// in_dtype: 0 bf16, 1 fp16, 2 fp32. mode: w4a8::ActivationScheme. x rows and q must be 16-byte
// aligned and K a multiple of 8 (the caller checks). s_in: the static scale (ignored otherwise).
// Dynamic per tensor: one CTA computes the amax of all M rows itself (for small M * K).
int w4a8_quant_act(const void* x, int ldx, void* q, const void* s_in, void* s_out, int M, int K,
                   int act_int8, int mode, int in_dtype, void* stream) {
  if (M <= 0 || K <= 0 || K % 8) return int(cudaErrorInvalidValue);
  auto st = static_cast<cudaStream_t>(stream);
  auto qq = static_cast<uint8_t*>(q);
  auto si = static_cast<const float*>(s_in);
  auto so = static_cast<float*>(s_out);
  const bool whole = mode == int(w4a8::ActivationScheme::DYNAMIC_PER_TENSOR);
#define W4A8_QUANT(INT8, T)                                                                   \
  quant_act_kernel<INT8, T><<<whole ? 1 : M, 256, 0, st>>>(static_cast<const T*>(x), ldx, qq, \
                                                           si, so, M, K, mode);               \
  return int(cudaGetLastError());
  if (act_int8) {
    if (in_dtype == 0) { W4A8_QUANT(true, __nv_bfloat16) }
    if (in_dtype == 1) { W4A8_QUANT(true, __half) }
    if (in_dtype == 2) { W4A8_QUANT(true, float) }
  } else {
    if (in_dtype == 0) { W4A8_QUANT(false, __nv_bfloat16) }
    if (in_dtype == 1) { W4A8_QUANT(false, __half) }
    if (in_dtype == 2) { W4A8_QUANT(false, float) }
  }
#undef W4A8_QUANT
  return int(cudaErrorInvalidValue);
}

// Dynamic per-tensor quantization of x [M, K] by quant_act_grid_kernel on `grid` CTAs (a
// cooperative launch; at most one CTA per SM, which the caller picks); partials: `grid` floats
// of scratch; release_late: release a following PDL launch once the amax is known, not at the
// start. Same alignment rules as w4a8_quant_act.
int w4a8_quant_act_grid(const void* x, int ldx, void* q, void* partials, void* s_out, int M,
                        int K, int act_int8, int in_dtype, int grid, int release_late,
                        void* stream) {
  if (M <= 0 || K <= 0 || K % 8 || grid <= 0) return int(cudaErrorInvalidValue);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid, 1, 1);
  cfg.blockDim = dim3(256, 1, 1);
  cfg.stream = static_cast<cudaStream_t>(stream);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  auto qq = static_cast<uint8_t*>(q);
  auto pp = static_cast<float*>(partials);
  auto so = static_cast<float*>(s_out);
#define W4A8_QUANT_GRID(INT8, T)                                                             \
  return int(cudaLaunchKernelEx(&cfg, quant_act_grid_kernel<INT8, T>, static_cast<const T*>(x), \
                                ldx, qq, pp, so, M, K, release_late));
  if (act_int8) {
    if (in_dtype == 0) { W4A8_QUANT_GRID(true, __nv_bfloat16) }
    if (in_dtype == 1) { W4A8_QUANT_GRID(true, __half) }
    if (in_dtype == 2) { W4A8_QUANT_GRID(true, float) }
  } else {
    if (in_dtype == 0) { W4A8_QUANT_GRID(false, __nv_bfloat16) }
    if (in_dtype == 1) { W4A8_QUANT_GRID(false, __half) }
    if (in_dtype == 2) { W4A8_QUANT_GRID(false, float) }
  }
#undef W4A8_QUANT_GRID
  return int(cudaErrorInvalidValue);
}

// quant_from_amax_kernel: h [rows, K] float32 and q [rows, K] contiguous, K % 8 == 0; amax
// [rows, cols] (GEMM1's per-CTA amaxes); per_row: a scale per row into s_out[rows], else one
// into s_out[0]; pdl: launched with programmatic stream serialization (after GEMM1 on SM90).
int w4a8_quant_from_amax(const void* h, void* q, const void* amax, void* s_out, int rows, int K,
                         int cols, int act_int8, int per_row, int pdl, void* stream) {
  if (rows <= 0 || K <= 0 || K % 8 || cols <= 0) return int(cudaErrorInvalidValue);
  constexpr int kThreads = 256, kVectorsPerCta = 4 * kThreads;
  const long long nvec = (long long)rows * (K / 4);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(per_row ? rows : unsigned((nvec + kVectorsPerCta - 1) / kVectorsPerCta));
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.stream = static_cast<cudaStream_t>(stream);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  auto hh = static_cast<const float*>(h);
  auto qq = static_cast<uint8_t*>(q);
  auto aa = static_cast<const float*>(amax);
  auto so = static_cast<float*>(s_out);
  if (act_int8)
    return int(cudaLaunchKernelEx(&cfg, quant_from_amax_kernel<true>, hh, qq, aa, so, rows, K,
                                  cols, per_row));
  return int(cudaLaunchKernelEx(&cfg, quant_from_amax_kernel<false>, hh, qq, aa, so, rows, K,
                                cols, per_row));
}

// How many CTAs of a MoE decode GEMM launch config fit on one SM at once, into *blocks (the
// host's GEMM2 warp rule). staged_steps: the 256-wide K steps of activations it stages (GEMM1:
// its row's; GEMM2: top_k x its rows', or 0 when it does not stage); corr: its weight has
// out-of-range blocks (their staging area). Returns a cudaError_t code.
int w4a8_moe_blocks_per_sm(int act_int8, int gated, int warps, int stages, int staged_steps,
                           int corr, int* blocks) {
  if (staged_steps < (gated ? 1 : 0) || staged_steps * kStepK > kMoeMaxStagedK)
    return int(cudaErrorInvalidValue);
  const int ss = staged_steps;
  const bool c = corr != 0;
#define W4A8_MOE_OCC_PICK(INT8)                                                        \
  if (gated) return int(pick_moe_occupancy<INT8, true, true>(warps, stages, ss, c, blocks)); \
  if (ss > 0) return int(pick_moe_occupancy<INT8, false, true>(warps, stages, ss, c, blocks)); \
  return int(pick_moe_occupancy<INT8, false, false>(warps, stages, ss, c, blocks));
  if (act_int8) {
    W4A8_MOE_OCC_PICK(true)
  }
  W4A8_MOE_OCC_PICK(false)
#undef W4A8_MOE_OCC_PICK
}

// One MoE decode GEMM (see moe_decode_kernel). gated = 1: GEMM1 over tokens * top_k pairs,
// writing h (quantized with h_scale, or float32 with each CTA's amax of |h| into amax:
// [tokens * top_k, ceil(n_out / 8)]); gated = 0: GEMM2 over tokens, writing the
// router-weighted sum of the top-k experts' outputs in out_dtype (0 bf16, 1 fp16, 2 fp32);
// stage_a: GEMM2 stages its token's top-k rows of h in shared memory (GEMM1 always stages);
// a_float (needs stage_a): its `a` is GEMM1's float32 h, quantized with the scales GEMM1's amax
// gives (per pair row with a_per_row, else per tensor; a_scale unused). lda in elements of a.
// Returns a cudaError_t code (0 = launched).
int w4a8_moe_decode_gemm(const void* a, const void* a_scale, const void* packed,
                         const void* codes, const void* row_scale, const void* corr_row_ptr,
                         const void* corr_blocks, const void* corr_values, const void* ids,
                         const void* expert_map, const void* topk_w, const void* h_scale,
                         void* out, void* amax, int ids64, int tokens, int top_k, int E, int K,
                         int KP, int rows, int rows_per_expert, int up_offset, int n_out,
                         int lda, int ldo, int a_per_row, int out_dtype, int act_int8,
                         int gated, int stage_a, int a_float, int warps, int stages, int pdl,
                         void* stream) {
  const int steps = (K + kStepK - 1) / kStepK;
  const bool stage = gated || stage_a;
  const int staged_steps = !stage ? 0 : gated ? steps : top_k * steps;
  if (tokens <= 0 || top_k <= 0 || (!gated && top_k > kMoeMaxGroups) || K % 32 || K > KP ||
      KP % (2 * kStepK) || rows % 16 || rows_per_expert % 16 || up_offset % 8 || lda % 16 ||
      staged_steps * kStepK > kMoeMaxStagedK ||
      (a_float && (gated || !stage || amax == nullptr)) ||
      out_dtype < 0 || out_dtype > 2)
    return int(cudaErrorInvalidValue);
  MoeArgs args;
  args.a = a;
  args.a_scale = static_cast<const float*>(a_scale);
  args.packed = static_cast<const uint8_t*>(packed);
  args.codes = static_cast<const uint8_t*>(codes);
  args.row_scale = row_scale;
  args.corr_row_ptr = static_cast<const int32_t*>(corr_row_ptr);
  args.corr_blocks = static_cast<const int32_t*>(corr_blocks);
  args.corr_values = static_cast<const float*>(corr_values);
  args.ids = ids;
  args.expert_map = static_cast<const int32_t*>(expert_map);
  args.topk_w = static_cast<const float*>(topk_w);
  args.h_scale = static_cast<const float*>(h_scale);
  args.out = out;
  args.ids64 = ids64;
  args.top_k = top_k;
  args.E = E;
  args.K = K;
  args.KP = KP;
  args.rows = rows;
  args.rows_per_expert = rows_per_expert;
  args.up_offset = up_offset;
  args.n_out = n_out;
  args.lda = lda;
  args.ldo = ldo;
  args.a_per_row = a_per_row;
  args.out_dtype = out_dtype;
  args.a_float = a_float;
  args.amax_out = gated && h_scale == nullptr ? static_cast<float*>(amax) : nullptr;
  args.amax_in = a_float ? static_cast<const float*>(amax) : nullptr;
  args.amax_cols = (K + 7) / 8;  // GEMM1's grid.x (its n_out is GEMM2's K)
  const dim3 grid = gated ? dim3((n_out + 7) / 8, tokens * top_k, 1)
                          : dim3((n_out + 15) / 16, tokens, 1);
  auto st = static_cast<cudaStream_t>(stream);
  const bool use_pdl = pdl != 0;
  const int ss = staged_steps;
#define W4A8_MOE_PICK(INT8)                                                                   \
  if (gated) return int(pick_moe_config<INT8, true, true>(warps, stages, args, grid, ss,      \
                                                          use_pdl, st));                      \
  if (stage) return int(pick_moe_config<INT8, false, true>(warps, stages, args, grid, ss,     \
                                                           use_pdl, st));                     \
  return int(pick_moe_config<INT8, false, false>(warps, stages, args, grid, ss, use_pdl, st));
  if (act_int8) {
    W4A8_MOE_PICK(true)
  }
  W4A8_MOE_PICK(false)
#undef W4A8_MOE_PICK
}

}  // extern "C"
