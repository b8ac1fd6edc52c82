"""Where a decode-size MoE layer on the Triton grouped kernels spends its time, and which tile
configs of each GEMM would serve it better (one same-run table per point).

For each model shape of `bench_moe.py`, FP8 and INT8 with static scales, and token counts
4 / 16 / 64 (the Triton path; at 4 tokens the default may be the CUDA decode path, this tool
always times Triton):

- `kernels`: each launch's time, from `torch.profiler` over 20 calls, each after an L2 flush
  (no CUDA graph, so the launch gaps are not in these numbers);
- `default`: the whole layer under `bench_linear.Timer` (CUDA graphs, L2 flushed) at
  `pick_config`'s choice (with `--repeat N`: every variant timed N times round robin, median);
- `gemm1 <cfg>` / `gemm2 <cfg>`: the same with one GEMM's (BN, BM, warps, stages) replaced;
- `gemm2 promote <n>` (FP8): the same with GEMM2's FP8 partial sums promoted every n products
  (32, 128) instead of never; `gemm1 promote <n>`: GEMM1's every n (64, 128) instead of 32
  (accuracy: the GPU tests decide, this only times it).

    python benchmarks/tools/moe_tiles.py [--models qwen3-30b-a3b] [--tokens 4,16] [--acts fp8] \\
        > benchmarks/results/moe_tiles.jsonl

The first line is the device, date and command; then one JSON line per point.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_linear import Timer, print_tool_header  # noqa: E402
from bench_moe import FP8, INT8, MODELS, S, make_moe_weights, our_layer, routing  # noqa: E402

from w4a8_backend.kernels import _sm90_moe_triton as mk  # noqa: E402

TOKENS = (4, 16, 64)
CONFIGS = [(32, 16, 4, 2), (32, 16, 4, 3), (64, 16, 4, 2), (64, 16, 4, 4), (64, 16, 8, 2),
           (64, 16, 8, 3), (128, 16, 4, 2), (128, 16, 8, 2), (128, 16, 8, 3), (64, 32, 4, 3)]


def call(kern, layer, x, tw, ti, cfg1=None, cfg2=None):
    c = kern.config
    static = c.w13_scheme == S
    s1 = layer.w13_input_scale.float().reshape(1) if static else None
    s2 = layer.w2_input_scale.float().reshape(1) if static else None
    w13, w2 = tuple(kern._weights(layer, "w13")), tuple(kern._weights(layer, "w2"))
    return lambda: mk.moe_forward(
        x, tw, ti, None, w13, w2, s1, s2, *kern.dims, c.act_dtype == INT8, int(c.w13_scheme),
        int(c.w2_scheme), torch.bfloat16, False, config1=cfg1, config2=cfg2)


def kernel_times(fn, flush, n=20):
    """Mean time of each launch of one call (by position), name -> us."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    evs.sort(key=lambda e: e.time_range.start)
    per_call, cur = [], []
    for e in evs:  # the flush (a fill kernel) starts each call
        if "FillFunctor" in e.name:
            if cur:
                per_call.append(cur)
            cur = []
        else:
            cur.append((e.name, e.time_range.elapsed_us()))
    if cur:
        per_call.append(cur)
    out = {}
    for pos in range(len(per_call[0])):
        name = per_call[0][pos][0].split("(")[0][:40]
        vals = [c[pos][1] for c in per_call if len(c) > pos]
        out[f"{pos}:{name}"] = round(sum(vals) / len(vals), 2)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--acts", default="fp8,int8")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time every variant this many times, round robin; report the median")
    ap.add_argument("--no-configs", dest="configs", action="store_false",
                    help="skip the tile config variants")
    args = ap.parse_args(argv)
    timer = Timer()
    print_tool_header()
    for name in args.models.split(","):
        m = MODELS[name]
        weights = make_moe_weights(m, seed=len(name))
        x_cal = torch.randn(64, m["hidden"], device="cuda").to(torch.bfloat16)
        for act in [{"fp8": FP8, "int8": INT8}[a] for a in args.acts.split(",")]:
            kern, layer = our_layer(weights, m, act, S, x_cal, routing(64, m, 1))
            for t in map(int, args.tokens.split(",")):
                x = torch.randn(t, m["hidden"], device="cuda").to(torch.bfloat16)
                tw, ti = routing(t, m, 100 + t)
                p, e = t * m["top_k"], m["experts"]
                res = {"model": name, "act": act.name, "T": t,
                       "pick": mk.pick_config(t, p, e, act == INT8),
                       "kernels": kernel_times(call(kern, layer, x, tw, ti), timer.flush_buf)}
                variants = {"default": ({}, None)}
                for cfg in CONFIGS if args.configs else ():
                    variants[f"gemm1 {cfg}"] = ({"cfg1": cfg}, None)
                    variants[f"gemm2 {cfg}"] = ({"cfg2": cfg}, None)
                base = mk.fp8_promote
                if act == FP8:
                    for n in (32, 128):  # GEMM2 (default: no promotion)
                        variants[f"gemm2 promote {n}"] = (
                            {}, lambda bm, req, n=n: base(bm, req) if req else n)
                    for n in (64, 128):  # GEMM1 (default: 32 at decode sizes)
                        variants[f"gemm1 promote {n}"] = (
                            {}, lambda bm, req, n=n: n if req else base(bm, req))
                times = {label: [] for label in variants}
                for _ in range(args.repeat):  # round robin: drifts hit every variant alike
                    for label, (kw, promote) in variants.items():
                        mk.fp8_promote = promote or base
                        try:
                            times[label].append(timer.time_us(
                                call(kern, layer, x, tw, ti, **kw)))
                        except Exception as exc:  # e.g. out of shared memory
                            times[label].append(f"ERR {type(exc).__name__}")
                        finally:
                            mk.fp8_promote = base
                for label, ts in times.items():
                    ok = sorted(v for v in ts if isinstance(v, float))
                    res[label] = round(ok[len(ok) // 2], 2) if ok else ts[0]
                print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
