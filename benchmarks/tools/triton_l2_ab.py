"""Same-run A/B of the L2 evict_first policy on the Triton kernels' weight copies (restored in
the PTX by ``kernels/_triton_l2.py``; the defaults: ``triton_w4a8.weight_eviction``,
``_sm90_moe_triton.EVICT_FIRST``), forced off and on.

Both settings in one process (the policy is a constexpr of the GEMMs, so each gets its own
compiled kernel), round robin, `--repeat` samples each, ``bench_linear.Timer`` (L2 flushed by
zeroing 256 MB, so every call starts with dirty lines), outputs checked bit-identical:

- the dense op on the Triton GEMM (FP8 M >= 16, INT8 M >= 32; the policy applies where the grid
  has one row block, ``m_blocks`` in the output), also timed as a decode step
  (``Timer.time_sequence_us``: distinct layers back to back, no flush) at 8192 x 8192;
- the MoE layer on the Triton grouped kernels (forced at 4 and 8 tokens), both models.

    python benchmarks/tools/triton_l2_ab.py [--repeat 3] > out.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton

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
    round_robin,
    sequence_layers,
)
from bench_moe import MODELS, OURS, make_moe_weights, our_layer, routing, triton_path  # noqa: E402

from w4a8_backend.kernels import _sm90_moe_triton as mk  # noqa: E402
from w4a8_backend.kernels import triton_w4a8 as tk  # noqa: E402

DENSE = ((8192, 8192), (4096, 4096), (28672, 4096), (4096, 14336))
DENSE_M = {"FP8": (16, 32, 64, 128), "INT8": (32, 64, 128)}
MOE_T = (4, 8, 16, 64, 128, 512, 4096)
MOE_SCHEMES = ("ours FP8 static", "ours INT8 per-token")


RULES = (tk.weight_eviction, mk.weight_eviction)


def variants() -> dict:
    """The policy off everywhere, and on wherever one program reads each weight tile (the
    dense grids of one row block, every MoE GEMM): the mechanism, not the default rules."""
    def policy(on):
        def switch():
            tk.weight_eviction = (lambda m, m_blocks, *_: "evict_first"
                                  if on and m_blocks == 1 else "")
            mk.weight_eviction = lambda *_: "evict_first" if on else ""
        return switch
    return {"plain": policy(False), "evict_first": policy(True)}


def report(head: dict, outs: dict, samples: dict, medians: dict) -> None:
    a, b = outs["plain"], outs["evict_first"]
    print(json.dumps({**head, "bit_identical": torch.equal(a, b),
                      **{k: round(v, 2) for k, v in medians.items()},
                      "ratio": round(medians["plain"] / medians["evict_first"], 3),
                      "samples": samples}), flush=True)


def sequence(timer: Timer, n: int, k: int, act, m: int, repeat: int) -> dict:
    """Median µs per call of distinct layers back to back, each setting, round robin."""
    layers = []
    for i in range(sequence_layers(n, k)):
        packed, scale = make_weight(n, k, seed=1000 + i)
        x_cal = torch.randn(64, k, device="cuda").to(torch.bfloat16)
        layers.append(our_kernel(packed, scale, act, S_STATIC, x_cal))
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    fns = [lambda kern=kern, layer=layer: kern.apply(layer, x, None) for kern, layer in layers]
    samples: dict[str, list] = {}
    for _ in range(repeat):
        for name, switch in variants().items():
            switch()
            samples.setdefault(name, []).append(round(timer.time_sequence_us(fns), 2))
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-moe", action="store_true")
    ap.add_argument("--no-dense", action="store_true")
    args = ap.parse_args()
    print_tool_header(hook_installed=tk.WEIGHT_EVICT_FIRST, moe_default=mk.EVICT_FIRST)
    timer = Timer()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    try:
        if not args.no_dense:
            for n, k in DENSE:
                packed, scale = make_weight(n, k, seed=n + k)
                x_cal = torch.randn(64, k, device="cuda").to(torch.bfloat16)
                for act_name, act in (("FP8", FP8), ("INT8", INT8)):
                    kern, layer = our_kernel(packed, scale, act, S_STATIC, x_cal)
                    for m in DENSE_M[act_name]:
                        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                        bm = tk.pick_config(m, packed.shape[0], packed.shape[1] * 2,
                                            act == INT8, sms)[1]
                        res = round_robin(timer, lambda: kern.apply(layer, x, None),
                                          variants(), args.repeat)
                        report({"N": n, "K": k, "M": m, "act": act_name,
                                "m_blocks": triton.cdiv(m, bm)}, *res)
            for m in (16, 64):
                s = sequence(timer, 8192, 8192, FP8, m, args.repeat)
                med = {k: statistics.median(v) for k, v in s.items()}
                print(json.dumps({"N": 8192, "K": 8192, "M": m, "act": "FP8",
                                  "timing": "sequence", **med,
                                  "ratio": round(med["plain"] / med["evict_first"], 3),
                                  "samples": s}), flush=True)
        if not args.no_moe:
            for name, m in MODELS.items():
                weights = make_moe_weights(m, seed=len(name))
                x_cal = torch.randn(64, m["hidden"], device="cuda").to(torch.bfloat16)
                layers = {lab: our_layer(weights, m, *OURS[lab], x_cal, routing(64, m, 1))
                          for lab in MOE_SCHEMES}
                for t in MOE_T:
                    x = torch.randn(t, m["hidden"], device="cuda").to(torch.bfloat16)
                    tw, ti = routing(t, m, 100 + t)
                    for lab, (kern, layer) in layers.items():
                        res = round_robin(
                            timer, lambda kern=kern, layer=layer:
                            triton_path(kern, layer, x, tw, ti),
                            variants(), args.repeat)
                        report({"moe": name, "T": t, "scheme": lab}, *res)
    finally:
        tk.weight_eviction, mk.weight_eviction = RULES


if __name__ == "__main__":
    main()
