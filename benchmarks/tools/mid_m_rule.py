"""Same-run A/B of the dense op's tile rules between decode and prefill (whole op, `kern.apply`,
static scales, L2 flushed, `bench_linear.Timer`), on the Llama-3-8B shapes and 8192²:

- `previous`: `pick_config` as of commit 5d399ad (below, `previous_pick_config`; split-K until
  about 7 warps per SM are busy, whatever the grid's waves), the fixed wide prefill tile
  (`PREFILL_CONFIG`) and PDL for every FP8 tile of at least 64 tokens (`PDL_MIN_BN` = 64);
- `new`: `triton_w4a8.pick_config`, `prefill_config` and `gemm_launch_pdl` as they are.

Points where both pick the same tile (and PDL) are listed, not timed.
Each (shape, act, M) is timed `--repeat` times per variant, round robin; medians and samples.

    python benchmarks/tools/mid_m_rule.py [--repeat 3] > benchmarks/results/mid_m_rule.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_linear import (  # noqa: E402
    FP8,
    INT8,
    S_STATIC,
    SHAPES_8192,
    SHAPES_LLAMA8B,
    Timer,
    make_weight,
    our_kernel,
    print_tool_header,
)

from w4a8_backend.kernels import triton_w4a8 as tk  # noqa: E402

SHAPES = SHAPES_LLAMA8B + SHAPES_8192
MID_MS = (40, 48, 64, 80, 96, 128, 160, 192, 256, 320)
PREFILL_MS = (384, 512, 768, 1024)


def previous_pick_config(m, n_pad, kp, act_int8, sms, dense=False, row_ref=False):
    """``pick_config`` of commit 5d399ad, for the A/B."""
    if dense:
        if act_int8:
            return (128, 128, 128, 1, 8, 3) if row_ref else (128, 128, tk.INT8_TILE, 1, 8, 3)
        return (128, 256, 128, 1, 8, 3) if m >= 2048 else (128, 128, 128, 1, 8, 3)
    bk = 256
    if m <= 16:
        bn, bm, warps, stages = 64, 16, 4, 3 if act_int8 else 4
    elif m <= 64:
        bm = 32 if m <= 32 else 64
        bn, warps, stages = (64, 4, 4) if act_int8 else (128, 8, 4)
    else:
        bn, bm, warps, stages = 128, 128, 8, 4
    tiles = (n_pad // bn) * triton.cdiv(m, bm)
    target = (14 if act_int8 and m <= 16 else 7) * sms
    split = 1
    iters = kp // bk
    while tiles * split * warps < target and split * 2 <= max(1, iters // 2) and split < 16:
        split *= 2
    return bn, bm, bk, split, warps, stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print_tool_header()
    timer = Timer()
    new_pick, new_prefill, min_bn = tk.pick_config, tk.prefill_config, tk.PDL_MIN_BN
    variants = {
        "previous": (previous_pick_config, lambda *a: tk.PREFILL_CONFIG, 64),
        "new": (new_pick, new_prefill, min_bn),
    }
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    try:
        for n, k in SHAPES:
            packed, scale = make_weight(n, k, seed=n + k)
            x_cal = torch.randn(64, k, device="cuda").to(torch.bfloat16)
            for act in (FP8, INT8):
                i8 = act == INT8
                kern, layer = our_kernel(packed, scale, act, S_STATIC, x_cal)
                ms = MID_MS + (PREFILL_MS if not i8 else ())
                for m in ms:
                    picks = {}
                    for name, (pick, prefill, bn_min) in variants.items():
                        cfg = (pick(m, layer.weight.shape[0], k, i8, sms)
                               if m < kern.prefill_m else prefill(m, n, i8, sms))
                        pdl = (m < kern.prefill_m and not i8 and cfg[1] >= tk.PDL_MIN_BM
                               and cfg[0] >= bn_min)
                        picks[name] = (list(cfg), pdl)
                    res = {"N": n, "K": k, "M": m, "act": act.name,
                           "prefill_path": m >= kern.prefill_m,
                           "configs": {name: c for name, c in picks.items()}}
                    if picks["previous"] == picks["new"]:
                        print(json.dumps({**res, "same": True}), flush=True)
                        continue
                    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                    samples: dict[str, list[float]] = {}
                    for _ in range(args.repeat):
                        for name, (pick, prefill, bn_min) in variants.items():
                            tk.pick_config, tk.prefill_config, tk.PDL_MIN_BN = pick, prefill, bn_min
                            samples.setdefault(name, []).append(round(timer.time_us(
                                lambda: kern.apply(layer, x, None)), 2))
                    res.update({name: statistics.median(v) for name, v in samples.items()})
                    res["samples"] = samples
                    print(json.dumps(res), flush=True)
    finally:
        tk.pick_config, tk.prefill_config, tk.PDL_MIN_BN = new_pick, new_prefill, min_bn


if __name__ == "__main__":
    main()
