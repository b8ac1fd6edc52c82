"""Same-run A/B of the FP8 Triton MoE GEMMs' K step (`_sm90_moe_triton.BK_FP8`, GEMM1 and
GEMM2; INT8 needs 256, one reference tile per step): 256 (the default) against 128, which
gives the short K loops (GEMM2 at Qwen3-30B-A3B's K = 768: 3 steps) more steps to pipeline.

Whole layer (`kern.apply`), L2 flushed, `bench_linear.Timer`, `--repeat` samples per variant
taken round robin, at token counts where the layer takes the Triton path (`--tokens`); the
largest relative difference between the variants' outputs is printed (a different K step
changes the order of the sums).

    python benchmarks/tools/moe_bk.py [--repeat 3] [--tokens 16,64] > benchmarks/results/moe_bk.jsonl
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

from bench_linear import Timer, print_tool_header  # noqa: E402
from bench_moe import MODELS, OURS, make_moe_weights, our_layer, routing  # noqa: E402

from w4a8_backend.kernels import _sm90_moe_triton as mt  # noqa: E402

VARIANTS = {"256/256": (256, 256), "256/128": (256, 128), "128/128": (128, 128)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tokens", default="16,64")
    ap.add_argument("--models", default=",".join(sorted(MODELS)))
    ap.add_argument("--schemes", default="ours FP8 static,ours FP8 dyn-tensor")
    args = ap.parse_args()
    print_tool_header()
    timer = Timer()
    saved = mt.BK_FP8
    try:
        for model in args.models.split(","):
            m = MODELS[model]
            weights = make_moe_weights(m, seed=11)
            x_cal = torch.randn(64, m["hidden"], device="cuda").to(torch.bfloat16)
            for label in args.schemes.split(","):
                act, scheme = OURS[label]
                kern, layer = our_layer(weights, m, act, scheme, x_cal, routing(64, m, 3))
                for t in (int(v) for v in args.tokens.split(",")):
                    x = torch.randn(t, m["hidden"], device="cuda").to(torch.bfloat16)
                    tw, ti = routing(t, m, 100 + t)
                    fn = lambda: kern.apply(layer, x, tw, ti, None, False)  # noqa: E731
                    outs, samples = {}, {}
                    for _ in range(args.repeat):
                        for name, bk in VARIANTS.items():
                            mt.BK_FP8 = bk
                            outs[name] = fn()
                            samples.setdefault(name, []).append(round(timer.time_us(fn), 2))
                    first = next(iter(outs.values())).float()
                    diff = max(((o.float() - first).norm() / first.norm()).item()
                               for o in outs.values())
                    print(json.dumps({"model": model, "scheme": label, "T": t,
                                      **{n: statistics.median(v) for n, v in samples.items()},
                                      "max_rel_diff": diff, "samples": samples}), flush=True)
    finally:
        mt.BK_FP8 = saved


if __name__ == "__main__":
    main()
