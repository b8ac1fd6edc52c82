"""Same-run timing of the CUDA wgmma GEMM (``wg_gemm_kernel``) against the op's current path and
the CUDA decode kernel.

Per (N, K, activation dtype, M): cuBLAS BF16, the whole op on its current path (``op``), the whole
wgmma path (CUDA quantization, wgmma GEMM, correction kernel) for each launch config (warps,
tokens per CTA, stages, K splits), and up to 16 rows the CUDA decode kernel, each with its
relative difference from the op's output. All
under `bench_linear.Timer` (CUDA graphs, L2 flushed before each call), static activation scales.

    python benchmarks/tools/mid_m.py > benchmarks/results/mid_m.jsonl

The first line is the device, date and command; then one JSON line per point; then a summary
table (markdown) of the op and the fastest config, as ratios over cuBLAS BF16.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
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
)

from w4a8_backend.formats import dequantize_mxfp4  # noqa: E402
from w4a8_backend.kernels import sm90_triton  # noqa: E402

# instantiated (warps, tokens per CTA) -> stages
STAGES = {(4, 8): (4,), (4, 16): (4,), (4, 32): (4,), (4, 64): (3, 4), (8, 32): (4,),
          (8, 64): (3, 4)}


def configs_for(m: int) -> list[tuple[int, int, int, int]]:
    """(warps, tokens per CTA, stages, K splits) of the wgmma GEMM worth timing at ``m`` rows."""
    tokens = next(t for t in (8, 16, 32, 64) if m <= t or t == 64)
    return [(w, tokens, st, sp) for w in (4, 8) for st in STAGES.get((w, tokens), ())
            for sp in (1, 2, 4)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ms", default="1,4,8,16,32,64,128")
    ap.add_argument("--shapes", default="all", help="'all' or '8192' (N = K = 8192 only)")
    args = ap.parse_args(argv)
    ms = [int(v) for v in args.ms.split(",")]
    shapes = SHAPES_8192 + (SHAPES_LLAMA8B if args.shapes == "all" else [])
    timer = Timer()
    print(json.dumps({
        "device": torch.cuda.get_device_name(0),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "mid_max_m": {str(k): v for k, v in sm90_triton.CUDA_MID_MAX_M.items()},
    }), flush=True)
    summary = []
    for n, k in shapes:
        packed, scale = make_weight(n, k, seed=n + k)
        w_bf16 = dequantize_mxfp4(packed, scale).to(torch.bfloat16)
        x_cal = torch.randn(64, k, device="cuda").to(torch.bfloat16)
        for act in (FP8, INT8):
            kern, layer = our_kernel(packed, scale, act, S_STATIC, x_cal)
            corr = (layer.w4a8_corr_rows, layer.w4a8_corr_ptr, layer.w4a8_corr_blocks,
                    layer.w4a8_corr_values)
            dec_corr = ((layer.w4a8_corr_row_ptr, layer.w4a8_corr_blocks,
                         layer.w4a8_corr_values) if layer.w4a8_corr_blocks.numel() else None)
            for m in ms:
                x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                res = {"N": n, "K": k, "M": m, "act": act.name,
                       "cublas_bf16_us": round(timer.time_us(lambda: x @ w_bf16.t()), 2)}
                saved = dict(sm90_triton.CUDA_MID_MAX_M)
                sm90_triton.CUDA_MID_MAX_M.update({False: 0, True: 0})
                try:
                    ref = kern.apply(layer, x, None).float()
                    res["op_us"] = round(timer.time_us(lambda: kern.apply(layer, x, None)), 2)
                finally:
                    sm90_triton.CUDA_MID_MAX_M.update(saved)
                for config in configs_for(m):

                    def call(config=config):
                        return sm90_triton.cuda_mid(
                            x, layer.weight, layer.weight_scale, layer.w4a8_row_scale,
                            layer.input_scale, None, n, act == INT8, int(S_STATIC),
                            torch.bfloat16, layer.w4a8_counters, corr, config=config)[0]

                    key = ",".join(map(str, config))
                    try:
                        y = call().float()
                        res["diff " + key] = float(f"{((y - ref).norm() / ref.norm()).item():.2e}")
                        us = round(timer.time_us(call), 2)
                    except Exception as exc:  # a config the shape cannot take
                        res[key] = f"ERR {type(exc).__name__}: {exc}"
                        continue
                    res[key] = us
                if m <= 16:  # the CUDA decode kernel (mma.sync), default config
                    for config in ((4, 2),):
                        def dec(config=config):
                            return sm90_triton.cuda_decode(
                                x, layer.weight, layer.weight_scale, layer.w4a8_row_scale,
                                layer.input_scale, None, n, act == INT8, int(S_STATIC),
                                torch.bfloat16, dec_corr, config=config)[0]
                        y = dec().float()
                        key = "decode " + ",".join(map(str, config))
                        res["diff " + key] = float(f"{((y - ref).norm() / ref.norm()).item():.2e}")
                        res[key] = round(timer.time_us(dec), 2)
                res["counters_zero"] = bool((layer.w4a8_counters == 0).all().item())
                print(json.dumps(res), flush=True)
                timed = [(key, v) for key, v in res.items() if isinstance(v, float)
                         and (key[0].isdigit() or key.startswith("decode "))]
                best = min(timed, key=lambda kv: kv[1]) if timed else None
                summary.append((n, k, m, act.name, res["cublas_bf16_us"], res["op_us"], best))
    print("\n| N | K | M | act | cuBLAS BF16 us | op us (x) | best CUDA us (x) | kernel, config |")
    print("|---|---|---|---|---|---|---|---|")
    for n, k, m, act, cub, op, best in summary:
        b = f"{best[1]} ({cub / best[1]:.2f}x) | {best[0]}" if best else "n/a | n/a"
        print(f"| {n} | {k} | {m} | {act} | {cub} | {op} ({cub / op:.2f}x) | {b} |")


if __name__ == "__main__":
    main()
