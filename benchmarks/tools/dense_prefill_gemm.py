"""Sweep of the sm_90 prefill GEMM on the materialized weight (``triton_w4a8._prefill_gemm``:
TMA tensor descriptors, one program per SM walking the tiles in groups of GROUP_M token tiles)
against the pointer-load kernel it replaced there (``_w4a8_gemm`` with ``W_DENSE``, one program
per tile, weight tiles fastest) and the library baselines, all in one run.

``y[M, N] = (x_q[M, K] @ W[N, K]^T) * x_scale * row_scale[N]`` in bfloat16, for FP8 and for
INT8 with one reference per row (``int8 row``: int32 sums over the whole K). ``int8 tile``
(one reference per 256-wide K tile) always takes the pointer-load kernel: its TMA form was
slower (below) and was removed.

Measured on an H100 (2026-11-24, benchmarks/results/dense_prefill_gemm_h100_20261124_2327.jsonl;
the first run, with Triton's warp specialization, ``..._first_h100_20261124_2322.jsonl``):

- FP8, N = K = 8192, M = 4096: 401.7 -> 373.3 us (cuBLAS FP8 per tensor 377.5, row-wise 448.1);
  28672 x 4096: 965.3 -> 706.8 us at M = 4096 and 344.9 -> 180.2 at M = 1024; 4096 x 14336
  within 1 % at M = 4096, 90.6 -> 79.0 at M = 1024.
- INT8 per row: 28672 x 4096 1392.4 -> 828.3 us (M = 4096), 338.1 -> 213.1 (M = 1024); 8192 x
  8192 437.7 -> 430.5 (M = 4096), 111.4 -> 112.6 (M = 1024); 4096 x 14336 383.7 -> 371.6 and
  89.6 -> 94.1.
- The grouped order is what wins at 28672 x 4096: the pointer-load grid reads the whole weight
  once per token tile.
- INT8 per tile on TMA loads (removed): 748 against 643 us at 8192 x 8192, M = 4096. Triton
  makes a ``wgmma`` with an int32 accumulator wait at once (its rule: only float32
  accumulators are made asynchronous), and the per-tile rescale sits in that wait.
- Warp specialization (``tl.range(..., warp_specialize=True)``, Triton 3.6): 371.9 us at 8
  warps, no gain; at 4 warps the kernel never finished (killed after 90 s). Not used.

On the GPU machine: ``python benchmarks/tools/dense_prefill_gemm.py > out.jsonl``; one JSON line
per (shape, M, mode, variant) with microseconds (L2 flushed, CUDA-graph replay,
bench_linear.Timer) and the largest difference from the pointer-load kernel's output relative
to its largest value.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench_linear import Timer, run_metadata  # noqa: E402
from w4a8_backend.kernels import triton_w4a8 as tw  # noqa: E402


# (BM, BN, BK, GROUP_M, warps, stages) of triton_w4a8._prefill_gemm
CONFIGS = {
    "fp8": [(128, 256, 128, 8, 8, 4), (128, 256, 128, 8, 8, 3), (256, 128, 128, 8, 8, 3),
            (128, 256, 128, 16, 8, 4)],
    "int8 row": [(128, 256, 128, 8, 8, 4), (256, 128, 128, 8, 8, 3), (128, 256, 128, 16, 8, 4)],
}
SHAPES = [(8192, 8192), (28672, 4096), (4096, 14336), (6144, 4096)]
MS = [4096, 1024]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--modes", default=",".join(CONFIGS))
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(json.dumps({"meta": run_metadata()}), flush=True)
    timer = Timer()
    for n, k in shapes:
        for m in (int(v) for v in args.ms.split(",")):
            for mode in args.modes.split(","):
                act_int8 = row_ref = mode == "int8 row"
                torch.manual_seed(0)
                x = torch.randn(m, k, device="cuda")
                w = torch.randn(n, k, device="cuda")
                if act_int8:
                    q = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
                    dense = torch.randint(-96, 97, (n, k), device="cuda", dtype=torch.int8)
                    xs = torch.rand(m, device="cuda") * 1e-2 + 1e-3
                else:
                    q = x.clamp(-448, 448).to(torch.float8_e4m3fn)
                    dense = (w * 8).clamp(-448, 448).to(torch.float8_e4m3fn)
                    xs = torch.tensor([0.01], device="cuda")
                per_token = act_int8
                rs = torch.rand(n, device="cuda") * 1e-2 + 1e-3
                packed = torch.empty((n, k // 2), dtype=torch.uint8, device="cuda")
                counters = torch.zeros(1, dtype=torch.int32, device="cuda")
                lut = tw.lut_for(q.device, act_int8)

                def gemm(tma, cfg=None):
                    return tw.w4a8_gemm(q, xs, packed, packed, rs, counters, lut, n, act_int8,
                                        per_token, None, torch.bfloat16, dense=dense,
                                        prefill_row_scale=rs if row_ref else None, tma=tma,
                                        tma_config=cfg)

                ref = gemm(False).float()
                scale = ref.abs().max().item()
                base = {"n": n, "k": k, "m": m, "mode": mode}

                def report(name, fn, err):
                    print(json.dumps({**base, "variant": name, "us": round(timer.time_us(fn), 1),
                                      "rel_err_vs_backend": err}), flush=True)

                report("pointer-load kernel (_w4a8_gemm)", lambda: gemm(False), 0.0)
                xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
                report("cuBLAS BF16", lambda: xb @ wb.t(), None)
                if act_int8:
                    report("torch._int_mm", lambda: torch._int_mm(q, dense.t()), None)
                else:
                    one = torch.ones(1, device="cuda")
                    report("_scaled_mm per-tensor", lambda: torch._scaled_mm(
                        q, dense.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), None)
                    sa = xs.reshape(1, 1).expand(m, 1).contiguous()
                    sb = rs.reshape(1, n)
                    report("_scaled_mm row-wise", lambda: torch._scaled_mm(
                        q, dense.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16), None)
                for cfg in CONFIGS[mode]:
                    print(json.dumps({**base, "variant": str(cfg), "status": "start"}),
                          file=sys.stderr, flush=True)
                    try:
                        out = gemm(True, cfg)
                        torch.cuda.synchronize()
                        err = ((out.float() - ref).abs().max() / scale).item()
                    except Exception as e:  # a config this Triton cannot build: say so, go on
                        print(json.dumps({**base, "variant": str(cfg),
                                          "error": repr(e)[:300]}), flush=True)
                        traceback.print_exc(limit=2)
                        continue
                    report(f"TMA {cfg}", lambda cfg=cfg: gemm(True, cfg), err)


if __name__ == "__main__":
    main()
