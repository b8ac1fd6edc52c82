"""Real vLLM on the lent GPU (vLLM 0.26 from ../shared/gpu-kit) with the plugin.

1. ``LLM(...)``: tiny Llama and Qwen3-MoE checkpoints from w4a8-quantize (static FP8 scales),
   served with FP8 and with INT8 activations, bf16 engine, CUDA graphs on (default compiled mode);
   16 greedy tokens per prompt checked step by step against the transformers reference forward
   (exact dequantized weights, exact activation quantization, fp32).
2. ``vllm serve ... --quantization w4a8_mxfp4`` (the kit's CLI) answering the ``openai`` client:
   completions, chat, streaming of both (the checks of tests/test_serve.py).

Both must show from vLLM's log that the SM90 kernels ran (``uses kernel sm90_triton``) and the
fallback did not. Not a pytest module (it needs the carried kit); on the device:
    source scripts/gpu_kit_env.sh && python3 tests/gpu/vllm_gpu_smoke.py OUT_DIR
Exit status 1 when any check fails; the table and JSON are written either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# A bf16 engine against an fp32 reference: a greedy token may differ from the reference's top-1
# only where the two were this close (bf16 activations carry ~3 significant digits).
TIE_NATS = 0.1

ENGINE = r"""
import json, sys, time
from vllm import LLM, SamplingParams
import vllm
args = json.loads(sys.argv[1])
t0 = time.time()
llm = LLM(args["path"], quantization="w4a8_mxfp4", attention_config={"backend": "TRITON_ATTN"},
          gpu_memory_utilization=0.3, kv_cache_memory_bytes=2 << 30, max_model_len=256,
          dtype="bfloat16", max_num_seqs=1)
init = time.time() - t0
rows = []
for prompt in args["prompts"]:
    out = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, logprobs=1),
                       use_tqdm=False)[0]
    toks = list(out.outputs[0].token_ids)
    rows.append({"prompt_ids": list(out.prompt_token_ids), "tokens": toks,
                 "logprobs": [out.outputs[0].logprobs[i][t].logprob for i, t in enumerate(toks)]})
