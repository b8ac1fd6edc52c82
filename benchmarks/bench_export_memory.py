"""Peak memory of ``w4a8-quantize`` versus model size: the export streams tensor by tensor.

Builds synthetic bf16 Llama checkpoints whose linears all have the same size (the largest tensor
is one MLP projection) but whose layer count grows, so the model is many times larger than its
largest tensor. Each export runs in a fresh Python process that samples its own RSS
(``/proc/self/status``) every few milliseconds; the peak above the post-import baseline is what
the exporter itself costs. Dynamic mode is the streaming path; one static-calibration run is
shown for contrast (it loads the model once, by design).

Writes ``benchmarks/results/export_memory.md`` and, when matplotlib is installed,
``benchmarks/results/export_memory.png``.

    python benchmarks/bench_export_memory.py                   # defaults (about 4 minutes)
    python benchmarks/bench_export_memory.py --runs 512x2048x2 512x2048x8 --static-run ''
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from machine_info import cpu_model

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MiB = 2**20

# Child process: import everything, note the baseline, export while a thread samples RSS.
CHILD = r"""
import json, sys, threading, time
import torch, safetensors, transformers, tqdm  # the exporter's imports, before the baseline
from w4a8_backend.tools import quantize as wq

def status():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, v = line.split(":", 1)
            fields[k] = v.strip()
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}

def rss():
    s = status()
    return s["VmRSS"], s["VmHWM"]

args = json.loads(sys.argv[1])
torch.set_num_threads(1)
base = status()
baseline = base["VmRSS"]
samples, stop = [], threading.Event()
peaks = dict(base)
t0 = time.perf_counter()

def sample():
    while not stop.is_set():
        s = status()
        for k, v in s.items():
            peaks[k] = max(peaks[k], v)
        samples.append((time.perf_counter() - t0, s["VmRSS"]))
        time.sleep(0.005)

th = threading.Thread(target=sample, daemon=True)
th.start()
summary = wq.quantize_checkpoint(args["src"], args["out"], activations="fp8",
                                 calibration=args["calibration"], progress=False)
stop.set(); th.join()
elapsed = time.perf_counter() - t0
_, hwm = rss()
print(json.dumps({"baseline": baseline, "peak_sampled": max(s[1] for s in samples),
                  "anon_above": peaks["RssAnon"] - base["RssAnon"],
                  "file_above": peaks["RssFile"] - base["RssFile"],
                  "vm_hwm": hwm, "elapsed": elapsed, "samples": samples[::4],
                  "bytes_before": summary["bytes_before"], "bytes_after": summary["bytes_after"],
                  "layers_quantized": summary["layers_quantized"]}))
