"""Where the MoE layer's time goes, kernel by kernel, for each activation scheme: torch.profiler
over CUDA-graph replays of the whole layer (bench_moe's layers and routing), the L2 flushed
before each call as in bench_moe (the flush kernel is left out of the sums).

One JSON line per (model, scheme, tokens): the layer's time (``Timer.time_us``), each kernel's
mean duration per call (kernels overlapped by PDL each count their whole duration, so the sum
can exceed the layer's time) and the kernel count per call.

    python benchmarks/tools/moe_profile.py [--tokens 1,2,4,8] [--replays 20]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_linear import Timer, print_tool_header  # noqa: E402
from bench_moe import MODELS, OURS, make_moe_weights, our_layer, routing  # noqa: E402

FLUSH = "vectorized_elementwise_kernel"  # the flush buffer's zero_()


def profile(timer: Timer, fn, replays: int) -> tuple[dict, int]:
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        timer.flush_buf.zero_()
        fn()
    g.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    per_kernel, count = defaultdict(float), 0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and FLUSH not in ev.name:
            name = ev.name.replace("void ", "").replace("(anonymous namespace)::", "")
            per_kernel[name[:80]] += ev.device_time / replays
            count += 1
    return {k: round(v, 2) for k, v in sorted(per_kernel.items(), key=lambda kv: -kv[1])}, \
        round(count / replays, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", default="1,2,4,8")
    ap.add_argument("--replays", type=int, default=20)
    args = ap.parse_args()
    print_tool_header()
    timer = Timer()
    for name, m in MODELS.items():
        weights = make_moe_weights(m, seed=len(name))
        x_cal = torch.randn(64, m["hidden"], device="cuda").to(torch.bfloat16)
        layers = {label: our_layer(weights, m, act, scheme, x_cal, routing(64, m, 1))
                  for label, (act, scheme) in OURS.items()}
        for t in (int(v) for v in args.tokens.split(",")):
            x = torch.randn(t, m["hidden"], device="cuda").to(torch.bfloat16)
            tw, ti = routing(t, m, 100 + t)
            for label, (kern, layer) in layers.items():
                fn = lambda: kern.apply(layer, x, tw, ti, None, False)  # noqa: E731
                kernels, count = profile(timer, fn, args.replays)
                print(json.dumps({"model": name, "variant": label, "T": t,
                                  "layer_us": round(timer.time_us(fn), 2),
                                  "kernels_per_call": count, "kernel_us": kernels}), flush=True)


if __name__ == "__main__":
    main()
