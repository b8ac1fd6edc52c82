"""Real vLLM on the lent GPU (vLLM 0.26 from ../shared/gpu-kit) with the plugin: tiny Llama and
Qwen3-MoE checkpoints from w4a8-quantize, FP8 and INT8 activations, CUDA graphs on (default
mode), greedy tokens compared with the transformers reference forward on the CPU.

Status: written, NOT YET RUN (no device time was left in the session that wrote it).
Not a pytest module (it needs the carried kit); run on the device:
    source .kit/activate.sh && python3 tests/gpu/vllm_gpu_smoke.py OUT_DIR
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
            result = run_engine(ckpt, act, prompts)
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
            report.append(entry)
            print(json.dumps(entry), flush=True)
    (out / "vllm_gpu_smoke.json").write_text(json.dumps(report, indent=1))
    print("\n| model | act | vLLM | steps | argmax = reference | max gap (nats) | mean |dlogprob| |")
    print("|---|---|---|---|---|---|---|")
    for e in report:
        print(f"| {e['arch']} | {e['act']} | {e['vllm']} | {e['steps']} | "
              f"{e['reference_argmax_agree']} | {e['max_gap_nats']} | {e['mean_abs_logprob_diff']} |")


if __name__ == "__main__":
    main()
