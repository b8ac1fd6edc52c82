"""Same-run A/B of which kernel runs FP8 at 9-16 tokens: the Triton GEMM (the default,
`CUDA_DECODE_MAX_M[False]` = 8, from a 2026-11-22 sweep) or the CUDA decode GEMM (limit 16, as
INT8), after the CUDA kernel's later changes (word layout, L2 evict_first copies, f16 MMAs).

Whole op (`kern.apply`), static and dynamic per-tensor scales, `bench_linear.Timer` with the L2
flushed, `--repeat` samples per variant round robin; the relative difference of the two
outputs is printed (different kernels: not bit-identical).

    python benchmarks/tools/fp8_cuda_max_m.py [--repeat 3] > benchmarks/results/fp8_cuda_max_m.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_linear import (  # noqa: E402
    FP8,
    S_STATIC,
    S_TENSOR,
    SHAPES_8192,
    SHAPES_LLAMA8B,
    Timer,
    make_weight,
    our_kernel,
    print_tool_header,
    round_robin,
)

from w4a8_backend.kernels import sm90_triton  # noqa: E402

MS = (9, 12, 16)
VARIANTS = {"triton": 8, "cuda": 16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print_tool_header()
    timer = Timer()
    saved = dict(sm90_triton.CUDA_DECODE_MAX_M)
    try:
        for n, k in SHAPES_8192 + SHAPES_LLAMA8B:
            packed, scale = make_weight(n, k, seed=n + k)
            x_cal = torch.randn(64, k, device="cuda").to(torch.bfloat16)
            for scheme in (S_STATIC, S_TENSOR):
                kern, layer = our_kernel(packed, scale, FP8, scheme, x_cal)
                for m in MS:
                    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                    outs, samples, medians = round_robin(
                        timer, lambda: kern.apply(layer, x, None),
                        {name: lambda max_m=max_m: sm90_triton.CUDA_DECODE_MAX_M.update(
                            {False: max_m}) for name, max_m in VARIANTS.items()}, args.repeat)
                    cuda, triton_ = outs["cuda"].float(), outs["triton"].float()
                    print(json.dumps({
                        "N": n, "K": k, "M": m, "scheme": scheme.name, **medians,
                        "rel_diff": ((cuda - triton_).norm() / triton_.norm()).item(),
                        "samples": samples}), flush=True)
    finally:
        sm90_triton.CUDA_DECODE_MAX_M.clear()
        sm90_triton.CUDA_DECODE_MAX_M.update(saved)


if __name__ == "__main__":
    main()
