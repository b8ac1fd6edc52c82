"""Same-run timing of the dense CUDA decode op's out-of-range blocks (INT8, M <= 16).

Three variants of one call, each under `bench_linear.Timer` (CUDA graphs, L2 flushed):
- `epilogue`: the op as built, the blocks added in the decode GEMM's epilogue;
- `separate_launch`: the CUDA GEMM without them followed by the Triton correction kernel (the
  op before 2026-11-23 18:00 UTC);
- `no_corrections`: the CUDA GEMM alone, a timing floor only (its results lack the blocks).
Also the relative difference of the first two outputs, that of the third (how much the blocks
matter), and whether the epilogue gives bit-identical outputs on a second call.

    python benchmarks/tools/decode_corrections.py > benchmarks/results/decode_corrections.jsonl

The first line is the device, date and command; then one JSON line per (shape, scheme, M).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_linear import (  # noqa: E402
    INT8,
    S_STATIC,
    S_TOKEN,
    SHAPES_8192,
    SHAPES_LLAMA8B,
    Timer,
    make_weight,
    our_kernel,
    print_tool_header,
)

from w4a8_backend.kernels import triton_w4a8 as tk  # noqa: E402
from w4a8_backend.kernels.sm90_triton import cuda_decode  # noqa: E402


def main():
    timer = Timer()
    print_tool_header()
    for n, k in SHAPES_8192 + SHAPES_LLAMA8B:
        packed, scale = make_weight(n, k, seed=n + k)
        x_cal = torch.randn(64, k, device="cuda").to(torch.bfloat16)
        for scheme in (S_STATIC, S_TOKEN):
            kern, layer = our_kernel(packed, scale, INT8, scheme, x_cal)
            s_in = layer.input_scale if scheme == S_STATIC else None
            for m in (1, 4, 16):
                x = torch.randn(m, k, device="cuda").to(torch.bfloat16)

                def gemm_only():
                    return cuda_decode(x, layer.weight, layer.weight_scale,
                                       layer.w4a8_row_scale, s_in, None, n, True, int(scheme),
                                       torch.bfloat16)

                def epilogue():
                    return kern.apply(layer, x, None)

                def separate_launch():
                    y, q, xs = gemm_only()
                    tk.correction(y, q, xs, scheme == S_TOKEN, layer.w4a8_corr_rows,
                                  layer.w4a8_corr_ptr, layer.w4a8_corr_blocks,
                                  layer.w4a8_corr_values)
                    return y

                def no_corrections():
                    return gemm_only()[0]

                ya, yb = epilogue().float(), separate_launch().float()
                yc = no_corrections().float()
                res = {"N": n, "K": k, "M": m, "scheme": scheme.name,
                       "corr_blocks": layer.w4a8_corr_blocks.numel(),
                       "rel_diff_epilogue_vs_separate": ((ya - yb).norm() / yb.norm()).item(),
                       "rel_diff_without_vs_separate": ((yc - yb).norm() / yb.norm()).item(),
                       "deterministic": bool(torch.equal(ya, epilogue().float()))}
                for name, fn in (("epilogue", epilogue), ("separate_launch", separate_launch),
                                 ("no_corrections", no_corrections)):
                    res[name + "_us"] = round(timer.time_us(fn), 2)
                print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
