"""Same-run A/B of the dense prefill path's launches: the activation quantization and the
weight materialization as two launches or one (``triton_w4a8.PREFILL_FUSED_PREPARE``).
(The run of 2026-11-25 12:36 UTC, prefill_prepare_h100_20261125_1236.jsonl, also timed the
dense GEMM after the one launch with PDL, released at the start of each program or after its
stores; that option was dropped, see PREFILL_FUSED_PREPARE.)

Whole op (`kern.apply`), `bench_linear.make_weight` layers, L2 flushed, `bench_linear.Timer`,
`--repeat` samples per variant round robin; the outputs are checked to be bit-identical.

    python benchmarks/tools/prefill_prepare.py [--repeat 3] > benchmarks/results/prefill_prepare.jsonl
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
    INT8,
    S_STATIC,
    S_TOKEN,
    Timer,
    make_weight,
    our_kernel,
    print_tool_header,
    round_robin,
)

from w4a8_backend.kernels import triton_w4a8 as tk  # noqa: E402

VARIANTS = {"two launches": False, "one launch": True}  # -> PREFILL_FUSED_PREPARE
CASES = (  # (N, K, M, act, scheme)
    (8192, 8192, 4096, FP8, S_STATIC), (8192, 8192, 4096, FP8, S_TOKEN),
    (8192, 8192, 4096, INT8, S_STATIC), (8192, 8192, 512, FP8, S_STATIC),
    (8192, 8192, 512, INT8, S_STATIC), (28672, 4096, 4096, FP8, S_STATIC),
    (4096, 14336, 4096, FP8, S_STATIC), (4096, 4096, 512, FP8, S_STATIC),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print_tool_header()
    timer = Timer()
    saved = tk.PREFILL_FUSED_PREPARE

    def switch(fused):
        tk.PREFILL_FUSED_PREPARE = fused

    try:
        for n, k, m, act, scheme in CASES:
            packed, scale = make_weight(n, k, seed=n + k)
            x_cal = torch.randn(64, k, device="cuda").to(torch.bfloat16)
            kern, layer = our_kernel(packed, scale, act, scheme, x_cal)
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            outs, samples, medians = round_robin(
                timer, lambda: kern.apply(layer, x, None),
                {name: lambda s=s: switch(s) for name, s in VARIANTS.items()}, args.repeat)
            first = next(iter(outs.values()))
            print(json.dumps({
                "N": n, "K": k, "M": m, "act": act.name, "scheme": scheme.name, **medians,
                "bit_identical": all(torch.equal(first, o) for o in outs.values()),
                "samples": samples}), flush=True)
    finally:
        switch(saved)


if __name__ == "__main__":
    main()
