"""Where one decode step of a vLLM engine spends its time: GPU kernels by name against the wall.

Runs the engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that ``torch.profiler``
sees every kernel, CUDA-graph replays included. It profiles ``generate`` with 1 and with
``1 + steps`` new tokens at one batch size; the difference divided by ``steps`` is one decode
step, which removes prefill and the per-request costs. Per step it reports the wall time, the
summed kernel time (the GPU is idle for the rest: host work between graph replays), the
kernels by name, grouped into the plugin's own, attention, other GEMMs and the rest, and the
host events (ops, CUDA runtime calls) by self CPU time: an op of ours listed there ran eagerly,
outside a CUDA graph.

    python benchmarks/tools/profile_step.py --model DIR [--quantization w4a8_mxfp4] \
        [--batch 1] [--steps 32] [--out result.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

GROUPS = (  # first match wins; lower-case substrings of kernel names
    # Inductor names its fused kernels after the ops around them ("..._mxfp4_w4a8_linear_1" is a
    # norm fused next to our op), so they are matched first, by their prefix.
    ("inductor-fused elementwise/norms", ("triton_poi_", "triton_red_", "triton_per_")),
    ("w4a8 (ours)", ("w4a8", "_moe_gemm", "_moe_route", "_moe_reduce",
                     "_quant_act", "::quant_act_kernel", "decode_gemm")),
    ("attention", ("attn", "attention", "flash", "paged", "reshape_and_cache", "rotary")),
    ("gemm (cuBLAS/CUTLASS/Triton)", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "fused_moe")),
)


def group_of(kernel: str) -> str:
    low = kernel.lower()
    for group, needles in GROUPS:
        if any(low.startswith(n) if n.startswith("triton_") else n in low for n in needles):
            return group
    return "other"


def _event_times(prof, device: str) -> dict[str, tuple[int, float]]:
    """Event name -> (count, total self microseconds) on ``device`` ("CUDA": kernels and copies,
    "CPU": host ops and CUDA runtime calls) from a finished profiler."""
    out = {}
    for item in prof.key_averages():
        if item.device_type.name != device:
            continue
        t = item.self_device_time_total if device == "CUDA" else item.self_cpu_time_total
        out[item.key] = (item.count, float(t))
    return out


def _per_step(long: dict, short: dict, steps: int) -> dict[str, tuple[float, float]]:
    """What the long run has beyond the short one, per decode step: name -> (count, us)."""
    out = {}
    for name, (count, us) in long.items():
        c1, t1 = short.get(name, (0, 0.0))
        if count - c1 > 0:
            out[name] = ((count - c1) / steps, (us - t1) / steps)
    return out


def _thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) per thread of this process, keyed "name/tid" (Linux /proc)."""
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[f"{name}/{task.name}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def profile(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(dtype="bfloat16", skip_tokenizer_init=True, enable_prefix_caching=False, seed=0,
                  max_model_len=1024, max_num_seqs=args.batch,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  compilation_config={"cudagraph_capture_sizes": [args.batch]},
                  attention_config={"backend": args.attention_backend})
    if args.quantization:
        kwargs["quantization"] = args.quantization
    llm = LLM(str(args.model), **kwargs)
    gen = torch.Generator().manual_seed(1)
    prompts = [TokensPrompt(prompt_token_ids=row.tolist())
               for row in torch.randint(0, 32000, (args.batch, args.prompt_len), generator=gen)]

    def run(n_tokens: int) -> float:
        params = SamplingParams(max_tokens=n_tokens, min_tokens=n_tokens, ignore_eos=True,
                                temperature=0, detokenize=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(1 + args.steps)  # warm-up
    cpu0, t0 = _thread_cpu(), time.perf_counter()
    measured = {}
    for n in (1, 1 + args.steps):
        walls = [run(n) for _ in range(args.repeats)]  # unprofiled wall, best of repeats
        with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run(n)
        measured[n] = (min(walls), _event_times(prof, "CUDA"), _event_times(prof, "CPU"))
    cpu1, elapsed = _thread_cpu(), time.perf_counter() - t0
    # Threads that were busy while the runs above went on (a spinning one slows the host path).
    threads = sorted(([name, cpu1[name] - cpu0.get(name, 0.0)] for name in cpu1),
                     key=lambda r: -r[1])[:8]
    (w1, k1, h1), (wn, kn, hn) = measured[1], measured[1 + args.steps]
    per_step = _per_step(kn, k1, args.steps)
    host = _per_step(hn, h1, args.steps)
    groups = defaultdict(float)
    for name, (_, us) in per_step.items():
        groups[group_of(name)] += us
    return {
        "command": " ".join(["python3", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": str(args.model), "quantization": args.quantization, "batch": args.batch,
        "steps": args.steps, "device": torch.cuda.get_device_name(0),
        "wall_step_us": (wn - w1) / args.steps * 1e6,
        "kernel_step_us": sum(us for _, us in per_step.values()),
        "groups_us": dict(groups),
        "kernels": sorted(([n, c, us] for n, (c, us) in per_step.items()), key=lambda r: -r[2]),
        "threads_cpu_s": threads, "threads_window_s": elapsed,
        "host": sorted(([n, c, us] for n, (c, us) in host.items()), key=lambda r: -r[2]),
    }


def print_summary(r: dict, top: int) -> None:
    label = r["quantization"] or "bf16"
    wall, busy = r["wall_step_us"], r["kernel_step_us"]
    print(f"== {label} {r['model']} batch {r['batch']} on {r['device']}")
    print(f"step wall {wall:.0f} us; kernels {busy:.0f} us; GPU idle {wall - busy:.0f} us")
    for g, us in sorted(r["groups_us"].items(), key=lambda kv: -kv[1]):
        print(f"  {g:32s} {us:8.1f} us  {100 * us / busy:5.1f} %")
    print(f"busiest threads over {r['threads_window_s']:.1f} s: "
          + ", ".join(f"{n} {s:.1f} s" for n, s in r["threads_cpu_s"]))
    print("| kernel | launches/step | us/step |\n|---|---|---|")
    for name, count, us in r["kernels"][:top]:
        print(f"| {name[:90]} | {count:.1f} | {us:.1f} |")
    print("| host event (self CPU time) | calls/step | us/step |\n|---|---|---|")
    for name, count, us in r["host"][:top]:
        print(f"| {name[:90]} | {count:.1f} | {us:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--quantization", default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--attention-backend", default="TRITON_ATTN")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    result = profile(args)
    print_summary(result, args.top)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
