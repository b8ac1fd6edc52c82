"""End-to-end vLLM benchmark: a W4A8 MXFP4 model against the same model in BF16.

Three steps (each its own subcommand, so the slow ones can run once and be reused):

  make-model   write a random BF16 Hugging Face checkpoint with real model shapes
               (``llama3-8b``; ``qwen3-30b-a3b``, optionally with fewer layers), weights drawn
               like a fresh model's initialisation (normal, std 0.02; norms 1), plus a small
               tokenizer for the exporter's calibration.
  run          start one vLLM engine (``LLM(...)``) on a checkpoint and measure decode tokens/s
               at several batch sizes, prefill tokens/s at a long context, and the GPU memory
               taken by the weights; writes one JSON.
  report       turn the JSONs of one session into a markdown table and a PNG plot with the
               ratios against the BF16 run.

The quantized checkpoint is made by this project's exporter between the steps, e.g.
``w4a8-quantize SRC OUT --activations fp8 --calibration static --calib-max-length 64`` (the
H100 run in benchmarks/results; ``--calib-device cuda`` puts the calibration forward on a GPU).
``sweep`` runs several engines one after another (one process each) and reports.

Decode speed is measured as the difference of two timed ``generate`` calls with the same
prompts, ``1 + S`` and ``1`` output tokens (``ignore_eos``), so prompt processing and the first
token cancel out: ``batch * S / (t(1+S) - t(1))``. Prefill speed: ``batch * L / t(1)`` for
prompts of ``L`` tokens. Prompts are random token ids (no tokenizer in the engine), different for
every request, prefix caching off.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SHAPES = {
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False,
    },
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "output_router_logits": False, "router_aux_loss_coef": 0.001,
    },
}
INIT_STD = 0.02


# ---------------------------------------------------------------------------------------------
# make-model
# ---------------------------------------------------------------------------------------------

def _tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, in the Hugging Face on-disk naming."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    d = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (h,)),
                (f"{p}.post_attention_layernorm.weight", (h,)),
                (f"{p}.self_attn.q_proj.weight", (q, h)),
                (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.v_proj.weight", (kv, h)),
                (f"{p}.self_attn.o_proj.weight", (h, q))]
        if cfg["model_type"] == "qwen3_moe":
            out += [(f"{p}.self_attn.q_norm.weight", (d,)), (f"{p}.self_attn.k_norm.weight", (d,))]
            e, f = cfg["num_experts"], cfg["moe_intermediate_size"]
            out.append((f"{p}.mlp.gate.weight", (e, h)))
            for j in range(e):
                out += [(f"{p}.mlp.experts.{j}.gate_proj.weight", (f, h)),
                        (f"{p}.mlp.experts.{j}.up_proj.weight", (f, h)),
                        (f"{p}.mlp.experts.{j}.down_proj.weight", (h, f))]
        else:
            f = cfg["intermediate_size"]
            out += [(f"{p}.mlp.gate_proj.weight", (f, h)), (f"{p}.mlp.up_proj.weight", (f, h)),
                    (f"{p}.mlp.down_proj.weight", (h, f))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def make_model(shape: str, out: Path, layers: int | None, device: str, shard_bytes: int,
               seed: int) -> None:
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models  # the tests' local BPE tokenizer: calibration needs one, vLLM does not

    cfg = dict(SHAPES[shape])
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    out.mkdir(parents=True, exist_ok=False)
    tok = tiny_models.build_tokenizer(out)
    cfg.update(torch_dtype="bfloat16", bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, initializer_range=INIT_STD)
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = _tensor_shapes(cfg)
    total = sum(2 * math.prod(s) for _, s in tensors)
    weight_map, shard, shard_size, files = {}, {}, 0, []

    def flush() -> None:
        nonlocal shard, shard_size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, shard_size = {}, 0

    with tqdm(total=total, unit="B", unit_scale=True, desc=f"random {shape}") as bar:
        for name, s in tensors:
            if len(s) == 1:
                t = torch.ones(s, dtype=torch.bfloat16)
            else:
                t = (torch.randn(s, generator=gen, device=device, dtype=torch.float32)
                     .mul_(INIT_STD).to(torch.bfloat16).cpu())
            if shard_size + t.numel() * 2 > shard_bytes and shard:
                flush()
            shard[name] = t
            shard_size += t.numel() * 2
            bar.update(t.numel() * 2)
        flush()
    # Name the shards "-of-N" only now that N is known.
    renamed = {}
    for i, name in enumerate(files, start=1):
        final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        (out / name).rename(out / final)
        renamed[name] = final
    index = {"metadata": {"total_size": total},
             "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    print(f"wrote {out}: {shape}, {cfg['num_hidden_layers']} layers, {total / 1e9:.2f} GB bf16")


# ---------------------------------------------------------------------------------------------
# run (one engine)
# ---------------------------------------------------------------------------------------------

def _weight_bytes(worker) -> dict:
    """Runs inside the vLLM worker (collective_rpc): bytes of the model's parameters, buffers and
    the plugin's repacked tensors (``w4a8_*`` attributes); the KV cache is not counted."""
    import torch

    model = worker.model_runner.model
    seen, total = set(), 0
    for module in model.modules():
        extra = [v for k, v in vars(module).items()
                 if k.startswith("w4a8_") and isinstance(v, torch.Tensor)]
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)) + extra:
            if t.device.type != "meta" and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.untyped_storage().nbytes()
    return {"model_tensor_bytes": total,
            "model_memory_usage": getattr(worker.model_runner, "model_memory_usage", None)}


