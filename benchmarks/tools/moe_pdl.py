"""Same-run A/B of programmatic dependent launch between the Triton MoE path's launches
(`_sm90_moe_triton.PDL`: routing, GEMM1, the intermediate's quantization, GEMM2 and the top-k
sum each let the next launch start early, and wait for the previous one's writes).

Whole layer (`kern.apply`), L2 flushed, `bench_linear.Timer`, `--repeat` samples per variant
taken round robin, at token counts where the layer takes the Triton path (above the CUDA decode
path's; `--tokens`); the output is checked to be bit-identical between the variants.

    python benchmarks/tools/moe_pdl.py [--repeat 3] [--tokens 16,32,64,512] > benchmarks/results/moe_pdl.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_linear import Timer, print_tool_header, round_robin  # noqa: E402
from bench_moe import MODELS, OURS, make_moe_weights, our_layer, routing  # noqa: E402

from w4a8_backend.kernels import _sm90_moe_triton as mt  # noqa: E402

VARIANTS = {"no PDL": False, "PDL": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tokens", default="16,32,64,512")
    ap.add_argument("--models", default=",".join(sorted(MODELS)))
    ap.add_argument("--schemes", default=",".join(OURS))
    args = ap.parse_args()
    print_tool_header()
    timer = Timer()
    saved = mt.PDL
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
                    outs, samples, medians = round_robin(
                        timer, lambda: kern.apply(layer, x, tw, ti, None, False),
                        {name: lambda on=on: setattr(mt, "PDL", on)
                         for name, on in VARIANTS.items()}, args.repeat)
                    first = next(iter(outs.values()))
                    same = all(torch.equal(first, o) for o in outs.values())
                    print(json.dumps({"model": model, "scheme": label, "T": t, **medians,
                                      "bit_identical": same, "samples": samples}), flush=True)
    finally:
        mt.PDL = saved


if __name__ == "__main__":
    main()
