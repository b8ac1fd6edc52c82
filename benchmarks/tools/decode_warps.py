"""Same-run timing of the dense CUDA decode op at 4 and 8 warps per CTA (`cuda_decode_config`).

For each shape, activation type and M the whole op (quantization + GEMM) is timed with the
CUDA decode GEMM forced to each config of CONFIGS, round robin, `--repeat` samples each, under
`bench_linear.Timer` in both of its modes: one layer with the L2 flushed before each call
(`flush`, bench_linear's default) and `sequence_layers` distinct layers back to back (`sequence`,
a decode step). Each line also names the config `cuda_decode_config` picks for the shape.

    python benchmarks/tools/decode_warps.py [--repeat 3] > benchmarks/results/decode_warps.jsonl

The first line is the device, date and command; then one JSON line per (shape, act, M) with
every sample and the medians.
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

from w4a8_backend.kernels import sm90_triton  # noqa: E402

CONFIGS = ((4, 2), (8, 2))
SHAPES = ((4096, 4096), (4096, 14336), (6144, 4096), (8192, 8192))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ms", default="1,4,16")
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print_tool_header(sms=sms)
    timer = Timer()
    rule = sm90_triton.cuda_decode_config
    for n, k in SHAPES:
        n_layers = sequence_layers(n, k)
        x_cal = torch.randn(64, k, device="cuda").to(torch.bfloat16)
        for act in (FP8, INT8):
            layers = []
            for i in range(n_layers):
                packed, scale = make_weight(n, k, seed=n + k + i)
                layers.append(our_kernel(packed, scale, act, S_STATIC, x_cal))
            kern0, layer0 = layers[0]
            picked = rule(layer0.weight.shape[0], sms)
            for m in (int(v) for v in args.ms.split(",")):
                if m > sm90_triton.cuda_decode_max_m(act == INT8):
                    continue
                x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                samples: dict[str, list[float]] = {}
                try:
                    for _ in range(args.repeat):
                        for cfg in CONFIGS:
                            sm90_triton.cuda_decode_config = lambda n_pad, s, cfg=cfg: cfg
                            samples.setdefault(f"flush {cfg}", []).append(round(timer.time_us(
                                lambda: kern0.apply(layer0, x, None)), 2))
                            samples.setdefault(f"sequence {cfg}", []).append(round(
                                timer.time_sequence_us([
                                    lambda kern=kern, layer=layer: kern.apply(layer, x, None)
                                    for kern, layer in layers]), 2))
                finally:
                    sm90_triton.cuda_decode_config = rule
                res = {"N": n, "K": k, "M": m, "act": act.name, "layers": n_layers,
                       "rule_picks": list(picked)}
                res.update({key: statistics.median(v) for key, v in samples.items()})
                res["samples"] = samples
                print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
