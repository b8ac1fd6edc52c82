"""Same-run timing of the dense op's Triton path (M above the CUDA decode kernel's) launched
plainly (`triton_w4a8.PDL` False) and as the backend launches it (`PDL` True: programmatic
dependent launch for FP8 tiles of at least `PDL_MIN_BM` tokens; `pdl, every tile` sets that
bound to 1, so every FP8 tile takes it).

The run of 2026-11-25 04:14 UTC (`benchmarks/results/triton_pdl_h100_20261125_0414.jsonl`) was
taken with an earlier form: PDL for every FP8 and INT8 tile, and a variant whose programs also
prefetched their first 4 K steps' weights into L2 before waiting (slower everywhere, removed).

Each (shape, act, M) is timed for every variant, round robin, `--repeat` samples each, under
`bench_linear.Timer` in both modes: one layer with the L2 flushed before each call (`flush`) and
`sequence_layers` distinct layers back to back (`sequence`, a decode step). Static scales.

    python benchmarks/tools/triton_pdl.py [--repeat 3] > benchmarks/results/triton_pdl.jsonl

The first line is the device, date and command; then one JSON line per point with the medians
and every sample.
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
    FP8,
    INT8,
    S_STATIC,
    Timer,
    make_weight,
    our_kernel,
    print_tool_header,
    sequence_layers,
)

from w4a8_backend.kernels import triton_w4a8 as tk  # noqa: E402

VARIANTS = {"plain": (False, tk.PDL_MIN_BM), "pdl": (True, tk.PDL_MIN_BM),
            "pdl, every tile": (True, 1)}
POINTS = (  # (N, K, act, M)
    (8192, 8192, FP8, 16), (8192, 8192, FP8, 32), (8192, 8192, FP8, 64),
    (8192, 8192, FP8, 128), (8192, 8192, INT8, 32), (8192, 8192, INT8, 64),
    (8192, 8192, INT8, 128), (28672, 4096, FP8, 64), (4096, 14336, FP8, 64),
    (4096, 4096, FP8, 64),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print_tool_header()
    timer = Timer()
    saved = tk.PDL, tk.PDL_MIN_BM
    layers_of: dict = {}
    try:
        for n, k, act, m in POINTS:
            key = (n, k, act)
            if key not in layers_of:
                layers_of.clear()
                x_cal = torch.randn(64, k, device="cuda").to(torch.bfloat16)
                layers_of[key] = [our_kernel(*make_weight(n, k, seed=n + k + i), act, S_STATIC,
                                             x_cal) for i in range(sequence_layers(n, k))]
            layers = layers_of[key]
            kern0, layer0 = layers[0]
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            samples: dict[str, list[float]] = {}
            for _ in range(args.repeat):
                for name, (pdl, min_bm) in VARIANTS.items():
                    tk.PDL, tk.PDL_MIN_BM = pdl, min_bm
                    samples.setdefault(f"flush {name}", []).append(round(timer.time_us(
                        lambda: kern0.apply(layer0, x, None)), 2))
                    samples.setdefault(f"sequence {name}", []).append(round(
                        timer.time_sequence_us([lambda kern=kern, layer=layer: kern.apply(
                            layer, x, None) for kern, layer in layers]), 2))
            res = {"N": n, "K": k, "M": m, "act": act.name, "layers": len(layers)}
            res.update({name: statistics.median(v) for name, v in samples.items()})
            res["samples"] = samples
            print(json.dumps(res), flush=True)
    finally:
        tk.PDL, tk.PDL_MIN_BM = saved


if __name__ == "__main__":
    main()
