"""Opt-in MXFP4 vocabulary layers (``w4a8-quantize --quantize-vocab``): the export, the config
marker and the refusals. Greedy tokens against the reference: ``test_engine_dense.py``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine import (
    PROMPTS,
    assert_matches_reference,
    fp32_gemm_batch_invariant,
    greedy_with_logprobs,
    make_llm,
    median_nats_for,
    release,
)
from reference_model import build_reference_model
from test_quantize import load_tensors
from w4a8_backend.config.checkpoint import parse_quant_config
from w4a8_backend.formats import VOCAB_LAYERS_KEY, quantize_mxfp4
from w4a8_backend.tools import quantize as wq


def test_export_stores_vocab_layers_as_mxfp4(tiny_llama, exported_llama_vocab_fp8_static):
    src = load_tensors(tiny_llama)
    out = load_tensors(exported_llama_vocab_fp8_static)
    for module in ("lm_head", "model.embed_tokens"):
        packed, scale = quantize_mxfp4(src[f"{module}.weight"])
        assert torch.equal(out[f"{module}.weight"], packed), module
        assert torch.equal(out[f"{module}.weight_scale"], scale), module
    # The head's input is calibrated like any linear's; the embedding has no input activation.
    assert float(out["lm_head.input_scale"]) > 0
    assert "model.embed_tokens.input_scale" not in out
    hf_quant = json.loads((exported_llama_vocab_fp8_static / "hf_quant_config.json").read_text())
    flat = json.loads((exported_llama_vocab_fp8_static / "config.json").read_text())
    for section in (hf_quant["quantization"], flat["quantization_config"]):
        assert section[VOCAB_LAYERS_KEY] == ["embed_tokens", "lm_head"]
        assert parse_quant_config(section).vocab_layers == {"embed_tokens", "lm_head"}
    assert "lm_head" not in hf_quant["quantization"]["exclude_modules"]


def test_default_export_has_no_marker(exported_llama_fp8_static):
    hf_quant = json.loads((exported_llama_fp8_static / "hf_quant_config.json").read_text())
    assert VOCAB_LAYERS_KEY not in hf_quant["quantization"]
    assert load_tensors(exported_llama_fp8_static)["lm_head.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("value", [["lm_head", "embeddings"], "lm_head", [1]])
def test_marker_must_name_known_layers(value):
    with pytest.raises(ValueError, match=VOCAB_LAYERS_KEY):
        parse_quant_config({"quant_algo": "W4A8_MXFP4_FP8", VOCAB_LAYERS_KEY: value})


def test_export_refuses_tied_embeddings(tiny_llama, tmp_path, capsys):
    src = tmp_path / "tied"
    shutil.copytree(tiny_llama, src)
    config = json.loads((src / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(config))
    rc = wq.main([str(src), str(tmp_path / "out"), "--activations", "fp8",
                  "--quantize-vocab", "lm_head", "--no-progress"])
    assert rc == 1
    assert "ties its output head to its input embedding" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_vocab_layer_is_an_argparse_error(tiny_llama, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        wq.main([str(tiny_llama), str(tmp_path / "out"), "--activations", "fp8",
                 "--quantize-vocab", "wte"])
    assert exc.value.code == 2
    assert "invalid choice: 'wte'" in capsys.readouterr().err


@pytest.mark.engine
def test_tied_checkpoint_refused_at_engine_init(exported_llama_vocab_fp8_static, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(exported_llama_vocab_fp8_static, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"ties its output head to its input embedding"):
        make_llm(ckpt)


@pytest.mark.engine
def test_model_building_its_embedding_unquantized_is_refused(tiny_mixtral, tmp_path):
    """vLLM's Mixtral builds embed_tokens without the quantization config: loading MXFP4 bytes
    into it would give numbers, so the engine must refuse before loading."""
    ckpt = tmp_path / "ckpt"
    wq.quantize_checkpoint(tiny_mixtral, ckpt, activations="fp8", progress=False,
                           quantize_vocab=("embed_tokens",))
    with pytest.raises(ValueError, match=r"builds its input embedding without the quantization"):
        llm = make_llm(ckpt)
        release(llm)


@pytest.mark.engine
def test_mixtral_lm_head_only_matches_reference(tiny_mixtral, tmp_path):
    """The same model with only the head as MXFP4 (dynamic scales, MoE) serves the reference's
    greedy tokens."""
    ckpt = tmp_path / "ckpt"
    wq.quantize_checkpoint(tiny_mixtral, ckpt, activations="fp8", progress=False,
                           quantize_vocab=("lm_head",))
    llm = make_llm(ckpt)
    try:
        reference = build_reference_model(ckpt)
        prompt_ids, tokens, logprobs = greedy_with_logprobs(llm, PROMPTS[0])
        assert_matches_reference(reference, prompt_ids, tokens, logprobs, max_nats=0.1,
                                 median_nats=median_nats_for(ckpt))
    finally:
        release(llm)


@pytest.mark.engine
def test_padded_vocabulary_matches_reference(tmp_path):
    """A vocabulary vLLM pads (500 -> 512 rows): the padding rows of the MXFP4 head and embedding
    are vLLM's to fill and never reach a token; greedy tokens still follow the reference."""
    import tiny_models

    src = tiny_models.make_tiny_llama(tmp_path / "src", vocab_size=500)
    assert json.loads((src / "config.json").read_text())["vocab_size"] == 500
    ckpt = tmp_path / "ckpt"
    wq.quantize_checkpoint(src, ckpt, activations="fp8", calibration="static", progress=False,
                           quantize_vocab=("lm_head", "embed_tokens"))
    assert load_tensors(ckpt)["lm_head.weight"].shape == (500, 64)
    llm = make_llm(ckpt)
    try:
        rows = llm.apply_model(lambda m: (m.lm_head.weight.shape[0],
                                          m.model.embed_tokens.weight.shape[0]))
        assert rows == [(512, 512)], rows
        reference = build_reference_model(ckpt)
        for prompt in PROMPTS[:2]:
            # this random model picks its EOS within 16 steps of a prompt: generate on
            prompt_ids, tokens, logprobs = greedy_with_logprobs(llm, prompt, ignore_eos=True)
            assert max(tokens) < 500
            # the quantized head turns one flipped FP8 rounding of the last hidden state into a
            # shift of every logit: 0.128 nats at one step where the GEMM is not batch-invariant
            # (AMD EPYC, AVX-512, 2026-11-24)
            max_nats = 0.1 if fp32_gemm_batch_invariant() else 0.2
            assert_matches_reference(reference, prompt_ids, tokens, logprobs, max_nats=max_nats,
                                     median_nats=median_nats_for(ckpt))
    finally:
        release(llm)
