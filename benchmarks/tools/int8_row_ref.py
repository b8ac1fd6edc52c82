"""Same-run A/B of the INT8 mid-M GEMM (between the CUDA decode kernel and the prefill path):
one reference per 256-wide K tile (the fused loop rescales every K step, so each step waits
for its MMAs) against one reference per row (exact int32 sums over the whole K, as FP8's loop;
the blocks outside the row's 4-binade window go to the correction kernel).

Each variant is the whole op as ``mxfp4_w4a8_linear`` runs it (activation quantization, GEMM,
correction launch), L2 flushed, ``bench_linear.Timer``:

- ``tile``: the layer as loaded (``kern.apply``);
- ``row``: per-row reference, tiles of ``pick_config`` for INT8 (as the per-tile GEMM);
- ``row_fp8_tiles``: per-row reference, tiles of ``pick_config`` for FP8;
- ``row_gemm``: the ``row`` GEMM alone, without the correction launch (its cost is the
  difference).

Weights: ``bench_linear.make_weight`` at block spreads 0.35 (the benchmark's; 0.19 % of the
blocks leave a row window, ten times MiniLM's) and 0.15 (about MiniLM's).

    python benchmarks/tools/int8_row_ref.py [--repeat 3] > benchmarks/results/int8_row_ref.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_linear import (  # noqa: E402
    INT8,
    S_STATIC,
    S_TOKEN,
    Timer,
    make_weight,
    our_kernel,
    print_tool_header,
)

from w4a8_backend.kernels import triton_w4a8 as tk  # noqa: E402
from w4a8_backend.kernels._sm90_repack import int8_prefill_rows, repack_mxfp4  # noqa: E402

SHAPES = ((8192, 8192), (6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))
MS = (32, 64, 96, 128, 192, 256)
SPREADS = (0.35, 0.15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--shapes", default="all", help="'all' or a comma list of NxK")
    args = ap.parse_args()
    shapes = SHAPES if args.shapes == "all" else tuple(
        tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
    print_tool_header()
    timer = Timer()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for spread in SPREADS:
        for n, k in shapes:
            packed, scale = make_weight(n, k, seed=n + k, spread=spread)
            rp = repack_mxfp4(packed, scale, True)
            pf = int8_prefill_rows(packed, scale, rp)
            x_cal = torch.randn(64, k, device="cuda").to(torch.bfloat16)
            for scheme in (S_STATIC, S_TOKEN):
                per_token = scheme == S_TOKEN
                kern, layer = our_kernel(packed, scale, INT8, scheme, x_cal)
                n_pad = layer.weight.shape[0]
                corr = (pf.corr_rows, pf.corr_ptr, pf.corr_blocks, pf.corr_values)

                def row_op(x, cfg, with_corr=True):
                    q, xs = tk.quantize_activation_gpu(x, True, int(scheme), layer.input_scale)
                    y = tk.w4a8_gemm(q, xs, layer.weight, layer.weight_scale,
                                     layer.w4a8_row_scale, layer.w4a8_counters, layer.w4a8_lut,
                                     n, True, per_token, None, torch.bfloat16, config=cfg,
                                     prefill_row_scale=pf.row_scale)
                    if with_corr:
                        tk.correction(y, q, xs, per_token, *corr)
                    return y

                for m in MS:
                    cfg_i8 = tk.pick_config(m, n_pad, k, True, sms)
                    cfg_f8 = tk.pick_config(m, n_pad, k, False, sms)
                    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                    ref = kern.apply(layer, x, None).float()
                    got = row_op(x, cfg_i8).float()
                    rel = ((got - ref).norm() / ref.norm()).item()
                    variants = {
                        "tile": lambda: kern.apply(layer, x, None),
                        "row": lambda: row_op(x, cfg_i8),
                        "row_fp8_tiles": lambda: row_op(x, cfg_f8),
                        "row_gemm": lambda: row_op(x, cfg_i8, with_corr=False),
                    }
                    samples: dict[str, list[float]] = {}
                    for _ in range(args.repeat):
                        for name, fn in variants.items():
                            samples.setdefault(name, []).append(round(timer.time_us(fn), 2))
                    res = {"spread": spread, "N": n, "K": k, "M": m, "scheme": scheme.name,
                           "blocks_tile": int(rp.num_out_of_range),
                           "blocks_row": int(pf.num_out_of_range),
                           "configs": {"int8": list(cfg_i8), "fp8": list(cfg_f8)},
                           "rel_diff_vs_tile": rel}
                    res.update({name: statistics.median(v) for name, v in samples.items()})
                    res["samples"] = samples
                    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
