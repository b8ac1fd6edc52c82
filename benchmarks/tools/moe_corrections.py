"""What the out-of-range blocks cost the MoE CUDA decode path: the layer and each launch alone
(quantize x, GEMM1, GEMM2; ``bench_moe.cuda_parts``), FP8 static, INT8 static and INT8 per
token, Qwen3-30B-A3B and gpt-oss-20b shapes at 1 and 4 tokens, each measured with the layer's
blocks and again with them switched off (every row's CSR range emptied, so the epilogues skip
them; the output is then wrong by those blocks, which is the point: the difference is their
cost). Weights and routing as in ``bench_moe.py``; ``corr_blocks`` is how many blocks each
matrix of the layer has (the FP8 windows leave none on these weights).

Found with it on an H100 (2026-11-25): INT8 GEMM2 at Qwen3 one token took 9.7 us, 7.9 us with
its blocks off: their CSR bounds and values were loaded in the epilogue, two dependent memory
latencies at the end of each CTA with a block. GEMM2 now stages them during its main loop
(``kStagedCorr`` in csrc/w4a8_decode_gemm.cu; docs/moe_kernels.md).

On the GPU machine: ``python benchmarks/tools/moe_corrections.py > out.jsonl``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import bench_moe as bm  # noqa: E402
from bench_linear import Timer, run_metadata  # noqa: E402

VARIANTS = ("ours FP8 static", "ours INT8 static", "ours INT8 per-token")


def main():
    print(json.dumps({"meta": run_metadata()}), flush=True)
    timer = Timer()
    for name, m in bm.MODELS.items():
        weights = bm.make_moe_weights(m, seed=len(name))
        x_cal = torch.randn(64, m["hidden"], device="cuda").to(torch.bfloat16)
        for label in VARIANTS:
            kern, layer = bm.our_layer(weights, m, *bm.OURS[label], x_cal, bm.routing(64, m, 1))
            corr = {n: getattr(layer, f"w4a8_{n}_corr") for n in ("w13", "w2")}
            blocks = {n: int(c[2].numel()) for n, c in corr.items()}
            for t in (1, 4):
                x = torch.randn(t, m["hidden"], device="cuda").to(torch.bfloat16)
                tw, ti = bm.routing(t, m, 100 + t)
                res = {"model": name, "variant": label, "T": t, "corr_blocks": blocks}

                def layer_us():
                    return round(timer.time_us(
                        lambda: kern.apply(layer, x, tw, ti, None, False)), 2)

                res["layer"] = layer_us()
                res.update(bm.cuda_parts(timer, kern, layer, x, tw, ti))
                row_ptrs = {n: c[4] for n, c in corr.items()}
                for c in corr.values():
                    c[4] = torch.zeros_like(c[4])
                try:
                    res["layer_nocorr"] = layer_us()
                    parts = bm.cuda_parts(timer, kern, layer, x, tw, ti)
                    res.update({k + "_nocorr": v for k, v in parts.items()
                                if k.startswith("gemm")})
                finally:
                    for n, c in corr.items():
                        c[4] = row_ptrs[n]
                print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
