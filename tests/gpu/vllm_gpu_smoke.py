"""Real vLLM on the lent GPU (vLLM 0.26 from ../shared/gpu-kit) with the plugin.

1. ``LLM(...)``: tiny Llama and Qwen3-MoE checkpoints from w4a8-quantize (static FP8 scales),
   served with FP8 and with INT8 activations, bf16 engine, CUDA graphs on (default compiled mode);
   16 greedy tokens per prompt checked step by step against the transformers reference forward
   (exact dequantized weights, exact activation quantization, fp32). A bf16 engine's token may
   be another than the reference's top-1 only as far from it as an exact bf16 computation of
   the same model gets (``bf16_floor``), and at least ``TIE_NATS``. With several ``--tp``
   sizes, each engine also scores the first size's sequences teacher-forced
   (``prompt_logprobs``), and the sizes must agree on those identical inputs
   (``forced_agreement_of``) besides along their own greedy sequences (``tp_agreement_of``).
2. ``vllm serve ... --quantization w4a8_mxfp4`` (the kit's CLI) answering the ``openai`` client:
   completions, chat, streaming of both (the checks of tests/test_serve.py).

Both must show from vLLM's log that the SM90 kernels ran (``uses kernel sm90_triton``) and the
fallback did not. Not a pytest module (it needs the carried kit); on the device:
    source scripts/gpu_kit_env.sh && python3 tests/gpu/vllm_gpu_smoke.py OUT_DIR
Exit status 1 when any check fails; the table and JSON are written either way.
"""

from __future__ import annotations

import argparse
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
# only where the two were this close (bf16 activations carry ~3 significant digits), or as far
# as an exact bf16 computation of the same model gets (bf16_floor below), whichever is larger.
TIE_NATS = 0.1
# Prompts for the bf16 floor: more than the engine's 3, since its maximum is what counts.
FLOOR_PROMPTS = ["The weather today is", "Once upon a time", "A quantized model runs",
                 "In the beginning", "The capital of", "Numbers like 12345", "def main():",
                 "Hello, my name is", "Water boils at", "The quick brown fox", "Every morning I",
                 "Tensor cores multiply", "She opened the door", "Prices rose by", "Once more,",
                 "The result of the", "Rivers flow into", "My favourite colour",
                 "At midnight the", "Compilers translate"]


def bf16_floor(ckpt: Path, act: str, steps: int = 16) -> float:
    """Largest gap to the fp32 reference's top-1 of an exact bf16 computation's greedy tokens
    (reference_model.bf16_greedy_gaps; no vLLM, no kernels) on this checkpoint. Measured on the
    CPU for the tiny models on 2026-11-23 (benchmarks/results/bf16_noise_floor.json): dense
    0.11 (FP8) / 0.18 (INT8) nats, Qwen3-MoE 0.80 / 2.72 (a bf16 router picks another expert)."""
    from transformers import AutoTokenizer

    from reference_model import bf16_greedy_gaps
    from w4a8_backend.formats import ActivationDtype

    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = [tok(p)["input_ids"] for p in FLOOR_PROMPTS]
    return max(bf16_greedy_gaps(ckpt, ActivationDtype.from_string(act), ids, steps))

ENGINE = r"""
import json, sys, time
from vllm import LLM, SamplingParams
import vllm
args = json.loads(sys.argv[1])
t0 = time.time()
llm = LLM(args["path"], quantization="w4a8_mxfp4", attention_config={"backend": "TRITON_ATTN"},
          gpu_memory_utilization=0.3, kv_cache_memory_bytes=2 << 30, max_model_len=256,
          max_num_seqs=1, **args["engine"])
init = time.time() - t0
rows = []
for prompt in args["prompts"]:
    out = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, logprobs=1),
                       use_tqdm=False)[0]
    toks = list(out.outputs[0].token_ids)
    rows.append({"prompt_ids": list(out.prompt_token_ids), "tokens": toks,
                 "logprobs": [out.outputs[0].logprobs[i][t].logprob for i, t in enumerate(toks)]})
# Teacher-forced scoring (prefill with prompt_logprobs) of given sequences, by default this
# run's own outputs: every position's top-5 and the logprob of the token that follows, so that
# TP sizes are compared on identical inputs instead of along sequences that may have parted.
scored = []
for ids in args["score"] or [r["prompt_ids"] + r["tokens"] for r in rows]:
    out = llm.generate([{"prompt_token_ids": ids}],
                       SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=5),
                       use_tqdm=False)[0]
    scored.append([{"forced": d[t].logprob,
                    "top": sorted(([k, v.logprob] for k, v in d.items()), key=lambda x: -x[1])}
                   for t, d in zip(ids[1:], out.prompt_logprobs[1:])])
print("RESULT" + json.dumps({"vllm": vllm.__version__, "init_s": init, "rows": rows,
                             "scored": scored}))
"""


