"""The INT8 MoE layer's Triton path with and without the split path (docs/int8_kernel.md):
int8 activations as two exact E4M3 planes on E4M3 weights derived from the INT8 tile codes
(``moe_forward(..., int8_split=True)``, the default for INT8 layers loaded on sm_90) against
the per-tile INT8 GEMMs (``int8_split=False``), same layer, same run.

Whole layer on the Triton path (also at token counts where the layer would take the CUDA
decode kernels; `--max-bm` lets the split path take larger tiles than it does by default), L2 flushed, `bench_linear.Timer`, `--repeat` samples round robin. The static
scales are the INT8 layer's own calibrated ones. The outputs' relative difference is printed.

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
from bench_moe import INT8, MODELS, make_moe_weights, our_layer, routing  # noqa: E402

from w4a8_backend.formats import ActivationScheme  # noqa: E402
from w4a8_backend.kernels import _sm90_moe_triton as mt  # noqa: E402

SCHEMES = {"INT8 static": ActivationScheme.STATIC_PER_TENSOR,
           "INT8 per-token": ActivationScheme.DYNAMIC_PER_TOKEN}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tokens", default="1,4,8,16,64")
    ap.add_argument("--models", default=",".join(sorted(MODELS)))
    ap.add_argument("--max-bm", type=int, default=mt.INT8_SPLIT_MAX_BM,
                    help="INT8_SPLIT_MAX_BM for this run (the split path's largest tile)")
    args = ap.parse_args()
    mt.INT8_SPLIT_MAX_BM = args.max_bm
    print_tool_header()
    timer = Timer()
    for model in args.models.split(","):
        m = MODELS[model]
        weights = make_moe_weights(m, seed=11)
        x_cal = torch.randn(64, m["hidden"], device="cuda").to(torch.bfloat16)
        for label, scheme in SCHEMES.items():
            kern, layer = our_layer(weights, m, INT8, scheme, x_cal, routing(64, m, 3))
            w13, w2 = tuple(kern._weights(layer, "w13")), tuple(kern._weights(layer, "w2"))
            assert len(w13) > 8, "the INT8 layer has no split path (not sm_90?)"
            e, h, i, ip, hp = kern.dims
            static = scheme == ActivationScheme.STATIC_PER_TENSOR
            s1 = layer.w13_input_scale.float().reshape(1) if static else None
            s2 = layer.w2_input_scale.float().reshape(1) if static else None
            for t in (int(v) for v in args.tokens.split(",")):
                x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
                tw, ti = routing(t, m, 100 + t)

                def run(split, x=x, tw=tw, ti=ti):
                    return mt.moe_forward(x, tw, ti, None, w13, w2, s1, s2, e, h, i, ip, hp,
                                          True, int(scheme), int(scheme), torch.bfloat16, False,
                                          int8_split=split)

                calls = {"int8": lambda: run(False), "split": lambda: run(True)}
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
