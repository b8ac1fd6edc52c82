// How fast can a kernel read an MXFP4 weight of N x K on this GPU, by access pattern?
//
// The decode GEMMs (csrc/w4a8_decode_gemm.cu) read 16 weight rows x 128 bytes per warp step
// (rows KP/2 bytes apart). This program times pure reads of the same byte count (packed nibbles
// + one code byte per 32 weights) with no arithmetic, so the decode kernel's time can be split
// into "what the access pattern costs" and "what the kernel adds":
//   stream      grid-stride 16-byte loads over one contiguous buffer, 4 in flight per thread
//   rows-cp     the decode kernel's pattern: CTA = 16 rows, 4 warps take 256-wide K steps in turn,
//               cp.async ring of 2 stages per warp (the same copies, no decode / MMA); also with
//               an L2 evict_first cache policy on the weight copies (what the decode kernels do
//               since 2026-11-24), and with a 256-byte L2 prefetch hint
//   rows-bulk   rows-cp with each row segment one bulk (TMA) copy on a per-stage mbarrier
//   rows-ldg    the same addresses, loaded into registers, D steps in flight per warp
//   tiles-ldg   each (16 rows, K step) tile stored contiguously (2 KB), D steps in flight
// Each time: L2 flushed (256 MB memset) before each call, timed as bench_linear.py's Timer does
// (graph of R x [flush, kernel] minus graph of R x [flush]).
//
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -o read_floor read_floor.cu
//   ./read_floor [N K]

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(x)                                                               \
  do {                                                                         \
    cudaError_t e_ = (x);                                                      \
    if (e_ != cudaSuccess) {                                                   \
      std::printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); \
      std::exit(1);                                                            \
    }                                                                          \
  } while (0)

constexpr int kStepBytes = 128;  // one 256-wide K step of one row (two nibbles per byte)

__device__ __forceinline__ uint32_t fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

__global__ void stream_kernel(const uint4* __restrict__ p, size_t n16, uint32_t* sink) {
  uint32_t acc = 0;
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n16; i += 4 * stride) {
    uint4 a = __ldcs(p + i), b = __ldcs(p + i + stride), c = __ldcs(p + i + 2 * stride),
          d = __ldcs(p + i + 3 * stride);
    acc ^= fold(a) ^ fold(b) ^ fold(c) ^ fold(d);
  }
  for (; i < n16; i += stride) acc ^= fold(__ldcs(p + i));
  if (acc == 0x12345678u) *sink = acc;
}

__device__ __forceinline__ void cp16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src));
}

// the weight copies' cache variants (rows-cp): none, an L2 evict_first policy, a 256-byte L2
// prefetch
enum class CpHint { kNone, kEvictFirst, kPrefetch256 };

template <CpHint kHint>
__device__ __forceinline__ void cp16_hint(void* dst, const void* src, uint64_t policy) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  if constexpr (kHint == CpHint::kEvictFirst) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(d),
                 "l"(src), "l"(policy));
  } else if constexpr (kHint == CpHint::kPrefetch256) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;\n" ::"r"(d), "l"(src));
  } else {
    cp16(dst, src);
  }
}

