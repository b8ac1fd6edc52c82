"""Same-run A/B of the dense op's correction launch with and without PDL
(`triton_w4a8.CORRECTION_PDL`: the fused Triton GEMM releases the correction at its start, and
the correction's programs wait for the GEMM's writes).

INT8 layers of `bench_linear.make_weight` (their per-tile windows leave 0.02 % of the blocks to
the correction), static and per-token scales, at M between the CUDA decode kernel and the
prefill path. Whole op (`kern.apply`), L2 flushed, `bench_linear.Timer`, `--repeat` samples per
variant round robin; the outputs are checked to be bit-identical.

    python benchmarks/tools/correction_pdl.py [--repeat 3] > benchmarks/results/correction_pdl.jsonl
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
    INT8,
    S_STATIC,
    S_TOKEN,
    SHAPES_8192,
    SHAPES_LLAMA8B,
    Timer,
    make_weight,
    our_kernel,
    print_tool_header,
    round_robin,
)

from w4a8_backend.kernels import triton_w4a8 as tk  # noqa: E402

MS = (17, 32, 64, 128, 256)
VARIANTS = {"plain": False, "PDL": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print_tool_header()
    timer = Timer()
    saved = tk.CORRECTION_PDL
    try:
        for n, k in SHAPES_8192 + SHAPES_LLAMA8B:
            packed, scale = make_weight(n, k, seed=n + k)
            x_cal = torch.randn(64, k, device="cuda").to(torch.bfloat16)
            for scheme in (S_STATIC, S_TOKEN):
                kern, layer = our_kernel(packed, scale, INT8, scheme, x_cal)
                for m in MS:
                    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                    outs, samples, medians = round_robin(
                        timer, lambda: kern.apply(layer, x, None),
                        {name: lambda on=on: setattr(tk, "CORRECTION_PDL", on)
                         for name, on in VARIANTS.items()}, args.repeat)
                    print(json.dumps({
                        "N": n, "K": k, "M": m, "scheme": scheme.name,
                        "blocks": int(layer.w4a8_corr_blocks.numel()), **medians,
                        "bit_identical": torch.equal(outs["plain"], outs["PDL"]),
                        "samples": samples}), flush=True)
    finally:
        tk.CORRECTION_PDL = saved


if __name__ == "__main__":
    main()
