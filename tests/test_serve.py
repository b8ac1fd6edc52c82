"""`vllm serve` (the real CLI and OpenAI server) queried by the real `openai` client."""

from __future__ import annotations

import pytest

from engine import vllm_server

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def _exercise(base_url: str) -> str:
    """Completions, chat and both streamed, greedy; ``ignore_eos`` so that a random model's early
    end-of-sequence token cannot shorten a reply (every reply has exactly 12 tokens)."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused")
    model = client.models.list().data[0].id
    fixed = {"max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}
    completion = client.completions.create(model=model, prompt="The weather today is", **fixed)
    assert completion.usage.completion_tokens == 12, completion
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], **fixed)
    assert chat.usage.completion_tokens == 12, chat
    stream = client.completions.create(model=model, prompt="The weather today is", stream=True,
                                       **fixed)
    streamed = "".join(chunk.choices[0].text for chunk in stream)
    # Greedy decoding: the stream spells out the same text as the plain completion.
    assert streamed == completion.choices[0].text, (streamed, completion.choices[0].text)
    chat_stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], stream=True, **fixed)
    pieces = [c.choices[0].delta.content or "" for c in chat_stream if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content, (pieces, chat)
    return model


def test_serve_with_quantization_flag_compiled(modelopt_llama_static):
    """ModelOpt FP8 checkpoint, `--quantization w4a8_mxfp4`, vLLM's default compiled mode."""
    with vllm_server(modelopt_llama_static, "--quantization", "w4a8_mxfp4",
                     port=18231) as (url, log):
        _exercise(url)
    text = log.read_text()
    assert "quantization=w4a8_mxfp4" in text
    assert "uses kernel fallback" in text


def test_serve_claims_int8_checkpoint_without_flag(exported_llama_int8_static):
    """This project's W4A8_MXFP4_INT8 checkpoint, no `--quantization`: claimed from its config."""
    with vllm_server(exported_llama_int8_static, "--enforce-eager", port=18232) as (url, log):
        _exercise(url)
    text = log.read_text()
    assert "quantization=w4a8_mxfp4" in text
    assert "act=INT8 scheme=STATIC_PER_TENSOR" in text


def test_serve_moe_compiled(modelopt_qwen3_moe_static):
    """MoE in vLLM's default (torch.compile) mode, as a user would serve it."""
    with vllm_server(modelopt_qwen3_moe_static, "--quantization", "w4a8_mxfp4",
                     port=18233) as (url, log):
        _exercise(url)
    assert "MoE E=4" in log.read_text()