// rows-cp: 4 warps per CTA, each a 2-stage ring of (16 rows x 128 bytes) + 16 x 8 code bytes
template <CpHint kHint>
__global__ void __launch_bounds__(128) rows_cp_kernel(const uint8_t* __restrict__ w,
                                                      const uint8_t* __restrict__ codes, int KP,
                                                      uint32_t* sink) {
  constexpr int kRow = kStepBytes + 16, kStage = 16 * kRow + 128;
  __shared__ __align__(16) uint8_t ring[4][2][kStage];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = blockIdx.x * 16, steps = KP / 256;
  const size_t kp2 = KP / 2, kp32 = KP / 32;
  const int row = lane >> 3, chunk = (lane & 7) * 16;
  uint64_t policy = 0;
  if constexpr (kHint == CpHint::kEvictFirst)
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  auto issue = [&](int s, int st) {
    for (int i = 0; i < 4; ++i)
      cp16_hint<kHint>(&ring[warp][st][(4 * i + row) * kRow + chunk],
                       w + (n0 + 4 * i + row) * kp2 + s * kStepBytes + chunk, policy);
    if (lane < 16)
      asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(
                       static_cast<uint32_t>(__cvta_generic_to_shared(
                           &ring[warp][st][16 * kRow + lane * 8]))),
                   "l"(codes + (n0 + lane) * kp32 + s * 8));
  };
  uint32_t acc = 0;
  int st = 0;
  if (warp < steps) issue(warp, 0);
  asm volatile("cp.async.commit_group;\n" ::);
  for (int s = warp; s < steps; s += 4) {
    __syncwarp();
    if (s + 4 < steps) issue(s + 4, st ^ 1);
    asm volatile("cp.async.commit_group;\n" ::);
    asm volatile("cp.async.wait_group 1;\n" ::);
    __syncwarp();
    const uint8_t* b = ring[warp][st];
    acc ^= fold(*reinterpret_cast<const uint4*>(b + (lane >> 1) * kRow + (lane & 1) * 64));
    acc ^= *reinterpret_cast<const uint32_t*>(b + 16 * kRow + (lane & 15) * 8);
    st ^= 1;
  }
  asm volatile("cp.async.wait_group 0;\n" ::);
  if (acc == 0x12345678u) *sink = acc;
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// rows-bulk: rows-cp with each 128-byte row segment moved by one bulk copy (the TMA unit,
// cp.async.bulk, completing on a per-stage mbarrier: 16 copy instructions per step instead of
// 128) and kStages stages per warp; the code bytes (8 per row, below the bulk copies' 16-byte
// granule) still by cp.async.
template <int kStages>
__global__ void __launch_bounds__(128) rows_bulk_kernel(const uint8_t* __restrict__ w,
                                                        const uint8_t* __restrict__ codes,
                                                        int KP, uint32_t* sink) {
  constexpr int kRow = kStepBytes + 16, kStage = 16 * kRow + 128;
  __shared__ __align__(128) uint8_t ring[4][kStages][kStage];
  __shared__ __align__(8) uint64_t bar[4][kStages];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = blockIdx.x * 16, steps = KP / 256;
  const size_t kp2 = KP / 2, kp32 = KP / 32;
  if (lane < kStages)
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(&bar[warp][lane])));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  __syncwarp();
  auto issue = [&](int s, int st) {
    if (lane == 0)
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(
                       smem_u32(&bar[warp][st])),
                   "r"(16 * kStepBytes)
                   : "memory");
    __syncwarp();
    if (lane < 16)
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, "
          "[%3];" ::"r"(smem_u32(&ring[warp][st][lane * kRow])),
          "l"(w + (n0 + lane) * kp2 + s * kStepBytes), "r"(kStepBytes),
          "r"(smem_u32(&bar[warp][st]))
          : "memory");
    else
      asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(
                       smem_u32(&ring[warp][st][16 * kRow + (lane - 16) * 8])),
                   "l"(codes + (n0 + lane - 16) * kp32 + s * 8));
    asm volatile("cp.async.commit_group;\n" ::);
  };
  auto wait_stage = [&](int st, uint32_t parity) {
    uint32_t done = 0;
    while (!done)
      asm volatile(
          "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; "
          "selp.u32 %0, 1, 0, p; }"
          : "=r"(done)
          : "r"(smem_u32(&bar[warp][st])), "r"(parity)
          : "memory");
  };
  uint32_t acc = 0;
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i)
    if (warp + 4 * i < steps) issue(warp + 4 * i, i);
  int st = 0;  // = n % kStages; its mbarrier's phase is (n / kStages) & 1
  for (int s = warp, n = 0; s < steps; s += 4, ++n) {
    const int s_next = s + 4 * (kStages - 1);
    const int st_next = (n + kStages - 1) % kStages;
    __syncwarp();
    if (s_next < steps) issue(s_next, st_next);
    // the codes of step s: every cp.async group but those issued after it
    if (s_next < steps) {
      asm volatile("cp.async.wait_group %0;\n" ::"n"(kStages - 1));
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::);
    }
    wait_stage(st, (n / kStages) & 1);
    __syncwarp();
    const uint8_t* b = ring[warp][st];
    acc ^= fold(*reinterpret_cast<const uint4*>(b + (lane >> 1) * kRow + (lane & 1) * 64));
    acc ^= *reinterpret_cast<const uint32_t*>(b + 16 * kRow + (lane & 15) * 8);
    st = st + 1 == kStages ? 0 : st + 1;
  }
  asm volatile("cp.async.wait_group 0;\n" ::);
  if (acc == 0x12345678u) *sink = acc;
}