def _timed_generate(llm, prompts, max_tokens: int) -> float:
    import torch
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                            temperature=0, detokenize=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    got = [len(o.outputs[0].token_ids) for o in outs]
    if got != [max_tokens] * len(prompts):
        raise RuntimeError(f"asked for {max_tokens} tokens per request, got {got}")
    return elapsed


def run_engine(args) -> None:
    import torch
    import vllm
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # for the weight-size RPC
    kwargs = dict(
        dtype="bfloat16", skip_tokenizer_init=True, enable_prefix_caching=False, seed=0,
        max_model_len=args.max_model_len, max_num_seqs=max(args.batches),
        max_num_batched_tokens=max(args.prefill_len * args.prefill_batch, 8192),
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tp,
        compilation_config={"cudagraph_capture_sizes": sorted(set(args.batches))},
        attention_config={"backend": args.attention_backend},
    )
    if args.quantization:
        kwargs["quantization"] = args.quantization
    t0 = time.perf_counter()
    llm = LLM(str(args.model), **kwargs)
    init_s = time.perf_counter() - t0
    try:
        sizes = llm.collective_rpc(_weight_bytes)
    except Exception as exc:  # reported, not fatal: the log line below still gives the size
        sizes = [{"error": f"{type(exc).__name__}: {exc}"}]

    config = json.loads((Path(args.model) / "config.json").read_text())
    vocab = config["vocab_size"]
    gen = torch.Generator().manual_seed(1)

    def prompts(n: int, length: int):
        ids = torch.randint(0, min(vocab, 32000), (n, length), generator=gen)
        return [TokensPrompt(prompt_token_ids=row.tolist()) for row in ids]

    _timed_generate(llm, prompts(2, 16), 8)  # warm-up
    decode = []
    for b in args.batches:
        ps = prompts(b, args.decode_prompt_len)
        _timed_generate(llm, ps, 2)
        t1s = [_timed_generate(llm, ps, 1) for _ in range(args.repeats)]
        tns = [_timed_generate(llm, ps, 1 + args.decode_steps) for _ in range(args.repeats)]
        step = (min(tns) - min(t1s)) / args.decode_steps
        # The spread of the long calls says how far to trust the step time (min is reported).
        decode.append({"batch": b, "step_ms": step * 1e3, "tokens_per_s": b / step,
                       "t1_s": t1s, "tn_s": tns, "tn_spread": max(tns) / min(tns)})
        print(f"decode batch {b}: {step * 1e3:.2f} ms/step, {b / step:.0f} tok/s", flush=True)
    ps = prompts(args.prefill_batch, args.prefill_len)
    _timed_generate(llm, ps, 1)
    tp = min(_timed_generate(llm, ps, 1) for _ in range(args.repeats))
    prefill = {"batch": args.prefill_batch, "prompt_len": args.prefill_len, "seconds": tp,
               "tokens_per_s": args.prefill_batch * args.prefill_len / tp}
    print(f"prefill {args.prefill_batch}x{args.prefill_len}: {prefill['tokens_per_s']:.0f} tok/s",
          flush=True)
    result = {
        "label": args.label, "model": str(args.model), "quantization": args.quantization,
        "model_shape": _shape_name(config),
        "env": {k: v for k, v in os.environ.items() if k.startswith("W4A8_MXFP4_")},
        "vllm": vllm.__version__, "torch": torch.__version__, "tp": args.tp,
        "device": (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                   else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"),
        "engine_init_s": init_s,
        "weights": sizes, "decode": decode, "prefill": prefill,
        "settings": {k: (v if isinstance(v, (int, float, str, list, type(None))) else str(v))
                     for k, v in kwargs.items()},
        "decode_steps": args.decode_steps, "decode_prompt_len": args.decode_prompt_len,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))


