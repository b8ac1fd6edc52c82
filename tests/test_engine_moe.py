"""MoE checkpoints (Qwen3-MoE, Mixtral; ModelOpt's export and w4a8-quantize's) through the real
vLLM engine on CPU, token by token against the independent transformers reference.

Each engine runs in its own process: vLLM 0.32 cannot build a second in-process engine with MoE
layers after the first (its distributed state is torn down)."""

from __future__ import annotations

import pytest

from engine import assert_matches_reference, generate_in_subprocess, median_nats_for
from reference_model import build_reference_model
from w4a8_backend.config.checkpoint import ACTIVATIONS_ENV
from w4a8_backend.formats import ActivationDtype

pytestmark = [pytest.mark.engine, pytest.mark.slow]

IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

CASES = [
    ("modelopt_qwen3_moe_static", "fp8"),
    ("modelopt_qwen3_moe_static", "int8"),
    ("modelopt_mixtral_dynamic", "fp8"),
    ("modelopt_mixtral_dynamic", "int8"),
    ("exported_qwen3_moe_int8_static", "int8"),
    ("exported_mixtral_fp8_static", "fp8"),
]


def _check(path, act, results):
    reference = build_reference_model(path, act_dtype=ActivationDtype.from_string(act))
    median = median_nats_for(path)
    for prompt_ids, tokens, logprobs in results:
        assert_matches_reference(reference, prompt_ids, tokens, logprobs, max_nats=0.1,
                                 median_nats=median)


@pytest.mark.parametrize("fixture,act", CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_moe_greedy_tokens_match_reference(request, fixture, act):
    path = request.getfixturevalue(fixture)
    results = generate_in_subprocess(path, env={**IN_PROCESS, ACTIVATIONS_ENV: act})
    _check(path, act, results)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp2", "tp2-ep"])
def test_moe_tensor_and_expert_parallel(modelopt_qwen3_moe_static, expert_parallel):
    """TP=2 splits each expert's intermediate size (64 -> 32 per rank, one MXFP4 block);
    with expert parallelism each rank holds half of the experts instead."""
    results = generate_in_subprocess(
        modelopt_qwen3_moe_static, tensor_parallel_size=2,
        enable_expert_parallel=expert_parallel,
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
    )
    _check(modelopt_qwen3_moe_static, "fp8", results)


def test_moe_compiled_engine(modelopt_qwen3_moe_static):
    """vLLM's default torch.compile mode with MoE layers (vLLM wraps them in its own custom op)."""
    results = generate_in_subprocess(modelopt_qwen3_moe_static, enforce_eager=False,
                                     env={**IN_PROCESS, ACTIVATIONS_ENV: "fp8"})
    _check(modelopt_qwen3_moe_static, "fp8", results)
