"""Run the decode GEMMs once each (for `ncu`): CUDA kernel configs and the Triton kernel at one
shape. Usage: ncu --clock-control none --section SpeedOfLight ... python benchmarks/tools/profile_decode.py"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_linear import FP8, INT8, S_STATIC, make_weight, our_kernel  # noqa: E402

from w4a8_backend.kernels import _cuda_ext  # noqa: E402
from w4a8_backend.kernels import triton_w4a8 as tk  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--configs", default="4x2,8x2")
    args = ap.parse_args()
    act = INT8 if args.int8 else FP8
    packed, scale = make_weight(args.n, args.k)
    x_cal = torch.randn(64, args.k, device="cuda").to(torch.bfloat16)
    kern, layer = our_kernel(packed, scale, act, S_STATIC, x_cal)
    x = torch.randn(args.m, args.k, device="cuda").to(torch.bfloat16)
    q, xs = tk.quantize_activation_gpu(x, args.int8, 1, layer.input_scale)
    y = torch.empty(args.m, args.n, dtype=torch.bfloat16, device="cuda")
    lib = _cuda_ext.load(90)
    for cfg in args.configs.split(","):
        w, s = (int(v) for v in cfg.split("x"))
        lib.gemm(q, xs, layer.weight, layer.weight_scale, layer.w4a8_row_scale, None, y,
                 args.int8, False, w, s, False)
    tk.w4a8_gemm(q, xs, layer.weight, layer.weight_scale, layer.w4a8_row_scale,
                 layer.w4a8_counters, layer.w4a8_lut, args.n, args.int8, False, None,
                 torch.bfloat16)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