def _shape_name(config: dict) -> str:
    """``LlamaForCausalLM, 32 layers, hidden 4096`` (what the random checkpoint is shaped like)."""
    arch = (config.get("architectures") or ["?"])[0]
    return f"{arch}, {config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}"


def run_in_subprocess(argv: list[str], log_path: Path, timeout: float) -> None:
    """``run`` in a fresh process (one vLLM engine per process), with the log kept and scanned."""
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, __file__, "run", *argv], stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout)
    text = log_path.read_text(errors="replace")
    if proc.returncode:
        raise SystemExit(f"engine run failed ({proc.returncode}); log tail:\n{text[-6000:]}")


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def _log_facts(log: Path) -> dict:
    text = log.read_text(errors="replace") if log.exists() else ""
    loading = re.findall(r"Model loading took ([\d.]+) GiB", text)
    kernels = sorted({m.group(1)[:200] for m in re.finditer(r"w4a8_mxfp4: (.*uses kernel.*)", text)})
    return {"model_loading_gib": float(loading[-1]) if loading else None, "kernel_lines": kernels}


def report(jsons: list[Path], out_stem: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in jsons]
    for r, p in zip(runs, jsons):
        r.update(_log_facts(p.with_suffix(".log")))
    base = next((r for r in runs if not r["quantization"]), None)
    if base is None:
        raise SystemExit("report needs a BF16 run (no quantization) among the inputs")
    batches = [d["batch"] for d in base["decode"]]
    title = base.get("model_shape") or Path(base["model"]).name
    lines = [f"# End-to-end vLLM: {title}, W4A8 MXFP4 against BF16",
             "",
             f"- device: {base['device']}; vLLM {base['vllm']}; torch {base['torch']}; "
             f"TP={base['tp']}",
             f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; host "
             f"{platform.node()}",
             f"- command: `{command}`",
             f"- decode: {base['decode_steps']} steps after a {base['decode_prompt_len']}-token "
             "prompt, tokens/s = batch / step time (CUDA graphs, default compiled mode); "
             f"prefill: {base['prefill']['batch']} prompts x {base['prefill']['prompt_len']} "
             "tokens, one output token",
             "",
             "| run | weights GiB (vLLM) | weights vs BF16 | "
             + " | ".join(f"decode b={b} tok/s (x)" for b in batches)
             + " | prefill tok/s (x) |",
             "|---" * (4 + len(batches)) + "|"]
    for r in runs:
        w = r.get("model_loading_gib")
        wr = (w / base["model_loading_gib"]) if w and base.get("model_loading_gib") else None
        cells = [r["label"], f"{w:.2f}" if w else "?", f"{wr:.3f}" if wr else "?"]
        for d, db in zip(r["decode"], base["decode"]):
            cells.append(f"{d['tokens_per_s']:.0f} ({d['tokens_per_s'] / db['tokens_per_s']:.2f}x)")
        pf, pfb = r["prefill"]["tokens_per_s"], base["prefill"]["tokens_per_s"]
        cells.append(f"{pf:.0f} ({pf / pfb:.2f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Run-to-run spread of the timed decode calls (max / min over the repeats of "
              "`generate` with 1 + S tokens; the table uses the minimum):", ""]
    for r in runs:
        spreads = [f"b={d['batch']}: {d['tn_spread']:.2f}" for d in r["decode"] if "tn_spread" in d]
        lines.append(f"- {r['label']}: " + (", ".join(spreads) or "not recorded"))
    lines += ["", "Kernel choice logged by the plugin (per layer shape):", ""]
    for r in runs:
        for k in r.get("kernel_lines", []):
            lines.append(f"- {r['label']}: `{k}`")
    lines += ["", "Per-run engine settings and raw numbers: the JSON beside this file."]
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    out_stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out_stem.with_suffix(".json").write_text(json.dumps(runs, indent=1))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        xs = [j + i * width for j in range(len(batches))]
        axes[0].bar(xs, [d["tokens_per_s"] for d in r["decode"]], width, label=r["label"])
        axes[1].bar([i], [r["prefill"]["tokens_per_s"]], 0.6, label=r["label"])
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(batches))],
                       [f"batch {b}" for b in batches])
    axes[0].set_ylabel("decode tokens/s")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[1].set_xticks(range(len(runs)), [r["label"] for r in runs], rotation=20, fontsize=8)
    axes[1].set_ylabel(f"prefill tokens/s ({base['prefill']['prompt_len']}-token prompts)")
    fig.suptitle(f"{title} on {base['device']} (vLLM {base['vllm']})")
    fig.tight_layout()
    fig.savefig(out_stem.with_suffix(".png"), dpi=110)
    print(out_stem.with_suffix(".md").read_text())


