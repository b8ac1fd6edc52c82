"""The dense op between decode and prefill (M = 64-512) on the Llama-3-8B shapes: what the
backend runs now against other tile configs of the same kernels.

The tile sweeps behind `triton_w4a8.pick_config` and `PREFILL_CONFIG` were taken at N = K = 8192
(and M = 1024 / 4096 for the prefill GEMM). On the smaller Llama-3-8B projections the op at
M = 64-512 is slower than cuBLAS BF16 (`bench_linear_h100_20261125_0402_llama8b.md`: 4096 x 4096
M = 128 24.8 against 18.7 us), so this times, per (shape, act, M), static scales, L2 flushed
(`bench_linear.Timer`):

- `op`: the whole op as the backend runs it (`kern.apply`), and `quant` alone;
- `fused <cfg>`: `_w4a8_gemm` on the packed weight, GEMM alone, at `pick_config`'s choice
  (`fused default`) and other (BN, BM, BK, split, warps, stages);
- `materialize` alone, and the GEMM on the materialized weight (`tma <cfg>`: `_prefill_gemm` at
  (BM, BN, BK, GROUP_M, warps, stages); INT8 per-tile weights: `dense <cfg>`, `_w4a8_gemm`).

    python benchmarks/tools/mid_m_shapes.py [--ms 64,128,256,512] [--tiles bm32] > benchmarks/results/mid_m_shapes.jsonl

The first line is the device, date and command; then one JSON line per point.
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
    SHAPES_8192,
    SHAPES_LLAMA8B,
    Timer,
    make_weight,
    our_kernel,
    print_tool_header,
)

from w4a8_backend.kernels import triton_w4a8 as tk  # noqa: E402

SHAPES = SHAPES_LLAMA8B + SHAPES_8192


def narrow_token_configs(m: int, act_int8: bool) -> list[tuple]:
    """``--tiles bm32``: 32-token tiles (the token tile Humming's SM90 heuristic picks at
    4096 x 4096, M = 128), against the 64- and 128-token ones."""
    return [(bn, 32, 256, split, warps, 4) for bn in (64, 128) for split in (1, 2)
            for warps in (4, 8) if not (bn == 64 and warps == 8)]


def fused_configs(m: int, act_int8: bool) -> list[tuple]:
    """(BN, BM, BK, split, warps, stages) beyond pick_config's."""
    bm_big = 128 if m >= 128 else 64
    out = []
    for bn in (64, 128):
        for split in (1, 2, 4, 8):
            out.append((bn, 64, 256, split, 4, 4))
            if bm_big != 64:
                out.append((bn, bm_big, 256, split, 8, 3))
    if not act_int8:
        out += [(128, 64, 128, 2, 4, 5), (128, bm_big, 128, 2, 8, 4), (128, bm_big, 128, 4, 8, 4)]
    return out


TMA_CONFIGS = ((128, 256, 128, 16, 8, 4), (128, 128, 128, 16, 8, 4), (128, 128, 128, 8, 8, 3),
               (64, 256, 128, 16, 4, 4), (64, 128, 128, 16, 4, 4))
DENSE_CONFIGS = ((128, 128, 256, 1, 8, 3), (128, 64, 256, 1, 4, 4), (64, 64, 256, 1, 4, 4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ms", default="64,128,256,512")
    ap.add_argument("--shapes", default=None, help="NxK,NxK,... (default: Llama-3-8B and 8192²)")
    ap.add_argument("--tiles", default="all", choices=["all", "bm32"],
                    help="bm32: only pick_config's tile and 32-token tiles (no prefill GEMMs)")
    args = ap.parse_args()
    shapes = (SHAPES if args.shapes is None else
              [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")])
    print_tool_header()
    timer = Timer()
    ms = [int(v) for v in args.ms.split(",")]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for n, k in shapes:
        packed, scale = make_weight(n, k, seed=n + k)
        x_cal = torch.randn(64, k, device="cuda").to(torch.bfloat16)
        for act in (FP8, INT8):
            i8 = act == INT8
            kern, layer = our_kernel(packed, scale, act, S_STATIC, x_cal)
            rs, lut = layer.w4a8_row_scale, layer.w4a8_lut
            dense = tk.materialize(layer.weight, layer.weight_scale, rs, i8)
            for m in ms:
                x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                q, xs = tk.quantize_activation_gpu(x, i8, 1, layer.input_scale)
                res = {"N": n, "K": k, "M": m, "act": act.name,
                       "prefill_path": m >= kern.prefill_m}
                res["op"] = round(timer.time_us(lambda: kern.apply(layer, x, None)), 2)
                res["quant"] = round(timer.time_us(
                    lambda: tk.quantize_activation_gpu(x, i8, 1, layer.input_scale)), 2)
                res["materialize"] = round(timer.time_us(
                    lambda: tk.materialize(layer.weight, layer.weight_scale, rs, i8)), 2)
                default = tk.pick_config(m, layer.weight.shape[0], k, i8, sms)
                cands = [("fused default", default, None)]
                extra = (narrow_token_configs if args.tiles == "bm32" else fused_configs)(m, i8)
                cands += [(f"fused {c}", c, None) for c in extra if c != default]
                if args.tiles == "bm32":
                    pass
                elif i8:
                    cands += [(f"dense {c}", c, "dense") for c in DENSE_CONFIGS]
                else:
                    cands += [(f"tma {c}", c, "tma") for c in TMA_CONFIGS]
                for label, cfg, kind in cands:
                    try:
                        fn = lambda cfg=cfg, kind=kind: tk.w4a8_gemm(  # noqa: E731
                            q, xs, layer.weight, layer.weight_scale, rs, layer.w4a8_counters,
                            lut, n, i8, False, None, torch.bfloat16,
                            config=cfg if kind != "tma" else None,
                            dense=dense if kind else None,
                            tma=(kind == "tma") if kind else None,
                            tma_config=cfg if kind == "tma" else None)
                        res[label] = round(timer.time_us(fn), 2)
                    except Exception as exc:  # a config the kernel cannot take: recorded
                        res[label] = f"ERR {type(exc).__name__}: {str(exc)[-200:]}"
                print(json.dumps(res), flush=True)
            del dense


if __name__ == "__main__":
    main()