"""


def make_model(directory: Path, layers: int, hidden: int, intermediate: int, vocab: int,
               with_tokenizer: bool) -> dict:
    """Random bf16 Llama written one layer per shard (this process holds one layer at a time)."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    heads = hidden // 64
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": 64,
        "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
        "rope_theta": 10000.0,
    }
    if with_tokenizer:
        sys.path.insert(0, str(REPO / "tests"))
        import tiny_models

        tok = tiny_models.build_tokenizer(directory)
        config["vocab_size"] = vocab = len(tok)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(torch.bfloat16)

    weight_map, largest, total = {}, 0, 0
    shards = [{"model.embed_tokens.weight": rand(vocab, hidden) * 8,
               "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
               "lm_head.weight": rand(vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}"
        shards.append({
            f"{p}.input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            f"{p}.post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            **{f"{p}.self_attn.{n}.weight": rand(hidden, hidden) for n in ("q_proj", "k_proj",
                                                                          "v_proj", "o_proj")},
            f"{p}.mlp.gate_proj.weight": rand(intermediate, hidden),
            f"{p}.mlp.up_proj.weight": rand(intermediate, hidden),
            f"{p}.mlp.down_proj.weight": rand(hidden, intermediate),
        })
    n = len(shards)
    for k, tensors in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(directory / fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = fname
            size = t.numel() * t.element_size()
            largest, total = max(largest, size), total + size
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return {"largest": largest, "total": total}


def run_export(src: Path, out: Path, calibration: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    arg = json.dumps({"src": str(src), "out": str(out), "calibration": calibration})
    proc = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"export failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = cpu_model()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    return (f"{cpu}, {os.cpu_count()} logical CPUs, {mem:.0f} GiB RAM; {platform.system()} "
            f"{platform.release()}; Python {platform.python_version()}, torch {torch.__version__}")


def plot(runs: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    dyn = [r for r in runs if r["calibration"] == "dynamic"]
    static = [r for r in runs if r["calibration"] == "static"]
    fig, axes = plt.subplots(1, 2 if static else 1, figsize=(11 if static else 7, 4.5),
                             squeeze=False)
    panels = [(axes[0][0], dyn, "dynamic (streaming)")]
    if static:
        panels.append((axes[0][1], static, "static calibration (loads the model)"))
    for ax, group, title in panels:
        for r in group:
            xs = [s[0] for s in r["samples"]]
            ys = [(s[1] - r["baseline"]) / MiB for s in r["samples"]]
            ax.plot(xs, ys, linewidth=0.8,
                    label=f"{r['label'].rsplit(',', 1)[0]}: model {r['total'] / MiB:.0f} MiB")
        for size in sorted({r["largest"] for r in group}):
            ax.axhline(size / MiB, color="k", linestyle="--", linewidth=0.8)
            ax.annotate(f"largest tensor {size / MiB:.0f} MiB", (0, size / MiB),
                        textcoords="offset points", xytext=(2, 3), fontsize=7)
        if group is static:
            ax.axhline(group[0]["total"] / MiB, color="tab:red", linestyle=":", linewidth=0.8)
            ax.annotate("model size", (0, group[0]["total"] / MiB), textcoords="offset points",
                        xytext=(2, 3), fontsize=7, color="tab:red")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("seconds since export start")
        ax.set_ylabel("RSS above post-import baseline (MiB)")
        ax.set_title(f"w4a8-quantize, {title}", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", default=["2048x8192x2", "2048x8192x8", "2048x8192x24",
                                                 "4096x16384x2"],
                    help="dynamic-mode models as HIDDENxINTERMEDIATExLAYERS")
    ap.add_argument("--static-run", default="2048x8192x2",
                    help="one static-calibration run, HIDDENxINTERMEDIATExLAYERS ('' to skip)")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_export_", dir=args.workdir))
    runs = []
    plan = [(spec, "dynamic") for spec in args.runs]
    if args.static_run:
        plan.append((args.static_run, "static"))
    for spec, calibration in plan:
        hidden, intermediate, layers = (int(v) for v in spec.split("x"))
        src = work / f"llama_{spec}_{calibration}"
        info = make_model(src, layers, hidden, intermediate, args.vocab,
                          with_tokenizer=calibration == "static")
        r = run_export(src, work / f"out_{spec}_{calibration}", calibration)
        r.update(info, layers=layers, hidden=hidden, intermediate=intermediate,
                 calibration=calibration,
                 label=f"h{hidden}/i{intermediate}, {layers} layers, {calibration}")
        runs.append(r)
        print(f"{r['label']}: model {info['total'] / MiB:.0f} MiB, largest tensor "
              f"{info['largest'] / MiB:.0f} MiB, peak RSS above baseline "
              f"{(r['peak_sampled'] - r['baseline']) / MiB:.1f} MiB (VmHWM "
              f"{r['vm_hwm'] / MiB:.0f} MiB, baseline {r['baseline'] / MiB:.0f} MiB), "
              f"{r['elapsed']:.1f} s", flush=True)
        for p in sorted(work.glob("*")):
            if p.is_dir():
                subprocess.run(["rm", "-rf", str(p)], check=True)

    note = plot([r for r in runs if r["calibration"] == "dynamic"] +
                [r for r in runs if r["calibration"] == "static"], results / "export_memory.png")
    command = "python " + " ".join(shlex.quote(a) for a in
                                   [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    lines = [
        "# w4a8-quantize: peak memory vs model size",
        "",
        f"- Date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Machine: {machine()}",
        f"- Command (from the repo root): `{command}`",
        "- Models: synthetic bf16 Llama (h = hidden, i = intermediate; the largest tensor is an "
        "MLP projection, i x h), one safetensors shard per layer on input; output written with "
        "the default 5GB shard size (one shard, so the shard size does not bound anything).",
        "- Each export runs in a fresh process (`OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`) "
        "that samples its own RSS every 5 ms; *baseline* is RSS after importing torch, safetensors, "
        "transformers and the exporter; *peak* is the highest sample (VmHWM agrees).",
        "",
        "| run | model size | largest tensor | model / largest | baseline RSS | peak RSS | "
        "peak above baseline | of which anon / file-backed | above baseline / largest | time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        above = r["peak_sampled"] - r["baseline"]
        lines.append(
            f"| {r['label']} | {r['total'] / MiB:.0f} MiB | {r['largest'] / MiB:.0f} MiB | "
            f"{r['total'] / r['largest']:.0f}x | {r['baseline'] / MiB:.0f} MiB | "
            f"{r['peak_sampled'] / MiB:.0f} MiB | {above / MiB:.1f} MiB | "
            f"{r['anon_above'] / MiB:.0f} / {r['file_above'] / MiB:.0f} MiB | "
            f"{above / r['largest']:.2f}x | {r['elapsed']:.1f} s |")
    dyn = [r for r in runs if r["calibration"] == "dynamic"]
    if dyn:
        same = [r for r in dyn if r["largest"] == dyn[0]["largest"]]
        ratios = {r["label"]: (r["peak_sampled"] - r["baseline"]) / r["largest"] for r in dyn}
        worst = max(ratios, key=ratios.get)
        lo = min(r["peak_sampled"] - r["baseline"] for r in same) / MiB
        hi = max(r["peak_sampled"] - r["baseline"] for r in same) / MiB
        lines += [
            "",
            f"Dynamic mode (the streaming path): with the same largest tensor "
            f"({dyn[0]['largest'] / MiB:.0f} MiB) the exporter's peak above baseline stays at "
            f"{lo:.0f}-{hi:.0f} MiB while the model grows "
            f"{same[-1]['total'] / same[0]['total']:.0f}-fold: it does not grow with the model. "
            f"The largest ratio to the largest tensor is {ratios[worst]:.2f}x ({worst}). "
            "What it holds: a roughly constant part (code pages of torch/safetensors touched for "
            "the first time, allocator slack, the ~256K-element row chunk being encoded with its "
            "float32 temporaries) plus the E8M0 scales of the tensor being encoded (1/16 of its "
            "bf16 size), kept until its packed bytes are written. Source files are opened per "
            "chunk, so mapped file pages do not pile up (file-backed column).",
        ]
    if any(r["calibration"] == "static" for r in runs):
        lines += [
            "",
            "Static calibration loads the whole BF16 model once with transformers to run the "
            "calibration text (by design, documented in the tool): its peak is about the model "
            "size plus activations. The weights are still streamed afterwards.",
        ]
    lines += ["", "![RSS over time](export_memory.png)" if note is None else f"Plot: {note}", ""]
    (results / "export_memory.md").write_text("\n".join(lines))
    (results / "export_memory.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "samples"} for r in runs], indent=2))
    subprocess.run(["rm", "-rf", str(work)], check=True)
    print(f"wrote {results / 'export_memory.md'}")


if __name__ == "__main__":
    main()