// rows-ldg / tiles-ldg: 4 warps per CTA, each warp keeps kDepth steps of loads in flight
template <bool kTiled, int kDepth>
__global__ void __launch_bounds__(128) rows_ldg_kernel(const uint8_t* __restrict__ w,
                                                       const uint8_t* __restrict__ codes,
                                                       int KP, uint32_t* sink) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tile_row = blockIdx.x, n0 = tile_row * 16, steps = KP / 256;
  const size_t kp2 = KP / 2, kp32 = KP / 32;
  // a warp step = 2048 weight bytes = 4 x 16 bytes per lane, + 8 code bytes for lanes < 16
  auto addr = [&](int s, int i) -> const uint4* {
    if (kTiled) {
      return reinterpret_cast<const uint4*>(w + (size_t(tile_row) * steps + s) * 2048 +
                                            (i * 32 + lane) * 16);
    }
    const int r = 4 * i + (lane >> 3), c = (lane & 7) * 16;
    return reinterpret_cast<const uint4*>(w + (n0 + r) * kp2 + s * kStepBytes + c);
  };
  uint32_t acc = 0;
  for (int s0 = warp; s0 < steps; s0 += 4 * kDepth) {
    uint4 v[kDepth][4];
    uint2 c[kDepth];
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      const int s = s0 + 4 * d;
      if (s < steps) {
#pragma unroll
        for (int i = 0; i < 4; ++i) v[d][i] = __ldcs(addr(s, i));
        c[d] = lane < 16 ? __ldcs(reinterpret_cast<const uint2*>(codes + (n0 + lane) * kp32 +
                                                                  s * 8))
                         : make_uint2(0, 0);
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) v[d][i] = make_uint4(0, 0, 0, 0);
        c[d] = make_uint2(0, 0);
      }
    }
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc ^= fold(v[d][i]);
      acc ^= c[d].x ^ c[d].y;
    }
  }
  if (acc == 0x12345678u) *sink = acc;
}

// bench_linear.Timer's method: a CUDA graph of R x [flush, kernel] minus one of R x [flush],
// each replayed 7 times (median), divided by R
template <typename F>
float time_us(F launch, void* flush, size_t flush_bytes) {
  constexpr int kReps = 20;
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  auto graph_ms = [&](bool with_kernel) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int r = 0; r < kReps; ++r) {
      CHECK(cudaMemsetAsync(flush, r & 0xFF, flush_bytes, s));
      if (with_kernel) launch(s);
    }
    CHECK(cudaStreamEndCapture(s, &g));
    CHECK(cudaGraphInstantiate(&ge, g, 0));
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    std::vector<float> t;
    for (int i = 0; i < 8; ++i) {
      CHECK(cudaEventRecord(a, s));
      CHECK(cudaGraphLaunch(ge, s));
      CHECK(cudaEventRecord(b, s));
      CHECK(cudaEventSynchronize(b));
      float ms;
      CHECK(cudaEventElapsedTime(&ms, a, b));
      if (i) t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    CHECK(cudaGraphExecDestroy(ge));
    CHECK(cudaGraphDestroy(g));
    return t[t.size() / 2];
  };
  const float with = graph_ms(true), without = graph_ms(false);
  CHECK(cudaGetLastError());
  CHECK(cudaStreamDestroy(s));
  return std::max(with - without, 0.f) * 1000.f / kReps;
}

