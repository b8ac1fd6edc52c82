"""Which of the MoE layer's two activation quantizations makes a dynamic scheme slower than a
static one at decode sizes: the layer input's (x, before GEMM1) or the intermediate's (h,
between the GEMMs). Same-run A/B of the four (x, h) scheme pairs of each activation type
(static / dynamic per tensor for FP8, static / dynamic per token for INT8), bench_moe's layers,
routing and timer (L2 flushed), round robin, ``--repeat`` samples each, medians.

    python benchmarks/tools/moe_scheme_split.py [--tokens 1,2,4,8] [--repeat 3] > out.jsonl
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
from bench_moe import FP8, INT8, MODELS, D, P, S, make_moe_weights, our_layer, routing  # noqa: E402

PAIRS = {FP8: ((S, S), (D, S), (S, D), (D, D)), INT8: ((S, S), (P, S), (S, P), (P, P))}


def label(act, x_scheme, h_scheme) -> str:
    short = {S: "static", D: "dyn-tensor", P: "per-token"}
    return f"{'FP8' if act == FP8 else 'INT8'} x {short[x_scheme]}, h {short[h_scheme]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", default="1,2,4,8")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print_tool_header()
    timer = Timer()
    for name, m in MODELS.items():
        weights = make_moe_weights(m, seed=len(name))
        x_cal = torch.randn(64, m["hidden"], device="cuda").to(torch.bfloat16)
        r_cal = routing(64, m, 1)
        layers = {label(act, xs, hs): our_layer(weights, m, act, xs, x_cal, r_cal, hs)
                  for act, pairs in PAIRS.items() for xs, hs in pairs}
        for t in (int(v) for v in args.tokens.split(",")):
            x = torch.randn(t, m["hidden"], device="cuda").to(torch.bfloat16)
            tw, ti = routing(t, m, 100 + t)
            samples = {k: [] for k in layers}
            for _ in range(args.repeat):
                for k, (kern, layer) in layers.items():
                    samples[k].append(round(timer.time_us(
                        lambda: kern.apply(layer, x, tw, ti, None, False)), 2))
            print(json.dumps({"model": name, "T": t,
                              **{k: statistics.median(v) for k, v in samples.items()},
                              "samples": samples}), flush=True)


if __name__ == "__main__":
    main()