print("RESULT" + json.dumps({"vllm": vllm.__version__, "init_s": init, "rows": rows}))
"""


def run_engine(path: Path, act: str, prompts: list[str]) -> dict:
    env = dict(os.environ, W4A8_MXFP4_ACTIVATIONS=act)
    proc = subprocess.run([sys.executable, "-c", ENGINE, json.dumps(
        {"path": str(path), "prompts": prompts})], env=env, capture_output=True, text=True,
        timeout=420)
    log = proc.stdout + proc.stderr
    kernel_lines = sorted({line.split("w4a8_mxfp4: ", 1)[1][:160] for line in log.splitlines()
                           if "uses kernel" in line})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    if proc.returncode or not lines:
        raise RuntimeError(log[-8000:])
    result = json.loads(lines[-1][6:])
    result["kernels"] = kernel_lines
    return result


def main() -> None:
    import torch

    import tiny_models
    from reference_model import build_reference_model, reference_logprobs
    from w4a8_backend.formats import ActivationDtype
    from w4a8_backend.tools.quantize import quantize_checkpoint

    out = Path(sys.argv[1])
    work = Path(tempfile.gettempdir()) / "w4a8_smoke"
    prompts = ["The weather today is", "Once upon a time", "A quantized model runs"]
    report = []
    for arch, maker in (("llama", tiny_models.make_tiny_llama),
                        ("qwen3_moe", tiny_models.make_tiny_qwen3_moe)):
        src = maker(work / arch)
        ckpt = work / f"{arch}_w4a8"
        if not ckpt.exists():
            quantize_checkpoint(src, ckpt, activations="fp8", calibration="static",
                                progress=False)
        for act in ("fp8", "int8"):
            t0 = time.time()
            try:
                result = run_engine(ckpt, act, prompts)
            except RuntimeError as exc:
                (out / f"engine_{arch}_{act}.log").write_text(str(exc))
                entry = {"arch": arch, "act": act, "vllm": "?", "steps": 0,
                         "reference_argmax_agree": "-", "max_gap_nats": "-",
                         "mean_abs_logprob_diff": "-", "kernels": [], "ok": False,
                         "error": str(exc)[-2000:]}
                report.append(entry)
                print(json.dumps(entry), flush=True)
                continue
            reference = build_reference_model(ckpt, act_dtype=ActivationDtype.from_string(act))
            exact, gaps, diffs = 0, [], []
            for row in result["rows"]:
                ref = reference_logprobs(reference, row["prompt_ids"], row["tokens"])
                for tok, lp, r in zip(row["tokens"], row["logprobs"], ref):
                    exact += int(int(r.argmax()) == tok)
                    gaps.append(float(r.max() - r[tok]))
                    diffs.append(abs(lp - float(r[tok])))
            steps = sum(len(row["tokens"]) for row in result["rows"])
            entry = {"arch": arch, "act": act, "vllm": result["vllm"],
                     "engine_init_s": round(result["init_s"], 1), "wall_s": round(time.time() - t0, 1),
                     "steps": steps, "reference_argmax_agree": exact,
                     "max_gap_nats": round(max(gaps), 4),
                     "mean_abs_logprob_diff": round(float(torch.tensor(diffs).mean()), 4),
                     "kernels": result["kernels"]}
            entry["ok"] = bool(max(gaps) <= TIE_NATS and _sm90_only(entry["kernels"]))
            report.append(entry)
            print(json.dumps(entry), flush=True)
    serve = [serve_check(work / f"{arch}_w4a8", arch, port) for arch, port in
             (("llama", 18461), ("qwen3_moe", 18462))]
    (out / "vllm_gpu_smoke.json").write_text(json.dumps({"llm": report, "serve": serve}, indent=1))
    print("\n| model | act | vLLM | steps | argmax = reference | max gap (nats) | mean |dlogprob| | "
          "kernels | ok |")
    print("|---|---|---|---|---|---|---|---|---|")
    for e in report:
        kinds = sorted({k.split("uses kernel ")[1].split()[0] for k in e["kernels"]}) or ["-"]
        print(f"| {e['arch']} | {e['act']} | {e['vllm']} | {e['steps']} | "
              f"{e['reference_argmax_agree']} | {e['max_gap_nats']} | {e['mean_abs_logprob_diff']} | "
              f"{', '.join(kinds)} | {e['ok']} |")
    print("\n| vllm serve | openai checks | kernels | ok |\n|---|---|---|---|")
    for e in serve:
        print(f"| {e['arch']} | {e['checks']} | {', '.join(e['kernel_kinds'])} | {e['ok']} |")
    sys.exit(0 if all(e["ok"] for e in report + serve) else 1)


def _sm90_only(kernel_lines: list[str]) -> bool:
    kinds = {k.split("uses kernel ")[1].split()[0] for k in kernel_lines}
    return kinds == {"sm90_triton"}


def serve_check(ckpt: Path, arch: str, port: int) -> dict:
    """`vllm serve --quantization w4a8_mxfp4` on the GPU, queried with the openai client."""
    from engine import vllm_server
    from test_serve import _exercise

    os.environ.setdefault("W4A8_VLLM_COMMAND", f"{sys.executable} -m vllm.entrypoints.cli.main")
    entry = {"arch": arch, "checkpoint": str(ckpt)}
    t0 = time.time()
    try:
        with vllm_server(ckpt, "--quantization", "w4a8_mxfp4", "--attention-backend",
                         "TRITON_ATTN", "--gpu-memory-utilization", "0.3", port=port,
                         timeout=400) as (url, log):
            entry["model"] = _exercise(url)
        entry["checks"] = "completions, chat, streamed completion = plain, streamed chat = plain"
        text = log.read_text(errors="replace")
        lines = sorted({ln.split("w4a8_mxfp4: ", 1)[1][:160] for ln in text.splitlines()
                        if "uses kernel" in ln})
        entry["kernel_kinds"] = sorted({k.split("uses kernel ")[1].split()[0] for k in lines})
        entry["ok"] = _sm90_only(lines) and "quantization=w4a8_mxfp4" in text
    except Exception as exc:  # recorded and reported; the run goes on to the other checks
        entry.update(checks=f"FAILED: {type(exc).__name__}: {str(exc)[-3000:]}", kernel_kinds=[],
                     ok=False)
    entry["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(entry), flush=True)
    return entry


if __name__ == "__main__":
    main()
