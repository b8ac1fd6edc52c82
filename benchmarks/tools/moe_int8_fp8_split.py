"""Experiment (docs/int8_kernel.md): the INT8 MoE layer's Triton path with its int8 activations
as two exact E4M3 planes on the FP8 repacking of the same experts (`moe_forward(...,
x_split=True)`: FP8's cheaper decode, twice the MMAs), against the INT8 layer as it runs today.

Whole layer, L2 flushed, `bench_linear.Timer`, `--repeat` samples round robin, at token counts
where the INT8 layer takes the Triton path (`--tokens`). The static scales are the INT8
layer's own calibrated ones. The outputs' relative difference is printed.

    python benchmarks/tools/moe_int8_fp8_split.py [--repeat 3] > benchmarks/results/moe_int8_fp8_split.jsonl
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
from bench_moe import FP8, INT8, MODELS, S, make_moe_weights, our_layer, routing  # noqa: E402

from w4a8_backend.formats import ActivationScheme  # noqa: E402
from w4a8_backend.kernels import _sm90_moe_triton as mt  # noqa: E402

SCHEMES = {"INT8 static": ActivationScheme.STATIC_PER_TENSOR,
           "INT8 per-token": ActivationScheme.DYNAMIC_PER_TOKEN}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tokens", default="16,64")
    ap.add_argument("--models", default=",".join(sorted(MODELS)))
    args = ap.parse_args()
    print_tool_header()
    timer = Timer()
    for model in args.models.split(","):
        m = MODELS[model]
        weights = make_moe_weights(m, seed=11)
        x_cal = torch.randn(64, m["hidden"], device="cuda").to(torch.bfloat16)
        kern8, layer8 = our_layer(weights, m, FP8, S, x_cal, routing(64, m, 3))  # repacking
        w13, w2 = tuple(kern8._weights(layer8, "w13")), tuple(kern8._weights(layer8, "w2"))
        e, h, i, ip, hp = kern8.dims
        for label, scheme in SCHEMES.items():
            kern, layer = our_layer(weights, m, INT8, scheme, x_cal, routing(64, m, 3))
            static = scheme == ActivationScheme.STATIC_PER_TENSOR
            s1 = layer.w13_input_scale.float().reshape(1) if static else None
            s2 = layer.w2_input_scale.float().reshape(1) if static else None
            for t in (int(v) for v in args.tokens.split(",")):
                x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
                tw, ti = routing(t, m, 100 + t)
                calls = {
                    "int8": lambda: kern.apply(layer, x, tw, ti, None, False),
                    "split": lambda: mt.moe_forward(x, tw, ti, None, w13, w2, s1, s2, e, h, i,
                                                    ip, hp, False, int(scheme), int(scheme),
                                                    torch.bfloat16, False, x_split=True),
                }
                on = {"fn": None}
                outs, samples, medians = round_robin(
                    timer, lambda: on["fn"](),
                    {name: lambda f=f: on.update(fn=f) for name, f in calls.items()},
                    args.repeat)
                a, b = outs["int8"].float(), outs["split"].float()
                print(json.dumps({"model": model, "scheme": label, "T": t, **medians,
                                  "rel_diff": ((a - b).norm() / a.norm()).item(),
                                  "samples": samples}), flush=True)


if __name__ == "__main__":
    main()
