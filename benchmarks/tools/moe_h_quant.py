"""Same-run A/B of the MoE CUDA decode path's dynamic intermediate quantization:

- `plain launch`: `sm90_triton.cuda_quantize` over GEMM1's float32 h (a per-tensor amax by the
  cooperative grid kernel, per token one CTA per row), launched without PDL;
- `from GEMM1's amaxes`: `_sm90_moe_cuda.H_QUANT_FROM_AMAX`, the scales from GEMM1's per-CTA
  amaxes, launched with PDL after GEMM1;
- `fused in GEMM2` (models whose top-k x intermediate fits `GEMM2_STAGE_MAX`, Qwen3-30B-A3B):
  GEMM2 stages float32 h and quantizes it itself, at every token count (the default there at
  one token only, `FUSE_H_MAX_TOKENS`; it was the default at 1-8 tokens when the 07:06 UTC
  results were taken).

The first two force GEMM2 unstaged (`GEMM2_STAGE_MAX` = 0). Whole layer (`kern.apply`), L2
flushed, `bench_linear.Timer`, `--repeat` samples per variant taken round robin; the layer's
output is checked to be bit-identical between the variants.

    python benchmarks/tools/moe_h_quant.py [--model gpt-oss-20b] [--repeat 3] > benchmarks/results/moe_h_quant.jsonl
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

from w4a8_backend.kernels import _sm90_moe_cuda as mc  # noqa: E402

SCHEMES = ("ours FP8 dyn-tensor", "ours INT8 per-token", "ours FP8 static")
# name -> (GEMM2_STAGE_MAX, H_QUANT_FROM_AMAX, FUSE_H_MAX_TOKENS); None: the default
VARIANTS = {"plain launch": (0, False, None), "from GEMM1's amaxes": (0, True, None),
            "fused in GEMM2": (None, True, 8)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tokens", default="1,2,4")
    ap.add_argument("--model", default="gpt-oss-20b", choices=sorted(MODELS))
    args = ap.parse_args()
    print_tool_header()
    timer = Timer()
    m = MODELS[args.model]
    weights = make_moe_weights(m, seed=11)
    x_cal = torch.randn(64, m["hidden"], device="cuda").to(torch.bfloat16)
    saved = mc.H_QUANT_FROM_AMAX, mc.GEMM2_STAGE_MAX, mc.FUSE_H_MAX_TOKENS
    variants = dict(VARIANTS)
    if not mc.fuse_h_quantization(1, m["top_k"], m["inter"]):
        del variants["fused in GEMM2"]  # the same as "from GEMM1's amaxes" there
    try:
        for label in SCHEMES:
            act, scheme = OURS[label]
            kern, layer = our_layer(weights, m, act, scheme, x_cal, routing(64, m, 3))
            for t in (int(v) for v in args.tokens.split(",")):
                x = torch.randn(t, m["hidden"], device="cuda").to(torch.bfloat16)
                tw, ti = routing(t, m, 100 + t)
                fn = lambda: kern.apply(layer, x, tw, ti, None, False)  # noqa: E731
                outs, samples = {}, {}
                for _ in range(args.repeat):
                    for name, (stage_max, use, fuse_max) in variants.items():
                        mc.H_QUANT_FROM_AMAX = use
                        mc.GEMM2_STAGE_MAX = saved[1] if stage_max is None else stage_max
                        mc.FUSE_H_MAX_TOKENS = saved[2] if fuse_max is None else fuse_max
                        outs[name] = fn()
                        samples.setdefault(name, []).append(round(timer.time_us(fn), 2))
                first = next(iter(outs.values()))
                same = all(torch.equal(first, o) for o in outs.values())
                print(json.dumps({"model": args.model, "scheme": label, "T": t,
                                  **{n: statistics.median(v) for n, v in samples.items()},
                                  "bit_identical": same, "samples": samples}), flush=True)
    finally:
        mc.H_QUANT_FROM_AMAX, mc.GEMM2_STAGE_MAX, mc.FUSE_H_MAX_TOKENS = saved


if __name__ == "__main__":
    main()