def run_engine(path: Path, act: str, prompts: list[str], engine: dict, log_path: Path,
               score: list[list[int]] = ()) -> dict:
    env = dict(os.environ, W4A8_MXFP4_ACTIVATIONS=act)
    proc = subprocess.run([sys.executable, "-c", ENGINE, json.dumps(
        {"path": str(path), "prompts": prompts, "engine": engine, "score": list(score)})], env=env,
        capture_output=True, text=True, timeout=420)
    log_path.write_text(proc.stdout + proc.stderr)
    log = proc.stdout + proc.stderr
    kernel_lines = kernel_log_lines(log)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    if not lines:
        raise RuntimeError(log[-8000:])
    result = json.loads(lines[-1][6:])
    result["kernels"] = kernel_lines
    # Seen on 2 x H200 with several TP=2 engines at once: every result printed, then the
    # process aborted in teardown ("terminate called without an active exception" from an NCCL
    # heartbeat thread). The results stand; the exit status is reported with them.
    result["exit_code"] = proc.returncode
    return result


def main() -> None:
    import torch

    import tiny_models
    from reference_model import build_reference_model, reference_logprobs
    from w4a8_backend.formats import ActivationDtype
    from w4a8_backend.tools.quantize import quantize_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--archs", nargs="+", default=["llama", "qwen3_moe"])
    parser.add_argument("--acts", nargs="+", default=["fp8", "int8"], help="served activations")
    parser.add_argument("--checkpoint-act", default="fp8", help="the exported checkpoint's format")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--eager", action="store_true", help="enforce_eager (no compile, no graphs)")
    parser.add_argument("--kernel", default=None, help="force W4A8_MXFP4_KERNEL")
    parser.add_argument("--no-serve", action="store_true")
    parser.add_argument("--serve-only", action="store_true",
                        help="only the vllm serve + openai check (no LLM(...) runs)")
    parser.add_argument("--quantize-vocab", nargs="+", default=[], metavar="LAYER",
                        help="export with these vocabulary layers as MXFP4 (lm_head embed_tokens)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1],
                        help="tensor-parallel sizes; with several, their greedy tokens must agree")
    args = parser.parse_args()
    if args.kernel:
        os.environ["W4A8_MXFP4_KERNEL"] = args.kernel
    engine = {"dtype": args.dtype, "enforce_eager": args.eager}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.gettempdir()) / "w4a8_smoke"
    vocab_tag = "".join(f"_{layer}" for layer in sorted(args.quantize_vocab))
    prompts = ["The weather today is", "Once upon a time", "A quantized model runs"]
    report = []
    floors: dict = {}
    makers = {"llama": tiny_models.make_tiny_llama, "qwen3_moe": tiny_models.make_tiny_qwen3_moe}
    for arch in args.archs:
        src = work / arch
        if not src.exists():
            makers[arch](src)
        ckpt = work / f"{arch}_w4a8_{args.checkpoint_act}{vocab_tag}"
        if not ckpt.exists():
            quantize_checkpoint(src, ckpt, activations=args.checkpoint_act, calibration="static",
                                progress=False, quantize_vocab=args.quantize_vocab)
        runs = [] if args.serve_only else [(a, t) for a in args.acts for t in args.tp]
        for act, tp in runs:
            t0 = time.time()
            engine["tensor_parallel_size"] = tp
            first = next((e for e in report if e["arch"] == arch and e["act"] == act
                          and "scored" in e), None)
            score = first["scored_sequences"] if first else []
            try:
                result = run_engine(ckpt, act, prompts, engine,
                                    out / f"engine_{arch}_{act}_tp{tp}.log", score)
            except RuntimeError as exc:
                entry = {"arch": arch, "act": act, "tp": tp, "vllm": "?", "steps": 0,
                         "reference_argmax_agree": "-", "max_gap_nats": "-",
                         "mean_abs_logprob_diff": "-", "kernels": [], "ok": False,
                         "error": str(exc)[-2000:]}
                report.append(entry)
                print(json.dumps(entry), flush=True)
                continue
            reference = build_reference_model(ckpt, act_dtype=ActivationDtype.from_string(act))
            if (arch, act) not in floors:  # the bf16 floor does not bound an fp32 engine
                floors[arch, act] = bf16_floor(ckpt, act) if args.dtype == "bfloat16" else 0.0
            tolerance = max(TIE_NATS, floors[arch, act])
            exact, gaps, diffs, row_gaps = 0, [], [], []
            for row in result["rows"]:
                ref = reference_logprobs(reference, row["prompt_ids"], row["tokens"])
                row_gaps.append([])
                for tok, lp, r in zip(row["tokens"], row["logprobs"], ref):
                    exact += int(int(r.argmax()) == tok)
                    gaps.append(float(r.max() - r[tok]))
                    row_gaps[-1].append(round(gaps[-1], 4))
                    diffs.append(abs(lp - float(r[tok])))
            steps = sum(len(row["tokens"]) for row in result["rows"])
            entry = {"arch": arch, "act": act, "tp": tp, "checkpoint_act": args.checkpoint_act,
                     "quantized_vocab_layers": sorted(args.quantize_vocab),
                     "engine": dict(engine), "tokens": [row["tokens"] for row in result["rows"]],
                     "reference_gaps": row_gaps, "kernel_env": args.kernel, "vllm": result["vllm"],
                     "engine_init_s": round(result["init_s"], 1), "wall_s": round(time.time() - t0, 1),
                     "steps": steps, "reference_argmax_agree": exact,
                     "max_gap_nats": round(max(gaps), 4),
                     "mean_abs_logprob_diff": round(float(torch.tensor(diffs).mean()), 4),
                     "kernels": result["kernels"], "exit_code": result["exit_code"],
                     "scored": result["scored"],
                     "scored_sequences": score or [row["prompt_ids"] + row["tokens"]
                                                   for row in result["rows"]]}
            wanted = {args.kernel} if args.kernel else {"sm90_triton"}
            entry["bf16_floor_nats"] = round(floors[arch, act], 4)
            entry["tolerance_nats"] = round(tolerance, 4)
            entry["ok"] = bool(max(gaps) <= tolerance and _kinds(entry["kernels"]) == wanted)
            report.append(entry)
            print(json.dumps(entry), flush=True)
    tp_agreement = []
    for arch in args.archs:
        for act in args.acts:
            runs = [e for e in report if e["arch"] == arch and e["act"] == act and "tokens" in e]
            if len(args.tp) > 1:
                tp_agreement.append({"arch": arch, "act": act, "tp": args.tp,
                                     **tp_agreement_of(runs, len(args.tp)),
                                     "forced": forced_agreement_of(runs, len(args.tp))})
    serve = [] if args.no_serve else [
        serve_check(work / f"{arch}_w4a8_{args.checkpoint_act}{vocab_tag}", arch, 18461 + i)
        for i, arch in enumerate(args.archs)]
    (out / "vllm_gpu_smoke.json").write_text(json.dumps(
        {"llm": report, "tp_agreement": tp_agreement, "serve": serve}, indent=1))
    print("\n| model | act | TP | vLLM | steps | argmax = reference | max gap (nats) | "
          "mean |dlogprob| | kernels | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for e in report:
        kinds = sorted(_kinds(e["kernels"])) or ["-"]
        print(f"| {e['arch']} | {e['act']} | {e['tp']} | {e['vllm']} | {e['steps']} | "
              f"{e['reference_argmax_agree']} | {e['max_gap_nats']} | {e['mean_abs_logprob_diff']} | "
              f"{', '.join(kinds)} | {e['ok']} |")
    print("\n| vllm serve | openai checks | kernels | ok |\n|---|---|---|---|")
    for e in serve:
        print(f"| {e['arch']} | {e['checks']} | {', '.join(e['kernel_kinds'])} | {e['ok']} |")
    for e in tp_agreement:
        print(f"TP {e['tp']}, {e['arch']} {e['act']}: identical greedy tokens {e['same_tokens']}; "
              f"{e['steps_before_divergence']} steps equal before the first divergence of each "
              f"prompt; divergences {e['divergences']}; ok {e['ok']}")
        f = e["forced"]
        print(f"TP {e['tp']}, {e['arch']} {e['act']}, teacher-forced on the TP={e['tp'][0]} "
              f"sequences: {f['positions']} positions, argmax equal at {f['argmax_equal']}, "
              f"max |dlogprob| {f['max_abs_logprob_diff']} (mean {f['mean_abs_logprob_diff']}, "
              f"bound {f['tolerance_nats']}); argmax differences {f['argmax_differences']}; "
              f"ok {f['ok']}")
    checks = report + serve + tp_agreement + [e["forced"] for e in tp_agreement]
    sys.exit(0 if all(e["ok"] for e in checks) else 1)


def tp_agreement_of(runs: list[dict], n_tp: int) -> dict:
    """Greedy tokens of the TP sizes against the first one, prompt by prompt.

    Identical is what a correct sharding gives, up to one thing: TP changes the order of float
    sums, and on a random tiny model some steps are near-ties. So a prompt may part at one step
    where *both* tokens are within the runs' tolerance (TIE_NATS or the bf16 floor, the larger)
    of the fp32 reference's top-1 (the gaps are taken along the common prefix, so they are the
    same distribution); after that the sequences differ legitimately. A part at any other step,
    or a missing run, fails.
    """
    if len(runs) != n_tp:
        return {"same_tokens": False, "steps_before_divergence": 0, "divergences": [],
                "ok": False}
    base = runs[0]
    equal_steps, divergences, ok = 0, [], True
    for other in runs[1:]:
        for p, (a, b) in enumerate(zip(base["tokens"], other["tokens"])):
            i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
            if i is None:
                ok &= len(a) == len(b)
                equal_steps += len(a)
                continue
            equal_steps += i
            gaps = (base["reference_gaps"][p][i], other["reference_gaps"][p][i])
            near_tie = max(gaps) <= min(base.get("tolerance_nats", TIE_NATS),
                                        other.get("tolerance_nats", TIE_NATS))
            ok &= near_tie
            divergences.append({"tp": other["tp"], "prompt": p, "step": i,
                                "tokens": (a[i], b[i]), "reference_gaps": gaps,
                                "near_tie": near_tie})
    same = all(r["tokens"] == base["tokens"] for r in runs)
    return {"same_tokens": same, "steps_before_divergence": equal_steps,
            "divergences": divergences, "ok": ok}


def forced_agreement_of(runs: list[dict], n_tp: int) -> dict:
    """The TP sizes on identical inputs: each run scored the first run's sequences teacher-forced
    (prompt_logprobs). A correct sharding only reorders float sums, so at every position the
    logprob of the following token may move by no more than the runs' tolerance (TIE_NATS or
    the bf16 floor, the larger), and the argmax may differ only at a near-tie: where either
    run has the other's argmax within that tolerance of its own (a run whose top-k list lacks
    the other's argmax cannot tell, and the check fails). A sharding bug moves logprobs by nats.
    """
    if len(runs) != n_tp or any("scored" not in r for r in runs):
        return {"positions": 0, "argmax_equal": 0, "max_abs_logprob_diff": None,
                "mean_abs_logprob_diff": None, "tolerance_nats": None,
                "argmax_differences": [], "ok": False}
    base = runs[0]
    tol = min(r.get("tolerance_nats", TIE_NATS) for r in runs)
    diffs, differences, equal, ok = [], [], 0, True
    for other in runs[1:]:
        ok &= len(other["scored"]) == len(base["scored"])
        for s, (a_seq, b_seq) in enumerate(zip(base["scored"], other["scored"])):
            ok &= len(a_seq) == len(b_seq)
            for i, (a, b) in enumerate(zip(a_seq, b_seq)):
                diffs.append(abs(a["forced"] - b["forced"]))
                a_top, b_top = a["top"][0][0], b["top"][0][0]
                if a_top == b_top:
                    equal += 1
                    continue
                gaps = (_gap_to(a, b_top), _gap_to(b, a_top))
                near_tie = any(g is not None and g <= tol for g in gaps)
                ok &= near_tie
                differences.append({"tp": other["tp"], "sequence": s, "position": i,
                                    "argmax": (a_top, b_top), "gaps": gaps,
                                    "near_tie": near_tie})
    max_diff = max(diffs, default=None)
    ok &= bool(diffs) and max_diff <= tol
    return {"positions": len(diffs), "argmax_equal": equal,
            "max_abs_logprob_diff": None if max_diff is None else round(max_diff, 4),
            "mean_abs_logprob_diff": round(sum(diffs) / len(diffs), 4) if diffs else None,
            "tolerance_nats": round(tol, 4), "argmax_differences": differences, "ok": ok}


def _gap_to(scored: dict, token: int):
    """How far below its argmax a scored position puts ``token`` (None: not in its top-k)."""
    lp = {int(k): v for k, v in scored["top"]}
    return scored["top"][0][1] - lp[token] if token in lp else None


def kernel_log_lines(log: str) -> list[str]:
    """The dispatcher's "<layer config> on <device> uses kernel <name>" lines, whole: MoE
    configs are long, and cutting them (as an earlier version did, at 160 characters) cut the
    kernel name too ("sm90_tr") and failed a serve check whose answers were all right."""
    return sorted({line.split("w4a8_mxfp4: ", 1)[1] for line in log.splitlines()
                   if "uses kernel " in line and "w4a8_mxfp4: " in line})


def _kinds(kernel_lines: list[str]) -> set[str]:
    return {k.split("uses kernel ")[1].split()[0] for k in kernel_lines if "uses kernel " in k}


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
        lines = kernel_log_lines(text)
        entry["kernel_kinds"] = sorted(_kinds(lines))
        entry["ok"] = _kinds(lines) == {"sm90_triton"} and "quantization=w4a8_mxfp4" in text
    except Exception as exc:  # recorded and reported; the run goes on to the other checks
        entry.update(checks=f"FAILED: {type(exc).__name__}: {str(exc)[-3000:]}", kernel_kinds=[],
                     ok=False)
    entry["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(entry), flush=True)
    return entry


if __name__ == "__main__":
    main()