int main(int argc, char** argv) {
  const int N = argc > 2 ? std::atoi(argv[1]) : 8192;
  const int K = argc > 2 ? std::atoi(argv[2]) : 8192;
  const int KP = (K + 511) / 512 * 512;
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const size_t wbytes = size_t(N) * KP / 2, cbytes = size_t(N) * KP / 32;
  uint8_t *w, *codes;
  void* flush;
  uint32_t* sink;
  const size_t flush_bytes = 256u << 20;
  CHECK(cudaMalloc(&w, wbytes + cbytes));
  codes = w + wbytes;
  CHECK(cudaMalloc(&flush, flush_bytes));
  CHECK(cudaMalloc(&sink, 4));
  CHECK(cudaMemset(w, 0x5A, wbytes + cbytes));
  const double mb = double(wbytes + cbytes) / 1e6;
  std::printf("# %s (%d SMs), N=%d K=%d: %.2f MB (packed + codes)\n", prop.name,
              prop.multiProcessorCount, N, K, mb);
  std::printf("| pattern | us | GB/s |\n|---|---|---|\n");
  auto report = [&](const char* name, float us) {
    std::printf("| %s | %.2f | %.0f |\n", name, us, mb * 1e3 / us);
  };
  const size_t n16 = (wbytes + cbytes) / 16;
  for (int blocks : {1, 2, 4, 8}) {
    char name[64];
    std::snprintf(name, sizeof name, "stream (%d x 256 threads / SM)", blocks);
    report(name, time_us([&](cudaStream_t st) {
      stream_kernel<<<prop.multiProcessorCount * blocks, 256, 0, st>>>(
          reinterpret_cast<const uint4*>(w), n16, sink);
    }, flush, flush_bytes));
  }
  report("rows-cp (decode kernel's copies)", time_us([&](cudaStream_t st) {
    rows_cp_kernel<CpHint::kNone><<<N / 16, 128, 0, st>>>(w, codes, KP, sink);
  }, flush, flush_bytes));
  report("rows-cp, L2 evict_first", time_us([&](cudaStream_t st) {
    rows_cp_kernel<CpHint::kEvictFirst><<<N / 16, 128, 0, st>>>(w, codes, KP, sink);
  }, flush, flush_bytes));
  report("rows-cp, L2 256B prefetch", time_us([&](cudaStream_t st) {
    rows_cp_kernel<CpHint::kPrefetch256><<<N / 16, 128, 0, st>>>(w, codes, KP, sink);
  }, flush, flush_bytes));
  report("rows-bulk 2 stages", time_us([&](cudaStream_t st) {
    rows_bulk_kernel<2><<<N / 16, 128, 0, st>>>(w, codes, KP, sink);
  }, flush, flush_bytes));
  report("rows-bulk 4 stages", time_us([&](cudaStream_t st) {
    rows_bulk_kernel<4><<<N / 16, 128, 0, st>>>(w, codes, KP, sink);
  }, flush, flush_bytes));
  report("rows-ldg depth 1", time_us([&](cudaStream_t st) {
    rows_ldg_kernel<false, 1><<<N / 16, 128, 0, st>>>(w, codes, KP, sink);
  }, flush, flush_bytes));
  report("rows-ldg depth 2", time_us([&](cudaStream_t st) {
    rows_ldg_kernel<false, 2><<<N / 16, 128, 0, st>>>(w, codes, KP, sink);
  }, flush, flush_bytes));
  report("rows-ldg depth 4", time_us([&](cudaStream_t st) {
    rows_ldg_kernel<false, 4><<<N / 16, 128, 0, st>>>(w, codes, KP, sink);
  }, flush, flush_bytes));
  report("tiles-ldg depth 1", time_us([&](cudaStream_t st) {
    rows_ldg_kernel<true, 1><<<N / 16, 128, 0, st>>>(w, codes, KP, sink);
  }, flush, flush_bytes));
  report("tiles-ldg depth 2", time_us([&](cudaStream_t st) {
    rows_ldg_kernel<true, 2><<<N / 16, 128, 0, st>>>(w, codes, KP, sink);
  }, flush, flush_bytes));
  report("tiles-ldg depth 4", time_us([&](cudaStream_t st) {
    rows_ldg_kernel<true, 4><<<N / 16, 128, 0, st>>>(w, codes, KP, sink);
  }, flush, flush_bytes));
  return 0;
}
