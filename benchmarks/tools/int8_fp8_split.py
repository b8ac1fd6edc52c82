"""The INT8 split path (docs/int8_kernel.md) against the per-tile INT8 GEMM, same layer, same
run. An INT8 layer loaded on sm_90 keeps the FP8 repacking of its weight beside the INT8 one
(``layer.w4a8_split``); between decode and prefill its op quantizes the activations into two
exact E4M3 planes and runs the fused GEMM on the FP8 repacking (``triton_w4a8.split_config``:
FP8's tile rule up to 64-token tiles, one wave for 8-warp tiles).

Whole op, L2 flushed, `--repeat` samples round robin:

- `int8`: the op with the split path's tensors withheld (quantization, per-tile INT8 GEMM,
  correction), as INT8 layers ran before;
- `split`: the op as it runs now (`kern.apply`); where `split_config` declines the M (tiles of
  128 tokens), the INT8 GEMM again;
- `split_fp8_rule`: the split path at FP8's own tile (``pick_config``: no one-wave cap, and
  128-token tiles at 2 stages where FP8 takes them).

The outputs' relative difference against `int8` is printed.

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


def fp8_rule_config(m: int, n_pad: int, kp: int, sms: int) -> tuple:
    bn, bm, bk, split, warps, stages = tk.pick_config(m, n_pad, kp, False, sms)
    return bn, bm, bk, split, warps, 2 if bm >= 128 else stages  # (4 stages overflow smem)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
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
            split = layer.w4a8_split
            assert split, "the INT8 layer has no split path (not sm_90?)"
            s_codes, s_row_scale, *s_corr = split
            n_pad = layer.weight.shape[0]

            def withheld(x):
                layer.w4a8_split = []
                try:
                    return kern.apply(layer, x, None)
                finally:
                    layer.w4a8_split = split

            for m in (int(v) for v in args.ms.split(",")):
                x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                cfg_fp8 = fp8_rule_config(m, n_pad, k, sms)

                def split_fp8_rule():
                    q, xs = tk.quantize_activation_gpu(x, True, int(scheme), layer.input_scale,
                                                       split=True)
                    y = tk.w4a8_gemm(q, xs, layer.weight, s_codes, s_row_scale,
                                     layer.w4a8_counters, layer.w4a8_lut, n, False, per_token,
                                     None, torch.bfloat16, config=cfg_fp8, x_split=True)
                    tk.correction(y, q, xs, per_token, *s_corr)
                    return y

                calls = {"int8": lambda: withheld(x), "split": lambda: kern.apply(layer, x, None),
                         "split_fp8_rule": split_fp8_rule}
                on = {"fn": None}
                outs, samples, medians = round_robin(
                    timer, lambda: on["fn"](),
                    {name: lambda f=f: on.update(fn=f) for name, f in calls.items()},
                    args.repeat)
                a = outs["int8"].float()
                print(json.dumps({
                    "N": n, "K": k, "M": m, "scheme": scheme.name,
                    "split_config": tk.split_config(m, n_pad, k, sms), "fp8_config": cfg_fp8,
                    "int8_blocks": int(layer.w4a8_corr_blocks.numel()),
                    "split_blocks": int(s_corr[2].numel()), **medians,
                    **{f"rel_diff_{v}": ((outs[v].float() - a).norm() / a.norm()).item()
                       for v in ("split", "split_fp8_rule")},
                    "samples": samples}), flush=True)


if __name__ == "__main__":
    main()
