"""Same-run A/B of the CUDA path's dynamic per-tensor amax: one CTA takes the amax of inputs up
to ``sm90_triton.ONE_CTA_AMAX_MAX`` elements itself, larger ones go to the cooperative grid
kernel. The limit was set on dense shapes (K = 4096 / 8192, 2026-11-23); the MoE decode path
quantizes inputs of T x 2048 (Qwen3-30B-A3B) and T x 2880 (gpt-oss-20b) elements.

Round robin over limits, `--repeat` samples each, ``bench_linear.Timer`` (L2 flushed); the
whole MoE layer (FP8 dynamic per tensor, bench_moe's layers) and the dense op (FP8 dynamic per
tensor, decode sizes). Outputs are checked bit-identical across limits.

    python benchmarks/tools/amax_one_cta.py [--repeat 3] > out.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_linear import (  # noqa: E402
    FP8,
    S_TENSOR,
    Timer,
    make_weight,
    our_kernel,
    print_tool_header,
    round_robin,
)
from bench_moe import MODELS, OURS, make_moe_weights, our_layer, routing  # noqa: E402

from w4a8_backend.kernels import sm90_triton  # noqa: E402

LIMITS = (0, 2048, 1 << 13, 1 << 15)
DENSE = ((8192, 8192), (4096, 4096), (28672, 4096), (4096, 14336))


def variants() -> dict:
    def set_limit(v):
        return lambda: setattr(sm90_triton, "ONE_CTA_AMAX_MAX", v)
    return {f"one CTA <= {v}": set_limit(v) for v in LIMITS}


def report(head: dict, outs: dict, samples: dict, medians: dict) -> None:
    ref = next(iter(outs.values()))
    same = all(torch.equal(o.view(torch.uint8) if o.dtype.itemsize == 1 else o, ref)
               for o in outs.values())
    print(json.dumps({**head, "bit_identical": same,
                      **{k: round(v, 2) for k, v in medians.items()}, "samples": samples}),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print_tool_header(default_limit=sm90_triton.ONE_CTA_AMAX_MAX)
    timer = Timer()
    default = sm90_triton.ONE_CTA_AMAX_MAX
    try:
        for name, m in MODELS.items():
            weights = make_moe_weights(m, seed=len(name))
            x_cal = torch.randn(64, m["hidden"], device="cuda").to(torch.bfloat16)
            kern, layer = our_layer(weights, m, *OURS["ours FP8 dyn-tensor"], x_cal,
                                    routing(64, m, 1))
            for t in (1, 2, 4, 8):
                x = torch.randn(t, m["hidden"], device="cuda").to(torch.bfloat16)
                tw, ti = routing(t, m, 100 + t)
                res = round_robin(timer, lambda: kern.apply(layer, x, tw, ti, None, False),
                                  variants(), args.repeat)
                report({"moe": name, "T": t, "elements": t * m["hidden"]}, *res)
        for n, k in DENSE:
            packed, scale = make_weight(n, k, seed=n + k)
            x_cal = torch.randn(64, k, device="cuda").to(torch.bfloat16)
            kern, layer = our_kernel(packed, scale, FP8, S_TENSOR, x_cal)
            for mm in (1, 2, 4):
                x = torch.randn(mm, k, device="cuda").to(torch.bfloat16)
                res = round_robin(timer, lambda: kern.apply(layer, x, None), variants(),
                                  args.repeat)
                report({"N": n, "K": k, "M": mm, "elements": mm * k}, *res)
    finally:
        sm90_triton.ONE_CTA_AMAX_MAX = default


if __name__ == "__main__":
    main()
