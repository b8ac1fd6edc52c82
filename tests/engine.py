"""Starting vLLM engines and comparing their greedy output with the reference forward."""

from __future__ import annotations

import functools
import gc
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from reference_model import reference_logprobs

PROMPTS = ["The weather today is", "Once upon a time", "A quantized model runs"]
STEPS = 16
# A reference top-1 within this many nats of the engine's token is a tie that rounding may break.
TIE_NATS = 0.05


def has_input_scales(path) -> bool:
    """Whether the checkpoint is calibrated (static activation scales)."""
    from safetensors import safe_open

    for shard in Path(path).glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            if any(key.endswith(".input_scale") for key in f.keys()):
                return True
    return False


@functools.lru_cache(maxsize=None)
def fp32_gemm_batch_invariant() -> bool:
    """Whether this machine's float32 GEMM gives a row the same bits alone (M = 1, as in a
    decode step) as inside a batch (as in the teacher-forced reference). Measured, not assumed:
    on the 2-core AVX2 CI machine of 2026-11-22/23 it held; on a 2-core AMD EPYC with AVX-512
    (MKL 2024.2, torch 2.13.0, 2026-11-24) a row alone differs in the last bits
    (4.6e-5 absolute at 100 x 384 x 384)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 384, generator=g)
    w = torch.randn(384, 384, generator=g)
    full = torch.nn.functional.linear(x, w)
    return all(torch.equal(torch.nn.functional.linear(x[i:i + 1], w), full[i:i + 1])
               for i in range(x.shape[0]))


def median_nats_for(path) -> float:
    """Static scales reproduce the reference to float32 rounding (~1e-6 nats), where this
    machine's float32 GEMM is batch-invariant (``fp32_gemm_batch_invariant``).

    A dynamic scale is an amax computed at run time: a last-bit difference in it (from another
    fp32 summation order upstream, e.g. attention) moves the FP8/INT8 rounding of many elements
    at once, so those runs agree to activation-rounding level instead. Without a batch-invariant
    GEMM a static scale meets the same last-bit differences (a decode step's rows against the
    reference's batch) and flips roundings too, so it gets the same tolerance.
    """
    exact = has_input_scales(path) and fp32_gemm_batch_invariant()
    return 1e-3 if exact else 3e-2


def make_llm(path, **overrides):
    from vllm import LLM

    kwargs = dict(
        quantization="w4a8_mxfp4",
        enforce_eager=True,
        distributed_executor_backend="uni",
        dtype="float32",
        max_model_len=256,
        max_num_seqs=1,
        seed=0,
    )
    kwargs.update(overrides)
    return LLM(str(path), **kwargs)


def release(llm) -> None:
    del llm
    gc.collect()


def greedy_with_logprobs(llm, prompt: str, steps: int = STEPS, ignore_eos: bool = False):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=steps, temperature=0, logprobs=1, ignore_eos=ignore_eos)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    tokens = list(out.outputs[0].token_ids)
    logprobs = [out.outputs[0].logprobs[i][t].logprob for i, t in enumerate(tokens)]
    return list(out.prompt_token_ids), tokens, logprobs


def assert_matches_reference(reference, prompt_ids, tokens, logprobs, max_nats: float,
                             median_nats: float) -> None:
    """Teacher-forced check of every generated step against the reference forward.

    Each engine token must be the reference's greedy choice (or tie with it within TIE_NATS);
    the engine's log-probabilities must agree with the reference's within the tolerances.
    """
    assert len(tokens) == STEPS, f"engine produced {len(tokens)} tokens, expected {STEPS}"
    ref = reference_logprobs(reference, prompt_ids, tokens)
    diffs, ties = [], 0
    for step, (token, lp, ref_lp) in enumerate(zip(tokens, logprobs, ref)):
        best = int(ref_lp.argmax())
        if token != best:
            gap = float(ref_lp[best] - ref_lp[token])
            assert gap < TIE_NATS, (
                f"step {step}: engine chose {token}, reference {best} "
                f"(reference prefers it by {gap:.4f} nats); engine {tokens}"
            )
            ties += 1
        diffs.append(abs(lp - float(ref_lp[token])))
    diffs_t = torch.tensor(diffs)
    assert ties <= 1, f"{ties} near-tie disagreements in {STEPS} steps"
    assert float(diffs_t.max()) < max_nats, f"log-prob differences {diffs}"
    assert float(diffs_t.median()) < median_nats, f"log-prob differences {diffs}"


def vllm_command() -> list[str]:
    """The `vllm` CLI next to this interpreter, or ``$W4A8_VLLM_COMMAND`` (e.g. the GPU kit's
    ``python3 -m vllm.entrypoints.cli.main``, which has no `vllm` script)."""
    import os
    import shlex

    override = os.environ.get("W4A8_VLLM_COMMAND")
    return shlex.split(override) if override else [str(Path(sys.executable).with_name("vllm"))]


@contextmanager
def vllm_server(path, *extra_args: str, port: int, env=None, timeout: float = 300.0):
    """A real `vllm serve` process; yields its base URL once /health answers."""
    import os
    import urllib.request

    log = Path(path).parent / f"serve_{port}.log"
    cmd = vllm_command() + ["serve", str(path), "--port", str(port), "--host", "127.0.0.1",
                            "--max-model-len", "256", *extra_args]
    full_env = dict(os.environ)
    full_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    full_env.update(env or {})
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=full_env)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n"
                                       + log.read_text()[-4000:])
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError("vllm serve did not become healthy:\n"
                                           + log.read_text()[-4000:])
                    time.sleep(1)
            yield f"http://127.0.0.1:{port}/v1", log
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


_SUBPROCESS_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
args = json.loads(sys.argv[1])
llm = LLM(args["path"], **args["engine"])
results = []
for prompt in args["prompts"]:
    out = llm.generate([prompt], SamplingParams(max_tokens=args["steps"], temperature=0, logprobs=1),
                       use_tqdm=False)[0]
    tokens = list(out.outputs[0].token_ids)
    results.append({"prompt_ids": list(out.prompt_token_ids), "tokens": tokens,
                    "logprobs": [out.outputs[0].logprobs[i][t].logprob for i, t in enumerate(tokens)]})
print("RESULT" + json.dumps(results))
"""


def generate_in_subprocess(path, prompts=PROMPTS, steps: int = STEPS, env=None, timeout=600,
                           **overrides):
    """Greedy generation in a fresh Python process (its own engine, compile caches and
    distributed state); returns ``[(prompt_ids, tokens, logprobs)]``."""
    import json
    import os

    engine = dict(quantization="w4a8_mxfp4", enforce_eager=True, dtype="float32",
                  max_model_len=256, max_num_seqs=1, seed=0)
    engine.update(overrides)
    payload = json.dumps({"path": str(path), "engine": engine, "prompts": list(prompts),
                          "steps": steps})
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS_SCRIPT, payload], env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"engine subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return [(r["prompt_ids"], r["tokens"], r["logprobs"]) for r in json.loads(lines[-1][6:])]
