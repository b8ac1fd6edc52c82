"""Experiment (docs/int8_kernel.md): INT8 activations on the FP8 weight path. Each int8
activation q becomes two exact E4M3 planes, 16 * floor(q / 16) and the rest
(`triton_w4a8.split_int8`), and the fused GEMM runs on the FP8 repacking of the same weight
with two MMAs per half step (`w4a8_gemm(x_split=True)`): FP8's cheaper decode, twice the MMAs.

Same-run A/B of the whole INT8 op between decode and prefill, L2 flushed, `--repeat` samples
round robin:

- `int8`: the INT8 layer as it runs today (`kern.apply`: quantization, per-tile INT8 GEMM,
  correction);
- `split`: the int8 quantization writing the two planes (`quantize_activation_gpu(...,
  split=True)`), the split GEMM on the FP8 repacking and its correction (which reads the
  planes);
- `split_gemm`: the split GEMM alone.

The split GEMM takes the FP8 tile rule, with 2 stages where 128-token tiles would overflow
shared memory (the activation tile is twice FP8's). The outputs' relative difference is
printed.

    python benchmarks/tools/int8_fp8_split.py [--repeat 3] > benchmarks/results/int8_fp8_split.jsonl
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
    INT8,
    S_STATIC,
    S_TOKEN,
    SHAPES_8192,
    SHAPES_LLAMA8B,
    Timer,
    make_weight,
    our_kernel,
    print_tool_header,
    round_robin,
)

from w4a8_backend.kernels import triton_w4a8 as tk  # noqa: E402

MS = (17, 32, 64, 128, 256)


def split_config(m: int, n_pad: int, kp: int, sms: int) -> tuple:
    bn, bm, bk, split, warps, stages = tk.pick_config(m, n_pad, kp, False, sms)
    return bn, bm, bk, split, warps, 2 if bm >= 128 else stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print_tool_header()
    timer = Timer()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for n, k in SHAPES_8192 + SHAPES_LLAMA8B:
        packed, scale = make_weight(n, k, seed=n + k)
        x_cal = torch.randn(64, k, device="cuda").to(torch.bfloat16)
        for scheme in (S_STATIC, S_TOKEN):
            per_token = scheme == S_TOKEN
            kern, layer = our_kernel(packed, scale, INT8, scheme, x_cal)
            _, fp8 = our_kernel(packed, scale, FP8, S_STATIC, x_cal)  # its repacking only
            for m in MS:
                x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                planes, xs = tk.quantize_activation_gpu(x, True, int(scheme), layer.input_scale,
                                                        split=True)
                cfg = split_config(m, fp8.weight.shape[0], k, sms)

                def split_gemm():
                    return tk.w4a8_gemm(planes, xs, fp8.weight, fp8.weight_scale,
                                        fp8.w4a8_row_scale, fp8.w4a8_counters, fp8.w4a8_lut, n,
                                        False, per_token, None, torch.bfloat16, config=cfg,
                                        x_split=True)

                def split_op():
                    p2, xs2 = tk.quantize_activation_gpu(x, True, int(scheme), layer.input_scale,
                                                         split=True)
                    y = tk.w4a8_gemm(p2, xs2, fp8.weight, fp8.weight_scale,
                                     fp8.w4a8_row_scale, fp8.w4a8_counters, fp8.w4a8_lut, n,
                                     False, per_token, None, torch.bfloat16, config=cfg,
                                     x_split=True)
                    tk.correction(y, p2, xs2, per_token, fp8.w4a8_corr_rows, fp8.w4a8_corr_ptr,
                                  fp8.w4a8_corr_blocks, fp8.w4a8_corr_values)
                    return y

                calls = {"int8": lambda: kern.apply(layer, x, None), "split": split_op,
                         "split_gemm": split_gemm}
                on = {"fn": None}
                outs, samples, medians = round_robin(
                    timer, lambda: on["fn"](),
                    {name: lambda f=f: on.update(fn=f) for name, f in calls.items()},
                    args.repeat)
                a, b = outs["int8"].float(), outs["split"].float()
                print(json.dumps({
                    "N": n, "K": k, "M": m, "scheme": scheme.name, "split_config": list(cfg),
                    "fp8_blocks": int(fp8.w4a8_corr_blocks.numel()), **medians,
                    "rel_diff": ((a - b).norm() / a.norm()).item(), "samples": samples}),
                    flush=True)


if __name__ == "__main__":
    main()