# ---------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("--shape", choices=sorted(SHAPES), required=True)
    m.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the real model")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--device", default="cuda", help="where the random numbers are drawn")
    m.add_argument("--shard-bytes", type=int, default=4 << 30)
    m.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("--model", type=Path, required=True)
    r.add_argument("--label", required=True)
    r.add_argument("--quantization", default=None)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    r.add_argument("--decode-steps", type=int, default=64)
    r.add_argument("--decode-prompt-len", type=int, default=128)
    r.add_argument("--prefill-len", type=int, default=2048)
    r.add_argument("--prefill-batch", type=int, default=8)
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--max-model-len", type=int, default=4096)
    r.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    r.add_argument("--tp", type=int, default=1)
    r.add_argument("--attention-backend", default="TRITON_ATTN")
    s = sub.add_parser("sweep", help="run several engines one after another, then report")
    s.add_argument("--runs", nargs="+", required=True,
                   help="LABEL=MODEL[:quantization[:ENV=VALUE,...]] for each engine, BF16 first")
    s.add_argument("--work", type=Path, required=True, help="folder for per-run JSON and logs")
    s.add_argument("--out-stem", type=Path, required=True)
    s.add_argument("--timeout", type=float, default=900)
    s.add_argument("run_args", nargs=argparse.REMAINDER, help="-- then arguments for every run")
    rep = sub.add_parser("report")
    rep.add_argument("jsons", type=Path, nargs="+")
    rep.add_argument("--out-stem", type=Path, required=True)
    rep.add_argument("--command", default="")
    args = p.parse_args()

    if args.cmd == "make-model":
        make_model(args.shape, args.out, args.layers, args.device, args.shard_bytes, args.seed)
    elif args.cmd == "run":
        run_engine(args)
    elif args.cmd == "sweep":
        args.work.mkdir(parents=True, exist_ok=True)
        extra = [a for a in args.run_args if a != "--"]
        jsons = []
        for spec in args.runs:
            label, rest = spec.split("=", 1)
            model, _, qrest = rest.partition(":")
            quant, _, envs = qrest.partition(":")
            env = dict(kv.split("=", 1) for kv in envs.split(",") if kv)
            out = args.work / f"{label}.json"
            argv = ["--model", model, "--label", label, "--out", str(out), *extra]
            if quant:
                argv += ["--quantization", quant]
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            t0 = time.perf_counter()
            try:
                run_in_subprocess(argv, out.with_suffix(".log"), args.timeout)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            print(f"[sweep] {label}: {time.perf_counter() - t0:.0f} s", flush=True)
            jsons.append(out)
        report(jsons, args.out_stem, "python3 benchmarks/bench_e2e.py " + shlex.join(sys.argv[1:]))
    else:
        report(args.jsons, args.out_stem, args.command)


if __name__ == "__main__":
    main()
