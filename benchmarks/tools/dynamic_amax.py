"""Same-run timing of dynamic per-tensor activation scales (the input's amax, then quantization).

Part 1, the quantization step alone (FP8 output, bf16 input), per (M, K):
- `triton_vector_norm`: `torch.linalg.vector_norm(x, inf)` then the Triton quantization (the
  Triton path before 2026-11-23 20:00 UTC);
- `triton_partials`: partial amaxes over the GPU, reduced inside the Triton quantization (now);
- `cuda_one_cta`: the CUDA kernel's single-CTA amax (used up to `ONE_CTA_AMAX_MAX` elements);
- `cuda_vector_norm`: a torch amax then the CUDA quantization (the CUDA path before, above
  32768 elements);
- `cuda_grid`: the CUDA grid kernel (per-CTA amaxes, grid sync, one launch; now);
- `triton_static` / `cuda_static`: a static scale, the floor.
Part 2, the whole linear op (`Sm90TritonLinearKernel.apply`), static vs dynamic per tensor, FP8
and INT8, per (N, K, M): what a dynamic scale still costs; where M runs on the Triton GEMM, also
with the CUDA grid quantization in place of Triton's (an experiment).

All under `bench_linear.Timer` (CUDA graphs, L2 flushed).

    python benchmarks/tools/dynamic_amax.py > benchmarks/results/dynamic_amax.jsonl

The first line is the device, date and command; then one JSON line per measurement point.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_linear import (  # noqa: E402
    FP8,
    INT8,
    S_STATIC,
    S_TENSOR,
    SHAPES_8192,
    SHAPES_LLAMA8B,
    Timer,
    make_weight,
    our_kernel,
    print_tool_header,
)

from w4a8_backend.kernels import _cuda_ext, sm90_triton  # noqa: E402
from w4a8_backend.kernels import triton_w4a8 as tk  # noqa: E402

QUANT_SHAPES = [(1, 4096), (1, 8192), (1, 14336), (4, 4096), (4, 8192), (4, 14336), (8, 8192),
                (16, 4096), (16, 8192), (16, 14336), (64, 8192), (64, 14336), (256, 8192),
                (4096, 8192)]
OP_MS = (1, 4, 8, 16, 64)


def quant_variants(lib, x):
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device="cuda")
    s_out = torch.empty(1, dtype=torch.float32, device="cuda")
    static = (x.float().abs().amax() / 448.0).reshape(1)

    def triton_vector_norm():
        amax = torch.linalg.vector_norm(x, float("inf")).reshape(1)
        block = tk.triton.next_power_of_2(k) if k <= 16384 else 4096
        tk._quant_act[(m,)](x, q, amax, s_out, k, x.stride(0), 1, ACT_INT8=False, MODE=2,
                            ONE_PASS=k <= 16384, BLOCK=block, PART_P2=1, PDL=False,
                            num_warps=8 if block >= 4096 else 4)

    def cuda_vector_norm():
        # (static mode with the amax as its scale: the same kernel work as the removed branch)
        amax = torch.linalg.vector_norm(x, float("inf"), dtype=torch.float32).reshape(1)
        lib.quant_act(x, q, amax, s_out, False, int(S_STATIC))

    def cuda_grid():
        sm90_triton.ONE_CTA_AMAX_MAX = 0
        return sm90_triton.cuda_quantize(lib, x, False, int(S_TENSOR), None)

    variants = {
        "triton_vector_norm": triton_vector_norm,
        "triton_partials": lambda: tk.quantize_activation_gpu(x, False, int(S_TENSOR), None),
        "cuda_vector_norm": cuda_vector_norm,
        "cuda_grid": cuda_grid,
        "triton_static": lambda: tk.quantize_activation_gpu(x, False, int(S_STATIC), static),
        "cuda_static": lambda: lib.quant_act(x, q, static, s_out, False, int(S_STATIC)),
    }
    if m * k <= 1 << 15:  # the one-CTA kernel's old limit
        variants["cuda_one_cta"] = lambda: lib.quant_act(x, q, None, s_out, False,
                                                         int(S_TENSOR))
    return variants


def main():
    timer = Timer()
    print_tool_header(one_cta_amax_max=sm90_triton.ONE_CTA_AMAX_MAX)
    major, minor = torch.cuda.get_device_capability()
    lib = _cuda_ext.load(major * 10 + minor)
    one_cta_max = sm90_triton.ONE_CTA_AMAX_MAX
    for m, k in QUANT_SHAPES:
        x = (torch.randn(m, k, device="cuda") * 3).to(torch.bfloat16)
        res = {"part": "quantize", "M": m, "K": k}
        for name, fn in quant_variants(lib, x).items():
            res[name + "_us"] = round(timer.time_us(fn), 2)
            sm90_triton.ONE_CTA_AMAX_MAX = one_cta_max
        print(json.dumps(res), flush=True)
    for n, k in SHAPES_8192 + SHAPES_LLAMA8B:
        packed, scale = make_weight(n, k, seed=n + k)
        x_cal = torch.randn(64, k, device="cuda").to(torch.bfloat16)
        for act in (FP8, INT8):
            kernels = {s: our_kernel(packed, scale, act, s, x_cal) for s in (S_STATIC, S_TENSOR)}
            for m in OP_MS:
                x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                res = {"part": "op", "N": n, "K": k, "M": m, "act": act.name}
                for s, (kern, layer) in kernels.items():
                    res[s.name.lower() + "_us"] = round(
                        timer.time_us(lambda: kern.apply(layer, x, None)), 2)
                if m > sm90_triton.CUDA_DECODE_MAX_M[act == INT8]:
                    # the Triton GEMM path with the CUDA grid quantization instead of Triton's
                    kern, layer = kernels[S_TENSOR]
                    with cuda_quantization_on_triton_path(lib):
                        res["dynamic_per_tensor_cuda_quant_us"] = round(
                            timer.time_us(lambda: kern.apply(layer, x, None)), 2)
                print(json.dumps(res), flush=True)


@contextlib.contextmanager
def cuda_quantization_on_triton_path(lib):
    """An experiment: the Triton GEMM path's dynamic per-tensor quantization by the CUDA grid
    kernel."""
    triton_quantize = tk.quantize_activation_gpu

    def quantize(x2, act_int8, scheme, input_scale):
        if scheme != int(S_TENSOR):
            return triton_quantize(x2, act_int8, scheme, input_scale)
        return sm90_triton.cuda_quantize(lib, sm90_triton.aligned_rows(x2), act_int8, scheme,
                                         None)

    tk.quantize_activation_gpu = quantize
    try:
        yield
    finally:
        tk.quantize_activation_gpu = triton_quantize


if __name__ == "__main__":
    main()
